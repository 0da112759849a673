"""Structures (unstructured, fan_in, N:M): the grouped selection equals its sort-based reference,
every group holds exactly its count after every update of every method, bad layers are refused by
name, and a structured run resumes bit for bit."""
import copy

import pytest
import torch
import torch.nn.functional as F

from rigl_ds.core import GMP, SET, RigL, Static, get_structure, structure_kinds
from rigl_ds.core.selection import (drop_and_grow, random_grouped_mask, random_mask, select_grouped,
                                    select_grouped_reference)
from tests.helpers import assert_resume_exact, batch, make


def tied(shape, g, levels=5):
    """Scores with many exact ties (a few levels), so the tie-break by index is exercised."""
    return torch.randint(levels, shape, generator=g).to(torch.float32)


@pytest.mark.parametrize("group,quota", [(4, 2), (4, 1), (8, 3), (24, 7), (96, 30)])
@pytest.mark.parametrize("grows", [True, False])
def test_select_grouped_equals_the_sort_based_reference(group, quota, grows):
    g = torch.Generator().manual_seed(group * 31 + quota)
    numel = 96 * 5
    for trial in range(20):
        start = quota if grows else min(group, quota + 1 + trial % (group - quota))
        mask = random_grouped_mask(numel, group, start, g)
        drop, grow = tied((numel,), g), tied((numel,), g) if grows else None
        k_drop = (trial * 7) % (mask.sum().item() + 1) if grows else int(mask.sum()) - quota * numel // group
        new, dropped, grown = select_grouped(mask, drop, grow, group, quota, k_drop)
        want = select_grouped_reference(mask, drop, grow, group, quota, k_drop)
        assert torch.equal(new, want), trial
        assert (new.view(-1, group).sum(1) == quota).all()
        assert torch.equal(dropped, (mask & ~new).nonzero().view(-1))
        assert torch.equal(grown, (new & ~mask).nonzero().view(-1))


def test_one_group_is_the_unstructured_selection():
    g = torch.Generator().manual_seed(3)
    mask = random_mask(200, 60, g)
    drop, grow = tied((200,), g), tied((200,), g)
    new = select_grouped(mask, drop, grow, 200, 60, 17)[0]
    assert torch.equal(new, drop_and_grow(mask, drop, grow, 17))
    assert torch.equal(select_grouped(mask, drop, None, 200, 45, 15)[0], drop_and_grow(mask, drop, None, 15, 0))


def test_a_growing_update_drops_over_the_layer_and_regrows_per_group():
    """Hand-worked 2:4: the layer-wide drop takes both active weights of group 0 (smallest |w|)
    and none of group 1; group 0 regrows its two best gradients, a just-dropped one included."""
    mask = torch.tensor([1, 1, 0, 0, 1, 0, 1, 0], dtype=torch.bool)
    drop = torch.tensor([0.1, 0.2, 0, 0, 0.9, 0, 0.8, 0])
    grow = torch.tensor([5.0, 0.0, 3.0, 1.0, 9.0, 9.0, 9.0, 9.0])
    new, dropped, grown = select_grouped(mask, drop, grow, 4, 2, 2)
    assert new.tolist() == [True, False, True, False, True, False, True, False]
    assert dropped.tolist() == [1] and grown.tolist() == [2]      # 0 was dropped and regrown: in neither


def test_random_grouped_mask_counts_seed_and_preference():
    g = torch.Generator().manual_seed(0)
    m = random_grouped_mask(64, 8, 3, g)
    assert (m.view(-1, 8).sum(1) == 3).all()
    assert torch.equal(random_grouped_mask(64, 64, 20, torch.Generator().manual_seed(5)),
                       random_mask(64, 20, torch.Generator().manual_seed(5)))
    prefer = torch.zeros(64, dtype=torch.bool)
    prefer[::4] = True                                   # two preferred positions in every group of 8
    m = random_grouped_mask(64, 8, 3, g, prefer)
    assert (m.view(-1, 8).sum(1) == 3).all() and bool(m[prefer].all())


def test_structure_spellings_and_refusals():
    assert structure_kinds() == ("unstructured", "fan_in", "N:M")
    assert get_structure(" 2 : 4 ").describe() == "2:4"
    for bad in ["4:2", "0:4", "2:2", "block", "", 24]:
        with pytest.raises(ValueError, match="structure"):
            get_structure(bad)
    with pytest.raises(ValueError, match="structure must be one of 'unstructured', 'fan_in', 'N:M'"):
        RigL(make(), None, total_steps=10, structure="rows")
    # TinyCNN's conv2 rows hold 8 x 3 x 3 = 72 weights: not groups of 16
    with pytest.raises(ValueError, match=r"'conv2.weight' \(16, 8, 3, 3\): its rows of 72 weights do not split into "
                                         r"groups of M=16 \(2:16\); exclude it \(sparsity.exclude: \['conv2'\]\)"):
        RigL(make(), None, total_steps=10, sparsity=0.875, distribution="uniform", structure="2:16")
    with pytest.raises(ValueError, match="2:4 keeps density 0.5 in every masked layer, the sparsity settings give "
                                         r"this layer 116 of 1152 weights \(0.1007\); set sparsity: 0.5 with distribution: uniform"):
        RigL(make(), None, total_steps=10, sparsity=0.9, distribution="uniform", structure="2:4")
    with pytest.raises(ValueError, match="fan_in would keep 0 of its 32 inputs per output"):
        RigL(make(), None, total_steps=10, sparsity=0.99, distribution="uniform", structure="fan_in")


def test_n_m_takes_the_rounded_sparsity_it_suggests_and_refuses_nan_scores():
    """2:3's sparsity 0.333333 (as the error message prints it) floors a large layer's count a few
    weights off 1/3: N:M holds exactly N of every M anyway. A NaN score has no order: refused."""
    model = torch.nn.Sequential(torch.nn.Linear(3000, 1200), torch.nn.Linear(1200, 10, bias=False))
    sp = RigL(model, None, total_steps=10, sparsity=0.333333, distribution="uniform", structure="2:3",
              overrides={"1": "dense"})
    m = sp.masks["0.weight"]
    assert sp.nnz["0.weight"] == 1200 * 1000 * 2 and bool((m.view(-1, 3).sum(1) == 2).all())
    mask = torch.tensor([0, 1, 1], dtype=torch.bool)
    with pytest.raises(ValueError, match="a selection score is NaN"):
        select_grouped(mask, torch.tensor([1.0, float("nan"), 0.0]), None, 3, 1, 0)


def check_groups(sp):
    for n, m in sp.masks.items():
        g = sp.group[n]
        assert int(m.sum()) == sp.nnz[n], n
        assert (m.view(-1, g).sum(1) == sp.nnz[n] * g // m.numel()).all(), n


@pytest.mark.parametrize("cls", [RigL, SET, Static])
@pytest.mark.parametrize("structure,sparsity", [("fan_in", 0.8), ("2:4", 0.5), ("1:8", 0.875)])
def test_every_update_holds_the_structure_and_equals_the_reference(cls, structure, sparsity):
    model = make()
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = cls(model, opt, total_steps=40, sparsity=sparsity, distribution="uniform", delta=5, structure=structure)
    assert sp.group["conv1.weight"] == 72 and sp.nnz["conv1.weight"] == 72          # uniform: the first conv dense
    if structure == "fan_in":
        assert sp.group == {"conv1.weight": 72, "conv2.weight": 72, "fc1.weight": 256, "fc2.weight": 32}
    else:
        m = int(structure.split(":")[1])
        assert all(sp.group[n] == m for n in ("conv2.weight", "fc1.weight", "fc2.weight"))
    check_groups(sp)
    updates = 0
    for t in range(40):
        x, y = batch(t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        before = {n: m.clone() for n, m in sp.masks.items()}
        w = {n: params[n].detach().abs() for n in sp.masks}
        gr = {n: params[n].grad.abs() for n in sp.masks}
        state = sp.generator.get_state()
        stepped = sp.step()
        if sp.last_update and sp.last_update["step"] == t:
            updates += 1
            f = sp.last_update["drop_fraction"]
            rng = torch.Generator()
            rng.set_state(state)
            for n, m in sp.masks.items():
                k = int(f * int(before[n].sum()))
                if sp.group[n] == m.numel() or k == 0:                 # a dense layer changes nothing
                    assert torch.equal(m, before[n]), n
                    continue
                grow = gr[n] if cls is RigL else torch.rand(m.shape, generator=rng)
                want = select_grouped_reference(before[n], w[n], grow, sp.group[n], int(before[n].sum()) * sp.group[n]
                                                // m.numel(), k)
                assert torch.equal(m, want), (t, n)
        if stepped:
            opt.step()
        check_groups(sp)
        for n, m in sp.masks.items():
            assert torch.count_nonzero(params[n].detach()[~m]) == 0
    assert updates == (0 if cls is Static else 5)           # 5, 10, ..., 25 (t_end 30)
    assert sp.planned_density == pytest.approx(sp.measure().mask_density)


def test_gmp_prunes_group_by_group_along_whole_counts():
    """2:4 under GMP from dense: each group's count falls 4, 3, 2; every prune is each group's
    smallest |w|, by the sort-based reference."""
    model = make()
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sp = GMP(model, opt, total_steps=40, sparsity=0.5, distribution="uniform", delta=5, t_end=20,
             structure="2:4")
    per_group = []
    for t in range(40):
        x, y = batch(t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        before = {n: m.clone() for n, m in sp.masks.items()}
        w = {n: params[n].detach().abs() for n in sp.masks}
        assert sp.step()
        if sp.last_update and sp.last_update["step"] == t:
            for n, m in sp.masks.items():
                if sp.group[n] < m.numel():
                    q = int(m.sum()) * 4 // m.numel()
                    assert torch.equal(m, select_grouped_reference(before[n], w[n], None, 4, q, 0)), (t, n)
        opt.step()
        check_groups(sp)
        per_group.append(int(sp.masks["fc1.weight"].sum()) * 4 // sp.masks["fc1.weight"].numel())
    assert sorted(set(per_group), reverse=True) == [4, 3, 2] and per_group[-1] == 2
    assert per_group == sorted(per_group, reverse=True)


@pytest.mark.parametrize("cls,structure", [(RigL, "fan_in"), (RigL, "2:4"), (GMP, "2:4")])
def test_structured_state_dict_round_trip_continues_identically(cls, structure):
    total, cut = 40, 17
    sparsity = 0.5 if structure == "2:4" else 0.8

    def fresh(seed):
        model = make(seed)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        sp = cls(model, opt, total_steps=total, sparsity=sparsity, distribution="uniform", delta=5, t_end=0.6,
                 seed=seed, structure=structure)
        return model, opt, sp

    assert_resume_exact(fresh, total, cut)


def test_loading_masks_of_another_structure_is_refused_by_name():
    unstructured = RigL(make(), None, total_steps=10, sparsity=0.5, distribution="uniform")
    nm = RigL(make(), None, total_steps=10, sparsity=0.5, distribution="uniform", structure="2:4")
    state = unstructured.state_dict()
    with pytest.raises(ValueError, match=r"mask 'conv2.weight': \d+ groups of 4 do not hold 2 active weights as "
                                         r"structure '2:4' needs \(saved with another structure\?\)"):
        nm.load_state_dict(state)
    bad = copy.deepcopy(nm.state_dict())
    nm.load_state_dict(bad)                               # its own masks load
