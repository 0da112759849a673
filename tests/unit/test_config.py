import pathlib

import pytest

from rigl_ds.cli import main
from rigl_ds.config import ConfigError, load_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert any(p.name == "quickstart.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_yaml_validates(path):
    load_config(path)


def test_every_yaml_starts_with_the_command_that_runs_it():
    for path in CONFIGS:
        if path.name.startswith("_"):
            continue
        head = path.read_text().splitlines()[:3]
        assert head[0].startswith("#") and any("rigl-ds " in l or "launch/" in l for l in head), path


def test_broken_yaml_reports_every_error_with_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model: {name: vgg}\n"
        "sparsity: {sparsity: 1.0, delta: 0, method: magic, distributon: erk}\n"
        "optimizer: {lr: -1}\n"
        "trian: {epochs: 3}\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad, ["data.batch_size=0"])
    probs = e.value.problems
    expect = {
        "model.name": "allowed: small_cnn, mlp, resnet18, resnet50",
        "sparsity.sparsity": "less than 1",
        "sparsity.delta": "greater than or equal to 1",
        "sparsity.method": "'static', 'set', 'rigl', 'gmp', 'gap_cyclic', 'gap_parallel' or 'dense'",
        "sparsity.distributon": "unknown key (did you mean 'distribution'?); allowed keys here: method, sparsity, distribution",
        "optimizer.lr": "greater than 0",
        "trian": "unknown key",
    }
    assert len(probs) == len(expect) + 1
    for key, text in expect.items():
        line = next(p for p in probs if f": {key}:" in p)
        assert line.startswith(str(bad)) and text in line, line
    assert any(p.startswith("command-line override 'data.batch_size=0': data.batch_size:") for p in probs)


def test_an_unknown_section_set_on_the_command_line_blames_the_override_and_suggests_the_key():
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "quickstart.yaml", ["optimiser.lr=0.1", "train.epohcs=3"])
    probs = e.value.problems
    assert len(probs) == 2
    assert any(p.startswith("command-line override 'optimiser.lr=0.1': optimiser: unknown key "
                            "(did you mean 'optimizer'?); allowed keys here: name, model") for p in probs), probs
    assert any(p.startswith("command-line override 'train.epohcs=3': train.epohcs: unknown key "
                            "(did you mean 'epochs'?)") for p in probs), probs
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "quickstart.yaml", ["zzz=1"])
    assert "zzz: unknown key; allowed keys here" in e.value.problems[0]          # nothing near: no guess


@pytest.mark.parametrize("text,needle", [
    ("", "is empty"), ("- 1\n- 2\n", "expected a mapping"), ("model: [\n", "not valid YAML"),
    ("sparsity: {sparsity: -0.1}\n", "sparsity.sparsity"), ("sparsity: {t_end: 1.5}\n", "sparsity.t_end"),
    ("train: {epochs: .nan}\n", "train.epochs"), ("sparsity: {sparsity: '0.5x'}\n", "sparsity.sparsity"),
])
def test_bad_files_are_config_errors(tmp_path, text, needle):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_config(f)


def test_overrides_and_extends(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\nsparsity: {sparsity: 0.8, delta: 50}\ntrain: {epochs: 5}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nname: child\nsparsity: {distribution: uniform}\n")
    cfg = load_config(tmp_path / "child.yaml", ["train.epochs=7", "sparsity.overrides={fc: dense}"])
    assert cfg.name == "child" and cfg.sparsity.sparsity == 0.8 and cfg.sparsity.delta == 50
    assert cfg.sparsity.distribution == "uniform" and cfg.train.epochs == 7
    assert cfg.sparsity.overrides == {"fc": "dense"}
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(tmp_path / "child.yaml", ["train.epochs"])
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")


def test_validate_cli_exit_codes(tmp_path, capsys):
    good = ROOT / "configs" / "quickstart.yaml"
    bad = tmp_path / "bad.yaml"
    bad.write_text("sparsity: {delta: 0}\nfoo: 1\n")
    assert main(["validate", str(good)]) == 0
    assert main(["validate", str(good), str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"invalid: {bad}" in err and "sparsity.delta" in err and "foo: unknown key" in err


def test_an_error_inside_a_section_of_the_file_does_not_blame_an_unrelated_override(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"extends: {ROOT / 'configs' / 'quickstart.yaml'}\nsparsity:\n  grad_accumulation_n: 50\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad, ["sparsity.sparsity=0.8"])
    probs = e.value.problems
    assert len(probs) == 1 and probs[0].startswith(f"{bad}: sparsity"), probs


def test_gamma_sal_needs_rigl_with_fan_in_and_names_where_it_came_from():
    quick = ROOT / "configs" / "quickstart.yaml"
    cfg = load_config(quick, ["sparsity.structure=fan_in", "sparsity.gamma_sal=0.3"])
    assert cfg.sparsity.gamma_sal == 0.3 and cfg.sparsity.to_core(0).gamma_sal == 0.3
    assert load_config(quick).sparsity.gamma_sal is None                 # off by default
    with pytest.raises(ConfigError) as e:
        load_config(quick, ["sparsity.gamma_sal=0.3"])
    assert "sparsity" in e.value.problems[0] and "gamma_sal=0.3 (neuron ablation) needs method: rigl and structure: " \
        "fan_in, got method: rigl, structure: unstructured" in e.value.problems[0], e.value.problems
    with pytest.raises(ConfigError) as e:
        load_config(quick, ["sparsity.structure=fan_in", "sparsity.gamma_sal=0"])
    assert "command-line override 'sparsity.gamma_sal=0': sparsity.gamma_sal:" in e.value.problems[0] and \
        "greater than 0" in e.value.problems[0], e.value.problems
