"""DeepSpeed ZeRO 0-3 on 2 gloo ranks: same masks as one process, invariants on every rank.

DeepSpeed reduces only fp16/bf16/fp32 gradients, so these runs are fp32 (the DDP tests use
float64). The runs are deterministic (fixed seeds, 2-rank gloo sums), and the masks compared
here were checked to be decided by gaps far above fp32 rounding (see test_ddp for float64)."""
import pytest
import torch
import torch.nn.functional as F

from tests.distributed.harness import run_ranks
from tests.distributed.test_ddp import STEPS, single_process, sparsifier
from tests.helpers import assert_grown_state_reset, batch, make_nobn, poison_inactive

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def full_module_weight(p, stage):
    import deepspeed

    if stage < 3:
        return p.detach().clone()
    with deepspeed.zero.GatheredParameters([p]):
        return p.detach().clone()


def check_ds_invariants(adapter, sp, stage):
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    for name, mask in sp.masks.items():
        p = adapter._param(name)
        assert int(mask.sum()) == sp.nnz[name], name
        w = full_module_weight(p, stage)
        assert torch.count_nonzero(w[~mask]) == 0, (name, "module weight")
        master = safe_get_full_fp32_param(p)
        if master is not None:
            assert torch.count_nonzero(master[~mask]) == 0, (name, "fp32 master")
        direct = adapter.base_optimizer.state.get(p)
        if direct is not None:
            states = {k: v for k, v in direct.items() if torch.is_tensor(v) and v.shape == p.shape}
        else:
            states = {k: safe_get_full_optimizer_state(p, k) for k in adapter._state_keys()}
        assert states, (name, "no optimizer state found")
        for k, s in states.items():
            assert torch.count_nonzero(s[~mask]) == 0, (name, k)


def ds_states(adapter, sp) -> dict[str, list[torch.Tensor]]:
    """Each masked layer's per-element optimizer state, whole (copies under ZeRO 1-3)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    adapter._link_loaded_optimizer_state()
    out = {}
    for name in sp.masks:
        p = adapter._param(name)
        direct = adapter.base_optimizer.state.get(p)
        if direct is not None:
            out[name] = [v for v in direct.values() if torch.is_tensor(v) and v.shape == p.shape]
        else:
            out[name] = [safe_get_full_optimizer_state(p, k) for k in adapter._state_keys()]
    return out


def ds_poison_inactive(adapter, sp) -> dict[str, torch.Tensor]:
    """:func:`tests.helpers.poison_inactive` through DeepSpeed's accessors."""
    states = ds_states(adapter, sp)
    before = poison_inactive(states, sp.masks)
    ds_write_states(adapter, states)
    return before


def ds_write_states(adapter, states) -> None:
    """Write :func:`ds_states`' copies back (ZeRO 1-3; stage 0's are the optimizer's own tensors)."""
    from deepspeed.utils import safe_set_full_optimizer_state

    for name, ts in states.items():
        p = adapter._param(name)
        if adapter.base_optimizer.state.get(p) is None:
            for k, t in zip(adapter._state_keys(), ts):
                safe_set_full_optimizer_state(p, t, k)


def ds_worker(rank, world, stage, method="rigl"):
    import deepspeed

    from rigl_ds.engines.deepspeed import DeepSpeedEngineAdapter, init_deepspeed_comm

    init_deepspeed_comm("gloo")
    from deepspeed.comm import comm as ds_comm

    assert ds_comm.cdb.shm_comm_op is None      # no JIT build, no /dev/shm segments (see init_deepspeed_comm)
    model = make_nobn(dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    cfg = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
           "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
           "wall_clock_breakdown": False}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    adapter = DeepSpeedEngineAdapter(engine, opt)
    sp = sparsifier(method, engine.module, opt, adapter)
    masks, grown = [], 0
    for t in range(STEPS):
        x, y = batch(t, dtype=torch.float32)
        half = x.shape[0] // world
        loss = F.cross_entropy(engine(x[rank * half:(rank + 1) * half]), y[rank * half:(rank + 1) * half])
        engine.backward(loss)
        assert engine.is_gradient_accumulation_boundary()
        # the poison check of grown positions' state, for methods that grow (and so skip the step:
        # the poison left at inactive positions is cleared before any optimizer step reads it)
        updating = sp.is_update_step() and t > 0 and sp.skip_step_on_update
        if updating:
            before = ds_poison_inactive(adapter, sp)
        adapter.step(apply=sp.step())
        if updating:
            after = ds_states(adapter, sp)
            grown += assert_grown_state_reset(after, before, sp.masks)
            ds_write_states(adapter, after)
        check_ds_invariants(adapter, sp, stage)
        if sp.last_update and sp.last_update["step"] == t:
            masks.append({n: m.clone() for n, m in sp.masks.items()})
    assert (grown > 0) == sp.skip_step_on_update     # grown state is checked where the step is skipped (rigl)
    from deepspeed.utils import safe_get_full_fp32_param

    weights = {}
    for n, p in engine.module.named_parameters():
        master = safe_get_full_fp32_param(p)
        weights[n] = (master if master is not None else p.detach()).clone()
    return masks, weights


@pytest.mark.parametrize("stage,method", [(0, "rigl"), (1, "rigl"), (2, "rigl"), (3, "rigl"), (2, "gmp"), (3, "gmp"),
                                          (3, "rigl+2:4")])
def test_deepspeed_two_ranks_equal_single_process(stage, method):
    ref_masks, ref_w, _ = single_process(torch.float32, method=method)
    results = run_ranks(ds_worker, stage, method)
    for masks, weights in results:
        assert len(masks) == len(ref_masks) == (5 if method == "gmp" else 4)
        for got, want in zip(masks, ref_masks):
            for n in want:
                assert torch.equal(got[n], want[n]), (stage, n)
        for n, w in ref_w.items():
            torch.testing.assert_close(weights[n].to(w.dtype), w, rtol=1e-4, atol=1e-5)


def test_deepspeed_zero3_gap_cyclic_two_ranks_agree_and_follow_one_process():
    """C-GaP under ZeRO-3: both ranks hold the same masks at every phase change, each with exactly
    one process's counts; a dense layer pruned by |w| may swap near-tied weights against one process
    (ZeRO-3 sums gradients in another order, fp32), so positions are compared within 1%."""
    ref_masks, _, _ = single_process(torch.float32, method="gap_cyclic")
    (m0, _), (m1, _) = run_ranks(ds_worker, 3, "gap_cyclic")
    assert len(m0) == len(m1) == len(ref_masks) == 4
    for a, b, want in zip(m0, m1, ref_masks):
        for n in want:
            assert torch.equal(a[n], b[n]), n
            assert int(a[n].sum()) == int(want[n].sum()), n
            assert int((a[n] != want[n]).sum()) <= 0.01 * want[n].numel(), n


def zero0_bf16_worker(rank, world, own_optimizer):
    """RigL at ZeRO-0 bf16: DeepSpeed wraps a torch optimizer in FP16_UnfusedOptimizer (an fp32 master
    per parameter) and its own (``"optimizer"`` block: FusedAdam) in FP16_Optimizer (flat fp32
    masters); either copies its masters into the module after every step."""
    import deepspeed

    from rigl_ds.engines.deepspeed import DeepSpeedEngineAdapter, init_deepspeed_comm

    init_deepspeed_comm("gloo")
    model = make_nobn(dtype=torch.float32)
    cfg = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
           "zero_optimization": {"stage": 0}, "zero_allow_untested_optimizer": True, "bf16": {"enabled": True}}
    if own_optimizer:
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": 0.01, "weight_decay": 0.01}}
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    wrapper = type(engine.optimizer).__name__
    adapter = DeepSpeedEngineAdapter(engine)
    sp = sparsifier("rigl", engine.module, adapter.base_optimizer, adapter)
    revived, updates = [], 0
    for t in range(STEPS):
        x, y = batch(t, dtype=torch.bfloat16)
        half = x.shape[0] // world
        engine.backward(F.cross_entropy(engine(x[rank * half:(rank + 1) * half]), y[rank * half:(rank + 1) * half]))
        adapter.step(apply=sp.step())
        updates += bool(sp.last_update and sp.last_update["step"] == t)
        masters = zero0_masters(engine)
        for name, mask in sp.masks.items():
            assert int(mask.sum()) == sp.nnz[name]
            p = adapter._param(name)
            revived.append(int(torch.count_nonzero(p.detach()[~mask])))
            revived.append(int(torch.count_nonzero(masters[id(p)][~mask])))
    return wrapper, updates, sum(revived)


def zero0_masters(engine) -> dict[int, torch.Tensor]:
    """The wrapper's fp32 master of each module parameter (by id), read here with torch's own
    unflatten of the flat masters (the adapter slices them)."""
    from torch._utils import _unflatten_dense_tensors

    opt = engine.optimizer
    if hasattr(opt, "fp32_groups"):
        return {id(q): m for g, ms in zip(opt.fp16_groups, opt.fp32_groups) for q, m in zip(g, ms)}
    return {id(q): m for g, flat in zip(opt.fp16_groups, opt.fp32_groups_flat)
            for q, m in zip(g, _unflatten_dense_tensors(flat, g))}


@pytest.mark.parametrize("own_optimizer", [False, True], ids=["torch-sgd", "deepspeed-adamw"])
def test_zero0_bf16_masked_weights_stay_zero_through_the_fp32_masters(own_optimizer):
    """The module's bf16 weights are the wrapper's fp32 masters after every step: a master left unmasked
    revives its weight at the next step (it did, for every masked weight, under SGD; under AdamW the
    post-step re-mask hid it in the module while the masters went on dense, so a grown weight started
    from a stale master). Every step, on both ranks, through the mask updates: exactly 0 masked
    entries nonzero in the module and in the masters."""
    results = run_ranks(zero0_bf16_worker, own_optimizer, world=2)
    for wrapper, updates, revived in results:
        assert wrapper == ("FP16_Optimizer" if own_optimizer else "FP16_UnfusedOptimizer")
        assert updates >= 3 and revived == 0
