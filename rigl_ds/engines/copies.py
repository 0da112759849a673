"""P-GaP's copies of the model (``gap_parallel``), shared by the engines that support them.

The world is split into ``kappa`` copies of consecutive ranks; copy c is ranks
``[c*size, (c+1)*size)``, and the ranks at the same place in every copy (a *peer group*) hold the
same slice of every tensor (DDP: whole tensors; FSDP2: the same shard), so a merge or a checkpoint
moves a copy's tensors with one broadcast over the peer group. While the copies train apart,
gradients are averaged and masks agree within a copy; merged, over the whole world.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn


def broadcast_tensors(tensors: Sequence[Tensor], src: int, group) -> None:
    """Overwrite ``tensors`` (in place) with global rank ``src``'s, one broadcast per dtype and device."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    by_kind: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.dtype, t.device), []).append(t)
    # NCCL moves GPU tensors only: CPU ones (Adam's step counts, CPU masks) travel through the GPU
    staging = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend(group) == "nccl" and torch.cuda.is_available() else None
    for (_, device), ts in by_kind.items():
        flat = _flatten_dense_tensors([t.view(torch.uint8) if t.dtype == torch.bool else t for t in ts])
        if staging is not None and device.type == "cpu":
            moved = flat.to(staging)
            dist.broadcast(moved, src=src, group=group)
            flat = moved.cpu()
        else:
            dist.broadcast(flat, src=src, group=group)
        for t, v in zip(ts, _unflatten_dense_tensors(flat, [t.view(torch.uint8) if t.dtype == torch.bool else t
                                                            for t in ts])):
            (t.view(torch.uint8) if t.dtype == torch.bool else t).copy_(v)


def check_copies(kappa: Any, world: int) -> None:
    """Refuse a number of copies that does not split ``world`` ranks evenly, naming both numbers."""
    if isinstance(kappa, bool) or not isinstance(kappa, int) or kappa < 2 or world % kappa:
        raise ValueError(f"gap_parallel: the world size {world} is not divisible by gap_partitions={kappa} (one "
                         f"copy of the model per partition, each on the same number of ranks); launch a multiple "
                         f"of {kappa} ranks or change gap_partitions")


def copy_mesh(kappa: int, device_type: str):
    """The ``(kappa, world // kappa)`` device mesh of P-GaP's copies, dims ``("copy", "shard")``:
    ``mesh["shard"]`` is this rank's copy (shard each copy of the model over it, e.g.
    ``fully_shard(model, mesh=mesh["shard"])``), ``mesh["copy"]`` its peer group."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    check_copies(kappa, world)
    return init_device_mesh(device_type, (kappa, world // kappa), mesh_dim_names=("copy", "shard"))


class CopyGroups:
    """P-GaP's split of the world into ``kappa`` copies: copy c is ranks ``[c*size, (c+1)*size)``;
    the ranks at the same place in every copy (``local``) form a peer group, over which merges and
    checkpoints move a copy's tensors. Every rank makes every group, in the same order (as
    ``torch.distributed.new_group`` requires)."""

    def __init__(self, kappa: int, process_group=None, *, groups: tuple[Any, Any] | None = None) -> None:
        """``groups``: this rank's (copy group, peer group), made already (the rows and columns of
        :func:`copy_mesh`); else every rank makes every group here."""
        if process_group not in (None, dist.group.WORLD):
            raise ValueError("gap_parallel splits the default (world) process group; this model uses another one")
        world, rank = dist.get_world_size(), dist.get_rank()
        check_copies(kappa, world)
        self.kappa, self.size = kappa, world // kappa
        self.index, self.local = divmod(rank, self.size)
        if groups is not None:
            group, peers = groups
            if dist.get_world_size(group) != self.size or dist.get_world_size(peers) != kappa:
                raise ValueError(f"gap_parallel: copy groups of {dist.get_world_size(group)} ranks and peer groups of "
                                 f"{dist.get_world_size(peers)}, expected {self.size} and {kappa} ({world} ranks, "
                                 f"gap_partitions={kappa})")
        else:
            copies = [dist.new_group(list(range(c * self.size, (c + 1) * self.size))) for c in range(kappa)]
            all_peers = [dist.new_group([c * self.size + l for c in range(kappa)]) for l in range(self.size)]
            group, peers = copies[self.index], all_peers[self.local]
        #: this copy's ranks; the ranks at this rank's place in every copy
        self.group, self.peers = group, peers

    def src(self, copy: int) -> int:
        """The global rank of ``copy`` in this rank's peer group."""
        return copy * self.size + self.local

    def masks_from_other_copies(self, masks: Mapping[str, Tensor], owners: Mapping[str, int]) -> dict[str, Tensor]:
        """The shared sparse masks (copies of ``masks``): each layer from a copy that does not grow
        it (copy 0's, or copy 1's for partition 0's layers); the same on every rank."""
        out = {n: m.clone() for n, m in masks.items()}
        for c in (0, 1):
            broadcast_tensors([out[n] for n in out if (owners[n] == 0) == (c == 1)], src=self.src(c), group=self.peers)
        return out

    def gather_states(self, tree: Any) -> list[Any] | None:
        """Copies 1..kappa-1's ``tree`` (nested dicts/lists of tensors and plain data, shaped alike on
        every copy), on global rank 0; None elsewhere. Only the copies' first ranks take part."""
        from torch.utils._pytree import tree_flatten, tree_unflatten

        if self.local != 0:
            return None
        leaves, spec = tree_flatten(tree)
        out = []
        for c in range(1, self.kappa):
            mine = [leaf.detach().clone() if torch.is_tensor(leaf) else leaf for leaf in leaves]
            broadcast_tensors([t for t in mine if torch.is_tensor(t)], src=self.src(c), group=self.peers)
            if self.index == 0:             # the other copies' first ranks only pass their own on
                out.append(tree_unflatten([t.cpu() if torch.is_tensor(t) else t for t in mine], spec))
        return out if self.index == 0 else None




class CopiesMixin:
    """P-GaP's side of an engine whose ranks hold their tensors in local views (:meth:`_local`) laid
    out alike on every copy: :meth:`split_copies`, :meth:`set_copies_apart`, :meth:`merge_copies`.
    The engine provides ``_params`` (name -> parameter, in ``named_parameters`` order),
    ``optimizer`` and :meth:`_make_copies`."""

    copies: CopyGroups | None = None
    apart: bool = False          # do the copies train apart now (gradients and masks per copy)?

    def _make_copies(self, kappa: int) -> CopyGroups:
        raise NotImplementedError

    @staticmethod
    def _local(t: Tensor) -> Tensor:
        return t

    def split_copies(self, kappa: int) -> CopyGroups:
        """Split the world into ``kappa`` copies of the model (P-GaP): groups of consecutive ranks,
        each data-parallel over its own copy while :meth:`set_copies_apart` is on."""
        if self.copies is None:
            self.copies = self._make_copies(kappa)
        elif self.copies.kappa != kappa:
            raise ValueError(f"this engine's world is already split into {self.copies.kappa} copies, not {kappa}")
        return self.copies

    def set_copies_apart(self, apart: bool) -> None:
        """On: gradients are averaged and masks agree within each copy; off: over the whole world."""
        if apart and self.copies is None:
            raise ValueError("set_copies_apart(True) before split_copies")
        self.apart = apart

    @torch.no_grad()
    def merge_copies(self, owners: Mapping[str, int]) -> None:
        """Give every rank the merged model: each parameter, with its optimizer state, from the copy
        that owns it. A masked layer's owner is ``owners[name]``; every other parameter goes with the
        last masked layer before it in ``named_parameters`` order (partition 0 before the first)."""
        params: Mapping[str, nn.Parameter] = self._params
        layer_of = {id(params[n]): n for n in owners}
        by_copy: dict[int, list[Tensor]] = {c: [] for c in range(self.copies.kappa)}
        current = owners[next(iter(owners))] if owners else 0
        state = self.optimizer.state if self.optimizer is not None else {}
        for p in params.values():
            name = layer_of.get(id(p))
            if name is not None:
                current = owners[name]
            by_copy[current].append(self._local(p.data))
            by_copy[current].extend(self._local(v) for v in state.get(p, {}).values() if torch.is_tensor(v))
        for c, tensors in by_copy.items():
            broadcast_tensors(tensors, src=self.copies.src(c), group=self.copies.peers)

    @torch.no_grad()
    def average_grads_over_copies(self, grads: Iterable[Tensor]) -> None:
        """Merged copies train one model: each rank's gradients (already averaged within its copy,
        ``grads``: local views) are averaged over its peers, in place (one all-reduce per dtype and
        device). Apart, or without copies, nothing happens."""
        if self.copies is None or self.apart:
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        by_kind: dict[tuple, list[Tensor]] = {}
        for g in grads:
            by_kind.setdefault((g.dtype, g.device), []).append(g)
        for ts in by_kind.values():
            flat = _flatten_dense_tensors(ts)
            dist.all_reduce(flat, group=self.copies.peers)
            flat.div_(self.copies.kappa)
            for t, v in zip(ts, _unflatten_dense_tensors(flat, ts)):
                t.copy_(v)
