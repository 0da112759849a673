"""FSDP2 checkpoint save and load time of the GPT-2-small-shaped model, before and after each rank
hashes only its own files.

Two gloo ranks on this machine train ``configs/lm/gpt2_124m_fsdp2.yaml``'s model (12 x 768, context
1024, byte vocabulary: about 86M parameters) for one AdamW step at 90% RigL, then save and load its
checkpoint (model, AdamW moments, masks: about 1 GB) in rotation, ``--reps`` times each:

* after (this code): every rank hashes the files it wrote (one read each), rank 0 writes the
  manifest from the gathered hashes; on load each file is verified by one rank (``writer % world``);
* before (the code it replaced, run here step by step): rank 0 hashed the whole folder for the
  manifest, verified it, verified it again when rotating; on load every rank verified every file.

Prints the median save and load seconds of each and their ratios.

    python benchmarks/checkpoint_io.py [--reps 3] [--dir /tmp/ckpt_io]
"""
from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import statistics
import time

import torch

from _common import end_rank, spawn_ranks


def worker(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    import torch.nn.functional as F

    from rigl_ds import RigL
    from rigl_ds import checkpoint as ckpt
    from rigl_ds.engines.fsdp2 import FSDP2Runtime
    from rigl_ds.models.gpt import GPT

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = GPT(vocab=256, context=1024, n_layer=12, n_head=12, d_model=768)
    rt = FSDP2Runtime(model, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-4), torch.device("cpu"),
                      units=["Block"], selection="sharded")
    sp = RigL(rt.module, rt.optimizer, total_steps=100, sparsity=0.9, engine=rt.sparse_engine())
    x = torch.randint(0, 256, (1, 33), generator=torch.Generator().manual_seed(rank))
    F.cross_entropy(rt.module(x[:, :-1]).reshape(-1, 256), x[:, 1:].reshape(-1)).backward()
    if sp.step():
        rt.optimizer.step()
    root = pathlib.Path(args.dir)
    numel = sum(p.numel() for p in model.parameters())

    def old_save(state, ckpt_dir, step):
        tag, tmp = ckpt_dir / f"step_{step:08d}", ckpt_dir / f".step_{step:08d}.tmp"
        dcp.save(rt._sharded(state), checkpoint_id=str(tmp))
        if rank == 0:
            ckpt.save_atomic(dict(state, model="dcp", sparsifier=dict(state["sparsifier"], masks=None, score=None)),
                             tmp / "rigl_ds.pt")
        dist.barrier()
        if rank == 0:
            ckpt.write_manifest(tmp)
            ckpt.verify_folder(tmp)
            tmp.rename(tag)
            ckpt.rotate_folders(ckpt_dir, 2, tag)
        dist.barrier()
        return tag

    def old_load(path):
        ckpt.verify_folder(path)
        mine = rt.verify
        rt.verify = lambda p: None
        try:
            rt.load(path)
        finally:
            rt.verify = mine

    times = {("after", "save"): [], ("after", "load"): [], ("before", "save"): [], ("before", "load"): []}
    for rep in range(args.reps):
        for variant in (("after", "before") if rep % 2 == 0 else ("before", "after")):
            d = root / f"{variant}{rep}"
            if rank == 0:
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir(parents=True)
            dist.barrier()
            state = {"step": 1, "sparsifier": sp.state_dict()}
            t0 = time.perf_counter()
            path = rt.save(state, d, 1, 2) if variant == "after" else old_save(state, d, 1)
            dist.barrier()
            t1 = time.perf_counter()
            rt.load(path) if variant == "after" else old_load(path)
            dist.barrier()
            t2 = time.perf_counter()
            times[variant, "save"].append(t1 - t0)
            times[variant, "load"].append(t2 - t1)
            size = sum(p.stat().st_size for p in path.iterdir())
            dist.barrier()
            if rank == 0:
                shutil.rmtree(d, ignore_errors=True)
    end_rank(rank, (numel, size, {k: statistics.median(v) for k, v in times.items()}) if rank == 0 else None, queue)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dir", default="/tmp/rigl_ds_ckpt_io")
    args = p.parse_args()
    (numel, size, med), = spawn_ranks(worker, 2, args, 1)
    print(f"FSDP2, 2 gloo ranks, GPT {numel / 1e6:.1f}M parameters, checkpoint {size / 1e9:.2f} GB, "
          f"median of {args.reps}, interleaved")
    for what in ("save", "load"):
        before, after = med["before", what], med["after", what]
        print(f"  {what}: before {before:6.2f} s   after {after:6.2f} s   after/before {after / before:.2f}")


if __name__ == "__main__":
    main()
