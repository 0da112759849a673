"""DeepSpeed plugin (ZeRO stages 0–3): moves tensors between a ``deepspeed.initialize`` engine
and the core, through DeepSpeed's public ``deepspeed.utils.safe_*`` accessors only.

* Ordinary steps: a tensor hook (``param.register_hook``, which runs before DeepSpeed's
  reduction) masks each masked weight's gradient, so the reduced gradient is already masked.
* Steps whose dense gradient feeds a grow score: the hook lets the gradient through; after
  ``engine.backward`` at the accumulation boundary, ``safe_get_full_grad`` gives the full
  gradient averaged over ranks and micro-batches; then ``safe_set_full_grad`` masks it.
* Mask changes are written to the fp32 masters (``safe_set_full_fp32_param``), the module's
  working copy, and every per-element optimizer state (``safe_set_full_optimizer_state``).
* A skipped optimizer step (``skip_step_on_update``) still calls ``engine.step()`` — so
  DeepSpeed's counters, gradient buffers and working copies stay consistent — with the wrapped
  torch optimizer's own ``step`` made a no-op for that one call.
* P-GaP (``gap_parallel``): DeepSpeed's data-parallel group is one copy of the model
  (:class:`CopiesMPU`, passed as ``deepspeed.initialize(mpu=...)``), so ZeRO partitions and reduces
  within a copy, and the ranks at the same place in every copy hold the same partitions. Merged
  copies train one model: a step pre-hook of the wrapped torch optimizer averages the gradients it
  is about to apply (each copy's already reduced partitions) over the copies.
"""
from __future__ import annotations

import contextlib
import json
import pathlib
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rigl_ds import checkpoint as ckpt
from rigl_ds import faults
from rigl_ds.core.engine import WholeMasks
from rigl_ds.core.layers import MaskedLayer

from . import EngineError
from .copies import CopiesMixin, CopyGroups, broadcast_tensors
from .dist_utils import DistributedRuntime, broadcast_masks, check_masks_equal
from .local import ZERO_PRESERVING_OPTIMIZERS, FloatMasks, GradientHooks, LocalEngine, MaskMultiplier


def init_deepspeed_comm(backend: str = "gloo") -> None:
    """``deepspeed.init_distributed`` without DeepSpeed's CPU shared-memory all-reduce op.

    On the CPU accelerator DeepSpeed JIT-compiles ``deepspeed_shm_comm`` when its communication
    backend starts (about 50 s of C++ on a fresh 2-core machine) and maps two 69 MB
    ``/dev/shm/deepspeed_allreduce_buffer_*`` segments per rank and port, which are never unlinked
    when a rank is killed (kill -9, preemption, a failed test): leaked segments are RAM, and 21 GB of
    them starved a machine here. The op only serves ``inference_all_reduce``, which training never
    calls; ZeRO and rigl_ds reduce through torch.distributed. DeepSpeed caches its op-compatibility
    probe in ``deepspeed.ops.__compatible_ops__`` ("edits to it persist"), and its backend builds
    the op only where that says compatible, so the entry is turned off here. GPUs are untouched.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend)


def _ds_utils():
    import deepspeed.utils as u

    return u


class CopiesMPU:
    """DeepSpeed's model-parallel unit (``mpu``) for P-GaP's copies: data parallelism within a copy
    (:class:`~rigl_ds.engines.copies.CopyGroups`), no model, tensor or pipeline parallelism (each
    rank its own model-parallel group of one). Every rank makes every one-rank group (as
    ``torch.distributed.new_group`` requires)."""

    def __init__(self, copies: CopyGroups) -> None:
        self.copies = copies
        solo = [dist.new_group([r]) for r in range(dist.get_world_size())]
        self._solo = solo[dist.get_rank()]

    def get_data_parallel_group(self):
        return self.copies.group

    def get_data_parallel_world_size(self) -> int:
        return self.copies.size

    def get_data_parallel_rank(self) -> int:
        return self.copies.local

    def get_data_parallel_group_ranks(self) -> list[int]:
        return [self.copies.index * self.copies.size + r for r in range(self.copies.size)]

    def get_model_parallel_group(self):
        return self._solo

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_src_rank(self) -> int:
        return dist.get_rank()


class DeepSpeedEngineAdapter(CopiesMixin, WholeMasks):
    """Core :class:`~rigl_ds.core.engine.Engine` for a DeepSpeed engine (names are those of ``engine.module``)."""

    def __init__(self, ds_engine, base_optimizer: torch.optim.Optimizer | None = None, *,
                 mask_sync: str = "broadcast", copies: CopyGroups | None = None) -> None:
        """``copies``: P-GaP's copy groups that DeepSpeed was initialised with (:class:`CopiesMPU`);
        without them, they are made when the world is split and checked against DeepSpeed's group."""
        if mask_sync not in ("broadcast", "verify"):
            raise ValueError(f"mask_sync must be 'broadcast' or 'verify', got {mask_sync!r}")
        self.ds = ds_engine
        self.module: nn.Module = ds_engine.module
        self.base_optimizer = base_optimizer or getattr(ds_engine, "basic_optimizer", None) or \
            getattr(ds_engine.optimizer, "optimizer", ds_engine.optimizer)
        self.stage = int(ds_engine.zero_optimization_stage())
        self.mask_sync = mask_sync
        self._params: dict[str, nn.Parameter] = dict(self.module.named_parameters())
        self._layers: list[MaskedLayer] = []
        self._masks: Mapping[str, Tensor] = {}
        self._grad_hooks = GradientHooks()
        self._post_step: list[Callable[[], None]] = []
        self._mul = MaskMultiplier()
        self._float = FloatMasks(LocalEngine.FUSE_BELOW)   # CPU, small layers: mask in the gradient's dtype
        self._changed_since_backward = False     # masks changed after the hook masked this step's gradients
        self._writes_suspended = False           # keeping_loaded_state()
        self.dense_grad_wanted: Callable[[], bool] = lambda: True
        self._given_copies = copies
        self._average_hook = None
        self._masters: dict[int, tuple[Tensor, int | None]] | None = None     # _zero0_master

    def _param(self, name: str) -> nn.Parameter:
        try:
            return self._params[name]
        except KeyError:
            raise KeyError(f"no parameter named {name!r} in the DeepSpeed engine's module") from None

    # ------------------------------------------------------------------ P-GaP's copies
    def _make_copies(self, kappa: int) -> CopyGroups:
        copies = self._given_copies or CopyGroups(kappa)
        if copies.kappa != kappa:
            raise ValueError(f"DeepSpeed was initialised with {copies.kappa} P-GaP copies, not gap_partitions={kappa}")
        group = getattr(self.ds, "seq_data_parallel_group", None) or getattr(self.ds, "data_parallel_group", None)
        want = [copies.index * copies.size + r for r in range(copies.size)]
        got = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
        if got != want:
            raise ValueError(f"gap_parallel under DeepSpeed: its data-parallel group is ranks {got}, but copy "
                             f"{copies.index} of gap_partitions={kappa} is ranks {want}: initialise DeepSpeed with "
                             "mpu=rigl_ds.engines.deepspeed.CopiesMPU(CopyGroups(kappa))")
        # merged copies: the torch optimizer averages what it applies over the copies first
        self._average_hook = self.base_optimizer.register_step_pre_hook(self._average_over_copies)
        return copies

    def _average_over_copies(self, optimizer, *_args) -> None:
        self.average_grads_over_copies([p.grad for g in optimizer.param_groups for p in g["params"]
                                        if p.grad is not None])

    def _mask_group(self):
        return self.copies.group if self.apart else None

    @torch.no_grad()
    def merge_copies(self, owners: Mapping[str, int]) -> None:
        """Every parameter (fp32 master, working copy, per-element optimizer state) from the copy that
        owns it (the rule of :meth:`CopiesMixin.merge_copies`), one parameter at a time: read whole
        through the ``safe_*`` accessors (within a copy), broadcast over the peers, written back."""
        u = _ds_utils()
        self._link_loaded_optimizer_state()
        keys = self._state_keys()
        layer_of = {id(self._params[n]): n for n in owners}
        current = owners[next(iter(owners))] if owners else 0
        for p in self._params.values():
            name = layer_of.get(id(p))
            if name is not None:
                current = owners[name]
            src = self.copies.src(current)
            held = self._zero0_master(p)                  # ZeRO-0: what the torch optimizer holds itself
            direct = self.base_optimizer.state.get(p)
            if held is not None or direct is not None:
                own = [held[0], *held[1]] if held is not None else \
                    [v for v in direct.values() if torch.is_tensor(v)]
                broadcast_tensors([p.data, *own], src=src, group=self.copies.peers)
                continue
            master = u.safe_get_full_fp32_param(p)
            states = {k: u.safe_get_full_optimizer_state(p, k) for k in keys}
            states = {k: v for k, v in states.items() if v is not None}
            full = [master] if master is not None else []
            broadcast_tensors(full + list(states.values()), src=src, group=self.copies.peers)
            if master is not None:
                u.safe_set_full_fp32_param(p, master)
            for k, v in states.items():
                u.safe_set_full_optimizer_state(p, v, k)
            if self.stage < 3:                       # the module's working copy
                if master is None:
                    broadcast_tensors([p.data], src=src, group=self.copies.peers)
                else:
                    p.data.copy_(master.to(p.device, p.dtype))
            elif master is not None:
                self._write_gathered(p, lambda data, m=master: data.copy_(m.to(data.device, data.dtype)))

    def _write_gathered(self, p: nn.Parameter, edit: Callable[[Tensor], Any]) -> None:
        """ZeRO-3: ``edit(p.data)`` on the whole parameter by the first rank of its group, which
        DeepSpeed then partitions to all of the group."""
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            group = getattr(p, "ds_process_group", None)
            if dist.get_rank(group) == 0:
                edit(p.data)

    # ------------------------------------------------------------------ core Engine protocol
    def bind(self, layers: Sequence[MaskedLayer], masks: Mapping[str, Tensor],
             dense_grad_wanted: Callable[[], bool] = lambda: True) -> None:
        self._layers, self._masks, self.dense_grad_wanted = list(layers), masks, dense_grad_wanted
        self._float.clear()
        self._grad_hooks.attach({l.name: self._param(l.name) for l in layers}, self._masked,
                                lambda: self.dense_grad_wanted())

    def remove_hooks(self) -> None:
        """Take the gradient hooks off the parameters (the adapter masks no gradient after this), and
        P-GaP's optimizer pre-hook."""
        self._grad_hooks.remove()
        if self._average_hook is not None:
            self._average_hook.remove()
            self._average_hook = None

    def _masked(self, name: str, grad: Tensor) -> Tensor:
        """A new tensor: ``grad`` zeroed outside the layer's mask (a tensor hook may not modify its
        argument). On CPU a bool multiply is not vectorised (``grad * mask`` costs 4.5-8x a float
        multiply, ``benchmarks/mask_kernels.py``): small layers multiply by a copy of the mask in the
        gradient's dtype (:class:`~rigl_ds.engines.local.FloatMasks`, as the local engine), larger ones
        take :class:`~rigl_ds.engines.local.MaskMultiplier`'s chunk loop; on a GPU one ``torch.where``."""
        mask = self._masks[name]
        return self._mul.copy(grad, mask, self._float.get(name, mask, grad))

    def _zero0_master(self, p: nn.Parameter) -> tuple[Tensor, list[Tensor]] | None:
        """ZeRO-0 with bf16/fp16: (fp32 master of ``p``, its per-element optimizer states), views into
        what DeepSpeed's mixed-precision wrapper holds: ``FP16_UnfusedOptimizer`` (a torch optimizer:
        ``fp32_groups``, one master per parameter) or ``FP16_Optimizer`` (DeepSpeed's fused optimizers:
        ``fp32_groups_flat``, one flat master per group, laid out as the module's flat ``fp16_groups``).
        The torch optimizer steps these and they are copied into the module after each step; no
        ``safe_*`` accessor reaches them. None elsewhere."""
        if self._masters is None:
            opt = self.ds.optimizer
            lo = (getattr(opt, "fp16_groups", None) or []) if self.stage == 0 else []   # ZeRO-3 has fp16_groups too
            per_param, flat = getattr(opt, "fp32_groups", None), getattr(opt, "fp32_groups_flat", None)
            self._masters = {}
            for i, group in enumerate(lo):
                if not isinstance(group, (list, tuple)):
                    continue
                offset = 0
                for j, q in enumerate(group):
                    if isinstance(per_param, (list, tuple)) and isinstance(per_param[i], (list, tuple)):
                        self._masters[id(q)] = (per_param[i][j], None)
                    elif isinstance(flat, (list, tuple)) and torch.is_tensor(flat[i]):
                        self._masters[id(q)] = (flat[i], offset)
                    offset += q.numel()
        got = self._masters.get(id(p))
        if got is None:
            return None
        owner, offset = got

        def view(t: Tensor) -> Tensor:
            return t if offset is None else t.narrow(0, offset, p.numel()).view(p.shape)

        states = [view(v) for v in self.base_optimizer.state.get(owner, {}).values()
                  if torch.is_tensor(v) and v.shape == owner.shape]
        return view(owner.data), states

    def weight(self, name: str) -> Tensor:
        p = self._param(name)
        w = _ds_utils().safe_get_full_fp32_param(p)
        if w is None and (held := self._zero0_master(p)) is not None:
            w = held[0]
        return w.detach() if w is not None else p.detach()

    def dense_grad(self, name: str) -> Tensor | None:
        return _ds_utils().safe_get_full_grad(self._param(name))

    @torch.no_grad()
    def apply_mask(self, name: str, mask: Tensor) -> None:
        if self._writes_suspended:
            return
        u = _ds_utils()
        p = self._param(name)
        w = u.safe_get_full_fp32_param(p)
        if w is not None:                       # the fp32 master (ZeRO 1-3, bf16/fp16 optimizers)
            u.safe_set_full_fp32_param(p, w * mask.to(w.device))
        elif (held := self._zero0_master(p)) is not None:       # ZeRO-0 bf16/fp16
            held[0].mul_(mask.to(held[0].device))
        if self.stage < 3:                      # the module's working copy
            p.data.mul_(mask.to(p.device))
        else:
            self._write_gathered(p, lambda data: data.mul_(mask.to(data.device)))

    def _state_keys(self) -> list[str]:
        keys: list[str] = []
        for st in self.base_optimizer.state.values():
            for k, v in st.items():
                if torch.is_tensor(v) and v.dim() >= 1 and k not in keys:
                    keys.append(k)
        return keys

    def _link_loaded_optimizer_state(self) -> None:
        """ZeRO 1/2 and the bf16 optimizer link their partitioned optimizer state to the
        ``safe_*_optimizer_state`` accessors only after the first step; a run resumed just before a
        mask update would find them unlinked. Link them now (DeepSpeed's own lazy initialiser)."""
        opt = self.ds.optimizer
        if getattr(opt, "_hp_optimizer_states_linked", True) is False and \
                any(len(s) for s in self.base_optimizer.state.values()):
            opt._lazy_init_hp_params_optimizer_state()

    @torch.no_grad()
    def reset_optimizer_state(self, name: str, keep: Tensor) -> None:
        if self._writes_suspended:
            return
        self._link_loaded_optimizer_state()
        u = _ds_utils()
        p = self._param(name)
        held = self._zero0_master(p)                 # ZeRO-0 bf16/fp16: the wrapper's fp32 master
        direct = self.base_optimizer.state.get(p)    # ZeRO-0 fp32: the torch optimizer holds p itself
        if held is not None or direct is not None:
            states = held[1] if held is not None else \
                [v for v in direct.values() if torch.is_tensor(v) and v.shape == p.shape]
            for v in states:
                v.mul_(keep.to(v.device))
            return
        for key in self._state_keys():
            s = u.safe_get_full_optimizer_state(p, key)
            if s is not None and s.shape == keep.shape:
                u.safe_set_full_optimizer_state(p, s * keep.to(s.device), key)

    def apply_update(self, name: str, old: Tensor, new: Tensor, dropped: Tensor, grown: Tensor) -> None:
        """From the synchronised masks, through the safe_* accessors."""
        self.apply_mask(name, new)
        self.reset_optimizer_state(name, old & new)
        self._changed_since_backward = True
        faults.point("mask_update")

    @torch.no_grad()
    def mask_grads(self) -> None:
        """Gradients let through dense for a grow score, or masked by the hook under masks that have
        changed since (a method that steps on an update step: GMP), are masked now; others were
        masked by the hook."""
        if not (self._grad_hooks.dense_passed or self._changed_since_backward):
            return
        u = _ds_utils()
        for layer in self._layers:
            p = self._param(layer.name)
            g = u.safe_get_full_grad(p)
            if g is not None:
                u.safe_set_full_grad(p, g * self._masks[layer.name].to(g.device))
        self._grad_hooks.dense_passed = self._changed_since_backward = False

    def mask_weights(self) -> None:
        for layer in self._layers:
            self.apply_mask(layer.name, self._masks[layer.name])

    def sync_masks(self, masks: Mapping[str, Tensor]) -> None:
        group = self._mask_group()
        if self.mask_sync == "broadcast":
            broadcast_masks(masks, src=0 if group is None else dist.get_global_rank(group, 0), group=group)
        check_masks_equal(masks, group=group)

    def check_masks(self, masks: Mapping[str, Tensor]) -> None:
        check_masks_equal(masks, group=self._mask_group())

    def optimizer_keeps_zeros(self) -> bool:
        return type(self.base_optimizer) in ZERO_PRESERVING_OPTIMIZERS

    def add_post_step_hook(self, fn: Callable[[], None]) -> None:
        self._post_step.append(fn)

    # ------------------------------------------------------------------ the loop's side
    @contextlib.contextmanager
    def _inner_step_disabled(self) -> Iterator[None]:
        """Make the wrapped torch optimizer's ``step`` a no-op for one ``engine.step()``."""
        opt = self.base_optimizer
        had = "step" in opt.__dict__
        saved = opt.__dict__.get("step")
        opt.step = lambda *args, **kwargs: None
        try:
            yield
        finally:
            if had:
                opt.step = saved
            else:
                del opt.step

    def step(self, apply: bool = True, step_fn: Callable[[], Any] | None = None) -> None:
        """``engine.step()`` at an accumulation boundary; ``apply=False`` skips the optimizer update.
        ``step_fn``: what to call instead of ``engine.step`` (the original method, where the step of
        the engine has been wrapped: the Hugging Face Trainer's DeepSpeed setting)."""
        self._grad_hooks.dense_passed = self._changed_since_backward = False
        step_fn = self.ds.step if step_fn is None else step_fn
        if apply:
            step_fn()
        else:
            with self._inner_step_disabled():
                step_fn()
        for fn in self._post_step:
            fn()

    @contextlib.contextmanager
    def keeping_loaded_state(self) -> Iterator[None]:
        """Within: masks are not written to weights or optimizer state (``apply_mask`` and
        ``reset_optimizer_state`` do nothing). For building a sparsifier over a checkpoint just
        loaded, whose own masks :meth:`Sparsifier.load_state_dict` applies next."""
        self._writes_suspended = True
        try:
            yield
        finally:
            self._writes_suspended = False


class DeepSpeedRuntime(DistributedRuntime):
    """The ``deepspeed`` launcher: ``deepspeed.initialize`` with our torch optimizer, ZeRO 0–3."""

    name = "deepspeed"
    keeps_channels_last = False   # DeepSpeed flattens parameters through byte views: NCHW weights only
    # DeepSpeed links its optimizer state to the accessors only at the next step after a load; it was
    # saved with these masks, so it is zero under them already
    reset_state_on_load = False

    @classmethod
    def init_process_group(cls) -> bool:
        made = super().init_process_group()
        if made:    # DeepSpeed adopts the process group made above (on CPU its own default is much slower here)
            init_deepspeed_comm(dist.get_backend())
        return made

    @classmethod
    def create(cls, cfg, model, optimizer_fn, device) -> "DeepSpeedRuntime":
        copies = cfg.sparsity.gap_partitions if cfg.sparsity.method == "gap_parallel" else None
        ds_cfg = deepspeed_config(cfg.engine.deepspeed_config, micro_batch=cfg.data.batch_size,
                                  grad_accumulation=cfg.train.grad_accumulation,
                                  world=dist.get_world_size() // (copies or 1),
                                  dtype=cfg.precision.dtype, clip_grad_norm=cfg.train.clip_grad_norm,
                                  copies=copies)
        return cls(model, optimizer_fn(model), ds_cfg, mask_sync=cfg.engine.mask_sync, copies=copies)

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict, *,
                 mask_sync: str, copies: int | None = None) -> None:
        """``copies``: P-GaP's number of copies (``gap_partitions``): DeepSpeed's data-parallel group
        is then one copy (:class:`CopiesMPU`), and ``ds_config``'s batch sizes count one copy's ranks."""
        import deepspeed

        self.dist = dist
        self.copies = CopyGroups(copies) if copies else None
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                               mpu=None if copies is None else CopiesMPU(self.copies))
        super().__init__(engine.module, optimizer, engine.device, None)
        self.ds, self.forward_model = engine, engine
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.mask_sync = mask_sync
        self._adapter = None
        # DeepSpeed holds reduced gradients in its own (partitioned) buffers: every local gradient
        # is checked as it is produced, before the reduction, and the flags are combined at the step
        self._nonfinite = torch.zeros((), dtype=torch.float32, device=engine.device)
        for p in self.module.parameters():
            if p.requires_grad:
                p.register_hook(self._check_grad)

    def _check_grad(self, grad: torch.Tensor) -> torch.Tensor:
        self._nonfinite.logical_or_(~torch.isfinite(grad).all())
        return grad

    def grads_finite(self) -> bool:
        flag = self._nonfinite.clone()
        self.dist.all_reduce(flag, op=self.dist.ReduceOp.MAX)
        self._nonfinite.zero_()
        return not bool(flag)

    def sparse_engine(self):
        self._adapter = DeepSpeedEngineAdapter(self.ds, self.optimizer, mask_sync=self.mask_sync, copies=self.copies)
        return self._adapter

    def start_step(self) -> None:
        # as DDP's broadcast_buffers: every rank starts the step from rank 0's BatchNorm statistics
        # (the ones checkpointed), so a resumed run continues exactly
        self.sync_buffers()

    def backward(self, loss: torch.Tensor, accum: int) -> None:
        self.ds.backward(loss)               # DeepSpeed divides by gradient_accumulation_steps itself

    def micro_step(self) -> None:
        self.ds.step()                       # not a boundary: no optimizer update

    def before_sparsifier(self) -> None:
        pass                                 # DeepSpeed unscales inside engine.step()

    def clip_grads(self, max_norm: float | None) -> None:
        pass     # DeepSpeed's "gradient_clipping" (set from train.clip_grad_norm), inside engine.step(),
        # over the gradients the sparsifier already masked: the same rule as the other engines

    def step(self, apply: bool) -> None:
        if self._adapter is not None:
            self._adapter.step(apply)
        else:
            self.ds.step()

    def zero_grad(self) -> None:
        pass                                 # engine.step() zeroes the gradients

    # DeepSpeed checkpoints are folders written by every rank; a "complete" marker makes them valid.
    def list_checkpoints(self, ckpt_dir: pathlib.Path) -> list[pathlib.Path]:
        return ckpt.list_folders(ckpt_dir)

    def save(self, state: dict[str, Any], ckpt_dir: pathlib.Path, step: int, keep_last: int) -> pathlib.Path:
        """DeepSpeed's folder; P-GaP's copy c > 0 writes its own DeepSpeed checkpoint into the
        folder's ``copy<c>/<tag>`` (at every save: DeepSpeed's save is a collective of all ranks, and
        its files are named by the rank within a copy)."""
        tag = f"step_{step:08d}"
        if self.copies is None or self.copies.index == 0:
            self.ds.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"rigl_ds": state})
        else:       # the same tag on every rank (DeepSpeed checks it across the world), another folder
            self.ds.save_checkpoint(str(ckpt_dir / tag / f"copy{self.copies.index}"), tag=tag,
                                    client_state={"rigl_ds": state}, save_latest=False)
        self.barrier()
        if self.rank == 0:
            ckpt.write_manifest(ckpt_dir / tag)
            ckpt.rotate_folders(ckpt_dir, keep_last, ckpt_dir / tag, verify=False)      # hashed just now
        self.barrier()
        return ckpt_dir / tag

    def load(self, path: pathlib.Path) -> dict[str, Any]:
        if not path.is_dir():
            raise ckpt.CheckpointError(f"checkpoint {path} does not exist (DeepSpeed checkpoints are folders)")
        ckpt.verify_folder(path)
        ckpt.check_deepspeed_folder(path)
        parent, tag = path.parent, path.name
        saved = sorted(p.name for p in path.glob("copy*") if p.is_dir())
        if self.copies is None and saved:
            raise ckpt.CheckpointError(f"checkpoint {path} holds P-GaP copies {['.'] + saved}; resume it with "
                                       "sparsity.method=gap_parallel")
        if self.copies is not None:
            if saved != [f"copy{c}" for c in range(1, self.copies.kappa)]:
                raise ckpt.CheckpointError(f"checkpoint {path} holds P-GaP copies {['.'] + saved}; this run has "
                                           f"gap_partitions={self.copies.kappa}")
            if self.copies.index > 0:
                parent = path / f"copy{self.copies.index}"
                ckpt.check_deepspeed_folder(parent / tag)
        try:
            _, client = self.ds.load_checkpoint(str(parent), tag=tag)
        except (RuntimeError, ValueError, KeyError) as e:
            raise ckpt.CheckpointError(f"checkpoint {path} does not fit this model/optimizer (another model or "
                                       f"ZeRO layout?): {str(e).splitlines()[0]}") from None
        if not client or "rigl_ds" not in client:
            raise ckpt.CheckpointError(f"checkpoint {path} holds no rigl_ds state")
        return client["rigl_ds"]


def deepspeed_config(path: str, *, micro_batch: int, grad_accumulation: int, world: int, dtype: str,
                     clip_grad_norm: float | None = None, copies: int | None = None) -> dict:
    """Load a DeepSpeed JSON and fill in (or check) its batch sizes, precision and gradient clipping
    from the YAML (the YAML decides; a JSON value that differs is refused, 0 or "auto" defer).
    ``copies`` (P-GaP): ``world`` is then one copy's ranks, and optimizer offload is refused."""
    p = pathlib.Path(path)
    try:
        cfg = json.loads(p.read_text())
    except FileNotFoundError:
        raise EngineError(f"engine.deepspeed_config: {p} not found") from None
    except json.JSONDecodeError as e:
        raise EngineError(f"engine.deepspeed_config: {p} is not valid JSON: {e}") from None
    want = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accumulation,
            "train_batch_size": micro_batch * grad_accumulation * world}
    problems = [f"{p}: {k}={cfg[k]} but the YAML gives {v} (data.batch_size={micro_batch}, "
                f"train.grad_accumulation={grad_accumulation}, world size {world})"
                for k, v in want.items() if k in cfg and cfg[k] not in (v, "auto")]
    clip = float(clip_grad_norm or 0.0)
    given = cfg.get("gradient_clipping", 0.0)
    if given not in (0, 0.0, "auto", None, clip):
        problems.append(f"{p}: gradient_clipping={given} but train.clip_grad_norm={clip_grad_norm} (set it "
                        "in the YAML, which fills the JSON, and leave the JSON's at 0.0)")
    want["gradient_clipping"] = clip
    for key, on in (("bf16", dtype == "bf16"), ("fp16", dtype == "fp16")):
        enabled = bool(cfg.get(key, {}).get("enabled", False))
        if key in cfg and enabled != on:
            problems.append(f"{p}: {key}.enabled={enabled} but precision.dtype={dtype!r}")
        cfg.setdefault(key, {})["enabled"] = on
    offload = (cfg.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device", "none")
    if copies and offload not in (None, "none"):
        problems.append(f"{p}: zero_optimization.offload_optimizer.device={offload!r} is not supported with "
                        "sparsity.method=gap_parallel (merged copies average, on the accelerator, the gradients "
                        "the optimizer applies); use 'none'")
    if problems:
        raise EngineError("DeepSpeed config disagrees with the experiment:\n  " + "\n  ".join(problems))
    cfg.update(want)
    cfg.setdefault("steps_per_print", 10**9)
    if cfg.get("zero_optimization", {}).get("stage", 0) > 0:
        cfg.setdefault("zero_allow_untested_optimizer", True)
    return cfg
