"""Backends: one file each, moving tensors between a training engine and the core; they never
decide anything about masks.

Each backend file holds its core :class:`~rigl_ds.core.engine.Engine` (weights, gradients,
optimizer state, masks at given positions) and its runtime (what the training loop drives: wrap,
backward, step, collectives, checkpoints). The loop finds the runtime by ``engine.name`` in
:data:`BACKENDS` and never names a backend; a new one (Megatron, Accelerate, ...) is a file and a
line here. Only ``local`` is imported eagerly: the others import torch.distributed / DeepSpeed.
"""
from __future__ import annotations

import importlib


class EngineError(ValueError):
    """An engine that cannot be set up as configured; the message names the setting."""


#: engine.name -> "module:runtime class"
BACKENDS: dict[str, str] = {
    "local": "rigl_ds.engines.local:LocalRuntime",
    "ddp": "rigl_ds.engines.ddp:DDPRuntime",
    "deepspeed": "rigl_ds.engines.deepspeed:DeepSpeedRuntime",
    "fsdp2": "rigl_ds.engines.fsdp2:FSDP2Runtime",
}


def engine_names() -> tuple[str, ...]:
    return tuple(BACKENDS)


def get_backend(name: str):
    """The runtime class of a backend (its module imported now)."""
    try:
        module, cls = BACKENDS[name].split(":")
    except KeyError:
        raise EngineError(f"unknown engine {name!r}; allowed: {', '.join(BACKENDS)}") from None
    return getattr(importlib.import_module(module), cls)


from .local import LocalEngine  # noqa: E402

__all__ = ["BACKENDS", "DDPEngine", "DeepSpeedEngineAdapter", "EngineError", "FSDP2Engine", "LocalEngine",
           "engine_names", "get_backend"]


def __getattr__(name: str):
    if name == "DDPEngine":
        from .ddp import DDPEngine

        return DDPEngine
    if name == "DeepSpeedEngineAdapter":
        from .deepspeed import DeepSpeedEngineAdapter

        return DeepSpeedEngineAdapter
    if name == "FSDP2Engine":
        from .fsdp2 import FSDP2Engine

        return FSDP2Engine
    raise AttributeError(name)
