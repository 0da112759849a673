"""``rigl-ds export``: every format's outputs equal the masked dense model's (fp32, 1e-5), the dense
file loads into the original class with strict=True (torchvision ResNet-50 included), and bad
input is refused by name."""
import json
import pathlib

import pytest
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

from rigl_ds import RigL, Static
from rigl_ds.cli import main
from rigl_ds.export import (CondensedLinear, CSRLinear, ExportError, convert, export, load_exported, read_metadata,
                            save_exported)
from tests.helpers import Conv1D

ROOT = pathlib.Path(__file__).resolve().parents[2]
QUICK = str(ROOT / "configs" / "quickstart.yaml")


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 80), nn.ReLU(), nn.Linear(80, 10, bias=False))


def sparse_mlp(structure, sparsity=0.8):
    model = mlp()
    sp = RigL(model, None, total_steps=10, sparsity=sparsity, distribution="uniform", structure=structure,
              overrides={"0": "dense"})
    with torch.no_grad():                       # trained-looking weights: random, zero under the masks
        for n, p in model.named_parameters():
            p.normal_()
            if n in sp.masks:
                p.mul_(sp.masks[n])
    return model, sp.masks


@pytest.mark.parametrize("structure", ["fan_in", "unstructured", "2:4"])
@pytest.mark.parametrize("fmt", ["dense", "condensed", "csr"])
def test_every_format_computes_the_masked_dense_model(structure, fmt, tmp_path):
    model, masks = sparse_mlp(structure, 0.5 if structure == "2:4" else 0.8)
    ref = mlp()
    ref.load_state_dict(model.state_dict())
    out, replaced = convert(model, masks, fmt)
    if fmt == "dense":
        assert replaced == {}
    else:
        kind = CondensedLinear if fmt == "condensed" else CSRLinear
        assert set(replaced) == {"2", "4"} and all(isinstance(out.get_submodule(n), kind) for n in replaced)
        assert type(out.get_submodule("0")) is nn.Linear        # a dense layer stays as it is
    if fmt == "condensed":
        fan_in = {n: m.sum(1).max().item() for n, m in masks.items()}
        assert out.get_submodule("2").fan_in == fan_in["2.weight"]
        if structure == "fan_in":            # exactly the active weights: no padding
            assert out.get_submodule("2").values.numel() == int(masks["2.weight"].sum())
        else:                                # padded rows: distinct inputs, weight 0 where inactive
            c = out.get_submodule("2")
            assert bool((c.indices[:, 1:] > c.indices[:, :-1]).all())
            assert int(torch.count_nonzero(c.values)) <= int(masks["2.weight"].sum())
    path = save_exported(out, replaced, fmt, tmp_path / "m.safetensors")
    assert read_metadata(path)["format"] == fmt
    loaded = load_exported(mlp(seed=7), path)             # another init: every tensor comes from the file
    g = torch.Generator().manual_seed(0)
    for shape in [(1, 64), (7, 64), (2, 5, 64)]:
        x = torch.randn(*shape, generator=g)
        want = ref(x)
        torch.testing.assert_close(out(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["condensed", "csr"])
def test_a_transformer_layer_exports_and_attention_keeps_its_own_projection(fmt):
    """nn.MultiheadAttention reads out_proj.weight itself: that Linear subclass stays; the FFN's
    plain nn.Linear layers are replaced (the encoder layer inspects their .weight: offered dense, on
    demand), and the layer computes what the masked one does, in training mode (no fast path) and
    in inference mode."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True).eval()
    sp = Static(layer, None, total_steps=10, sparsity=0.75, distribution="uniform", structure="fan_in")
    ref = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True).eval()
    ref.load_state_dict(layer.state_dict())
    out, replaced = convert(layer, sp.masks, fmt)
    assert sorted(replaced) == ["linear1", "linear2"] and "self_attn.out_proj.weight" in sp.masks
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out.train()(x), ref.train()(x), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(out.eval()(x), ref.eval()(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(out.linear1.weight, ref.linear1.weight * sp.masks["linear1.weight"])


def gpt2_mlp(seed=0):
    """Hugging Face GPT-2's MLP layout: two Conv1D (weights stored (in, out)) around a GELU."""
    torch.manual_seed(seed)
    return nn.Sequential(Conv1D(96, 64), nn.GELU(), Conv1D(64, 96))


@pytest.mark.parametrize("structure,fmt", [("fan_in", "condensed"), ("fan_in", "csr"), ("unstructured", "condensed")])
def test_a_conv1d_exports_as_the_linear_of_its_transpose(structure, fmt, tmp_path):
    """A Conv1D becomes a CondensedLinear / CSRLinear of its transpose: one masked with fan_in (groups
    along its dim 0) condenses exactly to its fan-in; outputs equal the masked dense model's, also
    after loading the file into a fresh instance. semi_structured refuses it by name."""
    model = gpt2_mlp()
    sp = RigL(model, None, total_steps=10, sparsity=0.75, distribution="uniform", structure=structure)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.normal_()
            if n in sp.masks:
                p.mul_(sp.masks[n])
    ref = gpt2_mlp()
    ref.load_state_dict(model.state_dict())
    out, replaced = convert(model, sp.masks, fmt)
    assert sorted(replaced) == ["0", "2"]
    if fmt == "condensed":
        assert isinstance(out[0], CondensedLinear) and (out[0].in_features, out[0].out_features) == (64, 96)
        per_output = sp.masks["0.weight"].sum(0)              # (in, out): an output's active inputs, down dim 0
        assert out[0].fan_in == int(per_output.max())
        if structure == "fan_in":
            assert out[0].fan_in == 16 and bool((per_output == 16).all())
    path = save_exported(out, replaced, fmt, tmp_path / "m.safetensors")
    loaded = load_exported(gpt2_mlp(seed=3), path)
    with pytest.raises(ExportError, match=r"layer '0' is a Hugging Face Conv1D"):
        convert(gpt2_mlp(), sp.masks, "semi_structured")
    for shape in [(1, 64), (2, 5, 64)]:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(out(x), ref(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(x), ref(x), rtol=1e-5, atol=1e-5)


def test_dense_export_loads_into_torchvision_resnet50_strictly(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    sp = Static(model, None, total_steps=10, sparsity=0.9, distribution="erk")
    masks = {n: m.clone() for n, m in sp.masks.items()}
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
    out, replaced = convert(model, masks, "dense")
    path = save_exported(out, replaced, "dense", tmp_path / "rn50.safetensors")
    fresh = torchvision.models.resnet50()
    fresh.load_state_dict(load_file(str(path)), strict=True)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), want, rtol=1e-5, atol=1e-5)
    params = dict(fresh.named_parameters())
    for n, m in masks.items():
        assert torch.count_nonzero(params[n][~m]) == 0, n


def test_cli_exports_a_fan_in_run_in_every_cpu_format(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", QUICK, "train.epochs=2", "sparsity.delta=10", "logging.progress=false",
                 "checkpoint.every_steps=null", "checkpoint.at_end=true", "train.max_steps=12",
                 "sparsity.structure=fan_in", f"logging.run_dir={run}"]) == 0
    capsys.readouterr()
    from rigl_ds.checkpoint import list_checkpoints, load
    from rigl_ds.config import load_config
    from rigl_ds.train import build_experiment

    ckpt = list_checkpoints(run / "checkpoints")[-1]
    state = load(ckpt)

    def fresh():
        return build_experiment(load_config(run / "config.yaml"), with_data=False,
                                device=torch.device("cpu")).model.eval()

    ref = fresh()
    ref.load_state_dict(state["model"])
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(x)
    for fmt in ("dense", "condensed", "csr"):
        out = tmp_path / f"{fmt}.safetensors"
        assert main(["export", str(run), "--format", fmt, "--out", str(out), "--json"]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["checkpoint"] == str(ckpt) and summary["step"] == 12
        # small_cnn at 90% ERK: the first linear is replaced; the convs and the dense last linear stay
        assert sorted(summary["replaced"]) == ([] if fmt == "dense" else ["classifier.1"])
        model = load_exported(fresh(), out)
        with torch.no_grad():
            torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    dense = fresh()
    dense.load_state_dict(load_file(str(tmp_path / "dense.safetensors")), strict=True)
    # a checkpoint file in the run is a source too
    assert main(["export", str(ckpt), "--format", "condensed", "--out", str(tmp_path / "c2.safetensors")]) == 0
    assert "classifier.1 -> condensed:" in capsys.readouterr().out


def test_bad_exports_are_refused_by_name(tmp_path, capsys):
    model, masks = sparse_mlp("2:4", 0.5)
    if not torch.cuda.is_available():
        with pytest.raises(ExportError, match="format 'semi_structured' needs a CUDA GPU .* use --format condensed"):
            convert(model, masks, "semi_structured")
    with pytest.raises(ExportError, match="format must be one of dense, condensed, csr, semi_structured, got 'coo'"):
        convert(model, masks, "coo")
    with pytest.raises(ExportError, match="no such file or folder"):
        export(tmp_path / "nowhere", "dense", tmp_path / "o.safetensors")
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), "--format", "dense", "--out", str(tmp_path / "o")]) == 2
    assert "neither a run folder (with config.yaml) nor a checkpoint in <run>/checkpoints" in capsys.readouterr().err
    out, replaced = convert(model, masks, "condensed")
    path = save_exported(out, replaced, "condensed", tmp_path / "m.safetensors")
    other = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Conv1d(96, 80, 1), nn.ReLU(), nn.Linear(80, 10))
    with pytest.raises(ExportError, match="layer '2' is Conv1d in this model, the export replaced an nn.Linear"):
        load_exported(other, path)
    assert not (tmp_path / "o").exists()
    # a file whose indices point outside the layer (corrupt or hostile) is refused when loaded
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    good = dict(tensors)
    assert tensors["2.indices"].dtype == torch.int16          # 96 inputs: int16 indices
    tensors["2.indices"] = tensors["2.indices"].clone()
    tensors["2.indices"][0, 0] = 30000
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ExportError, match=r"layer '2': its indices \(torch.int16\) are not inputs 0..95 of the layer"):
        load_exported(mlp(), tmp_path / "bad.safetensors")
    # another width that would wrap to an in-range int16 when converted: refused by its values
    tensors["2.indices"] = good["2.indices"].to(torch.int64) + 2**16
    save_file(tensors, str(tmp_path / "wide.safetensors"), metadata=meta)
    with pytest.raises(ExportError, match=r"layer '2': its indices \(torch.int64\) are not inputs 0..95"):
        load_exported(mlp(), tmp_path / "wide.safetensors")
    # repeated indices in a row (in range): torch's CSR check refuses them
    tensors["2.indices"] = good["2.indices"].clone()
    tensors["2.indices"][0, 1] = tensors["2.indices"][0, 0]
    save_file(tensors, str(tmp_path / "dup.safetensors"), metadata=meta)
    with pytest.raises(ExportError, match=r"layer '2': not a valid sparse matrix"):
        load_exported(mlp(), tmp_path / "dup.safetensors")
    # an export made before int16 indices (int32, in range) still loads, with the same outputs
    tensors["2.indices"] = good["2.indices"].to(torch.int32)
    save_file(tensors, str(tmp_path / "int32.safetensors"), metadata=meta)
    old_file, new_file = load_exported(mlp(), tmp_path / "int32.safetensors"), load_exported(mlp(), path)
    assert old_file.get_submodule("2").indices.dtype == torch.int16
    x = torch.randn(3, 64)
    torch.testing.assert_close(old_file(x), new_file(x), rtol=0, atol=0)
