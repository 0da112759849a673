"""Cost of one RigL mask update on ResNet-50 with a structure, against the unstructured update at the
same sparsity and distribution, in the same run (a ratio: the machine's load cancels).

Pairs: fan_in vs unstructured at 90% ERK, and 2:4 vs unstructured at 50% uniform (2:4 is density
0.5 in every masked layer; ``uniform`` keeps the first conv, whose rows of 147 do not split into 4s,
dense). Each update is checked to leave every group at its exact count; exactness against the
sort-based reference is the tests' job (tests/unit/test_structures.py: a Python loop over 6M 2:4
groups would dominate this script).

    python benchmarks/structured_update.py [--repeats 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torchvision

from _common import peak_bytes
from rigl_ds import RigL

PAIRS = [("fan_in", 0.9, "erk"), ("2:4", 0.5, "uniform")]


def setup(structure: str, sparsity: float, distribution: str):
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = RigL(model, opt, total_steps=1000, sparsity=sparsity, distribution=distribution, delta=100,
              structure=structure)
    params = dict(model.named_parameters())
    for p in model.parameters():                      # a dense gradient and a momentum state
        p.grad = torch.randn_like(p)
    opt.step()
    for name, m in sp.masks.items():
        params[name].data.mul_(m)
        opt.state[params[name]]["momentum_buffer"].mul_(m)
    snap = ({n: m.clone() for n, m in sp.masks.items()}, {n: params[n].detach().clone() for n in sp.masks},
            {n: opt.state[params[n]]["momentum_buffer"].clone() for n in sp.masks})

    def reset():
        masks, weights, moms = snap
        for n in sp.masks:
            sp.masks[n].copy_(masks[n])
            sp.engine.apply_mask(n, sp.masks[n])
            params[n].data.copy_(weights[n])
            opt.state[params[n]]["momentum_buffer"].copy_(moms[n])

    grads = {n: params[n].grad for n in sp.masks}
    return sp, reset, lambda: sp._update(0, 0, grads)


def measure(structure: str, sparsity: float, distribution: str, repeats: int) -> dict:
    sp, reset, update = setup(structure, sparsity, distribution)
    times = []
    for _ in range(repeats):
        reset()
        t = time.perf_counter()
        update()
        times.append(time.perf_counter() - t)
    for n, m in sp.masks.items():                     # the last update held every group's count
        g = sp.group[n]
        assert bool((m.view(-1, g).sum(1) == sp.nnz[n] * g // m.numel()).all()), n
    reset()
    peak = peak_bytes(update)
    changed = sp.last_update["churn"]
    return {"structure": structure, "sparsity": sparsity, "distribution": distribution,
            "update_s": statistics.median(times), "peak_mb": peak / 2**20, "churn": changed,
            "density": sp.planned_density}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    for structure, s, dist in PAIRS:
        base = measure("unstructured", s, dist, args.repeats)
        got = measure(structure, s, dist, args.repeats)
        rows += [base, got]
        print(f"ResNet-50 {dist} {s:.0%}: unstructured {base['update_s']:.3f} s ({base['peak_mb']:.0f} MB, "
              f"density {base['density']:.4f}), {structure} {got['update_s']:.3f} s ({got['peak_mb']:.0f} MB, "
              f"density {got['density']:.4f}): {got['update_s'] / base['update_s']:.2f}x the unstructured update",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
