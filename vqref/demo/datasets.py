"""The demo's two kinds of data and the model each one trains.

Symbols: N images, P = 64 pixels of a digit, S x S x C a photo patch (16 x 16 x 3), d token dim.

``digits``  scikit-learn's 8x8 handwritten digits (:func:`vqref.demo.train.load_data`) and the
            MLP VQ-VAE of :mod:`vqref.nn.vqvae`: T tokens cut from one latent vector.
``photos``  16 x 16 colour patches of scikit-learn's two bundled photographs
            (:mod:`vqref.demo.photos`; a band of columns held out) and the convolutional VQ-VAE
            of :mod:`vqref.nn.conv_vqvae`: a 4 x 4 grid of tokens, one per 4 x 4 pixels.

Both are loaded without a download.  The held-out set is fixed: the digits' split is drawn from
the command's ``--seed``, the photos' held-out band is a fixed region of both pictures.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ..nn import ConvVQVAE
from ..nn.vqvae import adapt_quantizer
from .train import CONFIGS, AnnealedQuantizer, TrainSettings, build_model, build_quantizer, load_data, showcase

__all__ = ["DATASETS", "Dataset", "load_dataset", "make_model", "PATCH", "PHOTO_TRAIN_STRIDE"]

DATASETS = ("digits", "photos")
PATCH = 16  # side of a photo patch in pixels: a 4 x 4 grid of tokens
PHOTO_TRAIN_STRIDE = 8  # overlapping training patches (6032 of them); the held-out ones do not overlap


class Dataset(NamedTuple):
    name: str  # "digits" or "photos"
    train: np.ndarray  # (N, 64) digits, or (N, 16, 16, 3) patches; float32 in [0, 1]
    test: np.ndarray  # the held-out images, the same for every run of a command
    show: np.ndarray  # positions in ``test`` of the images whose reconstructions the report shows
    description: str  # one line for the report


def load_dataset(name: str, split_seed: int, train_size: int | None = None, test_size: int | None = None) -> Dataset:
    """The data of ``name``; ``train_size`` keeps the first training images (digits: of the seeded
    split; photos: of a seeded shuffle), ``test_size`` evenly spaced held-out patches (photos only:
    the digits' held-out set is always the same 360 images)."""
    if name == "digits":
        train, test, labels = load_data(split_seed, train_size or 10**9)
        return Dataset(
            name,
            train,
            test,
            showcase(labels),
            f"{train.shape[0]} training / {test.shape[0]} held-out digits (8x8, scikit-learn), split seed {split_seed}",
        )
    if name == "photos":
        from .photos import photo_patches

        train = photo_patches("train", size=PATCH, stride=PHOTO_TRAIN_STRIDE)  # (6032, 16, 16, 3)
        test = photo_patches("test", size=PATCH)  # (520, 16, 16, 3), the held-out band
        if test_size is not None:
            test = test[np.linspace(0, test.shape[0] - 1, test_size).round().astype(int)]
        if train_size is not None:
            train = train[np.random.default_rng([split_seed, 0]).permutation(train.shape[0])[:train_size]]
        show = np.linspace(0, test.shape[0] - 1, 10).round().astype(int)  # spread over the band
        return Dataset(
            name,
            train,
            test,
            show,
            f"{train.shape[0]} training / {test.shape[0]} held-out {PATCH}x{PATCH} colour patches of scikit-learn's "
            "two sample photographs (held out: the band of columns 240-399)",
        )
    raise ValueError(f"unknown data {name!r}; choose from {', '.join(DATASETS)}")


def make_model(dataset: str, name: str, s: TrainSettings) -> Any:
    """Configuration ``name``'s untrained model for ``dataset``: the MLP VQ-VAE on digits, the
    convolutional one on photos (its quantizer adapted, and annealed for Gumbel sampling)."""
    if dataset == "digits":
        return build_model(name, s)
    quantizer = adapt_quantizer(build_quantizer(name, s))
    if CONFIGS[name].anneal:
        quantizer = AnnealedQuantizer(quantizer)
    return ConvVQVAE(quantizer, in_channels=3, hidden=s.hidden, rng=np.random.default_rng([s.seed, 2]))
