"""The ``local`` backend: one process, plain PyTorch.

``LocalEngine`` moves tensors for the core (also for any wrapper whose ``param.grad`` already holds
the rank-averaged gradient after backward: DDP); ``LocalRuntime`` is what the training loop drives
(step, collectives, checkpoint files), and the base of the other backends' runtimes. Decides
nothing about masks.
"""
from __future__ import annotations

import contextlib
import pathlib
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from rigl_ds import checkpoint as ckpt
from rigl_ds import faults
from rigl_ds.core.engine import WholeMasks
from rigl_ds.core.layers import MaskedLayer

#: Optimizers measured (tests/unit/test_zeros_under_mask.py) to keep a weight exactly at 0 when
#: its gradient and every state slot are 0: plain, foreach and fused variants, with and without
#: momentum, nesterov, (decoupled) weight decay and amsgrad.
ZERO_PRESERVING_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def flat_in_memory_order(t: Tensor, like: Tensor) -> Tensor:
    """``t`` (the shape of ``like``) flattened in the order in which ``like``'s elements lie in
    memory: logical order for contiguous weights, NHWC order for channels-last ones (DDP buckets
    and optimizer buffers lay gradients out like their parameters)."""
    if like.is_contiguous():
        return t.reshape(-1)
    order = sorted(range(like.dim()), key=lambda d: (-like.stride(d), d))
    return t.permute(order).reshape(-1)


def zero_at(t: Tensor, flat_idx: Tensor) -> None:
    """``t.view(-1)[flat_idx] = 0`` by logical (row-major) position, whatever ``t``'s strides."""
    if t.is_contiguous():
        t.view(-1).index_fill_(0, flat_idx, 0)
    else:
        t.index_put_(torch.unravel_index(flat_idx, t.shape), torch.zeros((), dtype=t.dtype, device=t.device))


def unwrap_optimizer(optimizer):
    """The ``torch.optim.Optimizer`` inside a wrapper that holds one as ``.optimizer`` without being
    a complete one itself (Hugging Face Accelerate's ``AcceleratedOptimizer``: its ``step`` calls the
    inner one's, whose state and step hooks are the real ones); anything else unchanged."""
    inner = getattr(optimizer, "optimizer", None)
    while isinstance(inner, torch.optim.Optimizer) and inner is not optimizer and \
            not hasattr(optimizer, "_optimizer_step_post_hooks"):
        optimizer, inner = inner, getattr(inner, "optimizer", None)
    return optimizer


class MaskMultiplier:
    """``src * mask`` for a bool ``mask``, written into ``out`` (which may be ``src``), with no
    mask-sized temporary.

    On CUDA one ``torch.where(mask, src, 0, out=out)``. On CPU, bool kernels are not vectorised
    (one thread: ``src * mask`` 4.5-8x a float multiply, ``where`` 13-16x; this loop 2.4-3.1x;
    ``benchmarks/mask_kernels.py``), so the mask is read as uint8, widened chunk by chunk into a
    small reusable buffer and multiplied in. (Multiplying keeps a NaN/inf value at a masked position as
    NaN; a step with such gradients is skipped anyway.)"""

    CHUNK = 1 << 18      # elements per step of the CPU loop (1 MiB float32 buffer)
    SMALL = 1 << 15      # below this, one torch.where call costs less than the chunk loop

    def __init__(self) -> None:
        self._buffers: dict[torch.dtype, Tensor] = {}     # CPU: one CHUNK-sized buffer per dtype
        self._zeros: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def zero(self, t: Tensor) -> Tensor:
        key = (t.dtype, t.device)
        z = self._zeros.get(key)
        if z is None:
            z = self._zeros[key] = torch.zeros((), dtype=t.dtype, device=t.device)
        return z

    def chunked(self, t: Tensor) -> bool:
        """Does a tensor like ``t`` take the CPU chunk loop?"""
        return t.device.type == "cpu" and t.is_floating_point() and t.numel() >= self.SMALL

    def buffer(self, dtype: torch.dtype) -> Tensor:
        buf = self._buffers.get(dtype)
        if buf is None:
            buf = self._buffers[dtype] = torch.empty(self.CHUNK, dtype=dtype)
        return buf

    def copy(self, src: Tensor, mask: Tensor, float_mask: Tensor | None = None) -> Tensor:
        """A new tensor, ``src`` zeroed outside ``mask`` (what a tensor hook returns: it may not modify
        its argument); ``float_mask``, the mask in ``src``'s dtype on its device, makes it one multiply."""
        if float_mask is not None and float_mask.dtype == src.dtype and float_mask.device == src.device:
            return src * float_mask
        return self(src, mask.to(src.device), out=torch.empty_like(src))

    @torch.no_grad()
    def __call__(self, src: Tensor, mask: Tensor, out: Tensor) -> Tensor:
        if not self.chunked(src) or not (src.is_contiguous() and mask.is_contiguous() and out.is_contiguous()):
            return torch.where(mask, src, self.zero(src), out=out)
        flat, dst, m8 = src.view(-1), out.view(-1), mask.view(-1).view(torch.uint8)
        buf = self.buffer(src.dtype)
        n = flat.numel()
        for i in range(0, n, self.CHUNK):
            c = min(self.CHUNK, n - i)
            b = buf[:c]
            b.copy_(m8[i:i + c])
            torch.mul(flat[i:i + c], b, out=dst[i:i + c])
        return out


class GradientHooks:
    """Tensor hooks (``param.register_hook``) that mask each masked weight's gradient as backward
    produces it, before a wrapper reduces or accumulates it (DDP under the Hugging Face Trainer,
    DeepSpeed), or let it through dense while ``dense_wanted()`` says a grow score reads it;
    :attr:`dense_passed` says whether one did since it was last cleared."""

    def __init__(self) -> None:
        self._handles: list = []
        self.dense_passed = False

    def attach(self, params: Mapping[str, nn.Parameter], masked: Callable[[str, Tensor], Tensor],
               dense_wanted: Callable[[], bool]) -> None:
        """Hook every parameter of ``params`` (name -> parameter), replacing earlier hooks;
        ``masked(name, grad)`` returns a new, masked tensor (a hook may not modify its argument)."""
        self.remove()

        def make(name: str) -> Callable[[Tensor], Tensor]:
            def hook(grad: Tensor) -> Tensor:
                if dense_wanted():
                    self.dense_passed = True
                    return grad
                return masked(name, grad)
            return hook

        self._handles = [p.register_hook(make(n)) for n, p in params.items()]

    def remove(self) -> None:
        """Take the hooks off (no gradient is masked by them after this)."""
        for h in self._handles:
            h.remove()
        self._handles = []


class FloatMasks:
    """Copies of small CPU masks in a gradient's dtype, so that masking such a layer is one float
    multiply (one ``_foreach_mul_`` over all of them in the local engine). A copy is remade when its
    mask tensor is another one or has changed (its version counter: every in-place write bumps it),
    or another dtype is asked for; so no engine has to announce mask changes to keep it current."""

    def __init__(self, below: int) -> None:
        self.below = below
        self._copies: dict[str, tuple[Tensor, int, Tensor]] = {}

    def get(self, name: str, mask: Tensor, like: Tensor) -> Tensor | None:
        """``mask`` in ``like``'s dtype (a cached copy), or None where the float path does not apply
        (a GPU, a large layer, a non-float tensor, another shape or device)."""
        if not (like.device.type == "cpu" and like.is_floating_point() and mask.numel() < self.below
                and mask.device == like.device and mask.shape == like.shape):
            return None
        got = self._copies.get(name)
        if got is None or got[0] is not mask or got[1] != mask._version or got[2].dtype != like.dtype:
            got = self._copies[name] = (mask, mask._version, mask.to(like.dtype))
        return got[2]

    def clear(self) -> None:
        self._copies = {}


class LocalEngine(WholeMasks):
    """Adapter for a model trained by a plain ``torch.optim`` optimizer in this process."""

    #: layers below this many elements keep a copy of their mask in the weight's dtype, and the
    #: gradients of all of them are masked by ONE ``torch._foreach_mul_`` per step (the per-layer
    #: dispatch, not the arithmetic, is what small layers cost); larger layers take the paths of
    #: :meth:`_masked_inplace`, with no mask-sized copy (ResNet-50 keeps 0.71M elements of copies).
    #: CPU only: on a GPU each layer's ``torch.where`` is one kernel and keeps an inf gradient at a
    #: masked position exactly 0 (a multiply makes it NaN; the trainer never steps on such gradients)
    FUSE_BELOW = 1 << 17

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self.model = model
        self.optimizer = unwrap_optimizer(optimizer)
        self._params: dict[str, nn.Parameter] = dict(model.named_parameters(remove_duplicate=True))
        self._pairs: list[tuple[nn.Parameter, Tensor]] = []
        self._mul = MaskMultiplier()
        self._float = FloatMasks(self.FUSE_BELOW)        # small CPU layers: masks in the gradient's dtype
        self._names: list[str] = []
        self._hooks: list = []
        self.dense_grad_wanted: Callable[[], bool] = lambda: True

    def _param(self, name: str) -> nn.Parameter:
        try:
            return self._params[name]
        except KeyError:
            raise KeyError(f"no parameter named {name!r} in the model") from None

    def bind(self, layers: Sequence[MaskedLayer], masks: Mapping[str, Tensor],
             dense_grad_wanted: Callable[[], bool] = lambda: True) -> None:
        self._pairs = [(self._param(l.name), masks[l.name]) for l in layers]
        self._names = [l.name for l in layers]
        self._float.clear()
        for name, (p, mask) in zip(self._names, self._pairs):
            self._mask_changed(name, mask)
            # allocate the CPU masking buffers and float copies now, not on a training step
            if self._mul.chunked(p):
                self._mul.buffer(p.dtype)
            self._float.get(name, mask, p)
        self.dense_grad_wanted = dense_grad_wanted

    def weight(self, name: str) -> Tensor:
        return self._param(name).detach()

    def dense_grad(self, name: str) -> Tensor | None:
        return self._param(name).grad

    def _mask_changed(self, name: str, mask: Tensor) -> None:
        """Every engine calls this where a layer's mask is (re)applied (bound, applied, updated): a
        hook for subclasses that track mask changes (the float copies follow by themselves)."""

    @torch.no_grad()
    def apply_mask(self, name: str, mask: Tensor) -> None:
        p = self._param(name)
        torch.where(mask, p, self._zero(p), out=p)
        self._mask_changed(name, mask)

    @torch.no_grad()
    def reset_optimizer_state(self, name: str, keep: Tensor) -> None:
        if self.optimizer is None:
            return
        param = self._param(name)
        for value in self.optimizer.state.get(param, {}).values():
            if isinstance(value, Tensor) and value.shape == param.shape:
                torch.where(keep, value, self._zero(value), out=value)

    def _zero(self, t: Tensor) -> Tensor:
        return self._mul.zero(t)

    @torch.no_grad()
    def apply_update(self, name: str, old: Tensor, new: Tensor, dropped: Tensor, grown: Tensor) -> None:
        """One process: only the changed positions are written (kept ones are untouched)."""
        p = self._param(name)
        zero_at(p.data, dropped)
        self._mask_changed(name, new)
        if self.optimizer is not None:
            changed = torch.cat([dropped, grown])
            for value in self.optimizer.state.get(p, {}).values():
                if isinstance(value, Tensor) and value.shape == p.shape:
                    zero_at(value, changed)
        faults.point("mask_update")

    def _masked_inplace(self, t: Tensor, mask: Tensor) -> None:
        """``t[~mask] = 0`` in place, with no mask-sized temporary (:class:`MaskMultiplier`)."""
        self._mul(t, mask, out=t)

    def _grad(self, param: nn.Parameter) -> Tensor | None:
        """The gradient this rank masks (FSDP2: its local shard)."""
        return param.grad

    @torch.no_grad()
    def mask_grads(self) -> None:
        grads, fmasks = [], []
        for name, (param, mask) in zip(self._names, self._pairs):
            g = self._grad(param)
            if g is None:
                continue
            fm = self._float.get(name, mask, g)
            if fm is not None:
                grads.append(g)
                fmasks.append(fm)
            else:
                self._masked_inplace(g, mask)
        if grads:
            torch._foreach_mul_(grads, fmasks)    # one call for all small layers (multiply: see _masked_inplace)

    @torch.no_grad()
    def mask_weights(self) -> None:
        for param, mask in self._pairs:
            self._masked_inplace(param.data, mask)

    def sync_masks(self, masks: Mapping[str, Tensor]) -> None:
        """One process: nothing to synchronise."""

    def check_masks(self, masks: Mapping[str, Tensor]) -> None:
        """One process: nothing to compare."""

    def optimizer_keeps_zeros(self) -> bool:
        return self.optimizer is None or type(self.optimizer) in ZERO_PRESERVING_OPTIMIZERS

    def add_post_step_hook(self, fn: Callable[[], None]) -> None:
        if self.optimizer is None:
            raise ValueError("re-zeroing weights after each step needs an optimizer")
        self._hooks.append(self.optimizer.register_step_post_hook(lambda *_: fn()))


def grad_scaler(cfg, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 runs scale the loss (DeepSpeed scales inside its engine)."""
    return torch.amp.GradScaler(device.type) if cfg.precision.dtype == "fp16" else None


class LocalRuntime:
    """One process; also the base of DDP (same optimizer, scaler and checkpoint files)."""

    name = "local"
    distributed = False           # needs a launcher and a process group
    keeps_channels_last = True    # model.channels_last weights survive the wrapping
    reset_state_on_load = True    # re-zero optimizer state under loaded masks (DeepSpeed: see there)

    @classmethod
    def create(cls, cfg, model: nn.Module, optimizer_fn: Callable[[nn.Module], torch.optim.Optimizer],
               device: torch.device) -> "LocalRuntime":
        """Wrap ``model`` (already on ``device``) as ``cfg`` (an ExperimentConfig) says."""
        return cls(model, optimizer_fn(model), device, grad_scaler(cfg, device))

    @classmethod
    def init_process_group(cls) -> bool:
        """Before the model is built: set up the processes' communication (nothing for one process);
        True when it made a process group."""
        return False

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 scaler: torch.amp.GradScaler | None = None) -> None:
        self.module, self.forward_model, self.optimizer = model, model, optimizer
        self.device, self.scaler = device, scaler
        self.rank, self.world = 0, 1

    # ------------------------------------------------------------------ sparsifier side
    def sparse_engine(self):
        return LocalEngine(self.module, self.optimizer)

    # ------------------------------------------------------------------ the step
    def no_sync(self, last: bool):
        return contextlib.nullcontext()

    def micro_step(self) -> None:
        """After the backward of a micro-batch that is not the last of the step."""

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's value of ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def start_step(self) -> None:
        """Before the first forward of a step."""

    def sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics): before evaluation, so that all
        ranks evaluate the model that rank 0 checkpoints."""

    def backward(self, loss: torch.Tensor, accum: int) -> None:
        scaled = loss / accum
        (self.scaler.scale(scaled) if self.scaler else scaled).backward()

    def before_sparsifier(self) -> None:
        """Unscale (AMP) the gradients before the sparsifier reads them."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)

    def clip_grads(self, max_norm: float | None) -> None:
        """``train.clip_grad_norm``, after the sparsifier masked the gradients: the norm is that of
        the update the optimizer applies (inactive entries are zero and count for nothing), on every
        engine. FSDP2's DTensor gradients give the norm over all shards."""
        if max_norm:
            nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)

    def _nonfinite(self, local=lambda g: g) -> torch.Tensor:
        """A 0-d bool tensor: is any of this rank's gradients (``local`` of each) not finite? One
        foreach-norm, no host sync."""
        grads = [local(p.grad) for p in self.module.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), dtype=torch.bool, device=self.device)
        return ~torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()

    def grads_finite(self) -> bool:
        """Are all gradients finite? (After all-reduce they are the same on every rank.)"""
        return not bool(self._nonfinite())

    def step(self, apply: bool) -> None:
        if apply:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def eval_batches(self, batches, input_shape: tuple[int, ...], input_dtype: torch.dtype = torch.float32):
        """The validation batches this rank evaluates (FSDP2: padded so every rank runs as many forwards)."""
        return batches

    # ------------------------------------------------------------------ collectives
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t``, stacked in rank order (a new leading dimension)."""
        return t[None]

    def stop_group(self):
        """The process group on which ranks agree to stop on a signal (CPU tensors: gloo)."""
        return None

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass

    # ------------------------------------------------------------------ checkpoints
    def list_checkpoints(self, ckpt_dir: pathlib.Path) -> list[pathlib.Path]:
        return ckpt.list_checkpoints(ckpt_dir)

    def save(self, state: dict[str, Any], ckpt_dir: pathlib.Path, step: int, keep_last: int) -> pathlib.Path:
        """Rank 0 writes one file (atomic) holding the model and optimizer too."""
        path = ckpt.checkpoint_path(ckpt_dir, step)
        if self.rank == 0:
            full = dict(state, model=self.module.state_dict(), optimizer=self.optimizer.state_dict(),
                        scaler=self.scaler.state_dict() if self.scaler else None)
            ckpt.save_atomic(full, path)
            ckpt.rotate(ckpt_dir, keep_last, path)
        self.barrier()
        return path

    def load(self, path: pathlib.Path) -> dict[str, Any]:
        state = ckpt.load(path)
        try:
            self.module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ckpt.CheckpointError(f"checkpoint {path} does not fit this model/optimizer (another model?): "
                                       f"{str(e).splitlines()[0]}") from None
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        return state
