"""RigL vs dense on the same engine, same initial weights, same batches, steps interleaved
(dense, RigL, dense, RigL, ...) in one process so both see the same machine load.

Reports per model: median ordinary-step time of each and their ratio, mean mask-update step
time, whole-run time ratio, and the peak memory allocated during an ordinary step of each
(CUDA: max_memory_allocated; CPU: the torch profiler's allocation trace). ResNet-50 runs fewer
steps than a full update period: its whole-run ratio is extrapolated to one period of ``delta``
steps as ((delta - 1) * rigl_ordinary + rigl_update) / (delta * dense_ordinary), and the
measured value over the steps actually run is printed too.

    python benchmarks/overhead.py [--models cnn mlp resnet50] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F

from _common import peak_bytes
from rigl_ds import RigL
from rigl_ds.config import ModelSection
from rigl_ds.models import build_model

SETTINGS = {
    # model, input shape, classes, batch, delta, steps, sparsity
    "cnn": ("small_cnn", (1, 8, 8), 10, 32, 10, 400, 0.9),
    "mlp": ("mlp", (1, 8, 8), 10, 32, 10, 400, 0.9),
    "resnet50": ("resnet50", (3, 112, 112), 1000, 8, 100, 24, 0.9),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model, opt, sp, device):
    def step(x, y) -> bool:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        update = sp is not None and sp.is_update_step()
        if sp is None or sp.step():
            opt.step()
        return update
    return step


def bench(name: str, device: torch.device, steps: int | None, force_update_at: int | None) -> dict:
    model_name, shape, classes, batch, delta, default_steps, sparsity = SETTINGS[name]
    steps = steps or default_steps
    torch.manual_seed(0)
    dense = build_model(ModelSection(name=model_name), classes, shape).to(device)
    sparse = copy.deepcopy(dense)
    opt_d = torch.optim.SGD(dense.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    opt_s = torch.optim.SGD(sparse.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    # ResNet-50 runs fewer steps than delta: updates every `force_update_at` steps are timed and
    # the whole-run ratio is extrapolated to one period of `delta` steps.
    run_delta = force_update_at or delta
    sp = RigL(sparse, opt_s, total_steps=max(steps, 4 * run_delta), sparsity=sparsity, delta=run_delta, t_end=1.0)
    step_d, step_s = make_step(dense, opt_d, None, device), make_step(sparse, opt_s, sp, device)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(batch, *shape, generator=g), torch.randint(0, classes, (batch,), generator=g))
               for _ in range(min(steps, 50))]
    t_d, t_s, upd = [], [], []
    for t in range(steps):
        x, y = (v.to(device) for v in batches[t % len(batches)])
        for step, times in ((step_d, t_d), (step_s, t_s)) if t % 2 == 0 else ((step_s, t_s), (step_d, t_d)):
            sync(device)
            t0 = time.perf_counter()
            was_update = step(x, y)
            sync(device)
            dt = time.perf_counter() - t0
            if step is step_s and was_update:
                upd.append(dt)
            else:
                times.append(dt)
    warm = 2
    ord_d, ord_s = statistics.median(t_d[warm:]), statistics.median(t_s[warm:])
    upd_mean = statistics.mean(upd) if upd else float("nan")
    measured_run = (sum(t_s) + sum(upd)) / sum(t_d)          # every step of the run, warm-up included
    x, y = (v.to(device) for v in batches[0])
    sp_probe = sp.is_update_step
    mem_d = peak_bytes(lambda: step_d(x, y), device)
    sp.is_update_step = lambda t=None: False   # measure an ordinary step
    mem_s = peak_bytes(lambda: step_s(x, y), device)
    sp.is_update_step = sp_probe
    row = {
        "model": name, "device": str(device), "steps": steps, "delta": delta, "batch": batch,
        "dense_ordinary_ms": ord_d * 1e3, "rigl_ordinary_ms": ord_s * 1e3, "ordinary_ratio": ord_s / ord_d,
        "rigl_update_step_ms": upd_mean * 1e3, "updates_timed": len(upd),
        "run_ratio_measured": measured_run,
        "run_ratio_per_period": ((delta - 1) * ord_s + upd_mean) / (delta * ord_d) if upd else ord_s / ord_d,
        "dense_peak_mb": mem_d / 2**20, "rigl_peak_mb": mem_s / 2**20,
        "mask_mb": sum(m.numel() * m.element_size() for m in sp.masks.values()) / 2**20,
    }
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=list(SETTINGS))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    for name in args.models:
        row = bench(name, device, args.steps, 8 if name == "resnet50" else None)
        rows.append(row)
        print(f"{name:<9} ordinary step: dense {row['dense_ordinary_ms']:8.2f} ms, rigl {row['rigl_ordinary_ms']:8.2f} ms "
              f"(x{row['ordinary_ratio']:.3f}); mask-update step {row['rigl_update_step_ms']:8.2f} ms "
              f"({row['updates_timed']} timed); whole run x{row['run_ratio_measured']:.3f} measured, "
              f"x{row['run_ratio_per_period']:.3f} per delta={row['delta']} period; peak MB dense "
              f"{row['dense_peak_mb']:.1f} rigl {row['rigl_peak_mb']:.1f} (masks {row['mask_mb']:.1f})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
