"""The CLI under the real launchers (torchrun, deepspeed) with 2 CPU processes, gloo."""
import json
import os
import pathlib
import signal
import sys

import pytest
import torch

from tests import procs
from tests.compare import assert_same, assert_same_run, checkpoint, counted_density, model_and_masks
from tests.distributed.harness import free_port

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROOT = pathlib.Path(__file__).resolve().parents[2]
CFG = str(ROOT / "configs" / "quickstart_ddp.yaml")
SHORT = ["train.epochs=2", "sparsity.delta=10", "logging.log_every=5", "logging.progress=false",
         "checkpoint.every_steps=null"]


def launch(script: str, *args: str, env: dict | None = None, background: bool = False, check: bool = True):
    e = dict(os.environ, PATH=f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}",
             MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    e.update(env or {})
    cmd = ["bash", str(ROOT / "launch" / script), *args]
    if background:
        return procs.Proc(cmd, env=e, cwd=ROOT, timeout=600, merge_output=True)
    p = procs.run(cmd, env=e, cwd=ROOT)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return p


def export_dense(run: pathlib.Path, tmp_path: pathlib.Path, step: int) -> dict[str, torch.Tensor]:
    """``rigl-ds export`` of the run's newest checkpoint as a dense state dict, read back; it loads
    strictly into the model the run trained."""
    from safetensors.torch import load_file

    from rigl_ds.config import load_config
    from rigl_ds.train import build_experiment

    out = tmp_path / "exported.safetensors"
    p = procs.run([sys.executable, "-m", "rigl_ds.cli", "export", str(run), "--format", "dense", "--out", str(out),
                   "--json"], cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout)["step"] == step
    state = load_file(str(out))
    model = build_experiment(load_config(run / "config.yaml"), with_data=False, device=torch.device("cpu")).model
    model.load_state_dict(state, strict=True)
    return state


def reported_density(out: str, run: pathlib.Path, step: int) -> tuple[float, float]:
    """The density a run printed and wrote to result.json, checked against a count of its checkpoint."""
    result = json.loads((run / "result.json").read_text())
    active, nonzero = counted_density(checkpoint(run, step))
    assert (result["global_density"], result["nonzero_density"]) == (active, nonzero)
    assert f"achieved density: {active:.6f} of the masked weights active" in out
    assert abs(active - 0.1) < 1e-3
    return active, nonzero


def test_torchrun_ddp_resume_and_two_nodes(tmp_path):
    straight, split, nodes = tmp_path / "straight", tmp_path / "split", tmp_path / "nodes"
    out = launch("torchrun.sh", CFG, *SHORT, f"logging.run_dir={straight}").stdout
    assert "test accuracy: top-1" in out
    reported_density(out, straight, 88)
    # stop mid-epoch at step 53, then resume=auto
    launch("torchrun.sh", CFG, *SHORT, f"logging.run_dir={split}", "train.max_steps=53")
    launch("torchrun.sh", CFG, *SHORT, f"logging.run_dir={split}", "resume=auto")
    a = assert_same_run(straight, split, 88, evaluated_at=(53,))
    assert a["sparsifier"]["last_update"]["step"] == 60
    # two "nodes" on this machine: two torchrun launchers, node ranks 0 and 1, one process each
    env = dict(NNODES="2", NPROC_PER_NODE="1", MASTER_PORT=str(free_port()))
    node_runs = [launch("torchrun.sh", CFG, *SHORT, f"logging.run_dir={nodes}", env=dict(env, NODE_RANK=str(r)),
                        background=True) for r in (0, 1)]
    for p in [p.finish() for p in node_runs]:
        assert p.returncode == 0, p.stdout[-4000:]
    assert_same_run(straight, nodes, 88)
    # the same run as a SLURM job (srun and scontrol stood in for by shims): SIGUSR1 before the time
    # limit -> every rank finishes its step and checkpoints -> the job requeues itself -> it resumes
    slurm = tmp_path / "slurm"
    job = slurm_job(tmp_path, *SHORT, f"logging.run_dir={slurm}", "checkpoint.every_steps=20")
    p = procs.signal_when(job(background=True), (slurm / "checkpoints" / "step_00000020.pt.sha256").exists,
                          signal.SIGUSR1)
    assert p.returncode == 0, p.stdout[-3000:]
    n = procs.stopped_step(p.stdout, "SIGTERM")
    assert 20 < n < 88 and (slurm / "checkpoints" / f"step_{n:08d}.pt.sha256").is_file()
    assert "requeueing job 4242" in p.stdout and (tmp_path / "requeued").read_text().split() == ["4242"]
    out = job().stdout                         # the requeued job: same id, same run directory
    assert f"at step {n}" in out and not (tmp_path / "requeued").read_text().split()[1:]
    assert_same_run(straight, slurm, 88)


def test_slurm_job_cancelled_with_sigterm_checkpoints_and_is_not_requeued(tmp_path):
    run = tmp_path / "run"
    job = slurm_job(tmp_path, *SHORT, f"logging.run_dir={run}", "checkpoint.every_steps=20")
    p = procs.signal_when(job(background=True), (run / "checkpoints" / "step_00000020.pt.sha256").exists,
                          signal.SIGTERM)
    n = procs.stopped_step(p.stdout, "SIGTERM")
    assert 20 < n < 88 and (run / "checkpoints" / f"step_{n:08d}.pt.sha256").is_file(), p.stdout[-3000:]
    assert "not requeued here" in p.stdout and not (tmp_path / "requeued").exists()


def slurm_job(tmp_path: pathlib.Path, *args: str):
    """launch/slurm.sbatch as SLURM would run it on one node (job 4242, 2 CPU processes), with shims for
    srun (runs its command, as the task) and scontrol (hostnames; ``requeue`` appends the id to a file)."""
    shims = tmp_path / "bin"
    shims.mkdir(exist_ok=True)
    (shims / "srun").write_text('#!/usr/bin/env bash\nexport SLURM_NODEID=0\nshift\nexec "$@"\n')
    (shims / "scontrol").write_text(f'#!/usr/bin/env bash\ncase "$1" in\n  show) echo 127.0.0.1;;\n'
                                    f'  requeue) echo "$2" >> {tmp_path / "requeued"};;\nesac\n')
    for f in ("srun", "scontrol"):
        (shims / f).chmod(0o755)
    env = dict(os.environ, PATH=f"{shims}:{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}",
               MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", SLURM_JOB_ID="4242", SLURM_NNODES="1",
               SLURM_JOB_NODELIST="node0", SLURM_GPUS_ON_NODE="2")
    cmd = ["bash", str(ROOT / "launch" / "slurm.sbatch"), CFG, *args]

    def start(background: bool = False):
        if background:
            return procs.Proc(cmd, env=dict(env, RIGL_DS_FAULT_DELAY="0.3"), cwd=ROOT, timeout=600, merge_output=True)
        p = procs.run(cmd, env=env, cwd=ROOT, merge_output=True)
        assert p.returncode == 0, p.stdout[-4000:]
        return p
    return start


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_launcher_each_zero_stage(tmp_path, stage):
    run = tmp_path / "run"
    ds = str(ROOT / "ds_configs" / f"zero{stage}_fp32.json")
    # stop at step 20 and resume: the first step after the load is a mask update, which resets
    # optimizer state through DeepSpeed's accessors before any optimizer step has run
    launch("deepspeed.sh", CFG, ds, *SHORT, f"logging.run_dir={run}", "train.max_steps=20")
    out = launch("deepspeed.sh", CFG, ds, *SHORT, f"logging.run_dir={run}", "train.max_steps=25",
                 "resume=auto").stdout
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == 25 and result["eval"]["count"] == 360
    state = checkpoint(run, 25)
    main = state["mp_rank_00_model_states.pt" if stage < 3 else "zero_pp_rank_0_mp_rank_00_model_states.pt"]
    assert main["rigl_ds"]["sparsifier"]["last_update"]["step"] == 20
    if stage < 3:   # ZeRO-3 keeps the module state partitioned in its own files
        reported_density(out, run, 25)
        model, masks = model_and_masks(state)
        for name, m in masks.items():
            assert torch.count_nonzero(model[name][~m]) == 0, name
    else:
        masks = main["rigl_ds"]["sparsifier"]["masks"]
        active = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
        assert result["global_density"] == active and f"achieved density: {active:.6f}" in out
    # export consolidates the folder in one process: ZeRO 0 rank 0's module, ZeRO 1-3 the fp32 masters
    exported = export_dense(run, tmp_path, 25)
    for name, m in masks.items():
        assert torch.count_nonzero(exported[name][~m]) == 0, name
    if stage < 3:                   # fp32 training: the module weights are the masters
        assert set(exported) == set(model) and all(torch.equal(exported[k], model[k]) for k in model)
    if stage == 1:      # a payload in an optimizer shard, manifest rewritten to match: refused before DeepSpeed loads it
        import shutil

        from rigl_ds.checkpoint import write_manifest
        from tests.reliability.test_safe_loading import Payload

        bad = tmp_path / "bad" / "step_00000025"
        shutil.copytree(run / "checkpoints" / "step_00000025", bad)
        (bad / "complete").unlink()
        shard = bad / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        torch.save(dict(torch.load(shard, weights_only=False), extra=Payload(tmp_path / "pwned")), shard)
        write_manifest(bad)
        p = launch("deepspeed.sh", CFG, ds, *SHORT, f"logging.run_dir={tmp_path / 'again'}", f"resume={bad}",
                   check=False)
        assert p.returncode != 0 and "zero_pp_rank_1_mp_rank_00_optim_states.pt names builtins.exec; refused" \
            in p.stdout + p.stderr, (p.stdout + p.stderr)[-3000:]
        assert not (tmp_path / "pwned").exists()


def test_deepspeed_json_that_disagrees_with_the_yaml_is_refused(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 64, "zero_optimization": {"stage": 1}}))
    e = dict(os.environ, PATH=f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}",
             MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    p = procs.run(["bash", str(ROOT / "launch" / "deepspeed.sh"), CFG, str(bad), *SHORT,
                   f"logging.run_dir={tmp_path / 'run'}"], env=e, cwd=ROOT)
    assert p.returncode != 0
    assert "train_micro_batch_size_per_gpu=64 but the YAML gives 16" in p.stdout + p.stderr


FSDP2_CFG = str(ROOT / "configs" / "quickstart_fsdp2.yaml")


def test_fsdp2_two_nodes_sharded_checkpoints_resume_at_another_world_size_and_exactly(tmp_path):
    # grad_accumulation_n=2: the checkpoint of step 60 holds half of the grow score of the update at t=60
    args = [*SHORT, "sparsity.grad_accumulation_n=2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    # the uninterrupted run on two "nodes" on this machine: two launchers, node ranks 0 and 1, one process each
    env = dict(NNODES="2", NPROC_PER_NODE="1", MASTER_PORT=str(free_port()))
    nodes = [launch("fsdp2.sh", FSDP2_CFG, *args, f"logging.run_dir={straight}", env=dict(env, NODE_RANK=str(r)),
                    background=True) for r in (0, 1)]
    outs = [p.finish() for p in nodes]
    assert all(p.returncode == 0 for p in outs), outs[0].stdout[-3000:] + outs[1].stdout[-3000:]
    assert "test accuracy: top-1" in outs[0].stdout
    reported_density(outs[0].stdout, straight, 88)
    launch("fsdp2.sh", FSDP2_CFG, *args, f"logging.run_dir={split}", "train.max_steps=60")
    two = checkpoint(split, 60)
    assert two["rigl_ds"]["sparsifier"]["last_update"]["step"] == 50
    assert two["rigl_ds"]["sparsifier"]["score_count"] == 1 and set(two["score"]) == set(two["masks"])
    for name, m in two["masks"].items():                           # whole masks assembled from 2 shards
        assert torch.count_nonzero(two["model"][name][~m]) == 0, name
        assert torch.count_nonzero(two["optimizer"]["state"][name]["momentum_buffer"][~m]) == 0, name
    exported = export_dense(split, tmp_path, 60)                   # the 2 shards resharded in one process
    assert set(exported) == set(two["model"]) and all(torch.equal(exported[k], v) for k, v in two["model"].items())
    # 2 -> 1: one process loads the 2-rank shards and (already at its last step) saves them again
    one_dir = tmp_path / "one"
    launch("fsdp2.sh", FSDP2_CFG, *args, f"logging.run_dir={one_dir}", "train.max_steps=60",
           f"resume={split / 'checkpoints' / 'step_00000060'}", env={"NPROC_PER_NODE": "1"})
    one = checkpoint(one_dir, 60)
    assert len(list((one_dir / "checkpoints" / "step_00000060").glob("*.distcp"))) == 1
    assert_same(two, one)
    # 1 -> 2, then on to the end: bit-identical to the run that never stopped
    launch("fsdp2.sh", FSDP2_CFG, *args, f"logging.run_dir={one_dir}", "resume=auto")
    assert_same_run(straight, one_dir, 88, tensorboard=False)


def test_fsdp2_bf16_autocast(tmp_path):
    run = tmp_path / "run"
    out = launch("fsdp2.sh", FSDP2_CFG, *SHORT, f"logging.run_dir={run}", "precision.dtype=bf16",
                 "train.max_steps=25").stdout
    reported_density(out, run, 25)
    state = checkpoint(run, 25)
    assert state["rigl_ds"]["sparsifier"]["last_update"]["step"] == 20
    for name, m in state["masks"].items():
        assert state["model"][name].dtype == torch.float32                     # fp32 shards under autocast
        assert torch.count_nonzero(state["model"][name][~m]) == 0, name


@pytest.mark.parametrize("stage", [0, 1])
def test_deepspeed_bf16_json_as_shipped_trains_a_batchnorm_model(tmp_path, stage):
    """ds_configs/*_bf16.json keep BatchNorm's running statistics in the parameters' dtype
    (data_types.buffer_dtype): DeepSpeed >= 0.18 otherwise leaves them fp32 beside bf16 weights, and
    BatchNorm refuses the mix (the ImageNet kit's ResNet-50 under zero1_bf16 stopped at its first step).
    Masked weights stay 0 through mask updates: at ZeRO-0 DeepSpeed's unfused bf16 optimizer keeps fp32
    masters that no ``safe_*`` accessor reaches (once copied back into the module after each step, they
    revived every masked weight: nonzero density 1.0); they are masked too, and checked here."""
    run = tmp_path / "run"
    out = launch("deepspeed.sh", CFG, str(ROOT / "ds_configs" / f"zero{stage}_bf16.json"), *SHORT,
                 "precision.dtype=bf16", f"logging.run_dir={run}", "train.max_steps=25").stdout
    active, nonzero = reported_density(out, run, 25)
    assert nonzero <= active
    state = checkpoint(run, 25)
    model, masks = model_and_masks(state)
    assert {model[n].dtype for n in masks} == {torch.bfloat16}
    for name, m in masks.items():
        assert torch.count_nonzero(model[name][~m]) == 0, name
    if stage == 0:              # FP16_UnfusedOptimizer's fp32 masters, in the module's parameter order
        masters = state["mp_rank_00_model_states.pt"]["optimizer"]["fp32_groups"][0]
        names = [n for n in model if "running_" not in n and "num_batches" not in n]
        assert len(masters) == len(names)
        for name, w in zip(names, masters):
            assert w.dtype == torch.float32 and w.shape == model[name].shape, name
            if name in masks:
                assert torch.count_nonzero(w[~masks[name]]) == 0, name


def test_fsdp2_checkpoint_each_rank_hashes_its_own_file_and_a_corrupt_one_is_refused_everywhere(tmp_path):
    """The manifest of a 2-rank FSDP2 checkpoint lists every file with the hash its writer took; a
    byte flipped in rank 1's shard is found by rank 1 on load, every rank refuses that checkpoint with
    the same message naming the file, and resume=auto falls back to the older one and finishes."""
    run = tmp_path / "run"
    args = [*SHORT, "checkpoint.every_steps=10", "checkpoint.keep_last=2"]
    launch("fsdp2.sh", FSDP2_CFG, *args, f"logging.run_dir={run}", "train.max_steps=20")
    step20 = run / "checkpoints" / "step_00000020"
    listed = json.loads((step20 / "complete").read_text())["files"]
    assert sorted(listed) == sorted(p.name for p in step20.iterdir() if p.name != "complete")
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "rigl_ds.pt"} <= set(listed)
    shard = step20 / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    out = launch("fsdp2.sh", FSDP2_CFG, *args, f"logging.run_dir={run}", "train.max_steps=30", "resume=auto")
    text = out.stdout + out.stderr
    assert "__1_0.distcp is corrupted" in text and "trying an older one" in text, text[-3000:]
    assert "resumed from" in text and "step_00000010 at step 10" in text, text[-3000:]
    assert json.loads((run / "result.json").read_text())["steps"] == 30
