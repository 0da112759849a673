"""FSDP2 plugin (``torch.distributed.fsdp.fully_shard``): masks sharded exactly like their weights.

FSDP2 keeps every parameter as a DTensor sharded on dim 0 over a 1-D device mesh: rank r holds
rows ``[r*c, min((r+1)*c, d0))`` with ``c = ceil(d0 / world)`` (possibly none), i.e. one contiguous
slice of the row-major flattened weight. Each rank keeps the mask of its own slice, as a local
bool tensor of the local shard's shape, and:

* ordinary steps: after backward (FSDP2 has reduce-scattered the rank-averaged gradient), the
  local shard of each masked gradient is zeroed under the local mask (``register_hook`` on FSDP2
  parameters does not see the sharded gradient, so masking happens after backward);
* weights and optimizer states (DTensors sharded like the weight) are edited through
  ``to_local()``, in place;
* the mask update never gathers a weight: each rank proposes its local k best drop and grow
  candidates, an all-gather of k*world (value, global index) pairs decides the exact global k
  (:mod:`rigl_ds.engines.dist_select`), and each rank applies the winners in its slice.
  ``selection="gather"`` is the simple reference: ``full_tensor()`` of weight, score and mask per
  layer, the single-process selection, then this rank's slice.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard

from rigl_ds import faults
from rigl_ds.core.layers import MaskedLayer
from rigl_ds.core.selection import select_changes

from .dist_select import select_sharded_many
from .local import LocalEngine, zero_at

SELECTIONS = ("sharded", "gather")


def local(t: Tensor) -> Tensor:
    """The local tensor of a DTensor (a view: in-place edits stick), else ``t`` (called per
    gradient per step: no import or allocation here)."""
    return t.to_local() if isinstance(t, DTensor) else t


def placed_like(param: Tensor, t: Tensor):
    """``t`` (this rank's shard, the local shape of ``param``) as a DTensor sharded like ``param``
    (no copy: a DCP load into it fills ``t``)."""
    return DTensor.from_local(t, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=torch.empty(param.shape, device="meta").stride())


class ShardLayoutError(ValueError):
    """A parameter is not sharded the way this engine supports (dim 0 over a 1-D mesh)."""


def row_slice(d0: int, world: int, rank: int) -> tuple[int, int]:
    """(first row, row count) of ``rank``'s dim-0 shard, as ``torch.chunk`` / FSDP2 split rows."""
    c = math.ceil(d0 / world) if d0 else 0
    start = min(rank * c, d0)
    return start, min(c, d0 - start)


class FSDP2Engine(LocalEngine):
    """Adapter for a model whose masked layers are sharded by ``fully_shard``."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, *,
                 selection: str = "sharded") -> None:
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
        super().__init__(model, optimizer)
        self.selection = selection
        self._slices: dict[str, tuple[int, int, tuple[int, ...], int]] = {}   # offset, local numel, local shape, numel
        self._group = None
        self._device: torch.device | None = None     # where the shards (and masks) live
        self.masks: Mapping[str, Tensor] = {}

    def _layout(self, name: str) -> tuple[int, int, tuple[int, ...], int]:
        got = self._slices.get(name)
        if got is not None:
            return got
        p = self._param(name)
        if not isinstance(p, DTensor):
            raise ShardLayoutError(f"{name!r} is not a DTensor: apply fully_shard to the model (or a module "
                                   "holding it) before building the sparsifier")
        if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise ShardLayoutError(f"{name!r} is placed as {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh; "
                                   "masks follow FSDP2's default Shard(0) over a 1-D mesh only")
        group = p.device_mesh.get_group()
        if self._group is None:
            self._group, self._device = group, local(p.data).device
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        start, rows = row_slice(p.shape[0], world, rank)
        loc = local(p.data)
        if loc.shape[0] != rows or tuple(loc.shape[1:]) != tuple(p.shape[1:]):
            raise ShardLayoutError(f"{name!r}: local shard {tuple(loc.shape)} on rank {rank} is not rows "
                                   f"[{start}, {start + rows}) of {tuple(p.shape)} (uneven custom sharding?)")
        row = math.prod(p.shape[1:])
        got = self._slices[name] = (start * row, rows * row, tuple(loc.shape), p.numel())
        return got

    # ---------------------------------------------------------------- reads
    def weight(self, name: str) -> Tensor:
        self._layout(name)                  # checked (and the shards' group and device known) on first read
        return local(self._param(name).detach())

    def dense_grad(self, name: str) -> Tensor | None:
        g = self._param(name).grad
        return None if g is None else local(g)

    def shard(self, name: str, full: Tensor) -> Tensor:
        offset, n, shape, _ = self._layout(name)
        return full.reshape(-1)[offset:offset + n].reshape(shape).clone()

    def whole(self, name: str, part: Tensor) -> Tensor:
        if part.dtype == torch.bool:             # gloo gathers no bool
            return self._gather(part.to(torch.uint8), name).bool()
        return self._gather(part, name)

    def total(self, t: Tensor) -> Tensor:
        x = t if self._device is None or t.device == self._device else t.to(self._device)   # NCCL: on the GPU
        dist.all_reduce(x, group=self._group)
        if x is not t:
            t.copy_(x)
        return t

    # ---------------------------------------------------------------- the update
    def select(self, masks: Mapping[str, Tensor], counts: Mapping[str, tuple[int, int]],
               drop_score: Callable[[str], Tensor], grow_score: Callable[[str], Tensor]
               ) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        out: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        if self.selection == "gather":          # the reference: whole layers, one at a time
            for name, (kd, kg) in counts.items():
                offset, n, shape, _ = self._layout(name)
                full_mask, full_drop = self._gather(masks[name], name), self._gather(drop_score(name), name)
                full_grow = self._gather(grow_score(name), name) if kg else None
                new = select_changes(full_mask, full_drop, full_grow, kd, kg)[0]
                out[name] = self._changes(masks[name], new.reshape(-1)[offset:offset + n].reshape(shape).clone())
            return out
        # every layer in the same 4 collectives; the score shards of all layers are alive together
        layers = [(masks[name], drop_score(name), grow_score(name) if kg else None, self._layout(name)[0], kd, kg,
                   self._layout(name)[3]) for name, (kd, kg) in counts.items()]
        for name, (new, _, _) in zip(counts, select_sharded_many(layers, group=self._group)):
            out[name] = self._changes(masks[name], new)
        return out

    @staticmethod
    def _changes(old: Tensor, new: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(new, positions dropped for good, positions newly grown): a regrown position is in neither."""
        o, n = old.reshape(-1), new.reshape(-1)
        return new, (o & ~n).nonzero().view(-1), (n & ~o).nonzero().view(-1)

    def _gather(self, t: Tensor, name: str) -> Tensor:
        """The whole layer from every rank's slice: ``full_tensor()`` of ``t`` placed like the weight
        (the reference path; also how the tests read whole masks)."""
        return placed_like(self._param(name), t).full_tensor()

    # ---------------------------------------------------------------- writes (local shards, in place)
    def bind(self, layers: Sequence[MaskedLayer], masks: Mapping[str, Tensor], dense_grad_wanted=lambda: True) -> None:
        for l in layers:
            self._layout(l.name)
        self.masks = masks               # this rank's shards (the sparsifier's own tensors)
        super().bind(layers, masks, dense_grad_wanted)

    @torch.no_grad()
    def apply_mask(self, name: str, mask: Tensor) -> None:
        w = local(self._param(name).data)
        torch.where(mask, w, self._zero(w), out=w)

    def _states(self, name: str) -> list[Tensor]:
        if self.optimizer is None:
            return []
        p = self._param(name)
        return [local(v) for v in self.optimizer.state.get(p, {}).values()
                if isinstance(v, Tensor) and v.shape == p.shape]

    @torch.no_grad()
    def reset_optimizer_state(self, name: str, keep: Tensor) -> None:
        for v in self._states(name):
            torch.where(keep, v, self._zero(v), out=v)

    @torch.no_grad()
    def apply_update(self, name: str, old: Tensor, new: Tensor, dropped: Tensor, grown: Tensor) -> None:
        """Each rank decided its own slice exactly: only its changed positions are written."""
        zero_at(local(self._param(name).data), dropped)
        changed = torch.cat([dropped, grown])
        for v in self._states(name):
            zero_at(v, changed)
        faults.point("mask_update")

    @torch.no_grad()
    def mask_grads(self) -> None:
        for param, mask in self._pairs:
            if param.grad is not None:
                self._masked_inplace(local(param.grad), mask)

    @torch.no_grad()
    def mask_weights(self) -> None:
        for param, mask in self._pairs:
            self._masked_inplace(local(param.data), mask)

    def sync_masks(self, masks: Mapping[str, Tensor]) -> None:
        """Nothing to send: every rank computes the same global decision (from the same all-gathered
        candidates) and keeps its slice; the sparsifier checks the exact active count of every
        layer over all ranks after each update."""

    def check_masks(self, masks: Mapping[str, Tensor]) -> None:
        """Each rank's masks must have its local shards' shapes."""
        for name, m in masks.items():
            shape = self._layout(name)[2]
            if tuple(m.shape) != shape:
                raise ShardLayoutError(f"mask {name!r} has shape {tuple(m.shape)}, this rank's shard is {shape}")
