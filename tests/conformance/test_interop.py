"""vqref.interop: conversion to and from vector-quantize-pytorch, round trips, unsupported options."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from vector_quantize_pytorch import GroupedResidualVQ
from vector_quantize_pytorch import ResidualVQ as TorchRVQ
from vector_quantize_pytorch import VectorQuantize as TorchVQ

import vqref
from vqref import backend as B
from vqref.interop import VQP_VERSION, export_state_dict, from_vector_quantize_pytorch, to_vector_quantize_pytorch

from .conftest import batch, vqp_step, vqref_step

D, K = 16, 24


def torch_state(t) -> dict:
    return {k: v.detach().numpy().copy() for k, v in t.state_dict().items()}


def assert_states_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def trained_vqp(make, rng, steps=2):
    """A vqp module after a few training steps, so that its state is not the initial one."""
    torch.manual_seed(0)
    t = make()
    for _ in range(steps):
        t(torch.from_numpy(batch(rng, (3, 40, D))))
    return t


def test_installed_version_is_the_checked_one():
    import importlib.metadata

    assert importlib.metadata.version("vector-quantize-pytorch") == VQP_VERSION


VQP_MODULES = {
    "vq-default": lambda: TorchVQ(dim=D, codebook_size=K),
    "vq-ste-cosine-dead": lambda: TorchVQ(
        dim=D, codebook_size=K, rotation_trick=False, use_cosine_sim=True, threshold_ema_dead_code=1.5, decay=0.9
    ),
    "vq-learnable-orth": lambda: TorchVQ(
        dim=D,
        codebook_size=K,
        learnable_codebook=True,
        ema_update=False,
        orthogonal_reg_weight=2.0,
        orthogonal_reg_active_codes_only=True,
        orthogonal_reg_max_codes=8,
        commitment_weight=0.25,
        eps=1e-4,
    ),
    "vq-kmeans": lambda: TorchVQ(dim=D, codebook_size=K, kmeans_init=True, kmeans_iters=3),
    "rvq": lambda: TorchRVQ(dim=D, codebook_size=K, num_quantizers=3, rotation_trick=False),
    "rvq-shared": lambda: TorchRVQ(dim=D, codebook_size=K, num_quantizers=3, shared_codebook=True, use_cosine_sim=True),
    "rvq-kmeans": lambda: TorchRVQ(dim=D, codebook_size=K, num_quantizers=2, kmeans_init=True, kmeans_iters=2),
    # the structural options (docs/deviations.md §14)
    "vq-projection": lambda: TorchVQ(dim=D, codebook_size=K, codebook_dim=6, use_cosine_sim=True),
    "vq-heads": lambda: TorchVQ(dim=D, codebook_size=K, heads=4, codebook_dim=4, rotation_trick=False),
    "vq-separate-heads": lambda: TorchVQ(
        dim=D, codebook_size=K, heads=2, codebook_dim=5, separate_codebook_per_head=True, kmeans_init=True
    ),
    "vq-padding-returns-x": lambda: TorchVQ(dim=D, codebook_size=K, return_zeros_for_masked_padding=False),
    "rvq-projection-dropout": lambda: TorchRVQ(
        dim=D, codebook_size=K, num_quantizers=3, codebook_dim=7, quantize_dropout=True,
        quantize_dropout_cutoff_index=1, quantize_dropout_multiple_of=2,
    ),
    "rvq-sizes": lambda: TorchRVQ(dim=D, codebook_size=(K, 9, 31), rotation_trick=False),
    "rvq-beam": lambda: TorchRVQ(
        dim=D, codebook_size=K, num_quantizers=3, beam_size=3, eval_beam_size=4,
        beam_score_quantizer_weights=[1.0, 0.5, 2.0],
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(VQP_MODULES))
def test_torch_to_vqref_to_torch_round_trip(name, rng):
    t = trained_vqp(VQP_MODULES[name], rng)
    r = from_vector_quantize_pytorch(t)
    back = to_vector_quantize_pytorch(r)
    assert type(back) is type(t)
    assert_states_equal(torch_state(back), torch_state(t))
    assert_states_equal(export_state_dict(r), torch_state(t))
    # the configuration survives: converting again gives the same vqref configuration
    assert from_vector_quantize_pytorch(back).config() == r.config()
    # and the round-tripped torch module computes what the original does (eval: no state change)
    x = torch.from_numpy(batch(rng, (2, 30, D)))
    t.eval(), back.eval()
    q1, i1, _ = t(x)
    q2, i2, _ = back(x)
    assert torch.equal(i1, i2) and torch.equal(q1, q2)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(rotation_trick=True, use_cosine_sim=True, decay=0.95, commitment_weight=0.3),
        dict(learnable_codebook=True, ema_update=False, orthogonal_reg_weight=1.0, orthogonal_reg_max_codes=5),
        dict(kmeans_init=True, kmeans_iters=4, threshold_ema_dead_code=2.0),
        dict(num_quantizers=3),
        dict(num_quantizers=2, shared_codebook=True, rotation_trick=True),
        dict(codebook_dim=5, heads=3, separate_codebook_per_head=True, return_zeros_for_masked_padding=False),
        dict(codebook_size=[K, 7], codebook_dim=9, quantize_dropout=True, beam_size=2, eval_beam_size=5),
    ],
    ids=["default", "rotation-cosine", "learnable-orth", "kmeans-dead", "residual", "residual-shared", "heads",
         "residual-options"],
)  # fmt: skip
def test_vqref_to_torch_to_vqref_round_trip(kwargs, rng):
    kwargs = dict(kwargs)
    cls = vqref.ResidualVQ if "num_quantizers" in kwargs or "quantize_dropout" in kwargs else vqref.VectorQuantize
    if cls is vqref.ResidualVQ:
        kwargs.setdefault("codebook_size", K)
        r = cls(dim=D, seed=3, **kwargs)
    else:
        r = cls(D, K, seed=3, **kwargs)
    if not kwargs.get("kmeans_init"):
        r(batch(rng, (50, D)))  # a training step, so the state is not the initial one
    t = to_vector_quantize_pytorch(r)
    again = from_vector_quantize_pytorch(t)
    assert again.config() == r.config()
    assert_states_equal(
        {k: B.to_numpy(v) for k, v in again.state_dict().items()}, {k: B.to_numpy(v) for k, v in r.state_dict().items()}
    )


def test_rotation_trick_is_carried_explicitly_both_ways():
    # vqp's default estimator is the rotation trick, vqref's the straight-through estimator:
    # the conversion must write the actual setting, never rely on a default.
    assert from_vector_quantize_pytorch(TorchVQ(dim=D, codebook_size=K)).rotation_trick is True
    assert from_vector_quantize_pytorch(TorchVQ(dim=D, codebook_size=K, rotation_trick=False)).rotation_trick is False
    assert to_vector_quantize_pytorch(vqref.VectorQuantize(D, K)).rotation_trick is False
    assert to_vector_quantize_pytorch(vqref.VectorQuantize(D, K, rotation_trick=True)).rotation_trick is True
    rq = to_vector_quantize_pytorch(vqref.ResidualVQ(dim=D, codebook_size=K, num_quantizers=2))
    assert all(layer.rotation_trick is False for layer in rq.layers)


def test_converted_module_gives_the_same_step(rng):
    # One training step, including the EMA state, in both directions of the conversion.
    r = vqref.VectorQuantize(D, K, seed=1, rotation_trick=True, decay=0.9)
    r(batch(rng, (60, D)))
    t = to_vector_quantize_pytorch(r)
    x = batch(rng, (2, 40, D))
    g = (rng.standard_normal(x.shape) * 1e-3).astype(np.float32)
    vqp = vqp_step(t, x, g)
    ref = vqref_step(r, x, g)
    np.testing.assert_array_equal(ref.indices, vqp.indices)
    np.testing.assert_allclose(ref.losses, vqp.losses, rtol=2e-5)
    np.testing.assert_allclose(ref.dx, vqp.dx, rtol=1e-4, atol=1e-7)
    for k, v in export_state_dict(r).items():
        np.testing.assert_allclose(v, t.state_dict()[k].numpy(), rtol=1e-5, atol=1e-7, err_msg=k)


def test_kmeans_state_is_read_from_initted(rng):
    # vqp keeps no kmeans_init flag, only ``initted``: an uninitialised codebook converts to
    # kmeans_init=True (it will run k-means on its first training batch), an initialised one
    # behaves the same either way.
    t = TorchVQ(dim=D, codebook_size=K, kmeans_init=True, kmeans_iters=3)
    r = from_vector_quantize_pytorch(t)
    assert r.kmeans_init is True and r.initted is False and r.kmeans_iters == 3
    t(torch.from_numpy(batch(rng, (2, 40, D))))
    r2 = from_vector_quantize_pytorch(t)
    assert r2.initted is True and r2.kmeans_init is False


def test_state_is_copied_not_shared(rng):
    # torch updates its buffers in place; the vqref module must not see that.
    t = TorchVQ(dim=D, codebook_size=K)
    r = from_vector_quantize_pytorch(t)
    before = np.array(r.codebook, copy=True)
    t(torch.from_numpy(batch(rng, (2, 40, D))))
    np.testing.assert_array_equal(r.codebook, before)
    sd = export_state_dict(r)
    sd["_codebook.embed"][...] = 0
    np.testing.assert_array_equal(r.codebook, before)


def test_load_state_dict_copies_numpy_arrays():
    # what the conversion relies on besides its own copies: a loaded state does not alias
    r = vqref.VectorQuantize(D, K, seed=0)
    state = {k: np.array(v, copy=True) for k, v in r.state_dict().items()}
    r.load_state_dict(state)
    before = np.array(r.codebook, copy=True)
    state["codebook"][...] = 0.0
    np.testing.assert_array_equal(r.codebook, before)


def test_dtype_and_array_library_options(rng):
    import array_api_strict as xps

    t = TorchVQ(dim=D, codebook_size=K, rotation_trick=False)
    r = from_vector_quantize_pytorch(t, dtype="float64", xp=xps)
    assert r.codebook.dtype == xps.float64 and B.library_name(r.codebook) == "array_api_strict"
    np.testing.assert_array_equal(B.to_numpy(r.codebook), t._codebook.embed[0].numpy().astype(np.float64))
    x = batch(rng, (30, D))
    q, idx, loss = r(xps.asarray(x))
    q_t, idx_t, _ = t(torch.from_numpy(x))
    np.testing.assert_array_equal(B.to_numpy(idx), idx_t.numpy())
    exported = export_state_dict(r)
    assert all(v.dtype == np.float32 for k, v in exported.items() if not k.endswith("initted"))
    assert export_state_dict(r, dtype="float64")["_codebook.embed"].dtype == np.float64


def test_training_mode_is_carried():
    t = TorchVQ(dim=D, codebook_size=K).eval()
    assert from_vector_quantize_pytorch(t).training is False
    assert to_vector_quantize_pytorch(vqref.VectorQuantize(D, K).eval()).training is False


def test_export_state_dict_loads_strictly_into_vqp():
    for r, make in [
        (vqref.VectorQuantize(D, K, seed=0), lambda: TorchVQ(dim=D, codebook_size=K)),
        (
            vqref.ResidualVQ(dim=D, codebook_size=K, num_quantizers=3, seed=0),
            lambda: TorchRVQ(dim=D, codebook_size=K, num_quantizers=3),
        ),
        (
            vqref.ResidualVQ(dim=D, codebook_size=K, num_quantizers=3, shared_codebook=True, seed=0),
            lambda: TorchRVQ(dim=D, codebook_size=K, num_quantizers=3, shared_codebook=True),
        ),
    ]:
        t = make()
        sd = export_state_dict(r)
        assert sorted(sd) == sorted(t.state_dict())
        t.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
        first = t.layers[0] if hasattr(t, "layers") else t
        layer = r.layers[0] if hasattr(r, "layers") else r
        np.testing.assert_array_equal(first._codebook.embed[0].numpy(), layer.codebook)


def test_to_vqp_leaves_torchs_global_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    to_vector_quantize_pytorch(vqref.ResidualVQ(dim=D, codebook_size=K, num_quantizers=2))
    assert torch.equal(torch.rand(3), expected)


UNSUPPORTED_VQ = {
    "layernorm_after_project_in": dict(codebook_dim=8, layernorm_after_project_in=True),
    "orthogonal_reg_active_codes_only with separate_codebook_per_head": dict(
        heads=2, separate_codebook_per_head=True, orthogonal_reg_weight=1.0, orthogonal_reg_active_codes_only=True
    ),
    "codebook_diversity_loss_weight with separate_codebook_per_head": dict(
        heads=2, separate_codebook_per_head=True, codebook_diversity_loss_weight=0.1
    ),
    "sample_codebook_temp": dict(sample_codebook_temp=-1.0),
    "straight_through=True with sample_codebook_temp": dict(
        straight_through=True, rotation_trick=False, sample_codebook_temp=0.0
    ),
    "directional_reparam": dict(directional_reparam=True, threshold_ema_dead_code=1),
    "codebook_diversity_temperature": dict(codebook_diversity_loss_weight=0.1, codebook_diversity_temperature=-1.0),
    "commitment_use_cross_entropy_loss": dict(commitment_use_cross_entropy_loss=True),
    "affine_param": dict(affine_param=True),
    "accept_image_fmap": dict(accept_image_fmap=True),
    "accept_3d_fmap": dict(accept_3d_fmap=True),
    "channel_last": dict(channel_last=False),
    "in_place_codebook_optimizer": dict(
        learnable_codebook=True, ema_update=False, in_place_codebook_optimizer=lambda p: torch.optim.SGD(p, lr=0.1)
    ),
    "sync_update_v": dict(learnable_codebook=True, ema_update=False, sync_update_v=0.5),
    "route_gradients_to_input": dict(route_gradients_to_input=False),
    "freeze_codebook": dict(freeze_codebook=True),
    "manual_ema_update": dict(manual_ema_update=True),
    "vq_bridge": dict(vq_bridge=torch.nn.Identity(), learnable_codebook=True, ema_update=False),
}


@pytest.mark.parametrize("option", list(UNSUPPORTED_VQ))
def test_unsupported_vector_quantize_options_are_named(option):
    t = TorchVQ(dim=D, codebook_size=K, **UNSUPPORTED_VQ[option])
    with pytest.raises(ValueError, match=option):
        from_vector_quantize_pytorch(t)


UNSUPPORTED_RVQ = {
    "implicit_neural_codebook": dict(implicit_neural_codebook=True),
    "quant_grad_frac": dict(quant_grad_frac=0.1),
    "diveq": dict(diveq=True, threshold_ema_dead_code=1),
    "accept_image_fmap": dict(accept_image_fmap=True),
}


@pytest.mark.parametrize("option", list(UNSUPPORTED_RVQ))
def test_unsupported_residual_options_are_named(option):
    kwargs = dict(dim=D, codebook_size=K, num_quantizers=2)
    kwargs.update(UNSUPPORTED_RVQ[option])
    t = TorchRVQ(**kwargs)
    with pytest.raises(ValueError, match=option):
        from_vector_quantize_pytorch(t)


def test_every_unsupported_option_is_named_at_once():
    t = TorchVQ(dim=D, codebook_size=K, sample_codebook_temp=-1.0, affine_param=True, channel_last=False)
    with pytest.raises(ValueError) as info:
        from_vector_quantize_pytorch(t)
    for name in ("sample_codebook_temp", "affine_param", "channel_last"):
        assert name in str(info.value)


def test_residual_layers_must_share_one_configuration():
    t = TorchRVQ(dim=D, codebook_size=K, num_quantizers=2)
    t.layers[1]._codebook.decay = 0.5  # vqref applies one set of options at every depth
    with pytest.raises(ValueError, match="depth 1.*decay"):
        from_vector_quantize_pytorch(t)


def test_other_classes_are_rejected():
    from vector_quantize_pytorch import RandomProjectionQuantizer

    with pytest.raises(TypeError, match="VectorQuantize or ResidualVQ"):
        from_vector_quantize_pytorch(RandomProjectionQuantizer(dim=D, codebook_size=K, codebook_dim=4))
    with pytest.raises(TypeError):
        to_vector_quantize_pytorch(object())


@pytest.mark.parametrize("kwargs", [dict(), dict(codebook_dim=5, quantize_dropout=True, codebook_size=(K, 7)),
                                    dict(shared_codebook=True, use_cosine_sim=True, beam_size=2)],
                         ids=["plain", "projection-dropout-sizes", "shared-beam"])  # fmt: skip
def test_grouped_residual_vq_round_trips(kwargs, rng):
    kwargs = {"codebook_size": K, **kwargs}
    t = trained_vqp(lambda: GroupedResidualVQ(dim=D, groups=2, num_quantizers=2, rotation_trick=False, **kwargs), rng)
    r = from_vector_quantize_pytorch(t)
    assert type(r) is vqref.GroupedResidualVQ and r.groups == 2
    back = to_vector_quantize_pytorch(r)
    assert type(back) is GroupedResidualVQ
    assert_states_equal(torch_state(back), torch_state(t))
    assert_states_equal(export_state_dict(r), torch_state(t))
    assert from_vector_quantize_pytorch(back).config() == r.config()


def test_grouped_groups_must_share_one_configuration():
    t = GroupedResidualVQ(dim=D, groups=2, codebook_size=K, num_quantizers=2)
    for layer in t.rvqs[1].layers:
        layer._codebook.decay = 0.5
    with pytest.raises(ValueError, match="group 1 configured differently from group 0 .decay"):
        from_vector_quantize_pytorch(t)


def test_vqref_options_without_a_vqp_equivalent_are_rejected():
    with pytest.raises(ValueError, match="codebook_weight"):
        to_vector_quantize_pytorch(
            vqref.VectorQuantize(D, K, learnable_codebook=True, ema_update=False, codebook_weight=1.0)
        )
    with pytest.raises(ValueError, match="gradient_routing"):
        export_state_dict(vqref.ResidualVQ(dim=D, codebook_size=K, num_quantizers=2, gradient_routing="sum"))
    rvq = dict(dim=D, codebook_size=K, num_quantizers=3)
    for kwargs, name in (
        (dict(quantize_dropout=True, quantize_dropout_per_sample=True), "quantize_dropout_per_sample"),
        (dict(beam_size=2, beam_score="error"), "beam_score"),
    ):
        with pytest.raises(ValueError, match=name):
            to_vector_quantize_pytorch(vqref.ResidualVQ(**rvq, **kwargs))
    separate = dict(heads=2, separate_codebook_per_head=True)
    for kwargs in (dict(orthogonal_reg_weight=1.0, orthogonal_reg_active_codes_only=True),
                   dict(codebook_diversity_loss_weight=0.1)):  # fmt: skip
        with pytest.raises(ValueError, match="separate_codebook_per_head"):
            export_state_dict(vqref.VectorQuantize(D, K, **separate, **kwargs))


def test_importing_vqref_interop_does_not_import_torch():
    code = "import sys, vqref, vqref.interop; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(vqref.__file__).parents[1])
    )


def test_synchronisation_options_convert():
    # vqp resolves sync_codebook into use_ddp at construction (a process group or not); vqref keeps
    # sync_codebook (None: synchronise over a multi-rank comm) and sync_kmeans
    t = TorchVQ(dim=D, codebook_size=K, sync_codebook=True, sync_kmeans=False)
    r = from_vector_quantize_pytorch(t)
    assert r.sync_codebook is True and r.sync_kmeans is False
    back = to_vector_quantize_pytorch(r)
    assert back._codebook.use_ddp and back._codebook.kmeans_all_reduce_fn is not torch.distributed.all_reduce
    plain = from_vector_quantize_pytorch(TorchVQ(dim=D, codebook_size=K))
    assert plain.sync_codebook is None and plain.sync_kmeans is True
    assert not to_vector_quantize_pytorch(plain)._codebook.use_ddp  # no process group here
