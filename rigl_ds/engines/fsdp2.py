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
  layer, the single-process selection, then this rank's slice;
* a structure's groups (fan_in rows, N:M blocks) lie within rows, so each rank selects inside its own
  groups; only an update that grows also drops over the whole layer first, by the same exact top-k.

P-GaP (``gap_parallel``): each copy of the model is sharded over its own ranks, the ``"shard"`` rows
of :func:`~rigl_ds.engines.copies.copy_mesh` (``fully_shard(..., mesh=mesh["shard"])``), so every
collective of the engine stays within a copy, and the ranks at the same place in every copy hold
the same shards. Merged copies train one model: FSDP2 averages the gradients within the copy, and
:meth:`FSDP2Engine.mask_grads` averages those over the copies (one all-reduce over the peer group).
"""
from __future__ import annotations

import contextlib
import logging
import math
import pathlib
import re
import shutil
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard

from rigl_ds import checkpoint as ckpt
from rigl_ds import faults
from rigl_ds.core.layers import MaskedLayer
from rigl_ds.core.selection import Change, select_grouped, select_layer

from .copies import CopiesMixin, CopyGroups, check_copies
from .dist_select import Query, select_global_many, select_sharded_many
from .dist_utils import DistributedRuntime
from .local import LocalEngine, zero_at

logger = logging.getLogger(__name__)

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


def writer_of(name: str, copy_size: int = 1) -> int:
    """The rank that wrote a file of an FSDP2 checkpoint folder: DCP names rank r's data files
    ``__r_<n>.distcp``; the metadata, ``rigl_ds.pt`` and its checksum are rank 0's. P-GaP's copy
    c > 0 (ranks from ``c * copy_size``) writes into the subfolder ``copy<c>``, ranked within the copy."""
    path = pathlib.PurePath(name)
    m = re.match(r"__(\d+)_\d+\.distcp$", path.name)
    r = int(m.group(1)) if m else 0
    c = re.fullmatch(r"copy(\d+)", path.parts[0]) if len(path.parts) > 1 else None
    return int(c.group(1)) * copy_size + r if c else r


def row_slice(d0: int, world: int, rank: int) -> tuple[int, int]:
    """(first row, row count) of ``rank``'s dim-0 shard, as ``torch.chunk`` / FSDP2 split rows."""
    c = math.ceil(d0 / world) if d0 else 0
    start = min(rank * c, d0)
    return start, min(c, d0 - start)


class FSDP2Engine(CopiesMixin, LocalEngine):
    """Adapter for a model whose masked layers are sharded by ``fully_shard``. ``copies_mesh``: for
    P-GaP, the :func:`~rigl_ds.engines.copies.copy_mesh` whose ``"shard"`` rows the model is sharded
    over (its groups are reused; without it, the copies' groups are made when the world is split)."""

    _local = staticmethod(local)

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, *,
                 selection: str = "sharded", copies_mesh=None) -> None:
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
        super().__init__(model, optimizer)
        self.selection = selection
        self._slices: dict[str, tuple[int, int, tuple[int, ...], int]] = {}   # offset, local numel, local shape, numel
        self._group = None
        self._device: torch.device | None = None     # where the shards (and masks) live
        self.masks: Mapping[str, Tensor] = {}
        self._copies_mesh = copies_mesh

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

    # ---------------------------------------------------------------- P-GaP's copies
    def _make_copies(self, kappa: int) -> CopyGroups:
        """The copies must be what the model is sharded over: each layer's mesh is its copy's ranks."""
        world = dist.get_world_size()
        check_copies(kappa, world)
        size = world // kappa
        copy = dist.get_rank() // size
        want = list(range(copy * size, (copy + 1) * size))
        for name in self._params:
            p = self._params[name]
            if isinstance(p, DTensor):
                got = dist.get_process_group_ranks(p.device_mesh.get_group())
                if got != want:
                    raise ValueError(f"gap_parallel over FSDP2: {name!r} is sharded over ranks {got}, but copy {copy} "
                                     f"of gap_partitions={kappa} is ranks {want}: shard each copy over its own ranks "
                                     "(fully_shard(..., mesh=rigl_ds.engines.copies.copy_mesh(kappa, device)['shard']))")
        m = self._copies_mesh
        return CopyGroups(kappa, groups=None if m is None else (m["shard"].get_group(), m["copy"].get_group()))

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

    def top_positions(self, queries: Sequence[tuple[str, Tensor, int]]) -> list[Tensor]:
        if not queries:
            return []
        return select_global_many([Query(scores, torch.ones_like(scores, dtype=torch.bool), self._layout(name)[0], k,
                                         True, self._layout(name)[3]) for name, scores, k in queries],
                                  group=self._group)

    # ---------------------------------------------------------------- the update
    def select(self, masks: Mapping[str, Tensor], changes: Mapping[str, Change],
               drop_score: Callable[[str], Tensor], grow_score: Callable[[str], Tensor]
               ) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        out: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        if self.selection == "gather":          # the reference: whole layers, one at a time
            for name, c in changes.items():
                offset, n, shape, _ = self._layout(name)
                full_mask, full_drop = self._gather(masks[name], name), self._gather(drop_score(name), name)
                full_grow = self._gather(grow_score(name), name) if c.k_grow else None
                if isinstance(c.quota, torch.Tensor):      # per-row quotas (neuron ablation): this rank's rows
                    rows = self._gather(c.quota.view(-1, *[1] * (masks[name].dim() - 1)).expand(masks[name].shape)
                                        .contiguous(), name)
                    c = c._replace(quota=rows.reshape(rows.shape[0], -1)[:, 0].contiguous())
                new = select_layer(full_mask, full_drop, full_grow, c)[0]
                out[name] = self._changes(masks[name], new.reshape(-1)[offset:offset + n].reshape(shape).clone())
            return out
        # the scores in ``changes``' order (SET draws its random grow scores from one generator in that
        # order, as one process does); every layer's score shards are alive together
        scores = {n: (drop_score(n), grow_score(n) if c.k_grow else None) for n, c in changes.items()}
        whole = [n for n, c in changes.items() if c.group == self._layout(n)[3]]
        grouped = [n for n in changes if n not in whole]
        if whole:       # every whole-layer group in the same 4 collectives
            layers = [(masks[n], *scores[n], self._layout(n)[0], changes[n].k_drop, changes[n].k_grow,
                       self._layout(n)[3]) for n in whole]
            for name, (new, _, _) in zip(whole, select_sharded_many(layers, group=self._group)):
                out[name] = self._changes(masks[name], new)
        # groups lie within rows, and every rank holds whole rows: only a growing update's layer-wide
        # drop spans ranks (one exact top-k for all layers: 2 collectives); the rest is local
        growing = [n for n in grouped if changes[n].k_grow]
        picked = select_global_many([Query(scores[n][0], masks[n], self._layout(n)[0], changes[n].k_drop, False,
                                           self._layout(n)[3]) for n in growing], group=self._group) \
            if growing else []
        layer_drop = dict(zip(growing, picked))
        for name in grouped:
            c = changes[name]
            new = select_grouped(masks[name], *scores[name], c.group, c.quota, c.k_drop,
                                 dropped=layer_drop.get(name))[0]
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
        self._mask_changed(name, mask)

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
        self._mask_changed(name, new)
        changed = torch.cat([dropped, grown])
        for v in self._states(name):
            zero_at(v, changed)
        faults.point("mask_update")

    def _grad(self, param: nn.Parameter) -> Tensor | None:
        return None if param.grad is None else local(param.grad)

    @torch.no_grad()
    def mask_grads(self) -> None:
        """As one process, on this rank's gradient shards; merged P-GaP copies first average them
        over the copies (each copy's FSDP2 averaged them over its own ranks)."""
        if self.copies is not None and not self.apart:
            self.average_grads_over_copies([local(p.grad) for p in self._params.values() if p.grad is not None])
        super().mask_grads()

    @torch.no_grad()
    def mask_weights(self) -> None:
        for param, mask in self._pairs:
            self._masked_inplace(local(param.data), mask)

    def sync_masks(self, masks: Mapping[str, Tensor]) -> None:
        """Nothing to send: every rank computes the same global decision (from the same all-gathered
        candidates) and keeps its slice; the sparsifier checks the exact active count over all
        ranks of every layer the update changed."""

    def check_masks(self, masks: Mapping[str, Tensor]) -> None:
        """Each rank's masks must have its local shards' shapes."""
        for name, m in masks.items():
            shape = self._layout(name)[2]
            if tuple(m.shape) != shape:
                raise ShardLayoutError(f"mask {name!r} has shape {tuple(m.shape)}, this rank's shard is {shape}")


class FSDP2Runtime(DistributedRuntime):
    """torchrun / SLURM: ``fully_shard`` (FSDP2) over a 1-D mesh of all ranks; masks sharded like weights.

    Checkpoints are torch.distributed.checkpoint (DCP) folders: model, optimizer, masks and the
    accumulated grow scores as sharded tensors (any world size can load them), plus rank 0's
    ``rigl_ds.pt`` (loop, sparsifier and RNG state) and a ``complete`` manifest written last.
    """

    name = "fsdp2"
    keeps_channels_last = False   # fully_shard flattens parameters into contiguous shards

    @classmethod
    def create(cls, cfg, model, optimizer_fn, device) -> "FSDP2Runtime":
        copies = cfg.sparsity.gap_partitions if cfg.sparsity.method == "gap_parallel" else None
        return cls(model, optimizer_fn, device, units=cfg.engine.fsdp2_units, selection=cfg.engine.fsdp2_selection,
                   copies=copies)

    def __init__(self, model: nn.Module, optimizer_fn: Callable[[nn.Module], torch.optim.Optimizer],
                 device: torch.device, *, units: list[str], selection: str, copies: int | None = None) -> None:
        """``copies``: P-GaP's number of copies (``gap_partitions``): each is sharded over its own
        ``world // copies`` ranks (:func:`~rigl_ds.engines.copies.copy_mesh`)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from .copies import copy_mesh

        self.dist = dist
        self.copies_mesh = copy_mesh(copies, device.type) if copies else None
        self.mesh = self.copies_mesh["shard"] if copies else init_device_mesh(device.type, (dist.get_world_size(),))
        # bf16 runs under the loop's torch.autocast, as with DDP: parameters, their all-gathers and the
        # gradient reductions stay fp32 (a bf16 MixedPrecisionPolicy casts BatchNorm's affine
        # parameters too, which BatchNorm's fp32 running statistics refuse)
        wrapped = 0
        for m in list(model.modules())[1:]:
            if type(m).__name__ in units:
                fully_shard(m, mesh=self.mesh)
                wrapped += 1
        fully_shard(model, mesh=self.mesh)
        super().__init__(model, optimizer_fn(model), device, None)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.selection = selection
        self._adapter = None
        logger.info("fsdp2: %d units (%s) + root over %d ranks", wrapped, ", ".join(units) or "-", self.world)

    def sparse_engine(self):
        self._adapter = FSDP2Engine(self.module, self.optimizer, selection=self.selection, copies_mesh=self.copies_mesh)
        return self._adapter

    def _copy_size(self) -> int:
        return self.mesh.size()

    def _copies(self) -> CopyGroups | None:
        """P-GaP's copies, once the sparsifier has split the world (None for other methods)."""
        return None if self._adapter is None else self._adapter.copies

    def no_sync(self, last: bool):
        @contextlib.contextmanager
        def sync(on: bool):
            self.module.set_requires_gradient_sync(on)
            try:
                yield
            finally:
                self.module.set_requires_gradient_sync(True)
        return sync(last)

    def start_step(self) -> None:
        self.sync_buffers()              # every rank starts from rank 0's BatchNorm statistics (checkpointed)

    def grads_finite(self) -> bool:
        bad = self._nonfinite(local).float()          # this rank's gradient shards, then over all ranks
        self.dist.all_reduce(bad, op=self.dist.ReduceOp.MAX)
        return not bool(bad)

    def eval_batches(self, batches, input_shape: tuple[int, ...], input_dtype: torch.dtype = torch.float32):
        """Forwards are collectives under FSDP2: a rank out of batches runs empty ones until all are."""
        it = iter(batches)
        while True:
            batch = next(it, None)
            more = torch.tensor(float(batch is not None), device=self.device)
            self.dist.all_reduce(more, op=self.dist.ReduceOp.MAX)
            if not bool(more):
                self.reshard()
                return
            yield batch if batch is not None else (torch.zeros((0, *input_shape), dtype=input_dtype),
                                                   torch.zeros((0, *input_shape[:1]) if input_dtype == torch.long
                                                               else 0, dtype=torch.long))

    def list_checkpoints(self, ckpt_dir: pathlib.Path) -> list[pathlib.Path]:
        return ckpt.list_folders(ckpt_dir)         # DCP folders with a "complete" manifest, like DeepSpeed's

    def reshard(self) -> None:
        """Free the unsharded parameters a forward without backward (evaluation, FLOPs count) left
        behind (FSDP2 keeps the root's after forward): parameters are DTensor shards again."""
        from torch.distributed.fsdp import FSDPModule

        for m in self.module.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    def _sharded(self, state: dict[str, Any]) -> dict[str, Any]:
        """The tensors DCP saves and loads (resharded to this world size): model, optimizer, masks, scores."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        self.reshard()
        params = dict(self.module.named_parameters())

        def like_param(name: str, t: torch.Tensor):
            return placed_like(params[name], t)

        out = {"model": get_model_state_dict(self.module), "optimizer": get_optimizer_state_dict(self.module, self.optimizer)}
        sp = state.get("sparsifier")
        if sp is not None:
            out["masks"] = {n: like_param(n, m) for n, m in sp["masks"].items()}
            if sp.get("score") is not None:
                out["score"] = {n: like_param(n, s) for n, s in sp["score"].items()}
        return out

    def save(self, state: dict[str, Any], ckpt_dir: pathlib.Path, step: int, keep_last: int) -> pathlib.Path:
        """Every rank writes its shards into ``.step_N.tmp``; rank 0 adds ``rigl_ds.pt`` and the
        manifest, then renames the folder into place (a checkpoint of the same step, e.g. the one
        this run resumed from, is replaced only then)."""
        import torch.distributed.checkpoint as dcp

        tag = ckpt_dir / f"step_{step:08d}"
        tmp = ckpt_dir / f".{tag.name}.tmp"
        if self.rank == 0 and tmp.exists():          # left by a killed save
            shutil.rmtree(tmp)
        self.barrier()
        sp = state.get("sparsifier")
        # buffers (BatchNorm statistics) are replicated tensors, of which DCP keeps one rank's copy:
        # make every copy rank 0's, as every step starts from them
        self.sync_buffers()
        copies = self._copies()
        if copies is None:
            dcp.save(self._sharded(state), checkpoint_id=str(tmp))
        elif self._adapter.apart or copies.index == 0:
            # P-GaP: copy 0 writes the folder itself, so it reads as any FSDP2 checkpoint of the
            # model (the merged one, or copy 0's); while the copies train apart, copy c > 0 writes
            # its own model and optimizer state (and the masks they share) into copy<c>/
            where = tmp if copies.index == 0 else tmp / f"copy{copies.index}"
            dcp.save(self._sharded(state), checkpoint_id=str(where), process_group=copies.group)
        if self.rank == 0:
            rest = dict(state, model="dcp", sparsifier=None if sp is None else dict(sp, masks=None, score=None))
            ckpt.save_atomic(rest, tmp / "rigl_ds.pt")
        self.barrier()
        # each rank hashes the files it wrote (read back once: what reached the filesystem); rank 0
        # writes the manifest from all of them, so no file is read twice and none by every rank
        mine = ckpt.hash_files(tmp, [n for n in ckpt.folder_files(tmp)
                                     if writer_of(n, self._copy_size()) == self.rank])
        hashed: list = [None] * self.world
        self.dist.all_gather_object(hashed, mine)
        if self.rank == 0:
            ckpt.write_manifest(tmp, {k: v for part in hashed for k, v in part.items()})
            old = ckpt_dir / f".{tag.name}.old"
            if tag.exists():
                tag.rename(old)
            tmp.rename(tag)
            shutil.rmtree(old, ignore_errors=True)
            ckpt.rotate_folders(ckpt_dir, keep_last, tag, verify=False)      # hashed just now
        self.barrier()
        return tag

    def verify(self, path: pathlib.Path) -> None:
        """Every file of the manifest checked once, by the rank of this world that the file's writer
        maps to (``writer % world``: at the same world size, the file this rank's shards come from);
        a failure anywhere raises the same CheckpointError on every rank (one all-gather)."""
        try:
            ckpt.verify_folder(path, which=lambda name: writer_of(name, self._copy_size()) % self.world == self.rank)
            problem = ""
        except ckpt.CheckpointError as e:
            problem = str(e)
        found: list = [None] * self.world
        self.dist.all_gather_object(found, problem)
        bad = [f for f in found if f]
        if bad:
            raise ckpt.CheckpointError(bad[0])

    def _copy_folder(self, path: pathlib.Path, state: Mapping[str, Any]) -> pathlib.Path:
        """Where this rank's shards are: the folder, or (P-GaP's copy c > 0 of a checkpoint saved while
        the copies trained apart) its ``copy<c>`` subfolder."""
        apart = bool((state.get("sparsifier") or {}).get("copies_grow"))
        saved = sorted(p.name for p in path.glob("copy*") if p.is_dir())
        copies = self._copies()
        if copies is None:
            if apart:
                raise ckpt.CheckpointError(f"checkpoint {path} was saved while P-GaP's copies trained apart; "
                                           "resume it with sparsity.method=gap_parallel")
            return path
        if not apart:
            return path
        if saved != [f"copy{c}" for c in range(1, copies.kappa)]:
            raise ckpt.CheckpointError(f"checkpoint {path} holds P-GaP copies {['.'] + saved} (written while they "
                                       f"trained apart); this run has gap_partitions={copies.kappa}")
        return path if copies.index == 0 else path / f"copy{copies.index}"

    def load(self, path: pathlib.Path) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        if not path.is_dir():
            raise ckpt.CheckpointError(f"checkpoint {path} does not exist (FSDP2 checkpoints are DCP folders)")
        self.verify(path)
        state = ckpt.load(path / "rigl_ds.pt")
        sp = state.get("sparsifier")
        template = dict(state)
        if sp is not None:        # templates of this rank's shards, filled in place by dcp.load
            adapter = self._adapter
            if adapter is None:
                raise ckpt.CheckpointError("an FSDP2 checkpoint with masks needs the sparsifier built first")
            sp = dict(sp)
            sp["masks"] = {n: torch.zeros_like(m) for n, m in adapter.masks.items()}
            if sp.get("score_count"):
                sp["score"] = {n: torch.zeros(m.shape, dtype=torch.float32, device=m.device)
                               for n, m in adapter.masks.items()}
            template["sparsifier"] = sp
        sharded = self._sharded(template)
        where, group = self._copy_folder(path, state), None
        if self._copies() is not None:
            group = self._copies().group
        try:
            ckpt.load_dcp(sharded, where, process_group=group)
            set_model_state_dict(self.module, sharded["model"])
            set_optimizer_state_dict(self.module, self.optimizer, sharded["optimizer"])
        except ckpt.CheckpointError:
            raise
        except (RuntimeError, ValueError, KeyError) as e:
            raise ckpt.CheckpointError(f"checkpoint {path} does not fit this model/optimizer (another model?): "
                                       f"{str(e).splitlines()[0]}") from None
        return template
