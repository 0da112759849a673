"""Native CPU kernels, built on first use with ``torch.utils.cpp_extension`` (as DeepSpeed builds its
ops): a C++ compiler and ninja (a DeepSpeed dependency) are needed then, once per machine; the
build is cached under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``).

Without a compiler, or with ``RIGL_DS_KERNELS=0``, :func:`condensed_kernel` returns ``None`` and
the caller falls back to a stock torch kernel (logged once).
"""
from __future__ import annotations

import logging
import os
import pathlib
import threading
from typing import Any

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_state: dict[str, Any] = {}


def kernels_enabled() -> bool:
    """False when the environment says ``RIGL_DS_KERNELS=0`` (stock torch kernels only)."""
    return os.environ.get("RIGL_DS_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def condensed_kernel() -> Any | None:
    """The compiled ``condensed_linear(x, values, indices, bias)`` op (see condensed.cpp), or ``None``
    when kernels are disabled or the build failed (the reason is logged once). Decided at the first
    call (``RIGL_DS_KERNELS`` is read then); later calls return the same answer at no cost."""
    if "condensed" not in _state:
        with _lock:
            if "condensed" not in _state:
                _state["condensed"] = _build() if kernels_enabled() else None
    return _state["condensed"]


def _build() -> Any | None:
    source = pathlib.Path(__file__).with_name("condensed.cpp")
    quiet = logging.getLogger("torch.utils.cpp_extension")    # its "No CUDA runtime" notice: CPU code here
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension

        module = cpp_extension.load(name="rigl_ds_condensed", sources=[str(source)],
                                    extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:          # no compiler, no ninja, a failed build: the stock kernel still works
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        logger.warning("rigl_ds: the condensed CPU kernel could not be built (%s); condensed layers use torch's "
                       "CSR kernel instead (set RIGL_DS_KERNELS=0 to skip the build)", first)
        return None
    finally:
        quiet.setLevel(level)
    return module.condensed_linear
