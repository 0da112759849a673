"""Train-step time RigL vs dense under FSDP2 (fully_shard), and the bytes of each mask update.

Two gloo ranks on this machine, each holding half of every weight. Three copies of the model
with the same initial weights and batches, stepped in rotation (A/B/C, then B/C/A, ...): dense,
RigL with the exact sharded top-k (``engine.fsdp2_selection: sharded``) and RigL with the
``full_tensor()`` reference (``gather``). Ordinary steps: median time; mask-update steps: mean
time and the bytes their all-gathers delivered to each rank (own part included).

    python benchmarks/fsdp2_step.py [--model resnet50|small_cnn] [--image-size 112] [--batch 4] [--steps 24]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from _common import end_rank, spawn_ranks

VARIANTS = ("dense", "sharded", "gather")


def worker(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from rigl_ds import RigL
    from rigl_ds.config import ModelSection
    from rigl_ds.engines.fsdp2 import FSDP2Engine
    from rigl_ds.models import build_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    classes = 10 if args.model == "small_cnn" else 1000
    shape = (1, 8, 8) if args.model == "small_cnn" else (3, args.image_size, args.image_size)
    received = {"on": False, "n": 0}
    real = dist.all_gather

    def counting_all_gather(out, t, group=None, async_op=False):
        if received["on"]:
            received["n"] += sum(o.numel() * o.element_size() for o in out)
        return real(out, t, group=group, async_op=async_op)

    dist.all_gather = counting_all_gather          # the sharded selection's all-gathers

    def counted(engine, select, whole):
        """Count the bytes the selection's all-gathers deliver to this rank (own part included). The
        reference gathers through DTensor.full_tensor(), which dist.all_gather does not see: its bytes
        are the padded shards of mask (1 B), weight (4 B) and score (4 B) of every selected layer."""
        def run(masks, k, grow_score):
            received["on"] = True
            try:
                if whole:
                    for name in k:
                        d0 = engine._param(name).shape[0]
                        received["n"] += -(-d0 // world) * world * (engine._layout(name)[3] // d0) * 9
                return select(masks, k, grow_score)
            finally:
                received["on"] = False
        return run
    runs = {}
    for v in VARIANTS:
        torch.manual_seed(0)
        model = build_model(ModelSection(name=args.model), classes, shape)
        for m in model.modules():
            if type(m).__name__ in ("BasicBlock", "Bottleneck"):
                fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        engine = None if v == "dense" else FSDP2Engine(model, opt, selection=v)
        sp = None if v == "dense" else RigL(model, opt, total_steps=10 * args.steps, sparsity=args.sparsity,
                                             delta=args.delta, engine=engine)
        if engine is not None:
            engine.select = counted(engine, engine.select, v == "gather")
        runs[v] = {"model": model, "opt": opt, "sp": sp, "ordinary": [], "update": [], "bytes": []}
    g = torch.Generator().manual_seed(rank)
    for t in range(args.steps):
        x = torch.randn(args.batch, *shape, generator=g)
        y = torch.randint(0, classes, (args.batch,), generator=g)
        order = VARIANTS[t % 3:] + VARIANTS[:t % 3]
        for v in order:
            r = runs[v]
            sp = r["sp"]
            update = sp is not None and sp.is_update_step()
            received["n"] = 0
            dist.barrier()
            t0 = time.perf_counter()
            r["opt"].zero_grad()
            F.cross_entropy(r["model"](x), y).backward()
            if sp is None or sp.step():
                r["opt"].step()
            dt = time.perf_counter() - t0
            if update:
                r["update"].append(dt)
                r["bytes"].append(received["n"])
            elif t > 0:
                r["ordinary"].append(dt)
    out = {v: {"ordinary_s": statistics.median(r["ordinary"]),
               "update_s": statistics.mean(r["update"]) if r["update"] else None,
               "update_bytes": r["bytes"],
               "density": r["sp"].global_density if r["sp"] else 1.0} for v, r in runs.items()}
    masks_equal = all(torch.equal(runs["sharded"]["sp"].masks[n], runs["gather"]["sp"].masks[n])
                      for n in runs["sharded"]["sp"].masks)
    flag = torch.tensor(int(masks_equal))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    out["masks_equal"] = bool(flag)
    end_rank(rank, out, queue)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50", choices=["small_cnn", "resnet50"])
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--delta", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4, help="per rank")
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--period", type=int, default=100, help="delta T for the whole-run extrapolation")
    args = ap.parse_args()
    res = spawn_ranks(worker, 2, args, results=1)[0]
    d = res["dense"]["ordinary_s"]
    print(f"model {args.model}, sparsity {args.sparsity} (ERK), FSDP2 on 2 gloo ranks, batch {args.batch}/rank, "
          f"{args.steps} steps, update every {args.delta}")
    print(f"  dense            : ordinary step {d * 1e3:8.1f} ms")
    for v in ("sharded", "gather"):
        r = res[v]
        upd = r["update_s"]
        whole = ((args.period - 1) * r["ordinary_s"] + upd) / (args.period * d)
        mib = [b / 2**20 for b in r["update_bytes"]]
        print(f"  RigL ({v:7s})  : ordinary step {r['ordinary_s'] * 1e3:8.1f} ms = {r['ordinary_s'] / d:.3f} x dense; "
              f"mask-update step {upd * 1e3:.1f} ms; whole run at delta T={args.period}: {whole:.3f} x dense; "
              f"all-gathered per update per rank: {', '.join(f'{m:.2f}' for m in mib)} MiB")
    print(f"  sharded top-k masks == full_tensor() reference masks: {res['masks_equal']}")


if __name__ == "__main__":
    main()
