import json

import pytest

from rigl_ds.cli import main


def test_plan_json_hand_counted(tmp_path, capsys):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        "# rigl-ds plan p.yaml --json\n"
        "name: plan\nmodel: {name: 'tests.helpers:plan_net'}\ndata: {name: digits, batch_size: 32}\n"
        "sparsity: {sparsity: 0.5, distribution: erk, delta: 10, t_end: 0.75}\ntrain: {epochs: 2}\n")
    assert main(["plan", str(cfg), "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    plan = json.loads(out)
    # ERK: conv raw 11/36 would exceed density 1 -> dense; fc gets the rest: 0.5*2560 - 0.5*36 = 1262
    assert plan["layers"] == [
        {"name": "conv.weight", "shape": [4, 1, 3, 3], "numel": 36, "density": 1.0, "nnz": 36, "group": 36},
        {"name": "fc.weight", "shape": [10, 256], "numel": 2560, "density": 1262 / 2560, "nnz": 1262,
         "group": 2560},
    ]
    assert plan["structure"] == "unstructured"
    assert plan["model"] == "tests.helpers:plan_net"
    assert plan["global_density"] == pytest.approx((36 + 1262) / 2596)
    conv, fc = 2 * 256 * 9, 2 * 2560            # 4x8x8 outputs x 9 MACs; 256x10 MACs
    f = plan["flops"]
    assert f["dense_forward"] == conv + fc
    assert f["sparse_forward"] == pytest.approx(conv + fc * 1262 / 2560)
    assert f["inference_ratio"] == pytest.approx(f["sparse_forward"] / f["dense_forward"])
    fs, fd = f["sparse_forward"], f["dense_forward"]
    # digits: 1797 - 360 test = 1437 train -> 44 batches of 32 per epoch, 88 steps, t_end 66
    assert plan["schedule"] == {"total_steps": 88, "steps_per_epoch": 44, "epochs": 2.0, "delta": 10, "t_end": 66,
                                "num_mask_updates": 6, "density_timeline": [], "dense_phases": [], "global_batch": 32,
                                "world_size": 1, "grad_accumulation": 1}
    expected = ((3 * fs * 10 + 2 * fs + fd) / 11 * 66 + 3 * fs * 22) / (3 * fd * 88)
    assert f["train_ratio"] == pytest.approx(expected)


def test_plan_of_structures_hand_counted(tmp_path, capsys):
    """fan_in rounds each layer to a whole count per output row; 2:4 refuses a layer whose rows do not
    split into 4s, naming it and the two ways out."""
    cfg = tmp_path / "p.yaml"
    cfg.write_text("name: plan\nmodel: {name: 'tests.helpers:plan_net'}\ndata: {name: digits, batch_size: 32}\n"
                   "sparsity: {sparsity: 0.5, distribution: uniform, structure: fan_in, delta: 10, \n"
                   "overrides: {conv: 0.5}}\ntrain: {epochs: 2}\n")
    assert main(["plan", str(cfg), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["structure"] == "fan_in"
    # (uniform keeps the first layer dense, the override does not) conv: 36 - floor(0.5 * 36) = 18 over 4 rows of 9 -> 4.5, half up: 5 per row; fc: 128 of 256 per row
    assert [(r["nnz"], r["group"]) for r in plan["layers"]] == [(20, 9), (1280, 256)]
    assert plan["global_density"] == pytest.approx((20 + 1280) / 2596)
    assert main(["plan", str(cfg), "sparsity.structure=4:8"]) == 2
    err = capsys.readouterr().err
    assert "'conv.weight' (4, 1, 3, 3): its rows of 9 weights do not split into groups of M=8 (4:8)" in err
    assert "sparsity.exclude: ['conv']" in err and "sparsity.overrides: {'conv': dense}" in err
    assert main(["plan", str(cfg), "sparsity.structure=4:8", "sparsity.overrides={conv: dense}"]) == 0
    out = capsys.readouterr().out
    assert "structure 4:8" in out and "1280" in out and "4/8" in out and "whole layer" in out
    assert main(["plan", str(cfg), "sparsity.structure=1:8", "sparsity.overrides={conv: dense}"]) == 2
    assert "1:8 keeps density 0.125 in every masked layer, the sparsity settings give this layer 1280 of 2560" in \
        capsys.readouterr().err


def test_plan_table_and_static_dense(tmp_path, capsys):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("name: plan\nmodel: {name: 'tests.helpers:plan_net'}\ntrain: {epochs: 1}\n")
    assert main(["plan", str(cfg), "sparsity.method=dense", "sparsity.delta=7"]) == 0
    out = capsys.readouterr().out
    assert "global density 1.000000" in out and "0 mask updates" in out and "delta 7," in out
    assert main(["plan", str(cfg), "sparsity.method=static", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["schedule"]["num_mask_updates"] == 0
    assert plan["flops"]["train_ratio"] == pytest.approx(plan["flops"]["inference_ratio"])


def test_plan_of_gap_cyclic_hand_counted(tmp_path, capsys):
    """plan_net (conv 36, fc 2560; ERK 0.5 keeps the conv dense, fc 1262) under gap_cyclic with 2
    partitions (conv | fc), T = 10 steps, 2 rounds over 88 steps: fc is dense for steps 11-20 and
    31-40, at its target otherwise; training FLOPs count those dense steps."""
    cfg = tmp_path / "g.yaml"
    cfg.write_text(
        "name: gap\nmodel: {name: 'tests.helpers:plan_net'}\ndata: {name: digits, batch_size: 32}\n"
        "sparsity: {method: gap_cyclic, sparsity: 0.5, distribution: erk, gap_partitions: 2, gap_phase: 10, "
        "gap_rounds: 2}\ntrain: {epochs: 2}\n")
    assert main(["plan", str(cfg), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    s = plan["schedule"]
    assert s["delta"] == 10 and s["t_end"] == 40 and s["num_mask_updates"] == 4
    sparse, dense = (36 + 1262) / 2596, 1.0
    assert s["density_timeline"] == [{"step": 0, "global_density": pytest.approx(sparse)},
                                     {"step": 11, "global_density": dense},
                                     {"step": 21, "global_density": pytest.approx(sparse)},
                                     {"step": 31, "global_density": dense},
                                     {"step": 41, "global_density": pytest.approx(sparse)}]
    assert [(p["from_step"], p["dense_partition"], p["layers"]) for p in s["dense_phases"]] == [
        (0, 0, ["conv.weight"]), (11, 1, ["fc.weight"]), (21, 0, ["conv.weight"]), (31, 1, ["fc.weight"]),
        (41, None, [])]
    f = plan["flops"]
    fs, fd = f["sparse_forward"], f["dense_forward"]
    assert f["train_ratio"] == pytest.approx((3 * fs * (11 + 10 + 47) + 3 * fd * 20) / (3 * fd * 88))
    assert main(["plan", str(cfg)]) == 0
    table = capsys.readouterr().out
    assert "from step 11 (round 1): partition 1 dense (1 layers: fc.weight)" in table
    assert "from step 41: every layer at its target (fixed masks: fine-tuning)" in table
