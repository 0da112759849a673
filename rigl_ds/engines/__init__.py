"""Thin adapters between training engines and the core: they move tensors, never decide masks.

``DDPEngine`` and ``DeepSpeedEngineAdapter`` import torch.distributed / DeepSpeed when used.
"""
from .local import LocalEngine

__all__ = ["LocalEngine", "DDPEngine", "DeepSpeedEngineAdapter"]


def __getattr__(name: str):
    if name == "DDPEngine":
        from .ddp import DDPEngine

        return DDPEngine
    if name == "DeepSpeedEngineAdapter":
        from .deepspeed import DeepSpeedEngineAdapter

        return DeepSpeedEngineAdapter
    raise AttributeError(name)
