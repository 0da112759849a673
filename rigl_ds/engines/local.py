"""Plain PyTorch engine: one process, or any wrapper whose ``param.grad`` already holds the
rank-averaged gradient after backward (DDP). Moves tensors only; decides nothing about masks."""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from rigl_ds.core.layers import MaskedLayer

#: Optimizers measured (tests/unit/test_zeros_under_mask.py) to keep a weight exactly at 0 when
#: its gradient and every state slot are 0: plain, foreach and fused variants, with and without
#: momentum, nesterov, (decoupled) weight decay and amsgrad.
ZERO_PRESERVING_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


class LocalEngine:
    """Adapter for a model trained by a plain ``torch.optim`` optimizer in this process."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self.model = model
        self.optimizer = optimizer
        self._params: dict[str, nn.Parameter] = dict(model.named_parameters(remove_duplicate=True))
        self._pairs: list[tuple[nn.Parameter, Tensor]] = []
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
        self._layers = list(layers)
        self._masks = masks
        self.dense_grad_wanted = dense_grad_wanted

    def weight(self, name: str) -> Tensor:
        return self._param(name).detach()

    def dense_grad(self, name: str) -> Tensor | None:
        return self._param(name).grad

    @torch.no_grad()
    def apply_mask(self, name: str, mask: Tensor) -> None:
        self._param(name).mul_(mask)

    @torch.no_grad()
    def reset_optimizer_state(self, name: str, keep: Tensor) -> None:
        if self.optimizer is None:
            return
        param = self._param(name)
        for value in self.optimizer.state.get(param, {}).values():
            if isinstance(value, Tensor) and value.shape == param.shape:
                value.mul_(keep)

    @torch.no_grad()
    def mask_grads(self) -> None:
        for param, mask in self._pairs:
            if param.grad is not None:
                param.grad.mul_(mask)

    @torch.no_grad()
    def mask_weights(self) -> None:
        for param, mask in self._pairs:
            param.mul_(mask)

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
