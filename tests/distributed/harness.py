"""Run a worker function on N gloo ranks (spawned processes on this machine) and collect results."""
from __future__ import annotations

import os
import pickle
import socket
import sys
import tempfile
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out_dir: str, fn, args) -> None:
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


def run_ranks(fn, *args, world: int = 2) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` ranks; return each rank's (picklable) result."""
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(_entry, args=(world, free_port(), out, fn, args), nprocs=world,
                                 join=False, start_method="spawn")
        failure = None
        try:
            while not ctx.join(timeout=300):
                pass
        except Exception as e:  # a rank exited non-zero: report what it printed
            failure = e
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
