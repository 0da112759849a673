"""Exact distributed k-extreme selection over a tensor sharded across ranks (groundwork for the
FSDP2 engine: each rank holds a contiguous slice of every layer's flattened weight).

Each rank proposes its own k best eligible positions, ordered by (score, global index); an
all-gather of k*world (value, index) pairs decides the global k best by the same order, and every
rank keeps the winners that fall in its slice. Because the global k best are always among the
union of the ranks' local k best, the result is exact, with ties broken by the lower global index,
as :func:`rigl_ds.core.selection.drop_and_grow` breaks them. Communication: k*world values and
indices per call, never the whole tensor (float32 values for float32/bf16/fp16 scores, int32
indices below 2**31 elements: 8 bytes a candidate).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor



def local_candidates(scores: Tensor, eligible: Tensor, k: int, *, largest: bool) -> tuple[Tensor, Tensor]:
    """(values, local indices) of this shard's k best eligible positions, best first, ties by index."""
    idx = eligible.reshape(-1).nonzero().view(-1)
    vals = scores.reshape(-1).index_select(0, idx)
    order = torch.sort(vals, descending=largest, stable=True).indices[:k]
    return vals.index_select(0, order), idx.index_select(0, order)


def select_global(scores: Tensor, eligible: Tensor, offset: int, k: int, *, largest: bool,
                  numel: int | None = None, group=None) -> Tensor:
    """Local flat positions of this rank's share of the global ``k`` extreme eligible scores.

    ``scores``/``eligible``: this rank's shard (any shape, flattened row-major); ``offset``: the
    global flat index of its first element; ``numel``: the whole tensor's size (int32 indices on
    the wire when it is below 2**31; int64 without it). Raises ValueError if fewer than ``k``
    positions are eligible over all ranks. Every rank must call it with the same ``k``,
    ``largest``, ``numel`` and score dtype.
    """
    world = dist.get_world_size(group)
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    vals, idx = local_candidates(scores, eligible, k, largest=largest)
    vdtype = torch.float32 if scores.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float64
    idtype = torch.int32 if numel is not None and numel < 2**31 - 1 else torch.int64
    no_index = torch.iinfo(idtype).max
    # pad to k entries; padding sorts after every real candidate
    pad = k - vals.numel()
    fill = float("-inf") if largest else float("inf")
    v = torch.cat([vals.to(vdtype), vals.new_full((pad,), fill, dtype=vdtype)])
    g = torch.cat([(idx + offset).to(idtype), idx.new_full((pad,), no_index, dtype=idtype)])
    all_v = [torch.empty_like(v) for _ in range(world)]
    all_g = [torch.empty_like(g) for _ in range(world)]
    dist.all_gather(all_v, v, group=group)
    dist.all_gather(all_g, g, group=group)
    av, ag = torch.cat(all_v), torch.cat(all_g).long()
    # order by (value, global index): sort by index, then stably by value
    by_index = torch.argsort(ag, stable=True)
    av, ag = av[by_index], ag[by_index]
    by_value = torch.sort(av, descending=largest, stable=True).indices[:k]
    chosen = ag[by_value]
    if bool((chosen == no_index).any()):
        raise ValueError(f"asked for the {k} {'largest' if largest else 'smallest'} eligible scores, but fewer "
                         "positions are eligible over all ranks")
    n_local = scores.numel()
    mine = chosen[(chosen >= offset) & (chosen < offset + n_local)] - offset
    return torch.sort(mine).values


def drop_and_grow_sharded(weight: Tensor, mask: Tensor, grow_score: Tensor, offset: int, k: int,
                          numel: int | None = None, group=None) -> tuple[Tensor, Tensor, Tensor]:
    """RigL's drop/grow on this rank's shard, exact over all ranks: drop the ``k`` active positions
    of smallest |weight|, then grow the ``k`` positions of largest ``grow_score`` among those
    inactive after the drop (a just-dropped one may regrow). Returns (new local mask, dropped local
    flat indices, grown local flat indices); ``k`` is the layer's global count, ``numel`` its size."""
    flat = mask.reshape(-1)
    dropped = select_global(weight.abs(), mask, offset, k, largest=False, numel=numel, group=group)
    after_drop = flat.clone()
    after_drop[dropped] = False
    grown = select_global(grow_score, ~after_drop, offset, k, largest=True, numel=numel, group=group)
    new = after_drop.clone()
    new[grown] = True
    return new.view_as(mask), dropped, grown
