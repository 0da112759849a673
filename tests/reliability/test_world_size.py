"""Resume at another world size: a checkpoint of a 2-rank DDP run continues in 1 process and a
1-process checkpoint continues on 2 ranks, with the masks it was saved with (train.global_batch
keeps the optimizer step the same: 2 ranks x 16, or 1 x 16 x 2 accumulated micro-batches)."""
import pytest
import torch

from rigl_ds.checkpoint import load
from tests import procs
from tests.distributed.test_launchers import ROOT, launch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

CFG = str(ROOT / "configs" / "quickstart_ddp.yaml")
ARGS = ["train.epochs=2", "train.global_batch=32", "sparsity.delta=10", "logging.progress=false",
        "checkpoint.every_steps=20", "logging.tensorboard=false"]


def local(run_dir, *extra):
    import sys

    p = procs.run([sys.executable, "-m", "rigl_ds.cli", "train", CFG, *ARGS, "engine.name=local",
                   f"logging.run_dir={run_dir}", *extra], cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p


def masks(path):
    return load(path)["sparsifier"]["masks"]


@pytest.mark.parametrize("first", ["ddp2", "local1"])
def test_resume_at_another_world_size_keeps_the_masks(tmp_path, first):
    d = tmp_path / "run"
    if first == "ddp2":
        launch("torchrun.sh", CFG, *ARGS, f"logging.run_dir={d}", "train.max_steps=25")
    else:
        local(d, "train.max_steps=25")
    saved = masks(d / "checkpoints" / "step_00000025.pt")
    state25 = load(d / "checkpoints" / "step_00000025.pt")
    assert state25["sparsifier"]["last_update"]["step"] == 20
    # continue to step 29 on the other world size: no update in between (the next is at t=30)
    if first == "ddp2":
        out = local(d, "train.max_steps=29", "resume=auto").stderr
    else:
        out = launch("torchrun.sh", CFG, *ARGS, f"logging.run_dir={d}", "train.max_steps=29", "resume=auto").stderr
    assert "at step 25" in out
    after = load(d / "checkpoints" / "step_00000029.pt")
    for n, m in saved.items():
        assert torch.equal(after["sparsifier"]["masks"][n], m), n
        assert torch.count_nonzero(after["model"][n][~m]) == 0, n
    assert after["sparsifier"]["last_update"]["step"] == 20 and after["step"] == 29
