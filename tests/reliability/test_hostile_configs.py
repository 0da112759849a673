"""Hostile configurations and inputs: every one is accepted or refused with the project's own error
naming where the value came from (file or command-line override) and the key; never a traceback
from deep inside."""
import json
import os
import pathlib

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from rigl_ds.config import ConfigError, ExperimentConfig, load_config
from rigl_ds.data import DataError
from rigl_ds.plan import make_plan
from rigl_ds.train import RunError, build_experiment

ROOT = pathlib.Path(__file__).resolve().parents[2]
SECTIONS = {name: list(f.annotation.model_fields) for name, f in ExperimentConfig.model_fields.items()
            if hasattr(f.annotation, "model_fields")}
KEYS = [f"{s}.{k}" for s, ks in SECTIONS.items() for k in ks] + ["name", "resume", "extends"]
PROJECT_ERRORS = (ConfigError, DataError, RunError)

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**12), st.text(max_size=12),
                    st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from(["rigl", "erk", "dense", "sgd", "cosine", "resnet18", "mlp", "0.5", "1e9",
                                     "digits", "synthetic", "imagefolder", "deepspeed", "ddp", "local", "auto",
                                     "fsdp2", "sharded", "gather", "bf16", "fp16"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=3), max_leaves=6)
section = st.dictionaries(st.sampled_from(sum(SECTIONS.values(), []) + ["bogus"]), values, max_size=4)
documents = st.dictionaries(st.sampled_from(list(SECTIONS) + ["name", "resume", "junk"]),
                            st.one_of(section, values), max_size=5)
overrides = st.lists(st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS + ["a.b", "sparsity", ""]),
                               st.one_of(st.text(max_size=10), scalars.map(str))), max_size=3)


def check_error(e: ConfigError, path: pathlib.Path) -> None:
    assert e.problems
    for line in e.problems:
        assert line.startswith(str(path)) or line.startswith("command-line override") or \
            line.startswith("override "), line


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(doc=documents, items=overrides)
def test_random_documents_and_overrides_validate_or_raise_config_error(tmp_path, doc, items):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        cfg = load_config(path, items)
    except ConfigError as e:
        check_error(e, path)
        event("refused by validation")
        return
    # accepted: the plan (meta-device model, schedule, FLOPs) builds or is refused by a project error
    try:
        make_plan(cfg)
        event("accepted, planned")
    except PROJECT_ERRORS:
        event("accepted, plan refused")


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=80))
def test_random_text_as_yaml(tmp_path, text):
    path = tmp_path / "text.yaml"
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError as e:
        check_error(e, path)


QUICK = ROOT / "configs" / "quickstart.yaml"


@pytest.mark.parametrize("items,expect", [
    (["sparsity.sparsity=1"], "command-line override 'sparsity.sparsity=1': sparsity.sparsity: Input should be less "
                              "than 1"),
    (["sparsity.sparsity=-0.1"], "sparsity.sparsity: Input should be greater than or equal to 0"),
    (["sparsity.sparsity=.nan"], "sparsity.sparsity: Input should be a finite number"),
    (["optimizer.lr=-1"], "optimizer.lr: Input should be greater than 0"),
    (["optimizer.lr=.inf"], "optimizer.lr: Input should be a finite number"),
    (["data.batch_size=abc"], "data.batch_size: Input should be a valid integer"),
    (["train.epochs=[1, 2]"], "train.epochs: Input should be a valid number"),
    (["engine.name=horovod"], "engine.name: Input should be 'local', 'ddp', 'deepspeed' or 'fsdp2'"),
    (["sparsity.delta=0"], "sparsity.delta: Input should be greater than or equal to 1"),
    (["sparsity.t_end=1.5"], "sparsity.t_end: as a fraction of total steps must be in (0, 1]"),
    (["engine.name=deepspeed"], "engine.deepspeed_config: required for engine.name='deepspeed'"),
    (["engine.fsdp2_selection=topk"], "engine.fsdp2_selection: Input should be 'sharded' or 'gather'"),
    (["engine.name=fsdp2", "precision.dtype=fp16"], "precision.dtype: 'fp16' is not supported with "
                                                    "engine.name='fsdp2'"),
])
def test_bad_values_name_source_key_and_allowed(items, expect):
    with pytest.raises(ConfigError) as e:
        load_config(QUICK, items)
    assert expect in str(e.value)


@pytest.mark.parametrize("items,expect", [
    (["model.name=nonexistent.mod:f"], "command-line override 'model.name=nonexistent.mod:f': model.name="
                                       "'nonexistent.mod:f', model.kwargs={}: cannot build the model: ValueError"),
    (["model.name=os:getcwd"], "cannot build the model: TypeError: posix.getcwd() takes no keyword arguments"),
    (["model.kwargs={depth: 3}"], "command-line override 'model.kwargs={depth: 3}': model.name='small_cnn', "
                                  "model.kwargs={'depth': 3}: cannot build the model: TypeError"),
    (["model.kwargs={width: -1}"], "model.kwargs={'width': -1}: cannot build the model: RuntimeError"),
    (["sparsity.include=[zzz]"], "command-line override 'sparsity.include=[zzz]': sparsity: include patterns "
                                 "['zzz'] match no module"),
    (["sparsity.overrides={zz: 0.5}"], "sparsity: overrides['zz'] matches no masked layer"),
])
def test_model_and_layer_selection_errors_in_plan_and_train(tmp_path, items, expect):
    cfg = load_config(QUICK, [*items, f"logging.run_dir={tmp_path}"])
    with pytest.raises(ConfigError) as e:
        make_plan(cfg)
    assert expect in str(e.value)
    from rigl_ds.train import Trainer

    with pytest.raises(ConfigError) as e:
        Trainer(cfg)
    assert expect in str(e.value)
    assert not any(tmp_path.iterdir())          # nothing written


def test_empty_and_non_mapping_files(tmp_path):
    for text, expect in (("", "the file is empty"), ("- a\n- b\n", "expected a mapping of sections at the top, got list"),
                         ("a: [1,\n", "not valid YAML")):
        p = tmp_path / "f.yaml"
        p.write_text(text)
        with pytest.raises(ConfigError, match=expect) as e:
            load_config(p)
        assert str(p) in str(e.value)


def test_run_length_checks_name_the_override():
    for items, expect in (
            (["sparsity.delta=5000"], "command-line override 'sparsity.delta=5000': sparsity.delta=5000: no mask "
                                      "update before T_end=990 (training has 1320 steps)"),
            (["sparsity.t_end=2000"], "command-line override 'sparsity.t_end=2000': sparsity.t_end=2000: after the "
                                      "end of training (1320 steps)")):
        with pytest.raises(ConfigError) as e:
            build_experiment(load_config(QUICK, items), with_data=False, meta=True)
        assert expect in str(e.value)
    # sparsity 0 is accepted: every layer dense, RigL has nothing to drop
    plan = make_plan(load_config(QUICK, ["sparsity.sparsity=0"]))
    assert plan["global_density"] == 1.0


def test_deepspeed_json_disagreeing_with_the_yaml(tmp_path):
    from rigl_ds.engines import EngineError
    from rigl_ds.engines.deepspeed import deepspeed_config

    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 64, "gradient_accumulation_steps": 2,
                               "bf16": {"enabled": True}}))
    with pytest.raises(EngineError) as e:
        deepspeed_config(str(bad), micro_batch=32, grad_accumulation=1, world=2, dtype="fp32")
    msg = str(e.value)
    assert f"{bad}: train_micro_batch_size_per_gpu=64 but the YAML gives 32" in msg
    assert "gradient_accumulation_steps=2 but the YAML gives 1" in msg and "bf16.enabled=True but precision.dtype='fp32'" in msg
    bad.write_text("{not json")
    with pytest.raises(EngineError, match=f"{bad} is not valid JSON"):
        deepspeed_config(str(bad), micro_batch=32, grad_accumulation=1, world=2, dtype="fp32")
    # gradient clipping: the YAML's train.clip_grad_norm fills the JSON; a JSON value that differs is refused
    shipped = pathlib.Path(__file__).parents[2] / "ds_configs" / "zero2_fp32.json"
    for clip, want in ((None, 0.0), (1.5, 1.5)):
        got = deepspeed_config(str(shipped), micro_batch=32, grad_accumulation=1, world=2, dtype="fp32",
                               clip_grad_norm=clip)
        assert got["gradient_clipping"] == want
    bad.write_text(json.dumps({"gradient_clipping": 1.0}))
    with pytest.raises(EngineError) as e:
        deepspeed_config(str(bad), micro_batch=32, grad_accumulation=1, world=2, dtype="fp32", clip_grad_norm=2.0)
    assert f"{bad}: gradient_clipping=1.0 but train.clip_grad_norm=2.0" in str(e.value)
    # P-GaP: merged copies average the gradients on the accelerator, so optimizer offload is refused
    offload = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    bad.write_text(json.dumps(offload))
    with pytest.raises(EngineError) as e:
        deepspeed_config(str(bad), micro_batch=32, grad_accumulation=1, world=1, dtype="fp32", copies=2)
    assert f"{bad}: zero_optimization.offload_optimizer.device='cpu' is not supported with " \
           "sparsity.method=gap_parallel" in str(e.value) and "use 'none'" in str(e.value)
    got = deepspeed_config(str(bad), micro_batch=32, grad_accumulation=1, world=2, dtype="fp32")   # without copies
    assert got["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}


@pytest.mark.parametrize("backend", ["torchvision", "dali-cpu"])
def test_empty_unreadable_and_corrupt_image_folders(tmp_path, monkeypatch, backend):
    from rigl_ds.config import DataSection
    from rigl_ds.data import build_data
    from rigl_ds.data.testing import make_image_folder

    if backend == "dali-cpu":
        pytest.importorskip("nvidia.dali")
    cfg = lambda p: DataSection(name="imagefolder", backend=backend, path=str(p), image_size=32, batch_size=2,
                                num_workers=1)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    with pytest.raises(DataError, match=r"data.path='.*empty'.*train: Couldn't find any class folder"):
        build_data(cfg(tmp_path / "empty"), seed=0)
    with pytest.raises(DataError, match=r"missing folder .*nowhere/train"):
        build_data(cfg(tmp_path / "nowhere"), seed=0)
    good = make_image_folder(tmp_path / "img", classes=2, train_per_class=4, val_per_class=2)
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda p=".": (_ for _ in ()).throw(PermissionError(13, "Permission denied", p))
                        if str(p).endswith("train") else real_scandir(p))
    with pytest.raises(DataError, match=r"data.path='.*img'.*Permission denied"):
        build_data(cfg(good), seed=0)
    monkeypatch.setattr(os, "scandir", real_scandir)
    broken = sorted((good / "train").glob("*/*.JPEG"))[5]
    broken.write_bytes(broken.read_bytes()[:300])          # a truncated JPEG
    data = build_data(cfg(good), seed=0)
    with pytest.raises(DataError, match=rf"cannot decode image {broken}|could not decode an image: {broken}"):
        for epoch in range(3):
            for _ in data.train_batches(epoch):
                pass
