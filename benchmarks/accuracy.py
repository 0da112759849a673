"""Small-scale accuracy on the quickstart (small_cnn on scikit-learn's digits), several seeds each;
prints test top-1 (mean, min, max) and the measured density of every row.

* ``--compare structures``: RigL unstructured, fan_in and 2:4 at the same sparsity (30 epochs). 2:4
  is density 0.5 in every masked layer, so those rows compare at 50% uniform; fan_in also at the
  quickstart's 90% ERK.
* ``--compare methods``: static, RigL and gap_cyclic (4 partitions, 2 rounds of phases of 0.09 of
  training: the last prune at 0.72, near RigL's t_end 0.75) at 90% and 98% ERK, 10 epochs (short
  and very sparse, where digits is not yet solved by every method).

    python benchmarks/accuracy.py [--compare structures|methods] [--seeds 0 1 2] [--jobs 2] [--json out.json]

Each run is ``rigl-ds train configs/quickstart.yaml ...`` in its own process (``--jobs`` at a time;
the quickstart uses one thread each).
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
GAP = ["sparsity.method=gap_cyclic", "sparsity.gap_partitions=4", "sparsity.gap_rounds=2", "sparsity.gap_phase=0.09"]
# comparison -> [(setting, its overrides, [(row label, the row's overrides)])]
COMPARISONS = {
    "structures": [
        ("50% uniform", ["sparsity.sparsity=0.5", "sparsity.distribution=uniform"],
         [(s, [f"sparsity.structure={s}"]) for s in ("unstructured", "2:4", "fan_in")]),
        ("90% ERK", [], [(s, [f"sparsity.structure={s}"]) for s in ("unstructured", "fan_in")]),
    ],
    "methods": [
        (f"{s}% ERK 10 ep", [f"sparsity.sparsity=0.{s}", "train.epochs=10"],
         [("static", ["sparsity.method=static"]), ("rigl", []), ("gap_cyclic", GAP)])
        for s in (90, 98)
    ],
}


def run(args: list[str], run_dir: pathlib.Path) -> dict:
    cmd = [sys.executable, "-m", "rigl_ds.cli", "train", str(ROOT / "configs" / "quickstart.yaml"), *args,
           "logging.progress=false", "checkpoint.every_steps=null", f"logging.run_dir={run_dir}"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return json.loads((run_dir / "result.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", choices=sorted(COMPARISONS), default="structures")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    settings = COMPARISONS[args.compare]
    jobs = []
    for label, extra, rows_of in settings:
        for row, row_args in rows_of:
            for seed in args.seeds:
                jobs.append((label, row, seed, [*extra, *row_args, f"train.seed={seed}"]))
    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as d, cf.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(run, a, pathlib.Path(d) / f"r{i}"): (label, r, seed)
                   for i, (label, r, seed, a) in enumerate(jobs)}
        for f in cf.as_completed(futures):
            label, r, seed = futures[f]
            results.setdefault((label, r), []).append(f.result())
            print(f"done: {label} {r} seed {seed}: top-1 {f.result()['eval']['top1']:.4f}", flush=True)
    rows = []
    print(f"\n{'setting':<16} {args.compare[:-1]:<13} {'top-1 mean':>10} {'min':>7} {'max':>7} {'density':>9}  seeds")
    for label, _, rows_of in settings:
        for r, _ in rows_of:
            rs = results[(label, r)]
            top1 = [x["eval"]["top1"] for x in rs]
            row = {"setting": label, args.compare[:-1]: r, "top1": top1, "density": rs[0]["global_density"]}
            rows.append(row)
            print(f"{label:<16} {r:<13} {statistics.mean(top1):>10.4f} {min(top1):>7.4f} {max(top1):>7.4f} "
                  f"{row['density']:>9.6f}  {len(top1)}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
