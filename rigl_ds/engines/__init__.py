"""Thin adapters between training engines and the core: they move tensors, never decide masks."""
from .local import LocalEngine

__all__ = ["LocalEngine"]
