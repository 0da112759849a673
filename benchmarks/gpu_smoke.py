"""GPU smoke test of the ImageNet kit on one CUDA GPU (run through ``launch/gpu_smoke.sh``).

1. DALI GPU pipeline (nvJPEG ``mixed`` decoding, random-resized-crop, mirror, normalise,
   channels-last) over a generated JPEG folder: img/s of the training pipeline and a full
   validation pass (each image once).
2. ResNet-50 v1.5, AMP (bf16, or fp16 with GradScaler) and channels-last, on synthetic
   224x224 batches: dense and RigL (90% ERK) trained in the same process, steps interleaved,
   same batches; img/s of each, their ratio, and the mask-update step time.
3. The CLI end to end: ``rigl-ds train`` on an ImageNet YAML of the kit with ``data.backend=dali-gpu``
   on the generated folder, for a few mask updates.

    python benchmarks/gpu_smoke.py --folder /tmp/fake_imagenet [--steps 300] [--dtype bf16]

``--cpu`` runs the same code at toy sizes with ``dali-cpu`` and fp32 (a check that the script works,
not a measurement).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dali_throughput(folder: str, backend: str, size: int, batch: int, device: torch.device) -> dict:
    from rigl_ds.config import DataSection
    from rigl_ds.data import build_data

    cfg = DataSection(name="imagefolder", backend=backend, path=folder, image_size=size, batch_size=batch,
                      eval_batch_size=batch, num_workers=min(8, os.cpu_count() or 1))
    data = build_data(cfg, seed=0, device=device)
    for _ in data.train_batches(0):      # warm-up epoch (nvJPEG/pipeline start)
        pass
    sync(device)
    t0, n = time.perf_counter(), 0
    for epoch in (1, 2):
        for x, _ in data.train_batches(epoch):
            n += x.shape[0]
    sync(device)
    train_ips = n / (time.perf_counter() - t0)
    t0, seen = time.perf_counter(), 0
    for x, _ in data.val_batches():
        seen += x.shape[0]
    sync(device)
    return {"train_img_s": train_ips, "val_img_s": seen / (time.perf_counter() - t0), "val_images": seen,
            "val_expected": data.info.val_size, "layout_channels_last": bool(x.is_contiguous(
                memory_format=torch.channels_last)), "device": str(x.device)}


def train_compare(steps: int, batch: int, size: int, dtype: str, delta: int, device: torch.device) -> dict:
    import copy

    from rigl_ds import RigL
    from rigl_ds.config import ModelSection
    from rigl_ds.models import build_model

    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    dense = build_model(ModelSection(name="resnet50", init="kaiming_fan_in"), 1000, (3, size, size)).to(device)
    dense = dense.to(memory_format=torch.channels_last)
    sparse = copy.deepcopy(dense)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    runs = {}
    for name, model in (("dense", dense), ("rigl", sparse)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        sp = RigL(model, opt, total_steps=steps, sparsity=0.9, distribution="erk", delta=delta, t_end=1.0) \
            if name == "rigl" else None
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")
        runs[name] = (model, opt, sp, scaler, [], [])
    g = torch.Generator(device=device).manual_seed(1)
    xs = [torch.randn(batch, 3, size, size, device=device, generator=g).contiguous(memory_format=torch.channels_last)
          for _ in range(4)]
    ys = [torch.randint(0, 1000, (batch,), device=device, generator=g) for _ in range(4)]
    for t in range(steps):
        order = ("dense", "rigl") if t % 2 == 0 else ("rigl", "dense")
        for name in order:
            model, opt, sp, scaler, times, upd = runs[name]
            sync(device)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = F.cross_entropy(model(xs[t % 4]), ys[t % 4])
            scaler.scale(loss).backward()
            update = sp is not None and sp.is_update_step()
            if sp is not None:
                scaler.unscale_(opt)
            if sp is None or sp.step():
                scaler.step(opt)
            scaler.update()
            sync(device)
            (upd if update else times).append(time.perf_counter() - t0)
    warm = min(10, steps // 4)
    med = {k: statistics.median(v[4][warm:]) for k, v in runs.items()}
    upd = runs["rigl"][5]
    sp = runs["rigl"][2]
    params = dict(runs["rigl"][0].named_parameters())
    zeros_ok = all(int(params[n].detach()[~m].count_nonzero()) == 0 for n, m in sp.masks.items())
    return {"steps": steps, "batch": batch, "image_size": size, "dtype": dtype, "delta": delta,
            "dense_img_s": batch / med["dense"], "rigl_img_s": batch / med["rigl"],
            "rigl_over_dense_step_time": med["rigl"] / med["dense"],
            "mask_update_step_ms": statistics.mean(upd) * 1e3 if upd else float("nan"),
            "ordinary_step_ms": med["rigl"] * 1e3, "updates": len(upd),
            "global_density": sp.measure().mask_density, "zeros_under_mask": zeros_ok}


def cli_run(folder: str, backend: str, run_dir: str, steps: int, batch: int, size: int, dtype: str) -> dict:
    cmd = [sys.executable, "-m", "rigl_ds.cli", "train", str(ROOT / "configs/imagenet/resnet50_erk_s90_e100.yaml"),
           f"data.path={folder}", f"data.backend={backend}", f"data.batch_size={batch}", f"data.eval_batch_size={batch}",
           f"data.image_size={size}", "train.global_batch=null", f"train.max_steps={steps}", "sparsity.delta=10",
           f"precision.dtype={dtype}", "logging.progress=false", f"logging.run_dir={run_dir}",
           "checkpoint.every_steps=null", "checkpoint.at_end=false", "train.eval_every_epochs=1000"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"rigl-ds train failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    res = json.loads((pathlib.Path(run_dir) / "result.json").read_text())
    return {"wall_s": time.perf_counter() - t0, "steps": res["steps"], "eval_count": res["eval"]["count"],
            "global_density": res["global_density"], "train_step_seconds": res["train_step_seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", required=True, help="ImageNet-layout JPEG folder (python -m rigl_ds.data.testing)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--delta", type=int, default=50)
    ap.add_argument("--run-dir", default="runs/gpu_smoke")
    ap.add_argument("--json", default=None)
    ap.add_argument("--cpu", action="store_true", help="toy sizes, dali-cpu, fp32: check the script, no GPU")
    a = ap.parse_args()
    if a.cpu:
        device, backend, size, batch, steps, dtype, delta = torch.device("cpu"), "dali-cpu", 32, 4, 6, "fp32", 2
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_smoke: no CUDA GPU visible (use --cpu for a dry run of the script)")
        device, backend, size, batch, steps, dtype, delta = (torch.device("cuda", 0), "dali-gpu", 224, a.batch,
                                                            a.steps, a.dtype, a.delta)
        print(f"GPU {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    out = {"device": str(device)}
    t0 = time.perf_counter()
    out["dali"] = d = dali_throughput(a.folder, backend, size, batch if not a.cpu else 4, device)
    print(f"[1] DALI {backend}: train {d['train_img_s']:.0f} img/s, validation {d['val_img_s']:.0f} img/s "
          f"({d['val_images']}/{d['val_expected']} images once), channels-last {d['layout_channels_last']}, "
          f"on {d['device']}", flush=True)
    out["train"] = r = train_compare(steps, batch, size, dtype, delta, device)
    print(f"[2] ResNet-50 {dtype} channels-last, batch {batch}, {steps} steps each: dense {r['dense_img_s']:.0f} img/s, "
          f"RigL {r['rigl_img_s']:.0f} img/s (step time x{r['rigl_over_dense_step_time']:.3f}); mask-update step "
          f"{r['mask_update_step_ms']:.1f} ms vs ordinary {r['ordinary_step_ms']:.1f} ms ({r['updates']} updates, "
          f"delta {delta}); density {r['global_density']:.4f}, zeros under the mask {r['zeros_under_mask']}", flush=True)
    out["cli"] = c = cli_run(a.folder, backend, a.run_dir, 30 if not a.cpu else 3, batch if not a.cpu else 4, size,
                             dtype)
    print(f"[3] rigl-ds train (ImageNet YAML, {backend}): {c['steps']} steps in {c['wall_s']:.1f} s wall, "
          f"eval on {c['eval_count']} images, density {c['global_density']:.4f}", flush=True)
    out["total_s"] = time.perf_counter() - t0
    print(f"total {out['total_s']:.0f} s")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
