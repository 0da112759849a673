"""Per-layer sparsity distributions: ``uniform``, ``uniform_nv``, ``er`` and ``erk`` (SPEC §1–§2).

Every distribution is a pure function with one signature::

    fn(layers, sparsity, *, overrides=None, power_scale=1.0) -> {layer name: density}

where density = fraction of weights kept. The number of zeros of a layer is always
``floor(sparsity_l * numel)`` (SPEC §3), see :func:`nnz_for`.
"""
from __future__ import annotations

import fnmatch
import math
from typing import Callable, Mapping, Sequence, Union

from .layers import MaskedLayer

Override = Union[float, str]   # a sparsity in [0, 1], or "dense"
DISTRIBUTIONS = ("uniform", "uniform_nv", "er", "erk")


def _check_sparsity(value: float, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= float(value) < 1.0) \
            or math.isnan(float(value)):
        raise ValueError(f"{where}: sparsity must be a number in [0, 1), got {value!r}")
    return float(value)


def resolve_overrides(
    layers: Sequence[MaskedLayer], overrides: Mapping[str, Override] | None
) -> dict[str, float]:
    """Map layer name -> fixed sparsity for layers matched by an override (name or glob).

    A pattern matches the parameter name or the module name. ``"dense"`` means sparsity 0. The
    first matching pattern (in mapping order) wins. A pattern that matches no layer is an error.
    """
    fixed: dict[str, float] = {}
    if not overrides:
        return fixed
    for pattern, value in overrides.items():
        if isinstance(value, str):
            if value != "dense":
                raise ValueError(
                    f"overrides[{pattern!r}]: expected a sparsity in [0, 1) or 'dense', got {value!r}")
            sparsity = 0.0
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or math.isnan(float(value)) or not 0.0 <= float(value) <= 1.0:
                raise ValueError(
                    f"overrides[{pattern!r}]: expected a sparsity in [0, 1] or 'dense', got {value!r}")
            sparsity = float(value)
        hit = False
        for layer in layers:
            if fnmatch.fnmatchcase(layer.name, pattern) or fnmatch.fnmatchcase(layer.module_name, pattern):
                hit = True
                fixed.setdefault(layer.name, sparsity)
        if not hit:
            names = ", ".join(l.name for l in layers[:8]) + (" ..." if len(layers) > 8 else "")
            raise ValueError(f"overrides[{pattern!r}] matches no masked layer (layers: {names})")
    return fixed


def _uniform(layers: Sequence[MaskedLayer], sparsity: float, overrides: Mapping[str, Override] | None,
             dense: Callable[[MaskedLayer], bool]) -> dict[str, float]:
    fixed = resolve_overrides(layers, overrides)
    return {l.name: 1.0 - fixed[l.name] if l.name in fixed else (1.0 if dense(l) else 1.0 - sparsity)
            for l in layers}


def _first_conv(layers: Sequence[MaskedLayer]) -> str | None:
    return next((l.name for l in layers if l.is_conv), None)


def uniform(
    layers: Sequence[MaskedLayer],
    sparsity: float,
    *,
    overrides: Mapping[str, Override] | None = None,
    power_scale: float = 1.0,
) -> dict[str, float]:
    """google-research/rigl's uniform: every layer at ``sparsity`` except the first conv, which
    stays dense; the final linear layer is sparse (official ``last_layer_sparsity=-1``, SPEC §1)."""
    del power_scale  # same signature as the other distributions
    first = _first_conv(layers)
    return _uniform(layers, _check_sparsity(sparsity, "uniform"), overrides, lambda l: l.name == first)


def uniform_nv(
    layers: Sequence[MaskedLayer],
    sparsity: float,
    *,
    overrides: Mapping[str, Override] | None = None,
    power_scale: float = 1.0,
) -> dict[str, float]:
    """nv_rigl_imagenet's uniform, which trained the table's uniform rows (its ``RigLScheduler``
    with the default ``ignore_linear_layers=True``): the first conv and every ``nn.Linear`` stay
    dense, every other layer is at ``sparsity`` (SPEC §1). For ResNet-50: conv1 and fc dense."""
    del power_scale
    first = _first_conv(layers)
    return _uniform(layers, _check_sparsity(sparsity, "uniform_nv"), overrides,
                    lambda l: l.name == first or l.is_linear)


def _raw_erk(shape: tuple[int, ...]) -> float:
    return sum(shape) / math.prod(shape)


def _raw_er(shape: tuple[int, ...]) -> float:
    n_out, n_in = shape[0], shape[1]
    return (n_in + n_out) / (n_in * n_out)


def _solve(
    layers: Sequence[MaskedLayer],
    sparsity: float,
    overrides: Mapping[str, Override] | None,
    power_scale: float,
    raw_fn: Callable[[tuple[int, ...]], float],
) -> dict[str, float]:
    """Solve eps with sum_l min(1, eps*raw_l) * n_l = (1-S) * sum_l n_l over the non-override layers.

    As the official code (``sparse_utils.get_sparsities_erdos_renyi``): while the largest
    eps*raw_l exceeds 1, the layer(s) with the largest raw_l are made dense and eps is solved
    again. Making all offending layers dense at once gives the same fixpoint, since eps only
    grows as layers turn dense.
    """
    if not (isinstance(power_scale, (int, float)) and power_scale >= 0 and math.isfinite(power_scale)):
        raise ValueError(f"erk_power_scale must be a finite number >= 0, got {power_scale!r}")
    fixed = resolve_overrides(layers, overrides)
    solve = [l for l in layers if l.name not in fixed]
    dense: set[str] = set()
    raw = {l.name: raw_fn(l.shape) ** power_scale for l in solve}
    eps = 0.0
    while True:
        rhs = 0.0
        divisor = 0.0
        for l in solve:
            n = l.numel
            if l.name in dense:
                rhs -= n * sparsity
            else:
                rhs += n * (1.0 - sparsity)
                divisor += raw[l.name] * n
        if divisor == 0.0:
            break
        eps = rhs / divisor
        free = [raw[l.name] for l in solve if l.name not in dense]
        max_raw = max(free)
        if eps * max_raw > 1.0:
            dense.update(l.name for l in solve if l.name not in dense and raw[l.name] == max_raw)
        else:
            break
    out: dict[str, float] = {}
    for l in layers:
        if l.name in fixed:
            out[l.name] = 1.0 - fixed[l.name]
        elif l.name in dense:
            out[l.name] = 1.0
        else:
            out[l.name] = eps * raw[l.name]
    return out


def erk(
    layers: Sequence[MaskedLayer],
    sparsity: float,
    *,
    overrides: Mapping[str, Override] | None = None,
    power_scale: float = 1.0,
) -> dict[str, float]:
    """Erdős–Rényi-Kernel: density_l proportional to (sum(shape)/prod(shape))**power_scale."""
    return _solve(layers, _check_sparsity(sparsity, "erk"), overrides, power_scale, _raw_erk)


def er(
    layers: Sequence[MaskedLayer],
    sparsity: float,
    *,
    overrides: Mapping[str, Override] | None = None,
    power_scale: float = 1.0,
) -> dict[str, float]:
    """Erdős–Rényi: density_l proportional to (n_in + n_out)/(n_in * n_out); kernel dims ignored."""
    return _solve(layers, _check_sparsity(sparsity, "er"), overrides, power_scale, _raw_er)


_BY_NAME: dict[str, Callable[..., dict[str, float]]] = {"uniform": uniform, "uniform_nv": uniform_nv, "er": er,
                                                         "erk": erk}


def get_distribution(name: str) -> Callable[..., dict[str, float]]:
    """Look a distribution up by name; unknown names list the allowed ones."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown distribution {name!r}; allowed: {', '.join(DISTRIBUTIONS)}") from None


def nnz_for(numel: int, density: float) -> int:
    """Active weights of a layer: numel - floor(sparsity * numel) with sparsity = 1 - density (SPEC §3).

    The floor is taken with a tolerance of 1e-6 of one weight: densities arrive as ``1 - s``, and
    ``1 - (1 - s)`` can land a hair below ``s`` in binary (0.7 -> 0.69999999999999996), which would
    floor an exact product such as 0.7 * 10 = 7 zeros down to 6. With a sparsity of at most 6
    decimal digits, s * numel is an integer or at least 1e-6 away from one, so the tolerance only
    undoes round-off (ERK densities are real numbers; for them it moves no practical count).
    """
    sparsity = 1.0 - density
    zeros = math.floor(sparsity * numel + 1e-6)
    return numel - min(max(zeros, 0), numel)


def achieved_density(layers: Sequence[MaskedLayer], densities: Mapping[str, float]) -> float:
    """Global density after flooring each layer's zeros: sum nnz / sum numel."""
    total = sum(l.numel for l in layers)
    if total == 0:
        return 1.0
    return sum(nnz_for(l.numel, densities[l.name]) for l in layers) / total
