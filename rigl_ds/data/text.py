"""An offline text corpus for language models: the Python standard library's own sources.

By default, the ``.py`` files directly in the running interpreter's standard-library folder
(``sysconfig.get_paths()["stdlib"]``: CPython 3.11 here), sorted by name, concatenated (each
followed by a newline) up to ``data.corpus_bytes``, read as bytes: the vocabulary is the 256 byte
values, so no tokenizer is needed. The first 90% is the training text, the rest the validation
text. ``data.path`` names a file to read instead (your corpus, as bytes). Example i of a split is its window ``[i*L, i*L + L + 1)`` (L = ``data.seq_len``): the input
is the first L bytes and the target the L bytes after each (next-byte prediction); windows do not
overlap, and the tail that does not fill one is dropped. Nothing is downloaded; the text differs
slightly between Python patch versions, so ``DataInfo.note`` names the version and size.
"""
from __future__ import annotations

import pathlib
import platform
import sysconfig

import torch
from torch.utils.data import Dataset

VOCAB = 256
VAL_FRACTION = 0.1


def corpus_bytes(limit: int, path: str | None = None) -> bytes:
    """The first ``limit`` bytes of the text file ``path`` (``data.path``: your own corpus, read as
    bytes), or of the standard library's sources (the same on every call)."""
    if path:
        try:
            with open(path, "rb") as f:
                text = f.read(limit)
        except OSError as e:
            raise ValueError(f"data.path={path!r}: cannot read the text corpus ({e})") from None
        if len(text) < limit:
            raise ValueError(f"data.path={path!r} holds {len(text)} bytes, fewer than data.corpus_bytes={limit}; "
                             "lower data.corpus_bytes")
        return text
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    out, size = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes() + b"\n"
        out.append(data)
        size += len(data)
        if size >= limit:
            break
    text = b"".join(out)[:limit]
    if len(text) < limit:
        raise ValueError(f"data.corpus_bytes={limit}: the standard library at {root} holds only {len(text)} bytes "
                         "of .py sources; lower data.corpus_bytes")
    return text


def describe(limit: int, seq_len: int, path: str | None = None) -> tuple[int, int, str]:
    """(training windows, validation windows, note) without reading the files."""
    n_val = int(limit * VAL_FRACTION)
    n_train = limit - n_val
    if (n_val - 1) // seq_len < 1:
        from . import DataError

        raise DataError(f"data.corpus_bytes={limit} leaves {n_val} bytes of validation text, less than one window of "
                        f"data.seq_len={seq_len} (+1); raise data.corpus_bytes or lower data.seq_len")
    what = f"{path}" if path else f"the Python {platform.python_version()} standard library's .py sources"
    note = f"text: {what}, first {limit} bytes, byte-level (vocabulary 256), windows of {seq_len}"
    return (n_train - 1) // seq_len, (n_val - 1) // seq_len, note


class Windows(Dataset):
    """Non-overlapping next-byte windows of one split: (input ``seq_len`` bytes, target shifted by one)."""

    def __init__(self, text: torch.Tensor, seq_len: int) -> None:
        self.text, self.seq_len = text, seq_len

    def __len__(self) -> int:
        return (self.text.numel() - 1) // self.seq_len

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.text[i * self.seq_len:(i + 1) * self.seq_len + 1]
        return chunk[:-1], chunk[1:]


def splits(limit: int, seq_len: int, path: str | None = None) -> tuple[Windows, Windows]:
    text = torch.frombuffer(bytearray(corpus_bytes(limit, path)), dtype=torch.uint8).to(torch.long)
    n_val = int(limit * VAL_FRACTION)
    return Windows(text[:limit - n_val], seq_len), Windows(text[limit - n_val:], seq_len)
