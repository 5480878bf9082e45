"""Tests of vqref.demo.photos: patches of scikit-learn's bundled photographs, no download.

The oracle is scikit-learn's own loader (``load_sample_image``, one photo by file name), read
here independently of :mod:`vqref.demo.photos`.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("PIL")

from sklearn.datasets import load_sample_image  # noqa: E402

from vqref.demo.photos import HELD_OUT_COLUMNS, PHOTOS, load_photos, photo_patches, photo_regions  # noqa: E402


@pytest.fixture(scope="module")
def raw():
    return {name: load_sample_image(f"{name}.jpg").astype(np.float64) / 255.0 for name in PHOTOS}


def test_the_photos_are_the_bundled_images_in_unit_range(raw):
    photos = load_photos()
    assert list(photos) == ["china", "flower"]
    for name, img in photos.items():
        assert img.shape == (427, 640, 3) and img.dtype == np.float32
        assert 0.0 <= img.min() and img.max() <= 1.0
        np.testing.assert_allclose(img, raw[name], atol=1e-7)
    grey = load_photos(grey=True)["flower"]
    assert grey.shape == (427, 640, 1)
    r, g, b = np.moveaxis(raw["flower"], -1, 0)
    np.testing.assert_allclose(grey[..., 0], 0.299 * r + 0.587 * g + 0.114 * b, atol=1e-6)


def test_the_split_is_by_columns_and_the_patches_tile_each_region(raw):
    assert HELD_OUT_COLUMNS == (240, 400)
    regions = photo_regions("test")
    assert {k: v.shape for k, v in regions.items()} == {"china": (427, 160, 3), "flower": (427, 160, 3)}
    np.testing.assert_allclose(regions["flower"], raw["flower"][:, 240:400], atol=1e-7)
    train_regions = photo_regions("train")
    assert list(train_regions) == ["china, left", "china, right", "flower, left", "flower, right"]
    np.testing.assert_allclose(train_regions["china, right"], raw["china"][:, 400:], atol=1e-7)
    assert all(v.shape == (427, 240, 3) for v in train_regions.values())
    test = photo_patches("test", size=16)
    per_photo = (427 // 16) * (160 // 16)  # 26 rows x 10 columns of patches
    assert test.shape == (2 * per_photo, 16, 16, 3) and test.dtype == np.float32
    # order (region, row, column): the first patch of the flower's held-out band, and the last
    np.testing.assert_allclose(test[per_photo], raw["flower"][0:16, 240:256], atol=1e-7)
    np.testing.assert_allclose(test[-1], raw["flower"][400:416, 384:400], atol=1e-7)
    train = photo_patches("train", size=16, stride=8)
    per_part = ((427 - 16) // 8 + 1) * ((240 - 16) // 8 + 1)  # 52 x 29 patches in each of 4 parts
    assert train.shape == (4 * per_part, 16, 16, 3)
    np.testing.assert_allclose(train[1], raw["china"][0:16, 8:24], atol=1e-7)
    np.testing.assert_allclose(train[per_part], raw["china"][0:16, 400:416], atol=1e-7)  # the right part
    assert np.array_equal(photo_patches("test", size=16), test)  # the same on every call


def test_refusals():
    with pytest.raises(ValueError, match="split"):
        photo_patches("validation")
    with pytest.raises(ValueError, match="size and stride"):
        photo_patches("test", size=0)
