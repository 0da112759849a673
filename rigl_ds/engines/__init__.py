"""Thin adapters between training engines and the core: they move tensors, never decide masks.

``DDPEngine``, ``DeepSpeedEngineAdapter`` and ``FSDP2Engine`` import torch.distributed / DeepSpeed when used.
"""
from .local import LocalEngine

__all__ = ["LocalEngine", "DDPEngine", "DeepSpeedEngineAdapter", "FSDP2Engine"]


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
