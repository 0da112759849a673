"""Checkpoint faults: truncated, corrupted, half-written, full disk, another model or sparsity,
tampered weights; resume=auto falls back to the newest good checkpoint and loses nothing."""
import errno
import logging
import pathlib
import shutil

import pytest
import torch

from rigl_ds import checkpoint as ckpt
from rigl_ds.checkpoint import CheckpointError
from rigl_ds.config import load_config
from rigl_ds.train import RunError, train
from tests.compare import assert_same_run

ROOT = pathlib.Path(__file__).resolve().parents[2]
# 44 steps (one epoch of digits), updates at t = 10, 20, 30, checkpoints every 10 steps and at 44
BASE = ["train.epochs=1", "sparsity.delta=10", "logging.progress=false", "logging.log_every=5",
        "checkpoint.every_steps=10", "checkpoint.keep_last=3", "logging.tensorboard=false"]


def run(run_dir, *extra, config="configs/quickstart.yaml"):
    return train(load_config(ROOT / config, [*BASE, f"logging.run_dir={run_dir}", *extra]))


def names(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def assert_same_final(a, b, step=44):
    assert_same_run(a, b, step, tensorboard=False)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    d = tmp_path_factory.mktemp("straight")
    run(d)
    assert names(d) == ["step_00000030.pt", "step_00000030.pt.sha256", "step_00000040.pt",
                        "step_00000040.pt.sha256", "step_00000044.pt", "step_00000044.pt.sha256"]
    return d


def flip_byte(path: pathlib.Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


def test_truncated_corrupted_and_unchecksummed_files_are_refused_by_name(straight, tmp_path):
    src = straight / "checkpoints" / "step_00000044.pt"
    cases = {"truncated": lambda p: p.write_bytes(p.read_bytes()[:1000]),
             "corrupted": flip_byte,
             "no checksum file": lambda p: ckpt.checksum_path(p).unlink(),
             "cannot be read": None}
    for expect, damage in cases.items():
        p = tmp_path / expect.replace(" ", "_") / "step_00000044.pt"
        p.parent.mkdir()
        if damage is None:          # right size and hash, but not a checkpoint
            ckpt._write_atomic(p, b"not a zip file")
            ckpt._write_atomic(ckpt.checksum_path(p), f"{ckpt.hashlib.sha256(b'not a zip file').hexdigest()} 14\n".encode())
        else:
            shutil.copy(src, p)
            shutil.copy(ckpt.checksum_path(src), ckpt.checksum_path(p))
            damage(p)
        with pytest.raises(CheckpointError, match=expect) as e:
            ckpt.load(p)
        assert str(p) in str(e.value)


def test_resume_auto_falls_back_to_the_newest_good_checkpoint(straight, tmp_path, caplog):
    d = tmp_path / "run"
    run(d, "train.max_steps=30")               # checkpoints 10, 20, 30
    flip_byte(d / "checkpoints" / "step_00000030.pt")
    with caplog.at_level(logging.WARNING, logger="rigl_ds"):
        run(d, "resume=auto")
    assert "step_00000030.pt is corrupted" in caplog.text and "trying an older one" in caplog.text
    assert_same_final(straight, d)             # resumed at 20: nothing lost


def test_no_good_checkpoint_is_a_clear_error(tmp_path):
    d = tmp_path / "run"
    run(d, "train.max_steps=25", "checkpoint.at_end=false")
    for p in (d / "checkpoints").glob("step_*.pt"):
        flip_byte(p)
    with pytest.raises(CheckpointError, match=r"no usable checkpoint in .*checkpoints \(all 2 refused\)"):
        run(d, "resume=auto")
    assert len(list((d / "checkpoints").glob("step_*.pt"))) == 2       # nothing deleted


def test_full_disk_during_save_keeps_the_previous_checkpoint(straight, tmp_path, monkeypatch):
    d = tmp_path / "run"
    writes = {"n": 0}
    real = ckpt.faults.point

    def disk_full_at_second_checkpoint(name):
        if name == "checkpoint_write":
            writes["n"] += 1
            if writes["n"] == 3:               # step 20's file: its bytes are partly on disk
                raise OSError(errno.ENOSPC, "No space left on device")
        real(name)

    monkeypatch.setattr(ckpt.faults, "point", disk_full_at_second_checkpoint)
    with pytest.raises(RunError, match=r"step 20: writing the checkpoint .* failed \(\[Errno 28\] No space left on "
                                       r"device\); nothing was replaced: checkpoints kept: step_00000010.pt"):
        run(d)
    assert names(d) == ["step_00000010.pt", "step_00000010.pt.sha256"]          # no temporary file left
    ckpt.load(d / "checkpoints" / "step_00000010.pt")
    monkeypatch.setattr(ckpt.faults, "point", real)                           # the disk was freed
    run(d, "resume=auto")
    assert_same_final(straight, d)


def test_rotation_never_deletes_the_only_good_checkpoint(tmp_path, monkeypatch):
    d = tmp_path / "run"
    real = ckpt._write_atomic

    def damaged_disk(path, data):              # step 20's file is silently short on disk
        real(path, bytes(data)[:-100] if path.name == "step_00000020.pt" else data)

    monkeypatch.setattr(ckpt, "_write_atomic", damaged_disk)
    with pytest.raises(CheckpointError, match=r"step_00000020.pt is truncated or damaged"):
        run(d, "checkpoint.keep_last=1")
    assert "step_00000010.pt" in names(d)      # keep_last=1, yet the good one survived
    ckpt.load(d / "checkpoints" / "step_00000010.pt")


def test_checkpoint_of_another_sparsity_or_model_is_refused(straight, tmp_path):
    from rigl_ds.plan import make_plan

    good = straight / "checkpoints" / "step_00000044.pt"
    nnz = {r["name"]: r["nnz"] for r in make_plan(load_config(ROOT / "configs/quickstart.yaml",
                                                              ["sparsity.sparsity=0.8"]))["layers"]}
    with pytest.raises(CheckpointError, match=rf"does not fit this experiment: mask 'features.3.weight' has 1888 "
                                              rf"active weights, this sparsifier expects {nnz['features.3.weight']} at step 44 "
                                              r"\(another sparsity"):
        run(tmp_path / "a", "sparsity.sparsity=0.8", f"resume={good}")
    with pytest.raises(CheckpointError, match=r"step_00000044.pt does not fit this model/optimizer \(another model\?\)"):
        run(tmp_path / "b", "model.name=mlp", f"resume={good}")


def test_tampered_masks_are_refused_and_weights_under_the_mask_re_zeroed(straight, tmp_path, caplog):
    state = ckpt.load(straight / "checkpoints" / "step_00000044.pt")
    state["model"]["features.3.weight"][~state["sparsifier"]["masks"]["features.3.weight"]] = 0.5
    tampered = tmp_path / "w" / "step_00000044.pt"
    ckpt.save_atomic(state, tampered)
    d = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="rigl_ds"):
        run(d, f"resume={tampered}")           # already at the last step: evaluates and saves again
    n_masked = int((~state["sparsifier"]["masks"]["features.3.weight"]).sum())
    assert f"features.3.weight: {n_masked} weights under the loaded mask are not zero; re-zeroed" in caplog.text
    again = ckpt.load(d / "checkpoints" / "step_00000044.pt")
    w, m = again["model"]["features.3.weight"], again["sparsifier"]["masks"]["features.3.weight"]
    assert torch.count_nonzero(w[~m]) == 0
    state["sparsifier"]["masks"]["features.3.weight"] = m.float()
    ckpt.save_atomic(state, tampered)
    with pytest.raises(CheckpointError, match=r"mask 'features.3.weight': expected bool \(64, 32, 3, 3\), got "
                                              r"torch.float32"):
        run(tmp_path / "run2", f"resume={tampered}")
