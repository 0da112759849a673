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

from .copies import CopiesMixin, CopyGroups
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


class DDPEngine(CopiesMixin, LocalEngine):
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
        #: (process group, its size) over which gradients are averaged now (read per bucket per step)
        self.grad_group = (ddp_model.process_group, dist.get_world_size(ddp_model.process_group))
        if packed_allreduce:
            self.comm = PackedAllReduce(self)
            ddp_model.register_comm_hook(self.comm, packed_allreduce_hook)

    # ------------------------------------------------------------------ P-GaP's copies
    def _make_copies(self, kappa: int) -> CopyGroups:
        copies = CopyGroups(kappa, self.ddp.process_group)
        if self.comm is None:           # gradients must be all-reduced within a copy: a hook chooses the group
            self.comm = PackedAllReduce(self, packed=False)
            self.ddp.register_comm_hook(self.comm, packed_allreduce_hook)
        return copies

    def set_copies_apart(self, apart: bool) -> None:
        super().set_copies_apart(apart)
        self.grad_group = (self.copies.group, self.copies.size) if apart else \
            (self.ddp.process_group, dist.get_world_size(self.ddp.process_group))

    def _mask_group(self):
        return self.copies.group if self.apart else self.ddp.process_group

    def merge_copies(self, owners: Mapping[str, int]) -> None:
        super().merge_copies(owners)
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
