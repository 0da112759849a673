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

    name: str          # parameter name, e.g. "layer1.0.conv1.weight" or "blocks.0.attn.in_proj_weight"
    module_name: str   # e.g. "layer1.0.conv1"
    shape: tuple[int, ...]
    is_conv: bool
    is_linear: bool = False   # a linear map's weight (nv_rigl_imagenet's uniform keeps these dense)
    transposed: bool = False  # stored (in, out), as Hugging Face's Conv1D (GPT-2): fan-in is dim 0

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


#: nn.MultiheadAttention's projection weights, all (out, in): fused Q/K/V, or separate ones
ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2's projections: a linear map whose weight is stored (in, out)),
    recognised without importing transformers, also when FSDP2's ``fully_shard`` has swapped its
    class for a subclass (``FSDPConv1D``), or ZeRO-3 has partitioned its weight (full shape in ``ds_shape``)."""
    w = getattr(module, "weight", None)
    return any(c.__name__ == "Conv1D" for c in type(module).__mro__) and hasattr(module, "nf") and \
        isinstance(w, nn.Parameter) and len(getattr(w, "ds_shape", None) or w.shape) == 2


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _by_type(module: nn.Module) -> tuple[str, ...]:
    """The parameters of ``module`` masked by default."""
    if isinstance(module, DEFAULT_MASKED_TYPES) or is_hf_conv1d(module):
        return ("weight",)
    if isinstance(module, nn.MultiheadAttention):
        return tuple(a for a in ATTENTION_WEIGHTS if isinstance(getattr(module, a, None), nn.Parameter))
    return ()


def output_embeddings(model: nn.Module) -> nn.Module | None:
    """The LM head, where the model says which it is (Hugging Face's ``get_output_embeddings``)."""
    get = getattr(model, "get_output_embeddings", None)
    if not callable(get) and isinstance(getattr(model, "module", None), nn.Module):
        get = getattr(model.module, "get_output_embeddings", None)      # a wrapper (DDP): the model inside
    if not callable(get):
        return None
    try:
        head = get()
    except (NotImplementedError, AttributeError):
        return None
    return head if isinstance(head, nn.Module) else None


def select_layers(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[MaskedLayer]:
    """Return the masked weights of ``model`` in registration order.

    By default these are masked: the ``weight`` of every ``nn.Conv1d/2d/3d`` and ``nn.Linear`` and of
    Hugging Face's ``Conv1D`` (GPT-2; stored (in, out)), and ``nn.MultiheadAttention``'s projections
    (``in_proj_weight``, fused Q/K/V, or ``q/k/v_proj_weight``; its ``out_proj`` is a Linear). The
    LM head a model names with ``get_output_embeddings()`` stays dense, and so does a weight tied to
    a module not masked (an embedding): a tied weight is one layer, masked once. ``include`` is a
    list of globs that *adds* weights: a module name adds that module's ``weight`` (an embedding,
    say), a parameter name adds that parameter (``*.in_proj_weight``); ``exclude`` removes by
    module or parameter name. Norms, biases and embeddings are never masked unless ``include``
    names them.
    """
    include = list(include or [])
    exclude = list(exclude or [])
    head = output_embeddings(model)

    def eligible(module_name: str, module: nn.Module, attr: str) -> bool:
        pname = f"{module_name}.{attr}" if module_name else attr
        by_type = attr in _by_type(module) and module is not head
        by_glob = bool(include) and (_matches(pname, include) or (attr == "weight" and _matches(module_name, include)))
        if not (by_type or by_glob):
            return False
        return not (exclude and (_matches(module_name, exclude) or _matches(pname, exclude)))

    # Parameter names as named_parameters() gives them (first name of a shared tensor), and every
    # (module, attribute) holding each parameter: a weight tied to an ineligible module (an LM head
    # tied to an embedding, say) is not masked unless that module is listed too.
    first_name = {id(p): n for n, p in reversed(list(model.named_parameters(remove_duplicate=False)))}
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((module_name, module, attr))

    layers: list[MaskedLayer] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            if id(param) in seen or not all(eligible(n, m, a) for n, m, a in owners[id(param)]):
                continue
            pname = first_name[id(param)]
            # a ZeRO-3 partitioned parameter keeps its full shape in ``ds_shape``
            shape = tuple(getattr(param, "ds_shape", None) or param.shape)
            if len(shape) < 2:
                raise ValueError(
                    f"cannot mask {pname!r}: its shape is {shape}, masks need a weight of at least 2 "
                    "dimensions (remove it from 'include')"
                )
            seen.add(id(param))
            owner_name = pname.rsplit(".", 1)[0] if "." in pname else ""
            layers.append(
                MaskedLayer(
                    name=pname,
                    module_name=owner_name,
                    shape=shape,
                    is_conv=isinstance(module, nn.modules.conv._ConvNd),
                    is_linear=isinstance(module, (nn.Linear, nn.MultiheadAttention)) or is_hf_conv1d(module),
                    transposed=is_hf_conv1d(module),
                )
            )
    if include:
        owned = [(n, f"{n}.{a}" if n else a) for entries in owners.values() for n, _, a in entries]
        unused = [p for p in include
                  if not any(_matches(w, [p]) or (w.endswith(".weight") and _matches(n, [p])) for n, w in owned)]
        if unused:
            raise ValueError(f"include patterns {unused} match no module or parameter of the model")
    return layers
