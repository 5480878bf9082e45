"""A convolutional VQ-VAE with hand-written gradients: images -> a grid of tokens -> images.

Symbols: N images of H x W pixels with C channels (channels last, ``(N, H, W, C)``); h hidden
channels; a grid of H' x W' = H/4 x W/4 tokens of dimension d (the quantizer's ``dim``),
T = H' W' tokens per image; K codes; Q residual depths.

The model of van den Oord et al. (2017, arXiv 1711.00937, section 4.1), without its residual
blocks: two strided 4x4 convolutions down, a grid of tokens, two strided 4x4 transposed
convolutions up::

    encoder  conv 4x4 /2 (C -> h), relu, conv 4x4 /2 (h -> h), relu, conv 1x1 (h -> d)
    tokens   z (N, H', W', d) seen as (N, T, d): one token per position of the grid
    quantize zq, k, L_vq = quantizer(tokens)         any vqref quantizer with dim = d
    decoder  conv 1x1 (d -> h), relu, convT 4x4 x2 (h -> h), relu, convT 4x4 x2 (h -> C)
    loss     L = mse(recon, x) + sum(L_vq)

The backward is :class:`vqref.nn.VQVAE`'s, with convolutions for the MLPs::

    drecon  = dL (2/M) (recon - x)              M = N H W C
    dzq     = decoder.gradients(drecon)         (N, H', W', d) -> (N, T, d)
    dtokens = quantizer.backward(dzq, dL)       the estimator (a surrogate) and the losses' share
    dx      = encoder.gradients(dtokens)        (N, H, W, C)

**Why the tokens are spatial.**  The MLP VQ-VAE cuts one latent vector into T chunks; every
chunk reaches every pixel through the decoder's dense layers, so a changed code can change the
whole image.  Here token (u, v) is the latent of one 4x4 block of pixels, and the decoder is a
stack of local operations: a 1x1 convolution touches that position only, and each 4x4 stride-2
transposed convolution spreads a position a over the output rows ``2a - 1 .. 2a + 2``.  So a
token reaches the rows ``4u - 3 .. 4u + 6`` (a 10 x 10 window around its own block) and nothing
else: replacing one code changes one region of the image.  :meth:`ConvVQVAE.token_region`
computes that window from the layers, and the tests and notebook 14 check that a token swap
changes no pixel outside it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from .. import backend as B
from ..backend import Array
from ..params import NamedArrays
from ..validation import check_real
from .conv_layers import Conv2d, ConvNet, ConvNetCache, ConvTranspose2d, check_images
from .functional import MSELossCache, mse_loss_backward, mse_loss_forward
from .vqvae import VQVAELosses

__all__ = ["ConvVQVAE"]


class _Cache(NamedTuple):
    encoder: ConvNetCache  # the encoder's layers, for this batch
    decoder: ConvNetCache  # the decoder's layers
    mse: MSELossCache  # recon - x, computed by the forward
    grid: tuple  # (N, H', W', d), the token grid's shape


class ConvVQVAE:
    """Convolutional encoder -> (H/4, W/4) grid of d-dim tokens -> quantizer -> convolutional decoder.

    Parameters
    ----------
    quantizer : a vqref quantizer with ``dim = d`` and the interface ``quantizer(tokens (N, T, d))
        -> (zq, indices, loss)``, ``backward(dzq, dloss)``, ``get_output_from_indices``
        (:class:`vqref.VectorQuantize`, :class:`vqref.ResidualVQ`, ...).  The model owns it from
        now on (its training/eval mode follows the model's).
    in_channels : C, 3 for colour images, 1 for grey
    hidden : h, channels of the hidden layers
    rng : numpy Generator or seed for the weights (the encoder's layers first, then the decoder's)
    dtype, xp, device : of the weights; use the quantizer's

    Attributes
    ----------
    encoder, decoder : :class:`vqref.nn.conv_layers.ConvNet`
    params : NamedArrays ``"encoder.0.W", ..., "decoder.2.b"`` and the quantizer's learnable
        arrays (``"quantizer.codebook"``, when learnable), live
    grads : the gradients of the last :meth:`backward`, with the same names

    Examples
    --------
    >>> from vqref import VectorQuantize
    >>> vq = VectorQuantize(dim=8, codebook_size=16, seed=0)
    >>> model = ConvVQVAE(vq, in_channels=3, hidden=8, rng=0)
    >>> x = np.random.default_rng(0).random((2, 16, 12, 3), dtype=np.float32)
    >>> recon, indices, losses = model.forward(x)
    >>> recon.shape, indices.shape
    ((2, 16, 12, 3), (2, 4, 3))
    >>> dx = model.backward()
    """

    downsampling = 4  # pixels per token along each axis: two stride-2 convolutions

    def __init__(
        self,
        quantizer: Any,
        *,
        in_channels: int = 3,
        hidden: int = 32,
        rng: Any,
        dtype: Any = "float32",
        xp: Any = np,
        device: Any = None,
    ):
        for name, value in (("in_channels", in_channels), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.quantizer = quantizer
        self.token_dim = int(quantizer.dim)
        self.in_channels, self.hidden = int(in_channels), int(hidden)
        C, h, d = self.in_channels, self.hidden, self.token_dim
        gen = B.as_generator(rng)
        opts = dict(rng=gen, dtype=dtype, xp=xp, device=device)
        down = dict(stride=2, padding=1)
        self.encoder = ConvNet(
            [Conv2d(C, h, 4, **down, **opts), Conv2d(h, h, 4, **down, **opts), Conv2d(h, d, 1, **opts)]
        )
        self.decoder = ConvNet(
            [
                Conv2d(d, h, 1, **opts),
                ConvTranspose2d(h, h, 4, **down, **opts),
                ConvTranspose2d(h, C, 4, **down, **opts),
            ]
        )
        self.xp = self.encoder.xp
        self.training = True
        self._cache: _Cache | None = None
        self._params = NamedArrays(
            {"encoder": self.encoder.params, "decoder": self.decoder.params, "quantizer": quantizer.params}
        )

    # ------------------------------------------------------------------ mappings and modes

    @property
    def params(self) -> NamedArrays:
        return self._params

    @property
    def grads(self) -> NamedArrays:
        # Built on each access: the quantizer replaces its ``grads`` dict at every backward.
        return NamedArrays(
            {"encoder": self.encoder.grads, "decoder": self.decoder.grads, "quantizer": self.quantizer.grads}
        )

    def train(self, mode: bool = True) -> "ConvVQVAE":
        """Training mode: the quantizer updates its state (EMA, k-means init) and keeps a cache."""
        self.training = bool(mode)
        self.quantizer.train(self.training)
        return self

    def eval(self) -> "ConvVQVAE":
        """Evaluation mode: nothing in the model changes during a forward."""
        return self.train(False)

    def __repr__(self) -> str:
        return (
            f"ConvVQVAE(channels={self.in_channels}, hidden={self.hidden}, tokens=(H/4, W/4, {self.token_dim}), "
            f"quantizer={self.quantizer!r})"
        )

    def grid_shape(self, height: int, width: int) -> tuple[int, int]:
        """``(H', W')``, the token grid of an ``H x W`` image."""
        return height // self.downsampling, width // self.downsampling

    def token_region(self, u: int, v: int, height: int, width: int) -> tuple[slice, slice]:
        """The pixels of an ``H x W`` reconstruction that the code of token ``(u, v)`` can change.

        Computed from the decoder's layers (:meth:`ConvNet.reach`): ``(rows, cols)`` slices of
        the image.  Outside them the reconstruction does not depend on that token at all.
        """
        Hg, Wg = self.grid_shape(height, width)
        if not (0 <= u < Hg and 0 <= v < Wg):
            raise ValueError(f"token ({u}, {v}) is outside the {Hg} x {Wg} grid of a {height} x {width} image")
        r0, r1 = self.decoder.reach(u, u, Hg)
        c0, c1 = self.decoder.reach(v, v, Wg)
        return slice(r0, r1 + 1), slice(c0, c1 + 1)

    # ------------------------------------------------------------------ forward / backward

    def _check_x(self, x: Array) -> None:
        check_images("the ConvVQVAE input x", x, self.xp, self.in_channels)
        m = self.downsampling
        if x.shape[1] % m or x.shape[2] % m or x.shape[1] == 0 or x.shape[2] == 0:
            raise ValueError(
                f"the images' height and width must be positive multiples of {m} (one token per {m}x{m} "
                f"pixels), got {x.shape[1]} x {x.shape[2]}: crop or pad them"
            )

    def forward(self, x: Array) -> tuple[Array, Array, VQVAELosses]:
        """Encode, quantize, decode.

        Parameters
        ----------
        x : (N, H, W, C) float, H and W multiples of 4

        Returns
        -------
        recon : (N, H, W, C)
        indices : (N, H', W') int (``(N, H', W', Q)`` with residual VQ), the token map
        losses : VQVAELosses(total, reconstruction, quantizer, per_depth)

        Notes
        -----
        A transaction: ``x`` is checked first; the encoder and decoder compute with
        :meth:`ConvNet.apply`, which changes nothing; the quantizer's step (EMA, k-means init)
        is the one call that commits; the caches are remembered at the end.  A training
        forward keeps what :meth:`backward` needs, an evaluation forward drops it.
        """
        self._check_x(x)
        xp = self.xp
        z, enc_cache = self.encoder.apply(x)  # (N, H', W', d)
        N, Hg, Wg, d = z.shape
        tokens = xp.reshape(z, (N, Hg * Wg, d))  # (N, T, d), row-major over the grid
        self.quantizer.train(self.training)
        zq, indices, vq_loss = self.quantizer(tokens)  # (N, T, d), (N, T[, Q]), () or (Q,)
        recon, dec_cache = self.decoder.apply(xp.reshape(zq, (N, Hg, Wg, d)))  # (N, H, W, C)
        rec_loss, mse_cache = mse_loss_forward(recon, x)  # ()
        vq_total = xp.sum(vq_loss) if vq_loss.ndim else vq_loss  # ()
        losses = VQVAELosses(rec_loss + vq_total, rec_loss, vq_total, vq_loss)
        token_map = xp.reshape(indices, (N, Hg, Wg) + tuple(indices.shape[2:]))  # (N, H', W'[, Q])
        self._cache = _Cache(enc_cache, dec_cache, mse_cache, (N, Hg, Wg, d)) if self.training else None
        return recon, token_map, losses

    __call__ = forward

    def backward(self, dloss: Array = 1.0, drecon: Any = None) -> Array:
        """Gradients of ``dloss * losses.total [+ <drecon, recon>]`` for the last training forward.

        Parameters
        ----------
        dloss : scalar or 0-d array (1.0 for training)
        drecon : optional (N, H, W, C), an extra upstream gradient on the reconstruction

        Returns
        -------
        dx : (N, H, W, C); the parameter gradients are in :attr:`grads` (the encoder's carry the
            quantizer's estimator, a surrogate)

        Notes
        -----
        The arguments are checked first; the decoder's and encoder's gradients are computed
        with :meth:`ConvNet.gradients` (changes nothing); the quantizer's backward is the one
        call that commits, and nothing after it can fail.
        """
        if self._cache is None:
            raise RuntimeError("ConvVQVAE.backward needs a training-mode forward first (one backward per forward)")
        cache, xp = self._cache, self.xp
        N, Hg, Wg, d = cache.grid
        dloss = self._check_dloss(dloss)
        shape = tuple(cache.mse.diff.shape)
        if drecon is not None:
            check_images("drecon", drecon, xp, self.in_channels)
            if tuple(drecon.shape) != shape:
                raise ValueError(f"drecon must have the reconstruction's shape {shape}, got {tuple(drecon.shape)}")
        drec = mse_loss_backward(dloss, cache.mse)  # (N, H, W, C)
        if drecon is not None:
            drec = drec + drecon  # the reconstruction feeds the loss and the extra direction
        dzq, dec_grads = self.decoder.gradients(drec, cache.decoder)  # (N, H', W', d)
        # The quantizer's loss enters the total with weight 1, so its upstream gradient is dloss.
        dtokens = self.quantizer.backward(xp.reshape(dzq, (N, Hg * Wg, d)), dloss)  # (N, T, d)
        dx, enc_grads = self.encoder.gradients(xp.reshape(dtokens, (N, Hg, Wg, d)), cache.encoder)  # (N, H, W, C)
        self.decoder.store_grads(dec_grads)  # the commit: nothing below can fail
        self.encoder.store_grads(enc_grads)
        self._cache = None
        return dx

    def _check_dloss(self, dloss: Array) -> Array:
        """``dloss`` as a finite Python float or a finite 0-d float array of the model's library."""
        if isinstance(dloss, (np.integer, np.floating)):
            dloss = dloss.item()
        if not B.is_array(dloss):
            return check_real("dloss", dloss)
        xp = self.xp
        if B.get_namespace(dloss) is not xp or not xp.isdtype(dloss.dtype, "real floating"):
            raise TypeError(f"dloss must be a number or a 0-d float array of the model's library, got {dloss!r}")
        if tuple(dloss.shape) != ():
            raise ValueError(f"dloss must be a number or a 0-d array, got shape {tuple(dloss.shape)}")
        if not B.all_finite(dloss):
            raise ValueError(f"dloss must be finite, got {dloss!r}")
        return dloss

    # ------------------------------------------------------------------ conveniences

    def reconstruct(self, x: Array) -> tuple[Array, Array, VQVAELosses]:
        """An evaluation-mode forward that leaves the model in the mode it was in."""
        mode = self.training
        try:
            return self.eval().forward(x)
        finally:
            self.train(mode)

    def decode_indices(self, indices: Array) -> Array:
        """Images ``(N, 4 H', 4 W', C)`` from a token map ``(N, H', W')`` (``(N, H', W', Q)`` with
        residual VQ); changes nothing."""
        xp = self.xp
        if not B.is_array(indices) or indices.ndim < 3:
            raise ValueError("indices must be a token map (N, H', W') or (N, H', W', Q), as forward returns it")
        N, Hg, Wg = indices.shape[:3]
        flat = xp.reshape(indices, (N, Hg * Wg) + tuple(indices.shape[3:]))  # (N, T[, Q])
        zq = self.quantizer.get_output_from_indices(flat)  # (N, T, d); the quantizer checks the codes
        recon, _ = self.decoder.apply(xp.reshape(zq, (N, Hg, Wg, self.token_dim)))
        return recon

    def state_dict(self) -> dict:
        """Host copies of the encoder and decoder weights and of the quantizer's state."""
        out = {f"encoder.{k}": v for k, v in self.encoder.state_dict().items()}
        out.update({f"decoder.{k}": v for k, v in self.decoder.state_dict().items()})
        out.update({f"quantizer.{k}": np.asarray(B.to_numpy(v)) for k, v in self.quantizer.state_dict().items()})
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a state written by :meth:`state_dict`; all or nothing, drops the pending backward."""
        if not isinstance(state, Mapping):
            raise TypeError(f"load_state_dict: the state must be a mapping name -> array, got {type(state).__name__}")
        parts: dict[str, dict] = {"encoder": {}, "decoder": {}, "quantizer": {}}
        for k, v in state.items():
            prefix, _, rest = str(k).partition(".")
            if prefix not in parts:
                raise KeyError(f"load_state_dict: unexpected key {k!r}")
            parts[prefix][rest] = v
        # 1. check the layers' parts (this changes nothing)
        encoder = self.encoder.check_state_dict(parts["encoder"])
        decoder = self.decoder.check_state_dict(parts["decoder"])
        # 2. commit: the quantizer first -- it checks all its entries and commits them in one
        #    step, or raises having changed nothing -- then the layers, with checked values
        self.quantizer.load_state_dict(parts["quantizer"])
        for net, values in ((self.encoder, encoder), (self.decoder, decoder)):
            for k, v in values.items():
                net.params[k] = v
        self._cache = None
