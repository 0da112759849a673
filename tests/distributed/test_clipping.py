"""``train.clip_grad_norm``: one rule on every engine. The gradients are clipped after the sparsifier
masked them, so the norm is that of the update the optimizer applies. With plain SGD (no momentum,
no weight decay, constant LR) and a bound that always binds, every ordinary step moves the weights by
exactly lr x clip_grad_norm (2-norm over all parameters). Clipping before masking (the old rule) gives
less: the norm then included inactive entries that the mask discards."""
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.compare import checkpoint, model_and_masks
from tests.distributed.test_launchers import FSDP2_CFG, ROOT, launch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

LR, CLIP, STEPS = 0.1, 0.02, 7
COMMON = ["model.name=mlp", f"optimizer.lr={LR}", "optimizer.momentum=0.0", "optimizer.nesterov=false",
          "optimizer.weight_decay=0.0", "lr_schedule.name=constant", "lr_schedule.warmup_epochs=0",
          "train.label_smoothing=0.0", f"train.clip_grad_norm={CLIP}", f"train.max_steps={STEPS}",
          "sparsity.delta=3", "checkpoint.every_steps=1", "checkpoint.keep_last=100", "logging.progress=false"]


def params(state, run, step) -> dict[str, torch.Tensor]:
    """Every parameter of the checkpoint (masked or not), by name."""
    if "rigl_ds" in state and "masks" in state:                       # FSDP2 (DCP)
        return {k: v for k, v in state["model"].items()}
    if "zero_pp_rank_0_mp_rank_00_model_states.pt" in state:          # ZeRO-3: consolidated from the shards
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        whole = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=f"step_{step:08d}")
        return {k: v.detach() for k, v in whole.items()}
    model, _ = model_and_masks(state)
    return {k: v for k, v in model.items() if v.is_floating_point()}


def masks_of(state) -> dict[str, torch.Tensor]:
    if "zero_pp_rank_0_mp_rank_00_model_states.pt" in state:
        return state["zero_pp_rank_0_mp_rank_00_model_states.pt"]["rigl_ds"]["sparsifier"]["masks"]
    return model_and_masks(state)[1]


def check_rule(run) -> tuple[dict, dict]:
    """Each ordinary step applied an update of norm lr x clip; returns the final (weights, masks)."""
    states = [checkpoint(run, s) for s in range(1, STEPS + 1)]
    weights = [params(st, run, s) for s, st in zip(range(1, STEPS + 1), states)]
    masks = [masks_of(st) for st in states]
    ordinary = 0
    for i in range(STEPS - 1):
        m0, m1 = masks[i], masks[i + 1]
        if any(not torch.equal(m0[n], m1[n]) for n in m0):
            continue                                                  # a mask update: drops are not gradient
        w0, w1 = weights[i], weights[i + 1]
        moved = math.sqrt(sum(float((w1[n].double() - w0[n].double()).square().sum()) for n in w0))
        assert moved == pytest.approx(LR * CLIP, rel=2e-4), run
        ordinary += 1
    assert ordinary >= STEPS - 3                                       # updates at steps 3 and 6
    return weights[-1], masks[-1]


def test_clip_grad_norm_is_the_norm_of_the_applied_update_on_every_engine(tmp_path):
    runs = {}
    local = tmp_path / "local"
    p = subprocess.run([sys.executable, "-m", "rigl_ds.cli", "train", str(ROOT / "configs" / "quickstart.yaml"),
                        *COMMON, f"logging.run_dir={local}"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    check_rule(local)
    ddp_cfg = str(ROOT / "configs" / "quickstart_ddp.yaml")
    for name, script, args in (("ddp", "torchrun.sh", [ddp_cfg]),
                               ("deepspeed", "deepspeed.sh", [ddp_cfg, str(ROOT / "ds_configs" / "zero2_fp32.json")]),
                               ("zero3", "deepspeed.sh", [ddp_cfg, str(ROOT / "ds_configs" / "zero3_fp32.json")]),
                               ("fsdp2", "fsdp2.sh", [FSDP2_CFG])):
        launch(script, *args, *COMMON, f"logging.run_dir={tmp_path / name}")
        runs[name] = check_rule(tmp_path / name)
    # the three 2-rank engines see the same data: the same masks and (up to reduction order) weights
    w_ref, m_ref = runs["ddp"]
    for name in ("deepspeed", "zero3", "fsdp2"):
        w, m = runs[name]
        assert set(m) == set(m_ref) and all(torch.equal(m[n], m_ref[n]) for n in m_ref), name
        for n in w_ref:
            torch.testing.assert_close(w[n].float(), w_ref[n].float(), rtol=1e-5, atol=1e-6, msg=f"{name} {n}")
