"""A small VQ-VAE with hand-written gradients: MLP encoder, any vqref quantizer, MLP decoder.

Symbols: N images, P pixels per image (64 for 8x8 digits), H hidden units, T tokens per image,
d token dim (= the quantizer's ``dim``), E = T * d latent features, Q residual depths.

Why tokens: a VQ-VAE on images quantizes one vector per spatial position.  An 8x8 image is too
small for a convolutional encoder to be worth writing by hand, so here the encoder's output of
E = T * d features is cut into T consecutive chunks of d features, and each chunk is one token
for the quantizer.  An image is then described by T code indices (T * Q with residual VQ),
a discrete "sentence" of T words from a vocabulary of K codes; the decoder reads the T
quantized tokens side by side and paints the image back.

Forward (van den Oord et al. 2017, arXiv 1711.00937, eq. 3, with the losses of the quantizer)::

    z      = encoder(x)                            (N, E)
    tokens = reshape(z, (N, T, d))                 (N, T, d)
    zq, k, L_vq = quantizer(tokens)                (N, T, d), (N, T[, Q]), () or (Q,)
    recon  = decoder(reshape(zq, (N, E)))          (N, P)
    L      = mse(recon, x) + sum(L_vq)             ()

Backward, read from the loss back to the image (every arrow is one hand-written backward)::

    drecon  = dL * (2/M) (recon - x)               mse backward, M = N * P
    dzq     = decoder.backward(drecon)             (N, E) -> reshaped (N, T, d)
    dtokens = quantizer.backward(dzq, dL)          the estimator (STE / rotation) carries dzq to
                                                   the tokens, the losses add their own share
    dx      = encoder.backward(dtokens)            (N, P); fills the encoder's gradients

The quantizer's estimator is a surrogate: with the codes held fixed, the true derivative of the
reconstruction with respect to the encoder is zero.  So a finite-difference check of the whole
model must freeze ``sg[q - z]`` at its value (the straight-through identity), which is what the
tests and notebook 9 do.

**Quantizers without a codebook.**  :class:`vqref.VectorQuantize` and :class:`vqref.ResidualVQ`
already speak the interface above.  FSQ (arXiv 2309.15505) and LFQ (arXiv 2310.05737), and their
residual stacks, return different tuples; :class:`QuantizerAdapter` gives them the same one, so
the model code has one path:

==================  ==============================  ==========================================
quantizer           its call                        adapted to ``zq, indices, L_vq``
==================  ==============================  ==========================================
FSQ, ResidualFSQ    ``zq, indices = q(tokens)``     ``L_vq = 0`` (0-d, the tokens' dtype): FSQ
                                                    has no loss, so its backward takes no dL
LFQ, ResidualLFQ    ``zq, indices, aux = q(t)``     ``L_vq = aux`` (``(Q,)`` for a stack), with
                                                    weight 1 in ``L``: its upstream gradient is dL
==================  ==============================  ==========================================

Decoding from indices uses ``get_output_from_indices`` where the quantizer has it (the stacks)
and ``indices_to_codes`` otherwise (FSQ, LFQ), which include the projections back to ``d``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from .. import backend as B
from ..backend import Array
from ..params import NamedArrays
from ..quantizers import FSQ, LFQ, ResidualFSQ, ResidualLFQ
from ..quantizers.files import check_state_entries
from ..validation import check_dtype_name, check_real
from .functional import MSELossCache, mse_loss_backward, mse_loss_forward
from .layers import MLP, MLPCache, check_batch

__all__ = ["VQVAELosses", "VQVAE", "QuantizerAdapter", "adapt_quantizer"]


class QuantizerAdapter:
    """FSQ or LFQ (or their residual stacks) behind :class:`vqref.VectorQuantize`'s interface.

    ``zq, indices, loss = adapter(tokens)``, ``dtokens = adapter.backward(dzq, dloss)`` and
    ``adapter.get_output_from_indices(indices)``, what :class:`VQVAE` and
    :class:`vqref.nn.ConvVQVAE` call.  Everything else (``dim``, ``params``, ``grads``,
    ``train``, ``state_dict``, ...) is the wrapped quantizer's own.

    Parameters
    ----------
    quantizer : :class:`vqref.FSQ`, :class:`vqref.ResidualFSQ`, :class:`vqref.LFQ` or
        :class:`vqref.ResidualLFQ`

    Notes
    -----
    FSQ's loss is a 0-d zero of the tokens' dtype and library: the quantizer adds nothing to
    the objective, and its backward ignores ``dloss`` (the derivative of a constant is zero).
    LFQ's auxiliary loss (entropy penalty, and commitment when weighted) is the loss, so the
    upstream gradient of the total, ``dloss``, is its upstream gradient.
    """

    def __init__(self, quantizer: Any):
        if not isinstance(quantizer, (FSQ, ResidualFSQ, LFQ, ResidualLFQ)):
            raise TypeError(
                f"QuantizerAdapter wraps FSQ, ResidualFSQ, LFQ or ResidualLFQ, got {type(quantizer).__name__}; "
                "VectorQuantize and ResidualVQ need no adapter"
            )
        self.quantizer = quantizer
        self.has_loss = isinstance(quantizer, (LFQ, ResidualLFQ))  # FSQ's family has none

    def __repr__(self) -> str:
        return f"QuantizerAdapter({self.quantizer!r})"

    def __call__(self, tokens: Array) -> tuple[Array, Array, Array]:
        """``tokens (N, T, d)`` -> ``zq (N, T, d)``, ``indices (N, T[, Q])``, ``loss`` (0-d, or (Q,))."""
        if not self.has_loss:
            zq, indices = self.quantizer(tokens)
            xp = B.get_namespace(tokens)
            return zq, indices, xp.zeros((), dtype=tokens.dtype, device=B.get_device(tokens))  # no loss
        return self.quantizer(tokens)  # LFQ's aux loss is the loss

    forward = __call__

    def backward(self, dzq: Array, dloss: Any = 1.0) -> Array:
        """``dtokens (N, T, d)`` for the last training call; ``dloss`` is the loss's upstream gradient."""
        if not self.has_loss:
            return self.quantizer.backward(dzq)  # a constant loss sends nothing back
        return self.quantizer.backward(dzq, dloss)

    def get_output_from_indices(self, indices: Array) -> Array:
        """``zq (N, T, d)`` for ``indices (N, T[, Q])``: the eval forward's output for those codes."""
        if isinstance(self.quantizer, (ResidualFSQ, ResidualLFQ)):
            return self.quantizer.get_output_from_indices(indices)
        return self.quantizer.indices_to_codes(indices)

    def __getattr__(self, name: str) -> Any:
        """The wrapped quantizer's public attributes (``dim``, ``params``, ``grads``, ``stats``,
        ``codebook_size``, ...), read through; its private ones stay private."""
        if name.startswith("_") or name == "quantizer":  # "quantizer": not set yet (while unpickling)
            raise AttributeError(name)
        return getattr(self.quantizer, name)

    def train(self, mode: bool = True) -> "QuantizerAdapter":
        self.quantizer.train(mode)
        return self

    def eval(self) -> "QuantizerAdapter":
        return self.train(False)

    def state_dict(self) -> dict:
        return self.quantizer.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.quantizer.load_state_dict(state)

    def state_spec(self) -> dict:
        return self.quantizer.state_spec()


def adapt_quantizer(quantizer: Any) -> Any:
    """``quantizer`` with the VQ interface: FSQ and LFQ (and stacks) wrapped in a
    :class:`QuantizerAdapter`, anything else (VectorQuantize, ResidualVQ, an adapter) as it is."""
    if isinstance(quantizer, (FSQ, ResidualFSQ, LFQ, ResidualLFQ)):
        return QuantizerAdapter(quantizer)
    return quantizer


class VQVAELosses(NamedTuple):
    total: Any  # () reconstruction + quantizer: the training objective
    reconstruction: Any  # () mse(recon, x), the mean over all N * P pixels
    quantizer: Any  # () the quantizer's loss (summed over depths for residual VQ)
    per_depth: Any  # (Q,) the residual quantizer's losses; the 0-d loss for a single quantizer


class _Cache(NamedTuple):
    encoder: MLPCache  # the encoder's layers, for this batch
    decoder: MLPCache  # the decoder's layers
    mse: MSELossCache  # recon - x, computed by the forward
    batch: int  # N, for reshaping the gradients


class VQVAE:
    """Encoder MLP -> T tokens of dim d -> quantizer -> decoder MLP, with a manual backward.

    Parameters
    ----------
    quantizer : a :class:`vqref.VectorQuantize` or :class:`vqref.ResidualVQ` with ``dim = d``
        Any configuration: EMA or learnable codebook, k-means init, cosine, orthogonal
        regulariser, rotation trick, Gumbel sampling, residual depths, shared codebook.  Or an
        :class:`vqref.FSQ`, :class:`vqref.LFQ` (or their residual stacks), which the model calls
        through a :class:`QuantizerAdapter`.  The model owns it from now on (its training/eval
        mode follows the model's).
    in_dim : P, features per input (64 for the 8x8 digits)
    hidden : H, hidden units of the encoder and of the decoder (one hidden layer each), or a
        list of sizes for deeper MLPs
    num_tokens : T, tokens per input; the latent has E = T * d features
    activation : ``"relu"`` or ``"tanh"``
    rng : numpy Generator or seed, for the encoder's and decoder's weights (encoder first)
    dtype, xp, device : as for :class:`vqref.nn.MLP`; use the quantizer's dtype and library

    Attributes
    ----------
    encoder : MLP ``[P, H, E]``
    decoder : MLP ``[E, H, P]``
    params : NamedArrays ``"encoder.0.W", ..., "decoder.1.b", "quantizer.codebook"`` (live; the
        quantizer contributes only when its codebook is learnable)
    grads : the gradients of the last :meth:`backward`, with the same names

    Examples
    --------
    >>> from vqref import VectorQuantize
    >>> from vqref.nn import Adam
    >>> vq = VectorQuantize(dim=8, codebook_size=32, seed=0)
    >>> model = VQVAE(vq, in_dim=64, hidden=64, num_tokens=4, rng=0)
    >>> opt = Adam(model.params, lr=1e-3)
    >>> x = np.random.default_rng(0).random((16, 64), dtype=np.float32)
    >>> recon, indices, losses = model.forward(x)
    >>> dx = model.backward()
    >>> opt.step(model.grads)
    >>> recon.shape, indices.shape
    ((16, 64), (16, 4))
    """

    def __init__(
        self,
        quantizer: Any,
        *,
        in_dim: int = 64,
        hidden: int | list[int] = 128,
        num_tokens: int = 4,
        activation: str = "relu",
        rng: Any,
        dtype: Any = "float32",
        xp: Any = np,
        device: Any = None,
    ):
        self.quantizer = quantizer
        self._quantize = adapt_quantizer(quantizer)  # the VQ interface: (zq, indices, loss), backward(dzq, dL)
        self.token_dim = int(quantizer.dim)
        self.num_tokens = int(num_tokens)
        if self.num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        self.in_dim = int(in_dim)
        hidden_sizes = [int(hidden)] if isinstance(hidden, (int, np.integer)) else [int(h) for h in hidden]
        latent = self.num_tokens * self.token_dim  # E
        gen = B.as_generator(rng)
        self.encoder = MLP(
            [self.in_dim, *hidden_sizes, latent], activation=activation, rng=gen, dtype=dtype, xp=xp, device=device
        )
        self.decoder = MLP(
            [latent, *hidden_sizes[::-1], self.in_dim],
            activation=activation,
            rng=gen,
            dtype=dtype,
            xp=xp,
            device=device,
        )
        self.training = True
        self._cache: _Cache | None = None
        self._params = NamedArrays(
            {"encoder": self.encoder.params, "decoder": self.decoder.params, "quantizer": quantizer.params}
        )

    # ------------------------------------------------------------------ mappings and modes

    @property
    def latent_dim(self) -> int:
        """E = T * d, the encoder's output features."""
        return self.num_tokens * self.token_dim

    @property
    def params(self) -> NamedArrays:
        return self._params

    @property
    def grads(self) -> NamedArrays:
        # Built on each access: the quantizer replaces its ``grads`` dict at every backward,
        # so a view made once would keep pointing at the first one.
        return NamedArrays(
            {"encoder": self.encoder.grads, "decoder": self.decoder.grads, "quantizer": self.quantizer.grads}
        )

    def train(self, mode: bool = True) -> "VQVAE":
        """Training mode: the quantizer updates its state (EMA, k-means init) and keeps a cache."""
        self.training = bool(mode)
        self.quantizer.train(self.training)
        return self

    def eval(self) -> "VQVAE":
        """Evaluation mode: nothing in the model changes during a forward."""
        return self.train(False)

    def __repr__(self) -> str:
        return (
            f"VQVAE(encoder={self.encoder.sizes}, tokens={self.num_tokens}x{self.token_dim}, "
            f"quantizer={self.quantizer!r}, decoder={self.decoder.sizes})"
        )

    # ------------------------------------------------------------------ forward / backward

    def forward(self, x: Array, *, sample_codebook_temp: float | None = None) -> tuple[Array, Array, VQVAELosses]:
        """Encode, quantize, decode.

        Parameters
        ----------
        x : (N, P) float
        sample_codebook_temp : optional, the Gumbel temperature tau of this call, passed on to a
            :class:`vqref.VectorQuantize` / :class:`vqref.ResidualVQ` quantizer (for annealing
            it during training); None (default) uses the quantizer's own

        Returns
        -------
        recon : (N, P), the decoder's output
        indices : (N, T) int (``(N, T, Q)`` with residual VQ), the codes of each image's tokens
        losses : VQVAELosses(total, reconstruction, quantizer, per_depth), 0-d arrays except
            ``per_depth`` ``(Q,)``

        Notes
        -----
        A transaction, like the quantizer's own calls: ``x`` is checked first (a finite float
        array of the model's library, shape ``(N, P)``); the encoder and decoder run with
        :meth:`MLP.apply`, which changes nothing; the quantizer's step (EMA, k-means init) is
        the one call that commits, and it commits nothing if it raises; the caches are
        remembered only at the end.  A refused or failing forward leaves the model as it was.

        A training forward keeps what :meth:`backward` needs.  An evaluation forward discards
        it: a backward after it raises instead of differentiating an earlier batch.  The caches
        hold arrays of their own, so changing ``x`` or ``recon`` in place before the backward
        changes no gradient.
        """
        check_batch("the VQVAE input x", x, self.encoder.xp, self.in_dim)
        options = {}
        if sample_codebook_temp is not None:
            if isinstance(self._quantize, QuantizerAdapter):
                raise TypeError(
                    f"sample_codebook_temp is a Gumbel-sampling option of VectorQuantize and ResidualVQ; "
                    f"{type(self.quantizer).__name__} samples nothing: leave it out"
                )
            options["sample_codebook_temp"] = sample_codebook_temp
        xp = B.get_namespace(x)
        N, T, d = x.shape[0], self.num_tokens, self.token_dim
        z, enc_cache = self.encoder.apply(x)  # (N, E)
        tokens = xp.reshape(z, (N, T, d))  # (N, T, d)
        self.quantizer.train(self.training)
        zq, indices, vq_loss = self._quantize(tokens, **options)  # (N, T, d), (N, T[, Q]), () or (Q,)
        recon, dec_cache = self.decoder.apply(xp.reshape(zq, (N, T * d)))  # (N, P)
        rec_loss, mse_cache = mse_loss_forward(recon, x)  # ()
        vq_total = xp.sum(vq_loss) if vq_loss.ndim else vq_loss  # ()
        losses = VQVAELosses(rec_loss + vq_total, rec_loss, vq_total, vq_loss)
        self._cache = _Cache(enc_cache, dec_cache, mse_cache, N) if self.training else None  # the commit
        return recon, indices, losses

    __call__ = forward

    def backward(self, dloss: Array = 1.0, drecon: Any = None) -> Array:
        """Gradients of ``dloss * losses.total [+ <drecon, recon>]`` for the last training forward.

        Parameters
        ----------
        dloss : scalar or 0-d array, the upstream gradient of the total loss (1.0 for training)
        drecon : optional (N, P), an extra upstream gradient on the reconstruction (for
            vector-Jacobian checks with a random direction)

        Returns
        -------
        dx : (N, P), the gradient for the input images.  Parameter gradients are in
            :attr:`grads` (the encoder's get the estimator's surrogate, see the module notes).

        Notes
        -----
        ``dloss`` and ``drecon`` are checked first (finite, of the model's library).  The
        decoder's and encoder's gradients are computed with :meth:`MLP.gradients`, which
        changes nothing; the quantizer's backward is the one call that commits (it consumes its
        cache and stores its gradients), and nothing after it can fail.  A refused backward
        leaves the pending cache and every gradient as they were.
        """
        if self._cache is None:
            raise RuntimeError("VQVAE.backward needs a training-mode forward first (one backward per forward)")
        cache, xp = self._cache, self.encoder.xp
        N, T, d = cache.batch, self.num_tokens, self.token_dim
        dloss = self._check_dloss(dloss)
        if drecon is not None:
            check_batch("drecon", drecon, xp, self.in_dim)
            if drecon.shape[0] != N:
                raise ValueError(f"drecon must have shape ({N}, {self.in_dim}), got {tuple(drecon.shape)}")
        drec = mse_loss_backward(dloss, cache.mse)  # (N, P)
        if drecon is not None:
            drec = drec + drecon  # the reconstruction feeds the loss and the extra direction
        dh, dec_grads = self.decoder.gradients(drec, cache.decoder)  # (N, E)
        dzq = xp.reshape(dh, (N, T, d))  # (N, T, d)
        # The quantizer's loss enters the total with weight 1 (every depth's, for residual VQ),
        # so its upstream gradient is dloss itself.
        dtokens = self._quantize.backward(dzq, dloss)  # (N, T, d)
        dx, enc_grads = self.encoder.gradients(xp.reshape(dtokens, (N, T * d)), cache.encoder)  # (N, P)
        self.decoder.store_grads(dec_grads)  # the commit: nothing below can fail
        self.encoder.store_grads(enc_grads)
        self._cache = None
        return dx

    def _check_dloss(self, dloss: Array) -> Array:
        """``dloss`` as a finite Python float or a finite 0-d float array of the model's library."""
        if isinstance(dloss, (np.integer, np.floating)):
            dloss = dloss.item()  # a numpy scalar is the number it holds, on every backend
        if not B.is_array(dloss):
            return check_real("dloss", dloss)
        xp = self.encoder.xp
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
        """Images ``(N, P)`` from code indices ``(N, T)`` (``(N, T, Q)`` with residual VQ)."""
        xp = B.get_namespace(indices)
        zq = self._quantize.get_output_from_indices(indices)  # (N, T, d)
        recon, _ = self.decoder.apply(xp.reshape(zq, (zq.shape[0], self.latent_dim)))  # changes nothing
        return recon

    def state_dict(self) -> dict:
        """Host copies of the encoder and decoder weights and of the quantizer's state."""
        out = {f"encoder.{k}": v for k, v in self.encoder.state_dict().items()}
        out.update({f"decoder.{k}": v for k, v in self.decoder.state_dict().items()})
        out.update({f"quantizer.{k}": np.asarray(B.to_numpy(v)) for k, v in self.quantizer.state_dict().items()})
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a state written by :meth:`state_dict` (names and shapes must match).

        All or nothing: the encoder's, the decoder's and the quantizer's entries are all checked
        before any is loaded, so a bad entry anywhere leaves the whole model as it was.  Drops
        the pending backward.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"load_state_dict: the state must be a mapping name -> array, got {type(state).__name__}")
        parts: dict[str, dict] = {"encoder": {}, "decoder": {}, "quantizer": {}}
        for k, v in state.items():
            prefix, _, rest = str(k).partition(".")
            if prefix not in parts:
                raise KeyError(f"load_state_dict: unexpected key {k!r}")
            parts[prefix][rest] = v
        # 1. check every part (this changes nothing)
        encoder = self.encoder.check_state_dict(parts["encoder"])
        decoder = self.decoder.check_state_dict(parts["decoder"])
        dtype_name = check_dtype_name("the quantizer's dtype", self.quantizer.dtype)
        check_state_entries(parts["quantizer"], self.quantizer.state_spec(), dtype_name)
        # 2. commit: the quantizer checks its entries again and commits them in one step; the
        #    encoder's and decoder's values have passed the layers' checks already
        self.quantizer.load_state_dict(parts["quantizer"])
        for mlp, values in ((self.encoder, encoder), (self.decoder, decoder)):
            for k, v in values.items():
                mlp.params[k] = v
        self._cache = None
