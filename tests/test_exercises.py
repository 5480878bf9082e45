"""The graded exercises: every grader is real.

For every exercise: the reference solution passes (numpy and array_api_strict, float64 and
float32), the untouched stub fails with "not implemented yet", and plausible wrong solutions --
written here as a learner would write them -- fail with the diagnosis the grader promises.  Every
known mistake a grader lists is reachable and told apart from the right answer and from the
mistakes before it.  vqref's own ops pass the same graders, which pins the exercises'
conventions to the library's.  The engine's checks (input mutation, dtype, library, shapes,
NaN, the O(D) memory check) each have a negative control.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path

import numpy as np
import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

from vqref.testing import rel_error
from vqref.testing.graders import EXERCISES, RTOL, GradeResult, get_exercise, grade, load_function, main
from vqref.testing.graders.engine import prepared_cases

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "exercises"
KEYS = list(EXERCISES)


def _solution(key: str):
    return load_function(EXERCISES[key], FOLDER, solution=True)


def _solution_module(key: str):
    """The solution file as a module, for wrong variants built on its given helpers."""
    path = FOLDER / "solutions" / f"{EXERCISES[key].stem}.py"
    spec = importlib.util.spec_from_file_location(f"test_solution_{key}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fails_with(result: GradeResult, fragment: str) -> None:
    assert isinstance(result, GradeResult) and not result.passed and not result, result
    assert fragment in result.message, result.message


# ---------------------------------------------------------------- the track's files


def test_there_are_at_least_twelve_exercises_and_each_has_a_stub_and_a_solution():
    assert len(EXERCISES) >= 12
    stubs = {p.stem for p in FOLDER.glob("ex[0-9][0-9]_*.py")}
    solutions = {p.stem for p in (FOLDER / "solutions").glob("ex[0-9][0-9]_*.py")}
    graded = {ex.stem for ex in EXERCISES.values()}
    assert stubs == graded == solutions, (stubs ^ graded, solutions ^ graded)
    readme = (FOLDER / "README.md").read_text()
    assert all(f"`{stem}.py`" in readme for stem in graded), "the README's table lists every exercise"


@pytest.mark.parametrize("key", KEYS)
def test_stub_and_solution_share_the_signature_and_the_stub_says_how_to_grade(key):
    ex = EXERCISES[key]
    stub, solution = load_function(ex, FOLDER), _solution(key)
    assert inspect.signature(stub) == inspect.signature(solution)
    text = (FOLDER / f"{ex.stem}.py").read_text()
    assert f"vqref grade {key}" in text and "raise NotImplementedError" in text
    assert "raise NotImplementedError" not in (FOLDER / "solutions" / f"{ex.stem}.py").read_text()


def test_the_exercises_folder_is_not_part_of_the_wheel():
    from setuptools import find_packages

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(where=str(ROOT), include=config["include"], exclude=config.get("exclude", ()))
    assert "vqref.testing.graders" in packages
    assert not [p for p in packages if p.split(".")[0] == "exercises"], packages


# ---------------------------------------------------------------- solutions pass, stubs fail


@pytest.mark.parametrize("key", KEYS)
def test_the_reference_solution_passes(key):
    result = grade(key, directory=FOLDER, solution=True)
    assert result.passed and result, result
    assert result.max_error <= RTOL["float64"]


@pytest.mark.parametrize(
    "backend, dtype", [("array_api_strict", "float64"), ("array_api_strict", "float32"), ("numpy", "float32")]
)
@pytest.mark.parametrize("key", KEYS)
def test_the_reference_solution_is_portable_and_keeps_the_dtype(key, backend, dtype):
    result = grade(key, _solution(key), backend=backend, dtype=dtype)
    assert result.passed, result


@pytest.mark.parametrize("key", KEYS)
def test_the_untouched_stub_fails_as_not_implemented(key):
    _fails_with(grade(key, directory=FOLDER), "not implemented yet")


@pytest.mark.parametrize("key", KEYS)
def test_every_known_mistake_is_reachable_and_told_apart(key):
    # A "learner" that returns each known mistake's answer must get exactly that mistake's hint:
    # the mistake differs from the oracle on some case, and no earlier mistake shadows it.
    ex = EXERCISES[key]
    rows = prepared_cases(ex)
    assert ex.mistakes, "every exercise lists known mistakes"
    for m in range(len(ex.mistakes)):
        # far from the right answer on some case: visible above float32 rounding too
        apart = max(
            max(rel_error(a, e) if a.shape == e.shape else 1.0 for a, e in zip(w[m], exp)) for _, exp, w in rows
        )
        assert apart > 100 * RTOL["float32"], (ex.mistakes[m].hint, apart)
        answers = iter([wrong[m] for _, _, wrong in rows])
        result = grade(key, lambda *args: next(answers))
        _fails_with(result, ex.mistakes[m].hint)


def test_the_mistakes_are_one_change_away_from_a_right_formula():
    # the mistake generators, with no mistake switched on, reproduce the oracle: so each mistake
    # differs from the right answer by exactly the slip its hint names
    from vqref.testing.graders import geometry, layers, soft, vq

    baselines = {
        "ex03": vq._vq_loss("beta", "1"),
        "ex04": vq._ste(1.0, False),
        "ex06": lambda a: (geometry._project(a["dy"], *geometry._unit(a["x"], a["eps"])),),
        "ex08": geometry._orthogonal_mistake(4.0),
        "ex10": layers._residual,
        "ex11": layers._conv,
        "ex12": layers._fsq,
        "ex13": soft._entropy,
        "ex14": soft._gumbel,
    }
    for key, baseline in baselines.items():
        for case, expected, _ in prepared_cases(EXERCISES[key]):
            if key == "ex06" and "below eps" in case.label:
                continue  # the projection formula is the branch for rows longer than eps
            for got, want in zip(baseline(case.inputs), expected):
                assert rel_error(got, want) < 1e-7, (key, case.label)  # norm-wise: the oracles are good to ~1e-9


@pytest.mark.parametrize("key", ["ex01", "ex04", "ex05"])
def test_code_indices_repeat_and_leave_exactly_one_code_unused(key):
    # what makes `dC[k] += dq` and an unused code's row visible, for any seed
    for seed in range(20):
        for case, _, _ in prepared_cases(EXERCISES[key], seed=seed):
            idx, K = case.inputs["indices"], case.sizes["K"]
            counts = np.bincount(idx, minlength=K)
            assert counts.max() >= 2 and np.sum(counts == 0) == 1, (key, seed, counts)


@pytest.mark.parametrize("key", KEYS)
def test_float32_cases_hold_float32_numbers(key):
    # the oracle works in float64 on exactly the numbers a float32 function receives
    for case, _, _ in prepared_cases(EXERCISES[key], dtype_name="float32"):
        for name, v in case.inputs.items():
            if isinstance(v, np.ndarray) and v.dtype == np.float64:
                assert np.array_equal(v, v.astype(np.float32).astype(np.float64)), (key, name)
        assert len({v for v in case.sizes.values()}) >= 2


# ---------------------------------------------------------------- plausible wrong solutions


def _onehot(k, K):
    return (k[:, None] == np.arange(K)[None, :]).astype(np.float64)


def _ex01_overwrite(dq, indices, num_codes):
    dC = np.zeros((num_codes, dq.shape[1]))
    dC[indices] += dq
    return dC


def _ex01_mean(dq, indices, num_codes):
    E = _onehot(indices, num_codes)
    return (E.T @ dq) / np.maximum(E.sum(0), 1)[:, None]


def _ex03_no_detach(dloss, x, q, beta):
    f = 2 * dloss / x.size * (1 + beta)
    return f * (x - q), f * (q - x)


def _ex03_x_through(dloss, x, q, beta):
    f = 2 * dloss / x.size
    return (1 + beta) * f * (x - q), f * (q - x)


def _ex04_to_codebook(dz_q, z, codebook, indices):
    dC = np.zeros_like(codebook)
    np.add.at(dC, indices, dz_q)
    return dz_q.copy(), dC


def _ex05_fancy_counts(cluster_size, embed_avg, x, indices, decay, eps):
    K = embed_avg.shape[0]
    counts, sums = np.zeros(K), np.zeros_like(embed_avg)
    counts[indices] += 1
    sums[indices] += x
    size = decay * cluster_size + (1 - decay) * counts
    avg = decay * embed_avg + (1 - decay) * sums
    n = size.sum()
    return size, avg, avg / ((size + eps) / (n + K * eps) * n)[:, None]


def _ex05_raw_counts(cluster_size, embed_avg, x, indices, decay, eps):
    E = _onehot(indices, embed_avg.shape[0])
    size = decay * cluster_size + (1 - decay) * E.sum(0)
    avg = decay * embed_avg + (1 - decay) * (E.T @ x)
    return size, avg, avg / size[:, None]


def _ex06_no_projection(dy, x, eps=1e-6):
    return dy / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def _ex06_own_norm(dy, x, eps=1e-6):
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    y = x / n
    return (dy - y * np.sum(y * dy, axis=-1, keepdims=True)) / n


def _ex06_no_branch(dy, x, eps=1e-6):
    n = np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)
    y = x / n
    return (dy - y * np.sum(y * dy, axis=-1, keepdims=True)) / n


def _unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def _ex07_no_l2(dsim, x, codebook):
    return dsim @ _unit(codebook), dsim.T @ _unit(x)


def _ex07_transposed(dsim, x, codebook):
    dx, dc = _solution("ex07")(dsim, x, codebook)
    return dx, dc.T


def _ex08_half(dloss, codebook):
    return 0.5 * _solution("ex08")(dloss, codebook)


def _ex09_applies_R(g, e, q):
    eh, qh = _unit(e), _unit(q)
    r = _unit(eh + qh)
    lam = np.linalg.norm(q, axis=1, keepdims=True) / np.linalg.norm(e, axis=1, keepdims=True)
    return lam * (g - 2 * r * np.sum(r * g, 1, keepdims=True) + 2 * qh * np.sum(eh * g, 1, keepdims=True))


def _ex09_dense(g, e, q):
    out = np.empty_like(g)
    for n in range(g.shape[0]):  # right values, but a (D, D) matrix per row
        eh, qh = _unit(e[n]), _unit(q[n])
        r = _unit(eh + qh)
        R = np.eye(g.shape[1]) - 2 * np.outer(r, r) + 2 * np.outer(qh, eh)
        out[n] = np.linalg.norm(q[n]) / np.linalg.norm(e[n]) * (R.T @ g[n])
    return out


def _ex10_once(dquantized, dlosses, x, codebooks, indices, beta, routing):
    dx, r = dquantized.copy(), x
    for level in range(codebooks.shape[0]):
        c = codebooks[level][indices[:, level]]
        dx = dx + dlosses[level] * beta * 2 / x.size * (r - c)
        r = r - c
    return dx


def _ex10_x_not_residual(dquantized, dlosses, x, codebooks, indices, beta, routing):
    Q = codebooks.shape[0]
    dx = (Q if routing == "per_depth" else 1) * dquantized
    for level in range(Q):
        dx = dx + dlosses[level] * beta * 2 / x.size * (x - codebooks[level][indices[:, level]])
    return dx


def _conv_wrong(*, assign=False, crop=True, db_axes=(0, 2, 3)):
    sol = _solution_module("ex11")

    def conv2d_backward(dout, x, w, stride, padding):
        F, C, kh, kw = w.shape
        B, _, H, W = x.shape
        Ho, Wo = sol.output_size(H, W, kh, kw, stride, padding)
        dout_mat = dout.transpose(0, 2, 3, 1).reshape(-1, F)
        dw = (dout_mat.T @ sol.im2col(x, kh, kw, stride, padding)).reshape(w.shape)
        d = (dout_mat @ w.reshape(F, -1)).reshape(B, Ho, Wo, C, kh, kw).transpose(0, 3, 4, 5, 1, 2)
        dx_pad = np.zeros((B, C, H + 2 * padding, W + 2 * padding))
        for i in range(kh):
            for j in range(kw):
                view = (
                    slice(None),
                    slice(None),
                    slice(i, i + stride * (Ho - 1) + 1, stride),
                    slice(j, j + stride * (Wo - 1) + 1, stride),
                )
                dx_pad[view] = d[:, :, i, j] if assign else dx_pad[view] + d[:, :, i, j]
        dx = dx_pad[:, :, padding : padding + H, padding : padding + W] if crop else dx_pad
        return dx, dw, dout.sum(axis=db_axes)

    return conv2d_backward


def _ex12_no_scale(dcodes, z, levels):
    sol = _solution_module("ex12")
    h, _, s, _ = sol.fsq_constants(levels, z)
    return dcodes * h * (1 - np.tanh(z + s) ** 2)


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _ex13_plus_gamma(dloss, scores, inv_temperature, diversity_gamma):
    n = scores.shape[0]
    p = _softmax(inv_temperature * scores)
    dh = lambda q: -np.log(np.maximum(q, 1e-5)) - (q >= 1e-5)
    dp = dloss / n * dh(p) + diversity_gamma * dloss / n * dh(p.mean(0))  # the batch term added
    return inv_temperature * p * (dp - np.sum(p * dp, axis=-1, keepdims=True))


def _ex13_no_projection(dloss, scores, inv_temperature, diversity_gamma):
    n = scores.shape[0]
    p = _softmax(inv_temperature * scores)
    dp = -dloss / n * (np.log(p) + 1) + diversity_gamma * dloss / n * (np.log(p.mean(0)) + 1)
    return inv_temperature * p * dp  # the softmax backward without - <p, dp>


def _ex14_soft_codebook(dout, logits, codebook, indices, temperature):
    soft = _softmax(logits / temperature)
    dz = dout @ codebook.T
    return soft * (dz - np.sum(soft * dz, axis=-1, keepdims=True)) / temperature, soft.T @ dout


def _ex14_no_tau(dout, logits, codebook, indices, temperature):
    soft = _softmax(logits / temperature)
    dz = dout @ codebook.T
    dC = np.zeros_like(codebook)
    np.add.at(dC, indices, dout)
    return soft * (dz - np.sum(soft * dz, axis=-1, keepdims=True)), dC


WRONG = [
    ("ex01", _ex01_overwrite, "applies the update once per distinct index"),
    ("ex01", _ex01_mean, "you averaged the rows"),
    ("ex02", lambda dloss, x, q: 2 * dloss * (x - q) / x.shape[0], "you divided by N"),
    ("ex02", lambda dloss, x, q: 2 * (x - q) / x.size, "the upstream gradient dloss is missing"),
    ("ex03", _ex03_no_detach, "both gradients went through the stop-gradients"),
    ("ex03", _ex03_x_through, "x also received the codebook term's gradient"),
    ("ex04", _ex04_to_codebook, "received the decoder's gradient through the stop-gradient"),
    ("ex04", lambda dz_q, z, codebook, indices: (np.zeros_like(z), np.zeros_like(codebook)), "both gradients are zero"),
    ("ex05", _ex05_fancy_counts, "repeated indices were counted once"),
    ("ex05", _ex05_raw_counts, "use the Laplace-smoothed"),
    ("ex06", _ex06_no_projection, "the projection is missing"),
    ("ex06", _ex06_no_branch, "rows shorter than eps: there the forward is the linear map"),
    ("ex06", _ex06_own_norm, "contains NaN or inf (a row shorter than eps divided by its own norm?"),
    ("ex07", _ex07_no_l2, "these are the gradients of the normalised rows"),
    ("ex07", _ex07_transposed, "dcodebook has shape (D, K) = (5, 7), expected (K, D) = (7, 5): it looks transposed"),
    ("ex08", _ex08_half, "half the gradient"),
    ("ex09", _ex09_applies_R, "you applied R"),
    ("ex09", _ex09_dense, "a D x D rotation matrix costs O(D^2)"),
    ("ex10", _ex10_once, "with routing 'per_depth' every depth's straight-through"),
    ("ex10", _ex10_x_not_residual, "compares its own residual r_l"),
    ("ex11", _conv_wrong(assign=True), "`dx_pad[..., i:..:s, j:..:s] += block`, not `= block`"),
    ("ex11", _conv_wrong(crop=False), "dx still has the padding"),
    ("ex11", _conv_wrong(db_axes=(0,)), "db has shape (F, Ho, Wo) = (5, 8, 7), expected (F,) = (5,)"),
    ("ex12", _ex12_no_scale, "the scale step's 1/w is missing"),
    ("ex12", lambda dcodes, z, levels: np.zeros_like(z), "rounding has derivative zero almost everywhere"),
    ("ex13", _ex13_plus_gamma, "the batch entropy has the wrong sign"),
    ("ex13", _ex13_no_projection, "the softmax backward lacks the - <p, dp> term"),
    ("ex14", _ex14_soft_codebook, "dcodebook used the soft weights"),
    ("ex14", _ex14_no_tau, "the 1/tau is missing"),
]


@pytest.mark.parametrize("key, wrong, fragment", WRONG, ids=[f"{k}-{f.__name__}" for k, f, _ in WRONG])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_plausible_wrong_solution_fails_with_its_diagnosis(key, wrong, fragment, dtype):
    # float32 too: every diagnosed slip must stand out above float32 rounding (e.g. the EMA's eps)
    _fails_with(grade(key, wrong, dtype=dtype), fragment)


def test_every_exercise_has_a_wrong_solution_above():
    assert {k for k, _, _ in WRONG} == set(KEYS)


# ---------------------------------------------------------------- vqref's own ops pass the graders


def _library_functions():
    from vqref.core.ema import EMAState, batch_statistics, ema_update
    from vqref.core.fsq import fsq_backward, fsq_forward
    from vqref.core.residual import residual_backward, residual_forward
    from vqref.ops import entropy, gumbel, losses, straight_through
    from vqref.ops.l2norm import l2norm_backward, l2norm_forward
    from vqref.ops.lookup import LookupCache, lookup_backward
    from vqref.ops.orthogonal import orthogonal_loss_backward, orthogonal_loss_forward
    from vqref.ops.rotation import rotation_trick_backward, rotation_trick_forward

    def ex03(dloss, x, q, beta):
        cache = losses.mse_forward(x, q)[1]
        return beta * losses.commitment_loss_backward(dloss, cache), losses.codebook_loss_backward(dloss, cache)

    def ex05(cluster_size, embed_avg, x, indices, decay, eps):
        state = EMAState(embed_avg * 0, cluster_size, embed_avg)
        new = ema_update(state, *batch_statistics(x, indices, embed_avg.shape[0]), decay=decay, eps=eps)
        return new.cluster_size, new.embed_avg, new.codebook

    def ex10(dquantized, dlosses, x, codebooks, indices, beta, routing):
        books = [codebooks[level, ...] for level in range(codebooks.shape[0])]
        _, cache = residual_forward(x, books, routing=routing, indices=indices, commitment_weight=beta)
        return residual_backward(dquantized, dlosses, cache)[0]

    def ex13(dloss, scores, tau, gamma):
        _, cache = entropy.entropy_penalty_forward(scores[:, None, :], inv_temperature=tau, diversity_gamma=gamma)
        return entropy.entropy_penalty_backward(dloss, cache)[:, 0, :]

    def ex14(dout, logits, codebook, indices, temperature):
        dz, dcodebook = gumbel.straight_through_gumbel_backward(
            dout, gumbel.straight_through_gumbel_forward(codebook, indices)[1]
        )
        soft_cache = gumbel.gumbel_softmax_forward(logits, temperature=temperature)[1]  # no noise, as vqp
        return gumbel.gumbel_softmax_backward(dz, soft_cache), dcodebook

    return {
        "ex01": lambda dq, indices, K: lookup_backward(dq, LookupCache(indices, K)),
        "ex02": lambda dloss, x, q: losses.commitment_loss_backward(dloss, losses.commitment_loss_forward(x, q)[1]),
        "ex03": ex03,
        "ex04": lambda g, z, C, k: (straight_through.straight_through_backward(g, None), C * 0),
        "ex05": ex05,
        "ex06": lambda dy, x, eps: l2norm_backward(dy, l2norm_forward(x, eps=eps)[1]),
        "ex08": lambda dloss, C: orthogonal_loss_backward(dloss, orthogonal_loss_forward(C)[1]),
        "ex09": lambda g, e, q: rotation_trick_backward(g, rotation_trick_forward(e, q)[1]),
        "ex10": ex10,
        "ex12": lambda dcodes, z, levels: fsq_backward(dcodes, fsq_forward(z, levels)[1]),
        "ex13": ex13,
        "ex14": ex14,
    }


@pytest.mark.parametrize("backend, dtype", [("numpy", "float64"), ("array_api_strict", "float32")])
@pytest.mark.parametrize("key", sorted(_library_functions()))
def test_vqref_ops_pass_the_graders(key, backend, dtype):
    result = grade(key, _library_functions()[key], backend=backend, dtype=dtype)
    assert result.passed, result


# ---------------------------------------------------------------- the engine's checks can fail


def test_a_gradient_slightly_off_fails_in_both_dtypes():
    sol = _solution("ex08")
    _fails_with(grade("ex08", lambda *a: sol(*a) * (1 + 1e-5)), "dcodebook is off (relative error 1.00e-05)")
    _fails_with(grade("ex08", lambda *a: sol(*a) * (1 + 1e-3), dtype="float32"), "Usual suspects")
    assert grade("ex08", lambda *a: sol(*a) * (1 + 1e-8)).passed  # within the float64 tolerance


def test_a_mistake_is_named_only_when_it_is_clearly_apart_from_the_right_answer():
    from vqref.testing.graders.engine import _matches

    e = np.linspace(1.0, 2.0, 6)
    assert _matches([e * 1.5], (e * 1.5 * (1 + 5e-5),), (e,), 1e-6)  # a variant of a clear slip
    assert not _matches([e * (1 + 1e-5)], (e * (1 + 2e-5),), (e,), 1e-6)  # a "mistake" too close to right
    assert not _matches([e * 1.5], (e * 1.5 * (1 + 1e-3),), (e,), 1e-6)  # another answer
    assert not _matches([e[:5]], (e * 1.5,), (e,), 1e-6)  # another shape


def test_a_function_that_changes_its_input_fails():
    def in_place(dloss, x, q):
        x -= q
        return (2.0 * dloss / x.size) * x

    _fails_with(grade("ex02", in_place), "changed its input x in place")


def test_a_wrong_dtype_library_count_or_none_fails():
    sol = _solution("ex02")
    _fails_with(
        grade("ex02", lambda *a: sol(*a).astype(np.float64), dtype="float32"), "is float64 but the inputs were float32"
    )
    _fails_with(
        grade("ex02", lambda *a: np.asarray(sol(*a)), backend="array_api_strict"),
        "is a numpy array, expected a array_api_strict array",
    )
    _fails_with(grade("ex02", lambda *a: (sol(*a), sol(*a))), "returned 2 value(s), expected 1: dx")
    _fails_with(grade("ex02", lambda *a: None), "returned None")
    _fails_with(grade("ex03", lambda dloss, x, q, beta: [1.0, 2.0]), "dx is a float, expected a numpy array")


def test_an_exception_is_reported_with_the_inputs():
    def raises(dsim, x, codebook):
        return dsim @ x, None  # (N, K) @ (N, D): a shape error

    _fails_with(grade("ex07", raises), "raised ValueError")
    _fails_with(grade("ex07", raises), "dsim (11, 7) float, x (11, 5) float, codebook (7, 5) float")


@pytest.mark.parametrize("key", ["ex03", "ex09", "ex10"])
def test_a_missing_torch_is_explained(key, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # "import torch" now fails
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'vqref\[torch\]'"):
        grade(key, _solution(key), seed=12345)  # a seed whose oracle answers are not cached yet


def test_grade_result_and_lookups():
    assert (
        get_exercise(1)
        is get_exercise("ex01")
        is get_exercise("lookup_backward")
        is get_exercise("ex01_lookup_backward")
    )
    with pytest.raises(KeyError, match="choose one of ex01"):
        get_exercise("ex99")
    with pytest.raises(ValueError, match="dtype must be"):
        grade("ex01", _solution("ex01"), dtype="float16")
    with pytest.raises(ValueError, match="xp must be one of"):
        grade("ex01", _solution("ex01"), backend="jax")
    with pytest.raises(TypeError, match="fn must be the function"):
        grade("ex01", "lookup_backward")
    ok = grade("ex01", _solution("ex01"))
    assert str(ok).startswith("PASS  ex01") and bool(ok)
    assert str(grade("ex01", directory=FOLDER)).startswith("FAIL  ex01")


def test_loading_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        grade("ex01", directory=tmp_path / "nowhere")
    (tmp_path / "solutions").mkdir()
    (tmp_path / "ex01_lookup_backward.py").write_text("def lookup_bwd(dq, indices, num_codes):\n    return dq\n")
    with pytest.raises(AttributeError, match=r"defines no function lookup_backward\(\)"):
        grade("ex01", directory=tmp_path)
    with pytest.raises(FileNotFoundError, match="ex02_commitment_loss_backward.py does not exist"):
        grade("ex02", directory=tmp_path)


def test_the_loader_reads_the_file_afresh(tmp_path):
    (tmp_path / "solutions").mkdir()
    path = tmp_path / "ex02_commitment_loss_backward.py"
    path.write_text("def commitment_loss_backward(dloss, x, q):\n    raise NotImplementedError\n")
    _fails_with(grade("ex02", directory=tmp_path), "not implemented yet")
    path.write_text("def commitment_loss_backward(dloss, x, q):\n    return 2.0 * dloss / x.size * (x - q)\n")
    assert grade("ex02", directory=tmp_path).passed


# ---------------------------------------------------------------- the command line


def test_the_command_line(capsys):
    from vqref.cli import main as vqref_main

    assert vqref_main(["grade", "ex01", "ex14", "--dir", str(FOLDER)]) == 1
    out = capsys.readouterr().out
    assert out.count("not implemented yet") == 2 and "0 of 2 passed" in out
    assert main(["--dir", str(FOLDER), "--solutions", "--backend", "array_api_strict", "--dtype", "float32"]) == 0
    assert f"{len(KEYS)} of {len(KEYS)} passed" in capsys.readouterr().out
    assert main(["--list"]) == 0 and "ex11_conv2d_backward.py" in capsys.readouterr().out
    assert main(["ex99", "--dir", str(FOLDER)]) == 2 and "unknown exercise 'ex99'" in capsys.readouterr().out


def test_the_command_line_reports_a_file_that_does_not_import(tmp_path, capsys):
    (tmp_path / "solutions").mkdir()
    (tmp_path / "ex02_commitment_loss_backward.py").write_text("def commitment_loss_backward(:\n")
    assert main(["ex02", "--dir", str(tmp_path)]) == 1
    assert "could not load or grade it: SyntaxError" in capsys.readouterr().out


# ---------------------------------------------------------------- GPU


def _cupy_usable() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _cupy_usable(), reason="cupy with a GPU is not available")
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("key", KEYS)
def test_the_reference_solution_passes_on_cupy(key, dtype):
    assert grade(key, _solution(key), backend="cupy", dtype=dtype).passed
