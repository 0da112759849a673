"""SRigL's neuron ablation (``gamma_sal``, RigL with constant fan-in): every update equals a
sort-based reference of the rule; removed rows stay empty with their weights and optimizer state
at zero; counts follow min(row, planned // live rows); resume is exact; bad settings are refused."""
import pytest
import torch
import torch.nn.functional as F

from rigl_ds.core import RigL, SET
from rigl_ds.core.selection import drop_and_grow
from tests.helpers import assert_resume_exact, batch, make, train_steps


def reference_update(mask, w, g, k_drop, planned, gamma):
    """The rule of Sparsifier._ablate and the fan_in update after it, by sorts over one whole layer."""
    rows = mask.reshape(mask.shape[0], -1)
    n_rows, row = rows.shape
    nnz = int(rows.sum())
    k = nnz - k_drop
    salient = torch.zeros(rows.numel(), dtype=torch.bool)
    for score in (w.reshape(-1), g.reshape(-1)):
        salient[torch.sort(score, descending=True, stable=True).indices[:k]] = True
    live = rows.any(1)
    fan_in = nnz // int(live.sum())
    remove = live & (salient.view(n_rows, row).sum(1) < gamma * fan_in)
    left = int(live.sum()) - int(remove.sum())
    if int(remove.sum()) == 0 or left < 1 or left * row < planned:
        remove = torch.zeros_like(remove)
        left = int(live.sum())
    new_fan_in = min(row, planned // left) if remove.any() else fan_in
    start = rows & ~remove.unsqueeze(1)
    k_drop = max(0, k_drop - int(remove.sum()) * fan_in)
    after = drop_and_grow(start.reshape(-1), w.reshape(-1), None, k_drop, 0).view(n_rows, row)
    out = after.clone()
    for r in range(n_rows):
        if live[r] and not remove[r]:
            out[r] = drop_and_grow(after[r], torch.zeros(row), g.reshape(n_rows, row)[r], 0,
                                   new_fan_in - int(after[r].sum()))
    return out.view(mask.shape), remove


def starve(model, rows=range(6)):
    """fc1's first rows hold tiny weights and feed nothing (fc2's columns 0): no gradient reaches
    them, so they are not salient."""
    with torch.no_grad():
        model.fc1.weight[list(rows)] *= 1e-6
        model.fc2.weight[:, list(rows)] = 0


def test_every_ablating_update_equals_the_reference():
    model = make()
    starve(model)
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = RigL(model, opt, total_steps=40, sparsity=0.8, distribution="uniform", delta=5, structure="fan_in",
              gamma_sal=0.3)
    assert sp.ablatable == ("conv2.weight", "fc1.weight")          # conv1 is dense, fc2 the output layer
    planned = dict(sp.final_nnz)
    removed_ever = {n: torch.zeros(m.shape[0], dtype=torch.bool) for n, m in sp.masks.items()}
    updates = 0
    for t in range(40):
        x, y = batch(t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        before = {n: m.clone() for n, m in sp.masks.items()}
        w = {n: params[n].detach().abs() for n in sp.masks}
        gr = {n: params[n].grad.abs() for n in sp.masks}
        stepped = sp.step()
        if sp.last_update and sp.last_update["step"] == t:
            updates += 1
            f = sp.last_update["drop_fraction"]
            for n in sp.ablatable:
                k = int(f * int(before[n].sum()))
                want, remove = reference_update(before[n], w[n], gr[n], k, planned[n], 0.3)
                assert torch.equal(sp.masks[n], want), (t, n)
                removed_ever[n] |= remove
            assert sp.last_update["ablated_rows"] == {n: int(r.sum()) for n, r in removed_ever.items()
                                                      if n in sp.ablatable}
        if stepped:
            opt.step()
        for n, m in sp.masks.items():
            rows = m.reshape(m.shape[0], -1)
            live = rows.any(1)
            assert torch.equal(live, ~removed_ever[n]), (t, n)           # removed rows never come back
            per_row = rows.sum(1)[live]
            assert bool((per_row == per_row[0]).all()), (t, n)            # constant fan-in on live rows
            assert int(m.sum()) == sp.nnz[n] == min(rows.shape[1], planned[n] // int(live.sum())) * int(live.sum())
            assert torch.count_nonzero(params[n].detach()[~m]) == 0
            buf = opt.state[params[n]].get("momentum_buffer")
            if buf is not None and removed_ever[n].any():
                assert torch.count_nonzero(buf.reshape(m.shape[0], -1)[removed_ever[n]]) == 0
    assert updates == 5
    assert set(torch.nonzero(removed_ever["fc1.weight"]).view(-1).tolist()) >= set(range(6))
    assert sp.live_rows["fc1.weight"] == 32 - int(removed_ever["fc1.weight"].sum())
    assert not removed_ever["fc2.weight"].any()


def test_without_gamma_sal_no_row_is_removed():
    model = make()
    starve(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = RigL(model, opt, total_steps=40, sparsity=0.8, distribution="uniform", delta=5, structure="fan_in")
    assert sp.config.gamma_sal is None and sp.ablatable == ()
    train_steps(model, opt, sp, 30)
    assert sp.last_update is not None and "ablated_rows" not in sp.last_update
    assert all(bool(m.reshape(m.shape[0], -1).any(1).all()) for m in sp.masks.values())


def test_an_ablated_run_resumes_exactly():
    total, cut = 40, 12                  # the first update (step 5) removes rows; resume between updates

    def fresh(seed):
        model = make(seed)
        starve(model)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        sp = RigL(model, opt, total_steps=total, sparsity=0.8, distribution="uniform", delta=5, seed=seed,
                  structure="fan_in", gamma_sal=0.3)
        return model, opt, sp

    def restored(saved, loaded):
        assert saved.ablated_rows["fc1.weight"] > 0
        assert (loaded.nnz, loaded.live_rows, loaded.ablated_rows) == (saved.nnz, saved.live_rows, saved.ablated_rows)

    assert_resume_exact(fresh, total, cut, restored)


def test_masks_with_uneven_live_rows_are_refused_on_load():
    """fc1 (32 rows of 256, 51 each planned: 1632): with row 0 removed the 31 live rows must hold
    1632 // 31 = 52 each. A mask with that total but rows of 51 and 53 is refused, naming the layer."""
    def build():
        return RigL(make(), None, total_steps=10, sparsity=0.8, distribution="uniform", structure="fan_in",
                    gamma_sal=0.3)

    state = build().state_dict()
    counts = [0] + [52] * 31
    counts[1], counts[2] = 51, 53
    state["masks"]["fc1.weight"] = torch.stack([torch.arange(256) < c for c in counts])
    with pytest.raises(ValueError, match=r"mask 'fc1.weight': 2 groups of 256 do not hold the same count"):
        build().load_state_dict(state)
    counts[1], counts[2] = 52, 52
    state["masks"]["fc1.weight"] = torch.stack([torch.arange(256) < c for c in counts])
    sp = build()
    sp.load_state_dict(state)
    assert sp.nnz["fc1.weight"] == 1612 and sp.live_rows["fc1.weight"] == 31 and sp.ablated_rows["fc1.weight"] == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(cls=RigL, structure="unstructured", gamma_sal=0.3), "needs method: rigl and structure: fan_in, got "
                                                              "method: rigl, structure: unstructured"),
    (dict(cls=RigL, structure="2:4", gamma_sal=0.3), "structure: 2:4"),
    (dict(cls=SET, structure="fan_in", gamma_sal=0.3), "got method: set"),
    (dict(cls=RigL, structure="fan_in", gamma_sal=0.0), r"gamma_sal must be null or a number in \(0, 1\], got 0.0"),
    (dict(cls=RigL, structure="fan_in", gamma_sal=1.5), r"in \(0, 1\], got 1.5"),
])
def test_bad_gamma_sal_is_refused_by_name(kwargs, match):
    cls = kwargs.pop("cls")
    with pytest.raises(ValueError, match=match):
        cls(make(), None, total_steps=10, sparsity=0.5, distribution="uniform", **kwargs)
