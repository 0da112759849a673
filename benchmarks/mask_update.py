"""Cost of one full RigL mask update on ResNet-50 (25.5M masked weights): drop, grow, weight and
optimizer-state writes. Compares three implementations on the same inputs:

* ``topk``: a straightforward per-layer ``torch.topk`` drop-and-grow (as ports usually write it);
* ``reference``: ``rigl_ds.core.drop_and_grow`` (stable sorts; the semantics the tests pin down);
* ``rigl_ds``: the sparsifier's own update (``update_mask``: linear-time selection).

The ``rigl_ds`` masks are checked to be exactly equal to the reference's. Prints the median time
of several repeats and the peak extra memory allocated during one update (torch profiler).

    python benchmarks/mask_update.py [--sparsity 0.9 0.8] [--repeats 5] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torchvision

from _common import peak_bytes
from rigl_ds import RigL
from rigl_ds.core import drop_and_grow


def setup(sparsity: float):
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = RigL(model, opt, total_steps=1000, sparsity=sparsity, distribution="erk", delta=100)
    params = dict(model.named_parameters())
    for p in model.parameters():                      # a dense gradient and a momentum state
        p.grad = torch.randn_like(p)
    opt.step()
    for name, m in sp.masks.items():                  # keep the invariants after that step
        params[name].data.mul_(m)
        opt.state[params[name]]["momentum_buffer"].mul_(m)
    return model, opt, sp, params


def snapshot(sp, params, opt):
    return ({n: m.clone() for n, m in sp.masks.items()}, {n: params[n].detach().clone() for n in sp.masks},
            {n: opt.state[params[n]]["momentum_buffer"].clone() for n in sp.masks})


def restore(sp, params, opt, snap):
    masks, weights, moms = snap
    for n in sp.masks:
        sp.masks[n].copy_(masks[n])
        sp.engine.apply_mask(n, sp.masks[n])          # also refreshes the engine's copy of the mask
        params[n].data.copy_(weights[n])
        opt.state[params[n]]["momentum_buffer"].copy_(moms[n])


def apply(sp, params, opt, name, old, new):
    keep = old & new
    params[name].data.mul_(new)
    opt.state[params[name]]["momentum_buffer"].mul_(keep)
    old.copy_(new)


def update_topk(sp, params, opt, fraction):
    for layer in sp.layers:
        name, mask = layer.name, sp.masks[layer.name]
        k = math.floor(fraction * sp.nnz[name])
        if k == 0 or sp.nnz[name] == layer.numel:
            continue
        w, g = params[name].detach().abs().flatten(), params[name].grad.abs().flatten()
        flat = mask.flatten()
        drop_score = torch.where(flat, w, torch.full_like(w, float("inf")))
        drop_idx = torch.topk(drop_score, k, largest=False).indices
        new = flat.clone()
        new[drop_idx] = False
        grow_score = torch.where(new, torch.full_like(g, -1.0), g)
        new[torch.topk(grow_score, k).indices] = True
        apply(sp, params, opt, name, mask, new.view(mask.shape))


def update_reference(sp, params, opt, fraction):
    for layer in sp.layers:
        name, mask = layer.name, sp.masks[layer.name]
        k = math.floor(fraction * sp.nnz[name])
        if k == 0 or sp.nnz[name] == layer.numel:
            continue
        new = drop_and_grow(mask, params[name].detach().abs(), params[name].grad.abs(), k)
        apply(sp, params, opt, name, mask, new)


def update_rigl_ds(sp, params, opt, fraction):
    grads = {n: params[n].grad for n in sp.masks}
    sp._update(0, 0, grads)


def timed(fn, repeats, reset):
    times = []
    for _ in range(repeats):
        reset()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def peak_extra_bytes(fn, reset) -> int:
    reset()
    return peak_bytes(fn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsity", type=float, nargs="*", default=[0.9, 0.8])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    for s in args.sparsity:
        model, opt, sp, params = setup(s)
        snap = snapshot(sp, params, opt)
        fraction = sp.schedule.drop_fraction(0)           # alpha = 0.3 at the first update
        reset = lambda: restore(sp, params, opt, snap)    # noqa: E731
        # exactness: rigl_ds vs the reference, from the same state
        reset()
        update_reference(sp, params, opt, fraction)
        ref = {n: m.clone() for n, m in sp.masks.items()}
        reset()
        update_rigl_ds(sp, params, opt, fraction)
        equal = all(torch.equal(ref[n], sp.masks[n]) for n in ref)
        row = {"sparsity": s, "masked_params": sum(l.numel for l in sp.layers), "equal_to_reference": equal}
        for name, fn in (("topk", update_topk), ("reference", update_reference), ("rigl_ds", update_rigl_ds)):
            run = lambda fn=fn: fn(sp, params, opt, fraction)  # noqa: E731
            row[f"{name}_s"] = timed(run, args.repeats, reset)
            row[f"{name}_peak_mb"] = peak_extra_bytes(run, reset) / 2**20
        rows.append(row)
        print(f"ResNet-50 ERK {s:.0%} ({row['masked_params'] / 1e6:.1f}M masked): "
              f"topk {row['topk_s']:.3f} s ({row['topk_peak_mb']:.0f} MB), "
              f"reference {row['reference_s']:.3f} s ({row['reference_peak_mb']:.0f} MB), "
              f"rigl_ds {row['rigl_ds_s']:.3f} s ({row['rigl_ds_peak_mb']:.0f} MB); "
              f"equal to reference: {equal}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
