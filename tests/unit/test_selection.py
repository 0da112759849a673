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
