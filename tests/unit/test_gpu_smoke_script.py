"""launch/gpu_smoke.sh's Python part, run at toy sizes on CPU (--cpu): the script works end to end.
It measures nothing here; its GPU numbers come from a run on a CUDA machine."""
import json
import sys

import pytest

from rigl_ds.data.testing import make_image_folder
from tests import procs
from tests.unit.test_config import ROOT

pytestmark = pytest.mark.slow


def test_gpu_smoke_script_dry_run_on_cpu(tmp_path):
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI not installed (pip install -e .[dali])")
    folder = make_image_folder(tmp_path / "img", classes=3, train_per_class=12, val_per_class=5, encode_index=False)
    out = tmp_path / "smoke.json"
    p = procs.run([sys.executable, str(ROOT / "benchmarks" / "gpu_smoke.py"), "--cpu", "--folder", str(folder),
                   "--run-dir", str(tmp_path / "run"), "--json", str(out)], cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["dali"]["val_images"] == r["dali"]["val_expected"] == 15 and r["dali"]["layout_channels_last"]
    assert r["train"]["updates"] == 2 and r["train"]["zeros_under_mask"] is True
    assert abs(r["train"]["global_density"] - 0.1) < 1e-3
    assert r["cli"]["steps"] == 3 and r["cli"]["eval_count"] == 15


def test_semi_structured_benchmark_dry_run_on_cpu(tmp_path):
    """benchmarks/semi_structured.py (run by launch/gpu_smoke.sh) works end to end at toy sizes; on a
    CPU it says the semi-structured part did not run instead of printing a number."""
    out = tmp_path / "semi.json"
    p = procs.run([sys.executable, str(ROOT / "benchmarks" / "semi_structured.py"), "--cpu", "--json", str(out)],
                  cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["inference"]["semi_structured"].startswith("not run: torch's semi-structured sparse tensors need CUDA")
    t = r["training"]
    assert t["holds_2_4"] is True and t["every_step_updated"] is True
    assert t["dense_ms"] > 0 and t["rigl_2_4_ms"] > 0 and t["update_step_ms"] > 0
