"""Subprocesses for tests that cannot hang CI: each command runs in its own process group, under a
deadline, and the whole group (launchers' ranks included) is killed on a timeout or an interrupt."""
from __future__ import annotations

import glob
import os
import signal
import subprocess

SHM_GLOB = "/dev/shm/deepspeed_allreduce_buffer_*"


class Proc:
    """A started command: ``finish()`` waits up to its deadline and returns a CompletedProcess."""

    def __init__(self, cmd: list[str], *, timeout: float, merge_output: bool = False, **kw) -> None:
        self.cmd, self.timeout = cmd, timeout
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT if merge_output else subprocess.PIPE,
                                  text=True, start_new_session=True, **kw)

    def _kill_group(self) -> None:
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def finish(self) -> subprocess.CompletedProcess:
        try:
            out, err = self.p.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self._kill_group()
            out, err = self.p.communicate()
            raise AssertionError(f"timed out after {self.timeout} s (process group killed): {' '.join(self.cmd)}\n"
                                 f"{(out or '')[-3000:]}\n{(err or '')[-3000:]}") from None
        except BaseException:            # pytest-timeout, Ctrl-C: leave no ranks behind
            self._kill_group()
            raise
        self._kill_group()               # grandchildren that outlived the command (none expected)
        return subprocess.CompletedProcess(self.cmd, self.p.returncode, out, err)


def run(cmd: list[str], *, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` that kills the command's whole process group
    on a timeout (plain ``subprocess.run`` kills only the launcher and then waits for ranks that hold its pipes)."""
    return Proc(cmd, timeout=timeout, **kw).finish()


def shm_segments() -> set[str]:
    """DeepSpeed's CPU shared-memory all-reduce segments now in /dev/shm."""
    return set(glob.glob(SHM_GLOB))


def signal_when(proc: Proc, ready, sig: int, *, timeout: float = 600, group: bool = False) -> subprocess.CompletedProcess:
    """Send ``sig`` to ``proc``'s command (the launcher, as a user or a scheduler would) once ``ready()``
    is true, then wait for it to end. Fails if the command ends first or ``ready()`` never holds.
    ``group``: to its whole process group, as Ctrl-C in a terminal does (DataLoader workers included)."""
    import time

    end = time.monotonic() + timeout
    while not ready():
        if proc.p.poll() is not None:
            out = proc.finish()
            raise AssertionError(f"{' '.join(proc.cmd)} ended (rc {out.returncode}) before it was signalled:\n"
                                 f"{(out.stdout or '')[-3000:]}\n{(out.stderr or '')[-3000:]}")
        if time.monotonic() > end:
            proc._kill_group()
            raise AssertionError(f"{' '.join(proc.cmd)}: not ready to be signalled after {timeout} s")
        time.sleep(0.05)
    if group:
        os.killpg(proc.p.pid, sig)
    else:
        os.kill(proc.p.pid, sig)
    return proc.finish()


def stopped_step(output: str, signame: str) -> int:
    """The step a run reported stopping after, on ``signame``."""
    import re

    m = re.search(rf"stopped by {signame} after step (\d+) of \d+; checkpoint (\S+)\.", output)
    assert m, output[-3000:]
    return int(m.group(1))
