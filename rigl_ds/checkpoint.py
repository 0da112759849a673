"""Atomic, verified checkpoints.

``step_XXXXXXXX.pt`` is written to a temporary name in the same folder, fsynced and renamed; then
its SHA-256 and size go to ``step_XXXXXXXX.pt.sha256`` (also written atomically). A checkpoint
without that file (killed between the two renames), with another size or another hash (truncated,
corrupted) is refused by :func:`load` with a message naming the file; ``resume=auto`` then falls
back to the newest good one. Rotation deletes old checkpoints only after the new one has been
read back and verified, so the only good checkpoint is never deleted.

Loading never runs code from the file. A checksum proves a file is the one written, not that its
writer was benign, so every pickle is restricted to tensors, plain data and a short list of named
classes: rigl_ds files load with ``torch.load(weights_only=True)``; DeepSpeed's files (which
DeepSpeed itself loads with ``weights_only=False``) and DCP's metadata (plain ``pickle``) are first
scanned for the globals their pickles name, and any global outside :data:`DEEPSPEED_GLOBALS` /
:data:`DCP_GLOBALS` refuses the whole checkpoint; DCP's non-tensor items load with
``weights_only=True`` (:class:`SafeLoadPlanner`).
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import pathlib
import pickle
import random
import re
from typing import Any, BinaryIO

import numpy as np
import torch

from rigl_ds import faults

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d{8,})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) global RNG states."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuplify(state["python"]))
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def _fsync_dir(d: pathlib.Path) -> None:
    dir_fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            faults.point("checkpoint_write")
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def checksum_path(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(path.name + ".sha256")


def save_atomic(obj: dict[str, Any], path: pathlib.Path) -> None:
    """Write ``obj`` to ``path`` so that ``path`` is either absent, the old file, or complete,
    then its checksum file. A failure (full disk, ...) removes the temporary file and re-raises;
    nothing that existed before is touched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getbuffer()
    digest = hashlib.sha256(data).hexdigest()
    _write_atomic(path, data)
    _write_atomic(checksum_path(path), f"{digest}  {len(data)}\n".encode())
    _fsync_dir(path.parent)


def _expected(path: pathlib.Path) -> tuple[str, int]:
    side = checksum_path(path)
    try:
        digest, size = side.read_text().split()
        return digest, int(size)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no checksum file {side.name} (the write was "
                              "interrupted before it completed)") from None
    except (ValueError, OSError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable checksum file {side.name} ({e})") from None


def verify(path: pathlib.Path) -> bytes:
    """The checkpoint's bytes, or :class:`CheckpointError` if missing, truncated or corrupted."""
    digest, size = _expected(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({e})") from None
    if len(data) != size:
        raise CheckpointError(f"checkpoint {path} is truncated or damaged: {len(data)} bytes, "
                              f"{checksum_path(path).name} records {size}")
    if hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(f"checkpoint {path} is corrupted: its SHA-256 differs from "
                              f"{checksum_path(path).name}")
    return data


def checkpoint_path(ckpt_dir: pathlib.Path, step: int) -> pathlib.Path:
    return ckpt_dir / f"step_{step:08d}.pt"


def list_checkpoints(ckpt_dir: pathlib.Path) -> list[pathlib.Path]:
    """Checkpoints of a run, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


_REFUSED = ("refused: loading it could run code. rigl_ds checkpoints hold tensors and plain data only (see "
            "README, 'What a checkpoint may contain')")


def _weights_only_reason(e: Exception) -> str:
    """What ``torch.load(weights_only=True)`` refused, in one line (e.g. "GLOBAL builtins.exec")."""
    m = re.search(r"Unsupported global[^:]*:\s*([^\n]+?)\s*(?:was not an allowed|$)", str(e), re.M)
    if m:
        return m.group(1).strip()
    m = re.search(r"Unsupported operand \S+", str(e))
    return f"not a torch checkpoint: pickle {m.group(0)}" if m else str(e).strip().splitlines()[0]


def load(path: pathlib.Path) -> dict[str, Any]:
    """Verify and load a checkpoint (tensors and plain data only), or raise :class:`CheckpointError`
    naming the file."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    data = verify(path)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):           # it names a global outside tensors and plain data
            raise CheckpointError(f"checkpoint {path} holds an object other than tensors and plain data "
                                  f"({_weights_only_reason(e)}); {_REFUSED}") from None
        raise CheckpointError(f"checkpoint {path} cannot be read ({_weights_only_reason(e)})") from None
    except Exception as e:  # a file that matches its checksum but is not a torch checkpoint
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or "step" not in obj or "model" not in obj:
        raise CheckpointError(f"checkpoint {path} is not a rigl_ds checkpoint")
    return obj


def rotate(ckpt_dir: pathlib.Path, keep_last: int, newest: pathlib.Path) -> None:
    """After ``newest`` was written: verify it, then delete all but the newest ``keep_last``
    checkpoints, and temporary files left by killed writers. If ``newest`` does not verify,
    nothing is deleted and the error is raised."""
    verify(newest)
    for path in list_checkpoints(ckpt_dir)[:-keep_last]:
        if path == newest:
            continue
        checksum_path(path).unlink(missing_ok=True)
        path.unlink(missing_ok=True)
    for tmp in ckpt_dir.glob(".step_*.tmp-*"):
        if not tmp.name.endswith(f".tmp-{os.getpid()}"):
            tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- checkpoint folders

MANIFEST = "complete"


def _sha256_file(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def folder_files(folder: pathlib.Path) -> list[str]:
    """The files of a checkpoint folder (relative names), the manifest left out."""
    return [str(p.relative_to(folder)) for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST]


def hash_files(folder: pathlib.Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of each named file of ``folder`` (one read of each)."""
    return {n: {"size": (folder / n).stat().st_size, "sha256": _sha256_file(folder / n)} for n in names}


def write_manifest(folder: pathlib.Path, files: dict[str, dict[str, Any]] | None = None) -> None:
    """Mark a checkpoint folder complete: a JSON manifest of every file's size and SHA-256, hashed
    here, or ``files`` as hashed by the ranks that wrote them (which must name every file)."""
    import json

    if files is None:
        files = hash_files(folder, folder_files(folder))
    else:
        missing = sorted(set(folder_files(folder)) - set(files))
        if missing:
            raise CheckpointError(f"checkpoint {folder}: no rank hashed {missing}")
        files = dict(sorted(files.items()))
    faults.point("checkpoint_write")
    _write_atomic(folder / MANIFEST, json.dumps({"files": files}, indent=1).encode())
    _fsync_dir(folder)


def list_folders(ckpt_dir: pathlib.Path) -> list[pathlib.Path]:
    """Checkpoint folders (DeepSpeed, FSDP2) of a run that carry their manifest, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((p for p in ckpt_dir.glob("step_*") if p.is_dir() and (p / MANIFEST).is_file()),
                  key=lambda p: p.name)


def rotate_folders(ckpt_dir: pathlib.Path, keep_last: int, newest: pathlib.Path, *, verify: bool = True) -> None:
    """After ``newest`` got its manifest: verify it (unless the caller just did), then delete all but
    the newest ``keep_last`` complete folders (never ``newest``). If ``newest`` does not verify,
    nothing is deleted."""
    import shutil

    if verify:
        verify_folder(newest)
    for old in list_folders(ckpt_dir)[:-keep_last]:
        if old.name != newest.name:
            shutil.rmtree(old, ignore_errors=True)


def verify_folder(folder: pathlib.Path, which=None) -> None:
    """Raise :class:`CheckpointError` naming the file unless every file of the manifest (or those for
    which ``which(name)`` is true) is intact."""
    import json

    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {folder} is not complete (no {MANIFEST} manifest: the save "
                              "was interrupted)") from None
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"checkpoint {folder}: unreadable manifest {MANIFEST} ({e})") from None
    for rel, want in files.items():
        if which is not None and not which(rel):
            continue
        p = folder / rel
        if not p.is_file():
            raise CheckpointError(f"checkpoint {folder}: {rel} is missing")
        if p.stat().st_size != want["size"]:
            raise CheckpointError(f"checkpoint {folder}: {rel} is truncated or damaged "
                                  f"({p.stat().st_size} bytes, the manifest records {want['size']})")
        if _sha256_file(p) != want["sha256"]:
            raise CheckpointError(f"checkpoint {folder}: {rel} is corrupted (SHA-256 differs from the manifest)")


# --------------------------------------------------------------------------- other libraries' pickles

#: Classes a DeepSpeed ZeRO 0-3 checkpoint names besides tensors and plain data (seen in fp32, bf16
#: and fp16 optimizer states); DeepSpeed loads its files with ``weights_only=False``, so each file is
#: scanned for the globals its pickle names first.
DEEPSPEED_GLOBALS = frozenset({
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
})


def check_deepspeed_folder(folder: pathlib.Path) -> None:
    """Refuse a DeepSpeed checkpoint folder any of whose pickles names a global outside tensors,
    plain data and :data:`DEEPSPEED_GLOBALS` (before DeepSpeed unpickles them)."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    for f in sorted(folder.glob("*.pt")):
        try:
            found = set(get_unsafe_globals_in_checkpoint(f))
        except Exception as e:
            raise CheckpointError(f"checkpoint {folder}: {f.name} cannot be read ({type(e).__name__}: {e})") from None
        bad = sorted(found - DEEPSPEED_GLOBALS)
        if bad:
            raise CheckpointError(f"checkpoint {folder}: {f.name} names {', '.join(bad)}; {_REFUSED}")


#: What the pickled metadata of a torch.distributed.checkpoint (DCP) folder may name: DCP's own
#: metadata classes, torch dtypes, ``torch.Size``, the layout decoder and file paths.
DCP_GLOBALS = frozenset({
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
})
_DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in DCP_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        if module == _DCP_METADATA_MODULE:
            import torch.distributed.checkpoint.metadata as md

            if isinstance(getattr(md, name, None), (type, dict)):
                return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def check_dcp_folder(folder: pathlib.Path) -> None:
    """Refuse a DCP folder whose ``.metadata`` pickle names anything outside :data:`DCP_GLOBALS`
    (``dcp.load`` reads it with plain ``pickle``); load it with :class:`SafeLoadPlanner`."""
    meta = folder / ".metadata"
    try:
        with open(meta, "rb") as f:
            _RestrictedUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {folder} has no .metadata (not a DCP checkpoint)") from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"checkpoint {folder}: .metadata: {e}; {_REFUSED}") from None
    except Exception as e:
        raise CheckpointError(f"checkpoint {folder}: .metadata cannot be read ({type(e).__name__}: {e})") from None


def load_dcp(state: dict[str, Any], folder: pathlib.Path, process_group=None) -> None:
    """``dcp.load(state, folder)`` in place, after :func:`check_dcp_folder`, with
    :class:`SafeLoadPlanner` (by the ranks of ``process_group``, default all); a refused item is a
    :class:`CheckpointError` naming the folder."""
    import torch.distributed.checkpoint as dcp

    check_dcp_folder(folder)
    try:
        dcp.load(state, checkpoint_id=str(folder), planner=safe_load_planner(), process_group=process_group)
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {folder}: {e}") from None
    except BaseException as e:          # DCP gathers the ranks' failures into one CheckpointException
        from torch.distributed.checkpoint.api import CheckpointException

        if _REFUSED in str(e):
            item = next(line for line in str(e).splitlines() if _REFUSED in line)
            raise CheckpointError(f"checkpoint {folder}: {item.split('CheckpointError: ', 1)[-1].strip()}") from None
        if isinstance(e, CheckpointException):
            raise CheckpointError(f"checkpoint {folder} does not fit this model/optimizer (another model?): "
                                  f"{str(e).strip().splitlines()[-1]}") from None
        raise


def safe_load_planner():
    """A DCP load planner whose non-tensor items load with ``weights_only=True`` (DCP's default
    planner unpickles them with ``weights_only=False``)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: BinaryIO) -> None:
            try:
                torch.load(value, weights_only=True)
            except pickle.UnpicklingError as e:
                raise CheckpointError(f"DCP item {read_item.dest_index.fqn!r} holds an object other than tensors "
                                      f"and plain data ({_weights_only_reason(e)}); {_REFUSED}") from None
            value.seek(0)
            super().load_bytes(read_item, value)

    return SafeLoadPlanner()
