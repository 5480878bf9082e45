"""``GroupedResidualVQ``: the features cut into groups, a residual stack for each group.

Symbols: N tokens, D = dim, G = groups, D_g = D / G, Q depths, K codes per depth.

Group-residual VQ (HiFi-Codec, arXiv 2305.02765; vector-quantize-pytorch's ``GroupedResidualVQ``)
cuts every vector into G slices of D_g features and quantizes slice g with its own
:class:`vqref.ResidualVQ`:

    x = [x_0, ..., x_{G-1}]          x_g (N, D_g)
    (o_g, k_g, l_g) = RVQ_g(x_g)      o_g (N, D_g), k_g (N, Q), l_g (Q,)
    out = [o_0, ..., o_{G-1}]         (N, D);  indices (G, N, Q);  losses (G, Q)

The groups share nothing but the input's rows: every group has its own codebooks, EMA state,
projections and generators, so the backward is each group's on its slice of the upstream gradient,
the slices side by side.  A quantize dropout draws one depth (one per sample) for every group, as
vector-quantize-pytorch shares its seed among the groups.

All groups' state lives in this module's one state, group g's entries under ``"{g}."`` (the
entries of a ``ResidualVQ``: ``"0.2.codebook"`` is group 0's depth-2 codebook), so a training
step of every group is one transaction: :func:`vqref.quantizers.vq_step.forward_step` computes
each group's new state from the committed one, and the module commits them together.  A
``ResidualVQ`` built with the groups' options (``group_template``) describes the layout; its own
state is not used.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import backend as B
from ..backend import Array
from ..distributed import refuse_together
from ..validation import check_dtype_name, check_int, check_real, check_seed
from .base import Quantizer
from .lfq_options import check_mask
from .options import CONFIG_DEFAULTS, CONFIG_KEYS, check_temperature
from .residual_vq import ResidualVQ
from .views import CodebookView, check_codes
from .vq_step import backward_step, draw_dropout, forward_step, state_gradients, upstream_gradients

__all__ = ["GroupedResidualVQ"]

_GROUP_KEYS = tuple(k for k in CONFIG_KEYS if k not in ("dim", "heads", "separate_codebook_per_head")) + ("groups",)


class GroupedResidualVQ(Quantizer):
    """Grouped residual vector quantization, vector-quantize-pytorch's ``GroupedResidualVQ``.

    ``quantized, indices, losses = grvq(x)`` with ``x (..., dim)``, ``indices (groups, ..., Q)``
    and ``losses (groups, Q)``; then ``dx = grvq.backward(dquantized, dlosses=1.0)``.

    Parameters
    ----------
    dim : D, divisible by ``groups``
    groups : G, the number of slices of D / G features
    seed : seed or numpy Generator (each group's stack gets a stream spawned from it)
    comm : communicator of data-parallel training, as :class:`vqref.VectorQuantize` (with
        ``sync_codebook`` and ``sync_kmeans`` among the options)
    dtype, xp, device : as :class:`vqref.ResidualVQ`
    **rvq_kwargs : every :class:`vqref.ResidualVQ` option (num_quantizers, codebook_size,
        codebook_dim, shared_codebook, kmeans_init, quantize_dropout, beam_size, ...), applied to
        every group; ``dim`` of each group is D / G

    Attributes
    ----------
    layers : ``layers[g][l]``, read-only :class:`vqref.quantizers.views.CodebookView` of group g's
        depth l
    group_template : the ``ResidualVQ`` whose options every group has (its state is not used)
    stats : per key a tuple over the groups of each group's per-depth tuple
    """

    CONFIG_KEYS = ("dim",) + _GROUP_KEYS
    CONFIG_DEFAULTS = {k: v for k, v in CONFIG_DEFAULTS.items() if k in _GROUP_KEYS}

    def __init__(self, *, dim: int, groups: int = 1, seed: Any = None, dtype: Any = "float32", xp: Any = None,
                 device: Any = None, comm: Any = None, **rvq_kwargs: Any):  # fmt: skip
        self.dim = check_int("dim", dim, 1)
        self.groups = check_int("groups", groups, 1)
        if self.dim % self.groups:
            raise ValueError(
                f"dim={self.dim} must be divisible by groups={self.groups} (each group takes D / G features)"
            )
        for name in ("heads", "separate_codebook_per_head"):
            if name in rvq_kwargs:
                raise TypeError(f"GroupedResidualVQ takes no {name}: its groups are residual stacks of one head")
        self._dtype_name = check_dtype_name("dtype", dtype)
        rng = check_seed("seed", seed)
        namespace = B.namespace_from_module(xp)
        children = rng.spawn(self.groups)
        stacks = [
            ResidualVQ(dim=self.dim // self.groups, seed=c, dtype=self._dtype_name, **rvq_kwargs) for c in children
        ]
        self.group_template = stacks[0]
        for key, value in self.group_template.config().items():  # the groups' options, as attributes
            if key not in ("dim", "dtype"):
                setattr(self, key, value)
        self.codebook_sizes = self.group_template.codebook_sizes
        arrays, flags, gens = {}, {}, []
        n = self.group_template.num_codebooks
        for g, stack in enumerate(stacks):
            for key, value in stack.state_dict().items():
                target = flags if stack.state_spec()[key] is None else arrays
                target[f"{g}.{key}"] = bool(value) if target is flags else np.asarray(value)
            gens.extend(stack.state.rngs[:n])
        if self.quantize_dropout and self.num_quantizers > 1:
            gens.extend(rng.spawn(1))  # one draw for every group
        self.training = True
        self.comm = comm
        self._init_state(arrays, flags, tuple(gens), xp=namespace, device=device)

    @property
    def comm(self) -> Any:
        """The communicator of data-parallel training (as :attr:`vqref.VectorQuantize.comm`)."""
        return self.group_template.comm

    @comm.setter
    def comm(self, value: Any) -> None:
        self.group_template.comm = value

    # ---------------------------------------------------------------- configuration

    def config(self) -> dict:
        cfg = {
            k: v for k, v in self.group_template.config().items() if k not in ("heads", "separate_codebook_per_head")
        }
        cfg.update(dim=self.dim, groups=self.groups, dtype=self._dtype_name)
        return {k: cfg[k] for k in self.CONFIG_KEYS}

    @classmethod
    def _group_config(cls, config: dict) -> dict:
        dim, groups = check_int("dim", config["dim"], 1), check_int("groups", config["groups"], 1)
        if dim % groups:
            raise ValueError(f"dim={dim} must be divisible by groups={groups}")
        group = {k: v for k, v in config.items() if k != "groups"}
        group.update(dim=dim // groups, heads=1, separate_codebook_per_head=False)
        return group

    @classmethod
    def check_config(cls, config: dict) -> dict:
        checked = ResidualVQ.check_config(cls._group_config(config))
        checked.update(dim=int(config["dim"]), groups=int(config["groups"]))
        return {k: checked[k] for k in cls.CONFIG_KEYS}

    @classmethod
    def spec_from_config(cls, config: dict) -> dict:
        group = ResidualVQ.spec_from_config(cls._group_config(config))
        return {f"{g}.{k}": shape for g in range(int(config["groups"])) for k, shape in group.items()}

    def learnable_names(self) -> tuple:
        names = self.group_template.learnable_names()
        return tuple(f"{g}.{k}" for g in range(self.groups) for k in names)

    @property
    def codebook_is_learnable(self) -> bool:
        return self.group_template.codebook_is_learnable

    @property
    def num_codebooks(self) -> int:
        """Codebooks per group."""
        return self.group_template.num_codebooks

    @property
    def layers(self) -> tuple:
        """``layers[g][l]``: a read-only view of group g's depth l."""
        prefixes, n = self.group_template.codebook_prefixes(), self.num_codebooks
        return tuple(
            tuple(
                CodebookView(
                    self,
                    f"{g}.{prefixes[0 if len(prefixes) == 1 else level]}",
                    level,
                    generator_index=g * n + (0 if n == 1 else level),
                )  # fmt: skip
                for level in range(self.num_quantizers)
            )
            for g in range(self.groups)
        )

    def __repr__(self) -> str:
        return (f"GroupedResidualVQ(dim={self.dim}, groups={self.groups}, num_quantizers={self.num_quantizers}, "
                f"codebook_size={self.codebook_size})")  # fmt: skip

    # ---------------------------------------------------------------- forward / backward

    def forward(self, x: Array, *, mask: Array = None, sample_codebook_temp: float | None = None):
        """Quantize ``x``: each group's slice by its residual stack.

        Parameters
        ----------
        x : (..., dim) float32 or float64 array of the module's library
        mask : optional (...) bool, the tokens that are present (see :class:`vqref.VectorQuantize`)
        sample_codebook_temp : tau for this call only

        Returns
        -------
        quantized : (..., dim), x's dtype
        indices : (groups, ..., Q) int64 (-1: an absent token, or a depth a dropout skipped)
        losses : (groups, Q)
        """
        t = self.group_template
        training = self.training
        comms = t.communicators()
        error = None
        try:
            tau = self._check_call(x, mask, sample_codebook_temp, training)
        except (TypeError, ValueError) as e:
            error = e
        refuse_together(comms[0], error)  # with several ranks: every rank stops, none waits
        opts = t.quantize_options(training, tau, x.shape[-2] if x.ndim >= 3 else 1)  # every group's
        with self._exclusive():
            return self._forward(x, mask, training, opts, tuple(x.shape[:-1]), comms)

    def _check_call(self, x: Array, mask: Any, sample_codebook_temp: Any, training: bool) -> float:
        """The checks of a forward's arguments (a rank of several may hold no rows); the temperature."""
        empty_rank = self.comm.size > 1 and B.is_array(x) and x.ndim >= 1 and B.numel(tuple(x.shape)) == 0
        self.check_input(
            "x", x, **({"shape": tuple(x.shape[:-1]) + (self.dim,)} if empty_rank else {"last_dim": self.dim})
        )
        if mask is not None:
            check_mask(mask, self._like(), tuple(x.shape[:-1]))
        tau = self.sample_codebook_temp if sample_codebook_temp is None else check_real(
            "sample_codebook_temp", sample_codebook_temp, 0.0)  # fmt: skip
        soft = [k for k in ("straight_through", "soft_assignment") if getattr(self, k)]
        check_temperature(tau, soft[0] if soft else None)
        if training:
            self.check_fits_state("x", x)
        return tau

    def _forward(self, x: Array, mask: Any, training: bool, opts: dict, lead: tuple, comms: tuple):
        xp, t = self.xp, self.group_template
        gens = self._rngs()
        n, G, width = self.num_codebooks, self.groups, self.dim // self.groups
        last = draw_dropout(t, gens[G * n], lead, comms[0]) if training and len(gens) > G * n else None
        steps = [
            forward_step(
                t,
                self._state,
                x[..., g * width : (g + 1) * width],
                mask=mask,
                training=training,
                opts=opts,
                gens=gens[g * n : (g + 1) * n],
                last_depths=last,
                prefix=f"{g}.",
                comm=comms[0],
                kmeans_comm=comms[1],
            )  # fmt: skip
            for g in range(G)
        ]
        stats = {k: tuple(s.stats[k] for s in steps) for k in steps[0].stats}
        if training:
            arrays, flags = {}, {}
            for s in steps:
                arrays.update(s.arrays)
                flags.update(s.flags)
            pending = (tuple(s.cache for s in steps), tuple(x.shape), x.dtype)
            self._commit(self._updated(arrays=arrays, flags=flags, rngs=tuple(gens), cache=pending, stats=stats))
        else:
            self._commit(self._updated(stats=stats))
        shield = self.shield if training else (lambda a: a)
        quantized = xp.concat([xp.reshape(s.quantized, lead + (width,)) for s in steps], axis=-1)
        indices = xp.stack([xp.reshape(s.indices, lead + (self.num_quantizers,)) for s in steps])
        return shield(quantized), shield(indices), xp.stack([s.losses for s in steps])

    def backward(self, dquantized: Array, dlosses: Array = 1.0) -> Array:
        """Gradient for the input of the last training forward; the groups' gradients in ``grads``
        (``"{g}.{name}"``).

        Parameters
        ----------
        dquantized : (..., dim)
        dlosses : (groups, Q) array, or a number for every loss (default 1.0: the losses are summed)
        """
        with self._exclusive():
            if self._state.cache is None:
                raise RuntimeError(
                    "backward() needs a training-mode forward first (and each forward allows one backward)"
                )
            caches, shape, dtype = self._state.cache
            xp, G, width = self.xp, self.groups, self.dim // self.groups
            dq, dl = upstream_gradients(self, dquantized, dlosses, "dlosses", shape=shape, dtype=dtype,
                                        loss_shapes=((G, self.num_quantizers), ()))  # fmt: skip
            dq = xp.reshape(dq, (-1, self.dim))
            dxs, grads = [], {}
            for g, cache in enumerate(caches):
                dl_g = dl[g, ...] if B.is_array(dl) and dl.ndim == 2 else dl
                dx, core = backward_step(dq[:, g * width : (g + 1) * width], dl_g, cache, self.group_template)
                dxs.append(dx)
                names = [f"{g}.{k}" for k in self.group_template.learnable_names()]
                grads.update(state_gradients(self, core, names, dx, prefix=f"{g}."))
            self._commit(self._updated(cache=None))
        self.grads.clear()
        self.grads.update(grads)
        return xp.reshape(xp.concat(dxs, axis=1), shape)

    # ---------------------------------------------------------------- decoding

    def get_codes_from_indices(self, indices: Array) -> Array:
        """Codes ``(groups, Q, ..., d)`` for ``indices (groups, ..., Q')`` (Q' <= Q; -1: no code)."""
        self._check_groups(indices)
        return self.xp.stack([self._group_codes(indices[g, ...], g) for g in range(self.groups)])

    def get_output_from_indices(self, indices: Array) -> Array:
        """The output ``(..., dim)`` for ``indices (groups, ..., Q')``: each group's sum of codes
        through its ``project_out``, the groups side by side (0 for a token whose indices are -1)."""
        from ..ops.linear import linear_forward

        self._check_groups(indices)
        xp, outs = self.xp, []
        for g in range(self.groups):
            codes = self._group_codes(indices[g, ...], g)  # (Q, ..., d)
            total = codes[0, ...]
            for level in range(1, codes.shape[0]):
                total = total + codes[level, ...]
            if f"{g}.project_out.W" in self.state_spec():
                W, b = self.state_array(f"{g}.project_out.W"), self.state_array(f"{g}.project_out.b")
                flat = linear_forward(xp.reshape(total, (-1, total.shape[-1])), W, b)[0]
                total = xp.reshape(flat, tuple(total.shape[:-1]) + (self.dim // self.groups,))
                absent = xp.all(indices[g, ...] < 0, axis=-1)
                total = xp.where(absent[..., None], xp.zeros_like(total), total)
            outs.append(total)
        return xp.concat(outs, axis=-1)

    def _check_groups(self, indices: Array) -> None:
        Q = self.num_quantizers
        if (
            not B.is_array(indices)
            or indices.ndim < 2
            or indices.shape[0] != self.groups
            or not (1 <= indices.shape[-1] <= Q)
        ):
            got = tuple(indices.shape) if B.is_array(indices) else type(indices).__name__
            raise ValueError(f"indices must be an integer array of shape ({self.groups}, ..., {Q}) (or fewer "
                             f"depths), got {got}")  # fmt: skip

    def _group_codes(self, indices: Array, g: int) -> Array:
        """Group g's codes (Q, ..., d) for its indices (..., Q'), zero codes for missing depths."""
        xp, layers = self.xp, self.layers[g]
        given = indices.shape[-1]
        codes = [layer.get_codes(indices[..., layer.level]) for layer in layers[:given]]
        zeros = xp.zeros(tuple(indices.shape[:-1]) + (self.codebook_dim,), dtype=self.dtype, device=self.device)
        return xp.stack(codes + [zeros] * (self.num_quantizers - given), axis=0)

    def check_indices(self, name: str, indices: Array, num_codes: int | None = None) -> Array:
        """As :meth:`vqref.VectorQuantize.check_indices` (a view's decoding calls it)."""
        return check_codes(name, indices, self._like(), self.codebook_sizes[0] if num_codes is None else num_codes)
