"""FSQ and ResidualFSQ against vector-quantize-pytorch ("vqp"), converted through vqref.interop.

Every test builds a vqp module under ``torch.manual_seed``, converts it (or a vqref module to
vqp), feeds both the same float32 batch in training mode, and compares step by step:
quantized, indices, the input gradient (torch autograd of ``(quantized * g).sum()`` against
vqref's backward of g) and the projections' gradients; then both take the same gradient step
on the projections, and the next step starts from parameters that must still agree.

Tolerances.  vqp computes FSQ's constants (the bound's h, o and shift, the symmetric grid's
step 2/(L-1), residual FSQ's scales and soft clamp) in float32, vqref in float64 and then casts
to the input's dtype; float32 results may differ by an ulp of those constants, and torch's and
numpy's float32 matrix products sum in different orders.  So outputs and gradients are compared
to a few float32 ulps (``RTOL``), indices exactly.  docs/deviations.md section 11.

Random draws.  Noise dropout and quantize dropout draw from torch's generator in vqp and from the
module's numpy generator in vqref.  :func:`vqp_draws_like_vqref` replays a copy of vqref's
generator and hands vqp exactly those draws (its ``bernoulli_``/``rand_like`` calls, and
``rand_quantize_dropout_fixed_seed`` for the dropped depth), so both make the same choices.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import pytest
import torch
import vector_quantize_pytorch as vqp

from vqref import FSQ, ResidualFSQ
from vqref.interop import export_state_dict, from_vector_quantize_pytorch, to_vector_quantize_pytorch
from vqref.testing import rel_error

RTOL = 1e-5  # float32 outputs and parameters: a few ulps (see the module docstring)
GRAD_RTOL = 1e-4  # float32 gradients: 1 - tanh^2 near saturation loses digits (as in conftest.py's VQ harness)
LR = 0.5


def vqp_grads(t) -> dict:
    """vqp's parameter gradients in vqref's names and layout (W = weight^T)."""
    out = {}
    for name, p in t.named_parameters():
        key = name.replace(".weight", ".W").replace(".bias", ".b")
        out[key] = p.grad.detach().numpy().T if name.endswith("weight") else p.grad.detach().numpy()
    return out


def sgd_both(t, r) -> None:
    """The same gradient step on the projections in both libraries."""
    with torch.no_grad():
        for p in t.parameters():
            p -= LR * p.grad
            p.grad = None
    for k, g in r.grads.items():
        r.params[k] -= LR * g


class _Draws:
    """vqref's next noise draws, replayed from a copy of its generator, served to vqp's calls."""

    def __init__(self, r, rows: int, depths: int):
        gen = r.state.rngs[0]
        self.dropout_last = None
        if isinstance(r, ResidualFSQ) and r.drops_depths:
            self.dropout_last = int(gen.integers(r.quantize_dropout_cutoff_index, r.num_quantizers))
        self.queue = []
        if r.noise_dropout > 0:
            shape = (rows, r.codebook_dim)
            for _ in range(depths):
                self.queue += [gen.random(shape) < r.noise_dropout, gen.random(shape) - 0.5]

    def next(self, like) -> torch.Tensor:
        a = self.queue.pop(0)
        return torch.tensor(a, dtype=like.dtype).reshape(like.shape)


@contextlib.contextmanager
def vqp_draws_like_vqref(r, rows: int, depths: int = 1):
    """Within the block, vqp's noise draws are those of vqref's next training forward."""
    draws = _Draws(r, rows, depths)
    bernoulli, rand_like = torch.Tensor.bernoulli_, torch.rand_like
    torch.Tensor.bernoulli_ = lambda self, *a, **k: self.copy_(draws.next(self))
    torch.rand_like = lambda like, *a, **k: draws.next(like) + 0.5  # vqp subtracts 0.5
    try:
        yield draws
    finally:
        torch.Tensor.bernoulli_, torch.rand_like = bernoulli, rand_like
    assert not draws.queue, "vqp drew fewer noise arrays than vqref"


def python_seed_for(last: int, cutoff: int, Q: int) -> int:
    """A seed with ``random.Random(seed).randrange(cutoff, Q) == last`` (vqp's quantize-dropout draw)."""
    return next(s for s in range(10_000) if random.Random(s).randrange(cutoff, Q) == last)


def run_steps(t, r, shape: tuple, *, steps: int = 3, seed: int = 0, channel_first: bool = False) -> list:
    """Train both modules ``steps`` times on the same batches and compare everything each step;
    returns vqref's indices of every step."""
    gen = np.random.default_rng(seed)
    seen = []
    for step in range(steps):
        x = (1.5 * gen.standard_normal(shape)).astype(np.float32)
        g = gen.standard_normal(shape).astype(np.float32)
        rows = int(np.prod(shape)) // shape[1 if channel_first else -1]
        depths = getattr(r, "num_quantizers", 1)
        with vqp_draws_like_vqref(r, rows * getattr(r, "num_codebooks", 1), depths) as draws:
            kw = {}
            if draws.dropout_last is not None:
                kw["rand_quantize_dropout_fixed_seed"] = python_seed_for(
                    draws.dropout_last, r.quantize_dropout_cutoff_index, r.num_quantizers
                )
                if r.quantize_dropout_multiple_of != 1:  # the draws then differ in how many depths use noise
                    assert r.noise_dropout == 0
            xt = torch.tensor(x, requires_grad=True)
            qt, it = t(xt, **kw)
            (qt * torch.tensor(g)).sum().backward()
            if r.noise_dropout and draws.dropout_last is not None:
                draws.queue.clear()  # depths vqp skipped drew nothing, and neither does vqref
            q, idx = r(x)
        dx = r.backward(g)
        seen.append(idx)
        assert q.dtype == np.float32 and q.shape == tuple(qt.shape), step
        assert rel_error(q, qt.detach().numpy()) < RTOL, step
        np.testing.assert_array_equal(idx, it.numpy().astype(np.int64), err_msg=f"step {step}")
        assert rel_error(dx, xt.grad.numpy()) < GRAD_RTOL, step
        ref = vqp_grads(t)
        assert sorted(ref) == sorted(r.grads), step
        for k, v in ref.items():
            assert rel_error(r.grads[k], v) < GRAD_RTOL, (step, k)
        sgd_both(t, r)
        for k, v in export_state_dict(r).items():
            assert rel_error(v, t.state_dict()[k].numpy()) < GRAD_RTOL, (step, k)
    return seen


FSQ_CONFIGS = {
    "paper-8555": dict(levels=[8, 5, 5, 5]),
    "odd-even-743": dict(levels=[7, 4, 3]),
    "codebooks-2": dict(levels=[8, 6, 5], num_codebooks=2),
    "projected": dict(levels=[8, 5, 5, 5], dim=12),
    "projected-nobias-2cb": dict(levels=[8, 5, 5], dim=7, num_codebooks=2, projection_has_bias=False),
    "symmetric": dict(levels=[2, 5, 4], preserve_symmetry=True),
    "hard-clamp": dict(levels=[8, 5, 3], bound_hard_clamp=True),
    "symmetric-hard": dict(levels=[3, 4, 6], preserve_symmetry=True, bound_hard_clamp=True),
    "rotation": dict(levels=[5, 5, 5, 5], orthogonal_rotation=True),
    "keep-axis": dict(levels=[8, 5, 5], keep_num_codebooks_dim=True),
    "noise": dict(levels=[5, 4, 3], preserve_symmetry=True, noise_dropout=0.4, num_codebooks=2, dim=9),
}


@pytest.mark.parametrize("name", sorted(FSQ_CONFIGS))
def test_fsq_agrees_step_by_step(name):
    torch.manual_seed(0)
    t = vqp.FSQ(**FSQ_CONFIGS[name])
    r = from_vector_quantize_pytorch(t, seed=1)
    assert type(r) is FSQ and r.training and r.codebook_size == t.codebook_size
    np.testing.assert_array_equal(r.implicit_codebook, t.implicit_codebook.numpy())
    run_steps(t, r, (2, 9, r.dim))


@pytest.mark.parametrize("layout", ["image", "channel-first"])
def test_fsq_channel_first_layouts_agree(layout):
    torch.manual_seed(0)
    t = vqp.FSQ([8, 5, 5], dim=6, channel_first=layout == "channel-first")
    r = from_vector_quantize_pytorch(t, seed=0)
    shape = (2, 6, 3, 4) if layout == "image" else (2, 6, 5)
    run_steps(t, r, shape, channel_first=True)
    idx = torch.randint(0, t.codebook_size, shape[:1] + shape[2:])
    assert rel_error(r.indices_to_codes(idx.numpy()), t.indices_to_codes(idx).detach().numpy()) < RTOL


@pytest.mark.parametrize("name", ["codebooks-2", "projected", "rotation", "symmetric"])
def test_fsq_decoding_agrees(name):
    torch.manual_seed(0)
    t = vqp.FSQ(**FSQ_CONFIGS[name])
    r = from_vector_quantize_pytorch(t)
    shape = (3, 5, t.num_codebooks) if t.keep_num_codebooks_dim else (3, 5)
    idx = torch.randint(0, t.codebook_size, shape)
    assert rel_error(r.indices_to_codes(idx.numpy()), t.indices_to_codes(idx).detach().numpy()) < RTOL
    codes = t.implicit_codebook[idx]  # (..., [C,] d) grid points
    np.testing.assert_array_equal(r.codes_to_indices(codes.numpy()), t.codes_to_indices(codes).numpy())


RFSQ_CONFIGS = {
    "default-q3": dict(levels=[8, 5, 5], num_quantizers=3),
    "one-depth": dict(levels=[8, 5, 5], num_quantizers=1),
    "projected-q4": dict(levels=[8, 5, 5, 5], num_quantizers=4, dim=7),
    "tanh-soft": dict(levels=[7, 5, 4], num_quantizers=3, bound_hard_clamp=False, soft_clamp_input_value=1.5),
    "tanh-plain": dict(levels=[7, 5, 4], num_quantizers=2, bound_hard_clamp=False),
    "dropout": dict(levels=[8, 5, 5], num_quantizers=4, quantize_dropout=True, quantize_dropout_cutoff_index=1),
    "dropout-multiple": dict(levels=[4, 4], num_quantizers=5, quantize_dropout=True, quantize_dropout_multiple_of=2),
    "noise": dict(levels=[5, 4, 3], num_quantizers=3, noise_dropout=0.3, dim=5),
    "noise-dropout": dict(levels=[5, 4, 3], num_quantizers=3, noise_dropout=0.3, quantize_dropout=True),
}


@pytest.mark.parametrize("name", sorted(RFSQ_CONFIGS))
def test_residual_fsq_agrees_step_by_step(name):
    torch.manual_seed(0)
    t = vqp.ResidualFSQ(**RFSQ_CONFIGS[name])
    r = from_vector_quantize_pytorch(t, seed=2)
    assert type(r) is ResidualFSQ and r.codebook_size == t.codebook_size
    np.testing.assert_allclose(r.scales, t.scales.numpy(), rtol=1e-7)
    seen = run_steps(t, r, (2, 9, r.dim), steps=4 if "dropout" in name else 3)
    assert any(np.any(i == -1) for i in seen) == ("dropout" in name)  # the dropout configurations did drop
    t.eval(), r.eval()
    x = np.random.default_rng(5).standard_normal((2, 6, r.dim)).astype(np.float32)
    qt, it = t(torch.tensor(x))
    q, idx = r(x)
    np.testing.assert_array_equal(idx, it.numpy())
    codes = r.get_codes_from_indices(idx)
    np.testing.assert_allclose(codes, t.get_codes_from_indices(it).numpy(), rtol=1e-6, atol=1e-8)
    assert rel_error(r.get_output_from_indices(idx), t.get_output_from_indices(it).detach().numpy()) < RTOL
    np.testing.assert_array_equal(r.codebooks, t.codebooks.numpy())


def test_residual_fsq_channel_first_agrees():
    torch.manual_seed(0)
    t = vqp.ResidualFSQ(levels=[8, 5, 5], num_quantizers=3, dim=4, is_channel_first=True)
    r = from_vector_quantize_pytorch(t)
    run_steps(t, r, (2, 4, 7), channel_first=True)


def test_coarse_indices_decode_alike():
    torch.manual_seed(0)
    t = vqp.ResidualFSQ(levels=[8, 5], num_quantizers=4, quantize_dropout=True).eval()
    r = from_vector_quantize_pytorch(t)
    idx = torch.randint(0, 40, (2, 5, 2))  # two of four depths
    np.testing.assert_allclose(r.get_output_from_indices(idx.numpy()), t.get_output_from_indices(idx).numpy(),
                               rtol=1e-6)  # fmt: skip


# ---------------------------------------------------------------- the other direction, and the state layout


@pytest.mark.parametrize(
    "make",
    [
        lambda: FSQ([8, 5, 5], dim=7, num_codebooks=2, seed=3),
        lambda: FSQ([2, 5, 4], preserve_symmetry=True, noise_dropout=0.2, orthogonal_rotation=True, seed=3),
        lambda: ResidualFSQ(levels=[8, 5, 5], num_quantizers=3, dim=6, seed=3),
        lambda: ResidualFSQ(levels=[5, 5], num_quantizers=2, bound_hard_clamp=False, soft_clamp_input_value=[1.2, 2.0]),
    ],
    ids=["fsq-projected", "fsq-symmetric-noise-rotation", "rfsq-projected", "rfsq-soft"],
)
def test_vqref_to_vqp_agrees_step_by_step(make):
    r = make()
    t = to_vector_quantize_pytorch(r)
    assert type(t).__name__ == type(r).__name__
    assert set(t.state_dict()) == set(export_state_dict(r))  # loaded strictly by to_vector_quantize_pytorch
    back = from_vector_quantize_pytorch(t)
    config, soft = back.config(), back.config().get("soft_clamp_input_value")
    if soft is not None:  # vqp keeps the clamp value in a float32 buffer
        np.testing.assert_allclose(soft, r.soft_clamp_input_value, rtol=1e-7)
        config["soft_clamp_input_value"] = r.soft_clamp_input_value
    assert config == r.config()
    run_steps(t, r, (2, 9, r.dim))


def test_export_state_dict_has_torch_layout():
    r = FSQ([8, 5], dim=3, num_codebooks=2, orthogonal_rotation=True)
    sd = export_state_dict(r)
    assert {k: v.shape for k, v in sd.items()} == {
        "project_in.weight": (4, 3), "project_in.bias": (4,), "project_out.weight": (3, 4), "project_out.bias": (3,),
        "orthogonal_rot": (2, 2),
    }  # fmt: skip
    np.testing.assert_array_equal(sd["project_in.weight"], r.params["project_in.W"].T)
    assert export_state_dict(FSQ([8, 5])) == {}


# ---------------------------------------------------------------- refused options


@pytest.mark.parametrize(
    "make, names",
    [
        (lambda: vqp.FSQ([8, 5], allowed_dtypes=(torch.float32,)), ["allowed_dtypes"]),
        (lambda: vqp.ResidualFSQ(levels=[8, 5], num_quantizers=2, orthogonal_rotation=True), ["orthogonal_rotation"]),
        (
            lambda: vqp.ResidualFSQ(levels=[8, 5], num_quantizers=2, keep_num_codebooks_dim=True, return_indices=True),
            ["keep_num_codebooks_dim"],
        ),  # fmt: skip
        (
            lambda: vqp.ResidualFSQ(
                levels=[8, 5], num_quantizers=2, channel_first=True, allowed_dtypes=(torch.float16,)
            ),
            ["channel_first", "allowed_dtypes"],
        ),  # fmt: skip
    ],
)
def test_unsupported_options_are_named(make, names):
    torch.manual_seed(0)
    t = make()
    with pytest.raises(ValueError, match="cannot convert") as info:
        from_vector_quantize_pytorch(t)
    for n in names:
        assert n in str(info.value)


def test_options_without_effect_are_accepted():
    # `scale` is stored and never read by vqp 1.32.0; force_quantization_f32 changes nothing for float32/64
    t = vqp.FSQ([8, 5, 5], scale=0.5, force_quantization_f32=False)
    r = from_vector_quantize_pytorch(t)
    x = np.random.default_rng(0).standard_normal((2, 4, 3)).astype(np.float32)
    np.testing.assert_array_equal(r(x)[0], t(torch.tensor(x))[0].detach().numpy())


# ---------------------------------------------------------------- negative controls of the harness


def test_harness_negative_controls(monkeypatch):
    """run_steps fails on a slightly wrong backward, on other levels, and on noise it did not share."""
    from vqref.quantizers import fsq as fsq_module

    def make(levels=(8, 5, 5), **kw):
        torch.manual_seed(0)
        t = vqp.FSQ(list(levels), dim=4, **kw)
        return t, from_vector_quantize_pytorch(t)

    t, r = make()
    real = fsq_module.fsq_layer_backward
    monkeypatch.setattr(fsq_module, "fsq_layer_backward", lambda dq, c: (lambda dx, g: (dx * 1.001, g))(*real(dq, c)))
    with pytest.raises(AssertionError):
        run_steps(t, r, (2, 9, 4))
    monkeypatch.undo()
    t, _ = make()
    _, other = make((8, 5, 4))
    other.load_state_dict(from_vector_quantize_pytorch(t).state_dict())
    with pytest.raises(AssertionError):
        run_steps(t, other, (2, 9, 4))
    t, r = make((5, 4, 3), preserve_symmetry=True, noise_dropout=0.4)
    x = np.random.default_rng(0).standard_normal((2, 9, 4)).astype(np.float32)
    assert not np.allclose(r(x)[0], t(torch.tensor(x))[0].detach().numpy())  # independent draws differ


# ---------------------------------------------------------------- deviations (docs/deviations.md section 11)


def test_vqp_computes_the_constants_in_float32_vqref_in_the_input_dtype():
    levels = [7, 5, 4]
    x = np.random.default_rng(0).standard_normal((1, 50, 3))
    t = vqp.FSQ(levels, preserve_symmetry=True).double()
    r = FSQ(levels, preserve_symmetry=True, dtype="float64")
    q_t, q = t(torch.tensor(x))[0].detach().numpy(), r(x)[0]
    k = np.round((q + 1) * (np.array(levels) - 1) / 2)  # level indices
    exact = k * (2 / (np.array(levels) - 1)) - 1  # eq. (6) in float64
    np.testing.assert_array_equal(q, exact)
    assert 1e-9 < np.abs(q_t - exact).max() < 1e-6  # vqp's step 2/(L-1) is a float32 number
    # so are the scales of residual FSQ
    rt = vqp.ResidualFSQ(levels=[5, 5], num_quantizers=2).double()
    assert rt.scales.dtype == torch.float64 and rt.scales[1, 0].item() != 0.2
    assert ResidualFSQ(levels=[5, 5], num_quantizers=2, dtype="float64").scales[1, 0] == 0.2


def test_indices_are_int64_and_exact_beyond_2_to_the_24_codes():
    levels = [8] * 9  # 2^27 codes: vqp sums the index in float32
    t = vqp.FSQ(levels, return_indices=False)  # (its implicit codebook would take 4 GiB)
    r = FSQ(levels)
    top = np.full((1, 9), 0.75, dtype=np.float32)  # the last grid point
    assert t.codes_to_indices(torch.tensor(top)).item() == 2**27  # one past the last index
    assert r.codes_to_indices(top).item() == 2**27 - 1 and r.codes_to_indices(top).dtype == np.int64
    _, it = vqp.FSQ([8, 5])(torch.zeros(1, 1, 2))
    assert it.dtype == torch.int32 and FSQ([8, 5])(np.zeros((1, 1, 2)))[1].dtype == np.int64


def test_paper_grid_levels_above_1000_leave_the_grid_in_vqp_and_are_refused():
    t = vqp.FSQ([1003], return_indices=False)
    q, _ = t(torch.full((1, 1, 1), 50.0))
    assert q.item() > 1  # beyond the grid [-1, 1]
    with pytest.raises(ValueError, match="above 1000"):
        from_vector_quantize_pytorch(t)


def test_inputs_with_any_leading_axes():
    # vqp's FSQ reads (b, n, d) or channel-first images; vqref also takes (N, d) and (d,)
    with pytest.raises(Exception):
        vqp.FSQ([8, 5])(torch.zeros(4, 2))
    q, idx = FSQ([8, 5])(np.zeros((4, 2)))
    assert q.shape == (4, 2) and idx.shape == (4,)
    # vqp's ResidualFSQ hands a 4-axis input to its FSQ layers, which read it as an image and fail
    with pytest.raises(Exception):
        vqp.ResidualFSQ(levels=[8, 5], num_quantizers=2)(torch.zeros(2, 3, 4, 2))
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 2))
    rq = ResidualFSQ(levels=[8, 5], num_quantizers=2, dtype="float64")
    np.testing.assert_array_equal(rq(x)[0], rq(x.reshape(2, 12, 2))[0].reshape(x.shape))


def test_forward_takes_only_the_input():
    # vqp's ResidualFSQ.forward also takes return_all_codes and rand_quantize_dropout_fixed_seed
    import inspect

    assert "return_all_codes" in inspect.signature(vqp.ResidualFSQ.forward).parameters
    for cls in (FSQ, ResidualFSQ):
        assert list(inspect.signature(cls.forward).parameters) == ["self", "x"]
    rq = ResidualFSQ(levels=[8, 5], num_quantizers=3).eval()
    _, idx = rq(np.zeros((2, 4, 2), dtype=np.float32))
    assert rq.get_codes_from_indices(idx).shape == (3, 2, 4, 2)  # what return_all_codes=True returns
