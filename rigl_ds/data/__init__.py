"""Input data behind one build function with one return type (:class:`Data`).

Sources (``data.name``): ``digits`` (scikit-learn's bundled 8x8 handwritten digits: real, offline),
``synthetic`` (ImageNet-shaped random images, deterministic per index), ``imagefolder`` (an
ImageNet-layout folder ``path/train/<class>/*`` and ``path/val/<class>/*``).

Loaders (``data.backend``) for an image folder: ``torchvision`` (PIL + DataLoader workers),
``dali-gpu`` (NVIDIA DALI, nvJPEG decoding and augmentation on the GPU), ``dali-cpu`` (DALI on CPU
threads), or ``synthetic`` (random images of the same shape: no files read). Every backend yields
``(images, labels)``: float32 images ``N x C x H x W`` and int64 labels.

Training order is a pure function of (seed, epoch): every rank draws the same permutation, and the
i-th micro-batch of rank r holds examples ``[(i*world + r)*batch, (i*world + r + 1)*batch)`` of it,
so a step's global batch is the same consecutive run of the permutation whatever the world size
(2 ranks x 16, or 1 process x 16 x 2 accumulated micro-batches: the same 32 examples), and a run
can start at any batch of an epoch (exact resume, also at another world size). The DALI backend
reads the same per-epoch order through its sharded file reader.
"""
from __future__ import annotations

import atexit
import math
import multiprocessing
import multiprocessing.util  # noqa: F401  (registers its exit handler now: ours must come after it)
import pathlib
import random
import signal
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from rigl_ds.config import DataSection

IMAGENET_TRAIN_SIZE = 1_281_167
IMAGENET_VAL_SIZE = 50_000
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(ValueError):
    """Bad or missing input data; the message names the path or setting."""


@dataclass(frozen=True)
class DataInfo:
    """What the schedule and the model need to know, without loading any data."""

    num_classes: int                  # classes, or the vocabulary of a language model
    input_shape: tuple[int, ...]      # one example: (C, H, W), or (seq_len,) token ids
    train_size: int
    val_size: int
    note: str = ""
    input_dtype: torch.dtype = torch.float32

    def sample(self, device: torch.device | str | None = None) -> torch.Tensor:
        """A batch of one example of zeros (for a FLOPs count; ``device="meta"`` allocates nothing)."""
        return torch.zeros((1, *self.input_shape), dtype=self.input_dtype, device=device)


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of one epoch for one rank: permutation seeded by (seed, epoch), rank slice, start batch."""

    def __init__(self, size: int, batch_size: int, *, seed: int, epoch: int, rank: int = 0, world: int = 1,
                 shuffle: bool = True, drop_last: bool = True, start_batch: int = 0) -> None:
        self.size, self.batch_size, self.seed, self.epoch = size, batch_size, seed, epoch
        self.rank, self.world, self.shuffle, self.drop_last, self.start_batch = rank, world, shuffle, drop_last, start_batch

    def _indices(self) -> list[int]:
        if self.shuffle:
            order = epoch_order(self.size, self.seed, self.epoch)
        else:
            order = list(range(self.size))
        if self.drop_last:
            return rank_indices(order, self.world, self.rank, self.batch_size)
        return order[self.rank::self.world]  # evaluation: every example exactly once over ranks

    def __iter__(self) -> Iterator[list[int]]:
        idx = self._indices()
        n = len(idx) // self.batch_size if self.drop_last else math.ceil(len(idx) / self.batch_size)
        for b in range(self.start_batch, n):
            yield idx[b * self.batch_size:(b + 1) * self.batch_size]

    def __len__(self) -> int:
        n = len(self._indices())
        total = n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
        return max(total - self.start_batch, 0)


class SyntheticImages(Dataset):
    """ImageNet-shaped random images; example i is the same on every call and every rank."""

    def __init__(self, size: int, num_classes: int, image_size: int, seed: int = 0) -> None:
        self.size, self.num_classes, self.image_size, self.seed = size, num_classes, image_size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        x = torch.randn(3, self.image_size, self.image_size, generator=g)
        return x, int(torch.randint(self.num_classes, (1,), generator=g))


def rank_indices(order: list[int], world: int, rank: int, batch_size: int, start_batch: int = 0) -> list[int]:
    """Rank ``rank``'s training examples of an epoch, micro-batch after micro-batch from ``start_batch``:
    its i-th micro-batch is ``order[(i*world + rank)*batch_size:][:batch_size]`` (the tail that does
    not fill a micro-batch on every rank is dropped)."""
    n = len(order) // (world * batch_size)
    return [j for i in range(start_batch, n)
            for j in order[(i * world + rank) * batch_size:(i * world + rank + 1) * batch_size]]


def epoch_order(size: int, seed: int, epoch: int) -> list[int]:
    """The global training permutation of one epoch (the same on every rank and every backend)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(size, generator=g).tolist()


@dataclass
class Data:
    """The one return type of :func:`build_data`: training and validation batches of one rank."""

    info: DataInfo
    batch_size: int
    eval_batch_size: int
    seed: int
    rank: int
    world: int

    def batches_per_epoch(self) -> int:
        """Training micro-batches per epoch on each rank (drop_last)."""
        return (self.info.train_size // self.world) // self.batch_size

    def train_batches(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def val_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every validation example exactly once over all ranks (no drop, no padding)."""
        raise NotImplementedError


@dataclass
class LoaderData(Data):
    """Map-style datasets read through torch DataLoaders (digits, synthetic, torchvision)."""

    train_set: Dataset = None
    val_set: Dataset = None
    num_workers: int = 0

    def train_batches(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        sampler = EpochBatchSampler(len(self.train_set), self.batch_size, seed=self.seed, epoch=epoch,
                                    rank=self.rank, world=self.world, start_batch=start_batch)
        # the loader draws its workers' base seed from ``generator``, not from the global RNG: creating
        # one (every epoch, and mid-epoch on resume) must not move the RNG that the model trains with
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 1009 + self.rank)
        return _plain_errors(_loader(self.train_set, batch_sampler=sampler, num_workers=self.num_workers,
                                     persistent_workers=False, pin_memory=torch.cuda.is_available(), generator=gen))

    def val_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        sampler = EpochBatchSampler(len(self.val_set), self.eval_batch_size, seed=0, epoch=0, rank=self.rank,
                                    world=self.world, shuffle=False, drop_last=False)
        return _plain_errors(_loader(self.val_set, batch_sampler=sampler, num_workers=self.num_workers,
                                     generator=torch.Generator().manual_seed(self.rank)))


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGINT, SIGTERM and SIGUSR1: Ctrl-C reaches the terminal's whole process
    group and launchers signal whole process trees, but the rank itself must finish its step (reading
    batches) and checkpoint before it stops (rigl_ds.stop). Workers still end with their loader, or
    with the rank (they watch its process)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _loader(dataset: Dataset, **kwargs) -> DataLoader:
    """A DataLoader whose workers ignore stop signals (:func:`ignore_stop_signals`)."""
    if kwargs.get("num_workers"):
        _reap_at_exit()
    return DataLoader(dataset, worker_init_fn=ignore_stop_signals, **kwargs)


_REAPER: list[bool] = []


def _reap_at_exit() -> None:
    """Register (once) :func:`_kill_abandoned_workers` to run before multiprocessing's own exit
    handler (atexit runs handlers last-registered first; multiprocessing registered its own when
    imported, before this)."""
    if not _REAPER:
        atexit.register(_kill_abandoned_workers)
        _REAPER.append(True)


def _kill_abandoned_workers(grace: float = 2.0) -> None:
    """At interpreter exit: end the workers of loaders still open (an epoch cut short by an error or
    a stop, an iterator held by a traceback). multiprocessing's own exit handler, which runs next,
    sends every daemonic child SIGTERM and then waits for it: our workers ignore SIGTERM, so the
    process would never exit. Here daemonic children get SIGTERM as there, and those still alive
    after ``grace`` seconds (ours) get SIGKILL."""
    import time

    children = [p for p in multiprocessing.active_children() if p.daemon]
    if not children:
        return
    if hasattr(signal, "SIGCHLD"):      # torch's handler would raise on a worker ended by a signal
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for p in children:
        p.terminate()
    deadline = time.monotonic() + grace
    for p in children:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(timeout=10)


def _plain_errors(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``loader``; a DataError raised in a worker process keeps its own message only
    (DataLoader prefixes the worker's traceback)."""
    it = iter(loader)
    try:
        yield from it
    except DataError as e:
        last = str(e).strip().splitlines()[-1]
        raise DataError(last.removeprefix(f"{DataError.__module__}.DataError: ")) from None
    finally:       # the workers end now, not when the last reference to a traceback is dropped
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


# --------------------------------------------------------------------------------- sources

def _digits(val_fraction: float) -> tuple[TensorDataset, TensorDataset]:
    # importing scikit-learn can draw from Python's global RNG (rich, when installed, does at import):
    # the run's RNG state must not depend on whether this process imported it before (a second run)
    state = random.getstate()
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    random.setstate(state)

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    # a fixed split (random_state=0), independent of the training seed
    tr, te = train_test_split(list(range(len(y))), test_size=val_fraction, random_state=0, stratify=y.numpy())
    mean, std = X[tr].mean(), X[tr].std()
    X = (X - mean) / std
    return TensorDataset(X[tr], y[tr]), TensorDataset(X[te], y[te])


def source_of(cfg: DataSection) -> str:
    """Where the examples come from: 'digits', 'synthetic' or 'imagefolder' (``backend: synthetic``
    stands in for an image folder with random images of its shape)."""
    return "synthetic" if cfg.backend == "synthetic" and cfg.name == "imagefolder" else cfg.name


def _image_dirs(cfg: DataSection) -> tuple[pathlib.Path, pathlib.Path]:
    if not cfg.path:
        raise DataError("data.path: required to train on data.name='imagefolder' (set data.path=/path/to/imagenet "
                        "or the environment variable RIGL_DS_DATA; data.backend=synthetic needs no folder)")
    root = pathlib.Path(cfg.path)
    train, val = root / "train", root / "val"
    for d in (train, val):
        if not d.is_dir():
            raise DataError(f"data.path={cfg.path!r}: missing folder {d} (expected train/<class>/*.JPEG "
                            "and val/<class>/*.JPEG)")
    return train, val


class _CheckedLoader:
    """PIL loader that turns a corrupt or unreadable image into a DataError naming the file
    (not skipped: skipping would change the epoch's length and order)."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __call__(self, path: str):
        from PIL import Image

        try:
            with open(path, "rb") as f:
                img = Image.open(f)
                return img.convert("RGB")
        except Exception as e:      # PIL raises OSError, SyntaxError, ValueError... for broken files
            raise DataError(f"{self.source}: cannot decode image {path} ({type(e).__name__}: {e}); remove or "
                            "replace it") from None


def image_folder(cfg: DataSection, split_dir: pathlib.Path, transform=None):
    """torchvision ``ImageFolder`` over one split; a missing, empty or unreadable folder is a DataError,
    and so is a corrupt image when it is read."""
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(split_dir), transform=transform, loader=_CheckedLoader(f"data.path={cfg.path!r}"))
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"data.path={cfg.path!r}: {split_dir}: {e}") from None


def describe_data(cfg: DataSection) -> DataInfo:
    """Classes, input shape and sizes without building loaders (ImageNet's counts when the
    image folder is absent, so that ``plan`` works without the data)."""
    source = source_of(cfg)
    if source == "text":
        from .text import VOCAB, describe

        n_train, n_val, note = describe(cfg.corpus_bytes, cfg.seq_len, cfg.path)
        return DataInfo(VOCAB, (cfg.seq_len,), n_train, n_val, note=note, input_dtype=torch.long)
    if source == "digits":
        n = 1797
        val = math.ceil(n * cfg.val_fraction)
        return DataInfo(10, (1, 8, 8), n - val, val)
    if source == "synthetic":
        return DataInfo(cfg.num_classes or 1000, (3, cfg.image_size, cfg.image_size),
                        cfg.train_size or IMAGENET_TRAIN_SIZE, cfg.val_size or IMAGENET_VAL_SIZE)
    if not cfg.path or not (pathlib.Path(cfg.path) / "train").is_dir():
        where = f"{pathlib.Path(cfg.path) / 'train'} not found" if cfg.path else "data.path not set"
        return DataInfo(1000, (3, cfg.image_size, cfg.image_size), IMAGENET_TRAIN_SIZE, IMAGENET_VAL_SIZE,
                        note=f"{where}: ImageNet-1k sizes assumed")
    train, val = _image_dirs(cfg)
    tr, va = image_folder(cfg, train), image_folder(cfg, val)
    return DataInfo(len(tr.classes), (3, cfg.image_size, cfg.image_size), len(tr), len(va))


def build_data(cfg: DataSection, *, seed: int, rank: int = 0, world: int = 1,
               device: torch.device | None = None) -> Data:
    """Build the data named by ``cfg.name`` read by ``cfg.backend``; raises :class:`DataError`
    naming what is wrong. ``device`` is this rank's device (the DALI GPU pipeline runs on it)."""
    common = dict(batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size, seed=seed, rank=rank, world=world)
    source = source_of(cfg)
    if source == "digits":
        train_set, val_set = _digits(cfg.val_fraction)
        info = describe_data(cfg)
        assert len(train_set) == info.train_size and len(val_set) == info.val_size
        data: Data = LoaderData(info=info, train_set=train_set, val_set=val_set, num_workers=cfg.num_workers, **common)
    elif source == "text":
        from .text import splits

        try:
            train_set, val_set = splits(cfg.corpus_bytes, cfg.seq_len, cfg.path)
        except (ValueError, OSError) as e:
            raise DataError(str(e)) from None
        info = describe_data(cfg)
        assert len(train_set) == info.train_size and len(val_set) == info.val_size
        data = LoaderData(info=info, train_set=train_set, val_set=val_set, num_workers=cfg.num_workers, **common)
    elif source == "synthetic":
        info = describe_data(cfg)
        train_set = SyntheticImages(info.train_size, info.num_classes, cfg.image_size, seed=0)
        val_set = SyntheticImages(info.val_size, info.num_classes, cfg.image_size, seed=1)
        data = LoaderData(info=info, train_set=train_set, val_set=val_set, num_workers=cfg.num_workers, **common)
    elif source == "imagefolder" and cfg.backend in ("dali-gpu", "dali-cpu"):
        from rigl_ds.data.dali import DaliData

        train, val = _image_dirs(cfg)
        tr, va = image_folder(cfg, train), image_folder(cfg, val)
        info = DataInfo(len(tr.classes), (3, cfg.image_size, cfg.image_size), len(tr), len(va))
        data = DaliData(info=info, train_samples=tr.samples, val_samples=va.samples, image_size=cfg.image_size,
                        on_gpu=cfg.backend == "dali-gpu", num_threads=cfg.num_workers, device=device,
                        source=f"data.path={cfg.path!r}", **common)
    elif source == "imagefolder":
        train_set, val_set = _image_folders(cfg)
        info = DataInfo(len(train_set.classes), (3, cfg.image_size, cfg.image_size), len(train_set), len(val_set))
        data = LoaderData(info=info, train_set=train_set, val_set=val_set, num_workers=cfg.num_workers, **common)
    else:
        raise DataError(f"data.name={cfg.name!r}: allowed: digits, synthetic, imagefolder, text")
    if data.batches_per_epoch() == 0:
        raise DataError(
            f"data.batch_size={cfg.batch_size}: larger than the {info.train_size // world} training examples "
            f"per rank ({info.train_size} examples, {world} ranks)")
    return data


def _image_folders(cfg: DataSection):
    from torchvision import transforms

    train, val = _image_dirs(cfg)
    size = cfg.image_size
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose([transforms.RandomResizedCrop(size, scale=(0.08, 1.0)),
                                   transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize])
    val_tf = transforms.Compose([transforms.Resize(int(size * 256 / 224)), transforms.CenterCrop(size),
                                 transforms.ToTensor(), normalize])
    return image_folder(cfg, train, train_tf), image_folder(cfg, val, val_tf)
