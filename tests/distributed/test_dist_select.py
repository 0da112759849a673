"""The exact distributed drop/grow selection (2 gloo ranks) equals the whole-tensor reference
(`drop_and_grow`) on adversarial shards: exact ties everywhere, k = 0, k = a rank's shard size,
a shard with no active weight, an empty shard, uneven shard sizes, and shards large enough for the
sampled threshold path of the local candidate search."""
import pytest
import torch

from rigl_ds.core.selection import drop_and_grow
from tests.distributed.harness import run_ranks

pytestmark = pytest.mark.distributed


def cases():
    g = torch.Generator().manual_seed(0)
    out = []
    n = 40
    # 1. random scores, random mask, uneven split 29 / 11
    m = torch.zeros(n, dtype=torch.bool)
    m[torch.randperm(n, generator=g)[:16]] = True
    out.append(("random", torch.randn(n, generator=g), m, torch.randn(n, generator=g), 6, 29))
    # 2. every score tied: ties decide everything (lower global index wins)
    out.append(("all-tied", torch.ones(n), m.clone(), torch.ones(n), 9, 17))
    # 3. few distinct values: many ties across the shard boundary
    out.append(("few-values", torch.randint(0, 3, (n,), generator=g).float(), m.clone(),
                torch.randint(0, 2, (n,), generator=g).float(), 16, 20))
    # 4. k = 0
    out.append(("k0", torch.randn(n, generator=g), m.clone(), torch.randn(n, generator=g), 0, 20))
    # 5. rank 1's shard has no active weight; k = its shard size in grow (all grown there)
    m5 = torch.zeros(n, dtype=torch.bool)
    m5[:12] = True
    grow5 = torch.zeros(n)
    grow5[30:] = 5.0
    out.append(("no-active-shard", torch.randn(n, generator=g), m5, grow5, 10, 30))
    # 6. an empty shard on rank 1 (FSDP2's chunking leaves trailing ranks empty)
    out.append(("empty-shard", torch.randn(n, generator=g), m.clone(), torch.randn(n, generator=g), 5, n))
    # 7. k = all active
    out.append(("k-all", torch.randn(n, generator=g), m.clone(), torch.randn(n, generator=g), 16, 13))
    # 8. shards large enough for the sampled threshold-and-refine path, ties among few values
    big = 200_000
    mb = torch.rand(big, generator=g) < 0.2
    out.append(("large-ties", torch.randint(0, 5, (big,), generator=g).float(), mb,
                torch.randint(0, 3, (big,), generator=g).float(), 5_000, 123_457))
    return out


def worker(rank, world):
    from rigl_ds.engines.dist_select import drop_and_grow_sharded, drop_and_grow_sharded_many

    results, shards = [], []
    for name, w, m, gs, k, split in cases():
        lo, hi = (0, split) if rank == 0 else (split, w.numel())
        for numel in (None, w.numel()):                  # int64 and int32 indices on the wire
            new, dropped, grown = drop_and_grow_sharded(w[lo:hi], m[lo:hi], gs[lo:hi].abs(), lo, k, numel=numel)
            results.append((name, lo, new, dropped + lo, grown + lo))
        shards.append((w[lo:hi], m[lo:hi], gs[lo:hi].abs(), lo, k, w.numel()))
    # all cases at once, their candidates sharing the same all-gathers: the same answers
    together = drop_and_grow_sharded_many(shards)
    return results, together


def test_distributed_selection_equals_the_whole_tensor_reference():
    out = run_ranks(worker)
    per_rank = [r[0] for r in out]
    for r in (0, 1):                                 # batched == one case at a time (int32 indices)
        singles = per_rank[r][1::2]
        assert len(out[r][1]) == len(singles)
        for (new, dropped, grown), (_, lo, new1, dropped1, grown1) in zip(out[r][1], singles):
            assert torch.equal(new, new1) and torch.equal(dropped + lo, dropped1) and torch.equal(grown + lo, grown1)
    for i, (name, w, m, gs, k, split) in enumerate(c for c in cases() for _ in range(2)):
        want = drop_and_grow(m, w.abs(), gs.abs(), k)
        got = torch.cat([per_rank[r][i][2] for r in (0, 1)])
        assert torch.equal(got, want), name
        assert int(got.sum()) == int(m.sum()), name
        dropped = torch.cat([per_rank[r][i][3] for r in (0, 1)])
        grown = torch.cat([per_rank[r][i][4] for r in (0, 1)])
        assert dropped.numel() == k and grown.numel() == k, name
        assert bool(m[dropped].all()) and bool(want[grown].all()), name
    # the adversarial cases really are adversarial
    c = {name: (w, m, gs, k, split) for name, w, m, gs, k, split in cases()}
    assert int(c["no-active-shard"][1][30:].sum()) == 0 and c["empty-shard"][4] == 40
