"""2:4 on a GPU: inference of ``rigl-ds export --format semi_structured`` against the dense model,
and one RigL 2:4 training step against a dense one (the issue's GPU measurements).

* inference: a transformer-sized MLP (d -> 4d -> d, fp16, both layers 2:4 by RigL's masks) exported
  ``semi_structured`` (torch's cuSPARSELt / CUTLASS kernels) vs the same masked model dense, at
  batch 1 and batch ``--batch`` tokens; outputs checked close (fp16) first;
* training: a step (forward, backward, ``rigl.step()``, optimizer step) of that MLP with RigL 2:4
  masks vs dense, ordinary steps and a mask-update step; training keeps dense kernels (masks over
  dense tensors), so this is the masking overhead, not a speed-up.

Ratios compare times within one run (CUDA events, median of ``--repeats``). ``--cpu`` runs the
script at toy sizes on a CPU to check it end to end: the semi-structured part is reported as not
run there (torch's semi-structured tensors need CUDA), and nothing it prints is a GPU number.

    python benchmarks/semi_structured.py [--dim 4096] [--batch 4096] [--repeats 50] [--json out.json] [--cpu]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from torch import nn

from rigl_ds import RigL
from rigl_ds.export import convert


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` (CUDA events on a GPU, perf_counter on a CPU), after 3 warm-ups."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def mlp(dim: int, device, dtype) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim)).to(device, dtype)


def inference(dim: int, batch: int, repeats: int, device, dtype) -> dict:
    torch.manual_seed(0)
    model = mlp(dim, device, dtype).eval()
    sp = RigL(model, None, total_steps=10, sparsity=0.5, distribution="uniform", structure="2:4")
    out: dict = {"dim": dim}
    if device.type != "cuda":
        out["semi_structured"] = "not run: torch's semi-structured sparse tensors need CUDA"
        return out
    sparse, replaced = convert(copy.deepcopy(model), sp.masks, "semi_structured")
    out["replaced"] = sorted(replaced)
    with torch.inference_mode():
        for rows in (1, batch):
            x = torch.randn(rows, dim, device=device, dtype=dtype)
            torch.testing.assert_close(sparse(x), model(x), rtol=2e-2, atol=2e-2)
            dense_s = timed(lambda: model(x), repeats, device)
            sparse_s = timed(lambda: sparse(x), repeats, device)
            out[f"batch_{rows}"] = {"dense_ms": dense_s * 1e3, "semi_structured_ms": sparse_s * 1e3,
                                    "speedup": dense_s / sparse_s}
    return out


def training(dim: int, batch: int, repeats: int, device, dtype) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, dim, device=device, dtype=dtype)
    target = torch.randn(batch, dim, device=device, dtype=dtype)

    def setup(sparse: bool, delta: int = 10 ** 5):
        model = mlp(dim, device, dtype)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        rigl = RigL(model, opt, total_steps=10 ** 6, sparsity=0.5, distribution="uniform", structure="2:4",
                    delta=delta, t_end=10 ** 6) if sparse else None

        def step():
            opt.zero_grad(set_to_none=True)
            nn.functional.mse_loss(model(x), target).backward()
            if rigl is None or rigl.step():
                opt.step()
        return model, rigl, step

    _, _, dense_step = setup(False)
    model, rigl, sparse_step = setup(True)
    out = {"dense_ms": timed(dense_step, repeats, device) * 1e3}
    out["rigl_2_4_ms"] = timed(sparse_step, repeats, device) * 1e3
    out["ordinary_step_ratio"] = out["rigl_2_4_ms"] / out["dense_ms"]
    _, every, update_step = setup(True, delta=1)               # every step (after the first) updates the masks
    out["update_step_ms"] = timed(update_step, max(3, repeats // 10), device) * 1e3
    out["every_step_updated"] = every.last_update is not None and every.last_update["step"] == every._step - 1
    w = model[0].weight.detach()
    out["holds_2_4"] = bool((rigl.masks["0.weight"].reshape(-1, 4).sum(1) == 2).all()) and \
        int(torch.count_nonzero(w[~rigl.masks["0.weight"]])) == 0 and \
        bool((every.masks["0.weight"].reshape(-1, 4).sum(1) == 2).all())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4096, help="tokens per call (rows)")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--json", default=None)
    ap.add_argument("--cpu", action="store_true", help="toy sizes on the CPU: checks the script, measures nothing")
    args = ap.parse_args()
    if args.cpu:
        device, dtype, args.dim, args.batch, args.repeats = torch.device("cpu"), torch.float32, 64, 32, 3
    else:
        if not torch.cuda.is_available():
            raise SystemExit("benchmarks/semi_structured.py needs a CUDA GPU (or --cpu to check the script)")
        device, dtype = torch.device("cuda"), torch.float16
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)",
              "torch": torch.__version__,
              "inference": inference(args.dim, args.batch, args.repeats, device, dtype),
              "training": training(args.dim, args.batch, args.repeats, device, dtype)}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
