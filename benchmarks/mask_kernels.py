"""CPU cost of zeroing a gradient outside a bool mask, one thread: the ways of writing it, against a
plain copy (the floor) and a float multiply. Why rigl_ds's engines mask through
``rigl_ds.engines.local.MaskMultiplier`` (uint8 widened chunk by chunk) or a cached float mask.
Then the DeepSpeed adapter's gradient hook over the built-in GPT's 16 masked gradients (4 x 256) vs
the bool multiply it replaced, and ``sqrt`` of zeros vs other numbers (AdamW's second moments at
masked positions are 0: ``transformer_step.py``'s profile), and a whole AdamW step, torch's default
CPU loop vs ``fused=True``, with and without those zeros.

    python benchmarks/mask_kernels.py [--repeats 200]
"""
from __future__ import annotations

import argparse
import time

import torch

from rigl_ds.engines.local import MaskMultiplier


def best_of(fn, repeats: int, rounds: int = 3) -> float:
    """Seconds per call: the minimum over ``rounds`` of ``repeats`` calls."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - t0) / repeats)
    return best


def gpt_hook(repeats: int) -> None:
    from types import SimpleNamespace

    from rigl_ds.core.layers import select_layers
    from rigl_ds.engines.deepspeed import DeepSpeedEngineAdapter
    from rigl_ds.models.gpt import GPT

    model = GPT(vocab=256, context=128, n_layer=4, n_head=4, d_model=256)
    opt = torch.optim.AdamW(model.parameters())
    fake = SimpleNamespace(module=model, basic_optimizer=opt, optimizer=opt, zero_optimization_stage=lambda: 0)
    adapter = DeepSpeedEngineAdapter(fake, opt)
    layers = select_layers(model)
    masks = {l.name: torch.rand(l.shape) < 0.1 for l in layers}
    adapter.bind(layers, masks, lambda: False)
    grads = {l.name: torch.randn(l.shape) for l in layers}
    for n, g in grads.items():
        assert torch.equal(adapter._masked(n, g), g * masks[n]), n
    ways = {"grad.clone() (floor)": lambda n, g: g.clone(), "grad * bool mask (before)": lambda n, g: g * masks[n],
            "the adapter's hook (now)": adapter._masked}
    print(f"DeepSpeed gradient hook over the GPT's {len(grads)} masked gradients (per step):")
    for name, fn in ways.items():
        dt = best_of(lambda: [fn(n, g) for n, g in grads.items()], max(1, repeats // 10))
        print(f"  {name:32s} {dt * 1e3:9.2f} ms")


def sqrt_of_zero(repeats: int) -> None:
    n = 3_257_856                         # the GPT's parameters
    print(f"sqrt of {n} float32 values:")
    for name, x in (("zeros", torch.zeros(n)), ("ones", torch.ones(n)), ("uniform in [0, 1)", torch.rand(n)),
                    ("87% zeros, others uniform", torch.rand(n) * (torch.rand(n) >= 0.87))):
        print(f"  {name:32s} {best_of(x.sqrt, max(1, repeats // 10)) * 1e3:9.2f} ms")


def adamw_steps(repeats: int) -> None:
    """One AdamW step over the GPT's parameter count, torch's default CPU loop vs ``fused=True``, with
    the second moments all nonzero vs 87% zero (RigL's masked positions: gradient and moments 0)."""
    n = 3_257_856
    print(f"AdamW step over {n} float32 parameters (lr 1e-3, weight decay 0.1):")
    for fused in (False, True):
        for zeros in (0.0, 0.87):
            p = torch.nn.Parameter(torch.randn(n))
            opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.1, fused=True if fused else None)
            p.grad = torch.randn(n)
            opt.step()                                # creates the moments
            k = int(n * zeros)
            with torch.no_grad():
                p.grad[:k] = 0
                p[:k] = 0
                opt.state[p]["exp_avg"][:k] = 0
                opt.state[p]["exp_avg_sq"][:k] = 0
            dt = best_of(opt.step, max(1, repeats // 20))       # zeros stay zero: grad, moments and weight 0
            assert int(torch.count_nonzero(opt.state[p]["exp_avg_sq"][:k])) == 0
            print(f"  {'fused=True' if fused else 'default':12s} {zeros:4.0%} zeros: {dt * 1e3:9.2f} ms")


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
        times = {name: best_of(fn, args.repeats) for name, fn in ways.items()}
        base = times["grad * float mask"]
        print(f"{n} elements, 10% of the mask true:")
        for name, dt in times.items():
            print(f"  {name:32s} {dt * 1e6:9.1f} us  ({dt / base:5.1f} x the float multiply)")
    gpt_hook(args.repeats)
    sqrt_of_zero(args.repeats)
    adamw_steps(args.repeats)


if __name__ == "__main__":
    main()
