"""torch.distributed helpers shared by the multi-rank backends, and their common runtime base."""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from . import EngineError
from .local import LocalRuntime


class MaskDivergenceError(RuntimeError):
    """Masks differ between ranks; the message names the layer(s)."""


def mask_checksums(masks: Sequence[Tensor]) -> Tensor:
    """Per mask: (active count, sum of active flat indices, sum of their squares), int64 (wrapping)."""
    rows = []
    for m in masks:
        idx = m.reshape(-1).nonzero().reshape(-1)
        rows.append(torch.stack([idx.new_tensor(idx.numel()), idx.sum(), (idx * idx).sum()]))
    if not rows:
        return torch.zeros((0, 3), dtype=torch.int64)
    return torch.stack(rows)


def check_masks_equal(masks: Mapping[str, Tensor], group=None) -> None:
    """All-reduce MIN and MAX of the checksums; raise naming every layer where ranks differ."""
    if not masks:
        return
    names = list(masks)
    local = mask_checksums([masks[n] for n in names])
    hi, lo = local.clone(), local.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    bad = [names[i] for i in range(len(names)) if not torch.equal(hi[i], lo[i])]
    if bad:
        raise MaskDivergenceError(
            f"rank {dist.get_rank()}: masks differ between ranks in layer(s) {bad} "
            f"(checksum here {local[names.index(bad[0])].tolist()}); the run is stopped before the ranks diverge further")


def broadcast_masks(masks: Mapping[str, Tensor], src: int = 0, group=None) -> None:
    """Overwrite every rank's masks with rank ``src``'s (bool tensors travel as uint8)."""
    for m in masks.values():
        dist.broadcast(m.view(torch.uint8), src=src, group=group)


class DistributedRuntime(LocalRuntime):
    """Collectives shared by the multi-process runtimes (the process group already exists)."""

    distributed = True

    @classmethod
    def init_process_group(cls) -> bool:
        """From the launcher's environment (torchrun, deepspeed, SLURM): NCCL on GPUs, gloo on CPU.
        False when a process group already exists (made by the caller): it is used as it is."""
        if dist.is_initialized():
            return False
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise EngineError(f"engine.name={cls.name!r} needs a launcher (torchrun or deepspeed) that sets RANK "
                              "and WORLD_SIZE; see launch/")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return True

    def sync_buffers(self) -> None:
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for b in self.module.buffers():
            by_dtype.setdefault(b.dtype, []).append(b)
        for bufs in by_dtype.values():       # one broadcast per dtype (ResNet-50: 2, not 159)
            flat = _flatten_dense_tensors([b.data for b in bufs])
            self.dist.broadcast(flat, src=0)
            for b, v in zip(bufs, _unflatten_dense_tensors(flat, [b.data for b in bufs])):
                b.data.copy_(v)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        self.dist.all_reduce(t)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        out = [torch.empty_like(t) for _ in range(self.world)]
        self.dist.all_gather(out, t)
        return torch.stack(out)

    def stop_group(self):
        if self.dist.get_backend() == "gloo":
            return None                      # the default group already takes CPU tensors
        return self.dist.new_group(backend="gloo")

    def barrier(self) -> None:
        self.dist.barrier()

    def close(self) -> None:
        self.dist.barrier()
