"""Inference speed of exported sparse models against the dense model, on this machine's CPU.

For each sparsity (constant fan-in masks, as ``sparsity.structure: fan_in`` trains them):

* one linear layer 4096 -> 4096 (transformer-sized);
* a whole MLP 1024 -> 4096 -> 4096 -> 1024 (every layer at the sparsity, exported whole);
* torchvision ResNet-50 at ERK, where only ``fc`` is linear: the convolutions stay dense (masked),
  so no format speeds it up; the rows say so rather than hide it.

Latency is batch 1 (median milliseconds per call), throughput batch 256 (examples per second;
ResNet-50: batch 32 at 224x224, one call is already seconds on 2 cores). Every exported model is
checked against the masked dense one (1e-4) before it is timed. Ratios are dense time / format
time in the same run: the machine's load cancels.

    python benchmarks/inference.py [--sparsity 0.8 0.9] [--repeats 20] [--json out.json] [--skip-resnet]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torchvision
from torch import nn

from rigl_ds import Static
from rigl_ds.export import convert


def fan_in_masks(model: nn.Module, sparsity: float, distribution: str = "uniform") -> dict[str, torch.Tensor]:
    """Constant fan-in masks at ``sparsity`` (every linear and conv sparse), zeroing the weights."""
    sp = Static(model, None, total_steps=1, sparsity=sparsity, distribution=distribution, structure="fan_in",
                overrides={})
    return {n: m.clone() for n, m in sp.masks.items()}


def per_call(fn, x, repeats: int) -> float:
    with torch.inference_mode():
        for _ in range(3):
            fn(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def compare(label: str, dense: nn.Module, masks: dict, inputs: dict[str, torch.Tensor], repeats: int,
            formats=("condensed", "csr")) -> list[dict]:
    rows = []
    dense = dense.eval()
    models = {"dense": dense}
    for fmt in formats:
        models[fmt], _ = convert(copy.deepcopy(dense), masks, fmt)
    check = inputs["latency"]
    with torch.inference_mode():
        want = dense(check)
        for fmt, m in models.items():
            torch.testing.assert_close(m(check), want, rtol=1e-4, atol=1e-4)
    base = {k: per_call(dense, x, repeats if k == "latency" else max(3, repeats // 4)) for k, x in inputs.items()}
    for fmt, m in models.items():
        t = base if fmt == "dense" else {k: per_call(m, x, repeats if k == "latency" else max(3, repeats // 4))
                                         for k, x in inputs.items()}
        row = {"model": label, "format": fmt, "batch1_ms": t["latency"] * 1e3,
               "throughput_per_s": inputs["throughput"].shape[0] / t["throughput"],
               "batch1_speedup": base["latency"] / t["latency"], "throughput_speedup": base["throughput"] / t["throughput"]}
        rows.append(row)
        print(f"{label:<34} {fmt:<10} batch 1: {row['batch1_ms']:8.3f} ms ({row['batch1_speedup']:5.2f}x)   "
              f"batch {inputs['throughput'].shape[0]}: {row['throughput_per_s']:10.0f}/s "
              f"({row['throughput_speedup']:5.2f}x)", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsity", type=float, nargs="*", default=[0.8, 0.9])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip-resnet", action="store_true")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; speed-ups are dense time / format time")
    g = torch.Generator().manual_seed(0)
    rows = []
    for s in args.sparsity:
        torch.manual_seed(0)
        layer = nn.Sequential(nn.Linear(4096, 4096))
        rows += compare(f"linear 4096x4096 {s:.0%} fan_in", layer, fan_in_masks(layer, s),
                        {"latency": torch.randn(1, 4096, generator=g), "throughput": torch.randn(256, 4096, generator=g)},
                        args.repeats)
        torch.manual_seed(0)
        mlp = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 1024))
        rows += compare(f"MLP 1024-4096-4096-1024 {s:.0%}", mlp, fan_in_masks(mlp, s),
                        {"latency": torch.randn(1, 1024, generator=g), "throughput": torch.randn(256, 1024, generator=g)},
                        args.repeats)
        if not args.skip_resnet:
            torch.manual_seed(0)
            rn50 = torchvision.models.resnet50()
            rows += compare(f"ResNet-50 ERK {s:.0%} fan_in", rn50, fan_in_masks(rn50, s, "erk"),
                            {"latency": torch.randn(1, 3, 224, 224, generator=g),
                             "throughput": torch.randn(32, 3, 224, 224, generator=g)},
                            max(3, args.repeats // 4), formats=("condensed",))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
