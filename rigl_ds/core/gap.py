"""GaP, scheduled grow-and-prune. C-GaP: cyclic (Ma et al., "Effective Model Sparsification by Scheduled
Grow-and-Prune Methods", ICLR 2022), method ``gap_cyclic``.

The masked layers, in model order, are cut into ``gap_partitions`` (kappa) runs of consecutive
layers holding about equal numbers of weights. The run starts from a random mask at each layer's
target count, except partition 0, which is dense. Training then goes in phases of ``gap_phase``
(T) steps: in phase j partition ``j mod kappa`` is dense. At the step that ends a phase the dense
partition is pruned back to each layer's target count by |w| (per layer: the paper's "uniform"
pruning, with the distribution's counts) and the next partition grows dense: every masked
position of it becomes active with weight 0 (as RigL's grown weights) and fresh optimizer state.
After ``gap_rounds`` rounds (kappa * rounds phases) the last dense partition is pruned and the
masks stay fixed: the rest of training fine-tunes the sparse model.

Choices where the paper and its code leave room, each a knob of ``sparsity`` (README, "Methods"):

* T is a step count (int) or a fraction of total training steps (float), like ``t_end``;
* partitions are balanced by weight count over the layers in model order (the authors' Transformer
  scripts cut by blocks of layers); a layer kept dense by the distribution still counts in its
  partition but never changes;
* the prune at the end of a phase and the growth of the next partition are one mask update at
  that step, whose optimizer step is skipped (as RigL's; ``skip_step_on_update``): the grown
  weights start training at 0 from the next step on every engine, whether or not it sent the
  gradients of masked positions;
* ``gap_prune: layer`` prunes each layer to the distribution's count (the paper's "uniform";
  ``erk`` works the same way); ``gap_prune: global`` (the paper's "non-uniform") keeps the leaving
  partition's planned total with one |w| threshold over all its layers, so its layers' counts
  follow their weights (the model's total stays exact).

P-GaP (parallel), method ``gap_parallel``, is :class:`GaPParallel` below.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from .methods import register_method
from .selection import k_extreme_positions
from .sparsifier import Sparsifier, SparsityConfig


@dataclass(frozen=True)
class GaPSchedule:
    """When C-GaP changes masks: every ``delta`` (= T) steps up to ``t_end`` = kappa * rounds * T."""

    delta: int
    partitions: int
    rounds: int

    def __post_init__(self) -> None:
        for key, v, least in (("gap_phase (steps)", self.delta, 1), ("gap_partitions", self.partitions, 2),
                              ("gap_rounds", self.rounds, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ValueError(f"{key} must be an integer >= {least}, got {v!r}"
                                 + (" (with one partition the whole model would be dense between prunes)"
                                    if key == "gap_partitions" else ""))

    @classmethod
    def from_config(cls, config: SparsityConfig, total_steps: int) -> "GaPSchedule":
        phase = config.gap_phase
        if isinstance(phase, bool) or not isinstance(phase, (int, float)) or phase <= 0 or \
                (isinstance(phase, float) and not (math.isfinite(phase) and phase <= 1.0)):
            raise ValueError(f"gap_phase must be a fraction of total steps in (0, 1] or an integer step count >= 1, "
                             f"got {phase!r}")
        steps = max(1, int(round(phase * total_steps))) if isinstance(phase, float) else phase
        sched = cls(delta=steps, partitions=config.gap_partitions, rounds=config.gap_rounds)
        if sched.t_end >= total_steps:
            raise ValueError(f"{config.method}'s last prune (step {sched.t_end} = {sched.formula()}) is not before the "
                             f"end of training ({total_steps} steps): no sparse fine-tuning would follow; lower "
                             "gap_phase or gap_rounds")
        return sched

    def formula(self) -> str:
        return f"gap_partitions {self.partitions} x gap_rounds {self.rounds} x gap_phase {self.delta} steps"

    @property
    def num_updates(self) -> int:
        return self.partitions * self.rounds

    @property
    def t_end(self) -> int:
        """The last mask update (the final prune); masks are fixed after it."""
        return self.num_updates * self.delta

    def update_steps(self) -> list[int]:
        return [j * self.delta for j in range(1, self.num_updates + 1)]

    def is_update_step(self, t: int) -> bool:
        return 0 < t <= self.t_end and t % self.delta == 0

    def accumulates(self, t: int) -> bool:
        return False            # no gradient feeds a GaP decision

    def dense_partition(self, step: int) -> int | None:
        """The partition that is dense at ``step`` (after the updates before it), None once fine-tuning."""
        phase = 0 if step <= 0 else min(self.num_updates, (step - 1) // self.delta)
        return None if phase >= self.num_updates else phase % self.partitions


def partition_layers(numel: Mapping[str, int], kappa: int) -> list[tuple[str, ...]]:
    """The masked layers (in ``numel``'s order: model order) cut into ``kappa`` runs of consecutive
    layers: cut j (of kappa - 1) falls where the running weight count is closest to j/kappa of the
    total (the earlier cut on a tie), leaving at least one layer per partition. ValueError if there
    are fewer layers than kappa."""
    names = list(numel)
    if kappa > len(names):
        raise ValueError(f"gap_partitions={kappa} exceeds the {len(names)} masked layers: every partition needs "
                         f"at least one layer; lower gap_partitions")
    prefix = [0]
    for n in names:
        prefix.append(prefix[-1] + numel[n])
    total, cuts = prefix[-1], [0]
    for j in range(1, kappa):
        lo, hi = cuts[-1] + 1, len(names) - (kappa - j)          # cut after layer i-1: 1 <= i, room for the rest
        cuts.append(min(range(lo, hi + 1), key=lambda i: (abs(prefix[i] * kappa - j * total), i)))
    cuts.append(len(names))
    return [tuple(names[a:b]) for a, b in zip(cuts, cuts[1:])]


class _GaP(Sparsifier):
    """What C-GaP and P-GaP share: a phase schedule of their own, no gradient read, the optimizer
    step of a mask change skipped, and growth of every inactive position of a growing layer."""

    updates = True
    needs_dense_grad = False
    skips_step_on_update = True
    schedule_type: type[GaPSchedule] = GaPSchedule

    @classmethod
    def make_schedule(cls, config: SparsityConfig, total_steps: int) -> GaPSchedule:
        return cls.schedule_type.from_config(config, total_steps)

    def grow_score(self, name: str, grads: Mapping[str, Tensor] | None) -> Tensor:
        """Every inactive position of a growing layer becomes active: the score only orders ties."""
        return torch.zeros_like(self.masks[name], dtype=torch.float32)


@register_method
class GaPCyclic(_GaP):
    """C-GaP: one partition of layers dense at a time, cycled every ``gap_phase`` steps for
    ``gap_rounds`` rounds, each pruned back to its target by |w| when its phase ends."""

    method = "gap_cyclic"

    @classmethod
    def counts_at(cls, schedule: GaPSchedule, final: Mapping[str, int], numel: Mapping[str, int], step: int,
                  groups: Mapping[str, int]) -> dict[str, int]:
        dense = schedule.dense_partition(step)
        out = dict(final)
        if dense is not None:
            for n in partition_layers(numel, schedule.partitions)[dense]:
                out[n] = numel[n]
        return out

    @classmethod
    def timeline(cls, schedule: GaPSchedule, numel: Mapping[str, int]) -> list[dict[str, Any]]:
        """Which partition is dense from which step (``rigl-ds plan``): one entry per phase, then the
        fine-tuning. The update at step j*T runs after that step's backward, so the next partition is
        dense from step j*T + 1 (as the density timeline counts)."""
        parts = partition_layers(numel, schedule.partitions)
        out = []
        for j in range(schedule.num_updates):
            p = j % schedule.partitions
            out.append({"from_step": j * schedule.delta + (j > 0), "round": j // schedule.partitions + 1,
                        "dense_partition": p, "layers": list(parts[p])})
        out.append({"from_step": schedule.t_end + 1, "round": None, "dense_partition": None, "layers": []})
        return out

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: the layers of each partition (model order)
        self.partitions: list[tuple[str, ...]] = partition_layers(self._numel, self.schedule.partitions)

    @property
    def dense_partition(self) -> int | None:
        """The partition dense now (None once fine-tuning)."""
        return self.schedule.dense_partition(self._step)

    def counts(self, due_at: int) -> tuple[dict[str, tuple[int, int]], float]:
        """Prune the layers leaving their dense phase to their targets, grow the next partition's
        layers dense. The fraction reported is the share of active weights that changed."""
        sched, target = self.schedule, dict(self.nnz)
        before, after = sched.dense_partition(due_at), sched.dense_partition(due_at + 1)
        if before is not None:
            leaving = list(self.partitions[before])
            target.update({n: self.final_nnz[n] for n in leaving})
            if self.config.gap_prune == "global":    # layers the distribution keeps dense stay out of it
                free = [n for n in leaving if self.final_nnz[n] < self._numel[n]]
                target.update(self._global_counts(free, sum(self.final_nnz[n] for n in free)))
        if after is not None:
            target.update({n: self._numel[n] for n in self.partitions[after]})
        out = {n: (self.nnz[n] - target[n], 0) if self.nnz[n] > target[n] else (0, target[n] - self.nnz[n])
               for n in self.nnz if self.nnz[n] != target[n]}
        before = sum(self.nnz.values())
        return out, (sum(kd + kg for kd, kg in out.values()) / before if before else 0.0)

    def _global_counts(self, names: list[str], keep: int) -> dict[str, int]:
        """Non-uniform prune (``gap_prune: global``): per layer of ``names``, how many of its weights are
        among the ``keep`` largest |w| over all of them (one threshold; at the threshold the earlier
        layers, then the lower positions, first). Reads each layer whole (a collective on sharded
        engines), once per phase change."""
        if not names:
            return {}
        whole = [self.engine.whole(n, self.drop_score(n)).reshape(-1) for n in names]
        whole = [v if v.dtype in (torch.float32, torch.float64) else v.float() for v in whole]   # fp16/bf16: exact in fp32
        if len({v.dtype for v in whole}) > 1:
            whole = [v.double() for v in whole]
        values = torch.cat(whole)
        if keep <= 0 or keep > values.numel():
            raise ValueError(f"cannot keep {keep} of the {values.numel()} weights of {names}")
        kept = k_extreme_positions(values, keep, largest=True)          # ties: the lower concatenated index
        ends = torch.tensor([v.numel() for v in whole], device=kept.device).cumsum(0)
        per_layer = torch.bincount(torch.bucketize(kept, ends, right=True), minlength=len(names)).tolist()
        return dict(zip(names, per_layer))

    def _accept_counts(self, step: int, want: dict[str, int], held: dict[str, int]) -> dict[str, int]:
        """With ``gap_prune: global`` a partition pruned at least once holds counts set by its
        threshold: its pruned layers may split their planned total in any way, the layers kept dense
        by the distribution stay dense; a partition not yet pruned, and the dense one, hold exactly
        the planned counts (checked by the caller). A wrong total is refused naming the partition."""
        if self.config.gap_prune != "global":
            return want
        out = dict(want)
        sched = self.schedule
        done = 0 if step <= 0 else min(sched.num_updates, (step - 1) // sched.delta)    # phases ended before step
        dense = sched.dense_partition(step)
        for i, part in enumerate(self.partitions):
            pruned = any(j % sched.partitions == i for j in range(done))
            if i == dense or not pruned:
                continue
            free = [n for n in part if self.final_nnz[n] < self._numel[n]]
            total, planned = sum(held[n] for n in free), sum(want[n] for n in free)
            if total != planned:
                raise ValueError(f"partition {i} ({', '.join(free)}) holds {total} active weights in its pruned "
                                 f"layers, this sparsifier expects {planned} at step {step} (gap_prune: global keeps "
                                 "each partition's total)")
            out.update({n: held[n] for n in free})
        return out

    def _update(self, t: int, due_at: int, grads: Mapping[str, Tensor] | None) -> None:
        super()._update(t, due_at, grads)
        dense = self.schedule.dense_partition(due_at + 1)
        self.last_update["dense_partition"] = -1 if dense is None else dense


@dataclass(frozen=True)
class ParallelSchedule(GaPSchedule):
    """When P-GaP merges: every ``delta`` (= T) steps for ``rounds`` rounds (all partitions grow at
    once, one per copy), so t_end = rounds * T."""

    @property
    def num_updates(self) -> int:
        return self.rounds

    def formula(self) -> str:
        return f"gap_rounds {self.rounds} x gap_phase {self.delta} steps"

    def dense_partition(self, step: int) -> int | None:
        raise TypeError("P-GaP has no single dense partition: copy i grows partition i (see copies_grow)")

    def copies_grow(self, step: int) -> bool:
        """Do the copies train apart at ``step`` (each with its own partition dense)? False once
        the last merge (at t_end) is done: the merged model is fine-tuned by every rank together."""
        return step <= self.t_end


@register_method
class GaPParallel(_GaP):
    """P-GaP: ``gap_partitions`` (kappa) copies of the model train apart, copy i with partition i
    dense; every ``gap_phase`` steps, for ``gap_rounds`` rounds, the copies merge (partition i and
    what lies with it taken from copy i), the merged model is pruned to its targets by |w| per layer,
    and each copy grows its partition again; after the last merge every rank fine-tunes the merged
    model with fixed masks.

    The world is split into kappa groups of consecutive ranks (``world % kappa == 0``), each
    data-parallel over its copy: the engine must support it (:meth:`CopiesMixin.split_copies
    <rigl_ds.engines.copies.CopiesMixin.split_copies>`: DDP, FSDP2, DeepSpeed). Choices, each written in README ("Methods"):

    * every rank keeps its slice of each global batch, so copy i trains on its ranks' share
      (1/kappa of every global batch) and the run costs the examples and steps of any other method;
    * the merge takes from copy i every parameter from its partition's first layer up to the next
      partition's first layer in ``named_parameters`` order (biases, norms; the parameters before
      the first masked layer go with partition 0), with their optimizer state; buffers (BatchNorm
      statistics) are rank 0's, as DDP broadcasts them every forward;
    * the prune after a merge is per layer to the distribution's count (the paper's P-GaP is
      uniform; ``gap_prune: global`` is refused); the copy's regrown positions start at 0 with fresh
      optimizer state, as C-GaP's; the optimizer step of a merge step is skipped.
    """

    method = "gap_parallel"
    schedule_type = ParallelSchedule

    @classmethod
    def counts_at(cls, schedule: ParallelSchedule, final: Mapping[str, int], numel: Mapping[str, int], step: int,
                  groups: Mapping[str, int]) -> dict[str, float]:
        """The mean over the copies (what the world computes, for ``plan`` and FLOPs): while the
        copies grow, each layer is dense in one copy of kappa; the final counts after the last merge."""
        if not schedule.copies_grow(step):
            return dict(final)
        k = schedule.partitions
        return {n: final[n] + (numel[n] - final[n]) / k for n in final}

    @classmethod
    def timeline(cls, schedule: ParallelSchedule, numel: Mapping[str, int]) -> list[dict[str, Any]]:
        parts = partition_layers(numel, schedule.partitions)
        out = [{"from_step": j * schedule.delta + (j > 0), "round": j + 1, "dense_partition": "parallel",
                "copies": [list(p) for p in parts]} for j in range(schedule.rounds)]
        out.append({"from_step": schedule.t_end + 1, "round": None, "dense_partition": None, "layers": []})
        return out

    def _initial_counts(self) -> dict[str, int]:
        return dict(self.final_nnz)          # the sparse start every copy shares; each then grows its own

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.config.gap_prune != "layer":
            raise ValueError("gap_parallel prunes each layer to its count (gap_prune: layer); gap_prune: "
                             f"{self.config.gap_prune} is a gap_cyclic choice")
        self.partitions: list[tuple[str, ...]] = partition_layers(self._numel, self.schedule.partitions)
        split = getattr(self.engine, "split_copies", None)
        if split is None:
            raise ValueError(f"gap_parallel needs an engine that splits the world into gap_partitions="
                             f"{self.schedule.partitions} copies (DDP, FSDP2, DeepSpeed); {type(self.engine).__name__} does not")
        #: the engine's copy groups: ``index`` (this rank's copy), ``size`` (ranks per copy)
        self.copies = split(self.schedule.partitions)
        self.copy: int = self.copies.index
        self._stage: dict[str, tuple[int, int]] = {}
        self._set_apart(self.schedule.copies_grow(self._step))
        self._stage_update(0, self._grow_counts())
        self.last_update = None

    # ------------------------------------------------------------------ counts
    def _own_counts(self, step: int) -> dict[str, int]:
        """The counts this copy holds at ``step``: its partition dense while the copies grow."""
        out = dict(self.final_nnz)
        if self.schedule.copies_grow(step):
            out.update({n: self._numel[n] for n in self.partitions[self.copy]})
        return out

    def _counts_in_force(self, step: int) -> dict[str, int]:
        return self._own_counts(step)

    def layer_densities(self) -> dict[str, float]:
        """The mean over the copies (what the world computes: training FLOPs are counted with it)."""
        counts = type(self).counts_at(self.schedule, self.final_nnz, self._numel, self._step, self._groups)
        return {n: counts[n] / self._numel[n] for n in counts}

    def _grow_counts(self) -> dict[str, tuple[int, int]]:
        return {n: (0, self._numel[n] - self.nnz[n]) for n in self.partitions[self.copy] if self.nnz[n] < self._numel[n]}

    def counts(self, due_at: int) -> tuple[dict[str, tuple[int, int]], float]:
        before = sum(self.nnz.values())
        moved = sum(kd + kg for kd, kg in self._stage.values())
        return dict(self._stage), (moved / before if before else 0.0)

    # ------------------------------------------------------------------ the merge
    def _set_apart(self, apart: bool) -> None:
        self.engine.set_copies_apart(apart)
        self.apart = apart

    def _stage_update(self, t: int, counts: dict[str, tuple[int, int]]) -> None:
        self._stage = counts
        try:
            Sparsifier._update(self, t, t, None)
        finally:
            self._stage = {}

    def _owners(self) -> dict[str, int]:
        return {n: i for i, part in enumerate(self.partitions) for n in part}

    def _update(self, t: int, due_at: int, grads: Mapping[str, Tensor] | None) -> None:
        """Merge the copies, prune every layer to its count (the same masks on every rank), then, unless
        this was the last merge, grow this copy's partition dense again."""
        self.engine.check_masks(self.masks)          # within each copy
        self.engine.merge_copies(self._owners())
        for n, m in self.masks.items():              # each layer arrives dense from the copy that grew it
            m.fill_(True)
            self.nnz[n] = self._numel[n]
        self._set_apart(False)
        self._stage_update(t, {n: (self._numel[n] - self.final_nnz[n], 0) for n in self.masks
                               if self.final_nnz[n] < self._numel[n]})
        record = dict(self.last_update)
        if self.schedule.copies_grow(due_at + 1):
            self._set_apart(True)
            self._stage_update(t, self._grow_counts())
        record.update(due_step=due_at, merged=True, dense_partition=self.copy if self.apart else -1)
        self.last_update = record

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """As :meth:`Sparsifier.state_dict`, with the sparse masks every copy shares (each copy's own
        partition, dense here, is read from another copy: a collective while the copies grow, so
        every rank calls it)."""
        state = super().state_dict()
        if self.apart:
            owners = self._owners()
            base = self.copies.masks_from_other_copies({n: self.masks[n] for n in self.masks}, owners)
            state["masks"] = {n: m.detach().cpu().clone() for n, m in base.items()}
        state["copies_grow"] = self.apart
        return state

    def load_state_dict(self, state: Mapping[str, Any], *, reset_optimizer_state: bool = True) -> None:
        """The saved masks are the shared sparse ones: this copy's partition is made dense again while
        the copies grow (the runtime has loaded this copy's weights and optimizer state)."""
        state = dict(state)
        apart = self.schedule.copies_grow(int(state["step"]))
        if bool(state.get("copies_grow", apart)) != apart:
            raise ValueError(f"gap_parallel state at step {state['step']} says the copies "
                             f"{'grow' if state.get('copies_grow') else 'are merged'}, this schedule says otherwise")
        if apart:
            masks = dict(state["masks"])
            for n in self.partitions[self.copy]:
                if n in masks:
                    masks[n] = torch.ones_like(masks[n])
            state["masks"] = masks
        self._set_apart(apart)
        super().load_state_dict(state, reset_optimizer_state=reset_optimizer_state)
