"""The suite cannot stall CI: hung ranks and hung launchers fail their test within a deadline, with stacks,
and leave no process behind."""
import os
import subprocess
import sys
import time

import pytest

from tests import procs
from tests.distributed.harness import run_ranks


def sleeping_worker(rank, world):
    if rank == 1:
        time.sleep(3600)         # rank 0 then blocks in the harness's barrier: a two-rank deadlock
    return rank


@pytest.mark.distributed
def test_a_hung_rank_fails_with_its_stack_after_the_deadline_also_on_a_busy_machine():
    """Beside 4 spinning processes (on 2 cores: starting the ranks takes far longer than the deadline),
    the deadline still counts from when the ranks are ready, and both ranks' stacks are reported."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(4)]
    try:
        with pytest.raises(AssertionError, match="still running after 8 s") as e:
            run_ranks(sleeping_worker, deadline=8)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    assert "sleeping_worker" in str(e.value)              # where rank 1 hung
    assert "barrier" in str(e.value)                       # where rank 0 waited


def test_a_hung_launcher_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    # a "launcher" whose child keeps the output pipe open: plain subprocess.run(timeout=) would wait for it
    script = f"import subprocess, sys; c = subprocess.Popen(['sleep', '3600']); open({str(pid_file)!r}, 'w').write(str(c.pid)); c.wait()"
    t = time.monotonic()
    with pytest.raises(AssertionError, match="timed out after 3 s"):
        procs.run([sys.executable, "-c", script], timeout=3)
    assert time.monotonic() - t < 30
    child = int(pid_file.read_text())
    for _ in range(50):                                    # SIGKILLed; reaped by init shortly after
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        if open(f"/proc/{child}/stat").read().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"child {child} of the timed-out command is still running")


def test_a_process_exits_with_a_data_loader_still_open(tmp_path):
    """DataLoader workers ignore stop signals (a rank finishes its step first); multiprocessing's exit
    handler SIGTERMs them and waits: without rigl_ds's own exit handler, a process that ends with a
    loader still open (a run stopped mid-epoch, an iterator held by a traceback) never exits. This
    once kept the whole suite from exiting after its last test."""
    script = tmp_path / "open_loader.py"
    script.write_text(
        "import torch\n"
        "from rigl_ds.config import DataSection\n"
        "from rigl_ds.data import build_data\n"
        "data = build_data(DataSection(name='digits', num_workers=2, batch_size=16), seed=0, rank=0, world=1,\n"
        "                  device=torch.device('cpu'))\n"
        "it = iter(data.train_batches(0))\n"
        "next(it)\n"
        "print('one batch read; exiting with the loader open', flush=True)\n")
    out = procs.run([sys.executable, str(script)], timeout=300)     # a hang fails here, its group killed
    assert out.returncode == 0, out.stderr[-3000:]
    assert "one batch read" in out.stdout and "Traceback" not in out.stderr, out.stderr[-3000:]
