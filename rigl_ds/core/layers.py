"""Which tensors of a model get a mask (SPEC §1)."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable, Sequence

from torch import nn

#: Module types whose ``weight`` is masked by default.
DEFAULT_MASKED_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class MaskedLayer:
    """One masked weight: its parameter name in the model, the owning module's name, its shape."""

    name: str          # parameter name, e.g. "layer1.0.conv1.weight"
    module_name: str   # e.g. "layer1.0.conv1"
    shape: tuple[int, ...]
    is_conv: bool
    is_linear: bool = False   # an nn.Linear weight (nv_rigl_imagenet's uniform keeps these dense)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_layers(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[MaskedLayer]:
    """Return the masked weights of ``model`` in registration order.

    By default the ``weight`` of every ``nn.Conv1d/2d/3d`` and ``nn.Linear`` is masked. ``include``
    is a list of module-name globs that *adds* the ``weight`` of any other module (an embedding,
    say); ``exclude`` removes modules by module-name glob. Norms, biases and embeddings are never
    masked unless ``include`` names them. A glob matches the module name (``layer1.*``) or the
    parameter name (``layer1.0.conv1.weight``).
    """
    include = list(include or [])
    exclude = list(exclude or [])

    def eligible(module_name: str, module: nn.Module) -> bool:
        pname = f"{module_name}.weight" if module_name else "weight"
        by_type = isinstance(module, DEFAULT_MASKED_TYPES)
        by_glob = bool(include) and (_matches(module_name, include) or _matches(pname, include))
        if not (by_type or by_glob):
            return False
        return not (exclude and (_matches(module_name, exclude) or _matches(pname, exclude)))

    # Parameter names as named_parameters() gives them (first name of a shared tensor), and
    # every module owning each weight: a weight tied to an ineligible module (an LM head tied to
    # an embedding, say) is not masked unless that module is listed too.
    first_name = {id(p): n for n, p in reversed(list(model.named_parameters(remove_duplicate=False)))}
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            owners.setdefault(id(weight), []).append((module_name, module))

    layers: list[MaskedLayer] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or id(weight) in seen:
            continue
        if not all(eligible(n, m) for n, m in owners[id(weight)]):
            continue
        pname = first_name[id(weight)]
        # a ZeRO-3 partitioned parameter keeps its full shape in ``ds_shape``
        shape = tuple(getattr(weight, "ds_shape", None) or weight.shape)
        if len(shape) < 2:
            raise ValueError(
                f"cannot mask {pname!r}: its weight has shape {shape}, masks need a "
                "weight of at least 2 dimensions (remove it from 'include')"
            )
        seen.add(id(weight))
        owner_name = pname.rsplit(".", 1)[0] if "." in pname else ""
        layers.append(
            MaskedLayer(
                name=pname,
                module_name=owner_name,
                shape=shape,
                is_conv=isinstance(module, nn.modules.conv._ConvNd),
                is_linear=isinstance(module, nn.Linear),
            )
        )
    if include:
        owned = [(n, f"{n}.weight") for entries in owners.values() for n, _ in entries]
        unused = [p for p in include if not any(_matches(n, [p]) or _matches(w, [p]) for n, w in owned)]
        if unused:
            raise ValueError(f"include patterns {unused} match no module with a weight in the model")
    return layers
