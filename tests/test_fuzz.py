"""Fuzzing the quantizer modules over every option and over hostile inputs (docs/reliability.md).

Hypothesis draws a configuration (metric, codebook training mode, k-means, orthogonal
regulariser and its code subsets, dead-code restarts, rotation trick, Gumbel sampling, the
straight-through Gumbel-softmax and soft estimators, the diversity loss, residual depth 1-4 with
either gradient routing, shared codebook, state and input dtypes, numpy or array_api_strict,
chunked search; the structural options: projections, heads, quantize dropout per batch or per
sample, per-depth codebook sizes, beam search) and an input batch built from hostile pieces
(zeros, duplicated rows, antipodal pairs, per-row magnitudes from 1e-30 to 1e15, a single token,
K > N), with or without a mask (none, some or all tokens present), optionally with a loaded
codebook that is itself hostile (antipodal to the inputs, all codes equal, zero codes, huge
codes, zero EMA counts).  For every example:

* a few training steps: forward, backward with a random upstream gradient; every output,
  gradient and state entry is finite and has the documented shape and dtype; absent tokens have
  the index -1 at every depth, the output 0 and no gradient;
* an eval forward leaves the state bit-identical, and ``get_output_from_indices(indices)``
  equals the eval output (bit-exactly when the input dtype is the state dtype);
* invalid option combinations raise a ``ValueError`` that names the options, and nothing else
  raises.

Magnitude bound.  Entries are at most 1e15 in absolute value, in float32 as in float64.  The
squared norms and the mean squared error then stay below ``4 M 1e30`` for ``M = N D`` elements,
far from float32's 3.4e38 for any batch below 1e7 elements.  Beyond ``|x| ~ 1e19`` a single
squared entry overflows float32 and an infinite loss is the correct IEEE answer, not a bug; the
bound is ``|x| <= sqrt(finfo.max / (4 M))`` (docs/reliability.md).

Profiles.  ``HYPOTHESIS_PROFILE=ci`` (default) runs a few hundred examples in total, derandomized
so CI is reproducible; ``HYPOTHESIS_PROFILE=nightly`` runs several thousand with fresh random
seeds.  The settings are applied per test (never ``settings.load_profile``), so importing this
file changes nothing for the rest of the session.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import fuzz_settings
from hypothesis import assume, given, note, settings
from hypothesis import strategies as st

from vqref import ResidualVQ, VectorQuantize
from vqref import backend as B

# ------------------------------------------------------------------ profiles


# examples per test: (ci, nightly).  The ci profile draws a few hundred examples in all.
_EXAMPLES = {
    "vq": (160, 2500),
    "rvq": (140, 2000),
    "config": (100, 1000),
}


def _settings(kind: str) -> settings:
    return fuzz_settings(*_EXAMPLES[kind])


# ------------------------------------------------------------------ strategies

BACKENDS = ("numpy", "array_api_strict")
DTYPES = ("float32", "float64")
# per-row magnitudes; 0 makes a zero row.  1e15 is the documented upper bound (module docstring).
SCALES = (0.0, 1e-30, 1e-12, 1e-3, 1.0, 1e3, 1e8, 1e15)
MAX_ABS = 1e15


@st.composite
def lead_shapes(draw, max_tokens: int = 12):
    """Leading axes of the input, one to three of them, with 1 <= N <= max_tokens tokens."""
    if draw(st.booleans()):
        return (1,) if draw(st.booleans()) else (draw(st.integers(1, max_tokens)),)
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(1, 4)) for _ in range(ndim))
    assume(int(np.prod(shape)) <= max_tokens)
    return shape


@st.composite
def batches(draw, D: int):
    """Host float64 inputs ``(*lead, D)`` built from hostile pieces; every entry finite, <= 1e15."""
    lead = draw(lead_shapes())
    N = int(np.prod(lead))
    gen = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    pattern = draw(st.sampled_from(["normal", "zeros", "duplicates", "antipodal", "mixed", "one_row_huge"]))
    base = gen.standard_normal((N, D))
    if pattern == "zeros":
        x = np.zeros((N, D))
    elif pattern == "duplicates":
        x = np.tile(base[:1], (N, 1))
    elif pattern == "antipodal":
        sign = np.where(np.arange(N) % 2 == 0, 1.0, -1.0)[:, None]
        x = sign * base[:1]
    elif pattern == "one_row_huge":
        x = base * 1e-30
        x[gen.integers(N)] *= 1e45  # one row at 1e15, the rest at 1e-30
    else:
        x = base
    if pattern == "mixed":
        scales = np.asarray(draw(st.lists(st.sampled_from(SCALES), min_size=N, max_size=N)))
        x = x * scales[:, None]
    else:
        x = x * draw(st.sampled_from(SCALES[1:]))
    x = np.clip(x, -MAX_ABS, MAX_ABS)
    note(f"input pattern={pattern} lead={lead}")
    return x.reshape(lead + (D,))


@st.composite
def codebook_overrides(draw, K: int, D: int, x: np.ndarray):
    """``None`` (keep the module's own init) or a hostile codebook state to load."""
    kind = draw(st.sampled_from(["own", "own", "antipodal", "equal", "zeros", "some_zero", "huge", "tiny"]))
    note(f"codebook={kind}")
    if kind == "own":
        return None
    gen = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rows = x.reshape(-1, D)
    if kind == "antipodal":
        # codes opposite to the inputs (and to each other where K allows)
        cb = -rows[gen.integers(0, rows.shape[0], size=K)]
        cb[1::2] = -cb[1::2]
    elif kind == "equal":
        cb = np.tile(gen.standard_normal((1, D)), (K, 1))
    elif kind == "zeros":
        cb = np.zeros((K, D))
    elif kind == "some_zero":
        cb = gen.standard_normal((K, D))
        cb[::2] = 0.0
    elif kind == "huge":
        cb = gen.standard_normal((K, D)) * MAX_ABS
    else:
        cb = gen.standard_normal((K, D)) * 1e-30
    cb = np.clip(cb, -MAX_ABS, MAX_ABS)
    counts = draw(st.sampled_from(["ones", "zeros", "random"]))
    cluster_size = {"ones": np.ones(K), "zeros": np.zeros(K), "random": gen.uniform(0, 3, K)}[counts]
    note(f"cluster_size={counts}")
    return {"codebook": cb, "cluster_size": cluster_size, "embed_avg": cb * cluster_size[:, None]}


@st.composite
def configurations(draw, residual: bool):
    """Keyword arguments for VectorQuantize / ResidualVQ, possibly an invalid combination."""
    D = draw(st.integers(1, 5))
    K = draw(st.integers(1, 9))
    mode = draw(st.sampled_from(["ema", "learnable", "frozen"]))
    kw = dict(
        dim=D,
        codebook_size=K,
        use_cosine_sim=draw(st.booleans()),
        ema_update=mode == "ema",
        learnable_codebook=mode == "learnable",
        decay=draw(st.sampled_from([0.0, 0.5, 0.8, 0.99, 0.999, 1.0])),
        eps=draw(st.sampled_from([0.0, 1e-5, 1e-2])),
        commitment_weight=draw(st.sampled_from([0.0, 0.25, 1.0])),
        kmeans_init=draw(st.booleans()),
        kmeans_iters=draw(st.integers(1, 3)),
        threshold_ema_dead_code=draw(st.sampled_from([0.0, 0.0, 0.5, 2.0])),
        rotation_trick=draw(st.booleans()),
        dtype=draw(st.sampled_from(DTYPES)),
        chunk_size=draw(st.sampled_from([None, None, 1, 2, 5])),
    )
    if mode == "learnable" and draw(st.booleans()):
        kw["codebook_weight"] = draw(st.sampled_from([0.0, 1.0]))
    if draw(st.booleans()):
        kw["orthogonal_reg_weight"] = draw(st.sampled_from([0.1, 10.0]))
        kw["orthogonal_reg_active_codes_only"] = draw(st.booleans())
        kw["orthogonal_reg_max_codes"] = draw(st.one_of(st.none(), st.integers(1, K + 1)))
    if draw(st.booleans()):  # sampling, the Gumbel-softmax estimators, the diversity loss
        kw["stochastic_sample_codes"] = draw(st.booleans())
        kw["sample_codebook_temp"] = draw(st.sampled_from([0.0, 0.1, 1.0, 10.0]))
        kw["straight_through"] = draw(st.booleans())
        kw["soft_assignment"] = draw(st.booleans())
        kw["codebook_diversity_loss_weight"] = draw(st.sampled_from([0.0, 0.5]))
        kw["codebook_diversity_temperature"] = draw(st.sampled_from([0.0, 1.0, 100.0]))
    if draw(st.booleans()):  # codes in another dimension: learnable projections
        kw["codebook_dim"] = draw(st.integers(1, 4))
    if residual:
        kw["num_quantizers"] = Q = draw(st.integers(1, 4))
        kw["shared_codebook"] = draw(st.booleans())
        kw["gradient_routing"] = draw(st.sampled_from(["per_depth", "sum"]))
        if not kw["shared_codebook"] and draw(st.booleans()):
            kw["codebook_size"] = [draw(st.integers(1, 9)) for _ in range(Q)]
        if draw(st.booleans()):
            kw["quantize_dropout"] = True
            kw["quantize_dropout_per_sample"] = draw(st.booleans())
            kw["quantize_dropout_cutoff_index"] = draw(st.integers(0, Q - 1))
            kw["quantize_dropout_multiple_of"] = draw(st.integers(1, 3))
        if draw(st.booleans()):
            kw["beam_size"] = draw(st.integers(1, 3))
            kw["beam_score"] = draw(st.sampled_from(["cumulative", "error"]))
    elif draw(st.booleans()):
        kw["heads"] = draw(st.integers(2, 3))
        kw["separate_codebook_per_head"] = draw(st.booleans())
    return kw


def invalid_reason(kw: dict) -> str | None:
    """The documented reason a combination is refused (an independent restatement), or None."""
    if kw["learnable_codebook"] and kw["ema_update"]:
        return "ema_update"
    if kw["use_cosine_sim"] and kw["learnable_codebook"]:
        return "use_cosine_sim"
    if kw.get("codebook_weight") is not None and not kw["learnable_codebook"]:
        return "codebook_weight"
    if kw["rotation_trick"] and (kw.get("codebook_dim") or kw["dim"]) == 1:  # the codes' width
        return "rotation_trick"
    soft = kw.get("straight_through") or kw.get("soft_assignment")
    if sum(bool(kw.get(k)) for k in ("rotation_trick", "straight_through", "soft_assignment")) > 1:
        return "at most one"
    if kw.get("soft_assignment") and kw.get("stochastic_sample_codes"):
        return "stochastic_sample_codes=False"
    if soft and kw.get("sample_codebook_temp", 1.0) == 0:
        return "needs sample_codebook_temp > 0"
    if soft and kw.get("gradient_routing") == "sum":
        return "gradient_routing"
    if kw.get("beam_size", 1) > 1 and (soft or kw.get("stochastic_sample_codes")):
        return "beam_size chooses the codes"
    if kw.get("heads", 1) > 1 and kw.get("num_quantizers", 1) > 1:
        return "with a residual stack"
    return None


def build(kw: dict, backend: str, seed: int):
    kw = dict(kw)
    if "num_quantizers" in kw:
        return ResidualVQ(seed=seed, xp=backend, **kw)
    return VectorQuantize(kw.pop("dim"), kw.pop("codebook_size"), seed=seed, xp=backend, **kw)


def _codebook_entries(module) -> list:
    """The prefixes of a module's codebook entries (one per codebook)."""
    if module.is_stack and not module.shared_codebook:
        return [f"{i}." for i in range(module.num_quantizers)]
    return [""]


# ------------------------------------------------------------------ checks


def _host(a) -> np.ndarray:
    return np.asarray(B.to_numpy(a))


def _assert_finite(name: str, a) -> None:
    h = _host(a)
    assert np.all(np.isfinite(h)), f"{name} has non-finite entries: {h}"


def _snapshot(module) -> dict:
    return {k: _host(v).copy() for k, v in module.state_dict().items()}


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _load_override(module, override: dict, initted: bool) -> None:
    """Load a hostile codebook state into every codebook whose shape it fits (the others, the
    projections and a codebook per head, keep theirs)."""
    xp = module.xp
    state = {k: B.from_numpy(np.asarray(B.to_numpy(v)), xp) for k, v in module.state_dict().items()}
    spec = module.state_spec()
    for p in _codebook_entries(module):
        if spec[p + "codebook"] == override["codebook"].shape:
            state.update({p + k: B.from_numpy(v, xp) for k, v in override.items()})
            state[p + "initted"] = initted
    module.load_state_dict(state)


def exercise(module, x_host: np.ndarray, in_dtype: str, seed: int, *, Q: int | None, mask=None) -> None:
    """Train a few steps, then eval and decode; assert finiteness, shapes, dtypes, equality."""
    xp = module.xp
    state_dtype = module.dtype
    sizes = np.asarray(module.codebook_sizes)
    spec = module.state_spec()
    dt = getattr(xp, in_dtype)
    x = B.from_numpy(x_host, xp, dtype=dt)
    lead = tuple(x_host.shape[:-1])
    H = module.heads
    idx_shape = lead + ((Q,) if Q is not None else (H,) if H > 1 else ())
    loss_shape = () if Q is None else (Q,)
    m = None if mask is None else B.from_numpy(mask, xp)
    absent = np.zeros(lead, dtype=bool) if mask is None else ~mask
    gen = np.random.default_rng(seed)
    module.train()
    for step in range(2):
        q, idx, loss = module(x, mask=m)
        assert tuple(q.shape) == tuple(x_host.shape) and q.dtype == dt
        assert tuple(idx.shape) == idx_shape and idx.dtype == xp.int64
        assert tuple(loss.shape) == loss_shape and loss.dtype == dt
        h_idx = _host(idx).reshape(lead + (-1,))
        limit = sizes[None, :] if Q is not None else sizes[:1]
        assert np.all(((h_idx >= 0) & (h_idx < limit)) | (h_idx == -1)), h_idx
        assert np.all(h_idx[absent] == -1) and np.all(_host(q)[absent] == 0)
        if Q is None or not module.quantize_dropout:
            assert np.all(h_idx[~absent] >= 0)  # every present token has every code
        _assert_finite(f"quantized (step {step})", q)
        _assert_finite(f"loss (step {step})", loss)
        dq = B.from_numpy(gen.standard_normal(x_host.shape), xp, dtype=dt)
        if Q is None:
            dx = module.backward(dq, dloss=float(gen.uniform(0.1, 2.0)))
        else:
            dx = module.backward(dq, dlosses=B.from_numpy(gen.uniform(0.1, 2.0, Q), xp, dtype=dt))
        assert tuple(dx.shape) == tuple(x_host.shape) and dx.dtype == dt
        _assert_finite(f"dx (step {step})", dx)
        assert np.all(_host(dx)[absent] == 0)
        for name, g in module.grads.items():
            assert tuple(g.shape) == spec[name] and g.dtype == state_dtype, name
            _assert_finite(f"grads[{name}]", g)
        for name, v in module.state_dict().items():
            _assert_finite(f"state_dict[{name}]", v)

    module.eval()
    before = _snapshot(module)
    rng_before = [l.generator.bit_generator.state for l in getattr(module, "layers", [module])]
    q, idx, loss = module(x, mask=m)
    _assert_finite("eval quantized", q)
    _assert_finite("eval loss", loss)
    _assert_same_state(before, _snapshot(module))
    # eval leaves the generators alone too (a random regulariser subset is given back)
    assert [l.generator.bit_generator.state for l in getattr(module, "layers", [module])] == rng_before
    out = module.get_output_from_indices(idx)
    assert tuple(out.shape) == tuple(x_host.shape)
    _assert_finite("decoded", out)
    if out.dtype == dt:
        np.testing.assert_array_equal(_host(out), _host(q))
    else:
        # input dtype != state dtype: the module decodes in its state dtype, the forward computed
        # in the input's; they agree to the rounding of the coarser one (relative to the codes'
        # scale, which is what a residual sum's cancellation error is measured against).
        scale = max(np.max(np.abs(_host(module.get_codes_from_indices(idx)))), 1e-300)
        if module.has_projections:  # the decoding's rounding passes through project_out too
            scale *= 1 + float(np.sum(np.abs(_host(module.state_array("project_out.W")))))
            scale = max(scale, float(np.max(np.abs(_host(module.state_array("project_out.b"))))))
        np.testing.assert_allclose(_host(out), _host(q), rtol=0, atol=1e-5 * scale * (Q or 1))


# ------------------------------------------------------------------ tests


def _fuzz_one(data, residual: bool) -> None:
    """Draw a configuration, a backend, a seed and a batch; build the module and exercise it."""
    kw = data.draw(configurations(residual=residual), label="config")
    backend = data.draw(st.sampled_from(BACKENDS), label="backend")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    reason = invalid_reason(kw)
    if reason is not None:
        with pytest.raises(ValueError, match=reason):
            build(kw, backend, seed)
        return
    module = build(kw, backend, seed)
    x = data.draw(batches(kw["dim"]), label="x")
    K0, d = module.codebook_sizes[0], module.codebook_dim
    override = data.draw(codebook_overrides(K0, d, x[..., :d] if d <= x.shape[-1] else np.tile(x, d)[..., :d]),
                         label="codebook")  # fmt: skip
    if override is not None:
        _load_override(module, override, initted=data.draw(st.booleans(), label="initted"))
    in_dtype = data.draw(st.sampled_from([kw["dtype"], kw["dtype"], "float32", "float64"]), label="input dtype")
    mask = None
    kind = data.draw(st.sampled_from(["none", "none", "some", "all", "nothing"]), label="mask")
    if kind != "none":
        lead = x.shape[:-1]
        mask = {"all": np.ones(lead, bool), "nothing": np.zeros(lead, bool)}.get(kind)
        if mask is None:
            mask = np.random.default_rng(seed % 2**32).random(lead) < 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow or invalid-value warning is a failure too
        exercise(module, x, in_dtype, seed, Q=kw["num_quantizers"] if residual else None, mask=mask)


@given(data=st.data())
@_settings("vq")
def test_vector_quantize_fuzz(data):
    _fuzz_one(data, residual=False)


@given(data=st.data())
@_settings("rvq")
def test_residual_vq_fuzz(data):
    _fuzz_one(data, residual=True)


@given(kw=configurations(residual=False), residual=st.booleans(), Q=st.integers(2, 4))
@_settings("config")
def test_invalid_combinations_are_refused_by_name(kw, residual, Q):
    """Exactly the documented combinations are refused, with a message naming the options;
    ``VectorQuantize(num_quantizers=Q)`` builds the equivalent ResidualVQ."""
    args = dict(kw)
    if residual:
        args["num_quantizers"] = Q
    reason = invalid_reason(args)
    if reason is not None:
        with pytest.raises(ValueError, match=reason):
            VectorQuantize(args.pop("dim"), args.pop("codebook_size"), seed=0, **args)
        return
    m = VectorQuantize(args.pop("dim"), args.pop("codebook_size"), seed=0, **args)
    assert type(m) is VectorQuantize and m.is_stack == residual
    if residual:
        assert m.num_quantizers == Q and len(m.layers) == Q
