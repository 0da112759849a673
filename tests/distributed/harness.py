"""Run a worker function on N gloo ranks (spawned processes on this machine) and collect results.

The ranks run under a deadline: ranks still running then write all their threads' stacks and are killed,
so a deadlock fails its test with the places it hung instead of stalling the suite."""
from __future__ import annotations

import faulthandler
import os
import pickle
import signal
import socket
import sys
import tempfile
import time
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out_dir: str, fn, args) -> None:
    hang = open(os.path.join(out_dir, f"rank{rank}.hang"), "w")
    faulthandler.register(signal.SIGUSR1, file=hang, all_threads=True)     # the harness's deadline
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import torch.distributed as dist

    torch.set_num_threads(1)
    code = 0
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        result = fn(rank, world, *args)
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)   # avoids gloo's occasional abort at interpreter exit


def run_ranks(fn, *args, world: int = 2, deadline: float = 600) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` ranks; return each rank's (picklable) result.

    A rank still running after ``deadline`` seconds fails the call with its stack traces."""
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(_entry, args=(world, free_port(), out, fn, args), nprocs=world,
                                 join=False, start_method="spawn")
        failure, end = None, time.monotonic() + deadline
        try:
            while not ctx.join(timeout=2):
                if time.monotonic() > end:
                    for p in ctx.processes:
                        if p.is_alive():
                            os.kill(p.pid, signal.SIGUSR1)
                    time.sleep(3)
                    break
        except Exception as e:  # a rank exited non-zero: report what it printed
            failure = e
        finally:                # an interrupt (pytest-timeout, Ctrl-C) leaves no rank behind
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        hangs = [f"{f}:\n{open(os.path.join(out, f)).read()}" for f in sorted(os.listdir(out))
                 if f.endswith(".hang") and os.path.getsize(os.path.join(out, f))]
        if hangs:
            raise AssertionError(f"a rank was still running after {deadline} s; its stacks:\n" + "\n".join(hangs))
        errors = [open(os.path.join(out, f)).read() for f in sorted(os.listdir(out)) if f.endswith(".err")]
        if errors:
            raise AssertionError("worker failed:\n" + "\n".join(errors))
        if failure is not None:
            raise AssertionError(f"worker failed: {failure}")
        results = []
        for r in range(world):
            with open(os.path.join(out, f"rank{r}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results
