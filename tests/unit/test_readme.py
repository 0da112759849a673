"""The README's plugin snippet is run as it is written."""
import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_plugin_snippet_runs_and_trains_sparse():
    block = next(b for b in python_blocks() if "rigl_ds.RigL(" in b)
    plugin_lines = [l for l in block.splitlines() if l.strip() and "# +" in l]
    assert len(plugin_lines) == 2, plugin_lines
    ns: dict = {}
    torch.manual_seed(0)
    exec(compile(block, str(README), "exec"), ns)
    model, rigl, X, y = ns["model"], ns["rigl"], ns["X"], ns["y"]
    params = dict(model.named_parameters())
    for name, mask in rigl.masks.items():
        assert int(mask.sum()) == rigl.nnz[name]
        assert torch.count_nonzero(params[name][~mask]) == 0
    masked = [params[n] for n in rigl.masks]
    active = sum(int(m.sum()) for m in rigl.masks.values()) / sum(p.numel() for p in masked)
    assert abs(active - 0.1) < 1e-3                                   # counted here, from the masks
    assert rigl.measure().mask_density == active
    assert rigl.measure().nonzero_density == sum(int(p.count_nonzero()) for p in masked) / sum(p.numel() for p in masked)
    assert rigl.last_update is not None           # masks were updated during the run
    with torch.no_grad():
        pred = model(torch.tensor(X, dtype=torch.float32) / 16).argmax(1)
    acc = (pred == torch.tensor(y)).float().mean().item()
    assert acc > 0.9, acc                          # 90% sparse MLP still learns digits


def test_readme_knobs_table_lists_every_declared_knob_and_the_yaml_schema_has_them_all():
    """Each sparsity knob is declared once (core SparsityConfig); the YAML section is generated from it
    and README's knobs table names exactly those knobs."""
    import dataclasses

    from rigl_ds.config import SparsitySection
    from rigl_ds.core import SparsityConfig

    declared = [f.name for f in dataclasses.fields(SparsityConfig)]
    assert list(SparsitySection.model_fields) == declared
    text = README.read_text()
    table = text[text.index("### Knobs"):].split("\n### ")[0]
    named = []
    for row in table.splitlines()[4:]:
        if row.startswith("| `"):
            named += re.findall(r"`([a-z_]+)`", row.split("|")[1])
    assert sorted(named) == sorted(declared)
    for f in dataclasses.fields(SparsityConfig):       # the YAML default is the core's (seed: train.seed)
        yaml_default = SparsitySection.model_fields[f.name].get_default(call_default_factory=True)
        core_default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        want = {"seed": None, "include": [], "exclude": []}.get(f.name, core_default)
        assert yaml_default == want, f.name
