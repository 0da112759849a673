import pytest
import torch

from rigl_ds.core.selection import drop_and_grow, random_mask


def reference(mask, drop, grow, k):
    """Brute force in Python: sort by (score, index)."""
    m = mask.flatten().tolist()
    d, g = drop.flatten().tolist(), grow.flatten().tolist()
    active = sorted((d[i], i) for i in range(len(m)) if m[i])
    for _, i in active[:k]:
        m[i] = False
    cands = sorted((-g[i], i) for i in range(len(m)) if not m[i])
    for _, i in cands[:k]:
        m[i] = True
    return torch.tensor(m).view(mask.shape)


def T(*v):
    return torch.tensor(v, dtype=torch.float32)


def test_hand_computed_drop_and_grow():
    mask = torch.tensor([True, True, True, False, False, False])
    w = T(0.5, -0.1, 0.3, 0.0, 0.0, 0.0)
    g = T(9.0, 9.0, 9.0, 0.2, -0.7, 0.1)
    # drop the 2 smallest |w| among active: idx 1 (0.1), idx 2 (0.3); candidates 1..5:
    # |g| = 9, 9, 0.2, 0.7, 0.1 -> grow idx 1 and 2 again? No: idx 1 and 2 have |g| 9 -> regrown
    new = drop_and_grow(mask, w.abs(), g.abs(), 2)
    assert new.tolist() == [True, True, True, False, False, False]
    g2 = T(9.0, 0.0, 0.0, 0.2, -0.7, 0.1)
    new = drop_and_grow(mask, w.abs(), g2.abs(), 2)
    assert new.tolist() == [True, False, False, True, True, False]


def test_just_dropped_position_can_be_regrown():
    mask = torch.tensor([True, True, False, False])
    w, g = T(1.0, 0.01, 0, 0), T(0, 5.0, 1.0, 0)
    # idx 1 is dropped (smallest |w|) and has the largest |g| among candidates {1, 2, 3}
    assert drop_and_grow(mask, w.abs(), g.abs(), 1).tolist() == [True, True, False, False]


def test_ties_break_by_lower_index():
    mask = torch.tensor([True, True, True, True, False, False, False, False])
    w = torch.full((8,), 0.5)
    g = torch.ones(8)
    new = drop_and_grow(mask, w, g, 2)
    # drop idx 0, 1 (all |w| tie); candidates 0, 1, 4..7 all tie -> grow 0, 1 back
    assert new.tolist() == mask.tolist()
    g = T(0, 0, 0, 0, 1, 1, 1, 1)
    assert drop_and_grow(mask, w, g, 3).tolist() == [False, False, False, True, True, True, True, False]


def test_k_zero_and_k_all_and_errors():
    mask = torch.tensor([[True, False], [True, False]])
    w, g = torch.rand(2, 2), torch.rand(2, 2)
    assert torch.equal(drop_and_grow(mask, w, g, 0), mask)
    new = drop_and_grow(mask, w, T(0, 1, 0, 1).view(2, 2), 2)
    assert new.tolist() == [[False, True], [False, True]]
    with pytest.raises(ValueError, match="k must be"):
        drop_and_grow(mask, w, g, 3)
    with pytest.raises(TypeError):
        drop_and_grow(mask.float(), w, g, 1)


@pytest.mark.parametrize("seed", range(20))
def test_equals_brute_force_on_random_and_tied_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 60, (1,), generator=gen))
    mask = torch.rand(n, generator=gen) < 0.4
    # few distinct values -> many exact ties
    w = torch.randint(0, 4, (n,), generator=gen).float()
    g = torch.randint(0, 3, (n,), generator=gen).float()
    k = int(torch.randint(0, int(mask.sum()) + 1, (1,), generator=gen))
    assert torch.equal(drop_and_grow(mask, w, g, k), reference(mask, w, g, k))
    assert int(drop_and_grow(mask, w, g, k).sum()) == int(mask.sum())


def test_random_mask_exact_count_and_seeded():
    m1 = random_mask(1000, 137, torch.Generator().manual_seed(3))
    m2 = random_mask(1000, 137, torch.Generator().manual_seed(3))
    assert m1.dtype == torch.bool and int(m1.sum()) == 137 and torch.equal(m1, m2)
    assert int(random_mask(10, 0, torch.Generator()).sum()) == 0
    assert int(random_mask(10, 10, torch.Generator()).sum()) == 10


from rigl_ds.core.selection import update_mask  # noqa: E402


@pytest.mark.parametrize("seed", range(40))
def test_fast_update_equals_reference_on_random_and_tied_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 300, (1,), generator=gen))
    mask = torch.rand(n, generator=gen) < float(torch.rand(1, generator=gen))
    if seed % 4 == 0:     # few distinct values: many exact ties at both thresholds
        w = torch.randint(-3, 4, (n,), generator=gen).float()
        g = torch.randint(0, 3, (n,), generator=gen).float()
    else:
        w, g = torch.randn(n, generator=gen), torch.rand(n, generator=gen)
    n_active = int(mask.sum())
    for k in {0, n_active, n_active // 3, min(1, n_active)}:
        assert torch.equal(update_mask(mask, w, g, k), drop_and_grow(mask, w.abs(), g, k)), (seed, k)


@pytest.mark.parametrize("case", ["empty_active", "one_element", "all_active", "all_equal", "2d"])
def test_fast_update_edge_cases(case):
    if case == "empty_active":
        mask, w, g, k = torch.zeros(5, dtype=torch.bool), torch.zeros(5), torch.rand(5), 0
    elif case == "one_element":
        mask, w, g, k = torch.ones(1, dtype=torch.bool), torch.ones(1), torch.zeros(1), 1
    elif case == "all_active":
        mask, w, g, k = torch.ones(6, dtype=torch.bool), torch.arange(6.0), torch.arange(6.0), 2
    elif case == "all_equal":
        mask = torch.tensor([True, False] * 8)
        w, g, k = torch.ones(16), torch.ones(16), 5
    else:
        mask = torch.rand(4, 3, 3, 3, generator=torch.Generator().manual_seed(1)) < 0.3
        w, g, k = torch.randn(4, 3, 3, 3), torch.rand(4, 3, 3, 3), 7
    assert torch.equal(update_mask(mask, w, g, k), drop_and_grow(mask, w.abs(), g, k))
    with pytest.raises(ValueError):
        update_mask(torch.zeros(3, dtype=torch.bool), torch.zeros(3), torch.zeros(3), 1)


@pytest.mark.parametrize("kind", ["random", "ties", "zeros_grad", "all_kept_low"])
def test_fast_update_equals_reference_on_large_layers(kind):
    """Layers above the exact-kthvalue size go through threshold-and-refine: still exact."""
    gen = torch.Generator().manual_seed(7)
    n = 150_000
    mask = torch.rand(n, generator=gen) < 0.1
    if kind == "random":
        w, g = torch.randn(n, generator=gen), torch.rand(n, generator=gen)
    elif kind == "ties":                 # 3 distinct magnitudes, 3 distinct scores
        w = torch.randint(-2, 3, (n,), generator=gen).float()
        g = torch.randint(0, 3, (n,), generator=gen).float()
    elif kind == "zeros_grad":           # most candidates score 0: the threshold is a huge tie
        w, g = torch.randn(n, generator=gen), torch.zeros(n)
        g[torch.randint(n, (100,), generator=gen)] = 1.0
    else:                                # kept positions hold the largest scores: the sample misleads
        w, g = torch.randn(n, generator=gen), torch.rand(n, generator=gen)
        g[mask] += 10.0
    n_active = int(mask.sum())
    for k in (1, n_active // 3, n_active):
        assert torch.equal(update_mask(mask, w, g, k), drop_and_grow(mask, w.abs(), g, k)), (kind, k)


def test_update_mask_with_changes_reports_dropped_and_grown():
    from rigl_ds.core.selection import update_mask_with_changes

    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(500, generator=gen) < 0.3
    w, g = torch.randn(500, generator=gen), torch.rand(500, generator=gen)
    new, dropped, grown = update_mask_with_changes(mask, w, g, 40)
    assert torch.equal(torch.sort(dropped).values, (mask & ~new).nonzero().view(-1))
    assert torch.equal(torch.sort(grown).values, (new & ~mask).nonzero().view(-1))
