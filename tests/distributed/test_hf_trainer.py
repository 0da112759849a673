"""The Hugging Face Trainer with RigLCallback on 2 CPU ranks (torchrun, DDP over gloo), a small random
GPT-2 (no download): both ranks hold the same masks and weights, with the planned counts, measured;
a run resumed from its step-6 checkpoint ends equal to the straight one."""
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


def test_two_ranks_share_masks_and_resume_exactly(tmp_path):
    a, b = torchrun(tmp_path / "straight")
    assert a["world"] == b["world"] == 2 and a["steps"] == 12
    for n, m in a["masks"].items():
        assert torch.equal(m, b["masks"][n]), n
        assert int(m.sum()) == a["nnz"][n] == m.numel() - int(0.8 * m.numel())
    for n, w in a["weights"].items():
        assert torch.equal(w, b["weights"][n]), n
    planned = sum(a["nnz"].values()) / sum(m.numel() for m in a["masks"].values())
    assert a["density"] == pytest.approx(planned, abs=1e-12) and a["nonzero"] <= a["density"]
    shutil.copytree(tmp_path / "straight" / "checkpoint-6", tmp_path / "resumed" / "checkpoint-6")
    r0, r1 = torchrun(tmp_path / "resumed", str(tmp_path / "resumed" / "checkpoint-6"))
    for n in a["masks"]:
        assert torch.equal(r0["masks"][n], a["masks"][n]) and torch.equal(r1["masks"][n], a["masks"][n]), n
    for n, w in a["weights"].items():
        assert torch.equal(r0["weights"][n], w), n
