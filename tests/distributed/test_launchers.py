"""The CLI under the real launchers (torchrun, deepspeed) with 2 CPU processes, gloo."""
import json
import os
import pathlib
import sys

import pytest
import torch

from tests import procs
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


def assert_same_state(a: dict, b: dict) -> None:
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for k, m in a["sparsifier"]["masks"].items():
        assert torch.equal(m, b["sparsifier"]["masks"][k]), k
    assert a["sparsifier"]["last_update"] == b["sparsifier"]["last_update"]


def test_torchrun_ddp_resume_and_two_nodes(tmp_path):
    from rigl_ds.checkpoint import load

    straight, split, nodes = tmp_path / "straight", tmp_path / "split", tmp_path / "nodes"
    out = launch("torchrun.sh", CFG, *SHORT, f"logging.run_dir={straight}").stdout
    assert "test accuracy: top-1" in out and "achieved density: 0.1000" in out
    # stop mid-epoch at step 53, then resume=auto
    launch("torchrun.sh", CFG, *SHORT, f"logging.run_dir={split}", "train.max_steps=53")
    launch("torchrun.sh", CFG, *SHORT, f"logging.run_dir={split}", "resume=auto")
    a = load(straight / "checkpoints" / "step_00000088.pt")
    assert_same_state(a, load(split / "checkpoints" / "step_00000088.pt"))
    assert a["sparsifier"]["last_update"]["step"] == 60
    # two "nodes" on this machine: two torchrun launchers, node ranks 0 and 1, one process each
    env = dict(NNODES="2", NPROC_PER_NODE="1", MASTER_PORT=str(free_port()))
    procs = [launch("torchrun.sh", CFG, *SHORT, f"logging.run_dir={nodes}", env=dict(env, NODE_RANK=str(r)),
                    background=True) for r in (0, 1)]
    for p in [p.finish() for p in procs]:
        assert p.returncode == 0, p.stdout[-4000:]
    assert_same_state(a, load(nodes / "checkpoints" / "step_00000088.pt"))


def ds_state(run: pathlib.Path, step: int) -> dict:
    tag = run / "checkpoints" / f"step_{step:08d}"
    assert (tag / "complete").is_file()
    files = sorted(tag.glob("*mp_rank_00_model_states.pt"))     # ZeRO-3 prefixes zero_pp_rank_0_
    assert files, sorted(p.name for p in tag.iterdir())
    states = torch.load(files[0], map_location="cpu", weights_only=False)
    return dict(states["rigl_ds"], model=states["module"])


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_launcher_each_zero_stage(tmp_path, stage):
    run = tmp_path / "run"
    ds = str(ROOT / "ds_configs" / f"zero{stage}_fp32.json")
    # stop at step 20 and resume: the first step after the load is a mask update, which resets
    # optimizer state through DeepSpeed's accessors before any optimizer step has run
    launch("deepspeed.sh", CFG, ds, *SHORT, f"logging.run_dir={run}", "train.max_steps=20")
    out = launch("deepspeed.sh", CFG, ds, *SHORT, f"logging.run_dir={run}", "train.max_steps=25",
                 "resume=auto").stdout
    assert "achieved density: 0.1000" in out
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == 25 and result["eval"]["count"] == 360
    state = ds_state(run, 25)
    masks = state["sparsifier"]["masks"]
    assert state["sparsifier"]["last_update"]["step"] == 20
    assert abs(sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values()) - 0.1) < 1e-3
    if stage < 3:   # ZeRO-3 keeps the module state partitioned in its own files
        for name, m in masks.items():
            assert torch.count_nonzero(state["model"][name][~m]) == 0, name


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


def dcp_state(run: pathlib.Path, step: int) -> dict:
    """A DCP checkpoint folder read whole (any world size wrote it) + its rigl_ds.pt."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from rigl_ds.checkpoint import load, verify_folder

    tag = run / "checkpoints" / f"step_{step:08d}"
    verify_folder(tag)
    out = run / f"dcp_{step}.pt"
    dcp_to_torch_save(tag, out)
    tensors = torch.load(out, weights_only=False)
    out.unlink()
    return dict(tensors, rigl_ds=load(tag / "rigl_ds.pt"))


def assert_same_dcp(a: dict, b: dict) -> None:
    assert set(a["masks"]) == set(b["masks"]) and a["masks"]
    for k, m in a["masks"].items():
        assert m.dtype == torch.bool and torch.equal(m, b["masks"][k]), k
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert set(a.get("score", {})) == set(b.get("score", {}))
    for k, v in a.get("score", {}).items():
        assert torch.equal(v, b["score"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert set(sa) == set(sb) and sa
    for p, st in sa.items():
        for key, v in st.items():
            assert torch.equal(v, sb[p][key]), (p, key)
    ra, rb = a["rigl_ds"]["sparsifier"], b["rigl_ds"]["sparsifier"]
    for key in ("step", "pending", "last_update", "score_count"):
        assert ra[key] == rb[key], key
    assert torch.equal(ra["generator"], rb["generator"])


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
    assert "test accuracy: top-1" in outs[0].stdout and "achieved density: 0.1000" in outs[0].stdout
    launch("fsdp2.sh", FSDP2_CFG, *args, f"logging.run_dir={split}", "train.max_steps=60")
    two = dcp_state(split, 60)
    assert two["rigl_ds"]["sparsifier"]["last_update"]["step"] == 50
    assert two["rigl_ds"]["sparsifier"]["score_count"] == 1 and set(two["score"]) == set(two["masks"])
    for name, m in two["masks"].items():                           # whole masks assembled from 2 shards
        assert torch.count_nonzero(two["model"][name][~m]) == 0, name
        assert torch.count_nonzero(two["optimizer"]["state"][name]["momentum_buffer"][~m]) == 0, name
    # 2 -> 1: one process loads the 2-rank shards and (already at its last step) saves them again
    launch("fsdp2.sh", FSDP2_CFG, *args, f"logging.run_dir={split}", "train.max_steps=60", "resume=auto",
           env={"NPROC_PER_NODE": "1"})
    one = dcp_state(split, 60)
    assert len(list((split / "checkpoints" / "step_00000060").glob("*.distcp"))) == 1
    assert_same_dcp(two, one)
    # 1 -> 2, then on to the end: bit-identical to the run that never stopped
    launch("fsdp2.sh", FSDP2_CFG, *args, f"logging.run_dir={split}", "resume=auto")
    assert_same_dcp(dcp_state(straight, 88), dcp_state(split, 88))


def test_fsdp2_bf16_autocast(tmp_path):
    run = tmp_path / "run"
    out = launch("fsdp2.sh", FSDP2_CFG, *SHORT, f"logging.run_dir={run}", "precision.dtype=bf16",
                 "train.max_steps=25").stdout
    assert "achieved density: 0.1000" in out
    state = dcp_state(run, 25)
    assert state["rigl_ds"]["sparsifier"]["last_update"]["step"] == 20
    for name, m in state["masks"].items():
        assert state["model"][name].dtype == torch.float32                     # fp32 shards under autocast
        assert torch.count_nonzero(state["model"][name][~m]) == 0, name
