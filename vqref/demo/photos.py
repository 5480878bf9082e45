"""Real photographs without a download: patches of scikit-learn's two bundled sample images.

Symbols: N patches of S x S pixels with C channels (3 for colour, 1 for grey), channels last.

scikit-learn ships two colour photographs inside its package (``china.jpg``, a temple, and
``flower.jpg``, a flower; 427 x 640 pixels each, Creative Commons licensed, see
``sklearn/datasets/images/README.txt``).  :func:`sklearn.datasets.load_sample_images` reads
them from there, with Pillow (which matplotlib already requires), so nothing is fetched.

The split is by region, the same for both photos: the vertical band of columns ``[240, 400)``
is held out, and the columns left and right of it are for training.  The band crosses the
middle of each scene (the temple's right half, the flower's centre), so a held-out patch shows
a part of the scene the model has never seen, of the same kind as those it has.  No patch
straddles a border.  The patches are cut on a fixed grid, in a fixed order (region, row,
column), so the data is the same on every machine and call; shuffle with a seeded generator
when training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["PHOTOS", "HELD_OUT_COLUMNS", "load_photos", "photo_regions", "photo_patches"]

PHOTOS = ("china", "flower")  # the two photographs, in this order everywhere
HELD_OUT_COLUMNS = (240, 400)  # the held-out band; the columns left and right of it are for training
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 weights of R, G, B in the grey value


def load_photos(*, grey: bool = False) -> dict[str, np.ndarray]:
    """The two photographs as ``name -> (427, 640, C)`` float32 arrays in ``[0, 1]``.

    ``grey=True`` gives one channel, the BT.601 luma ``0.299 R + 0.587 G + 0.114 B``.
    """
    from sklearn.datasets import load_sample_images  # the demo extra; imported when used

    bunch = load_sample_images()
    by_name = {Path(path).stem: img for path, img in zip(bunch.filenames, bunch.images)}  # "china" -> uint8
    out = {}
    for name in PHOTOS:
        img = by_name[name].astype(np.float64) / 255.0  # (427, 640, 3)
        if grey:
            img = (img @ _LUMA)[..., None]  # (427, 640, 1)
        out[name] = img.astype(np.float32)
    return out


def photo_regions(split: str = "test", *, grey: bool = False) -> dict[str, np.ndarray]:
    """The held-out band (``"test"``: ``name -> (427, 160, C)``) or the training parts left and
    right of it (``"train"``: ``"china, left" -> (427, 240, C)``, ``"china, right" -> (427, 240, C)``,
    and the same for the flower) of both photographs, float32 in ``[0, 1]``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    a, b = HELD_OUT_COLUMNS
    out = {}
    for name, img in load_photos(grey=grey).items():
        if split == "test":
            out[name] = img[:, a:b]
        else:
            out[f"{name}, left"], out[f"{name}, right"] = img[:, :a], img[:, b:]
    return out


def photo_patches(split: str = "train", *, size: int = 16, stride: int | None = None, grey: bool = False) -> np.ndarray:
    """Square patches of the training or held-out regions of both photographs.

    Parameters
    ----------
    split : ``"train"`` or ``"test"`` (the regions of :func:`photo_regions`)
    size : S, the patch side in pixels
    stride : the step between patches (default ``size``: a grid of non-overlapping patches;
        smaller steps give overlapping patches, more of them)
    grey : one luma channel instead of three colour channels

    Returns
    -------
    patches : (N, S, S, C) float32 in ``[0, 1]``, every patch that fits entirely inside a
        region, in the order (region, row, column)
    """
    size = int(size)
    stride = size if stride is None else int(stride)
    if size < 1 or stride < 1:
        raise ValueError(f"size and stride must be >= 1, got size={size}, stride={stride}")
    out = []
    for img in photo_regions(split, grey=grey).values():
        H, W, _ = img.shape
        for top in range(0, H - size + 1, stride):
            for left in range(0, W - size + 1, stride):
                out.append(img[top : top + size, left : left + size])
    return np.stack(out)
