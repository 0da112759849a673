"""Export a trained sparse model for inference: ``rigl-ds export`` and :func:`export`.

Formats (``FORMATS``):

* ``dense``: the model's plain state dict with every masked weight exactly 0, one safetensors file;
  the original model class loads it with ``load_state_dict(strict=True)``.
* ``condensed``: every masked ``nn.Linear`` becomes a :class:`CondensedLinear` that stores, per
  output row, only its active weights and their input indices (constant fan-in, SRigL), and
  computes only those: a fan_in-trained layer condenses exactly; any other mask is padded to its
  largest row count (padding entries hold weight 0). Convolutions stay dense (masked): no speed-up.
  On a CPU, at small batches, it runs rigl_ds's gather kernel (int16 indices, built on first
  use; :mod:`rigl_ds.kernels`), else torch's CSR kernel over the same arrays.
* ``csr``: every masked ``nn.Linear`` becomes a :class:`CSRLinear` (torch's CSR sparse matmul, CPU).
* ``semi_structured``: every 2:4 ``nn.Linear`` uses torch's semi-structured sparse tensor
  (cuSPARSELt / CUTLASS), in fp16 on CUDA; on a machine without a GPU, a clear error. Not yet run
  on a GPU.

Every format is one safetensors file (no pickle: loading runs no code), with the format and the
replaced layers in its metadata. :func:`load_exported` rebuilds the exported model from the
original one. The tests check the outputs of dense, condensed and csr against the masked dense
model (1e-5, fp32). Only plain ``nn.Linear`` modules and Hugging Face's ``Conv1D`` (GPT-2; the same
map with its weight stored transposed) are replaced (a Linear subclass's owner may use its weight
directly, as ``nn.MultiheadAttention`` does with ``out_proj``); the replacements still offer a
dense ``.weight`` on demand for owners that inspect it (``nn.TransformerEncoderLayer``), in the
Linear's (out, in) layout, also where they replaced a Conv1D (whose own weight is (in, out)).
``semi_structured`` does not take Conv1D layers yet (an error naming the layer).
"""
from __future__ import annotations

import json
import logging
import pathlib
import warnings
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rigl_ds import kernels

logger = logging.getLogger(__name__)

FORMATS = ("dense", "condensed", "csr", "semi_structured")
_META_KEY = "rigl_ds"


class ExportError(ValueError):
    """An export that cannot be made; the message names the value, the allowed ones and the source."""


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=True)


def _stale(view: Tensor | None, values: Tensor) -> bool:
    """Is a cached CSR view unusable now: none yet, on another device, or made under
    ``torch.inference_mode`` while autograd may now record it (an inference tensor cannot be)."""
    return view is None or view.device != values.device or (view.is_inference()
                                                            and not torch.is_inference_mode_enabled())


def _sparse_linear(x: Tensor, weight: Tensor, bias: Tensor | None, in_features: int, out_features: int) -> Tensor:
    """``F.linear`` with a CSR weight: one sparse-dense ``addmm`` (MKL on x86 CPUs) on x^T."""
    lead = x.shape[:-1]
    xt = x.reshape(-1, in_features).t()
    y = torch.mm(weight, xt) if bias is None else torch.addmm(bias.unsqueeze(1), weight, xt)
    return y.t().reshape(*lead, out_features)


class CondensedLinear(nn.Module):
    """A linear layer that keeps ``fan_in`` weights per output row: ``y[o] = b[o] + sum_j values[o, j]
    * x[indices[o, j]]`` (constant fan-in, SRigL). Only the active weights and their input indices
    are stored and read: int16 indices when the layer has at most 32768 inputs, else int32 (at 90%
    sparsity 0.15 of a dense layer's bytes).

    On a CPU, fp32, a single input row (``KERNEL_MAX_ROWS``) runs rigl_ds's gather kernel
    (:mod:`rigl_ds.kernels`, built on first use); larger batches, other devices and dtypes, an input
    that needs a gradient, or a machine where the kernel cannot be built run torch's CSR ``addmm``
    over the same arrays. The output carries no gradient to ``values`` (an inference layer)."""

    KERNEL_MAX_ROWS = 1     # measured (benchmarks/README.md): at 2 rows and more, MKL's CSR kernel wins

    def __init__(self, in_features: int, out_features: int, fan_in: int, bias: bool = True,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features, self.fan_in = in_features, out_features, fan_in
        self.values = nn.Parameter(torch.zeros(out_features, fan_in, dtype=dtype))
        index_dtype = torch.int16 if in_features <= 2 ** 15 else torch.int32
        self.register_buffer("indices", torch.arange(fan_in, dtype=index_dtype).repeat(out_features, 1))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None
        self._weight: Tensor | None = None
        self.register_load_state_dict_post_hook(lambda module, _keys: module._loaded())

    def _loaded(self) -> None:
        """After ``load_state_dict``: the CSR view is remade, and indices outside the layer's inputs
        are refused (the gather kernel reads ``x[indices]`` unchecked)."""
        self._weight = None
        idx = self.indices
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.in_features):
            raise ValueError(f"CondensedLinear: loaded indices span [{int(idx.min())}, {int(idx.max())}], outside the "
                             f"layer's inputs 0..{self.in_features - 1}")

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: Tensor) -> "CondensedLinear":
        """The condensed copy of ``linear`` under ``mask``; a row with fewer active weights than the
        largest is padded with its first inactive inputs, at weight 0 (indices stay sorted, unique)."""
        w = linear.weight.detach()
        k = max(int(mask.sum(1).max()), 1)
        order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :k]   # active first
        order = order.sort(dim=1).values
        out = cls(linear.in_features, linear.out_features, k, linear.bias is not None, w.dtype)
        out.values.data.copy_(w.gather(1, order) * mask.gather(1, order).to(w.dtype))
        out.indices.copy_(order.to(out.indices.dtype))
        if linear.bias is not None:
            out.bias.data.copy_(linear.bias.detach())
        return out

    def _make_csr(self) -> Tensor:
        crow = torch.arange(0, self.out_features * self.fan_in + 1, self.fan_in, dtype=torch.int32,
                            device=self.values.device)
        return _csr(crow, self.indices.reshape(-1).to(torch.int32), self.values.detach().reshape(-1),
                    (self.out_features, self.in_features))

    def weight_csr(self) -> Tensor:
        """The CSR view of (values, indices), made once (values shared; int32 indices, a copy when
        stored as int16); remade after ``load_state_dict``."""
        if _stale(self._weight, self.values):
            self._weight = self._make_csr()
        return self._weight

    def check_indices(self) -> None:
        """Raise ``RuntimeError`` unless every row's indices are in range, sorted and unique (torch's
        CSR invariants; the gather kernel reads ``x[indices]`` unchecked)."""
        self._make_csr()

    @property
    def weight(self) -> Tensor:
        """The dense (out, in) weight, made on demand for owners that read ``.weight`` (e.g.
        ``nn.TransformerEncoderLayer``'s fast-path checks); the forward never uses it."""
        w = torch.zeros(self.out_features, self.in_features, dtype=self.values.dtype, device=self.values.device)
        return w.scatter_(1, self.indices.long(), self.values.detach())

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        if (rows.shape[0] <= self.KERNEL_MAX_ROWS and rows.device.type == "cpu" and rows.dtype == torch.float32
                and self.values.dtype == torch.float32 and not (torch.is_grad_enabled() and x.requires_grad)):
            kernel = kernels.condensed_kernel()
            if kernel is not None:
                bias = None if self.bias is None else self.bias.detach()
                return kernel(rows, self.values.detach(), self.indices, bias).reshape(*lead, self.out_features)
        return _sparse_linear(x, self.weight_csr(), self.bias, self.in_features, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fan_in={self.fan_in}"


class CSRLinear(nn.Module):
    """A linear layer whose weight is a CSR sparse tensor (int32 indices): ``y = W_csr x (+ b)``."""

    def __init__(self, in_features: int, out_features: int, crow: Tensor, col: Tensor, values: Tensor,
                 bias: Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("crow_indices", crow)
        self.register_buffer("col_indices", col)
        self.register_buffer("values", values)
        self.register_buffer("bias", bias)
        self._weight: Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: Tensor) -> "CSRLinear":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
            csr = (linear.weight.detach() * mask).to_sparse_csr()
        return cls(linear.in_features, linear.out_features, csr.crow_indices().to(torch.int32),
                   csr.col_indices().to(torch.int32), csr.values(),
                   None if linear.bias is None else linear.bias.detach().clone())

    def weight_csr(self) -> Tensor:
        if _stale(self._weight, self.values):
            self._weight = _csr(self.crow_indices, self.col_indices, self.values, (self.out_features, self.in_features))
        return self._weight

    @property
    def weight(self) -> Tensor:
        """The dense (out, in) weight, made on demand for owners that read ``.weight``."""
        return self.weight_csr().to_dense()

    def forward(self, x: Tensor) -> Tensor:
        return _sparse_linear(x, self.weight_csr(), self.bias, self.in_features, self.out_features)


class SemiStructuredLinear(nn.Module):
    """A 2:4 linear layer through ``torch.sparse.to_sparse_semi_structured`` (CUDA only)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        from torch.sparse import to_sparse_semi_structured

        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(to_sparse_semi_structured(linear.weight.detach()), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


def _module_of(model: nn.Module, param_name: str) -> tuple[str, nn.Module]:
    module_name = param_name.rsplit(".", 1)[0] if "." in param_name else ""
    return module_name, model.get_submodule(module_name)


def _replace(model: nn.Module, module_name: str, new: nn.Module) -> None:
    parent_name, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _as_linear(module: nn.Module) -> nn.Linear | None:
    """``module`` as the ``nn.Linear`` it computes: itself for a plain ``nn.Linear``; for Hugging
    Face's ``Conv1D`` (weight stored (in, out), ``y = x W + b``) a Linear holding the transpose (the
    same map); None for anything else (convolutions, Linear subclasses: a subclass's owner may read
    its ``.weight`` directly, as ``nn.MultiheadAttention`` does with ``out_proj``)."""
    from rigl_ds.core.layers import is_hf_conv1d

    if type(module) is nn.Linear:
        return module
    if is_hf_conv1d(module):
        nx, nf = module.weight.shape
        lin = nn.Linear(nx, nf, bias=getattr(module, "bias", None) is not None, device="meta")
        lin.weight = nn.Parameter(module.weight.detach().t().contiguous(), requires_grad=False)
        if lin.bias is not None:
            lin.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
        return lin
    return None


def _is_two_four(mask: Tensor) -> bool:
    return mask.shape[-1] % 4 == 0 and bool((mask.reshape(-1, 4).sum(1) <= 2).all())


@torch.no_grad()
def convert(model: nn.Module, masks: Mapping[str, Tensor], fmt: str) -> tuple[nn.Module, dict[str, str]]:
    """Turn ``model`` (its masked weights already zero, ``masks`` by parameter name) into the
    inference model of format ``fmt``, in place; returns it and {module name: what it became}."""
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in params:
            raise ExportError(f"mask {name!r} names no parameter of the model")
        w = params[name]
        if tuple(mask.shape) != tuple(w.shape):
            raise ExportError(f"mask {name!r} has shape {tuple(mask.shape)}, the weight {tuple(w.shape)}")
        w.mul_(mask.to(w.device, w.dtype))
    replaced: dict[str, str] = {}
    if fmt == "dense":
        return model, replaced
    if fmt == "semi_structured":                # before any layer is replaced: refused whole, on any machine
        from rigl_ds.core.layers import is_hf_conv1d

        for name in masks:
            module_name, module = _module_of(model, name)
            if is_hf_conv1d(module) and not bool(masks[name].all()):
                raise ExportError(f"format 'semi_structured': layer {module_name!r} is a Hugging Face Conv1D (weight "
                                  "stored (in, out)), which this format does not take yet; use --format condensed, "
                                  "csr or dense")
    if fmt == "semi_structured" and not torch.cuda.is_available():
        raise ExportError("format 'semi_structured' needs a CUDA GPU (torch's semi-structured sparse tensors run on "
                          "cuSPARSELt/CUTLASS kernels only) and this machine has none; on a CPU use --format "
                          "condensed or csr (or dense)")
    for name, mask in masks.items():
        module_name, module = _module_of(model, name)
        linear = _as_linear(module)
        if linear is None or name != f"{module_name}.weight" or bool(mask.all()):
            continue                        # convolutions, dense layers and Linear subclasses stay as they are
        if linear is not module:            # Conv1D: its mask in the Linear's (out, in) layout
            mask = mask.t()
        module = linear
        mask = mask.to(module.weight.device)
        if fmt == "condensed":
            new: nn.Module = CondensedLinear.from_linear(module, mask)
            kind = f"condensed:{new.fan_in}"
        elif fmt == "csr":
            new = CSRLinear.from_linear(module, mask.cpu() if module.weight.device.type == "cpu" else mask)
            kind = "csr"
        else:
            if not _is_two_four(mask):
                logger.info("%s is not 2:4: kept dense", module_name)
                continue
            if module.weight.device.type != "cuda" or module.weight.dtype not in (torch.float16, torch.bfloat16):
                raise ExportError(f"format 'semi_structured': layer {module_name!r} is {module.weight.dtype} on "
                                  f"{module.weight.device}; torch's semi-structured kernels take fp16/bf16 on CUDA "
                                  "(model.half().cuda() first)")
            try:
                new = SemiStructuredLinear(module)
            except RuntimeError as e:
                raise ExportError(f"format 'semi_structured': layer {module_name!r} {tuple(module.weight.shape)}: "
                                  f"{str(e).splitlines()[0]}") from None
            kind = "semi_structured"
        _replace(model, module_name, new)
        replaced[module_name] = kind
    return model, replaced


def _tensors(model: nn.Module) -> dict[str, Tensor]:
    """What the file holds: the state dict; semi-structured weights as their dense 2:4 values (so
    the original class loads them, and they are converted again on a GPU)."""
    out = {}
    for k, v in model.state_dict().items():
        if v is None:
            continue
        if type(v) is not Tensor:           # a semi-structured sparse weight
            v = v.to_dense()
        out[k] = v.detach().contiguous().cpu()
    return out


def save_exported(model: nn.Module, replaced: Mapping[str, str], fmt: str, out: str | pathlib.Path,
                  extra: Mapping[str, Any] | None = None) -> pathlib.Path:
    """Write ``model`` (from :func:`convert`) to ``out`` as safetensors, format and layers in its metadata."""
    from safetensors.torch import save_file

    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {_META_KEY: json.dumps({"format": fmt, "replaced": dict(replaced), **(extra or {})})}
    tmp = out.with_name(out.name + ".tmp")
    save_file(_tensors(model), str(tmp), metadata=meta)
    tmp.replace(out)
    return out


def read_metadata(path: str | pathlib.Path) -> dict[str, Any]:
    """The export metadata of a file written by :func:`save_exported`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if _META_KEY not in meta:
        raise ExportError(f"{path}: not a rigl_ds export (no {_META_KEY!r} metadata)")
    return json.loads(meta[_META_KEY])


@torch.no_grad()
def load_exported(model: nn.Module, path: str | pathlib.Path) -> nn.Module:
    """Rebuild the exported model from a freshly built instance of the original ``model`` class:
    replaces the layers the file names and loads every tensor (strict)."""
    from safetensors.torch import load_file

    meta = read_metadata(path)
    state = load_file(str(path))
    fmt = meta["format"]
    if fmt == "semi_structured":            # the file holds the original state dict (2:4 weights dense)
        if not torch.cuda.is_available():
            raise ExportError(f"{path}: format 'semi_structured' needs a CUDA GPU to load; this machine has none")
        model.load_state_dict(state, strict=True)
        model.half().cuda()
    for module_name, kind in meta["replaced"].items():
        found = model.get_submodule(module_name)
        old = _as_linear(found) if not isinstance(found, nn.Linear) else found
        if old is None:
            raise ExportError(f"{path}: layer {module_name!r} is {type(found).__name__} in this model, the export "
                              "replaced an nn.Linear or a Hugging Face Conv1D (another model?)")
        if kind.startswith("condensed:"):
            fan_in = int(kind.split(":")[1])
            if not 0 < fan_in <= old.in_features:
                raise ExportError(f"{path}: layer {module_name!r}: fan-in {fan_in} outside [1, {old.in_features}]")
            new: nn.Module = CondensedLinear(old.in_features, old.out_features, fan_in, old.bias is not None,
                                             old.weight.dtype)
            stored = state.get(f"{module_name}.indices")
            if stored is not None:
                # every index an input of the layer (the gather kernel reads x[indices] unchecked); another
                # integer width (int32: exports made before int16 indices) is converted without loss
                if stored.is_floating_point() or stored.dtype == torch.bool or (stored.numel() and (
                        int(stored.min()) < 0 or int(stored.max()) >= old.in_features)):
                    raise ExportError(f"{path}: layer {module_name!r}: its indices ({stored.dtype}) are not inputs "
                                      f"0..{old.in_features - 1} of the layer (another model, or a damaged file?)")
                state[f"{module_name}.indices"] = stored.to(new.indices.dtype)
        elif kind == "csr":
            missing = [k for k in ("crow_indices", "col_indices", "values") if f"{module_name}.{k}" not in state]
            if missing or (old.bias is not None) != (f"{module_name}.bias" in state):
                raise ExportError(f"{path}: layer {module_name!r}: the file lacks its {missing or ['bias']} "
                                  "(another model, or a damaged file?)")
            new = CSRLinear(old.in_features, old.out_features, state[f"{module_name}.crow_indices"],
                            state[f"{module_name}.col_indices"], state[f"{module_name}.values"],
                            state.get(f"{module_name}.bias"))
        elif kind == "semi_structured":
            new = SemiStructuredLinear(old)
        else:
            raise ExportError(f"{path}: unknown layer kind {kind!r} for {module_name!r}")
        _replace(model, module_name, new)
    if fmt != "semi_structured":
        model.load_state_dict(state, strict=True)
    for module_name in meta["replaced"]:
        m = model.get_submodule(module_name)
        if isinstance(m, (CSRLinear, CondensedLinear)):
            try:                            # torch checks the indices (in range, sorted, unique) here
                m.check_indices() if isinstance(m, CondensedLinear) else m.weight_csr()
            except RuntimeError as e:
                raise ExportError(f"{path}: layer {module_name!r}: not a valid sparse matrix ("
                                  f"{str(e).splitlines()[0]})") from None
    return model


def resolve_source(source: str | pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """(checkpoint, the run's config.yaml) of ``source``: a run folder (its newest checkpoint),
    or a checkpoint inside ``<run>/checkpoints``: a ``step_*.pt`` file (local, DDP) or a
    ``step_*`` folder (DeepSpeed, FSDP2)."""
    from rigl_ds import checkpoint as ckpt

    src = pathlib.Path(source)
    if src.is_dir() and (src / "config.yaml").is_file():
        run, folder = src, src / "checkpoints"
        found = (ckpt.list_checkpoints(folder) or ckpt.list_folders(folder)) if folder.is_dir() else []
        if not found:
            raise ExportError(f"{run}: no checkpoint in {folder} (train with checkpoint.at_end=true)")
        return found[-1], run / "config.yaml"
    if src.exists():
        config = src.parent.parent / "config.yaml"
        if not config.is_file() or not src.name.startswith("step_"):
            raise ExportError(f"{src}: neither a run folder (with config.yaml) nor a checkpoint in "
                              "<run>/checkpoints (step_*.pt or a step_* folder)")
        return src, config
    raise ExportError(f"{src}: no such file or folder")


def read_checkpoint(path: pathlib.Path, model: nn.Module, masked: list[str]) -> tuple[dict[str, Tensor],
                                                                                      dict[str, Tensor], Any]:
    """(whole model state dict, whole masks, step) of a checkpoint of any engine, in one process:
    a file (local, DDP); a DCP folder (FSDP2, any world size: resharded into whole tensors); a
    DeepSpeed folder (ZeRO 0: rank 0's module; ZeRO 1-3: the fp32 masters, consolidated by
    DeepSpeed's ``zero_to_fp32``). Verified and checked for code first, as a resume is."""
    from rigl_ds import checkpoint as ckpt

    if path.is_file():
        state = ckpt.load(path)
        return state["model"], (state.get("sparsifier") or {}).get("masks") or {}, state.get("step")
    ckpt.verify_folder(path)
    if (path / "rigl_ds.pt").is_file():                      # FSDP2 (DCP)
        rest = ckpt.load(path / "rigl_ds.pt")
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        template: dict[str, Any] = {"model": {k: torch.empty_like(v, device="cpu") for k, v in model.state_dict().items()}}
        if rest.get("sparsifier") is not None:
            template["masks"] = {n: torch.zeros(shapes[n], dtype=torch.bool) for n in masked}
        ckpt.load_dcp(template, path)
        return template["model"], template.get("masks", {}), rest.get("step")
    ckpt.check_deepspeed_folder(path)                         # DeepSpeed: only tensors and plain data
    main = next((f for f in sorted(path.glob("*mp_rank_00_model_states.pt"))), None)
    if main is None:
        raise ExportError(f"{path}: neither a DCP folder (rigl_ds.pt) nor a DeepSpeed one (mp_rank_00_model_states.pt)")
    states = torch.load(main, map_location="cpu", weights_only=False)       # checked above
    client = states.get("rigl_ds") or {}
    masks = (client.get("sparsifier") or {}).get("masks") or {}
    if any(path.glob("*_optim_states.pt")):                  # ZeRO 1-3: the fp32 masters, whole
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        model_state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    else:
        model_state = states["module"]
    return dict(model_state), masks, client.get("step")


def export(source: str | pathlib.Path, fmt: str, out: str | pathlib.Path) -> dict[str, Any]:
    """Export the checkpoint of a run (``source``: the run folder or a checkpoint in it, any engine)
    to ``out`` in format ``fmt`` (see :data:`FORMATS`). Returns a summary (format, file, the layers
    replaced, each masked layer's density)."""
    from rigl_ds.config import load_config
    from rigl_ds.core import select_layers
    from rigl_ds.train import build_experiment

    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    path, config = resolve_source(source)
    cfg = load_config(config)
    exp = build_experiment(cfg, with_data=False, device=torch.device("cpu"))
    masked = [l.name for l in select_layers(exp.model, cfg.sparsity.include, cfg.sparsity.exclude)]
    model_state, masks, step = read_checkpoint(path, exp.model, masked)
    try:
        exp.model.load_state_dict(model_state)
    except RuntimeError as e:
        raise ExportError(f"checkpoint {path} does not fit the model of {config}: {str(e).splitlines()[0]}") from None
    model = exp.model.eval()
    if fmt == "semi_structured" and torch.cuda.is_available():
        model = model.half().cuda()             # the semi-structured kernels take fp16 (the file holds fp16)
    model, replaced = convert(model, masks, fmt)
    written = save_exported(model, replaced, fmt, out, extra={"checkpoint": str(path), "step": step})
    layers = {n: int(m.sum()) / m.numel() for n, m in masks.items()}
    logger.info("exported %s (step %s) as %s to %s: %d layers replaced", path, step, fmt, written, len(replaced))
    return {"format": fmt, "out": str(written), "checkpoint": str(path), "step": step,
            "replaced": replaced, "densities": layers}
