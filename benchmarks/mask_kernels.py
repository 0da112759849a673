"""CPU cost of zeroing a gradient outside a bool mask, one thread: the ways of writing it, against a
plain copy (the floor) and a float multiply. Why rigl_ds's engines mask through
``rigl_ds.engines.local.MaskMultiplier`` (uint8 widened chunk by chunk) or a cached float mask.

    python benchmarks/mask_kernels.py [--repeats 200]
"""
from __future__ import annotations

import argparse
import time

import torch

from rigl_ds.engines.local import MaskMultiplier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--sizes", type=int, nargs="+", default=[196_608, 786_432], help="elements (GPT 256: Q/K/V; 1024: MLP)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    mul = MaskMultiplier()
    for n in args.sizes:
        g = torch.randn(n)
        m = torch.rand(n) < 0.1
        mf = m.float()
        zero = torch.zeros(())
        ways = {
            "grad.clone() (floor)": lambda: g.clone(),
            "grad * float mask": lambda: g * mf,
            "grad * bool mask": lambda: g * m,
            "torch.where(mask, grad, 0)": lambda: torch.where(m, g, zero),
            "grad.masked_fill(~mask, 0)": lambda: g.masked_fill(~m, 0),
            "MaskMultiplier (uint8 chunks)": lambda: mul(g, m, out=torch.empty_like(g)),
        }
        want = torch.where(m, g, zero)
        for name, fn in ways.items():
            if "floor" not in name:
                assert torch.equal(fn(), want), name
        times = {}
        for _ in range(3):                   # rounds of all ways, the minimum of each
            for name, fn in ways.items():
                t0 = time.perf_counter()
                for _ in range(args.repeats):
                    fn()
                dt = (time.perf_counter() - t0) / args.repeats
                times[name] = min(times.get(name, dt), dt)
        base = times["grad * float mask"]
        print(f"{n} elements, 10% of the mask true:")
        for name, dt in times.items():
            print(f"  {name:32s} {dt * 1e6:9.1f} us  ({dt / base:5.1f} x the float multiply)")


if __name__ == "__main__":
    main()
