"""The Hugging Face Trainer with RigLCallback on 2 CPU ranks (torchrun over gloo; DDP, and the Trainer's
DeepSpeed ZeRO-3 setting), a small random GPT-2 (no download): both ranks hold the same masks and
weights, with the planned counts, measured; the mask-update step moves nothing but the dropped
weights; a run resumed from its step-6 checkpoint ends equal to the straight one."""
import os
import pathlib
import shutil
import sys

import pytest
import torch

from tests import procs
from tests.distributed.harness import free_port

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "distributed" / "hf_trainer_run.py"


def torchrun(out: pathlib.Path, *extra: str):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    p = procs.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                   "127.0.0.1", "--master_port", str(free_port()), str(SCRIPT), str(out), *extra], cwd=ROOT, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_two_ranks_share_masks_and_resume_exactly(tmp_path, engine):
    flag = ("--deepspeed",) if engine == "deepspeed" else ()
    if flag:
        pytest.importorskip("deepspeed")
    a, b = torchrun(tmp_path / "straight", *flag)
    assert a["world"] == b["world"] == 2 and a["steps"] == 12
    # the update (t=3) is step 4: it zeroes what it drops and skips the optimizer step
    assert a["update4"]["step"] == 3 and a["update4"]["churn"] > 0
    dropped = 0
    for n, w in a["after3"].items():
        m = a["masks4"].get(n)
        assert torch.equal(a["after4"][n], w if m is None else w * m), n
        dropped += 0 if m is None else int(torch.count_nonzero(w[~m]))
    assert dropped > 0
    for n, m in a["masks"].items():
        assert torch.equal(m, b["masks"][n]), n
        assert int(m.sum()) == a["nnz"][n] == m.numel() - int(0.8 * m.numel())
    for n, w in a["weights"].items():
        assert torch.equal(w, b["weights"][n]), n
    planned = sum(a["nnz"].values()) / sum(m.numel() for m in a["masks"].values())
    assert a["density"] == pytest.approx(planned, abs=1e-12) and a["nonzero"] <= a["density"]
    shutil.copytree(tmp_path / "straight" / "checkpoint-6", tmp_path / "resumed" / "checkpoint-6")
    r0, r1 = torchrun(tmp_path / "resumed", str(tmp_path / "resumed" / "checkpoint-6"), *flag)
    for n in a["masks"]:
        assert torch.equal(r0["masks"][n], a["masks"][n]) and torch.equal(r1["masks"][n], a["masks"][n]), n
    for n, w in a["weights"].items():
        assert torch.equal(r0["weights"][n], w), n


def test_with_gradient_accumulation_deepspeed_holds_the_masks_of_ddp(tmp_path):
    """Two micro-batches per optimizer step: the Trainer's DeepSpeed ZeRO-3 run and its DDP run (same
    seeds, data and GPT-2) hold the same masks and close weights (ZeRO-3 sums gradients in another
    order: a near-tie at a prune could swap, so at most 1% of a layer's positions may differ); each
    run's update step moves nothing but the dropped weights."""
    pytest.importorskip("deepspeed")
    ddp = torchrun(tmp_path / "ddp", "--accum")[0]
    ds = torchrun(tmp_path / "ds", "--accum", "--deepspeed")[0]
    for run in (ddp, ds):
        assert run["steps"] == 12 and run["update4"]["step"] == 3 and run["update4"]["churn"] > 0
        for n, w in run["after3"].items():
            m = run["masks4"].get(n)
            assert torch.equal(run["after4"][n], w if m is None else w * m), n
    for n, m in ddp["masks"].items():
        assert int(ds["masks"][n].sum()) == int(m.sum()) == ddp["nnz"][n], n
        assert int((ds["masks"][n] ^ m).sum()) <= 0.01 * m.numel(), n
    for n, w in ddp["weights"].items():
        torch.testing.assert_close(ds["weights"][n], w, rtol=0, atol=1e-4)
