"""The interface between the sparsifier (which decides) and a training engine (which moves tensors).

An engine adapter gives the sparsifier full, rank-averaged views of masked weights and their
gradients, and applies what the sparsifier decided to every copy it keeps (module weights, fp32
masters, optimizer state, shards). It never decides anything about masks.
"""
from __future__ import annotations

from typing import Callable, Mapping, Protocol, Sequence, runtime_checkable

from torch import Tensor

from .layers import MaskedLayer
from .selection import Change, k_extreme_positions, select_layer


@runtime_checkable
class Engine(Protocol):
    """What :class:`rigl_ds.core.sparsifier.Sparsifier` needs from a training engine."""

    def bind(self, layers: Sequence[MaskedLayer], masks: Mapping[str, Tensor],
             dense_grad_wanted: Callable[[], bool]) -> None:
        """Remember the masks (the sparsifier changes them in place from now on) and a callable
        telling, during backward, whether this step's dense gradient is needed (else gradients
        may be masked before or during the all-reduce)."""

    def weight(self, name: str) -> Tensor:
        """The weight of a masked layer as this rank's mask covers it (read only; its device is
        where masks live): the full weight, or this rank's shard for sharded engines (FSDP2)."""

    def dense_grad(self, name: str) -> Tensor | None:
        """The dense gradient of a masked weight (full, or this rank's shard, as ``weight``),
        averaged over ranks and micro-batches, before masking; only valid between backward and
        the optimizer step. None if no gradient."""

    def shard(self, name: str, full: Tensor) -> Tensor:
        """This rank's part of a tensor of the layer's full shape (a new tensor): what the
        sparsifier keeps as the layer's mask. The whole tensor unless masks are sharded."""

    def whole(self, name: str, part: Tensor) -> Tensor:
        """The inverse of :meth:`shard`: the whole layer from every rank's part (a collective on
        sharded engines, so every rank calls it; ``part`` itself where masks are whole)."""

    def select(self, masks: Mapping[str, Tensor], changes: Mapping[str, Change],
               drop_score: Callable[[str], Tensor], grow_score: Callable[[str], Tensor]
               ) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        """Carry out the core's decision for each layer named in ``changes``, on the part this rank
        holds (the scores are of that part): :func:`rigl_ds.core.selection.select_layer`, exact over
        the whole layer. One group spanning the layer (unstructured): drop ``k_drop`` active positions
        of smallest ``drop_score(name)``, grow the ``k_grow`` of largest ``grow_score(name)`` among
        those inactive after the drop (SPEC §4, ties to the lower global index); a sharded engine
        runs this as an exact top-k over the shards. Groups within rows (a structure): the
        layer-wide drop is the only part that may span ranks; every group's own selection is local.
        Returns per layer (new mask, dropped, grown): this rank's flat positions that changed (a
        position dropped and regrown is in neither). The scores are asked for in ``changes``'
        order, ``grow_score`` only where ``k_grow > 0``."""

    def top_positions(self, queries: Sequence[tuple[str, Tensor, int]]) -> list[Tensor]:
        """For each (layer, scores of this rank's part, k): this rank's flat positions among the ``k``
        largest scores of the whole layer, ties to the lower global index (exact over the shards
        of a sharded layer; one collective round for all queries)."""

    def total(self, t: Tensor) -> Tensor:
        """The sum of ``t`` over the ranks that hold different parts of the masks (in place);
        ``t`` itself where every rank holds whole masks."""

    def apply_mask(self, name: str, mask: Tensor) -> None:
        """Zero the weight at ``~mask`` in every copy the engine keeps."""

    def reset_optimizer_state(self, name: str, keep: Tensor) -> None:
        """Zero every per-element optimizer state of this weight where ``keep`` is False."""

    def apply_update(self, name: str, old: Tensor, new: Tensor, dropped: Tensor, grown: Tensor) -> None:
        """After ``sync_masks``: zero the weight where ``new`` is False and the optimizer state
        where ``old & new`` is False. ``dropped`` / ``grown`` are this rank's flat positions
        that changed (valid when ``sync_masks`` cannot alter the masks, e.g. one process)."""

    def mask_grads(self) -> None:
        """Hot path: zero the gradients of all bound weights under their masks, in place."""

    def mask_weights(self) -> None:
        """Zero all bound weights under their masks, in place."""

    def sync_masks(self, masks: Mapping[str, Tensor]) -> None:
        """Make ``masks`` identical on every rank (broadcast from rank 0, or verify), then check them."""

    def check_masks(self, masks: Mapping[str, Tensor]) -> None:
        """Raise naming the first layer whose mask differs between ranks (a cheap checksum all-reduce)."""

    def optimizer_keeps_zeros(self) -> bool:
        """True when the optimizer provably leaves a weight at 0 whose gradient and state are 0."""

    def add_post_step_hook(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` after every optimizer step."""


class WholeMasks:
    """The :class:`Engine` methods of engines whose ranks each hold every mask whole."""

    def shard(self, name: str, full: Tensor) -> Tensor:
        return full

    def whole(self, name: str, part: Tensor) -> Tensor:
        return part

    def select(self, masks: Mapping[str, Tensor], changes: Mapping[str, Change],
               drop_score: Callable[[str], Tensor], grow_score: Callable[[str], Tensor]
               ) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        # one layer at a time: a single layer's scores are alive at once
        return {n: select_layer(masks[n], drop_score(n), grow_score(n) if c.k_grow else None, c)
                for n, c in changes.items()}

    def top_positions(self, queries: Sequence[tuple[str, Tensor, int]]) -> list[Tensor]:
        return [k_extreme_positions(scores.reshape(-1), k, largest=True) for _, scores, k in queries]

    def total(self, t: Tensor) -> Tensor:
        return t
