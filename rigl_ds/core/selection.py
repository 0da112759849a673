"""Drop-and-grow selection on one layer (SPEC §4): pure tensor code.

Semantics, fixed here so that every implementation (and every rank) agrees exactly:

* drop: the ``k`` active positions with the smallest drop score; among equal scores the
  position with the lower flat index is dropped first;
* grow: the ``k`` positions that are inactive after the drop (a just-dropped position included)
  with the largest grow score; among equal scores the lower flat index is grown first.

The official code breaks ties with N(0, 1e-5) noise; we break them by index instead so that
the result is reproducible bit for bit on any device and any number of ranks.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


def drop_and_grow(mask: Tensor, drop_score: Tensor, grow_score: Tensor | None, k: int,
                  k_grow: int | None = None) -> Tensor:
    """The sort-based reference: the new bool mask after dropping ``k`` active positions and
    growing ``k_grow`` (default ``k``) inactive ones. ``mask`` is not modified.

    With ``k_grow == k`` the active count is unchanged (RigL, SET); ``k_grow < k`` prunes (GMP).
    ``grow_score`` may be None when nothing grows.
    """
    k_grow = k if k_grow is None else k_grow
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be torch.bool, got {mask.dtype}")
    if drop_score.shape != mask.shape or (grow_score is not None and grow_score.shape != mask.shape):
        raise ValueError(
            f"score shapes {tuple(drop_score.shape)}, {None if grow_score is None else tuple(grow_score.shape)} "
            f"differ from the mask shape {tuple(mask.shape)}")
    flat = mask.reshape(-1)
    new = flat.clone()
    n_active = int(flat.sum())
    if k < 0 or k > n_active:
        raise ValueError(f"k must be in [0, n_active={n_active}], got {k}")
    if k_grow < 0 or k_grow > flat.numel() - n_active + k:
        raise ValueError(f"k_grow must be in [0, {flat.numel() - n_active + k}], got {k_grow}")
    if k_grow and grow_score is None:
        raise ValueError(f"k_grow={k_grow} needs a grow score")
    if k:
        active = flat.nonzero().squeeze(1)                       # ascending flat indices
        order = torch.sort(drop_score.reshape(-1)[active], stable=True).indices[:k]
        new[active[order]] = False
    if k_grow:
        candidates = (~new).nonzero().squeeze(1)                 # ascending flat indices
        order = torch.sort(grow_score.reshape(-1)[candidates], descending=True, stable=True).indices[:k_grow]
        new[candidates[order]] = True
    return new.view(mask.shape)


def random_mask(numel: int, nnz: int, generator: torch.Generator, prefer: Tensor | None = None) -> Tensor:
    """A flat CPU bool mask with exactly ``nnz`` ones at uniformly random positions.

    With ``prefer`` (a bool tensor of ``numel`` entries, e.g. ``weight != 0``), preferred positions
    are kept before any other: the ones go to preferred positions first (a random subset of them
    if there are more than ``nnz``), the rest at random among the others. The same draw either
    way, so where every position is preferred the mask is the one drawn without ``prefer``."""
    if not 0 <= nnz <= numel:
        raise ValueError(f"nnz must be in [0, {numel}], got {nnz}")
    mask = torch.ones(numel, dtype=torch.bool)
    zeros = numel - nnz
    perm = torch.randperm(numel, generator=generator) if zeros else None
    if zeros:
        if prefer is not None:
            keep_first = prefer.reshape(-1).cpu()[perm]
            perm = torch.cat([perm[~keep_first], perm[keep_first]])     # drop the others first
        mask[perm[:zeros]] = False
    return mask


_SAMPLE = 32768         # sample size for the threshold estimate
_EXACT_BELOW = 65536    # below this many values a plain kthvalue is as fast


def k_extreme_positions(values: Tensor, k: int, *, largest: bool, exclude: Tensor | None = None) -> Tensor:
    """Flat positions (ascending) of the ``k`` smallest (or largest) ``values``, ties to the lower
    index, ignoring positions where ``exclude`` is True. Exact.

    Threshold-and-refine: a bound estimated from a fixed-seed sample keeps a candidate set a
    little larger than ``k``; if it holds at least ``k`` values it holds every value at or beyond
    the true k-th one, so an exact ``kthvalue`` over the small set gives the exact threshold.
    Otherwise (rare) the whole array is used.
    """
    n = values.numel()
    device = values.device
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    cand: Tensor | None = None
    if n > _EXACT_BELOW:
        g = torch.Generator(device="cpu").manual_seed(n)
        probe = torch.randint(n, (_SAMPLE,), generator=g).to(device)
        sample = values.index_select(0, probe)
        if exclude is not None:
            sample = sample.masked_fill(exclude.index_select(0, probe), float("-inf") if largest else float("inf"))
        q = k / n
        margin = 5.0 * math.sqrt(q * (1.0 - q) / _SAMPLE) + 2.0 / _SAMPLE
        rank = min(_SAMPLE, max(1, math.ceil((q + margin) * _SAMPLE)))
        if rank < _SAMPLE:
            if largest:
                bound = sample.kthvalue(_SAMPLE - rank + 1).values
                inside = values.ge(bound)
            else:
                bound = sample.kthvalue(rank).values
                inside = values.le(bound)
            if exclude is not None:
                inside.logical_and_(exclude.logical_not())
            cand = inside.nonzero().view(-1)
            if cand.numel() < k:
                cand = None
    if cand is None:
        cand = (exclude.logical_not().nonzero().view(-1) if exclude is not None
                else torch.arange(n, device=device))
        if cand.numel() < k:
            raise ValueError(f"k={k} exceeds the {cand.numel()} selectable values")
    v = values.index_select(0, cand)
    if largest:
        v = v.neg()
    if k == v.numel():
        return cand
    thr = v.kthvalue(k).values
    sel = v < thr
    need = k - int(sel.sum())
    if need > 0:                       # the threshold value itself, lowest indices first
        sel[(v == thr).nonzero().view(-1)[:need]] = True
    return cand[sel]


def select_changes(mask: Tensor, drop_score: Tensor, grow_score: Tensor | None, k_drop: int, k_grow: int
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Fast drop-and-grow, exactly equal to ``drop_and_grow(mask, drop_score, grow_score, k_drop, k_grow)``,
    also returning the flat positions dropped (old 1 -> new 0) and newly grown (old 0 -> new 1); a
    position dropped and regrown is in neither.

    No sorts: the drop selects among the active positions only, the grow among the positions
    inactive after the drop, each by threshold-and-refine (:func:`k_extreme_positions`); exact
    ties at either threshold go to the lower flat index, as in the reference.
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be torch.bool, got {mask.dtype}")
    flat = mask.reshape(-1)
    new = flat.clone()
    empty = torch.zeros(0, dtype=torch.long, device=mask.device)
    if k_drop == 0 and k_grow == 0:
        return new.view(mask.shape), empty, empty
    dropped = empty
    if k_drop:
        active = flat.nonzero().view(-1)
        if k_drop > active.numel():
            raise ValueError(f"k must be in [0, n_active={active.numel()}], got {k_drop}")
        scores = drop_score.reshape(-1).index_select(0, active)
        dropped = active[k_extreme_positions(scores, k_drop, largest=False)]
        new[dropped] = False
    grown = empty
    if k_grow:
        if grow_score is None:
            raise ValueError(f"k_grow={k_grow} needs a grow score")
        grown = k_extreme_positions(grow_score.reshape(-1), k_grow, largest=True, exclude=new)
        new[grown] = True
    return new.view(mask.shape), dropped[~new[dropped]], grown[~flat[grown]]


def update_mask_with_changes(mask: Tensor, weight: Tensor, grow_score: Tensor, k: int
                             ) -> tuple[Tensor, Tensor, Tensor]:
    """RigL's update (drop ``k`` of smallest |weight|, grow ``k``) through :func:`select_changes`."""
    return select_changes(mask, weight.abs(), grow_score, k, k)


def update_mask(mask: Tensor, weight: Tensor, grow_score: Tensor, k: int) -> Tensor:
    """Fast drop-and-grow, exactly equal to ``drop_and_grow(mask, weight.abs(), grow_score, k)``."""
    return update_mask_with_changes(mask, weight, grow_score, k)[0]


# ---------------------------------------------------------------------------- grouped selection
# A structure (rigl_ds.core.structures) cuts a layer's flat positions into equal groups of
# ``group`` consecutive positions with the same active count (the quota) in each. The rule, fixed
# here for every implementation:
#
# * an update that grows (RigL, SET): drop ``k_drop`` active positions of smallest drop score over
#   the whole layer (as the unstructured drop), then in every group grow the positions of largest
#   grow score among its inactive ones (a just-dropped one included) until the group holds its
#   quota again (SRigL's drop-then-regrow-per-neuron). The drop fraction keeps its meaning even
#   where it is below one weight per group (2:4 at f < 0.5).
# * an update that only drops (GMP): every group drops its excess over the new quota, smallest
#   drop score first.
#
# Ties go to the lower flat index, as in the unstructured selection. With one group (the whole
# layer) both are exactly drop_and_grow.


def _pick_in_groups(scores: Tensor, eligible: Tensor, count: Tensor, *, largest: bool) -> Tensor:
    """Flat positions (ascending) of the ``count[g]`` eligible positions of largest (or smallest)
    score in each row ``g`` of the (groups, group) tensors ``scores``/``eligible``, ties to the lower
    index. No sort: a per-row ``topk`` of the largest count finds each row's threshold value; every
    eligible score beyond it is taken, and the positions at it fill the rest, lowest index first."""
    if bool((count > eligible.sum(1)).any()):
        raise ValueError("a group has fewer eligible positions than it must select")
    kmax = int(count.max()) if count.numel() else 0
    if kmax == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    s = (scores if largest else scores.neg()).masked_fill(~eligible, float("-inf"))
    if bool(torch.isnan(s).any()):
        raise ValueError("a selection score is NaN (a NaN weight or score): no order between positions")
    live = count > 0
    thr = torch.topk(s, kmax, dim=1).values.gather(1, (count - 1).clamp(min=0).unsqueeze(1))
    above = (s > thr).logical_and_(live.unsqueeze(1))      # eligible: thr is an eligible score where live
    tie = (s == thr).logical_and_(eligible).logical_and_(live.unsqueeze(1))
    need = count - above.sum(1)
    crowded = tie.sum(1) > need                             # more positions at the threshold than places
    if bool(crowded.any()):                                 # (rare with real-valued scores): lowest index first
        rows = crowded.nonzero().view(-1)
        t = tie[rows]
        tie[rows] = t & (t.cumsum(1) <= need[rows].unsqueeze(1))
    return above.logical_or_(tie).view(-1).nonzero().view(-1)


def select_grouped(mask: Tensor, drop_score: Tensor, grow_score: Tensor | None, group: int, quota: int | Tensor,
                   k_drop: int, *, dropped: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The structured update of one layer (or of a part of it made of whole groups): every group of
    ``group`` consecutive flat positions ends with exactly ``quota`` active (an int for every group,
    or one per group: neuron ablation gives removed rows 0). Returns (new mask, flat positions
    dropped for good, flat positions newly grown), as :func:`select_changes`.

    With a ``grow_score``: the ``k_drop`` active positions of smallest ``drop_score`` over the part
    are dropped (or ``dropped``, flat positions an engine chose exactly over a layer that spans ranks),
    then each group grows back to ``quota``. Without: each group drops down to ``quota``."""
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be torch.bool, got {mask.dtype}")
    flat = mask.reshape(-1)
    if isinstance(quota, Tensor):
        fits = group >= 1 and flat.numel() % group == 0 and tuple(quota.shape) == (flat.numel() // group,) \
            and bool(((quota >= 0) & (quota <= group)).all())
    else:
        fits = group >= 1 and flat.numel() % group == 0 and 0 <= quota <= group
    if not fits:
        raise ValueError(f"groups of {group} with {quota} active do not fit {flat.numel()} positions")
    new = flat.clone()
    active = flat.view(-1, group).sum(1)
    if grow_score is None:
        excess = active - quota
        if bool((excess < 0).any()):
            raise ValueError(f"a group holds fewer than its quota of {quota} active positions and nothing grows")
        out = _pick_in_groups(drop_score.reshape(-1, group), flat.view(-1, group), excess, largest=False)
        new[out] = False
        return new.view(mask.shape), out, out[:0]
    if dropped is None:
        dropped = torch.zeros(0, dtype=torch.long, device=mask.device)
        if k_drop:
            act = flat.nonzero().view(-1)
            if k_drop > act.numel():
                raise ValueError(f"k must be in [0, n_active={act.numel()}], got {k_drop}")
            dropped = act[k_extreme_positions(drop_score.reshape(-1).index_select(0, act), k_drop, largest=False)]
    new[dropped] = False
    after = new.view(-1, group)
    deficit = quota - after.sum(1)
    if bool((deficit < 0).any()):
        raise ValueError(f"a group holds more than its quota of {quota} active positions after the drop")
    grown = _pick_in_groups(grow_score.reshape(-1, group), ~after, deficit, largest=True)
    new[grown] = True
    return new.view(mask.shape), dropped[~new[dropped]], grown[~flat[grown]]


def select_grouped_reference(mask: Tensor, drop_score: Tensor, grow_score: Tensor | None, group: int, quota: int,
                             k_drop: int) -> Tensor:
    """The sort-based reference of :func:`select_grouped` (new mask only): :func:`drop_and_grow` on
    the whole part for the drop, then on each group for its growth (or its drop, without growth)."""
    flat = mask.reshape(-1)
    if grow_score is None:
        parts = [drop_and_grow(g, d, None, int(g.sum()) - quota, 0)
                 for g, d in zip(flat.split(group), drop_score.reshape(-1).split(group))]
        return torch.cat(parts).view(mask.shape)
    after = drop_and_grow(flat, drop_score.reshape(-1), None, k_drop, 0)
    parts = [drop_and_grow(g, torch.zeros(group), s, 0, quota - int(g.sum()))
             for g, s in zip(after.split(group), grow_score.reshape(-1).split(group))]
    return torch.cat(parts).view(mask.shape)


class Change(NamedTuple):
    """What one layer's update must do: drop ``k_drop`` and grow ``k_grow`` positions (global counts),
    in groups of ``group`` consecutive flat positions (the whole layer: unstructured) that each end
    with ``quota`` active."""

    k_drop: int
    k_grow: int
    group: int
    quota: int | Tensor


def select_layer(mask: Tensor, drop_score: Tensor, grow_score: Tensor | None, change: Change
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """One layer's update, held whole: :func:`select_changes` for one group spanning the mask,
    :func:`select_grouped` otherwise."""
    if change.group == mask.numel():
        return select_changes(mask, drop_score, grow_score, change.k_drop, change.k_grow)
    return select_grouped(mask, drop_score, grow_score, change.group, change.quota, change.k_drop)


def random_grouped_mask(numel: int, group: int, quota: int, generator: torch.Generator,
                        prefer: Tensor | None = None) -> Tensor:
    """A flat CPU bool mask with exactly ``quota`` ones at uniformly random positions of every group
    of ``group`` consecutive positions; with one group, exactly :func:`random_mask`. ``prefer`` (as
    there) puts a group's ones on its preferred positions first."""
    if group == numel:
        return random_mask(numel, quota, generator, prefer)
    if group < 1 or numel % group or not 0 <= quota <= group:
        raise ValueError(f"groups of {group} with {quota} active do not fit {numel} positions")
    key = torch.rand(numel // group, group, generator=generator)
    if prefer is not None:
        key = key - prefer.reshape(-1, group).cpu().to(key.dtype)      # preferred first (keys in [-1, 0))
    take = torch.zeros(numel // group, group, dtype=torch.bool)
    take.scatter_(1, key.argsort(dim=1)[:, :quota], True)
    return take.view(-1)
