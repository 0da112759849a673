"""Fault injection for the reliability tests: ``RIGL_DS_FAULT=<point>:<n>`` kills this process
with SIGKILL the n-th time (1-based) it reaches ``point``; ``RIGL_DS_FAULT_RANK`` limits it to one
rank. Points: ``step`` (after an optimizer step), ``mask_update`` (inside a mask update, after the
first layer's new mask is written), ``checkpoint_write`` (a checkpoint written to its temporary
name, not yet renamed or marked complete). ``RIGL_DS_FAULT_DELAY=<seconds>`` sleeps at every ``step``
point instead (a slow run, for tests that signal a run while it trains). Unset, :func:`point` costs
two dictionary lookups.
"""
from __future__ import annotations

import os
import signal
import time

_counts: dict[str, int] = {}


def point(name: str) -> None:
    delay = os.environ.get("RIGL_DS_FAULT_DELAY")
    if delay and name == "step":
        time.sleep(float(delay))
    spec = os.environ.get("RIGL_DS_FAULT")
    if not spec:
        return
    want, _, n = spec.partition(":")
    if want != name:
        return
    rank = os.environ.get("RIGL_DS_FAULT_RANK")
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == int(n or 1):
        os.kill(os.getpid(), signal.SIGKILL)
