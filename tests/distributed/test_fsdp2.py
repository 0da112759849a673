"""FSDP2 (fully_shard) on gloo ranks: masks sharded like their weights, the same masks as one process.

The model has a layer whose rows do not split evenly (7 classes: rows 4 + 3 on 2 ranks, 3 + 3 + 1 on
3), float64 and fixed seeds as in test_ddp, so the masks compared are decided far above rounding."""
import pytest
import torch
import torch.nn.functional as F

from rigl_ds import RigL
from tests.distributed.harness import run_ranks
from tests.distributed.test_ddp import STEPS, assert_equal_run, single_process, sparsifier
from tests.helpers import Conv1D, NoBNCNN, assert_grown_state_reset, batch, poison_inactive

pytestmark = pytest.mark.distributed

CLASSES = 7


def make_model(dtype=torch.float64, conv1d=False) -> NoBNCNN:
    """``conv1d``: fc1 as Hugging Face's Conv1D (the same map, its weight stored (in, out)), whose
    structure groups run along dim 0, across FSDP2's row shards."""
    torch.manual_seed(0)
    model = NoBNCNN(num_classes=CLASSES).to(dtype)
    if conv1d:
        model.fc1 = Conv1D.from_linear(model.fc1)
    return model


def data(t: int, dtype=torch.float64):
    x, y = batch(t, size=12, dtype=dtype)
    return x, y % CLASSES


def check_local_invariants(model, opt, sp, engine) -> None:
    """Every rank: masks have its shard's shape, zeros under them in the weight and optimizer state shards."""
    from rigl_ds.engines.fsdp2 import local, row_slice

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    params = dict(model.named_parameters())
    for name, mask in sp.masks.items():
        p = params[name]
        w = local(p.detach())
        assert mask.shape == w.shape and w.shape[0] == row_slice(p.shape[0], world, rank)[1], name
        assert torch.count_nonzero(w[~mask]) == 0, (name, "weight shard")
        for key, st in opt.state.get(p, {}).items():
            if torch.is_tensor(st) and st.shape == p.shape:
                assert torch.count_nonzero(local(st)[~mask]) == 0, (name, key)
    counts = engine.total(torch.tensor([int(m.sum()) for m in sp.masks.values()]))
    assert counts.tolist() == [sp.nnz[n] for n in sp.masks]


def shard_states(model, opt, sp) -> dict[str, list[torch.Tensor]]:
    """This rank's shards of each masked layer's per-element optimizer state (views: writable in place)."""
    from rigl_ds.engines.fsdp2 import local

    params = dict(model.named_parameters())
    return {n: [local(v) for v in opt.state.get(params[n], {}).values()
                if torch.is_tensor(v) and v.shape == params[n].shape] for n in sp.masks}


def fsdp_worker(rank, world, selection, method="rigl", conv1d=False):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from rigl_ds.engines.fsdp2 import FSDP2Engine

    mesh = init_device_mesh("cpu", (world,))
    model = make_model(conv1d=conv1d)
    for m in (model.conv1, model.conv2, model.fc1, model.fc2):
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    engine = FSDP2Engine(model, opt, selection=selection)
    sp = sparsifier(method, model, opt, engine)
    check_local_invariants(model, opt, sp, engine)
    masks, grown = [], 0
    for t in range(STEPS):
        x, y = data(t)
        per = x.shape[0] // world
        opt.zero_grad()
        F.cross_entropy(model(x[rank * per:(rank + 1) * per]), y[rank * per:(rank + 1) * per]).backward()
        # the poison check of grown positions' state, for methods that grow (and so skip the step:
        # the poison left at inactive positions is cleared before any optimizer step reads it)
        updating = sp.is_update_step() and t > 0 and sp.skip_step_on_update
        if updating:
            before = poison_inactive(shard_states(model, opt, sp), sp.masks)
        if sp.step():
            opt.step()
        if updating:
            grown += assert_grown_state_reset(shard_states(model, opt, sp), before, sp.masks)
        check_local_invariants(model, opt, sp, engine)
        if sp.last_update and sp.last_update["step"] == t:
            masks.append({n: engine._gather(m, n) for n, m in sp.masks.items()})
    # grown positions are checked where the step is skipped (rigl, set, gap_cyclic); gmp grows nothing
    assert (engine.total(torch.tensor([grown]))[0] > 0) == sp.skip_step_on_update
    weights = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    return masks, weights, sp.last_update


@pytest.mark.parametrize("world,selection,method", [(2, "sharded", "rigl"), (2, "gather", "rigl"), (3, "sharded", "rigl"),
                                                    (3, "sharded", "gmp"), (2, "gather", "gmp"),
                                                    (3, "sharded", "rigl+fan_in"), (3, "sharded", "gmp+2:4"),
                                                    (2, "gather", "set+2:4"), (3, "sharded", "rigl+fan_in+ablation"),
                                                    (3, "sharded", "gap_cyclic"), (2, "sharded", "gap_cyclic+global"),
                                                    (2, "gather", "rigl+fan_in+ablation")],
                         ids=["2-ranks-sharded-topk", "2-ranks-gather-reference", "3-ranks-uneven-sharded-topk",
                              "3-ranks-uneven-sharded-gmp", "2-ranks-gather-gmp", "3-ranks-uneven-sharded-fan-in",
                              "3-ranks-uneven-sharded-gmp-2:4", "2-ranks-gather-set-2:4",
                              "3-ranks-uneven-sharded-neuron-ablation", "3-ranks-uneven-sharded-gap-cyclic",
                              "2-ranks-sharded-gap-cyclic-global", "2-ranks-gather-neuron-ablation"])
def test_fsdp2_equals_single_process(world, selection, method):
    ref_masks, ref_w, ref_last = single_process(model=make_model(), data=data, method=method)
    if method.endswith("+ablation"):                 # rows were removed, so the sharded saliency top-k was used
        assert sum(ref_last["ablated_rows"].values()) > 0, ref_last["ablated_rows"]
    grows = not method.startswith("gmp")
    assert len(ref_masks) == (4 if grows else 5)
    if method == "gmp+2:4":                          # from dense: 4, 3, then 2 of every 4 (prunes between change nothing)
        assert sorted({int(m["fc1.weight"].sum()) * 4 // m["fc1.weight"].numel() for m in ref_masks}) == [2, 3]
    if method.startswith("gap_cyclic"):              # 4 partitions dense in turn, then a final prune (grows nothing)
        assert [ref_last["dense_partition"], ref_last["churn"]] == [-1, 0.0]
        assert len({sum(int(m.sum()) for m in ms.values()) for ms in ref_masks}) > 1
    else:
        assert (ref_last["churn"] > 0) == grows
    for masks, weights, last in run_ranks(fsdp_worker, selection, method, world=world):
        assert_equal_run(masks, weights, ref_masks, ref_w)
        assert last == ref_last                    # churn counted over all shards


@pytest.mark.parametrize("world,method", [(3, "rigl+fan_in"), (2, "set+2:4")],
                         ids=["3-ranks-uneven-conv1d-fan-in", "2-ranks-conv1d-2:4"])
def test_fsdp2_conv1d_structure_equals_single_process(world, method):
    """fc1 stored (in, out): its fan_in columns / 2:4 blocks along dim 0 cross the row shards (256 rows
    on 3 ranks: 86, 86, 84), and the masks still equal one process's, which equal the Linear's
    transposed (tests/unit/test_transformers.py)."""
    ref_masks, ref_w, ref_last = single_process(model=make_model(conv1d=True), data=data, method=method)
    assert len(ref_masks) == 4 and ref_last["churn"] > 0
    fc1 = ref_masks[-1]["fc1.weight"]                       # (in, out): groups along dim 0
    if method.endswith("fan_in"):
        assert len(set(fc1.sum(0).tolist())) == 1
    else:
        assert fc1.t().reshape(-1, 4).sum(1).eq(2).all()
    for masks, weights, last in run_ranks(fsdp_worker, "sharded", method, True, world=world):
        assert_equal_run(masks, weights, ref_masks, ref_w)
        assert last == ref_last


def sparse_then_sharded_worker(rank, world):
    """A sparse model (Static at seed 5, one process) loaded on every rank, sharded, and only then given
    a RigL of another seed: the initial mask shards keep the nonzero weights, none is zeroed."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from rigl_ds import Static
    from rigl_ds.engines.fsdp2 import FSDP2Engine, local, row_slice

    sparse = make_model()
    Static(sparse, None, total_steps=STEPS, sparsity=0.8, seed=5)
    trained = {n: p.detach().clone() for n, p in sparse.named_parameters()}
    model = make_model()
    model.load_state_dict(sparse.state_dict())
    mesh = init_device_mesh("cpu", (world,))
    for m in (model.conv1, model.conv2, model.fc1, model.fc2):
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sp = RigL(model, None, total_steps=STEPS, sparsity=0.8, seed=9, engine=FSDP2Engine(model, None))
    out = {}
    for n, p in model.named_parameters():
        start, rows = row_slice(p.shape[0], world, rank)
        want = trained[n][start:start + rows]
        out[n] = torch.equal(local(p.detach()), want)
        if n in sp.masks:
            out[n] = out[n] and torch.equal(sp.masks[n], want != 0)
    return out


def test_fsdp2_sparsifier_built_after_loading_a_sparse_model_keeps_its_weights():
    for same in run_ranks(sparse_then_sharded_worker, world=2):
        assert all(same.values()), same
