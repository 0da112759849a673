"""DistributedDataParallel engine: DDP's all-reduce averages the gradients, so after backward
``param.grad`` is the dense gradient averaged over ranks, and every rank holds the same weights.

A DDP communication hook packs, on ordinary steps, only the active entries of each gradient
bucket (by the shared mask) before the all-reduce, so gradient traffic falls to about the
layer density; on steps whose dense gradient feeds a mask update it all-reduces the whole bucket.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from rigl_ds import checkpoint as ckpt
from rigl_ds import faults
from rigl_ds.core.layers import MaskedLayer

from .dist_utils import DistributedRuntime, broadcast_masks, check_masks_equal
from .local import LocalEngine, flat_in_memory_order, grad_scaler


class PackedAllReduce:
    """State of the packed all-reduce communication hook; counts the bytes it all-reduces."""

    def __init__(self, engine: "DDPEngine", *, packed: bool = True) -> None:
        self.engine = engine
        self.packed = packed       # False: the whole bucket always (a hook only to choose the group: P-GaP)
        self._index_cache: dict[tuple[int, ...], Tensor | None] = {}
        self._cache_version = -1
        self.bytes_this_step = 0
        self.dense_bytes_this_step = 0

    def reset_counters(self) -> None:
        self.bytes_this_step = 0
        self.dense_bytes_this_step = 0

    def _active_index(self, bucket) -> Tensor | None:
        """Flat positions of active entries in the bucket buffer, or None when all are active."""
        if self._cache_version != self.engine.mask_version:
            self._index_cache.clear()
            self._cache_version = self.engine.mask_version
        params = bucket.parameters()
        key = tuple(id(p) for p in params)
        if key not in self._index_cache:
            parts, any_masked = [], False
            for p in params:
                m = self.engine.mask_of(p)
                if m is None:
                    parts.append(torch.ones(p.numel(), dtype=torch.bool, device=p.device))
                else:
                    parts.append(flat_in_memory_order(m, p))    # the bucket's layout
                    any_masked = True
            full = torch.cat(parts) if any_masked else None
            if full is not None and not bool(full.all()):     # all active (gmp's dense start): plain all-reduce
                idx = full.nonzero().reshape(-1)
                # int32 halves the cache (index_select and index_put_ take int32 indices)
                self._index_cache[key] = idx.to(torch.int32) if idx.numel() and idx[-1] < 2**31 - 1 else idx
            else:
                self._index_cache[key] = None
        return self._index_cache[key]

    def __call__(self, bucket) -> torch.futures.Future[Tensor]:
        buf = bucket.buffer()
        self.dense_bytes_this_step += buf.numel() * buf.element_size()
        group, world = self.engine.grad_group
        idx = None if not self.packed or self.engine.dense_grad_wanted() else self._active_index(bucket)
        if idx is None:
            buf.div_(world)
            self.bytes_this_step += buf.numel() * buf.element_size()
            fut = dist.all_reduce(buf, group=group, async_op=True).get_future()
            return fut.then(lambda f: f.value()[0])
        packed = buf.index_select(0, idx).div_(world)
        self.bytes_this_step += packed.numel() * packed.element_size()
        fut = dist.all_reduce(packed, group=group, async_op=True).get_future()

        def unpack(f) -> Tensor:
            buf.zero_()
            buf.index_put_((idx,), f.value()[0])
            return buf

        return fut.then(unpack)


def packed_allreduce_hook(state: PackedAllReduce, bucket):
    """DDP communication hook: see :class:`PackedAllReduce`."""
    return state(bucket)


# DDP checks the return annotation itself; this module's annotations are strings (PEP 563).
packed_allreduce_hook.__annotations__["return"] = torch.futures.Future[torch.Tensor]


class DDPEngine(LocalEngine):
    """Adapter for a ``DistributedDataParallel`` model (names are those of ``ddp.module``)."""

    def __init__(self, ddp_model: DDP, optimizer: torch.optim.Optimizer | None, *,
                 mask_sync: str = "broadcast", packed_allreduce: bool = True) -> None:
        if not isinstance(ddp_model, DDP):
            raise TypeError(f"DDPEngine needs a DistributedDataParallel model, got {type(ddp_model).__name__}")
        if mask_sync not in ("broadcast", "verify"):
            raise ValueError(f"mask_sync must be 'broadcast' or 'verify', got {mask_sync!r}")
        super().__init__(ddp_model.module, optimizer)
        self.ddp = ddp_model
        self.mask_sync = mask_sync
        self.mask_version = 0
        self._mask_by_param: dict[int, Tensor] = {}
        self.comm: PackedAllReduce | None = None
        self.copies: CopyGroups | None = None
        self.apart = False          # P-GaP: do the copies train apart now (gradients and masks per copy)?
        #: (process group, its size) over which gradients are averaged now (read per bucket per step)
        self.grad_group = (ddp_model.process_group, dist.get_world_size(ddp_model.process_group))
        if packed_allreduce:
            self.comm = PackedAllReduce(self)
            ddp_model.register_comm_hook(self.comm, packed_allreduce_hook)

    # ------------------------------------------------------------------ P-GaP's copies
    def split_copies(self, kappa: int) -> "CopyGroups":
        """Split the world into ``kappa`` copies of the model (P-GaP): groups of consecutive ranks,
        each data-parallel over its own copy while :meth:`set_copies_apart` is on."""
        if self.copies is None:
            self.copies = CopyGroups(kappa, self.ddp.process_group)
            if self.comm is None:           # gradients must be all-reduced within a copy: a hook chooses the group
                self.comm = PackedAllReduce(self, packed=False)
                self.ddp.register_comm_hook(self.comm, packed_allreduce_hook)
        elif self.copies.kappa != kappa:
            raise ValueError(f"this engine's world is already split into {self.copies.kappa} copies, not {kappa}")
        return self.copies

    def set_copies_apart(self, apart: bool) -> None:
        """On: gradients are averaged and masks agree within each copy; off: over the whole world."""
        if apart and self.copies is None:
            raise ValueError("set_copies_apart(True) before split_copies")
        self.apart = apart
        self.grad_group = (self.copies.group, self.copies.size) if apart else \
            (self.ddp.process_group, dist.get_world_size(self.ddp.process_group))

    def _mask_group(self):
        return self.copies.group if self.apart else self.ddp.process_group

    @torch.no_grad()
    def merge_copies(self, owners: Mapping[str, int]) -> None:
        """Give every rank the merged model: each parameter, with its optimizer state, from the copy
        that owns it. A masked layer's owner is ``owners[name]``; every other parameter goes with the
        last masked layer before it in ``named_parameters`` order (partition 0 before the first)."""
        layer_of = {id(self._param(n)): n for n in owners}
        by_copy: dict[int, list[Tensor]] = {c: [] for c in range(self.copies.kappa)}
        current = owners[next(iter(owners))] if owners else 0
        state = self.optimizer.state if self.optimizer is not None else {}
        for p in self._params.values():
            name = layer_of.get(id(p))
            if name is not None:
                current = owners[name]
            by_copy[current].append(p.data)
            by_copy[current].extend(v for v in state.get(p, {}).values() if torch.is_tensor(v))
        for c, tensors in by_copy.items():
            broadcast_tensors(tensors, src=self.copies.src(c), group=self.copies.peers)
        self.mask_version += 1

    def bind(self, layers: Sequence[MaskedLayer], masks: Mapping[str, Tensor],
             dense_grad_wanted: Callable[[], bool] = lambda: True) -> None:
        super().bind(layers, masks, dense_grad_wanted)
        self._mask_by_param = {id(self._param(l.name)): masks[l.name] for l in layers}

    def mask_of(self, param: nn.Parameter) -> Tensor | None:
        return self._mask_by_param.get(id(param))

    def apply_mask(self, name: str, mask: Tensor) -> None:
        super().apply_mask(name, mask)
        self.mask_version += 1     # bucket indices are rebuilt on the next packed all-reduce

    def apply_update(self, name: str, old: Tensor, new: Tensor, dropped: Tensor, grown: Tensor) -> None:
        """From the synchronised masks (a broadcast may have replaced this rank's own result)."""
        self.apply_mask(name, new)
        self.reset_optimizer_state(name, old & new)
        faults.point("mask_update")

    def sync_masks(self, masks: Mapping[str, Tensor]) -> None:
        group = self._mask_group()
        if self.mask_sync == "broadcast":
            broadcast_masks(masks, src=dist.get_global_rank(group, 0) if self.apart else 0, group=group)
        check_masks_equal(masks, group=group)

    def check_masks(self, masks: Mapping[str, Tensor]) -> None:
        check_masks_equal(masks, group=self._mask_group())


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


class CopyGroups:
    """P-GaP's split of the world into ``kappa`` copies: copy c is ranks ``[c*size, (c+1)*size)``;
    the ranks at the same place in every copy (``local``) form a peer group, over which merges and
    checkpoints move a copy's tensors. Every rank makes every group, in the same order (as
    ``torch.distributed.new_group`` requires)."""

    def __init__(self, kappa: int, process_group=None) -> None:
        if process_group not in (None, dist.group.WORLD):
            raise ValueError("gap_parallel splits the default (world) process group; this DDP model uses another one")
        world, rank = dist.get_world_size(), dist.get_rank()
        if isinstance(kappa, bool) or not isinstance(kappa, int) or kappa < 2 or world % kappa:
            raise ValueError(f"gap_parallel: the world size {world} is not divisible by gap_partitions={kappa} (one "
                             f"copy of the model per partition, each on the same number of ranks); launch a multiple "
                             f"of {kappa} ranks or change gap_partitions")
        self.kappa, self.size = kappa, world // kappa
        self.index, self.local = divmod(rank, self.size)
        groups = [dist.new_group(list(range(c * self.size, (c + 1) * self.size))) for c in range(kappa)]
        peers = [dist.new_group([c * self.size + l for c in range(kappa)]) for l in range(self.size)]
        #: this copy's ranks; the ranks at this rank's place in every copy
        self.group, self.peers = groups[self.index], peers[self.local]

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


class DDPRuntime(DistributedRuntime):
    """torchrun / SLURM: ``DistributedDataParallel``, NCCL on GPUs, gloo on CPU."""

    name = "ddp"

    @classmethod
    def create(cls, cfg, model, optimizer_fn, device) -> "DDPRuntime":
        return cls(model, optimizer_fn, device, grad_scaler(cfg, device), packed_allreduce=cfg.engine.packed_allreduce,
                   mask_sync=cfg.engine.mask_sync)

    def __init__(self, model: nn.Module, optimizer_fn: Callable[[nn.Module], torch.optim.Optimizer],
                 device: torch.device, scaler, *, packed_allreduce: bool, mask_sync: str) -> None:
        self.dist = dist
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        super().__init__(model, optimizer_fn(model), device, scaler)
        self.ddp, self.forward_model = ddp, ddp
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.packed_allreduce, self.mask_sync = packed_allreduce, mask_sync

    def sparse_engine(self):
        self.engine = DDPEngine(self.ddp, self.optimizer, mask_sync=self.mask_sync,
                                packed_allreduce=self.packed_allreduce)
        return self.engine

    def _copies(self) -> "CopyGroups | None":
        engine = getattr(self, "engine", None)
        return engine.copies if engine is not None and engine.apart else None

    def save(self, state: dict[str, Any], ckpt_dir, step: int, keep_last: int):
        """Rank 0 writes one file; while P-GaP's copies train apart it also holds copies 1..kappa-1's
        model and optimizer state (``copies``), gathered from their first ranks (every rank calls this)."""
        copies = self._copies()
        if copies is not None:
            others = copies.gather_states({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()})
            if self.rank == 0:
                state = dict(state, copies=others)
        return super().save(state, ckpt_dir, step, keep_last)

    def load(self, path):
        """As one process; a rank of P-GaP copy c > 0 then loads that copy's model and optimizer state."""
        state = super().load(path)
        engine = getattr(self, "engine", None)
        saved = state.get("copies")
        if saved is None and (state.get("sparsifier") or {}).get("copies_grow") and self.world > 1:
            raise ckpt.CheckpointError(f"checkpoint {path} was saved while P-GaP's copies trained apart but holds "
                                       "only copy 0's model (written by another tool?)")
        if saved is not None and engine is not None and engine.copies is not None:
            if len(saved) != engine.copies.kappa - 1:
                raise ckpt.CheckpointError(f"checkpoint {path} holds {len(saved) + 1} P-GaP copies, this run has "
                                           f"gap_partitions={engine.copies.kappa}")
            if engine.copies.index > 0:
                mine = saved[engine.copies.index - 1]
                self.module.load_state_dict(mine["model"])
                self.optimizer.load_state_dict(mine["optimizer"])
        return state

    def no_sync(self, last: bool):
        return contextlib.nullcontext() if last else self.ddp.no_sync()

    def close(self) -> None:
        self.dist.barrier()
        self.dist.destroy_process_group()
