"""Gradient all-reduce traffic per step under DDP: dense vs packed (active entries only).

Two gloo ranks on this machine train a model with RigL through ``DDPEngine``; the packed
communication hook counts the bytes it all-reduces on ordinary steps and on the steps whose
dense gradient feeds a mask update. Also times the ordinary step with packed vs dense all-reduce.

    python benchmarks/ddp_traffic.py [--model small_cnn|resnet50] [--sparsity 0.9] [--steps 30]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from _common import end_rank, spawn_ranks


def worker(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from rigl_ds import RigL
    from rigl_ds.config import ModelSection
    from rigl_ds.engines.ddp import DDPEngine
    from rigl_ds.models import build_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    shape = (1, 8, 8) if args.model == "small_cnn" else (3, args.image_size, args.image_size)
    out = {}
    for packed in (False, True):
        torch.manual_seed(0)
        model = build_model(ModelSection(name=args.model), 10 if args.model == "small_cnn" else 1000, shape)
        ddp = DDP(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
        engine = DDPEngine(ddp, opt, packed_allreduce=True)
        sp = RigL(model, opt, total_steps=10 * args.steps, sparsity=args.sparsity, delta=args.delta, engine=engine)
        if not packed:   # the same hook, told that every step needs the dense gradient
            engine.dense_grad_wanted = lambda: True
        g = torch.Generator().manual_seed(rank)
        ordinary_bytes, dense_bytes, times = [], [], []
        for t in range(args.steps):
            x = torch.randn(args.batch, *shape, generator=g)
            y = torch.randint(0, 10, (args.batch,), generator=g)
            engine.comm.reset_counters()
            wanted = sp.wants_dense_grad()
            t0 = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            if sp.step():
                opt.step()
            dt = time.perf_counter() - t0
            if not wanted:
                ordinary_bytes.append(engine.comm.bytes_this_step)
                times.append(dt)
            dense_bytes.append(engine.comm.dense_bytes_this_step)
        out["packed" if packed else "dense"] = {
            "bytes_per_ordinary_step": statistics.median(ordinary_bytes),
            "dense_bytes_per_step": statistics.median(dense_bytes),
            "median_ordinary_step_s": statistics.median(times[1:]),
            "global_density": sp.measure().mask_density,
        }
    end_rank(rank, out, queue)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small_cnn", choices=["small_cnn", "resnet50"])
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--delta", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=32)
    args = ap.parse_args()
    res = spawn_ranks(worker, 2, args, results=1)[0]
    d, p = res["dense"], res["packed"]
    print(f"model {args.model}, sparsity {args.sparsity} (ERK), 2 gloo ranks, batch {args.batch}/rank")
    print(f"  dense all-reduce : {d['bytes_per_ordinary_step'] / 1e6:10.3f} MB per ordinary step, "
          f"median step {d['median_ordinary_step_s'] * 1e3:.1f} ms")
    print(f"  packed all-reduce: {p['bytes_per_ordinary_step'] / 1e6:10.3f} MB per ordinary step "
          f"({p['bytes_per_ordinary_step'] / p['dense_bytes_per_step']:.3f} of dense; masked-layer density "
          f"{p['global_density']:.3f}), median step {p['median_ordinary_step_s'] * 1e3:.1f} ms")
    print(f"  steps feeding a mask update all-reduce the dense {p['dense_bytes_per_step'] / 1e6:.3f} MB")


if __name__ == "__main__":
    main()
