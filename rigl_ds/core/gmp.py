"""Gradual magnitude pruning (GMP): dense to sparse on a cubic schedule (Zhu & Gupta, "To prune, or
not to prune", 2017), the dense-to-sparse baseline of the RigL paper's tables.

Every ``delta`` steps from ``t_start`` the smallest-|w| active weights of each layer (of each group
of a structure) are pruned, nothing grows, until ``t_end``; the sparsity follows

    s_t = s_f + (s_i - s_f) * (1 - (t - t_start) / (t_end - t_start))**3,

with ``s_i = initial_sparsity`` (0: a dense start) and ``s_f = sparsity``. Per layer the same curve
scales the distribution's final zeros: layer l holds ``floor(Z_l * g(t))`` zeros, ``Z_l`` its
final zeros and ``g(t) = 1 - (1 - s_i/s_f) * (1 - p)**3``, ``p = (t - t_start)/(t_end - t_start)``
clipped to [0, 1], so the global sparsity follows s_t (up to each layer's floor), every count only
falls, and the last prune lands exactly on the distribution's counts.

Choices where the paper leaves room (knobs of ``sparsity``): prune steps are ``t_start + j*delta``
(j >= 1) up to the first one at or after ``t_end``, where p = 1; the optimizer step is not skipped
on a prune step (``skip_step_on_update`` defaults to false; pruned positions get zero gradient and
optimizer state, as RigL's dropped ones); with ``initial_sparsity`` > 0 the run starts from a random
mask at that sparsity (as ``static``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from .methods import register_method
from .sparsifier import Sparsifier, SparsityConfig


@dataclass(frozen=True)
class GMPSchedule:
    """When GMP prunes and how far along the cubic curve each prune step is."""

    delta: int
    t_start: int
    t_end: int
    start_ratio: float      # s_i / s_f: where the curve starts, as a fraction of the final zeros

    def __post_init__(self) -> None:
        if isinstance(self.delta, bool) or not isinstance(self.delta, int) or self.delta < 1:
            raise ValueError(f"delta must be an integer >= 1, got {self.delta!r}")
        if not 0 <= self.t_start < self.t_end:
            raise ValueError(f"gmp needs 0 <= t_start < t_end, got t_start={self.t_start}, t_end={self.t_end}")

    @classmethod
    def from_config(cls, config: SparsityConfig, total_steps: int) -> "GMPSchedule":
        def step(v: float | int, key: str) -> int:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or \
                    (isinstance(v, float) and not (math.isfinite(v) and v <= 1.0)):
                raise ValueError(f"{key} must be a fraction in [0, 1] or an integer step >= 0, got {v!r}")
            return int(round(v * total_steps)) if isinstance(v, float) else v
        ratio = config.initial_sparsity / config.sparsity if config.sparsity > 0 else 1.0
        sched = cls(delta=config.delta, t_start=step(config.t_start, "t_start"), t_end=step(config.t_end, "t_end"),
                    start_ratio=ratio)
        if sched.last_step >= total_steps:
            raise ValueError(f"gmp's last prune (step {sched.last_step}: the first t_start + k*delta at or after "
                             f"t_end={sched.t_end}) is not before the end of training ({total_steps} steps): the "
                             "target sparsity would never be reached; lower t_end or delta")
        return sched

    def update_steps(self) -> list[int]:
        """Every prune step: t_start + j*delta for j >= 1, up to the first one at or after t_end."""
        return [self.t_start + j * self.delta for j in range(1, self.num_updates + 1)]

    @property
    def num_updates(self) -> int:
        return -(-(self.t_end - self.t_start) // self.delta)

    def updates_before(self, step: int) -> int:
        """How many prunes happen at steps before ``step``."""
        return min(self.num_updates, max(0, (step - self.t_start - 1) // self.delta))

    @property
    def last_step(self) -> int:
        """The last prune step (where the final counts are reached)."""
        return self.t_start + self.num_updates * self.delta

    def is_update_step(self, t: int) -> bool:
        return self.t_start < t <= self.last_step and (t - self.t_start) % self.delta == 0

    def accumulates(self, t: int) -> bool:
        return False            # no gradient feeds a GMP decision

    def zeros_fraction(self, t: int) -> float:
        """g(t): the fraction of each layer's final zeros in force after the prune at step t."""
        p = min(1.0, max(0.0, (t - self.t_start) / (self.t_end - self.t_start)))
        return 1.0 - (1.0 - self.start_ratio) * (1.0 - p) ** 3


def layer_counts(final: Mapping[str, int], numel: Mapping[str, int], g: float, groups: Mapping[str, int], *,
                 last: bool) -> dict[str, int]:
    """Active weights per layer with ``floor(Z_l * g)`` zeros (``Z_l = numel - final``), floored to a
    multiple of the layer's number of ``groups`` (a structure keeps the same count in every group:
    a 2:4 layer goes 4:4, 3:4, 2:4); exactly the final counts at the last prune step."""
    if last:
        return dict(final)
    out = {}
    for n in final:
        zeros = min(numel[n] - final[n], math.floor((numel[n] - final[n]) * g + 1e-9))
        out[n] = numel[n] - zeros // groups[n] * groups[n]
    return out


@register_method
class GMP(Sparsifier):
    """Gradual magnitude pruning: starts dense (or at ``initial_sparsity``), prunes the smallest |w|
    of each layer every ``delta`` steps along the cubic schedule, grows nothing."""

    method = "gmp"
    updates = True
    needs_dense_grad = False
    skips_step_on_update = False

    @classmethod
    def make_schedule(cls, config: SparsityConfig, total_steps: int) -> GMPSchedule:
        return GMPSchedule.from_config(config, total_steps)

    @classmethod
    def counts_at(cls, schedule: GMPSchedule, final: Mapping[str, int], numel: Mapping[str, int],
                  step: int, groups: Mapping[str, int]) -> dict[str, int]:
        u = schedule.t_start + schedule.updates_before(step) * schedule.delta    # the last prune before step
        return layer_counts(final, numel, schedule.zeros_fraction(u), groups, last=u == schedule.last_step)

    def counts(self, due_at: int) -> tuple[dict[str, tuple[int, int]], float]:
        """Prune each layer down to its count on the curve at ``due_at``; grow nothing."""
        sched = self.schedule
        target = layer_counts(self.final_nnz, self._numel, sched.zeros_fraction(due_at), self._groups,
                              last=due_at == sched.last_step)
        out = {n: (self.nnz[n] - target[n], 0) for n in self.nnz if self.nnz[n] > target[n]}
        before = sum(self.nnz.values())
        return out, (sum(kd for kd, _ in out.values()) / before if before else 0.0)
