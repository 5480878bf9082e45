"""JAX references for the backward passes of vqref: the second autograd oracle, next to torch.

Every backward in vqref is written by hand.  This package holds the *forwards* again, written
with ``jax.numpy`` straight from the equations (docs/math.md and the papers cited in each
module), with ``jax.lax.stop_gradient`` exactly where the math has ``sg[.]``; JAX then computes
their vector-Jacobian products.  They are not translations of the torch references in
:mod:`vqref.testing.torch_reference`: where a formula can be read two ways they take the other
one (direct differences for distances, a dense rotation matrix for the rotation trick, a
``where`` for every clamp), so two independent programs agree with vqref and with each other.

Use them through the one call :func:`vqref.testing.check_against_jax` (or :func:`vjp` here,
which returns JAX's output and gradients as float64 numpy arrays)::

    from vqref.testing import check_against_jax
    from vqref.testing import jax_reference as jr
    res = check_against_jax(lambda x, C: jr.vq.vq_layer(x, C, indices, learnable_codebook=True),
                            [x, C], (dquantized, dloss), [dx, dC])

Float64: :func:`vjp` switches JAX's 64-bit mode on for the duration of each call only (the
``jax.enable_x64`` context manager); to evaluate a reference yourself, do it inside ``with x64():``.
JAX is imported by this package (it is in the ``test`` extra); ``import vqref`` and
``import vqref.testing`` never import it.

Modules: :mod:`.vq` (distance, lookup, losses, straight-through, the VQ layer), :mod:`.cosine`
(l2 normalisation), :mod:`.orthogonal`, :mod:`.rotation`, :mod:`.fsq`, :mod:`.residual`,
:mod:`.nn` (the layers and the small VQ-VAE), :mod:`.autodiff` (:func:`vjp`).

Every public backward of vqref, its JAX reference (in this package) and the test of vqref's
test suite that checks one against the other (in float64, to 1e-10, with a random upstream
gradient); the suite also checks that this table lists every backward of the library:

==================================================================  =============================  ============================================
backward                                                            JAX reference                  test
==================================================================  =============================  ============================================
``vqref.ops.distance.squared_distance_backward``                    ``vq.squared_distance``        test_squared_distance_backward
``vqref.ops.lookup.lookup_backward``                                ``vq.lookup``                  test_lookup_backward_repeated_and_unused_codes
``vqref.ops.losses.mse_backward``                                   ``vq.mse``                     test_losses_backward
``vqref.ops.losses.commitment_loss_backward``                       ``vq.commitment_loss``         test_losses_backward
``vqref.ops.losses.codebook_loss_backward``                         ``vq.codebook_loss``           test_losses_backward
``vqref.ops.straight_through.straight_through_backward``            ``vq.straight_through``        test_straight_through_backward
``vqref.ops.l2norm.l2norm_backward``                                ``cosine.l2norm``              test_l2norm_backward_all_branches
``vqref.ops.orthogonal.orthogonal_loss_backward``                   ``orthogonal.orthogonal_loss`` test_orthogonal_loss_backward
``vqref.ops.rotation.rotation_trick_backward``                      ``rotation.rotation_trick``    test_rotation_trick_backward
``vqref.ops.rotation.rotation_trick_backward_fused``                ``rotation.rotation_trick``    test_rotation_trick_backward
``vqref.ops.fsq.bound_backward``                                    ``fsq.bound``                  test_fsq_op_backwards
``vqref.ops.fsq.round_ste_backward``                                ``fsq.round_ste``              test_fsq_op_backwards
``vqref.ops.fsq.scale_backward``                                    ``fsq.scale``                  test_fsq_op_backwards
``vqref.ops.linear.linear_backward``                                ``nn.linear``                  test_nn_functional_backwards
``vqref.nn.functional.relu_backward``                               ``nn.relu``                    test_nn_functional_backwards
``vqref.nn.functional.tanh_backward``                               ``nn.tanh``                    test_nn_functional_backwards
``vqref.nn.functional.mse_loss_backward``                           ``nn.mse_loss``                test_nn_functional_backwards
``vqref.core.quantize.estimator_backward``                          ``vq.estimator``               test_estimator_backward
``vqref.core.quantize.quantize_backward``                           ``vq.vq_layer``                test_quantize_backward
``vqref.core.residual.residual_backward``                           ``residual.residual_vq``       test_residual_backward
``vqref.core.fsq.fsq_backward``                                     ``fsq.fsq``                    test_fsq_core_backward
``vqref.nn.layers.Linear.backward``                                 ``nn.linear``                  test_linear_and_mlp_module_backward
``vqref.nn.layers.MLP.backward``                                    ``nn.mlp``                     test_linear_and_mlp_module_backward
``vqref.nn.vqvae.VQVAE.backward``                                   ``nn.vqvae``                   test_vqvae_backward
``vqref.quantizers.vector_quantize.VectorQuantize.backward``        ``vq.vq_layer``                test_vector_quantize_module_backward
``vqref.quantizers.residual_vq.ResidualVQ.backward``                ``residual.residual_vq``       test_residual_vq_module_backward
``vqref.quantizers.fsq.FSQ.backward``                               ``fsq.fsq``                    test_fsq_module_backward
==================================================================  =============================  ============================================

The residual rows cover both gradient routings, the rotation trick per depth and on the sum,
shared codebooks and per-depth orthogonal code subsets; the VQ-layer rows every estimator and
loss option (commitment, one learnable term, split codebook term, cosine, rotation, orthogonal
with code subsets).  The test suite names the backwards that have no JAX reference yet.
"""

from . import cosine, fsq, nn, orthogonal, residual, rotation, vq
from .autodiff import as_host, vjp, x64

__all__ = ["vjp", "x64", "as_host", "cosine", "fsq", "nn", "orthogonal", "residual", "rotation", "vq"]
