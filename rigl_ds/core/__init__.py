"""Pure sparse-training core: decides masks. Imports neither torch.distributed, DeepSpeed nor DALI."""
from .distributions import (DISTRIBUTIONS, achieved_density, er, erk, get_distribution, nnz_for, uniform,
                            uniform_nv)
from .engine import Engine
from .flops import ForwardFlops, forward_flops, training_flops_ratio
from .layers import MaskedLayer, select_layers
from .schedule import UpdateSchedule
from .selection import drop_and_grow, random_mask, update_mask
from .sparsifier import METHODS, SET, RigL, Sparsifier, SparsityConfig, Static, build_sparsifier

__all__ = [
    "DISTRIBUTIONS", "METHODS", "Engine", "ForwardFlops", "MaskedLayer", "RigL", "SET", "Sparsifier",
    "SparsityConfig", "Static", "UpdateSchedule", "achieved_density", "build_sparsifier",
    "drop_and_grow", "er", "erk", "forward_flops", "get_distribution", "nnz_for", "random_mask",
    "select_layers", "training_flops_ratio", "uniform", "uniform_nv", "update_mask",
]
