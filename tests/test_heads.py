"""Heads: ``heads`` pieces per vector, one shared codebook or one per head (product quantization).

Oracles: the definition in numpy (cut, nearest code per piece, side by side, project out); a
module with a codebook per head against H independent single-codebook modules on the slices
(the loss is their mean, so each gets a H-th of the loss gradient); gradients against torch
autograd in float64; the pieces' order against vector-quantize-pytorch's ``(b, h, t)``.
"""

from __future__ import annotations

import numpy as np
import pytest

from vqref import ResidualVQ, VectorQuantize
from vqref import backend as B
from vqref.core.layer import frame, head_order, stream_row_ids
from vqref.testing.torch_reference.layer import layer_grads

D, K, H = 6, 7, 3
N = 10


def host(a):
    return np.asarray(B.to_numpy(a))


@pytest.mark.parametrize("separate", [False, True])
def test_values_match_the_definition(bk, rng, separate):
    m = VectorQuantize(D, K, heads=H, codebook_dim=2, separate_codebook_per_head=separate, seed=0,
                       dtype=bk.dtype_name, xp=bk.module)  # fmt: skip
    assert not m.has_projections  # H d = D
    assert m.codebook.shape == ((H, K, 2) if separate else (K, 2))
    m.eval()
    x = rng.standard_normal((2, N, D))
    q, idx, loss = m(bk.asarray(x))
    assert idx.shape == (2, N, H) and loss.shape == ()
    pieces = x.reshape(-1, H, 2)
    books = host(m.codebook).astype(np.float64)
    books = books if separate else np.stack([books] * H)
    k = np.stack([((pieces[:, h, None] - books[h][None]) ** 2).sum(-1).argmin(1) for h in range(H)], axis=1)
    np.testing.assert_array_equal(host(idx).reshape(-1, H), k)
    codes = np.stack([books[h][k[:, h]] for h in range(H)], axis=1)  # (M, H, 2)
    np.testing.assert_allclose(host(q).reshape(-1, H, 2), codes, rtol=bk.rtol, atol=bk.rtol)
    assert float(host(loss)) == pytest.approx(np.mean((pieces - codes) ** 2), rel=bk.rtol * 10)
    np.testing.assert_allclose(host(m.get_output_from_indices(idx)), host(q), rtol=bk.rtol, atol=bk.rtol)
    assert isinstance(m.stats["usage"], tuple if separate else float)


def test_a_codebook_per_head_is_h_independent_quantizers(rng):
    m = VectorQuantize(D, K, heads=H, codebook_dim=2, separate_codebook_per_head=True, seed=0, dtype="float64",
                       decay=0.7)  # fmt: skip
    singles = []
    for h in range(H):
        s = VectorQuantize(2, K, seed=0, dtype="float64", decay=0.7)
        s.init_codebook(m.codebook[h])
        singles.append(s)
    m.load_state_dict({**m.state_dict(), "cluster_size": np.ones((H, K)), "embed_avg": np.array(m.codebook)})
    for _ in range(3):
        x, dq = rng.standard_normal((N, D)), rng.standard_normal((N, D))
        q, idx, loss = m(x)
        dx = m.backward(dq, 0.9)
        outs = [s(x[:, 2 * h : 2 * h + 2]) for h, s in enumerate(singles)]
        dxs = [s.backward(dq[:, 2 * h : 2 * h + 2], 0.9 / H) for h, s in enumerate(singles)]
        np.testing.assert_allclose(q, np.concatenate([o[0] for o in outs], axis=1), rtol=1e-12)
        np.testing.assert_array_equal(idx, np.stack([o[1] for o in outs], axis=1))
        assert float(loss) == pytest.approx(np.mean([float(o[2]) for o in outs]), rel=1e-12)
        np.testing.assert_allclose(dx, np.concatenate(dxs, axis=1), rtol=1e-12, atol=1e-15)
        for h, s in enumerate(singles):
            np.testing.assert_allclose(m.codebook[h], s.codebook, rtol=1e-12)
            np.testing.assert_allclose(m.cluster_size[h], s.cluster_size, rtol=1e-12)


@pytest.mark.parametrize("kw", [dict(), dict(use_cosine_sim=True), dict(rotation_trick=True),
                                dict(learnable_codebook=True, ema_update=False, orthogonal_reg_weight=0.3)],
                         ids=["ste", "cosine", "rotation", "learnable-orthogonal"])  # fmt: skip
@pytest.mark.parametrize("separate", [False, True])
def test_gradients_match_torch_autograd(bk64, rng, kw, separate):
    m = VectorQuantize(D, K, heads=2, codebook_dim=4, separate_codebook_per_head=separate, seed=1, dtype="float64",
                       xp=bk64.module, **kw)  # fmt: skip
    state = {k: host(v).copy() for k, v in m.state_dict().items()}
    x, dq = rng.standard_normal((N, D)), rng.standard_normal((N, D))
    q, idx, loss = m(bk64.asarray(x))
    dx = m.backward(bk64.asarray(dq), 1.4)
    books = [state["codebook"][h] for h in range(2)] if separate else [state["codebook"]]
    proj = {"W_in": state["project_in.W"], "b_in": state["project_in.b"], "W_out": state["project_out.W"],
            "b_out": state["project_out.b"]}  # fmt: skip
    opts = {k: v for k, v in kw.items() if k in ("use_cosine_sim", "rotation_trick", "learnable_codebook")}
    ref_q, ref_losses, ref_dx, ref_dcb, ref_dproj = layer_grads(x, books, host(idx), dq, 1.4, projections=proj,
                                                                 heads=2, separate=separate, **opts)  # fmt: skip
    np.testing.assert_allclose(host(q), ref_q, rtol=1e-10, atol=1e-12)
    orth = 0.0
    if m.orthogonal_reg_weight:  # the regulariser is on the codebook, not in the reference's layer loss
        orth = float(np.mean([float(host(v)) for v in np.atleast_1d(m.last_losses["orthogonal"])]))
        assert orth > 0
    np.testing.assert_allclose(float(host(loss)) - 0.3 * orth * bool(orth), ref_losses[0], rtol=1e-9)
    np.testing.assert_allclose(host(dx), ref_dx, rtol=1e-10, atol=1e-12)
    names = {"W_in": "project_in.W", "b_in": "project_in.b", "W_out": "project_out.W", "b_out": "project_out.b"}
    for k, v in ref_dproj.items():
        np.testing.assert_allclose(host(m.grads[names[k]]), v, rtol=1e-10, atol=1e-12)
    if m.learnable_codebook and not m.orthogonal_reg_weight:
        mine = host(m.grads["codebook"])
        ref = np.stack(ref_dcb) if separate else ref_dcb[0]
        np.testing.assert_allclose(mine, ref, rtol=1e-10, atol=1e-12)


def test_the_pieces_order_is_sample_head_token():
    order = head_order((2, 3), None, 2)  # piece (j, h) is row j H + h of the (n H, d) pieces
    expected = [2 * (b * 3 + t) + h for b in range(2) for h in range(2) for t in range(3)]
    np.testing.assert_array_equal(order, expected)
    kept = np.array([0, 2, 4, 5])  # a mask keeps rows (0,0) (0,2) (1,1) (1,2)
    np.testing.assert_array_equal(head_order((2, 3), kept, 2), [0, 2, 1, 3, 4, 6, 5, 7])
    # a row's place in the whole batch's stream (its noise) does not depend on the mask
    fr = frame((2, 3), np.isin(np.arange(6), kept).reshape(2, 3), heads=2, separate=False, passthrough=False,
               like=np.zeros((6, 1)))  # fmt: skip
    total, ids = stream_row_ids((2, 3), fr)
    full = head_order((2, 3), None, 2)
    assert total == 12 and list(full[ids[0]]) == list((kept[fr.order // 2] * 2 + fr.order % 2))


def test_heads_need_a_single_depth():
    with pytest.raises(ValueError, match="heads=2 with a residual stack"):
        ResidualVQ(dim=D, num_quantizers=2, codebook_size=K, heads=2)
    assert VectorQuantize(D, K, heads=2).has_projections  # codebook_dim defaults to dim: D -> 2 D
