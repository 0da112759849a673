"""inf/NaN gradients in the training loop (fp32, no GradScaler): the step is skipped as GradScaler
would skip it, BatchNorm statistics are restored, a mask update due on that step is postponed to
the next finite step (never computed from inf/NaN), and it is logged."""
import logging
import pathlib

import pytest
import torch

from rigl_ds.config import load_config
from rigl_ds.train import Trainer

ROOT = pathlib.Path(__file__).resolve().parents[2]
BASE = ["train.epochs=1", "sparsity.delta=10", "logging.progress=false", "logging.log_every=5",
        "checkpoint.every_steps=null", "checkpoint.at_end=false", "logging.tensorboard=false"]


def trainer(tmp_path, *extra) -> Trainer:
    return Trainer(load_config(ROOT / "configs/quickstart.yaml", [*BASE, f"logging.run_dir={tmp_path}", *extra]))


def record(t: Trainer, poison_grads: dict[int, float] = {}, poison_input: set[int] = frozenset()):
    """Run ``t`` while poisoning gradients (after backward) or the input batch at chosen steps;
    returns per step: (update step or None, weights before, weights after, buffers before/after)."""
    log = {}
    real_before, real_step = t.rt.before_sparsifier, t.train_step

    def before_sparsifier():
        real_before()
        if t.step in poison_grads:
            g = t.model.features[3].weight.grad
            g.view(-1)[7] = poison_grads[t.step]

    def train_step(micro):
        s = t.step
        if s in poison_input:
            micro = [(x.clone().fill_(float("nan")), y) for x, y in micro]
        before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
        bufs = {n: b.clone() for n, b in t.model.named_buffers()}
        out = t.train_step_inner(micro)
        upd = t.sparsifier.last_update["step"] if t.sparsifier.last_update else None
        log[s] = (upd, before, {n: p.detach().clone() for n, p in t.model.named_parameters()}, bufs,
                  {n: b.clone() for n, b in t.model.named_buffers()})
        return out

    t.rt.before_sparsifier = before_sparsifier
    t.train_step_inner, t.train_step = real_step, train_step
    result = t.run()
    return log, result


def check_masks_and_zeros(t: Trainer) -> None:
    params = dict(t.model.named_parameters())
    for name, m in t.sparsifier.masks.items():
        assert int(m.sum()) == t.sparsifier.nnz[name]
        assert torch.count_nonzero(params[name].detach()[~m]) == 0
        for st in t.optimizer.state[params[name]].values():
            if torch.is_tensor(st) and st.shape == m.shape:
                assert torch.count_nonzero(st[~m]) == 0
    assert all(torch.isfinite(p).all() for p in params.values())


@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_nonfinite_gradients_at_and_between_update_steps(tmp_path, caplog, bad):
    t = trainer(tmp_path)
    with caplog.at_level(logging.WARNING, logger="rigl_ds"):
        log, result = record(t, poison_grads={20: bad, 21: bad, 25: bad})   # 20 is an update step
    # steps 20, 21, 25 changed no weight; the update due at t=20 ran at t=22, the next finite step
    for s in (20, 21, 25):
        upd, before, after, _, _ = log[s]
        assert all(torch.equal(before[n], after[n]) for n in before), s
    assert [log[s][0] for s in (19, 20, 21, 22, 23)] == [10, 10, 10, 22, 22]
    assert log[30][0] == 30 and t.sparsifier.skipped_nonfinite == 2      # the update window saw 2 bad steps
    assert t.nonfinite_steps == 3
    assert caplog.text.count("non-finite gradients: optimizer step skipped") == 3
    assert "step 20: mask update postponed: gradients are not finite" in caplog.text
    check_masks_and_zeros(t)
    assert result["eval"]["loss"] < 10 and result["eval"]["top1"] > 0.5       # chance is 0.1; NaN stats give ~0.1


def test_poisoned_batch_restores_batchnorm_statistics(tmp_path, caplog):
    t = trainer(tmp_path)
    with caplog.at_level(logging.WARNING, logger="rigl_ds"):
        log, result = record(t, poison_input={15})
    _, before, after, bufs_before, bufs_after = log[15]
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert all(torch.equal(bufs_before[n], bufs_after[n]) for n in bufs_before)     # running stats kept
    assert t.nonfinite_steps == 1 and "step 15: non-finite gradients" in caplog.text
    check_masks_and_zeros(t)
    assert all(torch.isfinite(b).all() for b in t.model.buffers() if b.is_floating_point())
    assert result["eval"]["loss"] < 10 and result["eval"]["top1"] > 0.5       # chance is 0.1; NaN stats give ~0.1
