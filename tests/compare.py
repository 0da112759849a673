"""One comparison of two runs for every engine's checkpoint format (single file, DeepSpeed folder, DCP
folder): everything a checkpoint holds must be equal — weights, masks, every optimizer state tensor
(every rank's shard for DeepSpeed), LR and param groups, LR-scheduler state, step, data position,
sparsifier state (generator, accumulated scores, last update), RNG states and the logging window —
except what names the run itself (its config: run directory) or the wall clock."""
from __future__ import annotations

import math
import pathlib
from typing import Any

import torch

# keys that differ between two runs of the same experiment without anything being wrong
RUN_SPECIFIC = {"config", "time", "ds_config"}


def _ds_folder(tag: pathlib.Path) -> dict[str, Any]:
    files = sorted(tag.glob("*.pt"))
    assert files, f"no DeepSpeed files in {tag}"
    return {p.name: torch.load(p, map_location="cpu", weights_only=False) for p in files}


def _dcp_folder(tag: pathlib.Path) -> dict[str, Any]:
    """The DCP folder assembled whole (whatever world size wrote it) + its rigl_ds.pt."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from rigl_ds.checkpoint import load

    with tempfile.TemporaryDirectory() as d:
        out = pathlib.Path(d) / "whole.pt"
        dcp_to_torch_save(tag, out)
        tensors = torch.load(out, weights_only=False)
    return dict(tensors, rigl_ds=load(tag / "rigl_ds.pt"))


def checkpoint(run: pathlib.Path, step: int) -> dict[str, Any]:
    """Everything the checkpoint of ``step`` in ``run`` holds, verified first (any engine's format)."""
    from rigl_ds import checkpoint as ckpt

    base = run / "checkpoints" / f"step_{step:08d}"
    if base.is_dir():
        ckpt.verify_folder(base)
        return _dcp_folder(base) if (base / "rigl_ds.pt").is_file() else _ds_folder(base)
    return ckpt.load(base.with_suffix(".pt"))


def model_and_masks(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(model weights, masks) of a :func:`checkpoint` (DeepSpeed: rank 0's module, ZeRO 0-2)."""
    if "rigl_ds" in state and "masks" in state:                          # DCP
        return state["model"], state["masks"]
    if "model" in state:                                                  # single file
        return state["model"], state["sparsifier"]["masks"]
    main = next(v for k, v in state.items() if k.endswith("mp_rank_00_model_states.pt") and "module" in v)
    return main["module"], main["rigl_ds"]["sparsifier"]["masks"]


def counted_density(state: dict[str, Any]) -> tuple[float, float]:
    """(active mask entries, nonzero weights) / weights over the masked layers, counted here from the
    saved tensors: the independent reference for what a run reports."""
    model, masks = model_and_masks(state)
    numel = sum(m.numel() for m in masks.values())
    active = sum(int(m.sum()) for m in masks.values())
    nonzero = sum(int(torch.count_nonzero(model[n])) for n in masks)
    return active / numel, nonzero / numel


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Exact equality of two nested checkpoint objects (tensors bit for bit, dtypes included)."""
    if isinstance(a, dict):
        assert isinstance(b, dict), path
        keys = set(a) - RUN_SPECIFIC
        assert keys == set(b) - RUN_SPECIFIC, f"{path}: keys {sorted(map(str, keys ^ (set(b) - RUN_SPECIFIC)))}"
        for k in keys:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif path.endswith(".log_window") and torch.is_tensor(a) and torch.is_tensor(b) and a.shape != b.shape:
        # each rank's logging window (world x 4 rows): saved at another world size, rank 0 holds the
        # totals; what is logged next is the sum over the ranks (float32 sums, hence the tolerance)
        torch.testing.assert_close(a.sum(0), b.sum(0), rtol=1e-6, atol=0, msg=path)
    elif torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path}: tensors differ"
    elif type(a).__eq__ is object.__eq__ and hasattr(a, "__dict__"):    # e.g. DeepSpeed's loss scaler
        assert type(a) is type(b), path
        assert_same(vars(a), vars(b), f"{path}<{type(a).__name__}>")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def scalars(tb: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    ea.Reload()
    return {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}


def assert_same_scalars(a: pathlib.Path, b: pathlib.Path, evaluated_at: tuple[int, ...] = ()) -> None:
    """The same TensorBoard scalars (wall-clock throughput aside), no step logged twice in ``b``.
    ``evaluated_at``: steps where ``b`` stopped at ``train.max_steps`` and so also logged an evaluation."""
    ta, tb = scalars(a), scalars(b)
    for tag in tb:
        if tag.startswith("eval/"):
            assert all(s in {x for x, _ in tb[tag]} for s in evaluated_at), tag
            tb[tag] = [(s, v) for s, v in tb[tag] if s not in evaluated_at]
    assert set(ta) == set(tb)
    for tag in ta:
        steps = [s for s, _ in tb[tag]]
        assert len(steps) == len(set(steps)), f"{tag}: duplicate steps {steps}"
        if tag != "train/img_per_s":                                      # wall-clock dependent
            assert ta[tag] == tb[tag], tag


def assert_same_run(a: pathlib.Path, b: pathlib.Path, step: int, *, tensorboard: bool = True,
                    evaluated_at: tuple[int, ...] = ()) -> dict[str, Any]:
    """Runs ``a`` and ``b`` hold identical checkpoints at ``step`` (and TensorBoard scalars); returns a's."""
    sa = checkpoint(a, step)
    assert_same(sa, checkpoint(b, step))
    if tensorboard:
        assert_same_scalars(a / "tb", b / "tb", evaluated_at)
    return sa
