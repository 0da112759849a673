"""An ImageNet YAML of the kit, as shipped, under the deepspeed launcher with 2 CPU ranks: DALI CPU
pipelines on a generated JPEG folder, and the synthetic backend (only sizes overridden); and under
FSDP2."""
import json

import pytest
import torch

from tests.compare import checkpoint, counted_density, model_and_masks
from tests.distributed.test_launchers import ROOT, launch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

YAML = str(ROOT / "configs" / "imagenet" / "resnet50_erk_s90_e100.yaml")
DS = str(ROOT / "ds_configs" / "zero1_fp32.json")
# CPU-sized: 32 px, 4 images per rank, global batch 16 = 2 ranks x 4 x 2 accumulated micro-batches
SMALL = ["data.image_size=32", "data.batch_size=4", "data.eval_batch_size=8", "train.global_batch=16",
         "precision.dtype=fp32", "sparsity.delta=2", "train.max_steps=4", "logging.progress=false",
         "logging.log_every=1", "checkpoint.every_steps=null"]


def check(run, eval_count):
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == 4 and result["engine"] == "deepspeed" and result["world_size"] == 2
    assert result["eval"]["count"] == eval_count
    state = checkpoint(run, 4)
    active, nonzero = counted_density(state)
    assert abs(active - 0.1) < 1e-3
    assert (result["global_density"], result["nonzero_density"]) == pytest.approx((active, nonzero), abs=1e-9)
    main = next(v for k, v in state.items() if k.endswith("mp_rank_00_model_states.pt"))
    assert main["rigl_ds"]["sparsifier"]["last_update"]["step"] == 2   # one mask update at step 2
    model, masks = model_and_masks(state)
    for name, m in masks.items():
        assert int((model[name].float() * (~m)).count_nonzero()) == 0, name


def test_imagenet_yaml_with_dali_cpu_under_deepspeed(tmp_path):
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI not installed (pip install -e .[dali])")
    from rigl_ds.data.testing import make_image_folder

    # 3 classes x 12 train (18 per rank: 4 micro-batches of 4 -> 2 steps of global batch 16 per epoch),
    # 3 x 5 val (15, odd: one rank evaluates 8, the other 7)
    folder = make_image_folder(tmp_path / "imagenet", classes=3, train_per_class=12, val_per_class=5,
                               encode_index=False)
    run = tmp_path / "run"
    out = launch("deepspeed.sh", YAML, DS, *SMALL, "data.backend=dali-cpu", f"data.path={folder}",
                 "data.num_workers=1", f"logging.run_dir={run}").stdout
    assert "test accuracy: top-1" in out
    check(run, eval_count=15)


def test_imagenet_yaml_with_synthetic_data_under_deepspeed(tmp_path):
    run = tmp_path / "run"
    launch("deepspeed.sh", YAML, DS, *SMALL, "data.backend=synthetic", "data.train_size=64", "data.val_size=12",
           f"logging.run_dir={run}")
    check(run, eval_count=12)


def test_imagenet_yaml_under_fsdp2_with_uneven_validation_shards(tmp_path):
    """The same YAML sharded by FSDP2 (one unit per Bottleneck), bf16 under autocast as shipped. 9
    validation images in batches of 4: one rank has 2 batches, the other 1, and evaluation forwards
    are collectives under FSDP2 (the rank out of batches runs an empty one)."""
    run = tmp_path / "run"
    small = [a for a in SMALL if not a.startswith(("precision.", "data.eval_batch_size"))]
    launch("fsdp2.sh", YAML, *small, "data.eval_batch_size=4", "data.backend=synthetic", "data.train_size=64",
           "data.val_size=9", f"logging.run_dir={run}")
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == 4 and result["engine"] == "fsdp2" and result["world_size"] == 2
    assert result["eval"]["count"] == 9
    state = checkpoint(run, 4)
    active, nonzero = counted_density(state)
    assert abs(active - 0.1) < 1e-3
    assert (result["global_density"], result["nonzero_density"]) == pytest.approx((active, nonzero), abs=1e-9)
    assert state["rigl_ds"]["sparsifier"]["last_update"]["step"] == 2
    assert len(state["masks"]) == 54                                 # every conv and the fc of ResNet-50
    for name, m in state["masks"].items():
        assert torch.count_nonzero(state["model"][name][~m]) == 0, name
