"""The 12 ResNet-50 / ImageNet experiment YAMLs: one per row of SPEC section 6, one shared base."""
import pathlib
import re
import shlex

import pytest
import yaml

from rigl_ds.config import ConfigError, for_world, load_config
from rigl_ds.plan import make_plan

ROOT = pathlib.Path(__file__).resolve().parents[2]
DIR = ROOT / "configs" / "imagenet"
SPEC = ROOT.parent / "shared" / "SPEC.md"
ROWS = [(d, s) for s in (80, 90) for d in ("uniform", "erk")]
EPOCHS = (100, 500, 1200)
# the rows' distribution as the code that produced the table ran it: nv_rigl_imagenet's uniform keeps
# conv1 and fc dense (RigLScheduler, ignore_linear_layers=True); its ERK list is the official ERK
DISTRIBUTION = {"uniform": "uniform_nv", "erk": "erk"}


def path(dist, s, e) -> pathlib.Path:
    return DIR / f"resnet50_{dist}_s{s}_e{e}.yaml"


def published() -> dict[tuple[str, int], list[str]]:
    """The top-1 table of SPEC section 6: (distribution, sparsity %) -> [100 ep, 500 ep, 1200 ep]."""
    out = {}
    for line in SPEC.read_text().splitlines():
        m = re.match(r"\|\s*0\.(\d)\s*\|\s*(uniform|ERK)\s*\|([^|]+)\|([^|]+)\|([^|]+)\|", line)
        if m:
            out[m.group(2).lower(), int(m.group(1)) * 10] = [v.strip() for v in m.groups()[2:]]
    return out


# C-GaP rows: (variant, sparsity %) -> published top-1 (boone891214/GaP README, "S-GaP", 4 partitions)
GAP_ROWS = {("uniform", 80): "77.856", ("nonuniform", 80): "78.132", ("uniform", 90): "76.348",
            ("nonuniform", 90): "77.896"}


def gap_path(variant, s) -> pathlib.Path:
    return DIR / f"resnet50_gap_cyclic_{variant}_s{s}.yaml"


# P-GaP rows (uniform only: the sources publish no non-uniform P-GaP): sparsity % -> published top-1
PGAP_ROWS = {80: "77.492", 90: "76.128"}


def pgap_path(s) -> pathlib.Path:
    return DIR / f"resnet50_gap_parallel_uniform_s{s}.yaml"


def test_exactly_the_twelve_rows_the_gap_rows_and_a_base():
    names = sorted(p.name for p in DIR.glob("*.yaml"))
    assert names == sorted(["_base.yaml"] + [path(d, s, e).name for d, s in ROWS for e in EPOCHS]
                           + [gap_path(v, s).name for v, s in GAP_ROWS] + [pgap_path(s).name for s in PGAP_ROWS])


@pytest.mark.parametrize("s", sorted(PGAP_ROWS))
def test_pgap_rows_header_and_plan(s, monkeypatch):
    """Each P-GaP YAML: the published top-1 and its DDP launch commands in the header; the RigL rows'
    recipe with method gap_parallel on engine ddp; the plan (88 merges every 6250 steps, 4 copies
    growing C-GaP's 4 partitions, fine-tuning from step 550,001) at 8 ranks, and at the smallest
    world (4, the plan's default); 6 ranks refused naming both numbers."""
    monkeypatch.delenv("RIGL_DS_DATA", raising=False)
    text = pgap_path(s).read_text()
    head = [l for l in text.splitlines() if l.startswith("#")]
    assert f"published top-1 {PGAP_ROWS[s]}" in head[0], head[0]
    cmds = [l for l in head if "launch/" in l or "rigl-ds " in l]
    assert len(cmds) == 3 and all(f"configs/imagenet/{pgap_path(s).name}" in c for c in cmds)
    assert not any("deepspeed" in c or "fsdp2" in c for c in cmds)
    cfg, rigl, cyclic = load_config(pgap_path(s)), load_config(path("uniform", s, 1200)), load_config(gap_path("uniform", s))
    assert cfg.optimizer == rigl.optimizer and cfg.lr_schedule == rigl.lr_schedule and cfg.train == rigl.train
    sp = cfg.sparsity
    assert (cfg.engine.name, sp.method, sp.sparsity, sp.distribution, sp.gap_partitions, sp.gap_phase, sp.gap_rounds) \
        == ("ddp", "gap_parallel", s / 100, "uniform_nv", 4, 6250, 88)
    plan, cplan = make_plan(cfg, world=8), make_plan(cyclic, world=8)
    sch = plan["schedule"]
    assert (sch["total_steps"], sch["delta"], sch["t_end"], sch["num_mask_updates"]) == (750_000, 6250, 550_000, 88)
    phases = sch["dense_phases"]
    assert [p["round"] for p in phases] == list(range(1, 89)) + [None] and phases[-1]["from_step"] == 550_001
    assert phases[0]["copies"] == [p["layers"] for p in cplan["schedule"]["dense_phases"][:4]]
    assert plan["global_density"] == cplan["global_density"]
    assert make_plan(cfg)["schedule"]["world_size"] == 4
    with pytest.raises(ConfigError, match="world size 6 is not divisible by 4"):
        make_plan(cfg, world=6)


@pytest.mark.parametrize("variant,s", sorted(GAP_ROWS))
def test_gap_rows_header_and_plan(variant, s, monkeypatch):
    """Each C-GaP YAML: the published top-1 and its launch commands in the header; the RigL rows'
    recipe with method gap_cyclic; the plan's phases (4 partitions of T = 6250 steps, 22 rounds,
    fine-tuning from step 550,001 of 750,000) and its final density, the uniform_nv one."""
    monkeypatch.delenv("RIGL_DS_DATA", raising=False)
    text = gap_path(variant, s).read_text()
    head = [l for l in text.splitlines() if l.startswith("#")]
    assert f"published top-1 {GAP_ROWS[variant, s]}" in head[0], head[0]
    cmds = [l for l in head if "launch/" in l or "rigl-ds " in l]
    assert len(cmds) == 5 and all(f"configs/imagenet/{gap_path(variant, s).name}" in c for c in cmds)
    for c in cmds:
        for w in shlex.split(c.lstrip("# ").split(":", 1)[-1] if c.lstrip("# ").startswith(("or ", "Schedule"))
                             else c.lstrip("# ")):
            if w.startswith(("launch/", "ds_configs/", "configs/")):
                assert (ROOT / w).is_file(), (c, w)
    cfg = load_config(gap_path(variant, s))
    rigl = load_config(path("uniform", s, 1200))
    assert cfg.optimizer == rigl.optimizer and cfg.lr_schedule == rigl.lr_schedule and cfg.train == rigl.train
    sp = cfg.sparsity
    assert (sp.method, sp.sparsity, sp.distribution, sp.gap_partitions, sp.gap_phase, sp.gap_rounds, sp.gap_prune) == \
        ("gap_cyclic", s / 100, "uniform_nv", 4, 6250, 22, "layer" if variant == "uniform" else "global")
    plan = make_plan(cfg, world=8)
    sch = plan["schedule"]
    assert (sch["total_steps"], sch["delta"], sch["t_end"], sch["num_mask_updates"]) == (750_000, 6250, 550_000, 88)
    phases = sch["dense_phases"]
    assert [p["dense_partition"] for p in phases] == [0, 1, 2, 3] * 22 + [None]
    assert phases[-1]["from_step"] == 550_001 and phases[1]["from_step"] == 6251
    parts = [p["layers"] for p in phases[:4]]
    assert sum(len(p) for p in parts) == 54 and parts[0][0] == "conv1.weight" and parts[3][-1] == "fc.weight"
    rigl_plan = make_plan(rigl, world=8)
    assert plan["global_density"] == rigl_plan["global_density"]
    assert sch["density_timeline"][-1] == {"step": 550_001, "global_density": rigl_plan["global_density"]}
    assert plan["flops"]["train_ratio"] > rigl_plan["flops"]["train_ratio"]      # a dense partition costs FLOPs


@pytest.mark.skipif(not SPEC.is_file(), reason="../shared/SPEC.md not beside the checkout")
@pytest.mark.parametrize("dist,s", ROWS)
def test_header_gives_the_launch_command_and_the_published_top1(dist, s):
    table = published()
    assert len(table) == 4
    for e, top1 in zip(EPOCHS, table[dist, s]):
        text = path(dist, s, e).read_text()
        head = [l for l in text.splitlines() if l.startswith("#")]
        assert f"published top-1 {top1}" in head[0], head[0]
        cmds = [l.lstrip("# ").split(":", 1)[-1].strip() if l.lstrip("# ").startswith(("or ", "Schedule"))
                else l.lstrip("# ") for l in head if "launch/" in l or "rigl-ds " in l]
        assert len(cmds) == 5                      # deepspeed, DDP, FSDP2, SLURM, plan
        for cmd in cmds:
            words = [w for w in shlex.split(cmd) if "=" not in w or w.startswith("--")]
            assert f"configs/imagenet/{path(dist, s, e).name}" in words, cmd
            for w in words:
                if w.startswith(("launch/", "ds_configs/", "configs/")):
                    assert (ROOT / w).is_file(), (cmd, w)


@pytest.mark.parametrize("dist,s", ROWS)
def test_the_three_lengths_differ_only_in_epochs(dist, s):
    docs = [yaml.safe_load(path(dist, s, e).read_text()) for e in EPOCHS]
    for doc, e in zip(docs, EPOCHS):
        assert doc == {"extends": "_base.yaml", "name": f"resnet50_{dist}_s{s}_e{e}",
                       "sparsity": {"sparsity": s / 100, "distribution": DISTRIBUTION[dist]}, "train": {"epochs": e}}
    cfgs = [load_config(path(dist, s, e)).model_dump() for e in EPOCHS]
    for c, e in zip(cfgs, EPOCHS):
        assert c["train"].pop("epochs") == e and c.pop("name") == f"resnet50_{dist}_s{s}_e{e}"
    assert cfgs[0] == cfgs[1] == cfgs[2]


def test_base_holds_the_published_recipe():
    c = load_config(path("erk", 90, 100))
    assert (c.model.name, c.model.init) == ("resnet50", "kaiming_fan_in")
    assert (c.data.name, c.data.backend, c.data.batch_size, c.data.image_size) == ("imagefolder", "dali-gpu", 256, 224)
    o = c.optimizer
    assert (o.name, o.lr, o.momentum, o.nesterov, o.weight_decay) == ("sgd", 1.2, 0.9, False, 1e-4)
    assert (c.lr_schedule.name, c.lr_schedule.warmup_epochs) == ("cosine", 10)
    t = c.train
    assert (t.global_batch, t.label_smoothing, t.mixup, t.seed) == (2048, 0.1, 0.2, 914)
    sp = c.sparsity
    assert (sp.method, sp.delta, sp.alpha, sp.t_end, sp.anneal) == ("rigl", 100, 0.3, 0.8, "cosine")


@pytest.mark.parametrize("dist,s", ROWS)
def test_plan_without_the_data(dist, s, monkeypatch):
    monkeypatch.delenv("RIGL_DS_DATA", raising=False)
    plans = [make_plan(load_config(path(dist, s, e)), world=8) for e in EPOCHS]
    steps = [p["schedule"]["total_steps"] for p in plans]
    # 1,281,167 images / 8 ranks / 256 per rank = 625 steps per epoch at global batch 2048
    assert steps == [62_500, 312_500, 750_000] and steps[0] * 5 == steps[1] and steps[0] * 12 == steps[2]
    for p, n in zip(plans, steps):
        sch = p["schedule"]
        assert (sch["steps_per_epoch"], sch["global_batch"], sch["delta"]) == (625, 2048, 100)
        assert sch["t_end"] == round(0.8 * n)
        assert sch["num_mask_updates"] == (sch["t_end"] - 1) // 100
        assert "ImageNet-1k sizes assumed" in p["data"]["note"]
        layers = p["layers"]
        assert len(layers) == 54 and p["distribution"] == DISTRIBUTION[dist]
        if dist == "uniform":       # conv1 and fc dense, each of the other 52 convs exactly at 1 - S
            dense = {r["name"] for r in layers if r["nnz"] == r["numel"]}
            assert dense == {"conv1.weight", "fc.weight"}
            for r in layers:
                if r["name"] not in dense:
                    assert r["nnz"] == r["numel"] - (r["numel"] * s) // 100, r["name"]
        else:
            assert abs(p["global_density"] - (1 - s / 100)) < 1e-5
        assert p["global_density"] == sum(r["nnz"] for r in layers) / sum(r["numel"] for r in layers)


def test_global_batch_is_kept_by_gradient_accumulation_on_fewer_ranks():
    cfg = load_config(path("uniform", 80, 100))
    for world, accum in ((8, 1), (4, 2), (2, 4), (1, 8)):
        assert for_world(cfg, world).train.grad_accumulation == accum
        plan = make_plan(cfg, world=world)
        assert plan["schedule"]["total_steps"] == 62_500 and plan["schedule"]["global_batch"] == 2048
    with pytest.raises(ConfigError, match=r"train.global_batch=2048 is not a multiple of data.batch_size=256 x 3 "
                                          r"ranks = 768"):
        for_world(cfg, 3)
    bad = load_config(path("uniform", 80, 100), ["train.grad_accumulation=3"])
    with pytest.raises(ConfigError, match=r"train.grad_accumulation=3 disagrees with train.global_batch=2048"):
        for_world(bad, 4)


def test_readme_distribution_table():
    """README's table of distributions: the ResNet-50 global density and inference FLOPs of each, at
    80% and 90%, as `plan` computes them for the kit's YAML."""
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `(\w+)`[^|]*\|[^|]*\|[^|]*\| ([\d.]+) / ([\d.]+) \| ([\d.]+) / ([\d.]+) \|$", readme, flags=re.M)
    assert sorted(r[0] for r in rows) == ["er", "erk", "uniform", "uniform_nv"], rows
    for name, d80, d90, f80, f90 in rows:
        for s, dens, flops in ((80, d80, f80), (90, d90, f90)):
            plan = make_plan(load_config(path("erk", s, 100), [f"sparsity.distribution={name}"]), world=8)
            assert f"{plan['global_density']:.6f}" == dens, (name, s, plan["global_density"])
            assert f"{plan['flops']['inference_ratio']:.3f}" == flops, (name, s, plan["flops"]["inference_ratio"])
