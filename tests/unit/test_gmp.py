"""GMP (gradual magnitude pruning): the cubic schedule, pruning by |w| equal to the sort-based
reference, exact counts, no optimizer step skipped, and the method's registration."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from rigl_ds.cli import main
from rigl_ds.core import GMP, get_method, method_names
from rigl_ds.core.selection import drop_and_grow
from tests.helpers import batch, make


def cubic_zeros(final_zeros: int, t: int, t_start: int, t_end: int, s_i: float, s_f: float) -> int:
    """Zhu & Gupta: s_t = s_f + (s_i - s_f)(1 - p)^3, applied to the layer's final zeros."""
    p = min(1.0, (t - t_start) / (t_end - t_start))
    return math.floor(final_zeros * (s_f + (s_i - s_f) * (1 - p) ** 3) / s_f + 1e-9)


@pytest.mark.parametrize("s_i", [0.0, 0.4])
def test_gmp_prunes_smallest_weights_on_the_cubic_schedule(s_i):
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    total, delta, t_end = 60, 5, 33                      # prune steps 5, 10, ..., 35 (the first >= 33)
    gmp = GMP(model, opt, total_steps=total, sparsity=0.8, distribution="uniform", delta=delta, t_end=t_end,
              initial_sparsity=s_i)
    assert gmp.schedule.update_steps() == [5, 10, 15, 20, 25, 30, 35]
    final_zeros = {n: l.numel - gmp.final_nnz[n] for n, l in zip(gmp.masks, gmp.layers)}
    numel = {l.name: l.numel for l in gmp.layers}
    for n, m in gmp.masks.items():                       # the start: dense, or random at s_i
        assert int(m.sum()) == numel[n] - cubic_zeros(final_zeros[n], 0, 0, t_end, s_i, 0.8)
    params = dict(model.named_parameters())
    for t in range(total):
        x, y = batch(t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        before = {n: m.clone() for n, m in gmp.masks.items()}
        w = {n: params[n].detach().clone() for n in gmp.masks}
        assert gmp.step(), "gmp never skips the optimizer step"
        if gmp.last_update and gmp.last_update["step"] == t:
            assert gmp.schedule.is_update_step(t)
            for n, m in gmp.masks.items():
                want_zeros = final_zeros[n] if t == 35 else cubic_zeros(final_zeros[n], t, 0, t_end, s_i, 0.8)
                assert int(m.sum()) == numel[n] - want_zeros, (t, n)
                k = int(before[n].sum()) - (numel[n] - want_zeros)
                assert torch.equal(m, drop_and_grow(before[n], w[n].abs(), None, k, 0)), (t, n)
                assert not bool((m & ~before[n]).any())          # nothing grows
            assert gmp.last_update["churn"] == 0.0
        else:
            assert all(torch.equal(before[n], m) for n, m in gmp.masks.items())
        opt.step()
        for n, m in gmp.masks.items():
            assert torch.count_nonzero(params[n].detach()[~m]) == 0
            assert torch.count_nonzero(opt.state[params[n]]["momentum_buffer"][~m]) == 0
    assert gmp.nnz == gmp.final_nnz
    assert gmp.measure().mask_density == pytest.approx(gmp.planned_density)


def test_gmp_is_registered_once_and_refuses_bad_knobs():
    assert get_method("gmp") is GMP and method_names().count("gmp") == 1
    with pytest.raises(ValueError, match="initial_sparsity"):
        GMP(make(), None, total_steps=10, sparsity=0.5, initial_sparsity=0.6)
    with pytest.raises(ValueError, match="t_start < t_end"):
        GMP(make(), None, total_steps=10, sparsity=0.5, t_start=8, t_end=5)
    with pytest.raises(ValueError, match="last prune \\(step 100.*never be reached"):
        GMP(make(), None, total_steps=60, sparsity=0.5, t_end=0.75, delta=100)     # would stay dense
    with pytest.raises(ValueError, match="unknown method 'gmpp'; allowed: static, set, rigl, gmp"):
        get_method("gmpp")


def test_plan_shows_the_gmp_timeline_and_its_training_flops(tmp_path, capsys):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("name: plan\nmodel: {name: 'tests.helpers:plan_net'}\ndata: {name: digits, batch_size: 32}\n"
                   "sparsity: {method: gmp, sparsity: 0.5, distribution: erk, delta: 10, t_end: 0.75}\n"
                   "train: {epochs: 2}\n")
    assert main(["plan", str(cfg), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    # 88 steps, t_end 66: prunes at 10..70; ERK keeps conv (36) dense, fc ends at 1262 of 2560
    z = 2560 - 1262
    fc_nnz = [2560] + [2560 - (z if u == 70 else cubic_zeros(z, u, 0, 66, 0.0, 0.5)) for u in range(10, 71, 10)]
    starts = [0] + [u + 1 for u in range(10, 71, 10)]
    assert plan["schedule"]["density_timeline"] == [
        {"step": s, "global_density": pytest.approx((36 + n) / 2596)} for s, n in zip(starts, fc_nnz)]
    conv, fc = 2 * 256 * 9, 2 * 2560
    ends = starts[1:] + [88]
    want = sum((e - s) * (conv + fc * n / 2560) for s, e, n in zip(starts, ends, fc_nnz)) / ((conv + fc) * 88)
    assert plan["flops"]["train_ratio"] == pytest.approx(want)
    assert plan["schedule"]["num_mask_updates"] == 7
    cfg.write_text(cfg.read_text().replace("t_end: 0.75", "t_end: 85"))
    assert main(["validate", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "sparsity.t_end=85: gmp's last prune (step 90" in err and "(88 steps)" in err
