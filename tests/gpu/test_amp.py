"""Mixed precision and channels-last on CUDA; skipped cleanly without a GPU."""
import json

import pytest
import torch

from rigl_ds.checkpoint import load
from rigl_ds.cli import main
from tests.compare import counted_density
from tests.unit.test_train import QUICK, SHORT

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_amp_channels_last_run_keeps_density(tmp_path, dtype):
    run = tmp_path / "run"
    assert main(["train", QUICK, *SHORT, f"logging.run_dir={run}", f"precision.dtype={dtype}",
                 "model.channels_last=true"]) == 0
    result = json.loads((run / "result.json").read_text())
    active, nonzero = counted_density(load(run / "checkpoints" / f"step_{result['steps']:08d}.pt"))
    assert (result["global_density"], result["nonzero_density"]) == (active, nonzero)   # counted from the checkpoint
    assert abs(active - 0.1) < 1e-3 and result["eval"]["top1"] > 0.5
