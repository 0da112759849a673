"""DDP on 2 gloo ranks: same masks as one process, invariants on every rank, packed all-reduce."""
import copy

import pytest
import torch
import torch.nn.functional as F

from rigl_ds import RigL
from rigl_ds.core import get_method
from tests.distributed.harness import run_ranks
from tests.helpers import assert_grown_state_reset, batch, make_nobn, poison_inactive

pytestmark = pytest.mark.distributed

STEPS, DELTA = 30, 5


def check_invariants(model, opt, sp):
    params = dict(model.named_parameters())
    for name, mask in sp.masks.items():
        w = params[name]
        assert int(mask.sum()) == sp.nnz[name], name
        assert torch.count_nonzero(w.detach()[~mask]) == 0, name
        for key, st in opt.state.get(w, {}).items():
            if torch.is_tensor(st) and st.shape == w.shape:
                assert torch.count_nonzero(st[~mask]) == 0, (name, key)


def sparsifier(method, model, opt, engine=None):
    """The sparsifier of these runs; ``method`` is a method name, or ``name+structure``: fan_in at the
    same ERK 80%, N:M at sparsity 1 - N/M, uniform (the first conv, rows of 9, stays dense);
    ``rigl+fan_in+ablation``: with SRigL's neuron ablation at gamma_sal 0.9 (rows are removed);
    ``gap_cyclic+global``: C-GaP with the global-magnitude (non-uniform) prune."""
    name, _, structure = method.partition("+")
    structure, _, extra = structure.partition("+")
    kw = {"gamma_sal": 0.9} if extra == "ablation" else {}
    if structure == "global":
        structure, kw = "", {"gap_prune": "global"}
    if structure:
        kw["structure"] = structure
        if ":" in structure:
            n, m = map(int, structure.split(":"))
            kw.update(sparsity=1 - n / m, distribution="uniform")
    kw.setdefault("sparsity", 0.8)
    return get_method(name)(model, opt, total_steps=STEPS, delta=DELTA, grad_accumulation_n=2, engine=engine, **kw)


def single_process(dtype=torch.float64, model=None, data=None, method="rigl"):
    """The reference run in one process: masks at each update, final weights, the last update's record."""
    model = make_nobn(dtype=dtype) if model is None else model
    data = (lambda t: batch(t, dtype=dtype)) if data is None else data
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    sp = sparsifier(method, model, opt)
    masks = []
    for t in range(STEPS):
        x, y = data(t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if sp.step():
            opt.step()
        if sp.last_update and sp.last_update["step"] == t:
            masks.append({n: m.clone() for n, m in sp.masks.items()})
    return masks, {n: p.detach().clone() for n, p in model.named_parameters()}, sp.last_update


def assert_equal_run(masks, weights, ref_masks, ref_w, rtol=1e-9, atol=1e-12) -> None:
    """Identical masks at every update, weights equal to the reference up to reduction order."""
    assert len(masks) == len(ref_masks)
    for got, want in zip(masks, ref_masks):
        for n in want:
            assert torch.equal(got[n], want[n]), n
    for n, w in ref_w.items():
        torch.testing.assert_close(weights[n], w, rtol=rtol, atol=atol)


def states(model, opt, sp) -> dict[str, list[torch.Tensor]]:
    """The per-element optimizer state tensors of each masked layer (whole, as DDP keeps them)."""
    params = dict(model.named_parameters())
    return {n: [v for v in opt.state.get(params[n], {}).values() if torch.is_tensor(v) and v.shape == m.shape]
            for n, m in sp.masks.items()}


def ddp_worker(rank, world, packed, channels_last=False, method="rigl"):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from rigl_ds.engines.ddp import DDPEngine

    model = make_nobn(seed=rank)            # different init per rank: DDP broadcasts rank 0's
    if channels_last:                       # NHWC weights: DDP buckets hold their gradients in NHWC order
        model = model.to(memory_format=torch.channels_last)
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    engine = DDPEngine(ddp, opt, packed_allreduce=packed)
    sp = sparsifier(method, model, opt, engine)
    masks, traffic, grown = [], [], 0
    for t in range(STEPS):
        x, y = batch(t, dtype=torch.float64)
        half = x.shape[0] // world
        xs, ys = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
        if channels_last:
            xs = xs.contiguous(memory_format=torch.channels_last)
        opt.zero_grad()
        if engine.comm:
            engine.comm.reset_counters()
        dense_wanted = sp.wants_dense_grad()
        if packed and not dense_wanted:     # the reference: the full batch's dense gradient in this process
            ref = copy.deepcopy(model)
            F.cross_entropy(ref(x), y).backward()
            ref_grads = {n: q.grad for n, q in ref.named_parameters()}
        F.cross_entropy(ddp(xs), ys).backward()
        if packed and not dense_wanted:     # the packed hook itself masked: before the sparsifier runs
            params = dict(model.named_parameters())
            for n, m in sp.masks.items():
                g = params[n].grad
                assert torch.count_nonzero(g[~m]) == 0, (t, n, "inactive gradient entries after backward")
                torch.testing.assert_close(g[m], ref_grads[n][m], rtol=1e-9, atol=1e-12)
        # the poison check of grown positions' state, for methods that grow (and so skip the step:
        # the poison left at inactive positions is cleared before any optimizer step reads it)
        updating = sp.is_update_step() and t > 0 and sp.skip_step_on_update
        if updating:
            before = poison_inactive(states(model, opt, sp), sp.masks)
        active = sum(int(m.sum()) for m in sp.masks.values())        # the masks the hook packed with
        if sp.step():
            opt.step()
        if updating:
            grown += assert_grown_state_reset(states(model, opt, sp), before, sp.masks)
        check_invariants(model, opt, sp)
        if engine.comm:
            traffic.append((t, dense_wanted, engine.comm.bytes_this_step, engine.comm.dense_bytes_this_step, active))
        if sp.last_update and sp.last_update["step"] == t:
            masks.append({n: m.clone() for n, m in sp.masks.items()})
    assert (grown > 0) == (not method.startswith("gmp"))       # gmp only prunes
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return masks, weights, traffic, sp.measure().mask_density


@pytest.mark.parametrize("packed,channels_last,method", [(False, False, "rigl"), (True, False, "rigl"),
                                                         (True, True, "rigl"), (True, False, "gmp"),
                                                         (True, False, "rigl+fan_in"), (True, False, "gap_cyclic")],
                         ids=["dense-allreduce", "packed-allreduce", "packed-allreduce-channels-last",
                              "packed-allreduce-gmp", "packed-allreduce-fan-in", "packed-allreduce-gap-cyclic"])
def test_ddp_two_ranks_equal_single_process(packed, channels_last, method):
    ref_masks, ref_w, _ = single_process(method=method)
    results = run_ranks(ddp_worker, packed, channels_last, method)
    if method.startswith("gmp"):      # dense start, prunes at 5, 10, ..., 25 (t_end 22): counts only fall
        counts = [sum(int(m.sum()) for m in ms.values()) for ms in ref_masks]
        assert len(counts) == 5 and counts == sorted(counts, reverse=True) and len(set(counts)) == 5
    else:
        assert len(ref_masks) == (STEPS * 3 // 4 - 1) // DELTA == 4
    for masks, weights, traffic, density in results:
        assert_equal_run(masks, weights, ref_masks, ref_w)
    # both ranks hold bit-identical weights
    for n in ref_w:
        assert torch.equal(results[0][1][n], results[1][1][n])
    if packed:
        traffic = results[0][2]
        ordinary = [(b, d, a) for _, wanted, b, d, a in traffic if not wanted]
        dense = [(b, d) for _, wanted, b, d, _ in traffic if wanted]
        # steps feeding the 4 updates: dense (gmp reads no gradient)
        assert len(dense) == (8 if method.startswith("rigl") else 0) and all(b == d for b, d in dense)
        masked_numel = sum(m.numel() for m in ref_masks[0].values())
        total_numel = sum(w.numel() for w in ref_w.values())
        for b, d, a in ordinary:
            assert d == total_numel * 8
            assert b == (a + total_numel - masked_numel) * 8          # exactly the active entries
        if method.startswith("gmp"):
            assert ordinary[0][0] == ordinary[0][1] and ordinary[-1][0] < ordinary[-1][1] / 2
        print(f"\npacked all-reduce: {ordinary[-1][0]} of {ordinary[-1][1]} bytes per ordinary step "
              f"({ordinary[-1][0] / ordinary[-1][1]:.3f}; masked-layer density {results[0][3]:.3f})")


def packed_vs_dense_worker(rank, world):
    """Ordinary steps only (no updates): packed and dense all-reduce give bit-identical training."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from rigl_ds.core import Static
    from rigl_ds.engines.ddp import DDPEngine

    out = []
    for packed in (False, True):
        model = make_nobn()
        ddp = DDP(model)
        opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
        sp = Static(model, opt, total_steps=20, sparsity=0.9,
                    engine=DDPEngine(ddp, opt, packed_allreduce=packed))
        for t in range(20):
            x, y = batch(t, dtype=torch.float64)
            opt.zero_grad()
            F.cross_entropy(ddp(x[rank::2]), y[rank::2]).backward()
            if sp.step():
                opt.step()
        out.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return out


def test_packed_allreduce_is_bit_identical_to_dense():
    for dense, packed in run_ranks(packed_vs_dense_worker):
        for n in dense:
            assert torch.equal(dense[n], packed[n]), n


def corrupt_worker(rank, world, mode):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from rigl_ds.engines.ddp import DDPEngine
    from rigl_ds.engines.dist_utils import MaskDivergenceError

    model = make_nobn()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    engine = DDPEngine(ddp, opt, mask_sync=mode)
    sp = RigL(model, opt, total_steps=40, sparsity=0.8, delta=5, engine=engine)
    if rank == 1:                       # flip one active and one inactive entry of fc1's mask
        m = sp.masks["fc1.weight"].view(-1)
        on, off = int(m.nonzero()[0]), int((~m).nonzero()[0])
        m[on], m[off] = False, True
    try:
        for t in range(6):               # step 5 is an update step: it checks the masks first
            x, y = batch(t, dtype=torch.float64)
            opt.zero_grad()
            F.cross_entropy(ddp(x[rank::2]), y[rank::2]).backward()
            if sp.step():
                opt.step()
    except MaskDivergenceError as e:
        return str(e)
    return None


@pytest.mark.parametrize("mode", ["broadcast", "verify"])
def test_corrupted_mask_on_one_rank_is_detected(mode):
    for msg in run_ranks(corrupt_worker, mode):
        assert msg is not None and "fc1.weight" in msg and "differ between ranks" in msg
