"""Plain PyTorch engine: one process, or any wrapper whose ``param.grad`` already holds the
rank-averaged gradient after backward (DDP). Moves tensors only; decides nothing about masks."""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

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


class LocalEngine(WholeMasks):
    """Adapter for a model trained by a plain ``torch.optim`` optimizer in this process."""

    CHUNK = 1 << 18      # elements per step of the CPU masking loop (1 MiB float32 buffer)
    SMALL = 1 << 15      # below this, one torch.where call costs less than the chunk loop

    def _buffer(self, dtype: torch.dtype) -> Tensor:
        buf = self._buffers.get(dtype)
        if buf is None:
            buf = self._buffers[dtype] = torch.empty(self.CHUNK, dtype=dtype)
        return buf

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self.model = model
        self.optimizer = optimizer
        self._params: dict[str, nn.Parameter] = dict(model.named_parameters(remove_duplicate=True))
        self._pairs: list[tuple[nn.Parameter, Tensor]] = []
        self._zeros: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        self._buffers: dict[torch.dtype, Tensor] = {}     # CPU: one CHUNK-sized buffer per dtype
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
        for p, _ in self._pairs:     # allocate the CPU masking buffers now, not on a training step
            if p.device.type == "cpu" and p.is_floating_point() and p.numel() >= self.SMALL:
                self._buffer(p.dtype)
        self.dense_grad_wanted = dense_grad_wanted

    def weight(self, name: str) -> Tensor:
        return self._param(name).detach()

    def dense_grad(self, name: str) -> Tensor | None:
        return self._param(name).grad

    @torch.no_grad()
    def apply_mask(self, name: str, mask: Tensor) -> None:
        p = self._param(name)
        torch.where(mask, p, self._zero(p), out=p)

    @torch.no_grad()
    def reset_optimizer_state(self, name: str, keep: Tensor) -> None:
        if self.optimizer is None:
            return
        param = self._param(name)
        for value in self.optimizer.state.get(param, {}).values():
            if isinstance(value, Tensor) and value.shape == param.shape:
                torch.where(keep, value, self._zero(value), out=value)

    def _zero(self, t: Tensor) -> Tensor:
        key = (t.dtype, t.device)
        z = self._zeros.get(key)
        if z is None:
            z = self._zeros[key] = torch.zeros((), dtype=t.dtype, device=t.device)
        return z

    @torch.no_grad()
    def apply_update(self, name: str, old: Tensor, new: Tensor, dropped: Tensor, grown: Tensor) -> None:
        """One process: only the changed positions are written (kept ones are untouched)."""
        p = self._param(name)
        zero_at(p.data, dropped)
        if self.optimizer is not None:
            changed = torch.cat([dropped, grown])
            for value in self.optimizer.state.get(p, {}).values():
                if isinstance(value, Tensor) and value.shape == p.shape:
                    zero_at(value, changed)
        faults.point("mask_update")

    def _masked_inplace(self, t: Tensor, mask: Tensor) -> None:
        """``t[~mask] = 0`` in place, with no mask-sized temporary.

        On CUDA one ``torch.where(..., out=t)``. On CPU, bool kernels are not vectorised
        (``where`` and bool->float copies run ~6x slower than a float multiply, see
        benchmarks/README.md), so the mask is read as uint8, widened chunk by chunk into a small
        reusable buffer and multiplied in. (Multiplying keeps a NaN/inf gradient at a masked
        position as NaN; such a step is skipped by a GradScaler anyway.)
        """
        n = t.numel()
        if n < self.SMALL or t.device.type != "cpu" or not (t.is_contiguous() and mask.is_contiguous()) \
                or not t.is_floating_point():
            torch.where(mask, t, self._zero(t), out=t)
            return
        flat, m8 = t.view(-1), mask.view(-1).view(torch.uint8)
        buf = self._buffer(t.dtype)
        for i in range(0, n, self.CHUNK):
            c = min(self.CHUNK, n - i)
            b = buf[:c]
            b.copy_(m8[i:i + c])
            flat[i:i + c].mul_(b)

    @torch.no_grad()
    def mask_grads(self) -> None:
        for param, mask in self._pairs:
            g = param.grad
            if g is not None:
                self._masked_inplace(g, mask)

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
