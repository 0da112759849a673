"""Guards for every test: no DeepSpeed shared-memory segments left in /dev/shm (they are RAM, and killed
ranks never unlink them; rigl_ds keeps DeepSpeed from creating them on CPU)."""
import pytest

from tests.procs import shm_segments


@pytest.fixture(autouse=True)
def no_leaked_shared_memory():
    before = shm_segments()
    yield
    leaked = shm_segments() - before
    assert not leaked, f"the test left DeepSpeed shared-memory segments in /dev/shm: {sorted(leaked)}"
