"""P-GaP (``gap_parallel``) on 2 gloo ranks = 2 copies of one rank each, against a one-process
reference written out here: two plain copies trained apart on their ranks' halves of each batch,
merged by hand (each parameter and its momentum from the copy that owns it), pruned per layer by
|w|, regrown, then fine-tuned together on the whole batch."""
import copy

import pytest
import torch
import torch.nn.functional as F

from rigl_ds.core import get_method
from rigl_ds.core.gap import partition_layers
from tests.distributed.harness import run_ranks
from tests.helpers import batch, make_nobn

pytestmark = pytest.mark.distributed

STEPS, T, ROUNDS, KAPPA = 24, 4, 2, 2          # merges at steps 4 and 8; fine-tuning from step 9
LR = dict(lr=0.05, momentum=0.9, weight_decay=1e-4)


def pgap(model, opt, engine=None, **kw):
    return get_method("gap_parallel")(model, opt, total_steps=STEPS, sparsity=0.8, gap_partitions=KAPPA,
                                      gap_phase=T, gap_rounds=ROUNDS, engine=engine, **kw)


def worker(rank, world, packed):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from rigl_ds.engines.ddp import DDPEngine

    model = make_nobn(seed=rank)            # DDP broadcasts rank 0's weights
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), **LR)
    engine = DDPEngine(ddp, opt, packed_allreduce=packed)
    return train(model, ddp, opt, engine, rank, world)


def fsdp2_worker(rank, world):
    """Each copy sharded over its own ranks (``copy_mesh``'s rows): 1 rank per copy (world 2) or 2."""
    from torch.distributed.fsdp import fully_shard

    from rigl_ds.engines.copies import copy_mesh
    from rigl_ds.engines.fsdp2 import FSDP2Engine

    model = make_nobn(seed=0)               # no broadcast under FSDP2: every copy starts the same
    mesh = copy_mesh(KAPPA, "cpu")
    for m in (model.conv1, model.conv2):
        fully_shard(m, mesh=mesh["shard"])
    fully_shard(model, mesh=mesh["shard"])
    opt = torch.optim.SGD(model.parameters(), **LR)
    engine = FSDP2Engine(model, opt, copies_mesh=mesh)
    return train(model, model, opt, engine, rank, world)


def ds_worker(rank, world, stage, bf16=False):
    """DeepSpeed (fp32: it reduces no float64; or bf16) with P-GaP's copies as its data-parallel groups."""
    import deepspeed

    from rigl_ds.engines.copies import CopyGroups
    from rigl_ds.engines.deepspeed import CopiesMPU, DeepSpeedEngineAdapter, init_deepspeed_comm

    init_deepspeed_comm("gloo")
    model = make_nobn(seed=0, dtype=torch.float32)     # DeepSpeed broadcasts within a copy only
    opt = torch.optim.SGD(model.parameters(), **LR)
    copies = CopyGroups(KAPPA)
    cfg = {"train_micro_batch_size_per_gpu": 16 // world, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
           "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True, "bf16": {"enabled": bf16}}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, mpu=CopiesMPU(copies))
    adapter = DeepSpeedEngineAdapter(engine, opt, copies=copies)

    def step(sp):
        adapter.step(apply=sp.step())

    def weights():
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for n, p in engine.module.named_parameters():
            master = safe_get_full_fp32_param(p)
            out[n] = (master if master is not None else p.detach()).clone()
        return out

    return train(engine.module, engine, opt, adapter, rank, world, dtype=torch.bfloat16 if bf16 else torch.float32,
                 backward=engine.backward, step=step, weights=weights)


def train(model, forward, opt, engine, rank, world, *, dtype=torch.float64, backward=None, step=None, weights=None):
    """The loop of every engine; masks and weights returned whole."""
    sp = pgap(model, opt, engine)
    size = world // KAPPA
    assert (sp.copy, sp.copies.size) == (rank // size, size)
    # FLOPs are counted with the mean copy: each layer dense in one copy of KAPPA
    assert sp.layer_densities() == pytest.approx(
        {n: (sp.final_nnz[n] + (sp._numel[n] - sp.final_nnz[n]) / KAPPA) / sp._numel[n] for n in sp.masks})

    def whole_masks():
        return {n: engine.whole(n, m).clone() for n, m in sp.masks.items()}

    masks = [whole_masks()]
    counts = [dict(sp.nnz)]
    for t in range(STEPS):
        x, y = batch(t, dtype=dtype)
        part = x.shape[0] // world
        if backward is None:
            opt.zero_grad()
        loss = F.cross_entropy(forward(x[rank * part:(rank + 1) * part]), y[rank * part:(rank + 1) * part])
        loss.backward() if backward is None else backward(loss)
        if step is not None:
            step(sp)
        elif sp.step():
            opt.step()
        if sp.last_update and sp.last_update["step"] == t:
            masks.append(whole_masks())
            counts.append(dict(sp.nnz))
    if weights is None:
        final = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                 for n, p in model.named_parameters()}
    else:
        final = weights()
    return masks, counts, final, sp.last_update


def top_by_magnitude(w, k):
    """The ``k`` largest |w| (ties: the lower flat index), as a mask."""
    order = torch.sort(w.abs().reshape(-1), descending=True, stable=True).indices[:k]
    mask = torch.zeros(w.numel(), dtype=torch.bool)
    mask[order] = True
    return mask.view(w.shape)


def reference(dtype=torch.float64):
    """Masks after init and each merge per copy, and the final weights, computed without gap.py."""
    model = make_nobn(seed=0, dtype=dtype)
    base = get_method("static")(copy.deepcopy(model), None, total_steps=STEPS, sparsity=0.8)   # the same draw
    final = dict(base.nnz)
    numel = {n: m.numel() for n, m in base.masks.items()}
    parts = partition_layers(numel, KAPPA)
    owner = {n: i for i, p in enumerate(parts) for n in p}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in base.masks:
                p.mul_(base.masks[n])
    copies = []
    for c in range(KAPPA):
        m = copy.deepcopy(model)
        masks = {n: (torch.ones_like(v) if owner[n] == c else v.clone()) for n, v in base.masks.items()}
        copies.append((m, torch.optim.SGD(m.parameters(), **LR), masks))
    seen = [[{n: v.clone() for n, v in cm.items()} for *_, cm in copies]]

    def train(m, opt, masks, x, y, step):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        for n, p in m.named_parameters():
            if n in masks:
                p.grad.mul_(masks[n])
        if step:
            opt.step()

    t_end = T * ROUNDS
    for t in range(t_end + 1):
        x, y = batch(t, dtype=dtype)
        merge = t > 0 and t % T == 0
        for c, (m, opt, masks) in enumerate(copies):
            train(m, opt, masks, x[c * 8:(c + 1) * 8], y[c * 8:(c + 1) * 8], step=not merge)
        if not merge:
            continue
        merged = copy.deepcopy(copies[0][0])
        mopt = torch.optim.SGD(merged.parameters(), **LR)
        mopt.load_state_dict(copy.deepcopy(copies[0][1].state_dict()))
        current = 0
        with torch.no_grad():
            for (n, p), *srcs in zip(merged.named_parameters(), *[c[0].named_parameters() for c in copies]):
                if n in owner:
                    current = owner[n]
                src = srcs[current][1]
                p.copy_(src)
                mopt.state[p]["momentum_buffer"] = copies[current][1].state[src]["momentum_buffer"].clone()
            pruned = {}
            for n, p in merged.named_parameters():
                if n in owner:
                    pruned[n] = top_by_magnitude(p, final[n])
                    p.mul_(pruned[n])
                    mopt.state[p]["momentum_buffer"].mul_(pruned[n])
        copies = []
        for c in range(KAPPA if t < t_end else 1):
            m = copy.deepcopy(merged)
            opt = torch.optim.SGD(m.parameters(), **LR)
            opt.load_state_dict(copy.deepcopy(mopt.state_dict()))   # no momentum shared between copies
            grow = t < t_end
            masks = {n: (torch.ones_like(v) if grow and owner[n] == c else v.clone()) for n, v in pruned.items()}
            copies.append((m, opt, masks))
        seen.append([{n: v.clone() for n, v in cm.items()} for *_, cm in copies])
    m, opt, masks = copies[0]
    for t in range(t_end + 1, STEPS):
        x, y = batch(t, dtype=dtype)
        train(m, opt, masks, x, y, step=True)
    return seen, {n: p.detach().clone() for n, p in m.named_parameters()}, final, numel, owner


def check_against_reference(results, world, dtype=torch.float64):
    ref_masks, ref_w, final, numel, owner = reference(dtype)
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
    size = world // KAPPA
    for rank, (masks, counts, weights, last) in enumerate(results):
        copy = rank // size
        assert len(masks) == len(ref_masks) == ROUNDS + 1
        for i, (got, want) in enumerate(zip(masks, ref_masks)):
            want = want[copy if len(want) > 1 else 0]
            for n in want:
                assert torch.equal(got[n], want[n]), (rank, i, n)
        # the counts in force: the own partition dense while the copies grow, the targets after
        for i, c in enumerate(counts):
            grow = i < ROUNDS
            assert c == {n: numel[n] if grow and owner[n] == copy else final[n] for n in final}, (rank, i)
        for n, w in ref_w.items():
            torch.testing.assert_close(weights[n], w, **tol)
        assert last["merged"] and last["dense_partition"] == -1 and last["due_step"] == T * ROUNDS
    for r in range(1, world):       # fine-tuned together: one model on every rank, bit for bit
        for n in ref_w:
            assert torch.equal(results[0][2][n], results[r][2][n]), (r, n)


@pytest.mark.parametrize("packed", [True, False], ids=["packed-allreduce", "plain-allreduce"])
def test_two_copies_equal_the_reference(packed):
    check_against_reference(run_ranks(worker, packed, world=2), 2)


@pytest.mark.parametrize("world", [2, 4], ids=["1-rank-copies", "2-rank-copies"])
def test_fsdp2_copies_equal_the_reference(world):
    """The same run under FSDP2, each copy sharded over its own ranks (with 2 ranks a copy, its
    shards are merged and averaged between the ranks at the same place in each copy)."""
    check_against_reference(run_ranks(fsdp2_worker, world=world), world)


@pytest.mark.slow
@pytest.mark.parametrize("stage,world", [(0, 2), (1, 2), (2, 2), (3, 2), (2, 4), (3, 4)])
def test_deepspeed_copies_equal_the_reference(stage, world):
    """The same run under DeepSpeed ZeRO ``stage``, each copy DeepSpeed's data-parallel group (fp32);
    with 2 ranks a copy, ZeRO partitions within the copy, and merges and averages go between the
    ranks holding the same partitions."""
    check_against_reference(run_ranks(ds_worker, stage, world=world), world, torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 3])
def test_deepspeed_bf16_copies_merge_into_one_model(stage):
    """bf16 (DeepSpeed's bf16 optimizer at stages 0-1, ZeRO-3's own at 3: fp32 masters apart from the
    module's bf16 weights): too coarse to compare with the fp32 reference, so what must hold exactly:
    every rank holds the counts in force (its own partition dense while the copies grow), and after
    the last merge one model (masks and fp32 masters) bit for bit on every rank."""
    results = run_ranks(ds_worker, stage, True, world=2)
    final, numel = results[0][1][-1], {n: m.numel() for n, m in results[0][0][0].items()}
    parts = partition_layers(numel, KAPPA)
    owner = {n: i for i, p in enumerate(parts) for n in p}
    for rank, (masks, counts, weights, last) in enumerate(results):
        assert len(masks) == ROUNDS + 1 and last["merged"] and last["due_step"] == T * ROUNDS
        for i, c in enumerate(counts):
            assert c == {n: numel[n] if i < ROUNDS and owner[n] == rank else final[n] for n in final}, (rank, i)
            assert all(int(masks[i][n].sum()) == c[n] for n in c), (rank, i)
    for n in numel:         # the last merge's masks: the same on both ranks
        assert torch.equal(results[0][0][ROUNDS][n], results[1][0][ROUNDS][n]), n
    for n, w in results[0][2].items():
        assert torch.equal(w, results[1][2][n]), n


def test_world_not_divisible_by_the_copies_is_refused():
    """The library refuses on every rank, naming both numbers; the config names its source too."""
    from rigl_ds.config import ConfigError, for_world, load_config
    from tests.distributed.test_launchers import ROOT

    cfg = load_config(ROOT / "configs" / "quickstart_ddp.yaml", ["sparsity.method=gap_parallel",
                                                                  "sparsity.gap_partitions=3"])
    with pytest.raises(ConfigError, match=r"sparsity.gap_partitions=3: .*world size 2 is not divisible by 3"):
        for_world(cfg, 2)
    assert for_world(cfg, 6) is not None
    errors = run_ranks(refused_worker, world=2)
    assert all("world size 2 is not divisible by gap_partitions=3" in e for e in errors), errors


def refused_worker(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from rigl_ds.engines.ddp import DDPEngine

    model = make_nobn(seed=0)
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    with pytest.raises(ValueError) as e:
        get_method("gap_parallel")(model, opt, total_steps=STEPS, gap_partitions=3, gap_phase=T,
                                   engine=DDPEngine(ddp, opt))
    return str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "fsdp2-4-ranks", "deepspeed"])
def test_torchrun_killed_mid_phase_resumes_exactly_across_the_merges(tmp_path, engine):
    """``rigl-ds train`` under torchrun (DeepSpeed: its launcher, ZeRO-2), 2 copies of one rank: rank 1
    is killed at step 25 (its copy apart since the merge at step 15); resume=auto from the step-20
    checkpoint, which holds copy 1's model and optimizer state, crosses the last merge (step 30) and
    ends, at step 40, bit-identical to an uninterrupted run (checkpoint and TensorBoard). DDP: one
    file, copy 1's state in it; FSDP2: a DCP folder, copy 1's shards in its ``copy1/``; DeepSpeed:
    its folder, copy 1's own DeepSpeed checkpoint in ``copy1/`` (the same tag). ``fsdp2-4-ranks``: 2 copies of 2
    ranks (bf16), each copy's shards saved and loaded by its own ranks."""
    from rigl_ds import checkpoint as ckpt
    from tests.compare import _ds_folder, assert_same, assert_same_run
    from tests.distributed.test_launchers import ROOT, launch

    cfg = str(ROOT / "configs" / "quickstart_ddp.yaml")
    args = ["train.epochs=2", "sparsity.method=gap_parallel", "sparsity.gap_partitions=2", "sparsity.gap_phase=15",
            "sparsity.gap_rounds=2", "logging.log_every=5", "logging.progress=false", "checkpoint.every_steps=10",
            "checkpoint.keep_last=3", "train.max_steps=40"]
    env = {}
    if engine == "deepspeed":
        script, lead = "deepspeed.sh", [cfg, str(ROOT / "ds_configs" / "zero2_fp32.json")]
    elif engine == "fsdp2-4-ranks":
        script, lead, env, engine = "torchrun.sh", [cfg, "engine.name=fsdp2", "precision.dtype=bf16"], \
            {"NPROC_PER_NODE": "4"}, "fsdp2"
    else:
        script, lead = "torchrun.sh", [cfg, f"engine.name={engine}"]
    straight, d = tmp_path / "straight", tmp_path / "run"
    launch(script, *lead, *args, f"logging.run_dir={straight}", env=env)
    p = launch(script, *lead, *args, f"logging.run_dir={d}", check=False,
               env=dict(env, RIGL_DS_FAULT="step:25", RIGL_DS_FAULT_RANK="1"))
    assert p.returncode != 0, (p.stdout + p.stderr)[-3000:]
    if engine != "deepspeed":
        assert "SIGKILL" in p.stdout + p.stderr, (p.stdout + p.stderr)[-3000:]
    folder = d / "checkpoints" / "step_00000020"
    if engine == "ddp":
        saved = ckpt.load(folder.with_suffix(".pt"))
        assert saved["sparsifier"]["copies_grow"] and len(saved["copies"]) == 1
        other = saved["copies"][0]["model"]
        assert any(not torch.equal(other[k], saved["model"][k]) for k in other)      # the copies differ mid-phase
    elif engine == "fsdp2":
        assert ckpt.load(folder / "rigl_ds.pt")["sparsifier"]["copies_grow"]
        assert sorted(p.name for p in folder.glob("copy*")) == ["copy1"]
        assert (folder / "copy1" / ".metadata").is_file()
    else:
        main, other = (_ds_folder(f)["mp_rank_00_model_states.pt"] for f in (folder, folder / "copy1" / folder.name))
        assert main["rigl_ds"]["sparsifier"]["copies_grow"]
        assert any(not torch.equal(other["module"][k], main["module"][k]) for k in main["module"])
    launch(script, *lead, *args, f"logging.run_dir={d}", "resume=auto", env=env)
    final = assert_same_run(straight, d, 40)
    if engine == "ddp":
        assert "copies" not in final and not final["sparsifier"]["copies_grow"]      # merged: one model
    elif engine == "fsdp2":
        assert not (d / "checkpoints" / "step_00000040" / "copy1").exists()
    else:           # every copy saves (DeepSpeed's save is a collective of all ranks): merged, the same model
        end = [_ds_folder(r / "checkpoints" / "step_00000040" / "copy1" / "step_00000040") for r in (straight, d)]
        assert_same(end[0], end[1])
        mine, theirs = final["mp_rank_00_model_states.pt"]["module"], end[0]["mp_rank_00_model_states.pt"]["module"]
        params = [k for k in mine if "running_" not in k and "num_batches" not in k]   # BatchNorm statistics: each rank's
        assert params and all(torch.equal(theirs[k], mine[k]) for k in params), \
            [k for k in params if not torch.equal(theirs[k], mine[k])]
