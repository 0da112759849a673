"""Step time of RigL vs dense on the same engine: local, DDP and FSDP2 (torchrun), DeepSpeed ZeRO 0-3.

Runs the quickstart (digits, small CNN, 90% ERK, delta 20) through the real CLI and launchers,
RigL and dense alternately, and prints the mean train-step time of each and their ratio.

    python benchmarks/engines.py [--steps 300] [--repeats 1] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
CFG = str(ROOT / "configs" / "quickstart_ddp.yaml")
ENGINES = {
    "local": ("local", None),
    "ddp": ("torchrun.sh", None),
    "fsdp2": ("fsdp2.sh", None),
    **{f"deepspeed-z{s}": ("deepspeed.sh", str(ROOT / "ds_configs" / f"zero{s}_fp32.json")) for s in range(4)},
}


def run(engine: str, method: str, steps: int, workdir: pathlib.Path) -> float:
    """Mean seconds per train step of one run."""
    launcher, ds = ENGINES[engine]
    run_dir = workdir / f"{engine}-{method}"
    common = [f"sparsity.method={method}", f"train.max_steps={steps}", "logging.progress=false",
              f"logging.run_dir={run_dir}", "checkpoint.at_end=false", "train.eval_every_epochs=1000"]
    env = dict(os.environ, PATH=f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}", OMP_NUM_THREADS="1")
    if launcher == "local":
        cmd = [sys.executable, "-m", "rigl_ds.cli", "train", CFG, "engine.name=local", "data.batch_size=32", *common]
    else:
        cmd = ["bash", str(ROOT / "launch" / launcher), CFG, *([ds] if ds else []), *common]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{engine} {method} failed:\n{p.stderr[-3000:]}")
    result = json.loads((run_dir / "result.json").read_text())
    return result["train_step_seconds"] / result["steps"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--engines", nargs="*", default=list(ENGINES))
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for engine in args.engines:
            times: dict[str, list[float]] = {"rigl": [], "dense": []}
            for r in range(args.repeats):
                for method in ("dense", "rigl") if r % 2 == 0 else ("rigl", "dense"):
                    times[method].append(run(engine, method, args.steps, pathlib.Path(tmp) / str(r)))
            d, s = statistics.median(times["dense"]), statistics.median(times["rigl"])
            rows.append({"engine": engine, "dense_ms": d * 1e3, "rigl_ms": s * 1e3, "ratio": s / d})
            print(f"{engine:<14} dense {d * 1e3:8.2f} ms/step   rigl {s * 1e3:8.2f} ms/step   ratio {s / d:.3f}",
                  flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
