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
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from rigl_ds import faults
from rigl_ds.core.engine import WholeMasks
from rigl_ds.core.layers import MaskedLayer

from .dist_utils import broadcast_masks, check_masks_equal
from .local import ZERO_PRESERVING_OPTIMIZERS


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


class DeepSpeedEngineAdapter(WholeMasks):
    """Core :class:`~rigl_ds.core.engine.Engine` for a DeepSpeed engine (names are those of ``engine.module``)."""

    def __init__(self, ds_engine, base_optimizer: torch.optim.Optimizer | None = None, *,
                 mask_sync: str = "broadcast") -> None:
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
        self._hook_handles: list = []
        self._post_step: list[Callable[[], None]] = []
        self._dense_passed = False
        self._changed_since_backward = False     # masks changed after the hook masked this step's gradients
        self.dense_grad_wanted: Callable[[], bool] = lambda: True

    def _param(self, name: str) -> nn.Parameter:
        try:
            return self._params[name]
        except KeyError:
            raise KeyError(f"no parameter named {name!r} in the DeepSpeed engine's module") from None

    # ------------------------------------------------------------------ core Engine protocol
    def bind(self, layers: Sequence[MaskedLayer], masks: Mapping[str, Tensor],
             dense_grad_wanted: Callable[[], bool] = lambda: True) -> None:
        self._layers, self._masks, self.dense_grad_wanted = list(layers), masks, dense_grad_wanted
        for h in self._hook_handles:
            h.remove()
        self._hook_handles = [self._param(l.name).register_hook(self._make_hook(masks[l.name])) for l in layers]

    def _make_hook(self, mask: Tensor) -> Callable[[Tensor], Tensor]:
        def hook(grad: Tensor) -> Tensor:
            if self.dense_grad_wanted():
                self._dense_passed = True
                return grad
            return grad * mask
        return hook

    def weight(self, name: str) -> Tensor:
        p = self._param(name)
        w = _ds_utils().safe_get_full_fp32_param(p)
        return w if w is not None else p.detach()

    def dense_grad(self, name: str) -> Tensor | None:
        return _ds_utils().safe_get_full_grad(self._param(name))

    @torch.no_grad()
    def apply_mask(self, name: str, mask: Tensor) -> None:
        u = _ds_utils()
        p = self._param(name)
        w = u.safe_get_full_fp32_param(p)
        if w is not None:                       # the fp32 master (ZeRO 1-3, bf16/fp16 optimizers)
            u.safe_set_full_fp32_param(p, w * mask.to(w.device))
        if self.stage < 3:                      # the module's working copy
            p.data.mul_(mask.to(p.device))
        else:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if torch.distributed.get_rank() == 0:
                    p.data.mul_(mask.to(p.device))

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
        self._link_loaded_optimizer_state()
        u = _ds_utils()
        p = self._param(name)
        direct = self.base_optimizer.state.get(p)    # stage 0 fp32: the torch optimizer holds p itself
        if direct is not None:
            for v in direct.values():
                if torch.is_tensor(v) and v.shape == p.shape:
                    v.mul_(keep)
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
        if not (self._dense_passed or self._changed_since_backward):
            return
        u = _ds_utils()
        for layer in self._layers:
            p = self._param(layer.name)
            g = u.safe_get_full_grad(p)
            if g is not None:
                u.safe_set_full_grad(p, g * self._masks[layer.name].to(g.device))
        self._dense_passed = self._changed_since_backward = False

    def mask_weights(self) -> None:
        for layer in self._layers:
            self.apply_mask(layer.name, self._masks[layer.name])

    def sync_masks(self, masks: Mapping[str, Tensor]) -> None:
        if self.mask_sync == "broadcast":
            broadcast_masks(masks, src=0)
        check_masks_equal(masks)

    def check_masks(self, masks: Mapping[str, Tensor]) -> None:
        check_masks_equal(masks)

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

    def step(self, apply: bool = True) -> None:
        """``engine.step()`` at an accumulation boundary; ``apply=False`` skips the optimizer update."""
        self._dense_passed = self._changed_since_backward = False
        if apply:
            self.ds.step()
        else:
            with self._inner_step_disabled():
                self.ds.step()
        for fn in self._post_step:
            fn()
