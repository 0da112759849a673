"""Helpers shared by the benchmark scripts."""
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile


def peak_bytes(fn, device: torch.device = torch.device("cpu")) -> int:
    """Peak extra memory allocated while ``fn`` runs: CUDA max_memory_allocated, or on CPU the
    running sum of the torch profiler's self allocations (approximate)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def spawn_ranks(worker, world: int, args, results: int) -> list:
    """Run ``worker(rank, world, port, args, queue)`` on ``world`` spawned processes (gloo on a free
    loopback port) and return the first ``results`` items the workers put on the queue."""
    import socket
    import time

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=worker, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    out = []
    while len(out) < results:         # a rank that died (an exception) ends the wait instead of hanging it
        if not queue.empty():
            out.append(queue.get())
        elif any(p.exitcode not in (None, 0) for p in procs) or all(p.exitcode is not None for p in procs):
            for p in procs:
                p.kill()
            raise SystemExit(f"a benchmark rank exited with {[p.exitcode for p in procs]} before reporting")
        else:
            time.sleep(0.2)
    for p in procs:
        p.join()
    return out


def end_rank(rank: int, result, queue) -> None:
    """The end of a spawned benchmark rank: rank 0 reports ``result``, then every rank leaves the
    process group and exits at once (gloo can abort at interpreter exit)."""
    import os
    import sys

    import torch.distributed as dist

    if rank == 0:
        queue.put(result)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)
