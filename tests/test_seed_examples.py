"""The snippets of the document vqref was started from run on vqref with three kinds of edit.

That document shows six snippets written for vector-quantize-pytorch; they are reproduced in
this file as text, each with exactly these edits:

* the imports become ``import numpy as np`` and ``from vqref import VectorQuantize, ResidualVQ``;
* ``x`` is the numpy array ``np.random.randn(1, 1024, 256)`` (the float32 run appends
  ``.astype(np.float32)``);
* the three missing commas after ``kmeans_iters = 10`` are added.

The first snippet is indented by one space in the original (an IndentationError as written); it
is dedented before running, which changes no token.  It only builds the quantizer, so the test
calls it on ``x`` itself.

Each snippet is executed in two parts, construction then call, so that a twin of the freshly
built module can be taken in between.  The twin has its EMA update switched off: its training
forward performs the same k-means initialisation and assignment (same random stream) but leaves
the codebook where the forward read it, so decoding the returned indices with the twin is
decoding them with the state the call actually used (a training forward updates the codebook
*after* computing its output).
"""

import copy
import pathlib
import re
import textwrap

import numpy as np
import pytest

from vqref import VectorQuantize

RESIDUAL_VQ = """
 vq = ResidualVQ(
        num_quantizers=2,
        n_embed = 512,
        dim = 256,
        decay = 0.8,
        commitment = 1.,
        kmeans_init=True,
        kmeans_iters=2,
        use_cosine_sim = True,
        orthogonal_reg_weight = 0.5,
    )
"""

KMEANS_INIT = """
import numpy as np
from vqref import VectorQuantize, ResidualVQ
vq = VectorQuantize(
    dim = 256,
    codebook_size = 256,
    num_quantizers = 4,
    kmeans_init = True,   # set to True
    kmeans_iters = 10     # number of kmeans iterations to calculate the centroids for the codebook on init
)
x = np.random.randn(1, 1024, 256)
quantized, indices, commit_loss = vq(x)
"""

COSINE_SIM = """
import numpy as np
from vqref import VectorQuantize, ResidualVQ
vq = VectorQuantize(
    dim = 256,
    codebook_size = 256,
    num_quantizers = 4,
    kmeans_init = True,   # set to True
    kmeans_iters = 10,     # number of kmeans iterations to calculate the centroids for the codebook on init
    use_cosine_sim = True,
)
x = np.random.randn(1, 1024, 256)
quantized, indices, commit_loss = vq(x)
"""

ORTHOGONAL = """
import numpy as np
from vqref import VectorQuantize, ResidualVQ
vq = VectorQuantize(
    dim = 256,
    codebook_size = 256,
    num_quantizers = 4,
    kmeans_init = True,   # set to True
    kmeans_iters = 10,     # number of kmeans iterations to calculate the centroids for the codebook on init
    use_cosine_sim = True,
    orthogonal_reg_weight = 0.5,
)
x = np.random.randn(1, 1024, 256)
quantized, indices, commit_loss = vq(x)
"""

SHARED_CODEBOOK = """
import numpy as np
from vqref import VectorQuantize, ResidualVQ
rq = ResidualVQ(
    num_quantizers=2,
    n_embed = 512,
    shared_codebook = True,
    dim = 256,
    decay = 0.8,
    commitment = 1.,
    kmeans_init=True,
    kmeans_iters=2,
    use_cosine_sim = True,
    orthogonal_reg_weight = 0.5,
)
x = np.random.randn(1, 1024, 256)
quantized, indices, commit_loss = rq(x)
"""

ROTATION_TRICK = """
import numpy as np
from vqref import VectorQuantize, ResidualVQ
vq = VectorQuantize(
    dim = 256,
    codebook_size = 256,
    num_quantizers = 4,
    kmeans_init = True,   # set to True
    kmeans_iters = 10,     # number of kmeans iterations to calculate the centroids for the codebook on init
    use_cosine_sim = True,
    orthogonal_reg_weight = 0.5,
    rotation_trick=True,
)
x = np.random.randn(1, 1024, 256)
quantized, indices, commit_loss = vq(x)
"""

SNIPPETS = {
    "residual-vq": (RESIDUAL_VQ, 2, 512),
    "kmeans-init": (KMEANS_INIT, 4, 256),
    "cosine-sim": (COSINE_SIM, 4, 256),
    "orthogonal": (ORTHOGONAL, 4, 256),
    "shared-codebook": (SHARED_CODEBOOK, 2, 512),
    "rotation-trick": (ROTATION_TRICK, 4, 256),
}

# The document vqref was started from, kept verbatim in the repository so that the snippets above
# can always be compared with it.
SEED = pathlib.Path(__file__).resolve().parent / "data" / "seed_document.md"


def _split(snippet: str, dtype: str) -> tuple[str, str]:
    """The construction (imports and constructor) and the call (``x = ...`` onwards)."""
    code = textwrap.dedent(snippet)
    if dtype == "float32":
        code = code.replace("np.random.randn(1, 1024, 256)", "np.random.randn(1, 1024, 256).astype(np.float32)")
    head, sep, tail = code.partition("\nx = ")
    return head, (sep + tail) if sep else ""


def _twin_without_ema(module):
    """A copy of ``module`` whose EMA step is off."""
    twin = copy.deepcopy(module)
    twin.ema_update = False
    return twin


def _orthogonal_loss(C):
    """``sum((C^ C^T)^2) / K^2 - 1/K`` in float64, from the definition (arXiv 2112.00384 eq. 2)."""
    C = np.asarray(C, dtype=np.float64)
    Ch = C / np.maximum(np.linalg.norm(C, axis=1, keepdims=True), 1e-6)
    K = C.shape[0]
    return float(((Ch @ Ch.T) ** 2).sum() / K**2 - 1.0 / K)


def _state(module):
    return {k: np.array(v, copy=True) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(SNIPPETS))
def test_seed_snippet_runs_and_its_output_is_the_decode_of_its_indices(name, dtype):
    snippet, Q, K = SNIPPETS[name]
    head, call = _split(snippet, dtype)
    ns = {"__name__": "seed_snippet"}
    exec("from vqref import VectorQuantize, ResidualVQ", ns)  # the first snippet has no imports
    exec(head, ns)
    module = ns.get("vq", ns.get("rq"))
    assert (
        isinstance(module, VectorQuantize)
        and module.is_stack
        and module.num_quantizers == Q
        and module.codebook_size == K
    )
    assert module.training
    twin = _twin_without_ema(module)
    before = _state(module)

    np.random.seed(0)  # the snippet draws x from numpy's global generator
    if call:
        exec(call, ns)
        x, quantized, indices, commit_loss = ns["x"], ns["quantized"], ns["indices"], ns["commit_loss"]
    else:
        x = np.random.randn(1, 1024, 256).astype(dtype)
        quantized, indices, commit_loss = module(x)

    # shapes, dtypes, finiteness, ranges
    assert isinstance(x, np.ndarray) and x.dtype == dtype
    assert quantized.shape == (1, 1024, 256) and quantized.dtype == dtype
    assert indices.shape == (1, 1024, Q) and indices.dtype == np.int64
    assert commit_loss.shape == (Q,) and commit_loss.dtype == dtype
    assert np.all(np.isfinite(quantized)) and np.all(np.isfinite(commit_loss)) and np.all(commit_loss >= 0)
    assert indices.min() >= 0 and indices.max() < K
    # every depth was initialised by k-means and the EMA step moved the codebooks
    after = _state(module)
    assert all(bool(v) for k, v in after.items() if k.endswith("initted"))
    assert not all(bool(v) for k, v in before.items() if k.endswith("initted"))

    # The twin repeats the call with the EMA step off: same quantized and indices, bit for bit
    # (the losses up to the orthogonal term, below), and its state is the one the call quantized
    # with.  quantized == decode(indices) with that state.
    tq, ti, tl = twin(x)
    np.testing.assert_array_equal(tq, quantized)
    np.testing.assert_array_equal(ti, indices)
    used = _state(twin)
    w = module.layers[0].orthogonal_reg_weight
    if w == 0 or module.shared_codebook:
        np.testing.assert_array_equal(tl, commit_loss)
    else:
        # Each depth's orthogonal term is evaluated on the codebook the module holds after the
        # forward: after the EMA step in the module, the unchanged one in the twin.  Without
        # those terms (recomputed here in float64) the losses agree.
        keys = [f"{level}.codebook" for level in range(Q)]
        mine = commit_loss.astype(np.float64) - w * np.array([_orthogonal_loss(after[k]) for k in keys])
        theirs = tl.astype(np.float64) - w * np.array([_orthogonal_loss(used[k]) for k in keys])
        np.testing.assert_allclose(mine, theirs, rtol=1e-5 if dtype == "float32" else 1e-10)
    for k, v in used.items():
        if k.endswith("codebook"):
            assert not np.array_equal(v, after[k]), f"{k}: the EMA step should have moved it"
    decoded = twin.get_output_from_indices(indices)
    assert decoded.shape == quantized.shape
    if dtype == "float32":
        np.testing.assert_array_equal(decoded, quantized)
    else:  # the float32 state's codes, normalised in float64 by the forward, in float32 by the decode
        np.testing.assert_allclose(decoded, quantized, rtol=1e-6, atol=1e-6)
    # sum of codes + final residual == x
    np.testing.assert_allclose(
        quantized.reshape(-1, 256) + module.last_residuals[-1],
        x.reshape(-1, 256),
        rtol=0,
        atol=1e-4 if dtype == "float32" else 1e-12,
    )

    # eval mode on the updated module: nothing changes, and the output is the decode of its indices
    module.eval()
    eq, ei, el = module(x)
    assert eq.dtype == dtype and ei.shape == (1, 1024, Q) and np.all(np.isfinite(eq))
    for k, v in _state(module).items():
        np.testing.assert_array_equal(v, after[k], err_msg=k)
    decoded = module.get_output_from_indices(ei)
    if dtype == "float32":
        np.testing.assert_array_equal(decoded, eq)
    else:
        np.testing.assert_allclose(decoded, eq, rtol=1e-6, atol=1e-6)
    codes = module.get_codes_from_indices(ei)
    assert codes.shape == (Q, 1, 1024, 256)


_ALLOWED_EDITS = [
    ("import torch", "import numpy as np"),
    ("from vector_quantize_pytorch import VectorQuantize", "from vqref import VectorQuantize, ResidualVQ"),
    ("torch.randn(1, 1024, 256)", "np.random.randn(1, 1024, 256)"),
]


def test_snippets_are_the_seed_with_only_the_allowed_edits():
    blocks = re.findall(r"```python\n(.*?)```", SEED.read_text(), flags=re.S)
    assert len(blocks) == len(SNIPPETS)
    commas = 0
    for block, (name, (snippet, _, _)) in zip(blocks, SNIPPETS.items()):
        edited = block
        for old, new in _ALLOWED_EDITS:
            edited = edited.replace(old, new)
        # a comma where another argument follows (the last argument needs none)
        edited, n = re.subn(r"kmeans_iters = 10( +#[^\n]*\n)(?!\))", r"kmeans_iters = 10,\1", edited)
        commas += n
        strip = lambda s: [line.rstrip() for line in s.strip("\n").splitlines()]  # noqa: E731
        assert strip(edited) == strip(snippet), name
    assert commas == 3  # the three missing commas
