"""Guards for every test: no DeepSpeed shared-memory segments left in /dev/shm (they are RAM, and killed
ranks never unlink them; rigl_ds keeps DeepSpeed from creating them on CPU), and no worker process
left running (a DataLoader worker ignores SIGTERM, so one left alive once kept the whole suite from
exiting: multiprocessing's exit handler waited for it forever)."""
import gc
import multiprocessing

import pytest

from tests.procs import shm_segments


@pytest.fixture(autouse=True)
def no_leaked_shared_memory():
    before = shm_segments()
    yield
    leaked = shm_segments() - before
    assert not leaked, f"the test left DeepSpeed shared-memory segments in /dev/shm: {sorted(leaked)}"


@pytest.fixture(autouse=True)
def no_leftover_child_processes():
    before = {p.pid for p in multiprocessing.active_children()}
    yield
    left = [p for p in multiprocessing.active_children() if p.pid not in before]
    if left:
        gc.collect()                     # iterators only the garbage still holds shut their workers down
        for p in left:
            p.join(timeout=10)
        left = [p for p in left if p.is_alive()]
    for p in left:
        p.kill()
        p.join(timeout=10)
    assert not left, f"the test left child processes running: {left}"
