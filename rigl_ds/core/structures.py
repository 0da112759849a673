"""Sparsity structures: how a layer's positions are grouped for selection, and how many stay active
per group. The registry here is the one place a structure's name is written; the YAML schema
(``sparsity.structure``), the sparsifier and ``rigl-ds plan`` read it.

Every structure cuts a layer's weight, flattened row-major (``weight.reshape(out, -1)``: for a conv,
one output channel's ``in_channels x kh x kw``), into equal groups of consecutive positions that
never cross a row, and keeps the same number active in every group:

* ``unstructured``: one group, the whole layer (the RigL paper);
* ``fan_in``: one group per output row, so every output neuron keeps the same number of inputs
  (constant fan-in, SRigL: Lasby et al., ICLR 2024); a layer condenses to dense (values, indices);
* ``"N:M"``: groups of M consecutive weights along a row, N active in each (2:4 along a linear
  layer's rows is what cuSPARSELt and ``torch.sparse.to_sparse_semi_structured`` accelerate; a
  conv's groups run along its flattened in_channels x kh x kw, which no exported format speeds up).

A weight stored (in, out) (Hugging Face's ``Conv1D``) is grouped as its transpose, along its input
dimension (``rigl_ds.core.sparsifier.group_shape``): a ``fan_in`` group is one of its columns.

Because groups never cross a row and FSDP2 shards by rows, a grouped selection is local to the rank
that holds the rows; only the whole-layer group spans ranks (and the groups of a weight stored
(in, out), which the sparsifier selects from the whole layer). The selection rule itself is
:func:`rigl_ds.core.selection.select_grouped`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

_PATTERNS: dict[str, tuple[str, Callable[[re.Match], "Structure"]]] = {}


def register_structure(kind: str, pattern: str, build: Callable[[re.Match], "Structure"]) -> None:
    """Make the structures whose YAML spelling fully matches ``pattern`` buildable by
    :func:`get_structure` (``kind`` names the family in messages and the README)."""
    if kind in _PATTERNS:
        raise ValueError(f"structure {kind!r} is already registered")
    _PATTERNS[kind] = (pattern, build)


def structure_kinds() -> tuple[str, ...]:
    """The registered structure families as users write them (``unstructured``, ``fan_in``, ``N:M``)."""
    return tuple(_PATTERNS)


def get_structure(text: str) -> "Structure":
    """The structure spelled ``text``; ValueError naming the allowed spellings."""
    if isinstance(text, str):
        for pattern, build in _PATTERNS.values():
            m = re.fullmatch(pattern, text.strip())
            if m:
                return build(m)
    raise ValueError(f"structure must be one of {', '.join(repr(k) for k in _PATTERNS)} "
                     f"(N and M integers, 0 < N < M), got {text!r}")


def row_length(shape: tuple[int, ...]) -> int:
    """The fan-in of a weight of ``shape``: the elements of one output row."""
    return math.prod(shape[1:]) if len(shape) > 1 else 1


class StructureError(ValueError):
    """A layer that a structure cannot hold; the message names the layer and how to exclude it."""


def _fix(name: str) -> str:
    module = name.rsplit(".", 1)[0] if "." in name else name
    return (f"exclude it (sparsity.exclude: [{module!r}]) or keep it dense "
            f"(sparsity.overrides: {{{module!r}: dense}})")


@dataclass(frozen=True)
class Structure:
    """The whole layer is one group (unstructured)."""

    name: str = "unstructured"

    def group_size(self, layer: str, shape: tuple[int, ...]) -> int:
        """Positions per group of a layer of ``shape`` (the group count is numel // this)."""
        return math.prod(shape)

    def count(self, layer: str, shape: tuple[int, ...], nnz: int) -> int:
        """The active count this structure gives a layer the distribution plans ``nnz`` for: a
        multiple of the group count. A dense layer stays dense. StructureError if impossible."""
        return nnz

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True)
class FanIn(Structure):
    """Every output row keeps the same number of active weights: nnz / rows rounded half up; a
    layer whose rows would keep none is an error."""

    name: str = "fan_in"

    def group_size(self, layer: str, shape: tuple[int, ...]) -> int:
        return row_length(shape)

    def count(self, layer: str, shape: tuple[int, ...], nnz: int) -> int:
        numel, rows = math.prod(shape), shape[0]
        if nnz == numel:
            return nnz
        per_row = min(row_length(shape), math.floor(nnz / rows + 0.5))     # half up
        if per_row == 0:
            raise StructureError(
                f"layer {layer!r} {tuple(shape)}: fan_in would keep 0 of its {row_length(shape)} inputs per output "
                f"(density {nnz / numel:.4g}); lower its sparsity with an override, or {_fix(layer)}")
        return per_row * rows


@dataclass(frozen=True)
class NM(Structure):
    """N of every M consecutive weights along a row are active (density exactly N/M)."""

    name: str = "N:M"
    n: int = 2
    m: int = 4

    def __post_init__(self) -> None:
        if not 0 < self.n < self.m:
            raise ValueError(f"structure N:M needs 0 < N < M, got {self.n}:{self.m}")

    def describe(self) -> str:
        return f"{self.n}:{self.m}"

    def group_size(self, layer: str, shape: tuple[int, ...]) -> int:
        row = row_length(shape)
        if row % self.m:
            raise StructureError(f"layer {layer!r} {tuple(shape)}: its rows of {row} weights do not split into "
                                 f"groups of M={self.m} ({self.describe()}); {_fix(layer)}")
        return self.m

    def count(self, layer: str, shape: tuple[int, ...], nnz: int) -> int:
        numel = math.prod(shape)
        if nnz == numel:
            return nnz
        self.group_size(layer, shape)
        groups = numel // self.m
        # the distribution's count may miss N/M by the rounding of a sparsity such as 0.666667 (2:3)
        if abs(nnz / numel - self.n / self.m) > 1e-6:
            raise StructureError(
                f"layer {layer!r} {tuple(shape)}: {self.describe()} keeps density {self.n / self.m:g} in every masked "
                f"layer, the sparsity settings give this layer {nnz} of {numel} weights ({nnz / numel:.4g}); set "
                f"sparsity: {1 - self.n / self.m:.6g} with distribution: uniform (ERK and other per-layer sparsities cannot be "
                f"{self.describe()}), or {_fix(layer)}")
        return groups * self.n


register_structure("unstructured", r"unstructured", lambda m: Structure())
register_structure("fan_in", r"fan_in", lambda m: FanIn())
register_structure("N:M", r"(\d+)\s*:\s*(\d+)", lambda m: NM(n=int(m.group(1)), m=int(m.group(2))))
