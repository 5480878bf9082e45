"""Harness of the conformance suite: vector-quantize-pytorch and vqref side by side.

Symbols: N rows (all leading axes flattened), D dim, K codes, Q depths (1 for VectorQuantize).

Every conformance test follows the same recipe:

1. build the vector-quantize-pytorch ("vqp") module under ``torch.manual_seed`` and convert it
   with :func:`vqref.interop.from_vector_quantize_pytorch`, so both start from one state;
2. feed both the same float32 batch in training mode; for vqp ``x.requires_grad_()`` and
   ``((quantized * g).sum() + losses.sum()).backward()`` with a random ``g``; for vqref
   ``dx = vq.backward(g, 1.0)`` (``rq.backward(g, ones(Q))``);
3. compare quantized, indices, losses, dx, codebook gradients and the state after the step
   (:func:`compare_step`), then take the next step (:func:`run_steps`).

The scale of ``g``.  The loss gradient ``(2 beta / (N D)) (x - q)`` is about 1e-4 per element
while a unit-variance ``g`` would be 1; a comparison with a tolerance relative to the largest
entry would then not see an error in the loss gradient at all.  ``g`` is therefore drawn with
standard deviation ``2 / (N D)``, the size of the loss gradient, so both terms show in dx.

Random draws.  vqref draws on the host from each module's numpy Generator; vqp from torch's
global generator.  vqp exposes its sampling as instance attributes of its ``Codebook``
(``sample_fn`` for the k-means initial means, ``replace_sample_fn`` for dead-code
replacements) and draws the orthogonal regulariser's random code subset with
``torch.randperm``.  :func:`vqp_draws_like_vqref` replays a *copy* of each vqref generator in the
order vqref will consume it and hands vqp exactly those rows, so both libraries make the same
choices without changing either library's code.

Near ties.  vqp ranks codes by ``sqrt(max(||x||^2 + ||c||^2 - 2 x.c, 1e-8))`` in float32, vqref by
the centred expansion (vqref/ops/distance.py).  Both are correct to their rounding error, so two
codes whose distances differ by less than that error may be ranked differently.  An index
mismatch is accepted only if float64 distances confirm such a near tie (:func:`near_tie_rows`);
the row is then left out of the row-wise comparisons, the codes it touched out of the state
comparison, and vqref is re-synchronised from vqp's state before the next step.

k-means.  Lloyd's iterations amplify rounding differences on weakly clustered data, so the
k-means configurations use hierarchically clustered batches (:func:`batch`); a first batch on
which k-means would leave a cluster empty (a documented difference) is redrawn; and on the step
that runs k-means at depths >= 1 of a residual stack the torch input does not require grad, so
that vqp subtracts the code itself, as vqref does, when it forms the residuals it clusters.
Rows whose residual has cancelled to rounding level are left out of the rotation-trick dx
comparison.  docs/deviations.md section 10 explains each choice.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pytest
import torch

from vqref import backend as B
from vqref.interop import export_state_dict, from_vector_quantize_pytorch

U32 = 2.0**-24  # unit roundoff of float32


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The suite's tensors are small: one intra-op thread per worker avoids oversubscribing the
    CI's two cores (pytest -n 2), where spinning OpenMP threads cost more than they save."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------ layers and names


def vqp_is_residual(t: Any) -> bool:
    return hasattr(t, "layers")


def vqp_layers(t: Any) -> list:
    return list(t.layers) if vqp_is_residual(t) else [t]


def vqref_layers(r: Any) -> list:
    return list(r.layers) if r.is_stack else [r]


def num_depths(r: Any) -> int:
    return r.num_quantizers if r.is_stack else 1


def is_shared(r: Any) -> bool:
    return r.is_stack and r.shared_codebook


def grad_key(vqp_name: str, shared: bool) -> str:
    """vqp parameter name -> vqref gradient key (``_codebook.embed`` -> ``codebook``,
    ``layers.2._codebook.embed`` -> ``2.codebook``; a shared codebook is ``codebook``)."""
    if vqp_name == "_codebook.embed":
        return "codebook"
    assert vqp_name.startswith("layers.") and vqp_name.endswith("._codebook.embed"), vqp_name
    return "codebook" if shared else vqp_name.split(".")[1] + ".codebook"


def host_orthogonal_loss(codebook: np.ndarray, code_ids: np.ndarray | None = None) -> float:
    """Orthogonal regulariser in float64 numpy, written from its definition (arXiv 2112.00384 eq. 2)."""
    c = np.asarray(codebook, dtype=np.float64)
    if code_ids is not None:
        c = c[np.unique(code_ids)]
    n = c.shape[0]
    chat = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-6)
    gram = chat @ chat.T
    return float((gram**2).sum() / n**2 - 1.0 / n)


# ------------------------------------------------------------------ building a pair


def make_pair(make_vqp: Callable[[], Any], *, seed: int = 0):
    """vqp module built under ``torch.manual_seed(seed)`` and its vqref conversion (seeded too)."""
    torch.manual_seed(seed)
    t = make_vqp()
    return t, from_vector_quantize_pytorch(t, seed=seed)


def batch(
    rng: np.random.Generator, shape: tuple, *, centres: int = 0, levels: int = 1, spread: float = 0.3
) -> np.ndarray:
    """A float32 batch of ``shape (..., D)``.

    ``centres = 0``: standard normal rows.  Otherwise clustered rows with a hierarchy of
    ``levels``: ``x = sum_l 4^-l A_l[c_l] + noise``, each ``A_l`` holding ``centres`` standard
    normal centres and each ``c_l`` drawn at random, with noise of standard deviation
    ``spread * 4^-(levels - 1)``.  Each depth of a residual quantizer then sees clusters whose
    assignments have wide margins, which is what k-means needs to be reproducible across two
    implementations (see test_kmeans_conformance.py).
    """
    D = shape[-1]
    n = int(np.prod(shape[:-1]))
    if not centres:
        return rng.standard_normal(shape).astype(np.float32)
    x = np.zeros((n, D))
    for level in range(levels):
        means = rng.standard_normal((centres, D)) * 0.25**level
        x += means[rng.integers(0, centres, n)]
    x += spread * 0.25 ** (levels - 1) * rng.standard_normal((n, D))
    return x.reshape(shape).astype(np.float32)


# ------------------------------------------------------------------ shared random draws


class _Plan:
    """The draws one vqref generator will make in the next training forward, in its order."""

    def __init__(self, gen: np.random.Generator):
        self.gen = copy.deepcopy(gen)  # the module's own generator is not touched
        self.kmeans_rows = None
        self.restart_rows = None

    def draw_kmeans(self, N: int, K: int) -> None:
        # vqref.core.kmeans.sample_initial_means
        self.kmeans_rows = self.gen.choice(N, size=K, replace=False) if N >= K else self.gen.integers(0, N, size=K)

    def draw_restarts(self, N: int, K: int) -> None:
        # vqref.core.ema.expire_dead_codes: one candidate row per code
        self.restart_rows = self.gen.permutation(N)[:K] if N >= K else self.gen.integers(0, N, size=K)

    def subset(self, n: int, m: int) -> np.ndarray:
        # vqref.ops.orthogonal.select_codes
        return self.gen.choice(n, size=m, replace=False)


@contextlib.contextmanager
def vqp_draws_like_vqref(t: Any, r: Any, N: int):
    """Within the block, vqp's random draws are the ones vqref's next training forward makes.

    N is the number of rows each depth quantizes.  Per vqref generator the order of draws is
    k-means initial means (uninitialised codebooks), dead-code candidates
    (``threshold_ema_dead_code``), the orthogonal regulariser's subset
    (``orthogonal_reg_max_codes``, drawn after the state update because the regulariser is
    evaluated on the updated codebook) -- vqp's order too.  The subset size is only known during
    the forward, so that draw is made lazily, from the plan's generator after the eager draws.
    """
    layers = vqref_layers(r)
    tl = vqp_layers(t)
    codebooks = [tl[0]._codebook] if is_shared(r) else [l._codebook for l in tl]
    plans = []
    for layer in layers:
        plan = _Plan(layer.generator)
        K = layer.codebook_size
        if not layer.initted:
            plan.draw_kmeans(N, K)
        if layer.threshold_ema_dead_code > 0:
            assert not is_shared(r), "shared codebooks restart codes differently in vqp (see deviations)"
            plan.draw_restarts(N, K)
        plans.append(plan)

    saved = []
    for cb, plan in zip(codebooks, plans):

        def sample_fn(samples, num, plan=plan):
            assert samples.shape[0] == 1 and num == len(plan.kmeans_rows)
            return samples[:, torch.as_tensor(plan.kmeans_rows)]

        def replace_fn(samples, num, plan=plan, cb=cb):
            dead = torch.nonzero(cb.cluster_size[0] < cb.threshold_ema_dead_code)[:, 0]  # ascending, as vqp fills them
            assert dead.numel() == num
            return samples[:, torch.as_tensor(plan.restart_rows)[dead]]

        saved.append((cb, cb.__dict__.get("sample_fn"), cb.__dict__.get("replace_sample_fn")))
        cb.sample_fn, cb.replace_sample_fn = sample_fn, replace_fn

    orig_randperm = torch.randperm
    subset_layers = [(p, l) for p, l in zip(plans, layers) if l.orthogonal_reg_max_codes is not None]

    def randperm(n, *args, **kwargs):
        # only vqp's orthogonal-subset draw reaches torch.randperm here (the samplers are replaced)
        assert len(subset_layers) == 1, "code subsets are replayed for a single VectorQuantize only"
        plan, layer = subset_layers[0]
        pick = plan.subset(int(n), layer.orthogonal_reg_max_codes)
        rest = np.setdiff1d(np.arange(int(n)), pick)
        return torch.as_tensor(np.concatenate([pick, rest]), device=kwargs.get("device"))

    torch.randperm = randperm
    try:
        yield
    finally:
        torch.randperm = orig_randperm
        for cb, fn, rfn in saved:
            cb.sample_fn, cb.replace_sample_fn = fn, rfn


@contextlib.contextmanager
def capture_assignment_codebooks(t: Any, out: list, empty: list):
    """Append to ``out`` the codebook (K, D) each depth of vqp's forward assigns with.

    ``Codebook.init_embed_`` runs at the start of every codebook forward, after a possible
    k-means initialisation and before the distances, so the codebook right after it is the one
    the assignment sees.  When it did initialise, the number of clusters k-means left empty is
    appended to ``empty`` (vqp's ``cluster_size`` holds the k-means counts at that moment).
    """
    cbs = []
    for layer in vqp_layers(t):
        cb = layer._codebook
        if any(cb is c for c in cbs):
            continue
        cbs.append(cb)
        original = cb.init_embed_

        def init_then_capture(data, mask=None, cb=cb, original=original):
            was_initted = bool(cb.initted)
            original(data, mask=mask)
            if not was_initted:
                empty.append(int((cb.cluster_size == 0).sum()))
            out.append(cb.embed.detach()[0].numpy().astype(np.float64))

        cb.init_embed_ = init_then_capture
    try:
        yield
    finally:
        for cb in cbs:
            del cb.init_embed_


# ------------------------------------------------------------------ one step in each library


@dataclass
class Step:
    quantized: np.ndarray  # (N, D)
    indices: np.ndarray  # (N, Q)
    losses: np.ndarray  # (Q,)
    dx: np.ndarray | None  # (N, D)
    grads: dict = field(default_factory=dict)  # vqref key -> (K, D)
    codebooks: list = field(default_factory=list)  # Q arrays (K, D), float64: assignment codebooks (vqp)
    kmeans_empty: list = field(default_factory=list)  # per k-means initialisation: empty clusters (vqp)


def vqp_step(t: Any, x: np.ndarray, g: np.ndarray | None) -> Step:
    """One vqp forward (and backward when ``g`` is given, training mode)."""
    D = x.shape[-1]
    xt = torch.from_numpy(x.copy())
    if g is not None:
        xt.requires_grad_()
    codebooks: list = []
    empty: list = []
    with capture_assignment_codebooks(t, codebooks, empty):
        q, idx, loss = t(xt)
    dx = None
    grads = {}
    if g is not None:
        total = (q * torch.from_numpy(g)).sum() + loss.sum()
        total.backward()
        dx = xt.grad.numpy().reshape(-1, D).copy()
        shared = vqp_is_residual(t) and t.shared_codebook
        for name, p in t.named_parameters():
            if p.grad is not None:
                grads[grad_key(name, shared)] = p.grad[0].numpy().copy()
                p.grad = None
    Q = t.num_quantizers if vqp_is_residual(t) else 1
    return Step(
        q.detach().numpy().reshape(-1, D).copy(),
        idx.numpy().reshape(-1, Q).copy(),
        np.atleast_1d(loss.detach().numpy()).copy(),
        dx,
        grads,
        codebooks,
        empty,
    )


def vqref_step(r: Any, x: np.ndarray, g: np.ndarray | None) -> Step:
    """One vqref forward (and backward when ``g`` is given, training mode)."""
    D = x.shape[-1]
    Q = num_depths(r)
    q, idx, loss = r(x)
    dx = None
    if g is not None:
        dx = r.backward(g, np.ones(Q, np.float32)) if r.is_stack else r.backward(g, 1.0)
        dx = B.to_numpy(dx).reshape(-1, D)
    return Step(
        B.to_numpy(q).reshape(-1, D),
        B.to_numpy(idx).reshape(-1, Q),
        np.atleast_1d(B.to_numpy(loss)),
        dx,
        {k: B.to_numpy(v) for k, v in r.grads.items()} if g is not None else {},
    )


# ------------------------------------------------------------------ comparisons


def near_tie_rows(x: np.ndarray, codebooks: list, idx_ref: np.ndarray, idx_vqp: np.ndarray, cosine: bool):
    """Rows whose indices differ, after checking that each difference is a near tie.

    Parameters
    ----------
    x : (N, D) the input
    codebooks : Q arrays (K, D), the codebooks vqp assigned with (float64 copies)
    idx_ref, idx_vqp : (N, Q) indices

    Returns
    -------
    first : (N,) int, the first depth at which a row's indices differ (Q where they never do).
        Later depths of such a row quantize a different residual and are not compared.

    A near tie: the two codes' float64 distances (cosine: similarities) differ by less than the
    rounding error of vqp's float32 expanded form, ``16 u (||r|| + ||c||)^2 + 1e-8``
    (cosine: ``64 u``).  Any other mismatch raises AssertionError.
    """
    N, Q = idx_ref.shape
    first = np.full(N, Q)
    residual = np.asarray(x, dtype=np.float64).reshape(N, -1)
    for level in range(Q):
        C = codebooks[level]
        new = (idx_ref[:, level] != idx_vqp[:, level]) & (first == Q)
        if new.any():
            r = residual[new]
            ca, cb = C[idx_ref[new, level]], C[idx_vqp[new, level]]
            if cosine:
                rh = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-6)
                gap = np.abs((rh * ca).sum(1) - (rh * cb).sum(1))
                tol = 64 * U32 * np.ones_like(gap)
            else:
                gap = np.abs(((r - ca) ** 2).sum(1) - ((r - cb) ** 2).sum(1))
                big = np.linalg.norm(r, axis=1) + np.maximum(np.linalg.norm(ca, axis=1), np.linalg.norm(cb, axis=1))
                tol = 16 * U32 * big**2 + 1e-8
            assert np.all(gap <= tol), (
                f"depth {level}: {int((gap > tol).sum())} index mismatches are not near ties "
                f"(largest gap / tolerance {float(np.max(gap / tol)):.3g})"
            )
            first[new] = level
        residual = residual - C[idx_vqp[:, level]]
    return first


def assert_close(actual, expected, *, rtol: float, atol_rel: float, what: str) -> None:
    """``|actual - expected| <= rtol |expected| + atol_rel * max|expected|`` elementwise."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shapes {actual.shape} vs {expected.shape}"
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol_rel * scale + 1e-12, err_msg=what)


def gradients_agree(actual, expected, rtol: float = 1e-4, atol_rel: float = 1e-4) -> bool:
    """The gradient comparison of :func:`compare_step` as a predicate (for negative controls)."""
    try:
        assert_close(actual, expected, rtol=rtol, atol_rel=atol_rel, what="gradient")
    except AssertionError:
        return False
    return True


@dataclass
class Report:
    """What one compared step saw (for assertions on the harness itself)."""

    mismatched_rows: int
    compared_rows: int


def compare_step(
    ref: Step,
    vqp: Step,
    x: np.ndarray,
    r: Any,
    t: Any,
    *,
    cosine: bool,
    codebook_grads: bool = True,
) -> Report:
    """Assert that one step agrees (outputs, losses, gradients, state after the step).

    ``codebook_grads=False``: skip the codebook gradients (where vqp's are known to be wrong,
    docs/deviations.md).
    """
    N, Q = ref.indices.shape
    D = x.shape[-1]
    xf = x.reshape(N, D)
    try:
        first = near_tie_rows(xf, vqp.codebooks, ref.indices, vqp.indices, cosine)
    except AssertionError as e:
        if any(vqp.kmeans_empty):
            raise AssertionError(
                f"{e}; k-means left empty clusters {vqp.kmeans_empty}: vqp turns those codes into zero vectors, "
                "vqref keeps their centroid (docs/deviations.md), so this batch cannot be compared code for code"
            ) from None
        raise
    clean = first == Q  # (N,) rows that agree at every depth
    # codes touched by a mismatched row at its first differing depth or later, per depth
    touched = [np.union1d(ref.indices[first <= l, l], vqp.indices[first <= l, l]) for l in range(Q)]

    np.testing.assert_array_equal(ref.indices[clean], vqp.indices[clean], err_msg="indices")
    assert_close(ref.quantized[clean], vqp.quantized[clean], rtol=1e-5, atol_rel=1e-5, what="quantized")

    ref_losses, vqp_losses = ref.losses.astype(np.float64), vqp.losses.astype(np.float64)
    depth_ok = np.arange(Q) <= (first.min() if (~clean).any() else Q)
    assert_close(ref_losses[depth_ok], vqp_losses[depth_ok], rtol=2e-5, atol_rel=1e-6, what="losses")

    if ref.dx is not None:
        # With the rotation trick a depth's surrogate gradient follows the direction of its
        # residual.  A residual that has cancelled to a small fraction of the one before it (a
        # row sitting on its code, e.g. a k-means singleton) has a direction made of rounding
        # error -- different in the two libraries, since vqp subtracts the rotated output
        # (equal to the code only to rounding) -- and lambda = ||q|| / ||r|| magnifies it.
        # Such rows are left out of dx; they must stay rare.
        conditioned = clean.copy()
        if vqref_layers(r)[0].rotation_trick and r.is_stack:
            norms = np.stack([np.linalg.norm(B.to_numpy(a), axis=1) for a in r.last_residuals[:Q]], axis=1)  # (N, Q)
            cancelled = np.any(norms[:, 1:] < 1e-2 * norms[:, :-1], axis=1)  # (N,)
            assert cancelled.mean() <= 0.01, f"{int(cancelled.sum())} rows with cancelled residuals"
            conditioned &= ~cancelled
        assert_close(ref.dx[conditioned], vqp.dx[conditioned], rtol=1e-4, atol_rel=1e-4, what="dx")
        if codebook_grads:
            assert sorted(ref.grads) == sorted(vqp.grads), f"gradient keys {sorted(ref.grads)} vs {sorted(vqp.grads)}"
            for key in ref.grads:
                level = 0 if key == "codebook" else int(key.split(".")[0])
                codes = np.concatenate(touched) if is_shared(r) else touched[level]
                keep = np.setdiff1d(np.arange(ref.grads[key].shape[0]), codes)
                assert_close(ref.grads[key][keep], vqp.grads[key][keep], rtol=1e-4, atol_rel=1e-4, what=f"grad {key}")

    if r.training:
        mine = export_state_dict(r)
        theirs = {k: v.numpy() for k, v in t.state_dict().items()}
        assert sorted(mine) == sorted(theirs)
        for key, value in theirs.items():
            if value.dtype == bool:
                assert bool(mine[key]) == bool(value), key
                continue
            level = int(key.split(".")[1]) if key.startswith("layers.") else 0
            codes = np.concatenate(touched) if is_shared(r) else touched[level]
            keep = np.setdiff1d(np.arange(value.shape[1]), codes)
            assert_close(mine[key][0, keep], value[0, keep], rtol=1e-5, atol_rel=2e-6, what=f"state {key}")
    return Report(int((~clean).sum()), int(clean.sum()))


def resync(r: Any, t: Any) -> None:
    """Load vqp's state into vqref (after a near tie has made the states differ slightly)."""
    fresh = from_vector_quantize_pytorch(t)
    r.load_state_dict(fresh.state_dict())


def sgd_step(r: Any, t: Any, ref: Step, vqp: Step, lr: float) -> None:
    """One plain gradient step on every learnable codebook, each library with its own gradient."""
    shared = vqp_is_residual(t) and t.shared_codebook
    with torch.no_grad():
        for name, p in t.named_parameters():
            p -= lr * torch.from_numpy(vqp.grads[grad_key(name, shared)])[None]
    for key in list(r.params):
        r.params[key] = r.params[key] - lr * r.grads[key]


def _batch_without_empty_clusters(t: Any, r: Any, x: np.ndarray, draw: Callable[[], np.ndarray]) -> np.ndarray:
    """The k-means batch: ``x``, or a redrawn batch if k-means would leave a cluster empty.

    An empty cluster is the one documented difference of the k-means initialisation (vqp
    makes its code the zero vector, vqref keeps the centroid; pinned in test_deviations.py).
    A batch where it happens cannot be compared code for code, so the first training batch
    is redrawn (probing a copy of the torch module, with the draws vqref will make; vqref's
    own generators are only copied) until none is empty.
    """
    N = int(np.prod(x.shape[:-1]))
    for _ in range(20):
        tc = copy.deepcopy(t)
        with vqp_draws_like_vqref(tc, r, N):
            probe = vqp_step(tc, x, None)
        if not any(probe.kmeans_empty):
            return x
        x = draw()
    raise AssertionError("20 batches in a row left a k-means cluster empty; use data with more structure")


def run_steps(
    make_vqp: Callable[[], Any],
    *,
    steps: int = 3,
    shape: tuple = (4, 128, 32),
    seed: int = 0,
    centres: int = 0,
    lr: float | None = None,
    levels: int = 1,
    codebook_grads: bool = True,
) -> list[Report]:
    """Build a pair and take ``steps`` training steps in both, comparing after each one.

    ``lr``: after each step, also take a gradient step on the learnable codebooks (so that a
    learnable codebook's trajectory is compared too).
    """
    t, r = make_pair(make_vqp, seed=seed)
    t.train()
    r.train()
    rng = np.random.default_rng(seed + 1)
    N, D = int(np.prod(shape[:-1])), shape[-1]
    cosine = vqref_layers(r)[0].use_cosine_sim
    reports = []
    for _ in range(steps):
        x = batch(rng, shape, centres=centres, levels=levels)
        if not all(layer.initted for layer in vqref_layers(r)):
            x = _batch_without_empty_clusters(t, r, x, lambda: batch(rng, shape, centres=centres, levels=levels))
        g = (rng.standard_normal(shape) * (2.0 / (N * D))).astype(np.float32)
        if r.is_stack and not r.shared_codebook and not all(l.initted for l in r.layers):
            # k-means on the residuals of depths >= 1.  With a gradient, vqp subtracts the
            # estimator's output, equal to the code only to rounding, and Lloyd's iterations can
            # amplify that into different centroids on weakly clustered residuals.  Without one
            # (the input does not require grad) it subtracts the code itself, as vqref does.
            # This step compares values and state; the gradients are compared from the next.
            g = None
        with vqp_draws_like_vqref(t, r, N):
            vqp = vqp_step(t, x, g)
        ref = vqref_step(r, x, g)
        report = compare_step(ref, vqp, x, r, t, cosine=cosine, codebook_grads=codebook_grads)
        reports.append(report)
        if lr is not None and g is not None:
            sgd_step(r, t, ref, vqp, lr)
        if report.mismatched_rows:
            resync(r, t)  # after the gradient step: the tied rows' codes got different gradients
    return reports
