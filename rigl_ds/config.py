"""Experiment configuration: a typed schema, YAML loading with ``extends``, dotted overrides.

Unknown keys and bad values are errors that name the file, the dotted key and the allowed
values; every problem of a file is reported at once (one :class:`ConfigError`).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import math
import os
import pathlib
import re
import typing
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, create_model,
                      field_validator, model_validator)

from rigl_ds.core import DENSE, Sparsifier, get_method, get_structure
from rigl_ds.core.sparsifier import SparsityConfig as CoreSparsityConfig
from rigl_ds.engines import engine_names

MODELS = ("small_cnn", "mlp", "resnet18", "resnet50", "gpt")


class ConfigError(ValueError):
    """A configuration problem; the message lists every problem found, one per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


class ModelSection(_Strict):
    name: str = "small_cnn"
    """One of small_cnn, mlp, resnet18, resnet50, or ``package.module:function`` (a user builder
    called as ``function(num_classes=..., **kwargs)``)."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    init: Literal["default", "kaiming_fan_in"] = "default"
    zero_init_residual: bool = False
    channels_last: bool = False

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in MODELS and ":" not in v:
            raise ValueError(f"unknown model {v!r}; allowed: {', '.join(MODELS)}, or 'module:function'")
        return v


class DataSection(_Strict):
    name: Literal["digits", "synthetic", "imagefolder", "text"] = "digits"
    # how an image folder is read: torchvision (PIL, DataLoader workers), dali-gpu (nvJPEG + GPU
    # augmentation), dali-cpu (DALI on CPU threads), synthetic (random images, no files read)
    backend: Literal["torchvision", "dali-gpu", "dali-cpu", "synthetic"] = "torchvision"
    path: Optional[str] = None            # image folder root (train/<class>/*, val/<class>/*); text: a corpus file
    batch_size: int = Field(64, ge=1)     # per-rank micro-batch
    eval_batch_size: int = Field(256, ge=1)
    num_workers: int = Field(0, ge=0)     # DataLoader workers; DALI: CPU threads (0: 4)
    image_size: int = Field(224, ge=8)
    num_classes: Optional[int] = Field(None, ge=2)     # synthetic only (default 1000)
    train_size: Optional[int] = Field(None, ge=1)      # synthetic: examples per epoch (default 1,281,167)
    val_size: Optional[int] = Field(None, ge=1)
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)   # digits: held-out test split
    seq_len: int = Field(128, ge=2)                     # text: tokens (bytes) per training sequence
    corpus_bytes: int = Field(1_000_000, ge=10_000)     # text: bytes of the Python standard library's sources

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str, info: ValidationInfo) -> str:
        name = info.data.get("name")
        if name in ("digits", "text") and v != "torchvision":
            raise ValueError(f"{v!r} does not apply to name={name!r} (in memory); allowed: torchvision")
        if name == "synthetic" and v.startswith("dali"):
            raise ValueError(f"{v!r} reads an image folder (name='imagefolder'); allowed for name='synthetic': "
                             "torchvision, synthetic")
        return v

    @model_validator(mode="after")
    def _path(self) -> "DataSection":
        if self.name == "imagefolder" and self.backend != "synthetic" and not self.path:
            env = os.environ.get("RIGL_DS_DATA")
            if env:
                self.path = env
        return self


class OptimizerSection(_Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = Field(1e-4, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    #: torch's fused kernel (``fused=True``, CPU and CUDA); null: torch's default (on a CPU a loop
    #: per tensor, 10x slower for AdamW in benchmarks/mask_kernels.py). Masked weights stay 0 with it
    #: (tests/unit/test_train.py, one process).
    fused: Optional[bool] = None


class LRScheduleSection(_Strict):
    name: Literal["cosine", "constant", "step"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0.0)
    min_lr: float = Field(0.0, ge=0.0)
    step_epochs: list[int] = Field(default_factory=list)   # "step": decay epochs
    step_gamma: float = Field(0.1, gt=0.0)


class _SparsityRules(_Strict):
    """The cross-field rules of the ``sparsity`` section; its fields are generated below from the
    core's :class:`~rigl_ds.core.sparsifier.SparsityConfig`, where each knob is declared once."""

    @field_validator("t_end", "t_start", check_fields=False)
    @classmethod
    def _t_end(cls, v: Union[int, float], info: ValidationInfo) -> Union[int, float]:
        if isinstance(v, bool):
            raise ValueError("must be a fraction in (0, 1] or an integer step")
        if isinstance(v, float) and not (math.isfinite(v) and (0.0 <= v if info.field_name == "t_start" else 0.0 < v)
                                         and v <= 1.0):
            raise ValueError(f"as a fraction of total steps must be in {'[0' if info.field_name == 't_start' else '(0'}"
                             ", 1] (an integer is an absolute step)")
        if isinstance(v, int) and v < 0:
            raise ValueError("must be >= 0")
        return v

    @field_validator("structure", mode="before", check_fields=False)
    @classmethod
    def _structure(cls, v: Any) -> str:
        return get_structure(v).describe()          # ValueError naming the allowed spellings

    @model_validator(mode="after")
    def _acc(self) -> "_SparsityRules":
        if self.grad_accumulation_n > self.delta:
            raise ValueError(f"grad_accumulation_n={self.grad_accumulation_n} must be <= delta={self.delta}")
        if self.initial_sparsity > self.sparsity:
            raise ValueError(f"initial_sparsity={self.initial_sparsity} must be <= sparsity={self.sparsity}")
        if self.gamma_sal is not None and (self.method != "rigl" or get_structure(self.structure).name != "fan_in"):
            raise ValueError(f"gamma_sal={self.gamma_sal} (neuron ablation) needs method: rigl and structure: fan_in, "
                             f"got method: {self.method}, structure: {self.structure} (set gamma_sal: null)")
        return self

    def to_core(self, default_seed: int, method: Optional[str] = None) -> CoreSparsityConfig:
        """The core's frozen config (method must not be 'dense' unless ``method`` replaces it); seed
        None means ``default_seed``."""
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(CoreSparsityConfig)}
        if method is not None:
            kw["method"] = method
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
        if kw["seed"] is None:
            kw["seed"] = default_seed
        return CoreSparsityConfig(**kw)


def _sparsity_fields() -> dict[str, Any]:
    hints = typing.get_type_hints(CoreSparsityConfig)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(CoreSparsityConfig):
        md = f.metadata
        typ = md["yaml"] if md["yaml"] is not None else hints[f.name]
        if inspect.isfunction(typ):
            typ = typ()
        if md["yaml_default"] is not dataclasses.MISSING:
            default = md["yaml_default"]
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, (list, dict)):
            field = Field(default_factory=lambda d=default: copy.deepcopy(d), description=md["doc"], **md["limits"])
        else:
            field = Field(default, description=md["doc"], **md["limits"])
        out[f.name] = (typ, field)
    return out


SparsitySection = create_model("SparsitySection", __base__=_SparsityRules, __module__=__name__, **_sparsity_fields())


class TrainSection(_Strict):
    epochs: float = Field(10, gt=0.0)
    max_steps: Optional[int] = Field(None, ge=1)     # stop early (smoke tests); schedule unchanged
    grad_accumulation: int = Field(1, ge=1)          # micro-batches per optimizer step
    # the global batch (all ranks, all micro-batches); sets grad_accumulation from the world size
    global_batch: Optional[int] = Field(None, ge=1)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    mixup: float = Field(0.0, ge=0.0)                # Beta(mixup, mixup); 0 disables
    seed: int = 0
    deterministic: bool = False
    eval_every_epochs: float = Field(1.0, gt=0.0)
    clip_grad_norm: Optional[float] = Field(None, gt=0.0)
    # torch's CPU (intra-op) threads per process: "auto" (see rigl_ds.train.choose_threads) or a count
    threads: Union[int, str] = "auto"

    @field_validator("threads", mode="before")
    @classmethod
    def _threads(cls, v: Any) -> Union[int, str]:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError("allowed: 'auto' or a whole number >= 1")


class EngineSection(_Strict):
    name: Literal[engine_names()] = "local"           # the backends of rigl_ds.engines.BACKENDS
    deepspeed_config: Optional[str] = None          # DeepSpeed JSON (no RigL keys in it)
    packed_allreduce: bool = True                   # ddp: all-reduce only active gradient entries
    mask_sync: Literal["broadcast", "verify"] = "broadcast"
    # fsdp2: exact top-k over the shards ("sharded", O(k*world) values a layer) or the reference
    # that gathers each layer's full_tensor() ("gather")
    fsdp2_selection: Literal["sharded", "gather"] = "sharded"
    # fsdp2: module class names that get their own fully_shard unit (then the root); none: the root only
    fsdp2_units: list[str] = ["BasicBlock", "Bottleneck"]


class PrecisionSection(_Strict):
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"


class LoggingSection(_Strict):
    run_dir: Optional[str] = None                   # default: runs/<name>-<timestamp>
    tensorboard: bool = True
    log_every: int = Field(10, ge=1)
    per_layer: bool = True
    progress: bool = True


class CheckpointSection(_Strict):
    every_steps: Optional[int] = Field(None, ge=1)
    keep_last: int = Field(2, ge=1)
    at_end: bool = True


class ExperimentConfig(_Strict):
    name: str = "experiment"
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    lr_schedule: LRScheduleSection = Field(default_factory=LRScheduleSection)
    sparsity: SparsitySection = Field(default_factory=SparsitySection)
    train: TrainSection = Field(default_factory=TrainSection)
    engine: EngineSection = Field(default_factory=EngineSection)
    precision: PrecisionSection = Field(default_factory=PrecisionSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    resume: Optional[str] = None                    # a checkpoint path, or "auto"
    _source: str = PrivateAttr(default="<defaults>")   # the YAML file it came from (for messages)
    _overridden: dict = PrivateAttr(default_factory=dict)   # dotted key -> the command-line override

    def where(self, key: str) -> str:
        """Where ``key``'s value came from: the command-line override that set it, or the file."""
        item = self._overridden.get(key) or next(
            (v for k, v in self._overridden.items() if k.startswith(key + ".")), None)
        return f"command-line override {item!r}" if item else self._source

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError(f"must be a plain name (no '/', not starting with '.'), got {v!r}")
        return v


# ---------------------------------------------------------------------------------------------
# loading

def _deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_yaml(path: pathlib.Path, chain: tuple[pathlib.Path, ...] = ()) -> dict:
    """Read a YAML mapping, resolving ``extends: other.yaml`` (relative to the file) first."""
    if path in chain:
        raise ConfigError([f"{path}: 'extends' cycle: {' -> '.join(map(str, chain + (path,)))}"])
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from None
    try:
        doc = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: not valid YAML: {e}"]) from None
    if doc is None:
        raise ConfigError([f"{path}: the file is empty; expected a mapping of sections"])
    if not isinstance(doc, dict):
        raise ConfigError([f"{path}: expected a mapping of sections at the top, got {type(doc).__name__}"])
    bad_keys = [k for k in doc if not isinstance(k, str)]
    if bad_keys:
        raise ConfigError([f"{path}: top-level keys must be strings, got {bad_keys!r}"])
    parent = doc.pop("extends", None)
    if parent is None:
        return doc
    if not isinstance(parent, str):
        raise ConfigError([f"{path}: extends: expected a file path, got {parent!r}"])
    base = _read_yaml((path.parent / parent).resolve(), chain + (path,))
    return _deep_merge(base, doc)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader without YAML 1.1's base-60 numbers (YAML 1.2 dropped them): ``2:4`` (an
    N:M structure) stays the string it reads as, not the number 124."""


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {k: [(tag, rx) for tag, rx in v if tag not in (_INT, _FLOAT)]
                                   for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_INT, re.compile(r"""^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)
    |[-+]?0x[0-9a-fA-F_]+)$""", re.X), list("-+0123456789"))
_Loader.add_implicit_resolver(_FLOAT, re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
    |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], YAML-parsed value)."""
    if "=" not in item:
        raise ConfigError([f"override {item!r}: expected key=value (e.g. sparsity.sparsity=0.8)"])
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not key.strip() or any(not p for p in parts):
        raise ConfigError([f"override {item!r}: bad key {key!r}"])
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = ExperimentConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return []
    return list(model.model_fields)


def _format(e: dict, source: str, overridden: dict[str, str]) -> str:
    loc = tuple(e["loc"])
    key = ".".join(str(p) for p in loc)
    # the override that set this key or one above it (a.b=... sets a.b.c); for an unknown key, also one
    # below it (the unknown section "optimiser" comes from "optimiser.lr=...")
    unknown = e["type"] == "extra_forbidden"
    origin = next((item for o, item in overridden.items()
                   if key == o or key.startswith(o + ".") or (unknown and o.startswith(key + "."))), None)
    where = f"command-line override {origin!r}" if origin else source
    if e["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc)
        near = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        return f"{where}: {key}: unknown key{hint}; allowed keys here: {', '.join(allowed)}"
    msg = e["msg"].replace("Value error, ", "")
    value = e.get("input")
    shown = "" if isinstance(value, (dict, list)) or value is None and e["type"] == "missing" else f" (got {value!r})"
    return f"{where}: {key}: {msg}{shown}"


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Load and validate an experiment; raises :class:`ConfigError` listing every problem."""
    source = str(path) if path is not None else "<defaults>"
    doc = _read_yaml(pathlib.Path(path).resolve()) if path is not None else {}
    problems: list[str] = []
    overridden: dict[str, str] = {}
    for item in overrides:
        try:
            parts, value = parse_override(item)
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        node = doc
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
        overridden[".".join(parts)] = item
    try:
        cfg = ExperimentConfig.model_validate(doc)
    except ValidationError as e:
        problems.extend(_format(err, source, overridden) for err in e.errors())
        cfg = None
    if problems:
        raise ConfigError(problems)
    assert cfg is not None
    cfg._source = source
    cfg._overridden = overridden
    problems = semantic_problems(cfg, source)
    if problems:
        raise ConfigError(problems)
    return cfg


def semantic_problems(cfg: ExperimentConfig, source: str) -> list[str]:
    """Cross-field checks that need the whole config."""
    out = []
    if cfg.engine.name == "deepspeed" and not cfg.engine.deepspeed_config:
        out.append(f"{source}: engine.deepspeed_config: required for engine.name='deepspeed' "
                   "(e.g. ds_configs/zero2_fp32.json)")
    if cfg.engine.name == "fsdp2" and cfg.precision.dtype == "fp16":
        out.append(f"{source}: precision.dtype: 'fp16' is not supported with engine.name='fsdp2' (its loss "
                   "scaler is not shard-aware here); use 'bf16' or 'fp32'")
    if (cfg.data.name == "text") != (cfg.model.name == "gpt") and ":" not in cfg.model.name:
        out.append(f"{cfg.where('model.name')}: model.name={cfg.model.name!r} with data.name={cfg.data.name!r}: the "
                   "language model 'gpt' trains on data.name='text' (token ids), the image models on images")
    if cfg.data.name == "text" and cfg.train.mixup:
        out.append(f"{cfg.where('train.mixup')}: train.mixup={cfg.train.mixup}: mixup mixes images; a language model "
                   "cannot mix token ids (set 0)")
    if cfg.sparsity.method == "gap_parallel" and cfg.precision.dtype == "fp16":
        out.append(f"{cfg.where('precision.dtype')}: precision.dtype='fp16' is not supported with sparsity.method="
                   "gap_parallel (each copy's loss scaler moves on its own, and the merged model would be stepped "
                   "with different scales on different ranks); use 'bf16' or 'fp32'")
    if cfg.sparsity.method == "gap_parallel" and cfg.engine.name == "deepspeed" and cfg.train.clip_grad_norm:
        out.append(f"{cfg.where('train.clip_grad_norm')}: train.clip_grad_norm={cfg.train.clip_grad_norm} is not supported "
                   "with sparsity.method=gap_parallel on engine.name='deepspeed' (DeepSpeed clips within one copy, "
                   "before merged copies average their gradients, so the merged model would not clip the norm of "
                   "the gradient it applies); use engine.name='ddp' or 'fsdp2', or no clipping")
    if cfg.sparsity.method == "gap_parallel" and cfg.engine.name not in GAP_PARALLEL_ENGINES:
        out.append(f"{cfg.where('engine.name')}: engine.name={cfg.engine.name!r}: sparsity.method=gap_parallel splits the "
                   f"world into copies of the model, which engine.name={' or '.join(map(repr, GAP_PARALLEL_ENGINES))} "
                   "does; use one of those, or gap_cyclic on this engine")
    if cfg.lr_schedule.name == "step" and not cfg.lr_schedule.step_epochs:
        out.append(f"{source}: lr_schedule.step_epochs: required for lr_schedule.name='step'")
    return out


#: the engines that split the world into P-GaP's copies (``split_copies``)
GAP_PARALLEL_ENGINES = ("ddp", "fsdp2", "deepspeed")


def for_world(cfg: ExperimentConfig, world: int) -> ExperimentConfig:
    """The config as run on ``world`` ranks: ``train.global_batch`` turned into ``grad_accumulation``;
    P-GaP's copies need a world size divisible by their number."""
    kappa = cfg.sparsity.gap_partitions
    if cfg.sparsity.method == "gap_parallel" and world % kappa:
        raise ConfigError([f"{cfg.where('sparsity.gap_partitions')}: sparsity.gap_partitions={kappa}: gap_parallel trains "
                           f"one copy of the model per partition, each on the same number of ranks, and the world size "
                           f"{world} is not divisible by {kappa}; launch a multiple of {kappa} ranks or change "
                           "sparsity.gap_partitions"])
    source = cfg.where("train.global_batch")
    gb = cfg.train.global_batch
    if gb is None:
        return cfg
    per_step = cfg.data.batch_size * world
    if gb % per_step:
        raise ConfigError([f"{source}: train.global_batch={gb} is not a multiple of data.batch_size="
                           f"{cfg.data.batch_size} x {world} ranks = {per_step}; change one of them"])
    accum = gb // per_step
    if cfg.train.grad_accumulation not in (1, accum):
        raise ConfigError([f"{source}: train.grad_accumulation={cfg.train.grad_accumulation} disagrees with "
                           f"train.global_batch={gb} (data.batch_size={cfg.data.batch_size}, {world} ranks "
                           f"give {accum}); set only one of them"])
    out = cfg.model_copy(deep=True)
    out.train.grad_accumulation = accum
    return out


def schedule_problems(cfg: ExperimentConfig, total_steps: int) -> list[str]:
    """Checks that need the run's length: a dynamic method must update its mask at least once."""
    sp = cfg.sparsity
    if sp.method == DENSE or not get_method(sp.method).updates:
        return []
    out = []
    t_end = sp.t_end if isinstance(sp.t_end, int) else int(round(sp.t_end * total_steps))
    if sp.method == "gmp":
        return _gmp_problems(cfg, total_steps, t_end)
    method = get_method(sp.method)
    if method.make_schedule.__func__ is not Sparsifier.make_schedule.__func__:   # its own schedule checks itself
        try:
            method.make_schedule(sp.to_core(cfg.train.seed), total_steps)
        except ValueError as e:
            return [f"{cfg.where('sparsity')}: sparsity.method={sp.method}: {e}"]
        return []
    if isinstance(sp.t_end, int) and sp.t_end > total_steps:
        out.append(f"{cfg.where('sparsity.t_end')}: sparsity.t_end={sp.t_end}: after the end of training ({total_steps} steps); give a "
                   f"step <= {total_steps} or a fraction such as 0.75")
    elif sp.delta >= t_end:
        out.append(f"{cfg.where('sparsity.delta')}: sparsity.delta={sp.delta}: no mask update before T_end={t_end} (training has "
                   f"{total_steps} steps); {sp.method} would be static: lower delta below {t_end} or use "
                   "sparsity.method=static")
    return out


def _gmp_problems(cfg: ExperimentConfig, total_steps: int, t_end: int) -> list[str]:
    """GMP must reach its final sparsity before training ends."""
    sp = cfg.sparsity
    t_start = sp.t_start if isinstance(sp.t_start, int) else int(round(sp.t_start * total_steps))
    if t_start >= t_end:
        return [f"{cfg.where('sparsity.t_start')}: sparsity.t_start={sp.t_start} (step {t_start}) must come before "
                f"sparsity.t_end={sp.t_end} (step {t_end}) for gmp"]
    last = t_start + -(-(t_end - t_start) // sp.delta) * sp.delta
    if last >= total_steps:
        return [f"{cfg.where('sparsity.t_end')}: sparsity.t_end={sp.t_end}: gmp's last prune (step {last}, the first "
                f"t_start + k*delta at or after t_end={t_end}) is not before the end of training ({total_steps} steps); "
                "lower t_end or delta"]
    return []


def to_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML (written into the run directory)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
