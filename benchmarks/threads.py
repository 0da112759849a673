"""torch's CPU threads (``train.threads``) on a quiet and on a loaded machine: the quickstart through
the real CLI, one thread vs every CPU, each measured with no other work and beside ``--busy``
processes that spin (the shared CI machine). Runs are interleaved (1, all, 1, all, ...) so both
see the same machine; prints the median wall time of each and the ratio all / 1.

    python benchmarks/threads.py [--steps 150] [--repeats 3] [--busy 2]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def spin(stop) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def run(threads: int, steps: int) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "rigl_ds.cli", "train", str(ROOT / "configs" / "quickstart.yaml"),
                        f"train.max_steps={steps}", f"train.threads={threads}", "logging.progress=false",
                        "logging.tensorboard=false", "checkpoint.every_steps=null", "checkpoint.at_end=false",
                        f"logging.run_dir={d}/run"], env=env, check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--busy", type=int, default=2, help="spinning processes beside the loaded runs")
    args = ap.parse_args()
    cpus = len(os.sched_getaffinity(0))
    print(f"quickstart, {args.steps} steps, {cpus} CPUs; wall seconds per run (includes start-up), "
          f"median of {args.repeats}")
    for label, busy in (("quiet", 0), (f"loaded ({args.busy} spinning processes)", args.busy)):
        stop = mp.Event()
        spinners = [mp.Process(target=spin, args=(stop,), daemon=True) for _ in range(busy)]
        for p in spinners:
            p.start()
        times: dict[int, list[float]] = {1: [], cpus: []}
        try:
            for _ in range(args.repeats):
                for n in times:
                    times[n].append(run(n, args.steps))
        finally:
            stop.set()
            for p in spinners:
                p.join()
        one, every = statistics.median(times[1]), statistics.median(times[cpus])
        print(f"{label}: threads=1 {one:.1f} s {[round(t, 1) for t in times[1]]}, threads={cpus} {every:.1f} s "
              f"{[round(t, 1) for t in times[cpus]]}, ratio {cpus} / 1 = {every / one:.2f}")


if __name__ == "__main__":
    main()
