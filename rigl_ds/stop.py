"""Graceful stop on SIGINT (Ctrl-C), SIGTERM (preemption, SLURM's end of job, a launcher shutting
down) and SIGUSR1 (``sbatch --signal``): every rank finishes the step it is in, the run writes a
checkpoint of that step and exits saying how to resume. A second Ctrl-C (a second or more after
the first) stops at once.

Ranks may receive the signal at different steps (a launcher signals its workers one by one), so
they agree on the step to stop after: each step, every rank contributes its flag to an all-reduce
(MAX) on a CPU (gloo) group, started asynchronously after step t and read after step t+1, so that
no rank waits for it and all ranks read the same value at the same step. The stop therefore comes
one step after the signal is seen; nothing is lost, as that step is checkpointed too.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

import torch

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class StopRequested(Exception):
    """The run stopped on a signal after checkpointing; ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int, step: int, message: str) -> None:
        super().__init__(message)
        self.signum, self.step = signum, step
        self.exit_code = 128 + signum


class StopSignal:
    """Catches :data:`SIGNALS` while active (a context manager) and answers, once per step, whether
    every rank should stop now (the same answer on every rank)."""

    def __init__(self, group: Any = None, distributed: bool = False) -> None:
        self.group, self.distributed = group, distributed
        self.local = 0                     # signal number seen by this process (0: none)
        self._first = 0.0
        self._flag = torch.zeros(1, dtype=torch.int32)
        self._work = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.local and signum == signal.SIGINT and now - self._first > 1.0:
            # a second Ctrl-C: stop now, without a checkpoint (a launcher forwarding the terminal's
            # SIGINT to its workers delivers a second one within milliseconds: not counted)
            raise KeyboardInterrupt
        if not self.local:
            self._first = now
            logger.warning("%s received: finishing the current step, then checkpointing and stopping "
                           "(Ctrl-C again to stop at once)", signal.Signals(signum).name)
        self.local = self.local or signum

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
        if self._work is not None:         # collectives must not be left pending
            self._work.wait()
            self._work = None

    def after_step(self) -> int:
        """Call on every rank after every step: the signal to stop on (0: go on)."""
        if not self.distributed:
            return self.local
        agreed = 0
        if self._work is not None:
            self._work.wait()
            agreed = int(self._flag.item())
        self._flag.fill_(self.local)
        import torch.distributed as dist

        self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return agreed
