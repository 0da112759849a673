"""When masks change and by how much (SPEC §4–§5).

Step numbering: ``t`` is the 0-based index of the current optimizer step (the number of
``Sparsifier.step()`` calls made before it). A mask update happens at step ``t`` when
``t > 0 and t % delta == 0 and t < t_end``. The first update is therefore at ``t = delta``
(as rigl-torch), not at ``t = 0`` (the official code allows 0): at step 0 the weights are the
random initialisation and the gradient is that of an untrained network, and skipping step 0's
optimizer step would also run an LR scheduler before any optimizer step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

ANNEALS = ("cosine", "constant")


@dataclass(frozen=True)
class UpdateSchedule:
    """Answers two questions for any step t: is it a mask-update step, and what is the drop fraction."""

    delta: int = 100
    t_end: int = 1
    alpha: float = 0.3
    anneal: str = "cosine"
    grad_accumulation_n: int = 1

    def __post_init__(self) -> None:
        errors = []
        if isinstance(self.delta, bool) or not isinstance(self.delta, int) or self.delta < 1:
            errors.append(f"delta must be an integer >= 1, got {self.delta!r}")
        if isinstance(self.t_end, bool) or not isinstance(self.t_end, int) or self.t_end < 0:
            errors.append(f"t_end must be an integer step >= 0, got {self.t_end!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not (0.0 <= self.alpha <= 1.0):
            errors.append(f"alpha must be a number in [0, 1], got {self.alpha!r}")
        if self.anneal not in ANNEALS:
            errors.append(f"anneal must be one of {', '.join(ANNEALS)}, got {self.anneal!r}")
        n = self.grad_accumulation_n
        if isinstance(n, bool) or not isinstance(n, int) or n < 1 or \
                (isinstance(self.delta, int) and n > self.delta):
            errors.append(f"grad_accumulation_n must be an integer in [1, delta={self.delta}], got {n!r}")
        if errors:
            raise ValueError("; ".join(errors))

    @classmethod
    def from_total_steps(
        cls,
        total_steps: int,
        *,
        delta: int = 100,
        t_end: float | int = 0.75,
        alpha: float = 0.3,
        anneal: str = "cosine",
        grad_accumulation_n: int = 1,
    ) -> "UpdateSchedule":
        """Build a schedule where ``t_end`` is a fraction of ``total_steps`` (a float in (0, 1])
        or an absolute step (an int)."""
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
        if isinstance(t_end, bool) or not isinstance(t_end, (int, float)) or \
                (isinstance(t_end, float) and not math.isfinite(t_end)):
            raise ValueError(f"t_end must be a fraction in (0, 1] or an integer step, got {t_end!r}")
        if isinstance(t_end, float):
            if not 0.0 < t_end <= 1.0:
                raise ValueError(
                    f"t_end as a fraction of total_steps must be in (0, 1], got {t_end!r} "
                    "(give an integer for an absolute step)")
            end = int(round(t_end * total_steps))
        else:
            if t_end < 0:
                raise ValueError(f"t_end must be >= 0, got {t_end!r}")
            end = t_end
        return cls(delta=delta, t_end=end, alpha=alpha, anneal=anneal,
                   grad_accumulation_n=grad_accumulation_n)

    def is_update_step(self, t: int) -> bool:
        """True when the mask is updated at step t (t > 0, t % delta == 0, t < t_end)."""
        return 0 < t < self.t_end and t % self.delta == 0

    def drop_fraction(self, t: int) -> float:
        """f(t) = alpha/2 * (1 + cos(pi * t / t_end)) (cosine), or alpha (constant); 0 after t_end."""
        if t >= self.t_end:
            return 0.0
        if self.anneal == "constant":
            return float(self.alpha)
        return float(self.alpha) / 2.0 * (1.0 + math.cos(math.pi * t / self.t_end))

    def next_update_step(self, t: int) -> int | None:
        """The first update step >= t, or None if there is none."""
        u = max(self.delta, -(-t // self.delta) * self.delta)
        return u if u < self.t_end else None

    def accumulates(self, t: int) -> bool:
        """True when step t's dense gradient feeds the grow score: one of the
        ``grad_accumulation_n`` steps ending at (and including) an update step."""
        u = self.next_update_step(t)
        return u is not None and u - t < self.grad_accumulation_n

    def update_steps(self) -> list[int]:
        """All update steps, in order."""
        return list(range(self.delta, self.t_end, self.delta))

    @property
    def num_updates(self) -> int:
        return len(range(self.delta, self.t_end, self.delta))
