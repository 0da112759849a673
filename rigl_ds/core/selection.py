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

import torch
from torch import Tensor


def drop_and_grow(mask: Tensor, drop_score: Tensor, grow_score: Tensor, k: int) -> Tensor:
    """Return the new bool mask after dropping ``k`` active and growing ``k`` inactive positions.

    The active count is unchanged. ``mask`` is not modified.
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be torch.bool, got {mask.dtype}")
    if drop_score.shape != mask.shape or grow_score.shape != mask.shape:
        raise ValueError(
            f"score shapes {tuple(drop_score.shape)}, {tuple(grow_score.shape)} differ from the "
            f"mask shape {tuple(mask.shape)}")
    flat = mask.reshape(-1)
    new = flat.clone()
    n_active = int(flat.sum())
    if k < 0 or k > n_active:
        raise ValueError(f"k must be in [0, n_active={n_active}], got {k}")
    if k == 0:
        return new.view(mask.shape)
    active = flat.nonzero().squeeze(1)                       # ascending flat indices
    order = torch.sort(drop_score.reshape(-1)[active], stable=True).indices[:k]
    new[active[order]] = False
    candidates = (~new).nonzero().squeeze(1)                 # ascending flat indices
    order = torch.sort(grow_score.reshape(-1)[candidates], descending=True, stable=True).indices[:k]
    new[candidates[order]] = True
    return new.view(mask.shape)


def random_mask(numel: int, nnz: int, generator: torch.Generator) -> Tensor:
    """A flat CPU bool mask with exactly ``nnz`` ones at uniformly random positions."""
    if not 0 <= nnz <= numel:
        raise ValueError(f"nnz must be in [0, {numel}], got {nnz}")
    mask = torch.ones(numel, dtype=torch.bool)
    zeros = numel - nnz
    if zeros:
        mask[torch.randperm(numel, generator=generator)[:zeros]] = False
    return mask
