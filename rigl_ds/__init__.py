"""rigl_ds: RigL sparse training as a plugin for plain PyTorch, DDP, DeepSpeed and FSDP2."""
from . import engines
from .core import (
    GMP,
    SET,
    RigL,
    Sparsifier,
    SparsityConfig,
    Static,
    build_sparsifier,
    forward_flops,
    training_flops_ratio,
)

__version__ = "0.1.0"
__all__ = ["GMP", "RigL", "SET", "Static", "Sparsifier", "SparsityConfig", "build_sparsifier", "engines",
           "forward_flops", "training_flops_ratio", "__version__"]
