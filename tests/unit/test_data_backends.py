"""The image-folder backends (DALI CPU pipelines, torchvision, synthetic) on a generated JPEG folder
in ImageNet layout; every image is a solid colour that encodes which file it is."""
import pathlib
import sys

import pytest
import torch

from rigl_ds.config import ConfigError, DataSection, load_config
from rigl_ds.data import IMAGENET_MEAN, IMAGENET_STD, DataError, build_data, describe_data, epoch_order
from rigl_ds.data.testing import decode_index, make_image_folder

dali = pytest.importorskip("nvidia.dali", reason="NVIDIA DALI not installed (pip install -e .[dali])")

SIZE = 32


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> pathlib.Path:
    # 3 classes x 7 train images (21: uneven over 2 ranks), 3 classes x 5 val images (15: odd)
    return make_image_folder(tmp_path_factory.mktemp("imagenet"), classes=3, train_per_class=7, val_per_class=5)


def cfg(folder, backend="dali-cpu", **kw) -> DataSection:
    return DataSection(name="imagefolder", backend=backend, path=str(folder), image_size=SIZE,
                       batch_size=kw.pop("batch_size", 4), eval_batch_size=kw.pop("eval_batch_size", 4),
                       num_workers=kw.pop("num_workers", 2), **kw)


def decoded(x: torch.Tensor) -> list[int]:
    """Which file each image of a batch came from (the colour code of data/testing.py)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    rgb = (x.float() * std + mean).mean(dim=(2, 3))
    return [decode_index(tuple(v)) for v in rgb.tolist()]


def check_batch(x, y, n, samples, size=SIZE) -> list[int]:
    assert x.shape == (n, 3, size, size) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert y.dtype == torch.int64 and y.shape == (n,)
    ks = decoded(x)
    assert y.tolist() == [samples[k][1] for k in ks]          # labels = the folder's class of that file
    return ks


def test_dali_cpu_train_reads_this_ranks_batches_of_the_epoch_order(folder):
    bs = 4
    seen = {}
    for rank in (0, 1):
        data = build_data(cfg(folder), seed=3, rank=rank, world=2)
        samples = data.train_samples
        assert [c for _, c in samples] == [0] * 7 + [1] * 7 + [2] * 7
        assert data.batches_per_epoch() == 21 // (2 * bs) == 2
        for epoch in (0, 1):
            ks = [k for x, y in data.train_batches(epoch) for k in check_batch(x, y, bs, samples)]
            order = epoch_order(21, 3, epoch)
            # micro-batch i of rank r: examples (2i + r)*bs ... of the epoch's order
            assert ks == [order[(2 * i + rank) * bs + j] for i in range(2) for j in range(bs)]
            seen[rank, epoch] = ks
        # resume at batch 1 of epoch 1: exactly the remaining batches
        ks = [k for x, y in data.train_batches(1, start_batch=1) for k in check_batch(x, y, bs, samples)]
        assert ks == seen[rank, 1][bs:]
        assert list(data.train_batches(1, start_batch=5)) == []
    assert not set(seen[0, 0]) & set(seen[1, 0])
    assert seen[0, 0] != seen[0, 1]                                       # reshuffled each epoch


def test_dali_and_torchvision_backends_read_the_same_order(folder):
    a = build_data(cfg(folder), seed=5, rank=1, world=2)
    b = build_data(cfg(folder, backend="torchvision", num_workers=0), seed=5, rank=1, world=2)
    assert b.info == a.info
    ka = [k for x, y in a.train_batches(2) for k in check_batch(x, y, 4, a.train_samples)]
    kb = [k for x, y in b.train_batches(2) for k in decoded(x)]
    assert ka == kb


def test_dali_cpu_validation_each_image_exactly_once_over_two_shards(folder):
    counts = []
    for rank in (0, 1):
        data = build_data(cfg(folder), seed=0, rank=rank, world=2)
        for _ in range(2):                                    # the iterator is reused by every evaluation
            ks, sizes = [], []
            for x, y in data.val_batches():
                sizes.append(len(y))
                ks += check_batch(x, y, len(y), data.val_samples)
            counts.append(ks)
            assert max(sizes) == 4 and sum(sizes) == len(ks)
    assert counts[0] == counts[1] and counts[2] == counts[3]
    assert sorted(counts[0] + counts[2]) == list(range(15))    # 15 images, none dropped or repeated


def test_center_crop_of_validation(tmp_path):
    """A 2:1 image split into two colours left/right: the center crop of the 256/224-resized image
    keeps the middle, so both halves appear and the crop is square."""
    from PIL import Image
    import numpy as np

    make_image_folder(tmp_path, classes=2, train_per_class=2, val_per_class=1)
    a = np.zeros((64, 128, 3), np.uint8)
    a[:, :64] = (200, 30, 30)
    a[:, 64:] = (30, 200, 30)
    Image.fromarray(a).save(next((tmp_path / "val").glob("*/*.JPEG")), quality=95)
    data = build_data(cfg(tmp_path, eval_batch_size=2), seed=0)
    x, _ = next(iter(data.val_batches()))
    img = (x[0].float() * torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255
           + torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255)
    # shorter side 64 -> round(32*256/224)=37, width 74; crop 32 of the middle 74 columns
    assert img[0, :, :10].mean() > 150 and img[1, :, -10:].mean() > 150
    assert img[0, :, -10:].mean() < 80 and img[1, :, :10].mean() < 80


def test_dali_gpu_without_cuda_is_a_clear_error(folder):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(DataError, match="dali-gpu' needs a CUDA GPU; use data.backend=dali-cpu"):
        build_data(cfg(folder, backend="dali-gpu"), seed=0)


def test_missing_dali_names_the_pip_extra(folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(DataError, match=r"pip install -e \.\[dali\]"):
        build_data(cfg(folder), seed=0)


def test_synthetic_backend_stands_in_for_the_folder(tmp_path):
    c = DataSection(name="imagefolder", backend="synthetic", image_size=SIZE, train_size=40, val_size=8,
                    batch_size=4, num_classes=10)
    data = build_data(c, seed=0)
    x, y = next(data.train_batches(0))
    assert x.shape == (4, 3, SIZE, SIZE) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert describe_data(DataSection(name="imagefolder", backend="synthetic")).train_size == 1_281_167


def test_backend_errors_name_key_value_and_allowed(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.name=digits", "data.backend=dali-cpu"])
    assert str(e.value).endswith("command-line override 'data.backend=dali-cpu': data.backend: 'dali-cpu' does not "
                                 "apply to name='digits' (in memory); allowed: torchvision (got 'dali-cpu')")
    with pytest.raises(ConfigError, match="data.backend: Input should be 'torchvision', 'dali-gpu', 'dali-cpu' or "
                                          "'synthetic'"):
        load_config(None, ["data.backend=nvjpeg"])
    with pytest.raises(DataError, match="data.path: required"):
        build_data(DataSection(name="imagefolder", backend="dali-cpu"), seed=0)
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match=f"data.path='{tmp_path}'.*Couldn't find any class folder"):
        build_data(cfg(tmp_path), seed=0)


def test_a_steps_global_batch_is_the_same_at_every_world_size():
    """2 ranks x 16 and 1 process x 16 x 2 accumulated micro-batches train on the same 32 examples
    each step (so a run resumed at another world size continues on the same examples)."""
    from rigl_ds.data import EpochBatchSampler

    size, bs = 203, 16
    one = list(EpochBatchSampler(size, bs, seed=4, epoch=3))
    two = [list(EpochBatchSampler(size, bs, seed=4, epoch=3, rank=r, world=2)) for r in (0, 1)]
    three = [list(EpochBatchSampler(size, bs, seed=4, epoch=3, rank=r, world=3)) for r in (0, 1, 2)]
    order = epoch_order(size, 4, 3)
    assert len(one) == 12 and len(two[0]) == len(two[1]) == 6 and len(three[0]) == 4
    for step in range(6):                     # global batch 32
        assert one[2 * step] + one[2 * step + 1] == two[0][step] + two[1][step] == order[32 * step:32 * step + 32]
    for step in range(4):                     # global batch 48
        assert [k for r in range(3) for k in three[r][step]] == order[48 * step:48 * step + 48]
    # resume at batch 2: the remaining batches
    assert list(EpochBatchSampler(size, bs, seed=4, epoch=3, rank=1, world=2, start_batch=2)) == two[1][2:]
