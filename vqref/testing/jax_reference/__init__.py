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

Modules: :mod:`.vq` (distance, lookup, losses, straight-through, the VQ layer with all its
estimators and losses), :mod:`.cosine` (l2 normalisation), :mod:`.orthogonal`, :mod:`.rotation`,
:mod:`.gumbel` (logits, Gumbel-softmax, soft codes, diversity loss), :mod:`.entropy` (softmax,
clamped entropy, the entropy penalty, softplus), :mod:`.fsq` (both grids, the layer, residual
FSQ), :mod:`.lfq` (LFQ ops, the layer, residual LFQ), :mod:`.residual` (residual VQ and the
recursion for any quantizer), :mod:`.layer` (kept rows, projections and heads around the
quantizer), :mod:`.nn` (the layers, the small VQ-VAE and the autoencoder around any
quantizer), :mod:`.conv` (convolutions and the convolutional VQ-VAE), :mod:`.autodiff`
(:func:`vjp`).

Every public backward of vqref, its JAX reference (in this package) and the test of vqref's
test suite that checks one against the other (in float64, to 1e-10, with a random upstream
gradient); the suite also checks that this table lists every backward of the library:

=====================================================================  ==================================  ===============================================
backward                                                               JAX reference                       test
=====================================================================  ==================================  ===============================================
``vqref.ops.distance.squared_distance_backward``                       ``vq.squared_distance``             test_squared_distance_backward
``vqref.ops.lookup.lookup_backward``                                   ``vq.lookup``                       test_lookup_backward_repeated_and_unused_codes
``vqref.ops.losses.mse_backward``                                      ``vq.mse``                          test_losses_backward
``vqref.ops.losses.commitment_loss_backward``                          ``vq.commitment_loss``              test_losses_backward
``vqref.ops.losses.codebook_loss_backward``                            ``vq.codebook_loss``                test_losses_backward
``vqref.ops.losses.commitment_loss_backward_added``                    ``vq.commitment_loss``              test_losses_backward
``vqref.ops.losses.codebook_loss_backward_codes``                      ``vq.codebook_loss``                test_losses_backward
``vqref.ops.straight_through.straight_through_backward``               ``vq.straight_through``             test_straight_through_backward
``vqref.ops.l2norm.l2norm_backward``                                   ``cosine.l2norm``                   test_l2norm_backward_all_branches
``vqref.ops.l2norm.l2norm_backward_fast``                              ``cosine.l2norm``                   test_l2norm_backward_all_branches
``vqref.ops.orthogonal.orthogonal_loss_backward``                      ``orthogonal.orthogonal_loss``      test_orthogonal_loss_backward
``vqref.ops.rotation.rotation_trick_backward``                         ``rotation.rotation_trick``         test_rotation_trick_backward
``vqref.ops.rotation.rotation_trick_backward_fused``                   ``rotation.rotation_trick``         test_rotation_trick_backward
``vqref.ops.fsq.bound_backward``                                       ``fsq.bound``                       test_fsq_op_backwards
``vqref.ops.fsq.round_ste_backward``                                   ``fsq.round_ste``                   test_fsq_op_backwards
``vqref.ops.fsq.scale_backward``                                       ``fsq.scale``                       test_fsq_op_backwards
``vqref.ops.fsq.symmetric_bound_backward``                             ``fsq.symmetric_bound``             test_fsq_symmetric_grid_op_backwards
``vqref.ops.fsq.floor_ste_backward``                                   ``fsq.floor_ste``                   test_fsq_symmetric_grid_op_backwards
``vqref.ops.fsq.symmetric_scale_backward``                             ``fsq.symmetric_scale``             test_fsq_symmetric_grid_op_backwards
``vqref.ops.fsq.noise_dropout_backward``                               ``fsq.noise_dropout``               test_fsq_noise_dropout_and_soft_clamp_backwards
``vqref.ops.fsq.soft_clamp_backward``                                  ``fsq.soft_clamp``                  test_fsq_noise_dropout_and_soft_clamp_backwards
``vqref.ops.lfq.soft_clamp_backward``                                  ``lfq.soft_clamp``                  test_lfq_op_backwards
``vqref.ops.lfq.sign_ste_backward``                                    ``lfq.sign_ste``                    test_lfq_op_backwards
``vqref.ops.lfq.code_scores_backward``                                 ``lfq.code_scores``                 test_lfq_op_backwards
``vqref.ops.lfq.code_scores_backward_factorised``                      ``lfq.code_scores``                 test_lfq_op_backwards
``vqref.ops.lfq.cosine_linear_backward``                               ``lfq.cosine_linear``               test_lfq_op_backwards
``vqref.ops.entropy.softmax_backward``                                 ``entropy.softmax``                 test_entropy_op_backwards
``vqref.ops.entropy.entropy_backward``                                 ``entropy.entropy``                 test_entropy_op_backwards
``vqref.ops.entropy.entropy_penalty_backward``                         ``entropy.entropy_penalty``         test_entropy_op_backwards
``vqref.ops.entropy.softplus_backward``                                ``entropy.softplus``                test_entropy_op_backwards
``vqref.ops.gumbel.code_logits_backward``                              ``gumbel.code_logits``              test_gumbel_op_backwards
``vqref.ops.gumbel.gumbel_softmax_backward``                           ``gumbel.gumbel_softmax``           test_gumbel_op_backwards
``vqref.ops.gumbel_fast.gumbel_softmax_backward_blocked``              ``gumbel.gumbel_softmax``           test_gumbel_op_backwards
``vqref.ops.gumbel.soft_assignment_backward``                          ``gumbel.soft_assignment``          test_gumbel_op_backwards
``vqref.ops.gumbel.straight_through_gumbel_backward``                  ``gumbel.straight_through_gumbel``  test_gumbel_op_backwards
``vqref.ops.gumbel.diversity_loss_backward``                           ``gumbel.diversity_loss``           test_gumbel_op_backwards
``vqref.ops.linear.linear_backward``                                   ``nn.linear``                       test_nn_functional_backwards
``vqref.nn.functional.relu_backward``                                  ``nn.relu``                         test_nn_functional_backwards
``vqref.nn.functional.tanh_backward``                                  ``nn.tanh``                         test_nn_functional_backwards
``vqref.nn.functional.mse_loss_backward``                              ``nn.mse_loss``                     test_nn_functional_backwards
``vqref.nn.conv.conv2d_backward``                                      ``conv.conv2d``                     test_conv_backwards
``vqref.nn.conv.conv_transpose2d_backward``                            ``conv.conv_transpose2d``           test_conv_backwards
``vqref.core.quantize.estimator_backward``                             ``vq.estimator``                    test_estimator_backward
``vqref.core.quantize.quantize_backward``                              ``vq.vq_layer``                     test_quantize_backward
``vqref.core.quantize.grouped_diversity_backward``                     ``gumbel.grouped_diversity_loss``   test_gumbel_op_backwards
``vqref.core.residual.residual_backward``                              ``residual.residual_vq``            test_residual_backward
``vqref.core.residual.residual_stack_backward``                        ``residual.residual_stack``         test_residual_stack_backward
``vqref.core.fsq.fsq_backward``                                        ``fsq.fsq``                         test_fsq_core_backward
``vqref.core.fsq.fsq_layer_backward``                                  ``fsq.fsq_layer``                   test_fsq_layer_backward
``vqref.ops.linear_fast.affine_backward_blocked``                       ``fsq.fsq_layer``                   test_fsq_layer_backward
``vqref.core.residual_fsq.residual_fsq_backward``                      ``fsq.residual_fsq``                test_residual_fsq_core_backward
``vqref.core.layer.layer_in_backward``                                 ``layer.layer_in``                  test_layer_backwards
``vqref.core.layer.layer_out_backward``                                ``layer.layer_out``                 test_layer_backwards
``vqref.core.lfq.lfq_backward``                                        ``lfq.lfq``                         test_lfq_core_backward
``vqref.ops.entropy_fast.lfq_entropy_backward_blocked``                ``lfq.lfq``                         test_lfq_core_backward
``vqref.core.lfq.residual_lfq_backward``                               ``lfq.residual_lfq``                test_residual_lfq_core_backward
``vqref.nn.layers.Linear.backward``                                    ``nn.linear``                       test_linear_and_mlp_module_backward
``vqref.nn.layers.MLP.backward``                                       ``nn.mlp``                          test_linear_and_mlp_module_backward
``vqref.nn.vqvae.VQVAE.backward``                                      ``nn.vqvae``                        test_vqvae_backward
``vqref.nn.vqvae.QuantizerAdapter.backward``                           ``nn.autoencoder``                  test_vqvae_with_fsq_and_lfq_backward
``vqref.nn.conv_layers.ConvNet.backward``                              ``conv.convnet``                    test_conv_net_module_backward
``vqref.nn.conv_vqvae.ConvVQVAE.backward``                             ``conv.conv_vqvae``                 test_conv_vqvae_backward
``vqref.quantizers.vector_quantize.VectorQuantize.backward``           ``layer.quantizer_layer``           test_vector_quantize_module_backward
``vqref.quantizers.vq_step.backward_step``                             ``layer.quantizer_layer``           test_vector_quantize_module_backward
``vqref.quantizers.residual_vq.ResidualVQ.backward``                   ``residual.residual_vq``            test_residual_vq_module_backward
``vqref.quantizers.grouped_residual_vq.GroupedResidualVQ.backward``    ``residual.residual_vq``            test_grouped_residual_vq_module_backward
``vqref.quantizers.fsq.FSQ.backward``                                  ``fsq.fsq_layer``                   test_fsq_module_backward
``vqref.quantizers.residual_fsq.ResidualFSQ.backward``                 ``fsq.residual_fsq``                test_residual_fsq_module_backward
``vqref.quantizers.lfq.LFQ.backward``                                  ``lfq.lfq``                         test_lfq_module_backward
``vqref.quantizers.residual_lfq.ResidualLFQ.backward``                 ``lfq.residual_lfq``                test_residual_lfq_module_backward
=====================================================================  ==================================  ===============================================

The residual rows cover both gradient routings, the rotation trick per depth and on the sum,
shared codebooks, per-depth orthogonal code subsets and per-depth Gumbel sampling; the VQ-layer
rows every estimator (STE, rotation trick, straight-through Gumbel-softmax with and without
noise, soft code) and loss option (commitment, one learnable term, split codebook term, cosine,
diversity loss per position, orthogonal with code subsets), and the module rows heads (a codebook
per head, or one for all pieces), projections to ``codebook_dim`` and masks (absent rows
returning zeros or the input); the FSQ rows both grids, the clamp's
kinks, noise dropout, projections, rotation and quantize dropout; the LFQ rows spherical codes,
the soft clamp, softplus, cosine projections, rotations and the rows of the entropy penalty and
of the commitment loss.  The rows of the ``*_fast`` modules name the test whose numpy case runs
that fast path through the public op that chooses it.  A backward added to vqref without a row
here fails that test.
"""

from . import conv, cosine, entropy, fsq, gumbel, layer, lfq, nn, orthogonal, residual, rotation, vq
from .autodiff import as_host, vjp, x64

__all__ = [
    "vjp",
    "x64",
    "as_host",
    "conv",
    "cosine",
    "entropy",
    "fsq",
    "gumbel",
    "layer",
    "lfq",
    "nn",
    "orthogonal",
    "residual",
    "rotation",
    "vq",
]
