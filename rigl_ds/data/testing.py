"""Generated JPEG folders in ImageNet layout (``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``) for
tests and the GPU smoke script; no download.

    python -m rigl_ds.data.testing /tmp/fake_imagenet --classes 10 --train 64 --val 16

With ``encode_index`` every image is one solid colour that encodes its position in its split
(ImageFolder order), so a test can tell which file a decoded, cropped, mirrored and normalised
image came from: red = 30 + 25 * (k // 8), green = 30 + 25 * (k % 8).
"""
from __future__ import annotations

import argparse
import pathlib

import numpy as np

ENCODE_LIMIT = 80     # images per split that the colour code can tell apart


def wnid(c: int) -> str:
    return f"n{1440764 + c:08d}"


def index_colour(k: int) -> tuple[int, int, int]:
    return 30 + 25 * (k // 8), 30 + 25 * (k % 8), 128


def decode_index(rgb_mean: tuple[float, float, float]) -> int:
    """The ``k`` of :func:`index_colour` from an image's mean colour (0-255)."""
    return int(round((rgb_mean[0] - 30) / 25)) * 8 + int(round((rgb_mean[1] - 30) / 25))


def make_image_folder(root: str | pathlib.Path, *, classes: int = 3, train_per_class: int = 6,
                      val_per_class: int = 4, encode_index: bool = True, seed: int = 0,
                      size_range: tuple[int, int] = (40, 96)) -> pathlib.Path:
    """Write the folder; images have varied sizes and aspect ratios. Returns ``root``."""
    from PIL import Image

    root = pathlib.Path(root)
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        if encode_index and classes * per_class > ENCODE_LIMIT:
            raise ValueError(f"encode_index: at most {ENCODE_LIMIT} images per split, asked for "
                             f"{classes} x {per_class}")
        k = 0
        for c in range(classes):
            d = root / split / wnid(c)
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                h, w = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, size=2))
                if encode_index:
                    a = np.empty((h, w, 3), np.uint8)
                    a[...] = index_colour(k)
                else:
                    a = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                Image.fromarray(a).save(d / f"{wnid(c)}_{i:05d}.JPEG", quality=95)
                k += 1
    return root


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train", type=int, default=64, help="training images per class")
    p.add_argument("--val", type=int, default=16, help="validation images per class")
    p.add_argument("--min-size", type=int, default=160)
    p.add_argument("--max-size", type=int, default=500)
    a = p.parse_args(argv)
    make_image_folder(a.root, classes=a.classes, train_per_class=a.train, val_per_class=a.val, encode_index=False,
                      size_range=(a.min_size, a.max_size))
    print(f"wrote {a.classes * (a.train + a.val)} JPEGs under {a.root}")


if __name__ == "__main__":
    main()
