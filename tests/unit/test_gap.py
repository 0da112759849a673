"""gap_cyclic (C-GaP): partitions, the count timeline, every update against a sort-based reference
(the leaving partition pruned by |w| to its targets, the next one grown dense at weight 0 with
fresh optimizer state), fixed masks after the last prune, exact resume mid-phase, plan's timeline,
and bad settings refused by name."""
import pathlib

import pytest
import torch
import torch.nn.functional as F

from rigl_ds.core import GaPCyclic
from rigl_ds.core.gap import GaPSchedule, partition_layers
from rigl_ds.core.selection import drop_and_grow
from tests.helpers import assert_resume_exact, batch, make, train_steps

TOTAL, T = 40, 5


def build(seed=0, opt_cls=torch.optim.SGD, **kw):
    model = make(seed)
    opt = opt_cls(model.parameters(), lr=0.05, **({"momentum": 0.9} if opt_cls is torch.optim.SGD else {}))
    kw = {"sparsity": 0.8, "distribution": "erk", "gap_partitions": 2, "gap_phase": T, "gap_rounds": 2, "seed": seed,
          **kw}
    return model, opt, GaPCyclic(model, opt, total_steps=TOTAL, **kw)


def test_partitions_are_consecutive_and_balanced_by_weights():
    numel = {"a": 10, "b": 10, "c": 100, "d": 10, "e": 70}
    assert partition_layers(numel, 1) == [("a", "b", "c", "d", "e")]
    assert partition_layers(numel, 2) == [("a", "b", "c"), ("d", "e")]            # 120 | 80, closest to 100
    assert partition_layers(numel, 3) == [("a", "b"), ("c", "d"), ("e",)]          # cuts at 20 and 130: nearest 66.7, 133.3
    assert partition_layers(numel, 5) == [("a",), ("b",), ("c",), ("d",), ("e",)]
    assert partition_layers({"x": 1, "y": 1000, "z": 1}, 3) == [("x",), ("y",), ("z",)]   # a layer each, at least
    with pytest.raises(ValueError, match="gap_partitions=6 exceeds the 5 masked layers"):
        partition_layers(numel, 6)


def test_every_update_prunes_the_leaving_partition_and_grows_the_next_one_dense():
    model, opt, sp = build()
    params = dict(model.named_parameters())
    assert sp.partitions == [("conv1.weight", "conv2.weight"), ("fc1.weight", "fc2.weight")]
    final, numel = sp.final_nnz, {n: m.numel() for n, m in sp.masks.items()}
    dense_at = []
    for t in range(TOTAL):
        x, y = batch(t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        before = {n: m.clone() for n, m in sp.masks.items()}
        w = {n: params[n].detach().abs().clone() for n in sp.masks}
        stepped = sp.step()
        assert stepped == (t not in (5, 10, 15, 20))             # a phase change skips the optimizer step
        dense = GaPSchedule(T, 2, 2).dense_partition(t + 1)
        dense_at.append(dense)
        for n, m in sp.masks.items():
            want_count = numel[n] if dense is not None and n in sp.partitions[dense] else final[n]
            assert int(m.sum()) == sp.nnz[n] == want_count, (t, n)
        if sp.last_update and sp.last_update["step"] == t:
            assert sp.last_update["dense_partition"] == (-1 if dense is None else dense)
            for n, m in sp.masks.items():
                k = int(before[n].sum()) - int(m.sum())
                if k > 0:                                        # pruned: the k smallest |w|, ties to the lower index
                    assert torch.equal(m, drop_and_grow(before[n], w[n], None, k, 0)), (t, n)
                elif k < 0:                                      # grown: every position, at weight 0, state reset
                    assert bool(m.all()), (t, n)
                    grown = m & ~before[n]
                    assert torch.count_nonzero(params[n].detach()[grown]) == 0
                    assert torch.count_nonzero(opt.state[params[n]]["momentum_buffer"][grown]) == 0
                else:
                    assert torch.equal(m, before[n]), (t, n)
        if stepped:
            opt.step()
        for n, m in sp.masks.items():
            assert torch.count_nonzero(params[n].detach()[~m]) == 0
    # partition 0 dense for steps 0-5, 1 for 6-10, 0 for 11-15, 1 for 16-20, then fine-tuning with fixed masks
    assert dense_at[:21] == [0] * 5 + [1] * 5 + [0] * 5 + [1] * 5 + [None] and set(dense_at[20:]) == {None}
    assert sp.nnz == final and sp.measure().mask_density == pytest.approx(sp.planned_density)
    assert [u for u in range(TOTAL) if sp.schedule.is_update_step(u)] == [5, 10, 15, 20]


def test_counts_at_is_what_the_run_holds_and_plan_prints_the_phases():
    model, opt, sp = build()
    held = []
    train_steps(model, opt, sp, TOTAL, check=lambda t: held.append({n: int(m.sum()) for n, m in sp.masks.items()}))
    numel = {n: m.numel() for n, m in sp.masks.items()}
    for t in range(TOTAL):
        assert held[t] == GaPCyclic.counts_at(sp.schedule, sp.final_nnz, numel, t + 1, sp._groups), t
    phases = GaPCyclic.timeline(sp.schedule, numel)
    assert [(p["from_step"], p["dense_partition"]) for p in phases] == [(0, 0), (6, 1), (11, 0), (16, 1), (21, None)]
    assert phases[1]["layers"] == ["fc1.weight", "fc2.weight"] and phases[2]["round"] == 2


def test_a_run_resumed_mid_phase_equals_the_uninterrupted_one():
    def restored(saved, loaded):
        assert loaded.dense_partition == 0 and loaded.nnz == saved.nnz

    assert_resume_exact(lambda seed: build(seed=seed, opt_cls=torch.optim.Adam), TOTAL, 13, restored)


def test_a_checkpoint_from_another_phase_is_refused_by_its_counts():
    model, opt, sp = build()
    train_steps(model, opt, sp, 7)                     # partition 1 dense now
    state = sp.state_dict()
    state["step"] = 3                                  # claims partition 0's phase
    with pytest.raises(ValueError, match=r"mask 'conv2.weight' has 157 active weights, this sparsifier expects "
                                         r"1152 at step 3"):
        build()[2].load_state_dict(state)


@pytest.mark.parametrize("kw,match", [
    (dict(gap_phase=10, gap_rounds=2), r"gap_cyclic's last prune \(step 40 = gap_partitions 2 x gap_rounds 2 x "
                                       r"gap_phase 10 steps\) is not before the end of training \(40 steps\)"),
    (dict(gap_phase=1.5), r"gap_phase must be a fraction of total steps in \(0, 1\] or an integer step count"),
    (dict(gap_partitions=5, gap_rounds=1, gap_phase=3), "gap_partitions=5 exceeds the 4 masked layers"),
    (dict(gap_rounds=0), "gap_rounds must be an integer >= 1, got 0"),
])
def test_bad_gap_settings_are_refused_by_name(kw, match):
    with pytest.raises(ValueError, match=match):
        build(**kw)


def global_reference(w: dict, names, keep):
    """Per layer, how many of the ``keep`` largest |w| over ``names`` (sorted, ties in layer order)."""
    values = torch.cat([w[n].reshape(-1) for n in names])
    top = torch.sort(values, descending=True, stable=True).indices[:keep]
    bounds = torch.tensor([w[n].numel() for n in names]).cumsum(0)
    layer = torch.bucketize(top, bounds, right=True)
    return {n: int((layer == i).sum()) for i, n in enumerate(names)}


def test_global_prune_keeps_each_partition_total_with_one_threshold():
    model, opt, sp = build(gap_prune="global", sparsity=0.9, distribution="uniform")   # uniform: conv1 dense
    params = dict(model.named_parameters())
    final, numel = sp.final_nnz, {n: m.numel() for n, m in sp.masks.items()}
    uneven = False
    for t in range(TOTAL):
        x, y = batch(t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        before = {n: m.clone() for n, m in sp.masks.items()}
        w = {n: params[n].detach().abs().clone() for n in sp.masks}
        stepped = sp.step()
        if sp.last_update and sp.last_update["step"] == t:
            leaving = [n for n in sp.masks if int(sp.masks[n].sum()) < int(before[n].sum())]
            part = [n for n in next(p for p in sp.partitions if set(leaving) <= set(p)) if final[n] < numel[n]]
            want = global_reference(w, part, sum(final[n] for n in part))
            for n in part:
                assert int(sp.masks[n].sum()) == want[n] == sp.nnz[n], (t, n)
                k = int(before[n].sum()) - want[n]
                assert torch.equal(sp.masks[n], drop_and_grow(before[n], w[n], None, k, 0)), (t, n)
            uneven |= any(want[n] != final[n] for n in part)
        if stepped:
            opt.step()
        assert sum(sp.nnz.values()) == sum(GaPCyclic.counts_at(sp.schedule, final, numel, t + 1, sp._groups).values())
        for n, m in sp.masks.items():
            assert int(m.sum()) == sp.nnz[n] and torch.count_nonzero(params[n].detach()[~m]) == 0
        assert bool(sp.masks["conv1.weight"].all())        # kept dense by the distribution: never in the threshold
    assert final["conv1.weight"] == numel["conv1.weight"] and "conv1.weight" in sp.partitions[0]
    assert uneven                                      # the threshold moved counts between layers
    assert sum(sp.nnz.values()) == sum(final.values())
    assert sp.measure().mask_density == pytest.approx(sp.planned_density)


def test_a_global_prune_run_resumes_exactly_and_a_wrong_total_is_refused():
    def restored(saved, loaded):                       # after prunes at 5 and 10 the counts moved
        assert saved.nnz != {**saved.final_nnz, **{n: saved._numel[n] for n in saved.partitions[0]}}
        assert loaded.nnz == saved.nnz

    saved, _ = assert_resume_exact(lambda seed: build(seed=seed, gap_prune="global", sparsity=0.9,
                                                      opt_cls=torch.optim.Adam), TOTAL, 13, restored)
    bad = saved.state_dict()
    fc2 = bad["masks"]["fc2.weight"]
    fc2.view(-1)[(~fc2).view(-1).nonzero()[0]] = True  # one weight more in the sparse partition
    with pytest.raises(ValueError, match=r"partition 1 \(fc1.weight, fc2.weight\) holds (\d+) active weights in its "
                                         r"pruned layers, this sparsifier expects (\d+) at step 13"):
        build(gap_prune="global", sparsity=0.9)[2].load_state_dict(bad)


@pytest.mark.parametrize("kw,match", [
    (dict(gap_prune="global", structure="fan_in"), "gap_prune: global .* needs structure: unstructured, got "
                                                   "structure: fan_in"),
    (dict(gap_prune="magnitude"), "gap_prune must be one of layer, global, got 'magnitude'"),
    (dict(gap_partitions=1), r"gap_partitions must be an integer >= 2, got 1 \(with one partition"),
    (dict(skip_step_on_update=False), "skip_step_on_update: false is not allowed with gap_cyclic"),
])
def test_bad_gap_prune_settings_are_refused_by_name(kw, match):
    with pytest.raises(ValueError, match=match):
        build(**kw)


# ---------------------------------------------------------------------------------------- P-GaP
def test_parallel_schedule_merges_every_phase_and_counts_the_mean_copy():
    """gap_parallel: one merge per round (t_end = rounds x T); while the copies grow, the counts the
    plan and FLOPs use are the mean over kappa copies (each layer dense in one of them)."""
    from rigl_ds.core import GaPParallel
    from rigl_ds.core.gap import ParallelSchedule
    from rigl_ds.core.sparsifier import SparsityConfig

    sched = GaPParallel.make_schedule(SparsityConfig(method="gap_parallel", gap_partitions=2, gap_phase=5,
                                                     gap_rounds=3), total_steps=40)
    assert isinstance(sched, ParallelSchedule)
    assert (sched.t_end, sched.num_updates, sched.update_steps()) == (15, 3, [5, 10, 15])
    assert [t for t in range(41) if sched.is_update_step(t)] == [5, 10, 15]
    assert sched.copies_grow(15) and not sched.copies_grow(16)
    final, numel = {"a": 10, "b": 30}, {"a": 100, "b": 100}
    assert GaPParallel.counts_at(sched, final, numel, 7, {}) == {"a": 55.0, "b": 65.0}
    assert GaPParallel.counts_at(sched, final, numel, 16, {}) == final
    with pytest.raises(ValueError, match=r"gap_parallel's last prune \(step 40 = gap_rounds 4 x gap_phase 10 steps\)"):
        GaPParallel.make_schedule(SparsityConfig(method="gap_parallel", gap_phase=10, gap_rounds=4), total_steps=40)


@pytest.mark.parametrize("kw,match", [
    (dict(gap_prune="global"), "gap_prune: global is not allowed with gap_parallel"),
    (dict(skip_step_on_update=False), "skip_step_on_update: false is not allowed with gap_parallel"),
    (dict(), "gap_parallel needs an engine that splits the world into gap_partitions=2 copies"),
])
def test_gap_parallel_refuses_what_it_cannot_do(kw, match):
    """One process (LocalEngine) cannot hold copies; global pruning is C-GaP's."""
    from rigl_ds.core import GaPParallel

    model = make()
    with pytest.raises(ValueError, match=match):
        GaPParallel(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=40, gap_partitions=2,
                    gap_phase=5, **kw)


def test_gap_parallel_config_needs_an_engine_with_copies():
    """One process holds no copies; DeepSpeed's clipping would act within a copy: both refused by name."""
    from rigl_ds.config import ConfigError, load_config

    yaml = pathlib.Path(__file__).resolve().parents[2] / "configs" / "quickstart_ddp.yaml"
    with pytest.raises(ConfigError, match=r"engine.name='local': sparsity.method=gap_parallel .* "
                                          r"engine.name='ddp' or 'fsdp2' or 'deepspeed'"):
        load_config(yaml, ["sparsity.method=gap_parallel", "engine.name=local"])
    ds = ["sparsity.method=gap_parallel", "engine.name=deepspeed", "engine.deepspeed_config=ds_configs/zero2_fp32.json"]
    with pytest.raises(ConfigError, match=r"train.clip_grad_norm=1.0 is not supported with sparsity.method="
                                          r"gap_parallel on engine.name='deepspeed'"):
        load_config(yaml, ds + ["train.clip_grad_norm=1.0"])
    assert load_config(yaml, ["sparsity.method=gap_parallel", "engine.name=fsdp2"]).engine.name == "fsdp2"
    assert load_config(yaml, ds).engine.name == "deepspeed"
