"""Small-scale accuracy of the structures: the quickstart (small_cnn on digits, 30 epochs) trained with
RigL unstructured, fan_in and 2:4 at the same sparsity, several seeds; prints test top-1 (mean, min,
max) and the measured density of each. 2:4 is density 0.5 in every masked layer, so the 2:4 rows
compare at 50% uniform; fan_in also at the quickstart's 90% ERK.

    python benchmarks/structure_accuracy.py [--seeds 0 1 2] [--jobs 2] [--json out.json]

Each run is ``rigl-ds train configs/quickstart.yaml sparsity.structure=... train.seed=...`` in its
own process (``--jobs`` at a time; the quickstart uses one thread each).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
SETTINGS = [
    ("50% uniform", ["sparsity.sparsity=0.5", "sparsity.distribution=uniform"], ["unstructured", "2:4", "fan_in"]),
    ("90% ERK", [], ["unstructured", "fan_in"]),
]


def run(args: list[str], run_dir: pathlib.Path) -> dict:
    cmd = [sys.executable, "-m", "rigl_ds.cli", "train", str(ROOT / "configs" / "quickstart.yaml"), *args,
           "logging.progress=false", "checkpoint.every_steps=null", f"logging.run_dir={run_dir}"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return json.loads((run_dir / "result.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    jobs = []
    for label, extra, structures in SETTINGS:
        for structure in structures:
            for seed in args.seeds:
                jobs.append((label, structure, seed, [*extra, f"sparsity.structure={structure}",
                                                      f"train.seed={seed}"]))
    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as d, cf.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(run, a, pathlib.Path(d) / f"r{i}"): (label, s, seed)
                   for i, (label, s, seed, a) in enumerate(jobs)}
        for f in cf.as_completed(futures):
            label, s, seed = futures[f]
            results.setdefault((label, s), []).append(f.result())
            print(f"done: {label} {s} seed {seed}: top-1 {f.result()['eval']['top1']:.4f}", flush=True)
    rows = []
    print(f"\n{'setting':<12} {'structure':<13} {'top-1 mean':>10} {'min':>7} {'max':>7} {'density':>9}  seeds")
    for label, _, structures in SETTINGS:
        for s in structures:
            rs = results[(label, s)]
            top1 = [r["eval"]["top1"] for r in rs]
            row = {"setting": label, "structure": s, "top1": top1, "density": rs[0]["global_density"]}
            rows.append(row)
            print(f"{label:<12} {s:<13} {statistics.mean(top1):>10.4f} {min(top1):>7.4f} {max(top1):>7.4f} "
                  f"{row['density']:>9.6f}  {len(top1)}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
