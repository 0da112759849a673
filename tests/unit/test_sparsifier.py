import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rigl_ds import SET, RigL, Static
from rigl_ds.core import GMP
from rigl_ds.core.selection import drop_and_grow
from tests.helpers import batch, make, train_steps


def dense_grads(model, names):
    params = dict(model.named_parameters())
    return {n: params[n].grad.detach().clone() for n in names}


def forward_backward(model, t, dtype=torch.float32):
    x, y = batch(t, dtype=dtype)
    F.cross_entropy(model(x), y).backward()


def test_initial_masks_exact_counts_seeded_and_weights_zeroed():
    m1, m2 = make(), make()
    r1 = RigL(m1, None, total_steps=100, sparsity=0.9, seed=7)
    r2 = RigL(m2, None, total_steps=100, sparsity=0.9, seed=7)
    params = dict(m1.named_parameters())
    for name, mask in r1.masks.items():
        layer = next(l for l in r1.layers if l.name == name)
        assert int(mask.sum()) == layer.numel - math.floor((1 - r1.densities[name]) * layer.numel + 1e-6)
        assert torch.equal(mask, r2.masks[name])
        assert torch.count_nonzero(params[name][~mask]) == 0
    assert mask.element_size() == 1
    r3 = RigL(make(), None, total_steps=100, sparsity=0.9, seed=8)
    assert not all(torch.equal(r1.masks[n], r3.masks[n]) for n in r1.masks)


def test_building_the_sparsifier_after_loading_a_sparse_model_loses_no_weight():
    """The plugin order mistake: load trained sparse weights, then build RigL, then load its state.
    The initial mask keeps the nonzero weights first, so nothing is zeroed and the run continues as
    saved; a fresh (all-nonzero) model still gets the plain seeded random mask."""
    from rigl_ds.core.selection import random_mask

    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rigl = RigL(model, opt, total_steps=40, sparsity=0.8, delta=5, t_end=1.0, seed=3)
    train_steps(model, opt, rigl, 12)                         # two mask updates: masks far from the seed's draw
    saved_model = copy.deepcopy(model.state_dict())
    saved_rigl = copy.deepcopy(rigl.state_dict())

    again = make(seed=1)
    again.load_state_dict(saved_model)                        # the weights first ...
    late = RigL(again, None, total_steps=40, sparsity=0.8, delta=5, t_end=1.0, seed=3)   # ... then RigL
    for k, v in saved_model.items():
        assert torch.equal(again.state_dict()[k], v), k       # building it zeroed no trained weight
    late.load_state_dict(saved_rigl)
    for k, v in saved_model.items():
        assert torch.equal(again.state_dict()[k], v), k
    for n in rigl.masks:
        assert torch.equal(late.masks[n], rigl.masks[n])

    fresh = RigL(make(), None, total_steps=40, sparsity=0.8, seed=3)
    gen = torch.Generator().manual_seed(3)
    for layer in fresh.layers:          # the draw of random_mask without a preference, layer by layer
        assert torch.equal(fresh.masks[layer.name].view(-1), random_mask(layer.numel, fresh.nnz[layer.name], gen))


def test_random_mask_prefers_given_positions_first():
    from rigl_ds.core.selection import random_mask

    prefer = torch.zeros(100, dtype=torch.bool)
    prefer[torch.tensor([3, 17, 40, 41, 99])] = True
    m = random_mask(100, 12, torch.Generator().manual_seed(0), prefer)
    assert int(m.sum()) == 12 and bool(m[prefer].all())      # all 5 preferred kept, 7 more at random
    m = random_mask(100, 3, torch.Generator().manual_seed(0), prefer)
    assert int(m.sum()) == 3 and not bool(m[~prefer].any())  # 3 of the 5, nothing else
    everything = torch.ones(100, dtype=torch.bool)
    assert torch.equal(random_mask(100, 30, torch.Generator().manual_seed(5), everything),
                       random_mask(100, 30, torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_update_equals_reference_and_resets_state_exactly(opt_name):
    model = make()
    opt = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if opt_name == "sgd"
           else torch.optim.Adam(model.parameters(), lr=1e-2))
    rigl = RigL(model, opt, total_steps=40, sparsity=0.8, delta=10, t_end=1.0)
    train_steps(model, opt, rigl, 10)               # steps 0..9; step 10 updates
    params = dict(model.named_parameters())
    opt.zero_grad()
    forward_backward(model, 10)
    grads = dense_grads(model, rigl.masks)
    old_masks = {n: m.clone() for n, m in rigl.masks.items()}
    weights = {n: params[n].detach().clone() for n in rigl.masks}
    states = {n: {k: v.clone() for k, v in opt.state[params[n]].items() if v.shape == params[n].shape}
              for n in rigl.masks}
    for n, m in old_masks.items():       # poison the state of inactive positions: grown ones must come out 0
        for k, v in opt.state[params[n]].items():
            if v.shape == m.shape:
                v[~m] = 7.0
    assert rigl.is_update_step()
    assert rigl.step() is False                      # the optimizer step is skipped
    f = 0.15 * (1 + math.cos(math.pi * 10 / 40))
    assert rigl.last_update["drop_fraction"] == pytest.approx(f)
    changed = 0
    for name, old in old_masks.items():
        k = math.floor(f * rigl.nnz[name])
        if rigl.nnz[name] == old.numel():
            expected = old
        else:
            expected = drop_and_grow(old, weights[name].abs(), grads[name].abs(), k)
        new = rigl.masks[name]
        assert torch.equal(new, expected), name
        assert int(new.sum()) == rigl.nnz[name]
        keep, moved = old & new, old ^ new
        changed += int(moved.sum())
        w = params[name].detach()
        assert torch.equal(w[keep], weights[name][keep])          # kept: weight unchanged
        assert torch.count_nonzero(w[~new]) == 0 and torch.count_nonzero(w[new & ~old]) == 0
        assert states[name], "the optimizer has per-element state"
        for key, before in states[name].items():
            after = opt.state[params[name]][key]
            assert torch.equal(after[keep], before[keep]), (name, key)   # kept: state unchanged
            assert torch.count_nonzero(after[moved]) == 0, (name, key)   # grown/dropped: 0
    assert changed > 0
    assert rigl.last_update["churn"] == pytest.approx(
        sum(int((rigl.masks[n] & ~o).sum()) for n, o in old_masks.items()) / sum(rigl.nnz.values()))


def test_just_dropped_and_regrown_keeps_weight_and_state():
    lin = nn.Linear(4, 1, bias=False)
    model = nn.Sequential(lin)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rigl = RigL(model, opt, total_steps=10, sparsity=0.5, distribution="uniform", delta=1,
                alpha=0.5, anneal="constant", t_end=1.0)
    rigl._step = 1                                    # next step is an update step
    mask = rigl.masks["0.weight"]
    active = mask.flatten().nonzero().flatten().tolist()
    inactive = (~mask).flatten().nonzero().flatten().tolist()
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight.view(-1)[active[0]] = 1.0
        lin.weight.view(-1)[active[1]] = 0.01          # smallest |w| -> dropped (k = 1)
    opt.state[lin.weight]["momentum_buffer"] = torch.zeros_like(lin.weight)
    opt.state[lin.weight]["momentum_buffer"].view(-1)[active[1]] = 0.5
    lin.weight.grad = torch.zeros_like(lin.weight)
    lin.weight.grad.view(-1)[active[1]] = 3.0           # ...and regrown: largest |g|
    lin.weight.grad.view(-1)[inactive[0]] = 1.0
    assert rigl.step() is False
    assert torch.equal(rigl.masks["0.weight"], mask)
    assert lin.weight.view(-1)[active[1]].item() == pytest.approx(0.01)
    assert opt.state[lin.weight]["momentum_buffer"].view(-1)[active[1]].item() == 0.5


def test_skip_step_option_off_lets_grown_weights_move_at_once():
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rigl = RigL(model, opt, total_steps=40, sparsity=0.8, delta=10, skip_step_on_update=False)
    train_steps(model, opt, rigl, 10)
    old = {n: m.clone() for n, m in rigl.masks.items()}
    opt.zero_grad()
    forward_backward(model, 10)
    assert rigl.step() is True
    params = dict(model.named_parameters())
    for name, mask in rigl.masks.items():
        g = params[name].grad
        assert torch.count_nonzero(g[~mask]) == 0        # masked with the new mask
    opt.step()
    grown_moved = sum(int(torch.count_nonzero(params[n].detach()[rigl.masks[n] & ~o])) for n, o in old.items())
    assert grown_moved > 0


def test_grad_accumulation_n_averages_dense_grads_of_the_window():
    model = make(dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rigl = RigL(model, opt, total_steps=40, sparsity=0.8, delta=10, grad_accumulation_n=3)
    train_steps(model, opt, rigl, 8, dtype=torch.float64)
    recorded = []
    for t in (8, 9, 10):
        opt.zero_grad()
        forward_backward(model, t, torch.float64)
        recorded.append(dense_grads(model, rigl.masks))
        if t == 10:
            params = dict(model.named_parameters())
            old = {n: m.clone() for n, m in rigl.masks.items()}
            w = {n: params[n].detach().abs().clone() for n in rigl.masks}
        if rigl.step():
            opt.step()
    assert rigl.last_update["step"] == 10 and rigl._score is None
    f = rigl.schedule.drop_fraction(10)
    for name in old:
        if rigl.nnz[name] == old[name].numel():
            continue
        mean = (recorded[0][name] + recorded[1][name] + recorded[2][name]) / 3
        expected = drop_and_grow(old[name], w[name], mean.abs(), math.floor(f * rigl.nnz[name]))
        assert torch.equal(rigl.masks[name], expected), name
        # a single-step score would have chosen differently somewhere: the average mattered
    assert any(
        not torch.equal(drop_and_grow(old[n], w[n], recorded[2][n].abs(), math.floor(f * rigl.nnz[n])),
                        rigl.masks[n]) for n in old if rigl.nnz[n] < old[n].numel())


def test_user_gradient_accumulation_equals_one_big_batch():
    def run(micro):
        model = make(dtype=torch.float64)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        rigl = RigL(model, opt, total_steps=30, sparsity=0.8, delta=5)
        masks = []
        for t in range(30):
            x, y = batch(t, dtype=torch.float64)
            opt.zero_grad()
            for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
                (F.cross_entropy(model(xs), ys) / micro).backward()
            if rigl.step():
                opt.step()
            masks.append({n: m.clone() for n, m in rigl.masks.items()})
        return model, masks

    # TinyCNN's BatchNorm makes micro-batches differ from the big batch; drop it for this test
    import tests.helpers as h
    orig = h.TinyCNN.forward
    h.TinyCNN.forward = lambda self, x: self.fc2(F.relu(self.fc1(F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2).flatten(1))))
    try:
        m1, masks1 = run(1)
        m2, masks2 = run(4)
    finally:
        h.TinyCNN.forward = orig
    for a, b in zip(masks1, masks2):
        assert all(torch.equal(a[n], b[n]) for n in a)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2)


def test_static_never_updates_and_set_grows_at_random():
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    static = Static(model, opt, total_steps=30, sparsity=0.8, delta=5)
    before = {n: m.clone() for n, m in static.masks.items()}
    train_steps(model, opt, static, 30)
    assert all(torch.equal(before[n], static.masks[n]) for n in before) and static.last_update is None

    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    set_ = SET(model, opt, total_steps=30, sparsity=0.8, delta=5)
    before = {n: m.clone() for n, m in set_.masks.items()}
    counts = []
    train_steps(model, opt, set_, 30, check=lambda t: counts.append({n: int(m.sum()) for n, m in set_.masks.items()}))
    assert all(c == set_.nnz for c in counts)
    assert not all(torch.equal(before[n], set_.masks[n]) for n in before)


def test_nonfinite_update_is_postponed_to_next_finite_step():
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rigl = RigL(model, opt, total_steps=40, sparsity=0.8, delta=10)
    train_steps(model, opt, rigl, 10)
    before = {n: m.clone() for n, m in rigl.masks.items()}
    opt.zero_grad()
    forward_backward(model, 10)
    model.fc1.weight.grad[0, 0] = float("inf")           # an fp16 overflow, say
    assert rigl.step() is True                            # proceeds as an ordinary step
    assert all(torch.equal(before[n], rigl.masks[n]) for n in before)
    assert rigl.last_update is None and rigl.skipped_nonfinite == 1
    opt.zero_grad()                                       # (a GradScaler would skip opt.step())
    forward_backward(model, 11)
    model.conv2.weight.grad[0, 0, 0, 0] = float("nan")
    assert rigl.step() is True and rigl.last_update is None
    opt.zero_grad()
    forward_backward(model, 12)
    assert rigl.step() is False                           # postponed update happens now
    assert rigl.last_update["step"] == 12 and rigl.last_update["due_step"] == 10
    assert not all(torch.equal(before[n], rigl.masks[n]) for n in before)


def test_gradscaler_loop_skips_nonfinite_update_and_keeps_invariants():
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    rigl = RigL(model, opt, total_steps=40, sparsity=0.8, delta=10)
    for t in range(25):
        x, y = batch(t)
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        if t == 10:
            model.fc2.weight.grad.mul_(float("inf"))
        scaler.unscale_(opt)
        if rigl.step():
            scaler.step(opt)
        scaler.update()
        params = dict(model.named_parameters())
        for n, m in rigl.masks.items():
            assert int(m.sum()) == rigl.nnz[n]
            assert torch.isfinite(params[n]).all() and torch.count_nonzero(params[n][~m]) == 0
    assert rigl.last_update["due_step"] == 20 and rigl.skipped_nonfinite == 1


@pytest.mark.parametrize("order", ["before", "after"])
def test_lr_scheduler_created_before_or_after(order):
    def run(order):
        model = make()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if order == "before":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=30)
        rigl = RigL(model, opt, total_steps=30, sparsity=0.8, delta=5)
        if order == "after":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=30)
        for t in range(30):
            x, y = batch(t)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if rigl.step():
                opt.step()
            sched.step()
        return model, opt

    with warnings.catch_warnings():
        warnings.simplefilter("error")                    # no "lr_scheduler.step() before optimizer.step()"
        model, opt = run(order)
    ref, _ = run("before")
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls,n", [(RigL, 1), (RigL, 3), (SET, 1), (GMP, 1)])
def test_state_dict_round_trip_mid_run_continues_identically(cls, n):
    total, cut = 40, 19                                   # step 19 lies inside the window of 20

    def fresh(seed):
        model = make(seed)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        sp = cls(model, opt, total_steps=total, sparsity=0.8, delta=10, grad_accumulation_n=n, seed=seed)
        return model, opt, sp

    model, opt, sp = fresh(0)
    train_steps(model, opt, sp, total)

    m2, o2, s2 = fresh(0)
    train_steps(m2, o2, s2, cut)
    if n > 1:
        assert s2._score_count == n - 2                   # mid-window scores are saved too
    buf = io.BytesIO()
    torch.save({"model": m2.state_dict(), "opt": o2.state_dict(), "sp": s2.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    m3, o3, s3 = fresh(123)                               # different init and mask seed
    m3.load_state_dict(ckpt["model"])
    o3.load_state_dict(ckpt["opt"])
    s3.load_state_dict(ckpt["sp"])
    train_steps(m3, o3, s3, total - cut, start=cut)
    for a, b in zip(model.state_dict().values(), m3.state_dict().values()):
        assert torch.equal(a, b)
    assert all(torch.equal(sp.masks[k], s3.masks[k]) for k in sp.masks)
    assert sp.last_update == s3.last_update and sp.step_count == s3.step_count == total


def test_load_state_dict_refuses_another_model_or_sparsity():
    model = make()
    sp = RigL(model, None, total_steps=10, sparsity=0.8)
    state = sp.state_dict()
    other = RigL(make(), None, total_steps=10, sparsity=0.9)
    with pytest.raises(ValueError, match="active weights"):
        other.load_state_dict(state)
    bad = copy.deepcopy(state)
    bad["masks"].pop("fc2.weight")
    with pytest.raises(ValueError, match="missing \\['fc2.weight'\\]"):
        sp.load_state_dict(bad)
    bad = copy.deepcopy(state)
    bad["masks"]["fc1.weight"] = bad["masks"]["fc1.weight"].float()
    with pytest.raises(ValueError, match="fc1.weight"):
        sp.load_state_dict(bad)
    with pytest.raises(ValueError, match="'set'"):
        SET(make(), None, total_steps=10, sparsity=0.8).load_state_dict(state)


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="sparsity must be .* got 1.0"):
        RigL(make(), None, total_steps=10, sparsity=1.0)
    with pytest.raises(ValueError, match="distribution must be one of uniform, uniform_nv, er, erk, got 'gauss'"):
        RigL(make(), None, total_steps=10, distribution="gauss")
    with pytest.raises(ValueError, match="delta"):
        RigL(make(), None, total_steps=10, delta=0)
    with pytest.raises(TypeError):
        RigL(make(), None, total_steps=10, sparsityy=0.5)


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_channels_last_weights_update_like_contiguous_ones(opt_name):
    """NHWC weights (and the optimizer buffers cloned from their gradients) get the same masks,
    the same zeros and the same weights as NCHW ones: flat mask positions are logical positions."""
    from tests.helpers import make_nobn

    runs = []
    for cl in (False, True):
        model = make_nobn(dtype=torch.float64)
        if cl:
            model = model.to(memory_format=torch.channels_last)
        opt = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if opt_name == "sgd"
               else torch.optim.Adam(model.parameters(), lr=1e-3))
        sp = RigL(model, opt, total_steps=24, sparsity=0.8, delta=5)
        masks = []
        for t in range(24):
            x, y = batch(t, dtype=torch.float64)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if sp.step():
                opt.step()
            params = dict(model.named_parameters())
            for name, m in sp.masks.items():
                assert torch.count_nonzero(params[name].detach()[~m]) == 0
                for st in opt.state[params[name]].values():
                    if torch.is_tensor(st) and st.shape == m.shape:
                        assert torch.count_nonzero(st[~m]) == 0
            if sp.last_update and sp.last_update["step"] == t:
                masks.append({n: m.clone() for n, m in sp.masks.items()})
        assert params["conv2.weight"].is_contiguous(memory_format=torch.channels_last) == cl
        runs.append((masks, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (ma, wa), (mb, wb) = runs
    assert len(ma) == 3
    for a, b in zip(ma, mb):
        assert all(torch.equal(a[n], b[n]) for n in a)
    for n in wa:
        torch.testing.assert_close(wa[n], wb[n], rtol=1e-9, atol=1e-12)


def test_measure_counts_the_live_masks_and_weights_not_the_plan():
    model = make()
    rigl = RigL(model, None, total_steps=100, sparsity=0.9)
    numel = sum(m.numel() for m in rigl.masks.values())
    planned = rigl.planned_density
    m = rigl.measure()
    assert m.mask_density == sum(int(x.sum()) for x in rigl.masks.values()) / numel == planned
    assert m.nonzero_density == m.mask_density          # fresh init: every active weight is nonzero
    params = dict(model.named_parameters())
    mask = rigl.masks["conv2.weight"].view(-1)
    on = mask.nonzero().view(-1)
    mask[on[0]] = False                                  # one entry deactivated behind the sparsifier's back
    with torch.no_grad():
        params["conv2.weight"].view(-1)[on[1:3]] = 0.0    # two active weights trained to exactly 0
    m = rigl.measure()
    assert m.mask_density == (round(planned * numel) - 1) / numel
    assert m.layers["conv2.weight"][0] == rigl.nnz["conv2.weight"] - 1
    assert m.layers["conv2.weight"][1] == rigl.nnz["conv2.weight"] - 2     # the deactivated one is still nonzero
    assert rigl.planned_density == planned
