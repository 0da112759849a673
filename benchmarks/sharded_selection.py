"""Bytes and time of one RigL mask update over ResNet-50's layers sharded across ranks (as FSDP2
shards them: contiguous row blocks), by the exact distributed selection of
``rigl_ds/engines/dist_select.py`` vs gathering every layer's weight and gradient whole.

Two gloo ranks on this machine; every all-gather is wrapped to count the bytes each rank receives.
The result is checked against the whole-tensor reference (``drop_and_grow``) for every layer.

    python benchmarks/sharded_selection.py [--sparsity 0.9] [--distribution erk] [--alpha 0.3] [--world 2]
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from _common import spawn_ranks


def worker(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch.distributed as dist

    from rigl_ds.config import ModelSection
    from rigl_ds.core import get_distribution, nnz_for, select_layers
    from rigl_ds.core.selection import drop_and_grow, random_mask
    from rigl_ds.engines import dist_select
    from rigl_ds.models import build_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    received = {"n": 0}
    real = dist.all_gather

    def counting_all_gather(out, t, group=None, async_op=False):
        received["n"] += sum(o.numel() * o.element_size() for o in out)
        return real(out, t, group=group, async_op=async_op)

    dist_select.dist.all_gather = counting_all_gather
    with torch.device("meta"):
        model = build_model(ModelSection(name="resnet50"), 1000, (3, 224, 224))
    layers = select_layers(model)
    dens = get_distribution(args.distribution)(layers, args.sparsity)
    g = torch.Generator().manual_seed(0)
    sel_bytes = full_bytes = 0
    t_sel = t_ref = 0.0
    exact = True
    for layer in layers:
        n = layer.numel
        nnz = nnz_for(n, dens[layer.name])
        k = int(args.alpha * nnz)
        if k == 0 or nnz == n:
            continue
        w, gr = torch.randn(n, generator=g), torch.randn(n, generator=g)
        m = random_mask(n, nnz, g)
        w[~m] = 0
        rows, row = layer.shape[0], n // layer.shape[0]
        per = -(-rows // world)                           # FSDP2's chunking of dim 0
        lo, hi = min(rank * per, rows) * row, min((rank + 1) * per, rows) * row
        t0 = time.perf_counter()
        new, _, _ = dist_select.drop_and_grow_sharded(w[lo:hi], m[lo:hi], gr[lo:hi].abs(), lo, k, numel=n)
        t_sel += time.perf_counter() - t0
        # the alternative: all-gather the weight and gradient shards whole (4-byte floats)
        full_bytes += 2 * n * 4
        t0 = time.perf_counter()
        want = drop_and_grow(m, w.abs(), gr.abs(), k)
        t_ref += time.perf_counter() - t0
        exact &= torch.equal(new, want[lo:hi])
    sel_bytes = received["n"]
    queue.put((rank, sel_bytes, full_bytes, t_sel, t_ref, exact))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--distribution", default="erk")
    ap.add_argument("--alpha", type=float, default=0.3)
    ap.add_argument("--world", type=int, default=2)
    args = ap.parse_args()
    rows = sorted(spawn_ranks(worker, args.world, args, results=args.world))
    for rank, sel, full, t_sel, t_ref, exact in rows:
        print(f"rank {rank}: distributed selection received {sel / 2**20:.2f} MiB vs {full / 2**20:.1f} MiB to "
              f"gather every layer's weight and gradient whole (x{sel / full:.4f}); selection {t_sel:.2f} s "
              f"(whole-tensor reference on one process {t_ref:.2f} s); equal to the reference: {exact}")


if __name__ == "__main__":
    main()
