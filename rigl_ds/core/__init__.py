"""Pure sparse-training core: decides masks. Imports neither torch.distributed, DeepSpeed nor DALI."""
from .distributions import (DISTRIBUTIONS, achieved_density, er, erk, get_distribution, nnz_for, uniform,
                            uniform_nv)
from .engine import Engine
from .flops import ForwardFlops, forward_flops, timeline_flops_ratio, training_flops_ratio
from .layers import MaskedLayer, select_layers
from .schedule import UpdateSchedule
from .methods import DENSE, get_method, method_names, register_method
from .selection import drop_and_grow, random_mask, select_changes, update_mask
from .sparsifier import SET, RigL, Sparsifier, SparsityConfig, Static, build_sparsifier
from .gmp import GMP     # registers "gmp": a new method is one file and one such import

__all__ = [
    "DENSE", "DISTRIBUTIONS", "Engine", "ForwardFlops", "GMP", "MaskedLayer", "RigL", "SET", "Sparsifier",
    "SparsityConfig", "Static", "UpdateSchedule", "achieved_density", "build_sparsifier",
    "drop_and_grow", "er", "erk", "forward_flops", "get_distribution", "get_method", "method_names",
    "nnz_for", "random_mask", "register_method", "select_changes", "select_layers", "timeline_flops_ratio",
    "training_flops_ratio", "uniform", "uniform_nv", "update_mask",
]
