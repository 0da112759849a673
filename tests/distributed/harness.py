"""Run a worker function on N gloo ranks (spawned processes on this machine) and collect results.

The ranks run under a deadline counted from when every rank is ready (its process group initialised),
not from the spawn, so a loaded machine that is slow to start Python and import torch fails nothing.
Ranks still running at the deadline write all their threads' stacks and are killed, so a deadlock
fails its test with the places it hung instead of stalling the suite."""
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
        open(os.path.join(out_dir, f"rank{rank}.ready"), "w").close()       # the deadline counts from here
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


def run_ranks(fn, *args, world: int = 2, deadline: float = 600, startup: float = 600) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` ranks; return each rank's (picklable) result.

    Every rank must be ready (spawned, torch imported, process group initialised) within ``startup``
    seconds; from then on, a rank still running after ``deadline`` seconds fails the call with its
    stack traces."""
    with tempfile.TemporaryDirectory() as out:
        ready = [os.path.join(out, f"rank{r}.ready") for r in range(world)]
        ctx = mp.start_processes(_entry, args=(world, free_port(), out, fn, args), nprocs=world,
                                 join=False, start_method="spawn")
        failure, not_ready, timed_out = None, None, False
        started, end = time.monotonic(), None
        try:
            while not ctx.join(timeout=1):
                now = time.monotonic()
                if end is None and all(os.path.exists(f) for f in ready):
                    end = now + deadline
                if end is None and now > started + startup:
                    not_ready = [r for r, f in enumerate(ready) if not os.path.exists(f)]
                    break
                if end is not None and now > end:
                    timed_out = True
                    alive = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
                    for r in alive:
                        os.kill(ctx.processes[r].pid, signal.SIGUSR1)
                    dumps = [os.path.join(out, f"rank{r}.hang") for r in alive]
                    wait = time.monotonic() + 60           # a loaded machine may take a while to write them
                    while time.monotonic() < wait and not all(os.path.getsize(f) for f in dumps):
                        time.sleep(0.5)
                    time.sleep(0.5)
                    break
        except Exception as e:  # a rank exited non-zero: report what it printed
            failure = e
        finally:                # an interrupt (pytest-timeout, Ctrl-C) leaves no rank behind
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        if not_ready:
            raise AssertionError(f"ranks {not_ready} were not ready (process group initialised) {startup} s after "
                                 "they were spawned")
        hangs = [f"{f}:\n{open(os.path.join(out, f)).read()}" for f in sorted(os.listdir(out))
                 if f.endswith(".hang") and os.path.getsize(os.path.join(out, f))]
        if timed_out:
            raise AssertionError(f"a rank was still running after {deadline} s (counted from when all ranks were "
                                 "ready); its stacks:\n" + ("\n".join(hangs) or "(none written)"))
        errors = [open(os.path.join(out, f)).read() for f in sorted(os.listdir(out)) if f.endswith(".err")]
        if errors:
            raise AssertionError("worker failed:\n" + "\n".join(errors))
        if failure is not None:
            raise AssertionError(f"worker failed: {failure}")
        missing = [r for r in range(world) if not os.path.exists(os.path.join(out, f"rank{r}.pkl"))]
        if missing:
            raise AssertionError(f"ranks {missing} exited without a result and without an error")
        results = []
        for r in range(world):
            with open(os.path.join(out, f"rank{r}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results
