"""kill -9 at arbitrary points (a training step, inside a mask update, inside a checkpoint write),
then resume=auto: the run ends bit-identical to an uninterrupted one, TensorBoard included."""
import os
import pathlib
import signal
import sys

import pytest

from tests import procs
from tests.compare import assert_same_run

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[2]
# 88 steps, updates at t = 10, 20, ..., 60, checkpoints at 20, 40, 60 and 88; 3 sparse layers (2 ERK-dense)
ARGS = ["train.epochs=2", "sparsity.delta=10", "logging.log_every=5", "logging.progress=false",
        "checkpoint.every_steps=20", "checkpoint.keep_last=2", "train.deterministic=true"]


def run(run_dir, fault=None, resume=False, config="configs/quickstart.yaml", extra=(), background=False):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RIGL_DS_FAULT", None)
    if fault:
        env["RIGL_DS_FAULT"] = fault
    cmd = [sys.executable, "-m", "rigl_ds.cli", "train", config, *ARGS, f"logging.run_dir={run_dir}", *extra]
    if resume:
        cmd.append("resume=auto")
    if background:
        return procs.Proc(cmd, env=dict(env, RIGL_DS_FAULT_DELAY="0.3"), cwd=ROOT, timeout=600)
    p = procs.run(cmd, env=env, cwd=ROOT)
    if fault:
        assert p.returncode == -9, (fault, p.returncode, p.stderr[-3000:])   # killed by SIGKILL
    else:
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p


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
    assert_same_run(straight, d, 88)


def test_kill_between_checkpoint_and_its_checksum_falls_back(straight, tmp_path):
    d = tmp_path / "run"
    run(d, fault="checkpoint_write:4")            # step 40's file renamed, its checksum file not written
    ck = d / "checkpoints"
    assert (ck / "step_00000040.pt").exists() and not (ck / "step_00000040.pt.sha256").exists()
    out = run(d, resume=True)
    assert "step_00000040.pt has no checksum file" in out.stderr and "trying an older one" in out.stderr
    assert "step_00000020.pt at step 20" in out.stderr
    assert_same_run(straight, d, 88)


def test_sigint_and_sigterm_finish_the_step_checkpoint_and_resume_exactly(straight, tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group: DataLoader workers too) mid-run: the step is
    finished, checkpointed (no step lost), exit 130 with the resume hint; then SIGTERM (preemption) in
    the resumed run, the same; resume=auto ends bit-identical. Steps are slowed to 0.3 s so a signal
    lands well before the end even on a loaded machine."""
    d = tmp_path / "run"
    ck = d / "checkpoints"
    p = procs.signal_when(run(d, background=True, extra=["data.num_workers=2"]),
                          lambda: (ck / "step_00000020.pt.sha256").exists(), signal.SIGINT, group=True)
    assert p.returncode == 130, p.stderr[-3000:]
    first = procs.stopped_step(p.stderr, "SIGINT")
    assert 20 < first < 60 and (ck / f"step_{first:08d}.pt.sha256").is_file()
    assert f"Resume with the same command and: resume=auto logging.run_dir={d}" in p.stderr
    later = [ck / f"step_{s:08d}.pt.sha256" for s in (40, 60) if s > first]    # written by the resumed run
    p = procs.signal_when(run(d, resume=True, background=True), lambda: any(f.exists() for f in later),
                          signal.SIGTERM)
    assert p.returncode == 128 + signal.SIGTERM, p.stderr[-3000:]
    second = procs.stopped_step(p.stderr, "SIGTERM")
    assert f"at step {first}" in p.stderr and first < second < 88
    assert (ck / f"step_{second:08d}.pt.sha256").is_file()
    out = run(d, resume=True)
    assert f"at step {second}" in out.stderr
    assert_same_run(straight, d, 88)


def sigterm_mid_run(start, ready: pathlib.Path, after: int, before: int, sig: int = signal.SIGTERM) -> str:
    """Start a resumed run, send its launcher ``sig`` once ``ready`` exists (SIGTERM: a scheduler
    preempting the job; SIGUSR1: SLURM's time-limit warning): every rank finishes its step and the run
    checkpoints that step, between ``after`` and ``before``; returns the output."""
    p = procs.signal_when(start("resume=auto"), ready.exists, sig)
    out = p.stdout + (p.stderr or "")
    assert p.returncode != 0, out[-3000:]
    n = procs.stopped_step(out, signal.Signals(sig).name)
    assert after < n < before and (ready.parent.parent / f"step_{n:08d}" / "complete").is_file(), out[-3000:]
    return out


@pytest.mark.distributed
def test_deepspeed_two_ranks_killed_mid_update_and_mid_save_then_resumed(tmp_path):
    """One rank dies (SIGKILL) inside a mask update; the launcher takes the other down. Then rank 0
    dies after writing a checkpoint's files but before its manifest. Then the resumed run's launcher gets
    SIGTERM (preemption) mid-run: every rank finishes its step, checkpointed. resume=auto; the run ends
    bit-identical (weights, masks, LR, every optimizer shard, scheduler, step) to an uninterrupted one."""
    from tests.distributed.test_launchers import ROOT as R, launch

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
    stop = sigterm_mid_run(lambda *a: launch("deepspeed.sh", cfg, ds, *args, f"logging.run_dir={d}", *a,
                                             background=True, env={"RIGL_DS_FAULT_DELAY": "0.5"}),
                           ck / "step_00000030" / "complete", 30, 40)
    assert "step_00000020 at step 20" in stop
    out = launch("deepspeed.sh", cfg, ds, *args, f"logging.run_dir={d}", "resume=auto")
    assert "at step 3" in out.stdout + out.stderr
    assert_same_run(straight, d, 40)      # weights, masks, every rank's optimizer shard, LR, scheduler, step


@pytest.mark.distributed
def test_fsdp2_two_ranks_killed_mid_update_and_mid_save_then_resumed(tmp_path):
    """FSDP2: rank 1 dies inside a mask update (after the sharded selection, between layers); then
    rank 0 dies after every shard of a checkpoint is written but before its manifest, leaving only
    a temporary folder. Then torchrun gets SIGUSR1 mid-run (as from SLURM's --signal): torchrun passes
    it on, the ranks finish their step, checkpointed.
    resume=auto; the run ends bit-identical to an uninterrupted one."""
    from tests.distributed.test_launchers import FSDP2_CFG, launch

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
    stop = sigterm_mid_run(lambda *a: launch("fsdp2.sh", FSDP2_CFG, *args, f"logging.run_dir={d}", *a,
                                             background=True, env={"RIGL_DS_FAULT_DELAY": "0.5"}),
                           ck / "step_00000030" / "complete", 30, 40, signal.SIGUSR1)
    assert "step_00000020 at step 20" in stop
    assert not (ck / ".step_00000030.tmp").exists()
    out = launch("fsdp2.sh", FSDP2_CFG, *args, f"logging.run_dir={d}", "resume=auto")
    assert "at step 3" in out.stdout + out.stderr
    assert_same_run(straight, d, 40)


@pytest.mark.distributed
def test_ddp_rank_killed_mid_update_then_resumed(tmp_path):
    """DDP under torchrun: rank 1 dies (SIGKILL) inside a mask update, between layers; torchrun takes
    rank 0 down; resume=auto ends bit-identical to an uninterrupted run."""
    from tests.distributed.test_launchers import ROOT as R, launch

    cfg = str(R / "configs" / "quickstart_ddp.yaml")
    args = ["train.epochs=2", "sparsity.delta=10", "logging.log_every=5", "logging.progress=false",
            "checkpoint.every_steps=10", "checkpoint.keep_last=3", "train.max_steps=40"]
    straight, d = tmp_path / "straight", tmp_path / "run"
    launch("torchrun.sh", cfg, *args, f"logging.run_dir={straight}")
    p = launch("torchrun.sh", cfg, *args, f"logging.run_dir={d}", check=False,
               env={"RIGL_DS_FAULT": "mask_update:5", "RIGL_DS_FAULT_RANK": "1"})
    assert p.returncode != 0 and "SIGKILL" in p.stdout + p.stderr, (p.stdout + p.stderr)[-3000:]
    ck = d / "checkpoints"
    assert sorted(q.name for q in ck.glob("step_*.pt")) == ["step_00000010.pt", "step_00000020.pt"]
    launch("torchrun.sh", cfg, *args, f"logging.run_dir={d}", "resume=auto")
    assert_same_run(straight, d, 40)
