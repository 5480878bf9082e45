"""Scenarios of data-parallel state updates: R ranks on the parts of a batch against one process.

Shared by tests/test_distributed.py (ranks as threads, :func:`vqref.distributed.run_in_threads`)
and tests/mpi_worker.py (ranks as MPI processes under ``mpiexec``).  Every rank builds the same
global batch from a seed, keeps its rows (``sizes[r]`` of them, in rank order; a rank may have
none), runs the update through the communicator, and runs it alone on the whole batch.
:func:`run_case` compares the two and checks that every rank holds the same bits; it returns
the problems it found, the same list on every rank (empty: the case passed).

Symbols: R ranks, N rows of the global batch, K codes, D features, Q depths.
"""

from __future__ import annotations

import collections
import importlib
import re
from typing import Any, Callable

import numpy as np

from vqref import backend as B
from vqref.core.ema import EMAState, expire_dead_codes
from vqref.core.kmeans import kmeans, sample_initial_means
from vqref.core.state import (
    kmeans_init_state,
    residual_kmeans_init,
    residual_training_update,
    shared_training_update,
    training_update,
)

K, D = 7, 5  # distinct from every N below


class Lib:
    """An array library and float dtype by name: where the scenario's arrays live."""

    def __init__(self, name: str = "numpy", dtype: str = "float64") -> None:
        self.name, self.dtype_name = name, dtype
        self.xp = B.namespace_from_module(importlib.import_module(name))
        self.dtype = getattr(self.xp, dtype)

    def __call__(self, a: Any) -> Any:
        a = np.asarray(a)
        return B.from_numpy(a, self.xp, dtype=self.dtype if a.dtype.kind == "f" else None)

    @property
    def rtol(self) -> float:
        return 1e-12 if self.dtype_name == "float64" else 2e-5


def part(a: np.ndarray, sizes: tuple, rank: int) -> np.ndarray:
    """Rank ``rank``'s rows of the global ``a``: ``sizes[r]`` consecutive rows per rank."""
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return a[bounds[rank] : bounds[rank + 1]]


def batch(seed: int, n: int, *, exact: bool = False) -> np.ndarray:
    """(n, D) host rows; ``exact``: multiples of 1/4, whose sums are exact in any order."""
    x = np.random.default_rng(seed).standard_normal((n, D)) * 2
    return np.round(x * 4) / 4 if exact else x


def clustered(seed: int, n: int) -> np.ndarray:
    """(n, D) rows around K / 2 well separated centres (k-means assignments far from ties)."""
    gen = np.random.default_rng(seed)
    centres = gen.standard_normal((K // 2 + 1, D)) * 6
    return centres[gen.integers(0, len(centres), n)] + 0.3 * gen.standard_normal((n, D))


def ema_state(lib: Lib, seed: int, *, exact: bool = False) -> EMAState:
    """A state with varied counts (some 0) and ``c_k = m_k / N_k``-consistent sums."""
    gen = np.random.default_rng(seed)
    codebook = batch(seed + 1, K, exact=exact)
    counts = gen.integers(0, 4, K).astype(float)
    return EMAState(lib(codebook), lib(counts), lib(codebook * counts[:, None]))


# ------------------------------------------------------------------------------------------
# scenarios: (comm, lib, sizes, options) -> (got, want, exact field names)
# ------------------------------------------------------------------------------------------


def ema_step(comm, lib, sizes, *, exact=False, ema=True, dead_code_threshold=0.0, normalize=False):
    """training_update: the EMA step (and restarts) from every rank's statistics."""
    N = sum(sizes)
    x, idx = batch(11, N, exact=exact), np.random.default_rng(12).integers(0, K, N)
    state = ema_state(lib, 13, exact=exact)
    opts = dict(decay=0.5 if exact else 0.8, eps=1e-5, ema=ema, dead_code_threshold=dead_code_threshold)
    opts["normalize"] = normalize
    got = training_update(
        state, lib(part(x, sizes, comm.rank)), lib(part(idx, sizes, comm.rank)), rng=np.random.default_rng(5), comm=comm, **opts
    )  # fmt: skip
    want = training_update(state, lib(x), lib(idx), rng=np.random.default_rng(5), **opts)
    return got, want, got._fields if exact else ("cluster_size",)


def restart(comm, lib, sizes, *, depths=1, normalize=False, threshold=1.5):
    """expire_dead_codes alone: the same state in, so every field must be bit-identical."""
    N = sum(sizes)
    xs = [batch(21 + q, N) for q in range(depths)]
    state = ema_state(lib, 23)
    blocks = [lib(part(x, sizes, comm.rank)) for x in xs]
    rows = blocks[0] if depths == 1 else blocks
    got, dead = expire_dead_codes(
        state, rows, threshold=threshold, rng=np.random.default_rng(6), normalize=normalize, comm=comm
    )
    whole = lib(xs[0]) if depths == 1 else [lib(x) for x in xs]
    want, want_dead = expire_dead_codes(
        state, whole, threshold=threshold, rng=np.random.default_rng(6), normalize=normalize
    )
    return (*got, dead), (*want, want_dead), ("codebook", "cluster_size", "embed_avg", "dead")


def initial_means(comm, lib, sizes):
    """sample_initial_means: the rows one process would draw, bit for bit."""
    x = batch(31, sum(sizes))
    got = sample_initial_means(lib(part(x, sizes, comm.rank)), K, np.random.default_rng(7), comm=comm)
    want = sample_initial_means(lib(x), K, np.random.default_rng(7))
    return (got,), (want,), ("means",)


def lloyd(comm, lib, sizes, *, iters=4, use_cosine_sim=False, exact=False):
    """kmeans: different data on every rank, one result, that of the whole batch."""
    x = batch(41, sum(sizes), exact=True) if exact else clustered(41, sum(sizes))
    opts = dict(iters=iters, use_cosine_sim=use_cosine_sim)
    res = kmeans(lib(part(x, sizes, comm.rank)), K, rng=np.random.default_rng(8), comm=comm, **opts)
    ref = kmeans(lib(x), K, rng=np.random.default_rng(8), **opts)
    got = (res.means, res.counts, np.asarray(res.inertia))
    want = (ref.means, ref.counts, np.asarray(ref.inertia))
    return got, want, ("means", "counts", "inertia") if exact else ("counts",)


def kmeans_state(comm, lib, sizes, *, use_cosine_sim=False):
    """kmeans_init_state: the EMA state seeded from the global k-means."""
    x = clustered(51, sum(sizes))
    opts = dict(iters=3, eps=1e-5, use_cosine_sim=use_cosine_sim, dtype=lib.dtype)
    got = kmeans_init_state(lib(part(x, sizes, comm.rank)), K, rng=np.random.default_rng(9), comm=comm, **opts)
    want = kmeans_init_state(lib(x), K, rng=np.random.default_rng(9), **opts)
    return got, want, ("cluster_size",)


def residual(comm, lib, sizes, *, shared=False, use_cosine_sim=False, depths=3):
    """residual_kmeans_init then residual_training_update with restarts, Q depths."""
    from vqref.core.quantize import quantize_forward

    x = clustered(61, sum(sizes))
    n_books = 1 if shared else depths
    empty = EMAState(lib(np.zeros((K, D))), lib(np.zeros(K)), lib(np.zeros((K, D))))
    init = dict(num_depths=depths, shared=shared, iters=2, eps=1e-5, use_cosine_sim=use_cosine_sim, dtype=lib.dtype)
    init["quantize_options"] = {"use_cosine_sim": use_cosine_sim}
    update = dict(shared=shared, decay=0.8, eps=1e-5, dead_code_threshold=2.0, normalize=use_cosine_sim)

    def train(rows, c):
        gens = [np.random.default_rng(70 + i) for i in range(n_books)]
        states, _ = residual_kmeans_init(rows, [empty] * n_books, [False] * n_books, rngs=gens, comm=c, **init)
        residual, xs, idx = rows, [], []
        for level in range(depths):
            out, cache = quantize_forward(
                residual, states[0 if shared else level].codebook, use_cosine_sim=use_cosine_sim
            )
            xs.append(residual if cache.x_norm is None else cache.x_norm.y)
            idx.append(out.indices)
            residual = residual - out.quantized
        states = residual_training_update(states, xs, idx, rngs=gens, comm=c, **update)
        return tuple(a for st in states for a in st)

    got, want = train(lib(part(x, sizes, comm.rank)), comm), train(lib(x), None)
    names = tuple(f"{f}[{i}]" for i in range(n_books) for f in EMAState._fields)
    return got, want, tuple(n for n in names if n.startswith("cluster_size"))


def shared_step(comm, lib, sizes, *, depths=2):
    """shared_training_update: Q EMA steps of one codebook, restarts drawn from every depth."""
    N = sum(sizes)
    xs, gen = [batch(81 + q, N) for q in range(depths)], np.random.default_rng(82)
    idx = [gen.integers(0, K, N) for _ in range(depths)]
    state = ema_state(lib, 83)
    opts = dict(decay=0.7, eps=1e-5, dead_code_threshold=1.2)
    mine = [lib(part(x, sizes, comm.rank)) for x in xs], [lib(part(i, sizes, comm.rank)) for i in idx]
    got = shared_training_update(state, *mine, rng=np.random.default_rng(84), comm=comm, **opts)
    want = shared_training_update(
        state, [lib(x) for x in xs], [lib(i) for i in idx], rng=np.random.default_rng(84), **opts
    )
    return got, want, ("cluster_size",)


SCENARIOS: dict[str, Callable] = {
    "ema_step": ema_step,
    "restart": restart,
    "initial_means": initial_means,
    "lloyd": lloyd,
    "kmeans_state": kmeans_state,
    "residual": residual,
    "shared_step": shared_step,
}

# (scenario, sizes per rank, options): the cases the MPI worker runs on 2 ranks
MPI_CASES = [
    ("ema_step", (3, 10), {}),
    ("ema_step", (0, 13), {"exact": True}),
    ("ema_step", (13, 0), {"dead_code_threshold": 1.5}),
    ("restart", (3, 10), {}),
    ("restart", (0, 4), {}),  # N < K: candidates drawn with replacement
    ("restart", (5, 6), {"depths": 2, "normalize": True}),
    ("initial_means", (9, 0), {}),
    ("lloyd", (3, 10), {}),
    ("lloyd", (6, 7), {"use_cosine_sim": True}),
    ("lloyd", (2, 9), {"iters": 1, "exact": True}),
    ("kmeans_state", (0, 12), {}),
    ("residual", (8, 11), {}),
    ("residual", (8, 11), {"shared": True, "use_cosine_sim": True}),
    ("shared_step", (4, 9), {}),
]


# ------------------------------------------------------------------------------------------
# the comparison
# ------------------------------------------------------------------------------------------


def run_case(comm, scenario: str, sizes: tuple, lib: Lib = None, **options) -> list:
    """Run one scenario on this rank; the problems found on any rank (the same list everywhere)."""
    lib = Lib() if lib is None else lib
    if len(sizes) != comm.size:
        raise ValueError(f"sizes {sizes} must have one entry per rank ({comm.size})")
    got, want, exact = SCENARIOS[scenario](comm, lib, tuple(sizes), **options)
    names = _names(got, exact)
    problems = []
    for name, a, b in zip(names, got, want):
        a, b = np.asarray(B.to_numpy(a)), np.asarray(B.to_numpy(b))
        if a.dtype != b.dtype or a.shape != b.shape:
            problems.append(f"{name}: {a.dtype}{a.shape} against one process's {b.dtype}{b.shape}")
        elif name in exact:
            if not np.array_equal(a, b):
                problems.append(f"{name}: not bit-identical to one process")
        elif not np.allclose(a, b, rtol=lib.rtol, atol=lib.rtol):
            problems.append(f"{name}: off by {np.max(np.abs(a - b)):.2e} from one process")
    digest = [np.asarray(B.to_numpy(a)).tobytes() for a in got]
    gathered = comm.allgather(digest)
    problems += [f"rank {r} holds other bits than rank 0" for r, d in enumerate(gathered) if d != gathered[0]]
    return [f"rank {r}: {p}" for r, found in enumerate(comm.allgather(problems)) for p in found]


def _names(got: tuple, exact: tuple) -> tuple:
    fields = getattr(got, "_fields", None)
    if fields is not None:
        return fields
    if len(exact) == len(got):
        return exact
    return tuple(f"out[{i}]" for i in range(len(got)))


# ------------------------------------------------------------------------------------------
# refusals: every rank stops, none waits
# ------------------------------------------------------------------------------------------


def refusals(comm) -> dict:
    """What each bad call raised on this rank: ``{case: exception type name}``."""
    x = clustered(91, 6 + comm.rank)
    out = {}

    def attempt(case, fn):
        try:
            fn()
            out[case] = None
        except (ValueError, TypeError, RuntimeError) as e:
            out[case] = type(e).__name__

    bad = np.array(x, copy=True)
    bad[0, 0] = np.nan
    attempt("nan_on_last_rank", lambda: kmeans(bad if comm.rank == comm.size - 1 else x, K, rng=0, comm=comm))
    attempt("seeds_differ", lambda: kmeans(x, K, rng=comm.rank, comm=comm))
    state = ema_state(Lib(), 3)
    idx = np.zeros(len(x), dtype=np.int64)
    small = EMAState(*(a[: K - 1] for a in state))  # one code fewer on rank 0
    attempt(
        "codebook_sizes_differ",
        lambda: training_update(small if comm.rank == 0 else state, x, idx, decay=0.9, eps=1e-5, comm=comm),
    )
    attempt("restart_seeds_differ", lambda: expire_dead_codes(state, x, threshold=9.0, rng=comm.rank, comm=comm))
    attempt("fine_afterwards", lambda: kmeans(x, K, rng=0, comm=comm))
    return out


# ------------------------------------------------------------------------------------------
# the quantizer modules: each rank its samples of every batch
# ------------------------------------------------------------------------------------------

MODULES = {  # kind -> (class name, options)
    "residual": ("ResidualVQ", dict(num_quantizers=2, codebook_dim=3, kmeans_init=True, kmeans_iters=2,
                                    threshold_ema_dead_code=1.5)),
    "shared": ("ResidualVQ", dict(num_quantizers=2, shared_codebook=True, use_cosine_sim=True,
                                  orthogonal_reg_weight=0.5, orthogonal_reg_active_codes_only=True)),
    "sampled": ("ResidualVQ", dict(num_quantizers=3, learnable_codebook=True, ema_update=False,
                                   stochastic_sample_codes=True, codebook_diversity_loss_weight=0.3,
                                   quantize_dropout=True, quantize_dropout_per_sample=True, rotation_trick=True)),
    "heads": ("VectorQuantize", dict(heads=2, codebook_dim=3, separate_codebook_per_head=True,
                                     threshold_ema_dead_code=1.0, kmeans_init=True, kmeans_iters=2)),
    "beam": ("ResidualVQ", dict(num_quantizers=3, beam_size=3, quantize_dropout=True, codebook_size=(K, 4, 6))),
}  # fmt: skip


def module(comm, lib, sizes, *, kind="residual", steps=2, tokens=3):
    """Training steps of a quantizer module, each rank given ``sizes[r]`` samples (of ``tokens``
    tokens, some masked) of every batch: the gathered outputs and dx, the losses, the usage
    statistics, the state and the summed parameter gradients against one process's."""
    import vqref

    name, options = MODULES[kind]
    options = {"codebook_size": K, **options}
    S = sum(sizes)

    def build(c):
        m = getattr(vqref, name)(dim=D, seed=9, dtype=lib.dtype_name, xp=lib.xp, comm=c, **options)
        return m

    mine, one = build(comm), build(None)
    got, want, names = [], [], []
    for step in range(steps):
        gen = np.random.default_rng(100 + step)
        x = clustered(101 + step, S * tokens).reshape(S, tokens, D)
        mask = gen.random((S, tokens)) < 0.8
        dq = gen.standard_normal((S, tokens, D))
        Q = mine.num_quantizers if mine.is_stack else 1
        dloss = lib(gen.uniform(0.5, 1.5, Q)) if mine.is_stack else 0.7
        q, idx, loss = mine(lib(part(x, sizes, comm.rank)), mask=lib(part(mask, sizes, comm.rank)))
        dx = mine.backward(lib(part(dq, sizes, comm.rank)), dloss)
        # the rows of every rank gathered, the parameter gradients summed over the ranks
        got += [np.concatenate(comm.allgather(np.asarray(B.to_numpy(a))), axis=0) for a in (q, idx, dx)]
        got += [loss] + [comm.allreduce_sum(mine.grads[k]) for k in sorted(mine.grads)] + _stats(mine)
        q1, idx1, loss1 = one(lib(x), mask=lib(mask))
        dx1 = one.backward(lib(dq), dloss)
        want += [q1, idx1, dx1, loss1] + [one.grads[k] for k in sorted(one.grads)] + _stats(one)
        names += [f"{n}_{step}" for n in ["quantized", "indices", "dx", "loss", *sorted(one.grads), *sorted(one.stats)]]
    state = sorted(one.state_dict())
    got += [mine.state_dict()[k] for k in state]
    want += [one.state_dict()[k] for k in state]
    names += state
    fields = collections.namedtuple("ModuleStep", [re.sub(r"\W", "_", f"f_{n}") for n in names])
    exact = tuple(f for f in fields._fields if f.startswith(("f_indices", "f_used_codes")))  # integers
    return fields(*got), tuple(want), exact


def _stats(m) -> list:
    """The usage statistics as arrays (every rank's codes: the same on every rank)."""
    return [np.asarray(m.stats[k], dtype=np.float64) for k in sorted(m.stats)]


SCENARIOS["module"] = module
MPI_CASES += [
    ("module", (2, 3), {"kind": "residual"}),
    ("module", (0, 4), {"kind": "shared"}),
    ("module", (3, 2), {"kind": "sampled"}),
    ("module", (1, 3), {"kind": "heads"}),
    ("module", (2, 2), {"kind": "beam"}),
]
