"""Vector quantization and residual vector quantization used as clustering algorithms.

Symbols: N rows, D features, K clusters (codes) per level, L levels.

A vector quantizer *is* a clusterer: its codebook is a set of K centroids and its indices are
cluster labels.  The EMA codebook update of VQ-VAE with decay 0 (and no smoothing) is exactly one
step of Lloyd's algorithm, ``c_k <- mean of the rows assigned to k``, so fitting a quantizer to a
fixed data set by repeated full-batch forwards is k-means.  This module offers that use directly,
with a scikit-learn-like interface, for users who want cluster ids rather than a layer.

:class:`VQClustering`
    One level: k-means (``k-means++`` or random-row initial centroids, then Lloyd iterations
    via :func:`vqref.core.kmeans.kmeans`).  ``labels_`` are the nearest centroids.

:class:`ResidualClustering`
    L levels fitted greedily, level by level, on what the levels before left over:

        r_0 = x,   k_l = argmin_k ||r_l - c^(l)_k||^2,   r_{l+1} = r_l - c^(l)_{k_l}

    Level l is a k-means of the residuals ``r_l``.  This is the hierarchical clustering view of
    residual VQ (RQ-VAE, arXiv 2203.01941; SoundStream, arXiv 2107.03312): level 0 finds
    coarse clusters, level 1 clusters the offsets of the rows from their level-0 centroids, and
    so on.  With ``beam_size = b > 1`` rows are encoded by beam search over the fitted
    codebooks (:func:`vqref.core.beam.residual_encode_beam`): b partial codes per row, never a
    worse reconstruction than greedy.  A row's code tuple ``(k_0, ..., k_{L-1})`` is its
    "semantic ID" (as in generative retrieval, Rajput et al., arXiv 2305.05065): rows with a
    common prefix are close.  Two rows
    *collide* when their whole tuples are equal; :func:`collision_rate` measures how often.

Cosine variant (``use_cosine_sim=True``): assignments by cosine similarity and spherical
k-means centroids (unit vectors), as vector-quantize-pytorch's ``use_cosine_sim`` codebooks.
In the residual stack the unit centroid is subtracted from the raw residual, exactly as
:class:`vqref.ResidualVQ` does with a cosine codebook, so :meth:`ResidualClustering.to_residual_vq`
reproduces :meth:`ResidualClustering.predict`.

Backends: any Array API array in (numpy, cupy, array_api_strict), the same library, device and
float dtype out; lists and integer arrays are converted to float64 numpy / the library's
float64; float16, booleans, complex, object, masked (the mask would be lost), non-finite data
and values whose squared distances overflow are refused by name.  Random choices are made on
the host from a ``numpy.random.Generator``, so a seed gives the same clusters on every backend.
These are drivers, not ops: they synchronise with the device (the data check once per fit or
predict, k-means++ once per centroid, the inertia once per fit).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import backend as B
from .backend import Array
from .core.beam import reconstruction_errors, residual_encode_beam
from .core.ema import laplace_smoothing
from .core.kmeans import assign, kmeans, kmeans_plusplus, sample_initial_means
from .metrics import collision_rate
from .ops.l2norm import l2norm
from .validation import as_array, check_bool, check_dtype_name, check_int, check_seed

__all__ = ["VQClustering", "ResidualClustering", "kmeans_plusplus", "collision_rate"]

_INITS = ("k-means++", "random")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _check_data(X: Array, name: str = "X", rows: str = "N") -> Array:
    """``X`` as a finite 2-D float32/float64 array of its own library (lists and integer arrays
    become float64); TypeError for the wrong kind of data, ValueError for wrong shapes or values."""
    X = as_array(X, name, f"a 2-D array ({rows}, D) or a list of equal-length rows of numbers")
    xp = B.get_namespace(X)
    if X.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array ({rows}, D), got shape {tuple(X.shape)}")
    if xp.isdtype(X.dtype, "bool"):
        raise TypeError(f"{name} holds booleans, not numbers; convert it ({name}.astype(float)) if 0/1 is meant")
    if xp.isdtype(X.dtype, "integral"):
        X = xp.astype(X, xp.float64)
    if not xp.isdtype(X.dtype, "real floating"):
        raise TypeError(f"{name} must hold real numbers, got dtype {X.dtype}")
    if X.dtype not in (xp.float32, xp.float64):  # float16: squared distances overflow beyond 256
        raise TypeError(f"{name} must be float32 or float64, got dtype {X.dtype}; convert it first")
    if X.shape[0] < 1 or X.shape[1] < 1:
        raise ValueError(f"{name} is empty (shape {tuple(X.shape)})")
    top = B.to_float(xp.max(xp.abs(X)))  # the check's one host sync
    if not np.isfinite(top):
        raise ValueError(f"{name} contains NaN or infinite values")
    if X.shape[1] * (2 * top) * (2 * top) > float(xp.finfo(X.dtype).max):  # a squared distance's bound
        fix = "scale it" + (" or convert it to float64" if X.dtype == xp.float32 else "")
        raise ValueError(
            f"{name} holds values up to {top:.3g}, whose squared distances overflow {check_dtype_name('dtype', X.dtype)}; {fix}"
        )
    return X


def _require_fit(est: Any) -> None:
    if not hasattr(est, "cluster_centers_"):
        raise RuntimeError(f"this {type(est).__name__} is not fitted yet; call fit(X) first")


def _fitted_input(est: Any, X: Array) -> Array:
    """``X`` checked for use with fitted ``est``: the data checks, the fit's features and library."""
    _require_fit(est)
    X = _check_data(X)
    if X.shape[1] != est.n_features_in_:
        raise ValueError(f"X has {X.shape[1]} features, the fit had {est.n_features_in_}")
    B.get_namespace(X, est.cluster_centers_)  # same library, or a clear TypeError
    return X


def _centers_as(est: Any, X: Array) -> Array:  # the fitted centroids in X's dtype
    c = est.cluster_centers_
    return c if c.dtype == X.dtype else B.get_namespace(X).astype(c, X.dtype)


# --------------------------------------------------------------------------------------------
# one level
# --------------------------------------------------------------------------------------------


class VQClustering:
    """A vector quantizer fitted as a clusterer: k-means with VQ's conventions.

    ``fit(X)`` chooses initial centroids (``init``), then runs ``iters`` Lloyd iterations
    (:func:`vqref.core.kmeans.kmeans`):

        a_i = argmin_k ||x_i - mu_k||^2,      mu_k <- mean_{i : a_i = k} x_i

    (a cluster that becomes empty keeps its centroid).  Afterwards every row is assigned to its
    nearest final centroid, as ``predict`` and a quantizer's forward would do.

    Parameters
    ----------
    n_clusters : K
    iters : Lloyd iterations T (no early stop; default 20)
    init : ``"k-means++"`` (default, :func:`kmeans_plusplus`), ``"random"`` (K distinct rows,
        vector-quantize-pytorch's k-means initialisation) or a (K, D) array of initial centroids
    use_cosine_sim : cosine-similarity assignment and spherical k-means (unit centroids)
    seed : seed or numpy Generator for the initialisation
    chunk_size : rows per chunk of the nearest-centroid search

    Attributes
    ----------
    (set by ``fit``)

    cluster_centers_ : (K, D), X's library and dtype (unit rows with ``use_cosine_sim``)
    labels_ : (N,) int64, the nearest centroid of every training row
    counts_ : (K,) int64, cluster sizes of ``labels_``
    inertia_ : float, ``sum_i ||x_i - mu_{a_i}||^2`` with the final centroids and ``labels_``
        (cosine: the same on l2-normalised rows, ``= sum_i (2 - 2 cos)`` for non-zero rows)
    inertia_history_ : tuple of T floats, the k-means objective at each iteration's assignment
    n_features_in_ : D
    """

    def __init__(
        self,
        n_clusters: int,
        *,
        iters: int = 20,
        init: Array = "k-means++",
        use_cosine_sim: bool = False,
        seed: Any = None,
        chunk_size: int | None = None,
    ):
        self.n_clusters = check_int("n_clusters", n_clusters, 1)
        self.iters = check_int("iters", iters, 1)
        if not (B.is_array(init) or (isinstance(init, str) and init in _INITS)):
            raise ValueError(f"init must be one of {_INITS} or a (K, D) array, got {init!r}")
        if B.is_array(init):
            _check_data(init, "init", rows="K")  # what can be checked before fit sees X's shape
        self.init = init
        self.use_cosine_sim = check_bool("use_cosine_sim", use_cosine_sim)
        check_seed("seed", seed)
        self.seed = seed
        self.chunk_size = None if chunk_size is None else check_int("chunk_size", chunk_size, 1)

    def __repr__(self) -> str:
        init = "array" if B.is_array(self.init) else repr(self.init)
        return (
            f"VQClustering(n_clusters={self.n_clusters}, iters={self.iters}, init={init}, "
            f"use_cosine_sim={self.use_cosine_sim})"
        )

    # ------------------------------------------------------------------ fitting

    def _initial_means(self, X: Array, rng: np.random.Generator) -> Array:
        xp = B.get_namespace(X)
        K, D = self.n_clusters, X.shape[1]
        if B.is_array(self.init):
            if B.library_name(self.init) != B.library_name(X):
                raise TypeError(f"init is a {B.library_name(self.init)} array but X is a {B.library_name(X)} array")
            if tuple(self.init.shape) != (K, D):
                raise ValueError(f"init must have shape ({K}, {D}), got {tuple(self.init.shape)}")
            means = _check_data(self.init, "init", rows="K")
            return means if means.dtype == X.dtype else xp.astype(means, X.dtype)
        data = l2norm(X) if self.use_cosine_sim else X  # k-means++ on the sphere for cosine
        if self.init == "k-means++":
            return kmeans_plusplus(data, K, rng)
        return sample_initial_means(data, K, rng)

    def fit(self, X: Array) -> "VQClustering":
        """Fit the centroids to ``X (N, D)``; returns ``self``."""
        X = _check_data(X)
        rng = B.as_generator(self.seed)
        res = kmeans(
            X,
            self.n_clusters,
            self.iters,
            use_cosine_sim=self.use_cosine_sim,
            init_means=self._initial_means(X, rng),
            chunk_size=self.chunk_size,
        )
        self.cluster_centers_ = res.means  # (K, D)
        self.n_features_in_ = X.shape[1]
        self.labels_ = self._assign(X)  # (N,)
        self.counts_ = B.bincount(self.labels_, self.n_clusters)  # (K,)
        self.inertia_ = B.to_float(self._energy(X, self.labels_))
        self.inertia_history_ = res.inertia
        return self

    def fit_predict(self, X: Array) -> Array:
        """``fit(X)`` and return ``labels_ (N,)``."""
        return self.fit(X).labels_

    # ------------------------------------------------------------------ using the fit

    def _assign(self, X: Array) -> Array:
        return assign(X, _centers_as(self, X), self.use_cosine_sim, chunk_size=self.chunk_size)

    def _energy(self, X: Array, labels: Array) -> Array:
        """``sum_i ||x_i - mu_{a_i}||^2`` by direct differences (unit rows for cosine), 0-d."""
        xp = B.get_namespace(X)
        data = l2norm(X) if self.use_cosine_sim else X
        diff = data - xp.take(_centers_as(self, X), labels, axis=0)  # (N, D)
        return xp.sum(diff * diff)

    def predict(self, X: Array) -> Array:
        """The nearest centroid of every row: ``(N,)`` int64."""
        return self._assign(_fitted_input(self, X))

    def transform(self, X: Array) -> Array:
        """Distances from every row to every centroid, ``(N, K)`` (scikit-learn's ``transform``).

        Euclidean distances ``||x_i - mu_k||`` (cosine: between the l2-normalised row and the unit
        centroid, ``sqrt(2 - 2 cos)``), computed by direct differences in blocks of rows.
        """
        X = _fitted_input(self, X)
        xp = B.get_namespace(X)
        data = l2norm(X) if self.use_cosine_sim else X
        c = _centers_as(self, X)
        N = data.shape[0]
        step = max(1, (1 << 22) // max(1, self.n_clusters * data.shape[1]))
        blocks = []
        for start in range(0, N, step):
            blk = data[start : min(start + step, N), :]
            diff = blk[:, None, :] - c[None, :, :]  # (n, K, D)
            blocks.append(xp.sqrt(xp.sum(diff * diff, axis=2)))  # (n, K)
        return xp.concat(blocks, axis=0)

    def quantize(self, X: Array) -> Array:
        """Every row replaced by its centroid, ``(N, D)`` (a unit centroid for cosine)."""
        X = _fitted_input(self, X)
        xp = B.get_namespace(X)
        return xp.take(_centers_as(self, X), self._assign(X), axis=0)

    def score(self, X: Array) -> float:
        """Minus the inertia of ``X`` with the fitted centroids (higher is better, as scikit-learn)."""
        X = _fitted_input(self, X)
        return -B.to_float(self._energy(X, self._assign(X)))

    def to_vector_quantize(self, **vq_kwargs: Any):
        """A :class:`vqref.VectorQuantize` in eval mode whose codebook is the fitted centroids.

        Its indices equal :meth:`predict`.  ``vq_kwargs`` (decay, commitment_weight, ...) pass to
        the constructor; the EMA statistics are seeded consistently (``N_k`` = cluster sizes,
        ``m_k = mu_k N~_k``), so training can continue from the fit.
        """
        from .quantizers import VectorQuantize

        _require_fit(self)
        c = self.cluster_centers_
        xp = B.get_namespace(c)
        vq = VectorQuantize(
            self.n_features_in_,
            self.n_clusters,
            use_cosine_sim=self.use_cosine_sim,
            dtype=check_dtype_name("dtype", c.dtype),
            xp=xp,
            device=B.get_device(c),
            chunk_size=self.chunk_size,
            **vq_kwargs,
        )
        vq.load_state_dict(_ema_state(c, self.counts_, vq.eps))
        return vq.eval()


def _ema_state(centers: Array, counts: Array, eps: float) -> dict:
    """An EMA state whose codebook is exactly ``centers``: ``N_k = n_k``, ``m_k = c_k N~_k``."""
    xp = B.get_namespace(centers)
    cluster_size = xp.astype(counts, centers.dtype)  # (K,)
    smoothed = laplace_smoothing(cluster_size, eps)  # (K,)
    return {
        "codebook": centers,
        "cluster_size": cluster_size,
        "embed_avg": centers * smoothed[:, None],
        "initted": True,
    }


# --------------------------------------------------------------------------------------------
# several levels
# --------------------------------------------------------------------------------------------


class ResidualClustering:
    """Residual VQ fitted as a hierarchical clusterer: one k-means per level, on the residuals.

    ``fit(X)`` runs, for l = 0..L-1, a :class:`VQClustering` with K clusters on ``r_l`` and then
    ``r_{l+1} = r_l - mu^(l)_{k_l}``.  ``predict(X)`` encodes rows with the fitted codebooks and
    returns the semantic IDs: greedily with ``beam_size=1`` (what :class:`vqref.ResidualVQ` does in
    eval mode), else by beam search (:func:`vqref.core.beam.residual_encode_beam`, score
    ``"error"``): b partial codes per row, and per row the greedy code wherever the search does
    not reconstruct strictly better.  The codebooks are fitted greedily in either case; the
    training rows' ``labels_``, ``counts_`` and ``inertia_`` describe their encoding with
    ``beam_size``.

    Parameters
    ----------
    num_levels : L
    codebook_size : K, clusters per level
    iters : Lloyd iterations per level (default 20)
    init : ``"k-means++"`` (default) or ``"random"``, the initialisation of every level
    use_cosine_sim : cosine assignment and unit centroids at every level (see the module notes)
    seed : seed or numpy Generator; level l uses the l-th of L generators spawned from it
    chunk_size : rows per chunk of the nearest-centroid search (and of the beam search)
    beam_size : b >= 1, partial codes kept per row when encoding (1: greedy, the default)

    Attributes
    ----------
    (set by ``fit``)

    cluster_centers_ : (L, K, D), X's library and dtype: the codebooks
    labels_ : (N, L) int64, the training rows' semantic IDs (equal to ``predict(X)``)
    counts_ : (L, K) int64, how many training rows chose each code at each level
    inertia_ : tuple of L floats, the residual energy ``sum_i ||r_{l+1, i}||^2`` of ``labels_``
        after each level.  Euclidean with ``beam_size=1``: non-increasing, because each level's
        centroids are means of the rows assigned to them; cosine, or a beam (which may trade a
        larger early residual for a smaller final one): not guaranteed
    n_features_in_ : D
    """

    def __init__(
        self,
        num_levels: int,
        codebook_size: int,
        *,
        iters: int = 20,
        init: str = "k-means++",
        use_cosine_sim: bool = False,
        seed: Any = None,
        chunk_size: int | None = None,
        beam_size: int = 1,
    ):
        self.num_levels = check_int("num_levels", num_levels, 1)
        self.codebook_size = check_int("codebook_size", codebook_size, 1)
        self.iters = check_int("iters", iters, 1)
        if not (isinstance(init, str) and init in _INITS):
            raise ValueError(f"init must be one of {_INITS}, got {init!r}")
        self.init = init
        self.use_cosine_sim = check_bool("use_cosine_sim", use_cosine_sim)
        check_seed("seed", seed)
        self.seed = seed
        self.chunk_size = None if chunk_size is None else check_int("chunk_size", chunk_size, 1)
        self.beam_size = check_int("beam_size", beam_size, 1)

    def __repr__(self) -> str:
        return (
            f"ResidualClustering(num_levels={self.num_levels}, codebook_size={self.codebook_size}, "
            f"iters={self.iters}, init={self.init!r}, use_cosine_sim={self.use_cosine_sim}, beam_size={self.beam_size})"
        )

    def _level_codes(self, centers: Array) -> Array:
        """The vectors a level subtracts: the centroids, l2-normalised for cosine codebooks."""
        return l2norm(centers) if self.use_cosine_sim else centers

    def fit(self, X: Array) -> "ResidualClustering":
        """Fit the L codebooks level by level on ``X (N, D)``; returns ``self``."""
        X = _check_data(X)
        xp = B.get_namespace(X)
        gens = B.as_generator(self.seed).spawn(self.num_levels)
        residual = X  # r_0
        centers = []
        options = dict(iters=self.iters, init=self.init, use_cosine_sim=self.use_cosine_sim, chunk_size=self.chunk_size)
        for level in range(self.num_levels):
            vq = VQClustering(self.codebook_size, seed=gens[level], **options).fit(residual)
            centers.append(vq.cluster_centers_)
            residual = residual - xp.take(self._level_codes(vq.cluster_centers_), vq.labels_, axis=0)  # r_{l+1}
        # The training rows encoded as predict() encodes them (greedy: the fit's own labels).
        labels = self._encode(X, centers)  # (N, L)
        L, K, cosine = self.num_levels, self.codebook_size, self.use_cosine_sim
        counts = xp.stack([B.bincount(labels[:, level], K) for level in range(L)])  # (L, K)
        prefixes = [labels[:, : level + 1] for level in range(L)]  # the codes of levels 0..l
        energy = [xp.sum(reconstruction_errors(X, centers, p, use_cosine_sim=cosine)) for p in prefixes]
        inertia = tuple(float(v) for v in B.to_numpy(xp.stack(energy)))  # one host sync
        self.cluster_centers_ = xp.stack(centers, axis=0)  # (L, K, D)
        self.labels_, self.counts_, self.inertia_, self.n_features_in_ = labels, counts, inertia, X.shape[1]
        return self

    def fit_predict(self, X: Array) -> Array:
        """``fit(X)`` and return ``labels_ (N, L)``."""
        return self.fit(X).labels_

    def _encode(self, X: Array, codebooks: list) -> Array:  # (N, L) codes of X with L codebooks (K, D)
        options = dict(use_cosine_sim=self.use_cosine_sim, chunk_size=self.chunk_size)
        return residual_encode_beam(X, codebooks, self.beam_size, **options).codes

    def predict(self, X: Array) -> Array:
        """Semantic IDs ``(N, L)`` int64: the residual code of every row (greedy, or the beam's)."""
        X = _fitted_input(self, X)
        c = _centers_as(self, X)  # (L, K, D)
        return self._encode(X, [c[level, ...] for level in range(self.num_levels)])

    def decode(self, codes: Array) -> Array:
        """The reconstruction ``sum_l mu^(l)_{k_l}`` of semantic IDs ``codes (N, L)``: ``(N, D)``.

        A prefix ``codes[:, :l]`` (l < L) decodes the coarser reconstruction of the first l levels.
        """
        _require_fit(self)
        if not B.is_array(codes) or isinstance(codes, np.ma.MaskedArray):  # lists of IDs: to the codebooks
            ids, c = as_array(codes, "codes", "an (N, l) integer array"), self.cluster_centers_
            codes = B.from_numpy(ids, B.get_namespace(c), device=B.get_device(c))
        xp = B.get_namespace(codes, self.cluster_centers_)
        if codes.ndim != 2 or not 1 <= codes.shape[1] <= self.num_levels or not xp.isdtype(codes.dtype, "integral"):
            raise ValueError(f"codes must be an integer array (N, l) with 1 <= l <= {self.num_levels}")
        if codes.shape[0] and (int(xp.min(codes)) < 0 or int(xp.max(codes)) >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size})")
        out = None
        for level in range(codes.shape[1]):
            q = xp.take(self._level_codes(self.cluster_centers_[level, ...]), codes[:, level], axis=0)  # (N, D)
            out = q if out is None else out + q
        return out

    def collision_rate(self, codes: Array) -> float:
        """The fraction of rows whose whole ID is shared with another row (see :func:`collision_rate`)."""
        return collision_rate(codes)

    def to_residual_vq(self, **vq_kwargs: Any):
        """A :class:`vqref.ResidualVQ` in eval mode holding the fitted codebooks.

        Its eval indices equal :meth:`predict` and its output equals :meth:`decode` of them, so
        the fit can be used as a quantizer (or trained further: the EMA statistics are seeded with
        the cluster sizes of ``labels_``, ``m_k = mu_k N~_k``).  With ``beam_size = b > 1`` the
        module encodes in eval as :meth:`predict` does (``eval_beam_size=b``,
        ``beam_score="error"``) and greedily in training (``beam_size=1``).  ``vq_kwargs`` pass to
        the constructor (decay, commitment_weight, gradient_routing, beam options, ...).
        """
        from .quantizers import ResidualVQ

        _require_fit(self)
        c = self.cluster_centers_
        xp = B.get_namespace(c)
        beam = {} if self.beam_size == 1 else dict(beam_size=1, eval_beam_size=self.beam_size, beam_score="error")
        rq = ResidualVQ(
            dim=self.n_features_in_,
            num_quantizers=self.num_levels,
            codebook_size=self.codebook_size,
            use_cosine_sim=self.use_cosine_sim,
            dtype=check_dtype_name("dtype", c.dtype),
            xp=xp,
            device=B.get_device(c),
            chunk_size=self.chunk_size,
            **{**beam, **vq_kwargs},
        )
        eps = rq.layers[0].eps
        state = {}
        for level in range(self.num_levels):
            level_state = _ema_state(c[level, ...], self.counts_[level, ...], eps)
            state.update({f"{level}.{k}": v for k, v in level_state.items()})
        rq.load_state_dict(state)
        return rq.eval()
