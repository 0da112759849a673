"""The sparsifier: masks, schedule and the drop/grow update (SPEC §3–§5).

``Static`` -> ``SET`` -> ``RigL`` is a shallow chain: they share one update path and differ only
in whether updates happen and in the grow score (none, random, |dense gradient|).

Use with a plain PyTorch loop::

    rigl = RigL(model, optimizer, total_steps=len(loader) * epochs, sparsity=0.9)
    for x, y in loader:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        if rigl.step():          # False on a mask-update step: skip the optimizer step there
            optimizer.step()

``step()`` is called once per optimizer step, after backward (after gradient accumulation, and
after ``scaler.unscale_(optimizer)`` when a ``GradScaler`` is used).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from .distributions import DISTRIBUTIONS, get_distribution, nnz_for
from .engine import Engine
from .layers import MaskedLayer, select_layers
from .methods import get_method, method_names, register_method
from .schedule import ANNEALS, UpdateSchedule
from .selection import Change, random_grouped_mask, select_layer
from .structures import StructureError, get_structure

logger = logging.getLogger(__name__)

STATE_VERSION = 1


#: how gap_cyclic prunes a dense partition back (rigl_ds.core.gap)
GAP_PRUNES = ("layer", "global")


def knob(default: Any, doc: str, *, yaml: Any = None, yaml_default: Any = dataclasses.MISSING,
         **limits: float) -> Any:
    """A field of :class:`SparsityConfig`: the one declaration of a sparsity knob. The YAML schema
    (``rigl_ds.config.SparsitySection``) is generated from these fields: ``doc``, the numeric
    ``limits`` (ge, gt, le, lt), the YAML type where it differs from the Python one (``yaml``; a
    callable is resolved when the schema is built) and its default there (``yaml_default``)."""
    md = {"doc": doc, "yaml": yaml, "yaml_default": yaml_default, "limits": limits}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=md)
    return field(default=default, metadata=md)


def _literal_dense() -> Any:
    from typing import Literal
    return Literal["dense"]


def _yaml_methods() -> Any:
    from typing import Literal

    from .methods import DENSE
    return Literal[method_names() + (DENSE,)]


def _yaml_distributions() -> Any:
    from typing import Literal
    return Literal[DISTRIBUTIONS]


def _yaml_gap_prunes() -> Any:
    from typing import Literal
    return Literal[GAP_PRUNES]


def _yaml_anneals() -> Any:
    from typing import Literal
    return Literal[ANNEALS]


@dataclass(frozen=True)
class SparsityConfig:
    """Every knob of the sparsifier, with the SPEC §5 defaults; declared once (see :func:`knob`)."""

    method: str = knob("rigl", "the method (rigl_ds.core.methods registry); YAML also: dense", yaml=_yaml_methods)
    sparsity: float = knob(0.9, "fraction of masked-layer weights that are zero", ge=0.0, lt=1.0)
    distribution: str = knob("erk", "per-layer sparsity: see rigl_ds.core.distributions", yaml=_yaml_distributions)
    structure: str = knob("unstructured", "how many stay active where: unstructured, fan_in (the same count in every "
                          "output row) or \"N:M\" (N of every M consecutive weights of a row); see "
                          "rigl_ds.core.structures")
    gamma_sal: float | None = knob(None, "rigl with structure fan_in: SRigL's neuron ablation, off when null; an "
                                   "output row with fewer than gamma_sal x its fan-in salient weights is removed "
                                   "and its weights regrown in the other rows (see Sparsifier._ablate)", gt=0.0,
                                   le=1.0)
    delta: int = knob(100, "steps between mask updates (ΔT)", ge=1)
    alpha: float = knob(0.3, "initial drop fraction", ge=0.0, le=1.0)
    t_end: float | int = knob(0.75, "updates stop here: a fraction of total steps (float) or a step (int)",
                              yaml=float | int)
    t_start: float | int = knob(0, "gmp: pruning starts here (fraction or step, as t_end)", yaml=float | int)
    initial_sparsity: float = knob(0.0, "gmp: the sparsity at t_start (0: a dense start)", ge=0.0, lt=1.0)
    gap_partitions: int = knob(4, "gap_cyclic, gap_parallel: kappa, the partitions of consecutive layers (balanced "
                               "by weights); gap_parallel: also the copies (world size % kappa == 0)",
                               ge=2)
    gap_phase: float | int = knob(0.1, "gap_cyclic, gap_parallel: T, steps a partition stays dense: a fraction of total steps "
                                  "(float) or a step count (int)", yaml=float | int, gt=0)
    gap_rounds: int = knob(1, "gap_cyclic: rounds of kappa phases; gap_parallel: rounds of one phase each (grow "
                           "apart, merge); then the masks stay fixed (fine-tuning)", ge=1)
    gap_prune: str = knob("layer", "gap_cyclic: how a dense partition is pruned back: layer (each layer to its "
                          "distribution count: uniform) or global (one |w| threshold over the partition, keeping "
                          "its total: non-uniform)", yaml=_yaml_gap_prunes)
    anneal: str = knob("cosine", "drop fraction over time: cosine or constant", yaml=_yaml_anneals)
    grad_accumulation_n: int = knob(1, "dense gradients of the last n steps up to an update are averaged", ge=1)
    erk_power_scale: float = knob(1.0, "ERK raw density raised to this power", ge=0.0)
    include: tuple[str, ...] = knob((), "module-name globs adding masked weights", yaml=list[str], yaml_default=[])
    exclude: tuple[str, ...] = knob((), "module-name globs removing masked weights", yaml=list[str], yaml_default=[])
    overrides: Mapping[str, float | str] = knob({}, "layer name or glob -> sparsity or 'dense'",
                                                yaml=lambda: dict[str, float | _literal_dense()])
    seed: int = knob(0, "seed of the initial masks (and of SET's growth); YAML default: train.seed",
                     yaml=int | None, yaml_default=None)
    skip_step_on_update: bool | None = knob(None, "no optimizer step on an update step; None: the method's "
                                            "default (rigl, set: skip, as the official code; gmp: step)")
    rezero_weights: bool | None = knob(None, "re-zero masked weights after each optimizer step; None: only for "
                                       "optimizers not proven to keep zeros")

    def __post_init__(self) -> None:
        if self.method not in method_names():
            raise ValueError(f"method must be one of {', '.join(method_names())}, got {self.method!r}")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"distribution must be one of {', '.join(DISTRIBUTIONS)}, got {self.distribution!r}")
        get_structure(self.structure)            # ValueError naming the allowed spellings
        g = self.gamma_sal
        if g is not None:
            if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0.0 < g <= 1.0:
                raise ValueError(f"gamma_sal must be null or a number in (0, 1], got {g!r}")
            if self.method != "rigl" or get_structure(self.structure).name != "fan_in":
                raise ValueError(f"gamma_sal (neuron ablation) needs method: rigl and structure: fan_in, got method: "
                                 f"{self.method}, structure: {self.structure} (set gamma_sal: null)")
        if self.method in ("gap_cyclic", "gap_parallel") and self.skip_step_on_update is False:
            raise ValueError(f"skip_step_on_update: false is not allowed with {self.method}: the optimizer step of a "
                             "phase change is skipped so that grown weights start at 0 on every engine (leave it null)")
        if self.method == "gap_parallel" and self.gap_prune != "layer":
            raise ValueError(f"gap_prune: {self.gap_prune} is not allowed with gap_parallel: P-GaP prunes each layer to "
                             "its distribution count (the paper's P-GaP is uniform); use gap_prune: layer")
        if self.gap_prune not in GAP_PRUNES:
            raise ValueError(f"gap_prune must be one of {', '.join(GAP_PRUNES)}, got {self.gap_prune!r}")
        if self.gap_prune == "global" and get_structure(self.structure).name != "unstructured":
            raise ValueError(f"gap_prune: global (one threshold over a partition) needs structure: unstructured, got "
                             f"structure: {self.structure}")
        if self.anneal not in ANNEALS:
            raise ValueError(f"anneal must be one of {', '.join(ANNEALS)}, got {self.anneal!r}")
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or math.isnan(s) or not 0.0 <= s < 1.0:
            raise ValueError(f"sparsity must be a number in [0, 1), got {s!r}")
        s = self.initial_sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or math.isnan(s) or \
                not 0.0 <= s <= self.sparsity:
            raise ValueError(f"initial_sparsity must be a number in [0, sparsity={self.sparsity}], got {s!r}")
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "overrides", dict(self.overrides))


class LayerPlan(NamedTuple):
    """One masked layer at the end of training: the distribution's ``density``, the active count
    ``nnz`` the structure gives it, and its ``group`` size (the whole layer for a dense one)."""

    numel: int
    density: float
    nnz: int
    group: int


def group_shape(layer: MaskedLayer) -> tuple[int, ...]:
    """The shape a structure groups ``layer`` by: (out, in, ...), the weight's own shape except for a
    weight stored (in, out) (Hugging Face's ``Conv1D``), whose groups run along its input dimension
    (dim 0), as the rows of its transpose."""
    return tuple(reversed(layer.shape)) if layer.transposed else tuple(layer.shape)


def plan_layers(layers: Sequence[MaskedLayer], config: SparsityConfig) -> dict[str, LayerPlan]:
    """The final per-layer counts of ``config`` over ``layers``: the distribution's density, floored
    to a count (SPEC §3), then held by the structure. Pure: the sparsifier and ``rigl-ds plan`` both
    read it. ValueError (a StructureError) naming a layer the structure cannot hold."""
    structure = get_structure(config.structure)
    densities = get_distribution(config.distribution)(layers, config.sparsity, overrides=config.overrides,
                                                      power_scale=config.erk_power_scale)
    out: dict[str, LayerPlan] = {}
    for l in layers:
        shape = group_shape(l)
        try:
            nnz = structure.count(l.name, shape, nnz_for(l.numel, densities[l.name]))
            group = l.numel if nnz == l.numel else structure.group_size(l.name, shape)
        except StructureError as e:
            if not l.transposed:
                raise
            raise StructureError(f"{e} ({l.name!r} is stored (in, out) as {tuple(l.shape)}, Hugging Face Conv1D: it is "
                                 f"grouped as its transpose {shape}, whose rows are its outputs)") from None
        out[l.name] = LayerPlan(l.numel, densities[l.name], nnz, group)
    return out


@dataclass(frozen=True)
class DensityReport:
    """Live counts of the masked layers: name -> (active mask entries, nonzero weights, numel)."""

    layers: Mapping[str, tuple[int, int, int]]

    def _ratio(self, i: int) -> float:
        total = sum(v[2] for v in self.layers.values())
        return sum(v[i] for v in self.layers.values()) / total if total else 1.0

    @property
    def mask_density(self) -> float:
        """Active mask entries / weights, over all masked layers."""
        return self._ratio(0)

    @property
    def nonzero_density(self) -> float:
        """Nonzero weights / weights, over all masked layers (<= mask_density)."""
        return self._ratio(1)

    def layer_mask_density(self) -> dict[str, float]:
        return {n: a / numel for n, (a, _, numel) in self.layers.items()}


class Sparsifier:
    """Keeps masked weights at zero and, for dynamic methods, updates the masks every ``delta`` steps.

    Parameters: ``model`` (the module whose layers are masked), ``optimizer`` (its state is reset
    where masks change), ``total_steps`` (optimizer steps in the run; ``t_end`` is a fraction of
    it), ``config`` and/or keyword overrides of :class:`SparsityConfig`, ``engine`` (an
    :class:`~rigl_ds.core.engine.Engine`; default: plain PyTorch, one process).
    """

    method = "static"
    updates = False          # does this method change masks during training?
    needs_dense_grad = False  # does its grow score read the dense gradient?
    skips_step_on_update = True   # default of ``skip_step_on_update``

    # ------------------------------------------------------------------ what a method defines
    @classmethod
    def make_schedule(cls, config: SparsityConfig, total_steps: int) -> Any:
        """The count schedule: when masks change (``is_update_step``, ``update_steps``,
        ``accumulates``, ``num_updates``); the base :meth:`counts` also reads ``drop_fraction``."""
        return UpdateSchedule.from_total_steps(
            total_steps, delta=config.delta, t_end=config.t_end, alpha=config.alpha, anneal=config.anneal,
            grad_accumulation_n=config.grad_accumulation_n)

    @classmethod
    def counts_at(cls, schedule: Any, final: Mapping[str, int], numel: Mapping[str, int], step: int,
                  groups: Mapping[str, int]) -> dict[str, int]:
        """Active weights per layer in force at ``step`` (after every update before it), each a
        multiple of the layer's number of ``groups`` (the structure's). Pure: the plan and the FLOPs
        count use it without a model. RigL, SET, static: the final counts always."""
        return dict(final)

    def counts(self, due_at: int) -> tuple[dict[str, tuple[int, int]], float]:
        """How many positions each layer drops and grows at the update due at ``due_at`` (layers
        that change nothing are left out), and the update's drop fraction (for logs).

        RigL, SET: ``k = floor(f(t) * active)`` dropped and as many grown (SPEC §4); a dense layer
        regrows exactly what it drops, so it is left out."""
        f = self.schedule.drop_fraction(due_at)
        out: dict[str, tuple[int, int]] = {}
        for layer in self.layers:
            n_active = self.nnz[layer.name]
            k = math.floor(f * n_active)
            if k and n_active != layer.numel:
                out[layer.name] = (k, k)
        return out, f

    def _initial_counts(self) -> dict[str, int]:
        """The counts of the initial masks (the random draw's)."""
        return type(self).counts_at(self.schedule, self.final_nnz, self._numel, 0, self._groups)

    def _counts_in_force(self, step: int) -> dict[str, int]:
        """The counts this rank's masks hold at ``step`` (what a loaded state is checked against)."""
        return type(self).counts_at(self.schedule, self.final_nnz, self._numel, step, self._groups)

    def drop_score(self, name: str) -> Tensor:
        """Score of every position for dropping (smaller drops first): |weight| as the engine
        keeps it for the optimizer (this rank's shard where masks are sharded)."""
        return self.engine.weight(name).abs()

    def grow_score(self, name: str, grads: Mapping[str, Tensor] | None) -> Tensor:
        """Score of every position for growth; larger grows first. Called only for layers that grow."""
        raise NotImplementedError(f"{type(self).__name__} grows nothing")

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        total_steps: int,
        config: SparsityConfig | None = None,
        engine: Engine | None = None,
        **overrides: Any,
    ) -> None:
        base = config if config is not None else SparsityConfig(method=self.method)
        self.config = dataclasses.replace(base, method=self.method, **overrides)
        cfg = self.config
        self.layers: list[MaskedLayer] = select_layers(model, cfg.include, cfg.exclude)
        if not self.layers:
            raise ValueError("the model has no layer to mask (no Conv/Linear weight, or all excluded)")
        self.structure = get_structure(cfg.structure)
        plan = plan_layers(self.layers, cfg)
        #: the distribution's density of each layer (before the structure rounds its count)
        self.densities: dict[str, float] = {n: p.density for n, p in plan.items()}
        #: the planned counts at the end of training (the distribution's, as the structure holds them)
        self.final_nnz: dict[str, int] = {n: p.nnz for n, p in plan.items()}
        #: positions per group of each layer (the whole layer: unstructured, or a dense layer)
        self.group: dict[str, int] = {n: p.group for n, p in plan.items()}
        self.shapes: dict[str, tuple[int, ...]] = {l.name: l.shape for l in self.layers}   # whole layers
        self._numel = {l.name: l.numel for l in self.layers}
        self._groups = {n: self._numel[n] // g for n, g in self.group.items()}
        #: grouped layers stored (in, out) (Hugging Face's Conv1D): their groups run along dim 0, so the
        #: structure's selections read them whole, transposed (see :meth:`_select_transposed`)
        self._transposed: frozenset[str] = frozenset(
            l.name for l in self.layers if l.transposed and self.group[l.name] != l.numel)
        self.schedule = type(self).make_schedule(cfg, total_steps)
        #: layers whose output rows SRigL's neuron ablation may remove (gamma_sal set): the fan_in-grouped
        #: ones except the last masked layer (its rows are the model's outputs; SRigL's default)
        self.ablatable: tuple[str, ...] = () if cfg.gamma_sal is None else tuple(
            l.name for l in self.layers[:-1] if self.group[l.name] != l.numel)
        stored_in_out = [n for n in self.ablatable if n in self._transposed]
        if stored_in_out:
            raise StructureError(
                f"gamma_sal={cfg.gamma_sal} (neuron ablation) is not built for layers stored (in, out) (Hugging Face "
                f"Conv1D): {', '.join(stored_in_out)}; set gamma_sal: null, or exclude them")
        #: the counts in force now: every update checks the masks hold exactly these
        self.nnz: dict[str, int] = self._initial_counts()
        skip = cfg.skip_step_on_update
        self.skip_step_on_update: bool = type(self).skips_step_on_update if skip is None else bool(skip)
        if engine is None:
            from rigl_ds.engines.local import LocalEngine  # plain PyTorch; imports no torch.distributed
            engine = LocalEngine(model, optimizer)
        self.engine = engine
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self._step = 0
        self._pending: int | None = None      # due step of an update postponed by non-finite grads
        self._score: dict[str, Tensor] | None = None
        self._score_count = 0
        self.skipped_nonfinite = 0            # accumulation steps skipped for non-finite gradients
        self.last_update: dict[str, Any] | None = None

        # The initial masks: drawn whole on every rank, kept as the engine keeps weights. A layer whose
        # weights already hold zeros (a sparse model loaded before the sparsifier was built) keeps its
        # nonzero weights first, so building the sparsifier after loading loses none of them; a fresh
        # (all-nonzero) layer gets the plain random mask.
        nonzero = self.engine.total(torch.stack([torch.count_nonzero(self.engine.weight(layer.name))
                                                 for layer in self.layers]).to(torch.int64))
        masks: dict[str, Tensor] = {}
        for layer, nz in zip(self.layers, nonzero.tolist()):
            w, prefer = self.engine.weight(layer.name), None
            if nz < layer.numel:
                prefer = self.engine.whole(layer.name, w != 0)
                logger.info("%s already holds %d zero weights: its %d nonzero weights are kept first in the "
                            "initial mask of %d active", layer.name, layer.numel - nz, nz, self.nnz[layer.name])
            n = layer.name
            flat = random_grouped_mask(layer.numel, self.group[n], self.nnz[n] // self._groups[n], self.generator,
                                       None if prefer is None else self._in_group_order(n, prefer))
            masks[layer.name] = self.engine.shard(layer.name, self._from_group_order(n, flat)).to(w.device)
        self.engine.sync_masks(masks)
        self.masks = masks
        #: live output rows (all layer-wide) and rows removed by neuron ablation, of each ablatable layer
        self.live_rows: dict[str, int] = {n: self._groups[n] for n in self.ablatable}
        self.ablated_rows: dict[str, int] = {n: 0 for n in self.ablatable}
        self.engine.bind(self.layers, self.masks, self.wants_dense_grad)
        for name, mask in self.masks.items():
            self.engine.apply_mask(name, mask)
            self.engine.reset_optimizer_state(name, mask)
        rezero = cfg.rezero_weights
        if rezero is None:
            rezero = not self.engine.optimizer_keeps_zeros()
        if rezero:
            self.engine.add_post_step_hook(self.engine.mask_weights)
        self.rezero_weights = rezero
        logger.info(
            "%s: %d masked layers, target sparsity %.4f (%s, %s), planned global density %.6f, "
            "%d mask updates (delta=%d, t_end=%d)", type(self).__name__, len(self.layers),
            cfg.sparsity, cfg.distribution, self.structure.describe(), self.planned_density,
            self.schedule.num_updates if self.updates else 0, self.schedule.delta, self.schedule.t_end)

    # ------------------------------------------------------------------ queries
    @property
    def step_count(self) -> int:
        """Number of completed ``step()`` calls (the index of the next step)."""
        return self._step

    @property
    def planned_density(self) -> float:
        """The plan at the end of training: active weights / all weights over the masked layers,
        after flooring each layer's zeros and rounding to the structure. What the masks hold is
        :meth:`measure`."""
        return sum(self.final_nnz.values()) / sum(self._numel.values())

    @property
    def target_density(self) -> float:
        """The counts in force now (they change over time for GMP) / all weights of the masked layers."""
        return sum(self.nnz.values()) / sum(self._numel.values())

    def layer_densities(self) -> dict[str, float]:
        """The density in force now of each masked layer (nnz / numel): what FLOPs are counted with."""
        return {l.name: self.nnz[l.name] / l.numel for l in self.layers}

    @torch.no_grad()
    def measure(self) -> "DensityReport":
        """Counted now, over all ranks' shards: each layer's active mask entries and nonzero weights.

        The two differ where a trained weight sits at exactly 0 under an active mask entry (a
        position just grown, or an optimizer that lands on 0). One host sync; a collective on
        sharded engines, so every rank calls it. Weights are read as the engine keeps them for the
        optimizer (DeepSpeed: the fp32 master)."""
        counts = []
        for layer in self.layers:
            mask = self.masks[layer.name]
            w = self.engine.weight(layer.name)
            counts.append(torch.stack([torch.count_nonzero(mask).cpu(), torch.count_nonzero(w).cpu()]))
        total = self.engine.total(torch.stack(counts)).tolist()
        return DensityReport({l.name: (int(a), int(nz), l.numel) for l, (a, nz) in zip(self.layers, total)})

    def wants_dense_grad(self) -> bool:
        """Does the current step's dense gradient feed a grow score? (Engines ask this during
        backward: on other steps gradients may be masked before or during the all-reduce.)"""
        return self.needs_dense_grad and (self._pending is not None or self.schedule.accumulates(self._step))

    def is_update_step(self, t: int | None = None) -> bool:
        """Will step ``t`` (default: the next one) update the masks?"""
        t = self._step if t is None else t
        return self.updates and (self.schedule.is_update_step(t) or self._pending is not None)

    # ------------------------------------------------------------------ the step
    def step(self) -> bool:
        """Call after backward, before the optimizer step. Returns whether to run the optimizer step.

        On an ordinary step the gradients are masked in place and True is returned. On a mask
        update step the masks are updated from the current weights and (averaged) dense
        gradients; with ``skip_step_on_update`` it returns False and the optimizer step must be
        skipped. If the gradients feeding an update are not finite, the update is postponed to
        the next step whose gradients are finite, and the step proceeds as an ordinary one.
        """
        t = self._step
        sched = self.schedule
        due_at = self._pending if self._pending is not None else (t if sched.is_update_step(t) else None)
        due = self.updates and due_at is not None
        grads: dict[str, Tensor] | None = None
        if self.needs_dense_grad and (due or sched.accumulates(t)):
            grads = self._read_finite_grads(t)
        updated = False
        if due:
            if self.needs_dense_grad and grads is None and self._score_count == 0:
                if self._pending is None:
                    logger.warning("step %d: mask update postponed: gradients are not finite", t)
                self._pending = due_at
            else:
                self._update(t, due_at, grads)
                self._pending = None
                updated = True
        if updated and self.skip_step_on_update:
            self._step += 1
            return False
        self.engine.mask_grads()
        self._step += 1
        return True

    def _read_finite_grads(self, t: int) -> dict[str, Tensor] | None:
        """Dense grads of all masked layers, or None if any is not finite (one host sync)."""
        grads: dict[str, Tensor] = {}
        for layer in self.layers:
            g = self.engine.dense_grad(layer.name)
            mask = self.masks[layer.name]
            grads[layer.name] = g if g is not None else torch.zeros(mask.shape, device=mask.device)
        finite = torch.stack([torch.isfinite(g).all() for g in grads.values()]).all()
        bad = self.engine.total((~finite).to(torch.int64).view(1))   # over the shards of sharded masks
        if int(bad.item()):
            self.skipped_nonfinite += 1
            logger.warning("step %d: non-finite dense gradient, not used for the grow score", t)
            return None
        if self.config.grad_accumulation_n > 1:
            if self._score is None:
                self._score = {n: torch.zeros(g.shape, dtype=torch.float32, device=g.device)
                               for n, g in grads.items()}
            for n, g in grads.items():
                self._score[n].add_(g)
            self._score_count += 1
        return grads

    def _update(self, t: int, due_at: int, grads: Mapping[str, Tensor] | None) -> None:
        """Drop/grow the counts of the update due at ``due_at``, sync the masks, apply them to
        weights and optimizer state, check every layer's active count."""
        self.engine.check_masks(self.masks)      # the masks we start from agree on every rank
        ks, fraction = self.counts(due_at)
        expected = {n: self.nnz[n] - kd + kg for n, (kd, kg) in ks.items()}
        plan = {n: Change(kd, kg, self.group[n], expected[n] // self._groups[n]) for n, (kd, kg) in ks.items()}
        start, ablated = self.masks, {}
        if self.ablatable:
            start, plan, expected, ablated = self._ablate(plan, expected, due_at, grads)
        grow_score = lambda name: self.grow_score(name, grads)    # noqa: E731
        chosen = self.engine.select(start, {n: c for n, c in plan.items() if n not in self._transposed},
                                    self.drop_score, grow_score)
        chosen.update({n: self._select_transposed(n, start[n], c, grow_score)
                       for n, c in plan.items() if n in self._transposed})
        new_masks = {n: c[0] for n, c in chosen.items()}
        changes = {n: (c[1], c[2]) for n, c in chosen.items()}
        for n, gone in ablated.items():          # the weights of removed rows are dropped too
            changes[n] = (torch.cat([gone, changes[n][0]]), changes[n][1])
        self.engine.sync_masks(new_masks)
        names = list(new_masks)
        # per layer (active, grown, groups off their quota) over all ranks: the exact active count and
        # the structure are checked on every update
        rows = [torch.stack([torch.count_nonzero(new_masks[n]), self._off_quota(n, new_masks[n], plan[n].quota)])
                for n in names]
        local = torch.cat([torch.stack(rows).cpu(), torch.tensor([[changes[n][1].numel()] for n in names])], dim=1) \
            if rows else torch.zeros(0, 3, dtype=torch.int64)
        counts = self.engine.total(local[:, [0, 2, 1]])       # (active, grown, groups off quota)
        per_layer: dict[str, float] = {}
        grown_total = 0
        for i, name in enumerate(names):
            active, grown = int(counts[i, 0]), int(counts[i, 1])
            if active != expected[name] or int(counts[i, 2]):
                quota = plan[name].quota
                raise RuntimeError(f"step {t}: layer {name!r} has {active} active weights after the mask update "
                                   f"({int(counts[i, 2])} groups of {self.group[name]} not holding "
                                   f"{quota if isinstance(quota, int) else 'theirs'}), expected {expected[name]}")
            old, new = self.masks[name], new_masks[name]
            dropped, grown_idx = changes[name]
            self.engine.apply_update(name, old, new, dropped, grown_idx)
            old.copy_(new)
            grown_total += grown
            self.nnz[name] = expected[name]
            per_layer[name] = grown / expected[name] if expected[name] else 0.0
        active_total = sum(self.nnz.values())
        self.last_update = {
            "step": t, "due_step": due_at, "drop_fraction": fraction,
            "churn": grown_total / active_total, "churn_per_layer": per_layer,
        }
        if self.ablatable:
            self.last_update["ablated_rows"] = dict(self.ablated_rows)
        self._score = None
        self._score_count = 0
        logger.debug("step %d: mask update, drop fraction %.4f, churn %.4f of active weights",
                    t, fraction, self.last_update["churn"])

    def _ablate(self, plan: dict[str, Change], expected: dict[str, int], due_at: int,
                grads: Mapping[str, Tensor] | None
                ) -> tuple[dict[str, Tensor], dict[str, Change], dict[str, int], dict[str, Tensor]]:
        """SRigL's neuron ablation (Lasby et al., ICLR 2024), before the drop and grow of an update.

        In each ablatable layer that updates, with ``K`` = its active count after the drop: the
        salient weights are the ``K`` largest |weight| together with the ``K`` largest grow scores
        (|dense gradient|), each an exact top-k over the whole layer, ties to the lower index. A live
        output row with fewer than ``gamma_sal x`` its fan-in salient weights is removed: all its
        weights drop and it never grows again (a removed row holds no weight, so it stays removed
        across updates and checkpoints). The other ``L`` rows then hold ``min(row, planned // L)``
        each: the fan-in rises, the layer's count may end below the planned one by less than ``L``.
        The removed weights count towards the update's drop (k_drop shrinks by them, as in
        sparsimony's SRigL). A layer keeps every row when removing them would leave too few rows
        to hold its planned count (or none).

        Returns (masks to select from, the plan, expected counts, per layer the flat positions of
        this rank's removed weights)."""
        names = [n for n in self.ablatable if n in plan]
        if not names:
            return self.masks, plan, expected, {}
        gamma = float(self.config.gamma_sal)
        k_after = {n: self.nnz[n] - plan[n].k_drop for n in names}
        tops = self.engine.top_positions([(n, self.drop_score(n), k_after[n]) for n in names]
                                         + [(n, self.grow_score(n, grads), k_after[n]) for n in names])
        by_w, by_g = tops[:len(names)], tops[len(names):]
        planned = type(self).counts_at(self.schedule, self.final_nnz, self._numel, due_at, self._groups)
        stats, candidates, live = [], {}, {}
        for n, pw, pg in zip(names, by_w, by_g):
            mask, row = self.masks[n], self.group[n]
            rows = mask.reshape(-1, row)
            salient = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
            salient[pw] = True
            salient[pg] = True
            live[n] = rows.any(1)
            fan_in = self.nnz[n] // self.live_rows[n]          # every live row holds it (checked each update)
            candidates[n] = live[n] & (salient.view(-1, row).sum(1) < gamma * fan_in)
            stats.append(torch.stack([candidates[n].sum(), live[n].sum()]))
        totals = self.engine.total(torch.stack(stats).cpu()).tolist()      # (rows to remove, live rows) per layer
        start, ablated = dict(self.masks), {}
        plan, expected = dict(plan), dict(expected)
        for n, (remove, alive) in zip(names, totals):
            row, mask = self.group[n], self.masks[n]
            left = alive - remove
            if remove == 0 or left < 1 or left * row < planned[n]:
                if alive < self._groups[n]:          # rows removed before: they stay empty
                    plan[n] = plan[n]._replace(quota=torch.where(live[n], self.nnz[n] // alive, 0))
                continue
            fan_in = self.nnz[n] // alive
            gone_rows = candidates[n]
            keep = mask.reshape(-1, row) & ~gone_rows.unsqueeze(1)
            ablated[n] = (mask.reshape(-1) & ~keep.reshape(-1)).nonzero().view(-1)
            start[n] = keep.view(mask.shape)
            new_fan_in = min(row, planned[n] // left)
            quota = torch.where(live[n] & ~gone_rows, new_fan_in, 0)
            k_drop = max(0, plan[n].k_drop - remove * fan_in)
            expected[n] = new_fan_in * left
            after_drop = self.nnz[n] - remove * fan_in - k_drop
            plan[n] = Change(k_drop, expected[n] - after_drop, row, quota)
            self.live_rows[n] = left
            self.ablated_rows[n] = self._numel[n] // row - left
            logger.info("step %d: %s: %d output rows removed (neuron ablation, gamma_sal=%g); %d live rows of "
                        "fan-in %d", due_at, n, remove, gamma, left, new_fan_in)
        return start, plan, expected, ablated

    def _accept_counts(self, step: int, want: dict[str, int], held: dict[str, int]) -> dict[str, int]:
        """The counts a loaded checkpoint must hold at ``step``, given what its masks hold: ``want``
        (a method whose per-layer counts depend on the weights, such as gap_cyclic's global prune,
        checks what it can and accepts the rest)."""
        return want

    def _quotas(self, name: str, mask: Tensor, planned: int, live_total: int) -> tuple[int, Tensor | int]:
        """(the count ``name`` holds, its groups' quota) with ``live_total`` live rows of a layer whose
        removed rows (neuron ablation) hold nothing: ``min(row, planned // live)`` per live row."""
        if live_total == self._groups[name]:
            return planned, planned // self._groups[name]
        row = self.group[name]
        per_row = min(row, planned // live_total)
        return per_row * live_total, torch.where(mask.reshape(-1, row).any(1), per_row, 0)

    def _off_quota(self, name: str, mask: Tensor, quota: int | Tensor) -> Tensor:
        """How many of this rank's groups of ``name`` do not hold ``quota`` active (an int64 on the
        mask's device; per group where a tensor); 0 for a whole-layer group (its count is checked
        over all ranks instead)."""
        g = self.group[name]
        if g == self._numel[name]:
            return torch.zeros((), dtype=torch.int64, device=mask.device)
        if name in self._transposed:            # groups across shards: counted whole, then as this rank's part
            mask = mask.to(self.masks[name].device)      # a loaded state's masks are on the CPU
            groups = self._in_group_order(name, self.engine.whole(name, mask)).view(-1, g)
            first = torch.zeros(groups.shape, dtype=torch.bool, device=groups.device)
            first[:, 0] = groups.sum(1) != quota            # one mark per group off its quota, counted once
            return torch.count_nonzero(self.engine.shard(name, self._from_group_order(name, first.view(-1))))
        return torch.count_nonzero(mask.reshape(-1, g).sum(1) != quota)

    # ------------------------------------------------------------------ layers stored (in, out)
    def _in_group_order(self, name: str, whole: Tensor) -> Tensor:
        """A whole layer's tensor, flat, in the order its groups are consecutive in: row-major, or
        that of its transpose for a grouped layer stored (in, out)."""
        return whole.t().reshape(-1) if name in self._transposed else whole.reshape(-1)

    def _from_group_order(self, name: str, flat: Tensor) -> Tensor:
        """The inverse of :meth:`_in_group_order`: the whole layer of its stored shape."""
        if name in self._transposed:
            rows, cols = self.shapes[name]
            return flat.view(cols, rows).t().contiguous()
        return flat.view(self.shapes[name])

    def _select_transposed(self, name: str, mask: Tensor, change: Change, grow_score: Any
                           ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`Engine.select` for a grouped layer stored (in, out): its groups (columns, or blocks
        along them) cross the shards of an engine that shards rows, so the mask and scores are read
        whole (a collective there), selected in group order (ties to the lower position of the
        transpose) by the same rule, and this rank's part kept."""
        whole = self.engine.whole
        drop = self._in_group_order(name, whole(name, self.drop_score(name)))
        grow = self._in_group_order(name, whole(name, grow_score(name))) if change.k_grow else None
        new, _, _ = select_layer(self._in_group_order(name, whole(name, mask)), drop, grow, change)
        new = self.engine.shard(name, self._from_group_order(name, new)).to(mask.device)
        return (new, (mask & ~new).view(-1).nonzero().view(-1), (new & ~mask).view(-1).nonzero().view(-1))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Masks, step, RNG state, pending update and accumulated scores (all on CPU)."""
        return {
            "version": STATE_VERSION,
            "method": self.method,
            "step": self._step,
            "pending": self._pending,
            "masks": {n: m.detach().cpu().clone() for n, m in self.masks.items()},
            "generator": self.generator.get_state(),
            "score": None if self._score is None else {n: s.cpu().clone() for n, s in self._score.items()},
            "score_count": self._score_count,
            "skipped_nonfinite": self.skipped_nonfinite,
            "last_update": self.last_update,
        }

    def load_state_dict(self, state: Mapping[str, Any], *, reset_optimizer_state: bool = True) -> None:
        """Restore a :meth:`state_dict`; weights are re-zeroed under the loaded masks.

        Load the model and optimizer state first. Masks must match this model's masked layers,
        shapes, dtype and active counts, otherwise a ``ValueError`` names the first mismatch.
        ``reset_optimizer_state=False`` trusts the loaded optimizer state to be zero under the
        masks (it is, when it was saved with them: DeepSpeed links its optimizer state only at
        the next step after a load).
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"sparsifier state version {state.get('version')!r} is not {STATE_VERSION}")
        if state.get("method") != self.method:
            raise ValueError(f"sparsifier state is for method {state.get('method')!r}, this is {self.method!r}")
        masks = state["masks"]
        expected = {l.name for l in self.layers}
        if set(masks) != expected:
            missing, extra = sorted(expected - set(masks)), sorted(set(masks) - expected)
            raise ValueError(f"sparsifier state masks do not match the model: missing {missing}, unexpected {extra}")
        for layer in self.layers:
            m, here = masks[layer.name], tuple(self.masks[layer.name].shape)   # whole, or this rank's shard
            if m.dtype != torch.bool or tuple(m.shape) != here:
                raise ValueError(
                    f"mask {layer.name!r}: expected bool {here}, got {m.dtype} {tuple(m.shape)}")
        step = int(state["step"])
        want = self._counts_in_force(step)
        quotas: dict[str, int | Tensor] = {n: want[n] // self._groups[n] for n in want}
        live_rows: dict[str, int] = {}
        if self.ablatable:              # rows removed by neuron ablation hold nothing; the others share the count
            live = self.engine.total(torch.stack([masks[n].reshape(-1, self.group[n]).any(1).sum()
                                                  for n in self.ablatable]).cpu())
            for n, alive in zip(self.ablatable, live.tolist()):
                if alive == 0:
                    raise ValueError(f"mask {n!r} has no active weight (every output row removed?)")
                want[n], quotas[n] = self._quotas(n, masks[n], want[n], alive)
                live_rows[n] = alive
        active = self.engine.total(torch.stack([
            torch.stack([torch.count_nonzero(masks[l.name]),
                         self._off_quota(l.name, masks[l.name], quotas[l.name])]).cpu()
            for l in self.layers]))
        want = self._accept_counts(step, want, {l.name: int(n) for l, (n, _) in zip(self.layers, active.tolist())})
        for layer, (n, off) in zip(self.layers, active.tolist()):
            if n != want[layer.name]:
                raise ValueError(
                    f"mask {layer.name!r} has {n} active weights, this sparsifier expects "
                    f"{want[layer.name]} at step {step} (another sparsity, distribution or schedule?)")
            if off:
                q = quotas[layer.name]
                raise ValueError(
                    f"mask {layer.name!r}: {off} groups of {self.group[layer.name]} do not hold "
                    f"{q if isinstance(q, int) else 'the same count'} active weights as structure "
                    f"{self.structure.describe()!r} needs (saved with another structure?)")
        self.nnz = want
        self.live_rows.update(live_rows)
        self.ablated_rows.update({n: self._groups[n] - alive for n, alive in live_rows.items()})
        for layer in self.layers:
            self.masks[layer.name].copy_(masks[layer.name])
            w = self.engine.weight(layer.name)
            stray = int(torch.count_nonzero(w[~self.masks[layer.name].to(w.device)]))
            if stray:
                logger.warning("%s: %d weights under the loaded mask are not zero; re-zeroed", layer.name, stray)
            self.engine.apply_mask(layer.name, self.masks[layer.name])
            if reset_optimizer_state:
                self.engine.reset_optimizer_state(layer.name, self.masks[layer.name])
        self._step = step
        self._pending = state["pending"]
        self.generator.set_state(state["generator"])
        score = state.get("score")
        if score is None:
            self._score = None
        else:
            self._score = {n: s.to(self.masks[n].device) for n, s in score.items()}
        self._score_count = int(state.get("score_count", 0))
        self.skipped_nonfinite = int(state.get("skipped_nonfinite", 0))
        self.last_update = state.get("last_update")


@register_method
class Static(Sparsifier):
    """Fixed random sparse mask: never updated."""

    method = "static"
    updates = False


@register_method
class SET(Static):
    """Sparse Evolutionary Training: drop by magnitude, grow at random positions."""

    method = "set"
    updates = True

    def grow_score(self, name: str, grads: Mapping[str, Tensor] | None) -> Tensor:
        mask = self.masks[name]       # drawn whole on every rank (same generator), then this rank's part
        scores = torch.rand(self._numel[name], generator=self.generator)    # in group order (see _in_group_order)
        return self.engine.shard(name, self._from_group_order(name, scores)).to(mask.device)


@register_method
class RigL(SET):
    """RigL: drop by magnitude, grow by |dense gradient| (averaged over ``grad_accumulation_n`` steps)."""

    method = "rigl"
    needs_dense_grad = True

    def grow_score(self, name: str, grads: Mapping[str, Tensor] | None) -> Tensor:
        if self._score_count > 0 and self._score is not None:
            return self._score[name].div(self._score_count).abs_()
        assert grads is not None
        return grads[name].abs()


def build_sparsifier(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    config: SparsityConfig,
    *,
    total_steps: int,
    engine: Engine | None = None,
) -> Sparsifier:
    """The sparsifier class registered under ``config.method``."""
    return get_method(config.method)(model, optimizer, total_steps=total_steps, config=config, engine=engine)
