"""NVIDIA DALI input pipelines for an ImageNet-layout folder (``data.backend: dali-gpu | dali-cpu``).

Training: DALI's sharded file reader (shard id = global rank, number of shards = world size) over
the epoch's global permutation (:func:`rigl_ds.data.epoch_order`, the same order as the
torchvision backend, so a run can resume at any batch), fused decode + random-resized-crop (area
0.08-1, aspect 3/4-4/3; nvJPEG via the ``mixed`` decoder on the GPU, or CPU decoding), resize,
random mirror, normalisation, channels-last output.
Validation: resize the shorter side to 256/224 of the crop, center crop, every image exactly once
over the ranks (padded shards, the padding trimmed by the iterator: no image dropped or repeated).

The pipelines run on the GPU of the rank's LOCAL index (``device``); ``dali-cpu`` runs without one
(``device_id=None``). Augmentation randomness is seeded by (seed, epoch, rank); on resume in the
middle of an epoch the data order is exact, the crops of the remaining batches are drawn afresh.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from rigl_ds.data import IMAGENET_MEAN, IMAGENET_STD, Data, DataError, epoch_order, rank_indices

READER = "Reader"


def import_dali():
    """(fn, types, pipeline_def, DALIGenericIterator, LastBatchPolicy), or a DataError naming the extra."""
    try:
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    except ImportError as e:
        raise DataError(f"data.backend=dali-*: NVIDIA DALI is not installed ({e}); install it with "
                        "`pip install -e .[dali]` (nvidia-dali-cuda130; for CUDA 12 drivers "
                        "`pip install nvidia-dali-cuda120`), or use data.backend=torchvision") from None
    return fn, types, pipeline_def, DALIGenericIterator, LastBatchPolicy


def _normalize_args(types) -> dict[str, Any]:
    return dict(dtype=types.FLOAT, output_layout="HWC",
                mean=[255 * m for m in IMAGENET_MEAN], std=[255 * s for s in IMAGENET_STD])


def train_pipeline(files: list[str], labels: list[int], *, shard_id: int, num_shards: int, size: int,
                   on_gpu: bool, batch_size: int, num_threads: int, device_id: int | None, seed: int):
    """The training pipeline over ``files`` (already in epoch order); outputs ("data", "label")."""
    fn, types, pipeline_def, _, _ = import_dali()

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed)
    def pipe():
        jpegs, label = fn.readers.file(files=files, labels=labels, shard_id=shard_id, num_shards=num_shards,
                                       random_shuffle=False, stick_to_shard=True, name=READER)
        images = fn.decoders.image_random_crop(jpegs, device="mixed" if on_gpu else "cpu", output_type=types.RGB,
                                               random_area=[0.08, 1.0], random_aspect_ratio=[0.75, 4.0 / 3.0],
                                               num_attempts=100)
        images = fn.resize(images, resize_x=size, resize_y=size)
        images = fn.crop_mirror_normalize(images, mirror=fn.random.coin_flip(probability=0.5),
                                          **_normalize_args(types))
        return images, (label.gpu() if on_gpu else label)

    return pipe()


def val_pipeline(files: list[str], labels: list[int], *, shard_id: int, num_shards: int, size: int,
                 on_gpu: bool, batch_size: int, num_threads: int, device_id: int | None):
    """The validation pipeline: resize shorter side to size*256/224, center crop, no randomness."""
    fn, types, pipeline_def, _, _ = import_dali()

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=0)
    def pipe():
        jpegs, label = fn.readers.file(files=files, labels=labels, shard_id=shard_id, num_shards=num_shards,
                                       random_shuffle=False, stick_to_shard=True, pad_last_batch=True,
                                       name=READER)
        images = fn.decoders.image(jpegs, device="mixed" if on_gpu else "cpu", output_type=types.RGB)
        images = fn.resize(images, resize_shorter=round(size * 256 / 224))
        images = fn.crop_mirror_normalize(images, crop=(size, size), **_normalize_args(types))
        return images, (label.gpu() if on_gpu else label)

    return pipe()


def undecodable(files: list[str]) -> list[tuple[str, str]]:
    """(file, reason) for each file PIL cannot decode (DALI's decoder errors do not name the file)."""
    from PIL import Image

    bad = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
        except Exception as e:      # PIL raises OSError, SyntaxError, ValueError... for broken files
            bad.append((f, f"{type(e).__name__}: {e}"))
    return bad


def _batches(iterator, files: list[str], batch_size: int, source: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """DALI's dict batches as the project's batch type: NCHW float images (channels-last memory),
    int64 labels. A decoding failure becomes a DataError naming the broken file(s) (found among the
    batches DALI was preparing)."""
    b = 0
    try:
        for out in iterator:
            d = out[0]
            yield d["data"].permute(0, 3, 1, 2), d["label"].view(-1).long()
            b += 1
    except RuntimeError as e:
        window = files[b * batch_size:(b + 4) * batch_size]      # this batch and DALI's prefetched ones
        bad = undecodable(window)
        named = "; ".join(f"{f} ({why})" for f, why in bad[:5]) or "not found by PIL among the next " \
            f"{len(window)} files: {str(e).splitlines()[0]}"
        raise DataError(f"{source}: DALI could not decode an image: {named}. Remove or replace the file "
                        "(corrupt images are not skipped: that would change the epoch's length and order)") from None


@dataclass
class DaliData(Data):
    """Training and validation batches of one rank read by DALI."""

    train_samples: list[tuple[str, int]] = field(default_factory=list)
    val_samples: list[tuple[str, int]] = field(default_factory=list)
    image_size: int = 224
    on_gpu: bool = True
    num_threads: int = 0
    device: torch.device | None = None
    source: str = ""

    def __post_init__(self) -> None:
        import_dali()
        if self.on_gpu and not torch.cuda.is_available():
            raise DataError("data.backend='dali-gpu' needs a CUDA GPU; use data.backend=dali-cpu "
                            "(or torchvision) on a machine without one")
        if not self.train_samples or not self.val_samples:
            raise DataError(f"{self.source}: no images found")
        self.num_threads = self.num_threads or min(4, os.cpu_count() or 1)
        self._val = None

    @property
    def device_id(self) -> int | None:
        if not self.on_gpu:
            return None
        if self.device is not None and self.device.type == "cuda" and self.device.index is not None:
            return self.device.index
        return int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))

    def train_batches(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        _, _, _, DALIGenericIterator, LastBatchPolicy = import_dali()
        n = len(self.train_samples)
        if start_batch >= n // (self.world * self.batch_size):
            return iter(())
        # every rank's examples of the epoch order (rank_indices), from the resume position on, rank
        # after rank: equal-length pieces, so DALI's shard `rank` of `world` is exactly this rank's
        order = epoch_order(n, self.seed, epoch)
        picked = [i for r in range(self.world)
                  for i in rank_indices(order, self.world, r, self.batch_size, start_batch)]
        per = len(picked) // self.world
        files = [self.train_samples[i][0] for i in picked]
        pipe = train_pipeline(files, [self.train_samples[i][1] for i in picked],
                              shard_id=self.rank, num_shards=self.world, size=self.image_size, on_gpu=self.on_gpu,
                              batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id,
                              seed=(self.seed * 1_000_003 + epoch * 1_009 + self.rank * 7 + start_batch) % 2**31)
        it = DALIGenericIterator(pipe, ["data", "label"], reader_name=READER,
                                 last_batch_policy=LastBatchPolicy.DROP, auto_reset=False)
        mine = files[self.rank * per:(self.rank + 1) * per]
        return _batches(it, mine, self.batch_size, self.source)

    def val_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        _, _, _, DALIGenericIterator, LastBatchPolicy = import_dali()
        if self._val is None:
            pipe = val_pipeline([f for f, _ in self.val_samples], [c for _, c in self.val_samples],
                                shard_id=self.rank, num_shards=self.world, size=self.image_size, on_gpu=self.on_gpu,
                                batch_size=self.eval_batch_size, num_threads=self.num_threads,
                                device_id=self.device_id)
            self._val = DALIGenericIterator(pipe, ["data", "label"], reader_name=READER,
                                            last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True)
        n = len(self.val_samples)      # DALI's shard of this rank: [n*rank//world, n*(rank+1)//world)
        mine = [f for f, _ in self.val_samples[n * self.rank // self.world:n * (self.rank + 1) // self.world]]
        return _batches(self._val, mine, self.eval_batch_size, self.source)
