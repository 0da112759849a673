"""Pure sparse-training core: decides masks. Imports neither torch.distributed, DeepSpeed nor DALI."""
from .distributions import (DISTRIBUTIONS, achieved_density, er, erk, get_distribution, nnz_for, uniform,
                            uniform_nv)
from .engine import Engine
from .flops import ForwardFlops, forward_flops, timeline_flops_ratio, training_flops_ratio
from .layers import MaskedLayer, select_layers
from .schedule import UpdateSchedule
from .methods import DENSE, get_method, method_names, register_method
from .selection import Change, drop_and_grow, random_mask, select_changes, select_grouped, update_mask
from .structures import Structure, StructureError, get_structure, register_structure, structure_kinds
from .sparsifier import SET, LayerPlan, RigL, Sparsifier, SparsityConfig, Static, build_sparsifier, plan_layers
from .gmp import GMP     # registers "gmp": a new method is one file and one such import
from .gap import GaPCyclic, GaPParallel  # registers "gap_cyclic", "gap_parallel"

__all__ = [
    "Change", "DENSE", "DISTRIBUTIONS", "Engine", "ForwardFlops", "GMP", "GaPCyclic", "GaPParallel", "LayerPlan", "MaskedLayer", "RigL",
    "SET", "Sparsifier", "SparsityConfig", "Static", "Structure", "StructureError", "UpdateSchedule",
    "achieved_density", "build_sparsifier", "drop_and_grow", "er", "erk", "forward_flops", "get_distribution",
    "get_method", "get_structure", "method_names", "nnz_for", "plan_layers", "random_mask", "register_method",
    "register_structure", "select_changes", "select_grouped", "select_layers", "structure_kinds",
    "timeline_flops_ratio", "training_flops_ratio", "uniform", "uniform_nv", "update_mask",
]
