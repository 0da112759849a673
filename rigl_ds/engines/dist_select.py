"""Exact distributed k-extreme selection over a tensor sharded across ranks (groundwork for the
FSDP2 engine: each rank holds a contiguous slice of every layer's flattened weight).

Each rank proposes its own k best eligible positions, ordered by (score, global index); an
all-gather of k*world (value, index) pairs decides the global k best by the same order, and every
rank keeps the winners that fall in its slice. Because the global k best are always among the
union of the ranks' local k best, the result is exact, with ties broken by the lower global index,
as :func:`rigl_ds.core.selection.drop_and_grow` breaks them. Communication: k*world values and
indices per call, never the whole tensor (float32 values for float32/bf16/fp16 scores, int32
indices below 2**31 elements: 8 bytes a candidate). The candidates of many layers share one
all-gather (:func:`drop_and_grow_sharded_many`): 4 collectives per mask update, not 4 per layer.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from rigl_ds.core.selection import k_extreme_positions


def local_candidates(scores: Tensor, eligible: Tensor, k: int, *, largest: bool) -> tuple[Tensor, Tensor]:
    """(values, local indices, ascending) of this shard's k best eligible positions (ties to the
    lower index), found in linear time by threshold-and-refine (:func:`k_extreme_positions`)."""
    flat, elig = scores.reshape(-1), eligible.reshape(-1)
    if elig.dtype != torch.bool:
        raise TypeError(f"eligible must be torch.bool, got {elig.dtype}")
    k = min(k, int(torch.count_nonzero(elig)))
    idx = k_extreme_positions(flat, k, largest=largest, exclude=~elig)
    return flat.index_select(0, idx), idx


class Query(NamedTuple):
    """One selection on this rank's shard: the ``k`` smallest (``largest=False``) or largest eligible
    ``scores`` of a tensor of ``numel`` elements whose shard starts at global flat index ``offset``."""

    scores: Tensor
    eligible: Tensor
    offset: int
    k: int
    largest: bool
    numel: int | None = None


def select_global_many(queries: Sequence[Query], group=None) -> list[Tensor]:
    """:func:`select_global` for several tensors with two all-gathers in all (values, indices): the
    candidates of every query travel in one buffer, so a mask update over L layers costs 4
    collectives, not 4L (latency, not bytes, dominates small layers)."""
    world = dist.get_world_size(group)
    out: list[Tensor | None] = [None] * len(queries)
    live = [i for i, q in enumerate(queries) if q.k > 0]
    for i, q in enumerate(queries):
        if q.k == 0:
            out[i] = torch.zeros(0, dtype=torch.long, device=q.scores.device)
    if not live:
        return out
    wide = any(queries[i].scores.dtype not in (torch.float32, torch.bfloat16, torch.float16) for i in live)
    vdtype = torch.float64 if wide else torch.float32
    narrow = all(queries[i].numel is not None and queries[i].numel < 2**31 - 1 for i in live)
    idtype = torch.int32 if narrow else torch.int64
    no_index = torch.iinfo(idtype).max
    vs, gs = [], []
    for i in live:                      # each query pads to k entries; padding sorts after every real candidate
        q = queries[i]
        vals, idx = local_candidates(q.scores, q.eligible, q.k, largest=q.largest)
        pad = q.k - vals.numel()
        vs += [vals.to(vdtype), vals.new_full((pad,), float("-inf") if q.largest else float("inf"), dtype=vdtype)]
        gs += [(idx + q.offset).to(idtype), idx.new_full((pad,), no_index, dtype=idtype)]
    v, g = torch.cat(vs), torch.cat(gs)
    all_v = [torch.empty_like(v) for _ in range(world)]
    all_g = [torch.empty_like(g) for _ in range(world)]
    dist.all_gather(all_v, v, group=group)
    dist.all_gather(all_g, g, group=group)
    av, ag = torch.stack(all_v), torch.stack(all_g)          # (world, sum of k)
    start = 0
    for i in live:
        q = queries[i]
        qv, qg = av[:, start:start + q.k].reshape(-1), ag[:, start:start + q.k].reshape(-1).long()
        start += q.k
        # order by (value, global index): the real candidates arrive by ascending global index (rank
        # by rank, each ascending; padding sorts last by value anyway): one stable sort by value
        chosen = qg[torch.sort(qv, descending=q.largest, stable=True).indices[:q.k]]
        if bool((chosen == no_index).any()):
            raise ValueError(f"asked for the {q.k} {'largest' if q.largest else 'smallest'} eligible scores, but "
                             "fewer positions are eligible over all ranks")
        n_local = q.scores.numel()
        mine = chosen[(chosen >= q.offset) & (chosen < q.offset + n_local)] - q.offset
        out[i] = torch.sort(mine).values
    return out


def select_global(scores: Tensor, eligible: Tensor, offset: int, k: int, *, largest: bool,
                  numel: int | None = None, group=None) -> Tensor:
    """Local flat positions of this rank's share of the global ``k`` extreme eligible scores.

    ``scores``/``eligible``: this rank's shard (any shape, flattened row-major); ``offset``: the
    global flat index of its first element; ``numel``: the whole tensor's size (int32 indices on
    the wire when it is below 2**31; int64 without it). Raises ValueError if fewer than ``k``
    positions are eligible over all ranks. Every rank must call it with the same ``k``,
    ``largest``, ``numel`` and score dtype.
    """
    return select_global_many([Query(scores, eligible, offset, k, largest, numel)], group)[0]


def select_sharded_many(layers: Sequence[tuple[Tensor, Tensor, Tensor | None, int, int, int, int | None]],
                        group=None) -> list[tuple[Tensor, Tensor, Tensor]]:
    """:func:`rigl_ds.core.selection.select_changes` on this rank's shards of several layers, exact
    over all ranks: per layer ``(mask, drop_score, grow_score, offset, k_drop, k_grow, numel)``, drop
    the ``k_drop`` active positions of smallest ``drop_score``, then grow the ``k_grow`` of largest
    ``grow_score`` among those inactive after the drop (a just-dropped one may regrow). The counts
    are global (every rank passes the same). Returns per layer (new local mask, dropped local flat
    indices, grown local flat indices; a position dropped and regrown is in both). Four collectives in all, whatever the number of layers
    (two when nothing grows)."""
    dropped = select_global_many([Query(d, m, off, kd, False, n) for m, d, _, off, kd, _, n in layers], group)
    after = []
    for (m, *_), d in zip(layers, dropped):
        a = m.reshape(-1).clone()
        a[d] = False
        after.append(a)
    grown: list[Tensor] = [torch.zeros(0, dtype=torch.long, device=a.device) for a in after]
    if any(kg for *_, kg, _ in layers):
        queries = [Query(s if s is not None else torch.zeros(a.shape, device=a.device), ~a, off, kg, True, n)
                   for (_, _, s, off, _, kg, n), a in zip(layers, after)]
        grown = select_global_many(queries, group)
    out = []
    for (m, *_), a, d, g in zip(layers, after, dropped, grown):
        new = a.clone()
        new[g] = True
        out.append((new.view_as(m), d, g))
    return out


def drop_and_grow_sharded_many(layers: Sequence[tuple[Tensor, Tensor, Tensor, int, int, int | None]],
                               group=None) -> list[tuple[Tensor, Tensor, Tensor]]:
    """RigL's drop/grow on this rank's shards of several layers: per layer ``(weight, mask,
    grow_score, offset, k, numel)``, :func:`select_sharded_many` with ``|weight|`` as the drop score
    and ``k`` dropped and grown."""
    return select_sharded_many([(m, w.abs(), s, off, k, k, n) for w, m, s, off, k, n in layers], group)


def drop_and_grow_sharded(weight: Tensor, mask: Tensor, grow_score: Tensor, offset: int, k: int,
                          numel: int | None = None, group=None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`drop_and_grow_sharded_many` for one layer: (new local mask, dropped local flat
    indices, grown local flat indices); ``k`` is the layer's global count, ``numel`` its size."""
    return drop_and_grow_sharded_many([(weight, mask, grow_score, offset, k, numel)], group)[0]
