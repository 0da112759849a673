"""C-GaP: cyclic scheduled grow-and-prune (Ma et al., "Effective Model Sparsification by Scheduled
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
  follow their weights (the model's total stays exact); P-GaP is not built yet.
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
            raise ValueError(f"gap_cyclic's last prune (step {sched.t_end} = gap_partitions {sched.partitions} x "
                             f"gap_rounds {sched.rounds} x gap_phase {steps} steps) is not before the end of training "
                             f"({total_steps} steps): no sparse fine-tuning would follow; lower gap_phase or gap_rounds")
        return sched

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


@register_method
class GaPCyclic(Sparsifier):
    """C-GaP: one partition of layers dense at a time, cycled every ``gap_phase`` steps for
    ``gap_rounds`` rounds, each pruned back to its target by |w| when its phase ends."""

    method = "gap_cyclic"
    updates = True
    needs_dense_grad = False
    skips_step_on_update = True

    @classmethod
    def make_schedule(cls, config: SparsityConfig, total_steps: int) -> GaPSchedule:
        return GaPSchedule.from_config(config, total_steps)

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

    def grow_score(self, name: str, grads: Mapping[str, Tensor] | None) -> Tensor:
        """Every inactive position of a growing layer becomes active: the score only orders ties."""
        return torch.zeros_like(self.masks[name], dtype=torch.float32)

    def _update(self, t: int, due_at: int, grads: Mapping[str, Tensor] | None) -> None:
        super()._update(t, due_at, grads)
        dense = self.schedule.dense_partition(due_at + 1)
        self.last_update["dense_partition"] = -1 if dense is None else dense
