"""Resume at another world size: a 2-rank DDP run continues in 1 process and then again on 2 ranks,
across mask updates, and ends where a run that stayed on 2 ranks ends (train.global_batch keeps the
optimizer batch: 2 ranks x 16, or 1 x 16 x 2 accumulated micro-batches; the data order gives a step
the same 32 examples at every world size). BatchNorm-free model, so the two differ only by the order
of floating-point sums: masks equal exactly, weights and optimizer state to rounding."""
import pytest
import torch

from rigl_ds.checkpoint import load
from tests import procs
from tests.distributed.test_launchers import ROOT, launch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

CFG = str(ROOT / "configs" / "quickstart_ddp.yaml")
ARGS = ["model.name=mlp", "train.epochs=2", "train.global_batch=32", "sparsity.delta=10", "logging.progress=false",
        "checkpoint.every_steps=null", "logging.tensorboard=false"]


def local(run_dir, *extra):
    import sys

    p = procs.run([sys.executable, "-m", "rigl_ds.cli", "train", CFG, *ARGS, "engine.name=local",
                   f"logging.run_dir={run_dir}", *extra], cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p


def test_two_ranks_to_one_and_back_across_mask_updates_equals_an_uninterrupted_run(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    launch("torchrun.sh", CFG, *ARGS, f"logging.run_dir={straight}", "train.max_steps=45")
    launch("torchrun.sh", CFG, *ARGS, f"logging.run_dir={split}", "train.max_steps=15")
    out = local(split, "train.max_steps=30", "resume=auto").stderr      # the update at t=20 in 1 process
    assert "at step 15" in out
    out = launch("torchrun.sh", CFG, *ARGS, f"logging.run_dir={split}", "train.max_steps=45", "resume=auto").stderr
    assert "at step 30" in out
    a, b = (load(d / "checkpoints" / "step_00000045.pt") for d in (straight, split))
    assert a["step"] == b["step"] == 45
    assert a["sparsifier"]["last_update"]["step"] == b["sparsifier"]["last_update"]["step"] == 40
    for n, m in a["sparsifier"]["masks"].items():
        assert torch.equal(b["sparsifier"]["masks"][n], m), n
        assert torch.count_nonzero(b["model"][n][~m]) == 0, n
    for n, w in a["model"].items():
        torch.testing.assert_close(b["model"][n], w, rtol=1e-4, atol=1e-6, msg=n)
    for i, st in a["optimizer"]["state"].items():
        torch.testing.assert_close(b["optimizer"]["state"][i]["momentum_buffer"], st["momentum_buffer"],
                                   rtol=1e-4, atol=1e-6)
    assert a["lr_scheduler"] == b["lr_scheduler"]
