import json
import pathlib

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rigl_ds.checkpoint import list_checkpoints, load
from rigl_ds.cli import main
from tests.compare import assert_same_run, counted_density, model_and_masks

ROOT = pathlib.Path(__file__).resolve().parents[2]
QUICK = str(ROOT / "configs" / "quickstart.yaml")
# a short quickstart: 2 epochs of 44 steps, an update every 10 steps until step 66
SHORT = ["train.epochs=2", "sparsity.delta=10", "logging.log_every=5", "logging.progress=false",
         "checkpoint.every_steps=null"]


def scalars(run_dir: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_short_run_writes_tensorboard_events(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", QUICK, *SHORT, f"logging.run_dir={run}"]) == 0
    out = capsys.readouterr().out
    assert "test accuracy: top-1" in out and f"tensorboard --logdir {run / 'tb'}" in out
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == 88 and result["eval"]["count"] == 360
    assert result["eval"]["top1"] > 0.5              # 88 steps at 90% sparsity already learn digits
    s = scalars(run)
    # measured from the live masks and weights, equal to a count of the saved tensors (no update after 66)
    active, nonzero = counted_density(load(run / "checkpoints" / "step_00000088.pt"))
    assert abs(active - 0.1) < 1e-3 and nonzero <= active
    assert (result["global_density"], result["nonzero_density"]) == (active, nonzero)
    assert s["sparsity/global_density"][-1] == (88, pytest.approx(active, abs=1e-7))      # float32 in TB
    assert s["sparsity/nonzero_density"][-1] == (88, pytest.approx(nonzero, abs=1e-7))
    assert f"achieved density: {active:.6f} of the masked weights active" in out
    churn_steps = [step for step, _ in s["rigl/churn"]]
    assert churn_steps == [11, 21, 31, 41, 51, 61]    # logged after the update steps 10..60
    assert all(0 < v < 0.3 for _, v in s["rigl/churn"])
    assert {"train/loss", "train/top1", "train/top5", "train/lr", "train/img_per_s", "eval/top1", "eval/top5",
            "rigl/drop_fraction", "flops/train_ratio_cumulative"} <= set(s)
    assert any(t.startswith("density/features.0.weight") for t in s)
    assert any(t.startswith("churn/classifier.1.weight") for t in s)
    assert (run / "config.yaml").is_file()
    ckpts = list_checkpoints(run / "checkpoints")
    assert [p.name for p in ckpts] == ["step_00000088.pt"]


@pytest.mark.slow
@pytest.mark.parametrize("extra,last", [
    ([], 88),
    # mixup draws random numbers, grad accumulation halves the steps: 22/epoch, updates at 10, 20, 30
    (["train.mixup=0.2", "train.grad_accumulation=2", "sparsity.grad_accumulation_n=3", "sparsity.method=set"], 44),
], ids=["rigl", "set-mixup-accum"])
def test_resume_mid_epoch_is_bit_identical(tmp_path, extra, last):
    straight, split = tmp_path / "straight", tmp_path / "split"
    cut = 53 if last == 88 else 29          # mid-epoch, between updates
    assert main(["train", QUICK, *SHORT, *extra, f"logging.run_dir={straight}"]) == 0
    # stop at the cut, then resume=auto to the end
    assert main(["train", QUICK, *SHORT, *extra, f"logging.run_dir={split}", f"train.max_steps={cut}"]) == 0
    assert [p.name for p in list_checkpoints(split / "checkpoints")] == [f"step_{cut:08d}.pt"]
    assert main(["train", QUICK, *SHORT, *extra, f"logging.run_dir={split}", "resume=auto"]) == 0
    a = assert_same_run(straight, split, last, evaluated_at=(cut,))   # the checkpoint whole, and TensorBoard
    assert a["data"] == {"epoch": 2, "examples": 0}
    assert a["sparsifier"]["last_update"]["step"] == (60 if last == 88 else 30)
    assert json.loads((straight / "result.json").read_text())["eval"] == \
        json.loads((split / "result.json").read_text())["eval"]


def test_refuses_to_overwrite_a_run(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", QUICK, *SHORT, f"logging.run_dir={run}", "train.max_steps=3", "train.eval_every_epochs=10"]
    assert main(args) == 0
    assert main(args) == 2
    assert "already holds checkpoints" in capsys.readouterr().err


@pytest.mark.parametrize("override,needle", [
    ("model.name=vgg", "model.name"),
    ("sparsity.sparsity=1.0", "sparsity.sparsity"),
    ("sparsity.sparsity=-0.1", "sparsity.sparsity"),
    ("sparsity.delta=0", "sparsity.delta"),
    ("data.name=imagefolder", "data.path"),
])
def test_bad_inputs_write_nothing(tmp_path, capsys, override, needle):
    run = tmp_path / "run"
    assert main(["train", QUICK, *SHORT, f"logging.run_dir={run}", override]) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert not run.exists() or [p.name for p in run.iterdir()] == ["error.log"]


def test_missing_data_dir_is_a_clear_error_with_only_an_error_log(tmp_path, capsys):
    run = tmp_path / "run"
    missing = tmp_path / "no_such_dir"
    assert main(["train", QUICK, *SHORT, f"logging.run_dir={run}", "data.name=imagefolder",
                 f"data.path={missing}"]) == 2
    err = capsys.readouterr().err
    assert f"data.path='{missing}'" in err and "missing folder" in err
    assert [p.name for p in run.iterdir()] == ["error.log"]
    assert "missing folder" in (run / "error.log").read_text()


def test_eval_cli_reports_accuracy_and_density(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", QUICK, *SHORT, f"logging.run_dir={run}", "train.max_steps=20"]) == 0
    capsys.readouterr()
    ck = list_checkpoints(run / "checkpoints")[-1]
    assert main(["eval", QUICK, "--checkpoint", str(ck), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == 20 and out["count"] == 360 and 0 <= out["top1"] <= out["top5"] <= 1
    assert (out["global_density"], out["nonzero_density"]) == counted_density(load(ck))
    assert main(["eval", QUICK, "--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_lr_schedule_warmup_then_cosine():
    from rigl_ds.config import load_config
    from rigl_ds.train import lr_factor

    cfg = load_config(QUICK, ["lr_schedule.warmup_epochs=1", "lr_schedule.min_lr=0.005"])  # lr 0.05
    spe, total = 44, 1320
    assert [lr_factor(cfg, s, total, spe) for s in (0, 21, 43)] == pytest.approx([1 / 44, 22 / 44, 1.0])
    assert lr_factor(cfg, 44, total, spe) == pytest.approx(1.0)
    mid = 44 + (total - 44) // 2
    assert lr_factor(cfg, mid, total, spe) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(cfg, total, total, spe) == pytest.approx(0.1)


@pytest.mark.slow
def test_resnet50_synthetic_smoke(tmp_path):
    run = tmp_path / "run"
    cfg = str(ROOT / "configs" / "smoke_resnet50_synthetic.yaml")
    assert main(["train", cfg, f"logging.run_dir={run}", "train.max_steps=6", "logging.progress=false",
                 "checkpoint.at_end=true"]) == 0
    state = load(run / "checkpoints" / "step_00000006.pt")
    masks = state["sparsifier"]["masks"]
    assert len(masks) == 54
    total = sum(m.numel() for m in masks.values())
    assert abs(sum(int(m.sum()) for m in masks.values()) / total - 0.1) < 1e-3
    assert state["sparsifier"]["last_update"]["step"] == 5
    for name, m in masks.items():
        assert torch.count_nonzero(state["model"][name][~m]) == 0, name


def test_resumed_run_adds_to_its_time_and_a_finished_run_is_left_as_it_is(tmp_path, monkeypatch, capsys):
    import itertools
    import types

    import rigl_ds.train

    run = tmp_path / "run"
    args = ["train", QUICK, *SHORT, f"logging.run_dir={run}", "train.eval_every_epochs=10"]
    clock = itertools.count(0.0, 100.0)            # the first session's clock runs 100 s a reading
    monkeypatch.setattr(rigl_ds.train, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    assert main([*args, "train.max_steps=3"]) == 0
    first = json.loads((run / "result.json").read_text())
    assert first["steps"] == 3 and first["seconds"] >= 100 and first["train_step_seconds"] >= 300
    monkeypatch.undo()                             # the second session runs on the real clock
    assert main([*args, "train.max_steps=6", "resume=auto"]) == 0
    second = json.loads((run / "result.json").read_text())
    assert second["steps"] == 6
    assert second["seconds"] > first["seconds"] and second["train_step_seconds"] > first["train_step_seconds"]
    text = (run / "result.json").read_bytes()
    capsys.readouterr()
    assert main([*args, "train.max_steps=6", "resume=auto"]) == 0
    assert "already finished at step 6" in capsys.readouterr().err
    assert (run / "result.json").read_bytes() == text


def test_cpu_threads_are_chosen_from_the_config_and_machine_and_logged(tmp_path, monkeypatch, capsys):
    import os

    from rigl_ds.train import SMALL_STEP_FLOPS, choose_threads

    cpu = torch.device("cpu")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert choose_threads(3, 1e12, cpu) == (3, "train.threads")
    assert choose_threads("auto", SMALL_STEP_FLOPS / 2, cpu)[0] == 1
    cpus = len(os.sched_getaffinity(0))
    assert choose_threads("auto", SMALL_STEP_FLOPS * 2, cpu)[0] == cpus
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert choose_threads("auto", SMALL_STEP_FLOPS * 2, cpu)[0] == max(1, cpus // 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert choose_threads("auto", SMALL_STEP_FLOPS * 2, cpu) == (5, "train.threads=auto: OMP_NUM_THREADS")
    # the run sets and logs it
    before = torch.get_num_threads()
    try:
        assert main(["train", QUICK, *SHORT, "train.max_steps=2", "train.threads=2",
                     f"logging.run_dir={tmp_path / 'run'}"]) == 0
        assert torch.get_num_threads() == 2
        out = capsys.readouterr()
        assert "torch CPU threads per process: 2 (train.threads)" in out.out + out.err
    finally:
        torch.set_num_threads(before)


def test_a_user_model_that_needs_real_tensors_trains(tmp_path):
    """FLOPs are counted on a meta-device copy; a model whose forward reads host values falls back to a
    CPU copy (without drawing from the run's RNG)."""
    run = tmp_path / "run"
    assert main(["train", QUICK, *SHORT, "train.max_steps=3", "model.name=tests.helpers:needs_real_tensors",
                 f"logging.run_dir={run}"]) == 0
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == 3 and result["train_flops_ratio"] < 1.0


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_optimizer_fused_reaches_torch_and_keeps_masked_weights_zero(tmp_path, name):
    """``optimizer.fused: true`` builds torch's fused kernel; a run through mask updates keeps every
    masked weight at 0 with the planned density; null leaves torch's default."""
    from rigl_ds.config import load_config
    from rigl_ds.train import build_optimizer

    model = torch.nn.Linear(4, 3)
    fused = build_optimizer(load_config(QUICK, [f"optimizer.name={name}", "optimizer.fused=true"]), model)
    assert fused.defaults["fused"] is True
    assert build_optimizer(load_config(QUICK, [f"optimizer.name={name}"]), model).defaults["fused"] is None
    run = tmp_path / "run"
    assert main(["train", QUICK, *SHORT, f"logging.run_dir={run}", "train.max_steps=25", f"optimizer.name={name}",
                 "optimizer.fused=true", "optimizer.lr=0.01"]) == 0
    state = load(list_checkpoints(run / "checkpoints")[-1])
    assert state["sparsifier"]["last_update"]["step"] == 20
    weights, masks = model_and_masks(state)
    for n, m in masks.items():
        assert int(torch.count_nonzero(weights[n][~m])) == 0, n
    active, nonzero = counted_density(state)
    assert nonzero <= active and active == pytest.approx(0.1, abs=1e-3)
