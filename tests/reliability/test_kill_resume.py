"""kill -9 at arbitrary points (a training step, inside a mask update, inside a checkpoint write),
then resume=auto: the run ends bit-identical to an uninterrupted one, TensorBoard included."""
import os
import pathlib
import sys

import pytest
import torch

from rigl_ds.checkpoint import load
from tests import procs

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[2]
# 88 steps, updates at t = 10, 20, ..., 60, checkpoints at 20, 40, 60 and 88; 3 sparse layers (2 ERK-dense)
ARGS = ["train.epochs=2", "sparsity.delta=10", "logging.log_every=5", "logging.progress=false",
        "checkpoint.every_steps=20", "checkpoint.keep_last=2", "train.deterministic=true"]


def run(run_dir, fault=None, resume=False, config="configs/quickstart.yaml", extra=()):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RIGL_DS_FAULT", None)
    if fault:
        env["RIGL_DS_FAULT"] = fault
    cmd = [sys.executable, "-m", "rigl_ds.cli", "train", config, *ARGS, f"logging.run_dir={run_dir}", *extra]
    if resume:
        cmd.append("resume=auto")
    p = procs.run(cmd, env=env, cwd=ROOT)
    if fault:
        assert p.returncode == -9, (fault, p.returncode, p.stderr[-3000:])   # killed by SIGKILL
    else:
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p


def scalars(tb: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    ea.Reload()
    return {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}


def assert_same_run(a: pathlib.Path, b: pathlib.Path, step: int = 88) -> None:
    sa, sb = load(a / "checkpoints" / f"step_{step:08d}.pt"), load(b / "checkpoints" / f"step_{step:08d}.pt")
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k
    for k, m in sa["sparsifier"]["masks"].items():
        assert torch.equal(m, sb["sparsifier"]["masks"][k]), k
    oa, ob = sa["optimizer"], sb["optimizer"]
    assert oa["param_groups"] == ob["param_groups"]                       # LR included
    for i, st in oa["state"].items():
        for key, v in st.items():
            assert torch.equal(v, ob["state"][i][key]), (i, key)
    assert sa["lr_scheduler"] == sb["lr_scheduler"] and sa["data"] == sb["data"]
    assert sa["sparsifier"]["last_update"] == sb["sparsifier"]["last_update"]
    assert_same_scalars(a / "tb", b / "tb")


def assert_same_scalars(a: pathlib.Path, b: pathlib.Path) -> None:
    """The same TensorBoard scalars (wall-clock throughput aside), no step logged twice in ``b``."""
    ta, tb = scalars(a), scalars(b)
    assert set(ta) == set(tb)
    for tag in ta:
        steps = [s for s, _ in tb[tag]]
        assert len(steps) == len(set(steps)), f"{tag}: duplicate steps {steps}"
        if tag != "train/img_per_s":                                      # wall-clock dependent
            assert ta[tag] == tb[tag], tag


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    d = tmp_path_factory.mktemp("straight")
    run(d)
    return d


def test_kill_during_step_mask_update_and_checkpoint_write_then_resume(straight, tmp_path):
    d = tmp_path / "run"
    run(d, fault="step:47")                       # checkpoints 20 and 40 written, killed after step 47
    assert sorted(p.name for p in (d / "checkpoints").glob("step_*.pt")) == ["step_00000020.pt", "step_00000040.pt"]
    run(d, fault="mask_update:2", resume=True)    # resumed at 40; killed inside the update at t=40 (layer 2 of 3)
    run(d, fault="checkpoint_write:1", resume=True)   # resumed at 40; killed writing the checkpoint of step 60
    assert list((d / "checkpoints").glob(".step_00000060.pt.tmp-*"))   # its partial temporary file
    assert not (d / "checkpoints" / "step_00000060.pt").exists()
    out = run(d, resume=True)                     # resumes at 40 again and finishes
    assert "resumed from" in out.stderr and "step_00000040.pt at step 40" in out.stderr
    assert not list((d / "checkpoints").glob(".step_*.tmp-*"))           # stale temporary removed
    assert_same_run(straight, d)


def test_kill_between_checkpoint_and_its_checksum_falls_back(straight, tmp_path):
    d = tmp_path / "run"
    run(d, fault="checkpoint_write:4")            # step 40's file renamed, its checksum file not written
    ck = d / "checkpoints"
    assert (ck / "step_00000040.pt").exists() and not (ck / "step_00000040.pt.sha256").exists()
    out = run(d, resume=True)
    assert "step_00000040.pt has no checksum file" in out.stderr and "trying an older one" in out.stderr
    assert "step_00000020.pt at step 20" in out.stderr
    assert_same_run(straight, d)


@pytest.mark.distributed
def test_deepspeed_two_ranks_killed_mid_update_and_mid_save_then_resumed(tmp_path):
    """One rank dies (SIGKILL) inside a mask update; the launcher takes the other down. Then rank 0
    dies after writing a checkpoint's files but before its manifest. resume=auto twice; the run ends
    bit-identical (weights, masks, LR, optimizer shards) to an uninterrupted one."""
    from tests.distributed.test_launchers import ROOT as R, assert_same_state, ds_state, launch

    cfg, ds = str(R / "configs" / "quickstart_ddp.yaml"), str(R / "ds_configs" / "zero2_fp32.json")
    args = ["train.epochs=2", "sparsity.delta=10", "logging.log_every=5", "logging.progress=false",
            "checkpoint.every_steps=10", "checkpoint.keep_last=3", "train.max_steps=40"]
    straight, d = tmp_path / "straight", tmp_path / "run"
    launch("deepspeed.sh", cfg, ds, *args, f"logging.run_dir={straight}")

    def killed(fault, rank, *extra):
        p = launch("deepspeed.sh", cfg, ds, *args, f"logging.run_dir={d}", *extra, check=False,
                   env={"RIGL_DS_FAULT": fault, "RIGL_DS_FAULT_RANK": rank})
        # the launcher reports whichever rank it sees fail first: the killed one (-9) or its peer
        assert p.returncode != 0 and "exits with return code = " in p.stdout + p.stderr, p.stdout[-3000:]

    # 3 sparse layers: the 5th apply_update is the 2nd layer of the update at t=20 (after checkpoint 20)
    killed("mask_update:5", "1")
    ck = d / "checkpoints"
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000010", "step_00000020"]
    killed("checkpoint_write:1", "0", "resume=auto")       # step 30: files written, no manifest
    assert (ck / "step_00000030").is_dir() and not (ck / "step_00000030" / "complete").exists()
    out = launch("deepspeed.sh", cfg, ds, *args, f"logging.run_dir={d}", "resume=auto")
    assert "step_00000020 at step 20" in out.stdout + out.stderr
    assert_same_state(ds_state(straight, 40), ds_state(d, 40))
    assert_same_scalars(straight / "tb", d / "tb")


@pytest.mark.distributed
def test_fsdp2_two_ranks_killed_mid_update_and_mid_save_then_resumed(tmp_path):
    """FSDP2: rank 1 dies inside a mask update (after the sharded selection, between layers); then
    rank 0 dies after every shard of a checkpoint is written but before its manifest, leaving only
    a temporary folder. resume=auto twice; the run ends bit-identical to an uninterrupted one."""
    from tests.distributed.test_launchers import FSDP2_CFG, assert_same_dcp, dcp_state, launch

    args = ["train.epochs=2", "sparsity.delta=10", "logging.log_every=5", "logging.progress=false",
            "checkpoint.every_steps=10", "checkpoint.keep_last=3", "train.max_steps=40"]
    straight, d = tmp_path / "straight", tmp_path / "run"
    launch("fsdp2.sh", FSDP2_CFG, *args, f"logging.run_dir={straight}")

    def killed(fault, rank, *extra):
        p = launch("fsdp2.sh", FSDP2_CFG, *args, f"logging.run_dir={d}", *extra, check=False,
                   env={"RIGL_DS_FAULT": fault, "RIGL_DS_FAULT_RANK": rank})
        assert p.returncode != 0, p.stdout[-3000:] + p.stderr[-3000:]

    # 3 sparse layers: the 5th apply_update is the 2nd layer of the update at t=20 (after checkpoint 20)
    killed("mask_update:5", "1")
    ck = d / "checkpoints"
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000010", "step_00000020"]
    killed("checkpoint_write:1", "0", "resume=auto")       # step 30: shards written, no manifest, not renamed
    assert (ck / ".step_00000030.tmp").is_dir() and not (ck / "step_00000030").exists()
    out = launch("fsdp2.sh", FSDP2_CFG, *args, f"logging.run_dir={d}", "resume=auto")
    assert "step_00000020 at step 20" in out.stdout + out.stderr
    assert not (ck / ".step_00000030.tmp").exists()
    assert_same_dcp(dcp_state(straight, 40), dcp_state(d, 40))
    assert_same_scalars(straight / "tb", d / "tb")
