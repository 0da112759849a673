"""Small torch.distributed helpers shared by the multi-rank engines."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


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
