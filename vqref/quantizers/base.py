"""What every stateful quantizer shares: its state, held as one value and changed in one step.

A quantizer module is configuration (fixed at construction) plus **state**: named arrays (the
codebooks and their EMA statistics), flags (``initted``), random generators, and the cache the
next ``backward`` needs.  All of it lives in a single immutable :class:`QuantizerState`, and every
method that changes anything follows the same transaction:

1. validate every argument (nothing has happened yet, so a refusal changes nothing);
2. compute the complete new state from the committed one with the pure functions of
   :mod:`vqref.core` -- random draws come from *copies* of the committed generators;
3. commit it with one assignment, ``self._state = new``.

A call that raises at any point before step 3 leaves the state, the generators and the cache
exactly as they were, by construction: there is no rollback code to get wrong.  The committed
arrays are never written in place, and no caller holds a reference through which they could be:
numpy arrays are marked read-only, other libraries' are handed out as copies (``codebook``,
``state``, the outputs a backward cache shares); ``params`` hands out copies and validates what
is assigned back; generators passed in are copied.  Every method that commits (forward,
backward, ``load_state_dict``, assigning a parameter, ``to``) holds the module's lock while it
runs: a second one in another thread meanwhile raises instead of losing an update.

The base class also provides train/eval modes, ``params``/``grads``, ``state_dict`` /
``load_state_dict``, ``save``/``load``/``from_file`` (a file is data: see
:mod:`vqref.quantizers.files`) and moving between array libraries with :meth:`Quantizer.to`.
A subclass supplies its configuration (:meth:`config`), the layout of its state
(:meth:`state_spec`), which arrays are learnable (:meth:`learnable_names`), and forward/backward.
"""

from __future__ import annotations

import threading
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np

from .. import backend as B
from ..backend import Array
from ..params import ParamView
from ..validation import check_dtype_name, check_fits, check_float_array, check_seed
from . import files

__all__ = ["Quantizer", "QuantizerState"]


class QuantizerState(NamedTuple):
    """Everything a quantizer module may change, as one immutable value."""

    arrays: Any  # read-only mapping name -> array: the state_dict's float entries
    flags: Any  # read-only mapping name -> bool: the state_dict's boolean entries ("initted")
    rngs: tuple  # numpy Generators, one per random stream; never drawn from (copies are)
    cache: Any  # what the next backward needs, or None
    xp: Any  # the array namespace of the arrays
    device: Any  # their device (None: the library's default)
    stats: Any = MappingProxyType({})  # read-only mapping name -> number: usage metrics of the last forward


def _frozen(a: Array) -> Array:
    # numpy can make an array read-only; other libraries rely on vqref never writing in place
    if isinstance(a, np.ndarray):
        a.flags.writeable = False
    return a


class Quantizer:
    """Base of the stateful quantizer modules (see the module docstring for the transaction)."""

    training: bool = True

    # ---------------------------------------------------------------- what a subclass provides

    def config(self) -> dict:
        """The constructor arguments (without seed, xp, device), JSON-serialisable."""
        raise NotImplementedError

    CONFIG_KEYS: tuple = ()  # the keys of config(): what a model file's configuration holds

    @classmethod
    def check_config(cls, config: dict) -> dict:
        """A configuration's options checked as the constructor checks them (types, ranges), in
        their canonical form, without building anything: how a model file's configuration is
        read.  ``config`` has exactly the keys :attr:`CONFIG_KEYS`."""
        raise NotImplementedError

    @classmethod
    def spec_from_config(cls, config: dict) -> dict:
        """``name -> shape`` of every state entry for a configuration; flags have shape ``None``.

        Pure arithmetic on the configuration (no allocation), so that a model file's entries can
        be checked before anything is read or built.
        """
        raise NotImplementedError

    def state_spec(self) -> dict:
        """``name -> shape`` of this module's state entries (flags: ``None``)."""
        return self.spec_from_config(self.config())

    def learnable_names(self) -> tuple:
        """The state arrays that receive a gradient (the keys of ``params`` and ``grads``)."""
        return ()

    def forward(self, x: Array):
        raise NotImplementedError

    # ---------------------------------------------------------------- state plumbing

    def _init_state(self, arrays: dict, flags: dict, rngs: tuple, *, xp: Any, device: Any) -> None:
        """The first commit, from host arrays (constructor only).  The generators are copied: a
        Generator the caller passed as ``seed`` stays the caller's, and drawing from it later
        does not change the module."""
        self.grads: dict = {}
        self._lock = threading.Lock()
        self._state = QuantizerState(
            MappingProxyType(self._place(arrays, xp, device)),
            MappingProxyType(dict(flags)),
            tuple(B.clone_generator(g) for g in rngs),
            None,
            xp,
            device,
        )

    def _place(self, host_arrays: dict, xp: Any, device: Any) -> dict:
        """Fresh device copies of host arrays; a device the library refuses is a ValueError."""
        try:
            return {k: self._device_array(v, xp, device) for k, v in host_arrays.items()}
        except (TypeError, ValueError, RuntimeError, AttributeError) as e:
            lib = getattr(xp, "__name__", repr(xp))
            raise ValueError(f"device={device!r} cannot hold the state in {lib}: {e}") from None

    def _device_array(self, host: Array, xp: Any, device: Any) -> Array:
        # A fresh buffer every time: state arrays never alias each other nor a caller's array.
        a = np.array(host, dtype=self._dtype_name, copy=True)
        return _frozen(B.from_numpy(a, xp, device=device))

    def _commit(self, new: QuantizerState) -> None:
        """Make ``new`` the module's state: the one assignment of every transaction."""
        self._state = new

    def _updated(self, arrays: dict | None = None, flags: dict | None = None, **fields: Any) -> QuantizerState:
        """The committed state with some entries replaced (arrays frozen; nothing committed)."""
        s = self._state
        if arrays is not None:
            merged = dict(s.arrays)
            merged.update({k: _frozen(v) for k, v in arrays.items()})
            fields["arrays"] = MappingProxyType(merged)
        if flags is not None:
            merged_flags = dict(s.flags)
            merged_flags.update(flags)
            fields["flags"] = MappingProxyType(merged_flags)
        if "stats" in fields:
            fields["stats"] = MappingProxyType(dict(fields["stats"]))
        return s._replace(**fields)

    def _rngs(self) -> list:
        """Copies of the committed generators, to draw from inside a transaction."""
        return [B.clone_generator(g) for g in self._state.rngs]

    def _exclusive(self):
        """Every method that commits holds this while it reads the committed state, computes and
        commits; a second one at the same time is refused.

        A module is not meant to be shared by threads that train it concurrently (two forwards
        would compute from the same committed state, and one update would be lost; a backward
        could consume the cache of a forward that is not its own): instead of losing an update
        silently, the second call raises.
        """
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(
                f"{type(self).__name__} is already changing its state in another thread (a forward, backward, "
                "load_state_dict, parameter assignment or to()); a module is not thread-safe: give each "
                "thread its own module (copy.deepcopy)"
            )
        return _Release(self._lock)

    # ---------------------------------------------------------------- modes and views

    def train(self, mode: bool = True):
        if not isinstance(mode, (bool, np.bool_)):
            raise TypeError(f"train(mode) takes True or False, got {mode!r}")
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def __call__(self, *args: Any, **kwargs: Any):
        return self.forward(*args, **kwargs)

    @property
    def state(self) -> QuantizerState:
        """The committed state, read-only: arrays (read-only views on numpy, copies elsewhere),
        flags, copies of the generators, the pending backward's cache, the namespace and device."""
        s = self._state
        return s._replace(
            arrays=MappingProxyType({k: self.shield(v) for k, v in s.arrays.items()}),
            rngs=tuple(B.clone_generator(g) for g in s.rngs),
        )

    def state_array(self, name: str) -> Array:
        """State array ``name`` as a caller may hold it: a read-only view on numpy, a copy on the
        libraries without read-only arrays (whose arrays could otherwise be written in place)."""
        return self.shield(self._state.arrays[name])

    def state_flag(self, name: str) -> bool:
        """State flag ``name`` (e.g. ``"initted"``)."""
        return self._state.flags[name]

    @property
    def stats(self) -> dict:
        """Usage metrics of the last forward, as plain Python numbers (a copy).

        Every quantizer fills it on every forward (training and eval) with at least
        ``perplexity`` (``exp`` of the entropy of the batch's code histogram: the number of
        equally used codes that would give the same entropy) and ``usage`` (the fraction of the
        codebook that at least one input chose); see :func:`vqref.metrics.code_usage`.  A module
        with several codebooks (depths, heads) gives a tuple per key, one number per codebook.
        Empty before the first forward.
        """
        return dict(self._state.stats)

    @property
    def xp(self):
        """The array namespace of the state."""
        return self._state.xp

    @property
    def device(self):
        return self._state.device

    @property
    def dtype(self):
        """The dtype of the state arrays, in the state's namespace."""
        return getattr(self._state.xp, self._dtype_name)

    @property
    def params(self) -> ParamView:
        """The learnable arrays (copies; assigning validates and commits): see :class:`vqref.params.ParamView`."""
        return ParamView(self.learnable_names, lambda name: self._state.arrays[name], self.set_array)

    # ---------------------------------------------------------------- validation

    def check_input(self, name: str, a: Array, *, shape: tuple | None = None, last_dim: int | None = None) -> Array:
        """Refuse anything but a finite float32/float64 array of the module's library (and shape)."""
        return check_float_array(name, a, self._like(), shape=shape, last_dim=last_dim)

    def _like(self) -> Array:
        """An empty array of the state's library, device and dtype: what arguments are checked
        against (a module's state may hold no array at all, as FSQ's)."""
        return self.xp.zeros((0,), dtype=self.dtype, device=self.device)

    def check_fits_state(self, name: str, a: Array) -> None:
        """Refuse values that would overflow the state dtype (a float64 array into float32 state).

        The paths where data enters the state call this first (the training input, an assigned
        parameter); a training forward also checks the state it computed before committing it
        (sums of in-range values can overflow), so that no batch can turn the codebook into
        infinities for every later call.
        """
        check_fits(name, a, self._dtype_name, "this module's state")

    def set_array(self, name: str, value: Array) -> None:
        """Validate ``value`` for state array ``name`` and commit a copy of it (a transaction)."""
        shape = self.state_spec()[name]
        self.check_input(name, value, shape=shape)
        self.check_fits_state(name, value)
        with self._exclusive():
            new = self.xp.astype(value, self.dtype, copy=True)
            self._commit(self._updated(arrays={name: new}))

    def shield(self, a: Array) -> Array:
        """``a`` as the caller may have it when the backward cache refers to it: a read-only view
        on numpy (free), a copy on the libraries that have no read-only arrays.  Changing a
        returned output in place can then never change a gradient."""
        if isinstance(a, np.ndarray):
            view = a.view()
            view.flags.writeable = False
            return view
        return self.xp.asarray(a, copy=True)

    # ---------------------------------------------------------------- state dict and files

    def state_dict(self) -> dict:
        """Copies of the state: float arrays of the module's library, flags as 0-d bool arrays."""
        xp = self.xp
        out = {k: xp.asarray(v, copy=True) for k, v in self._state.arrays.items()}
        out.update({k: xp.asarray(v) for k, v in self._state.flags.items()})
        return {k: out[k] for k in self.state_spec()}

    def load_state_dict(self, state: dict) -> None:
        """Replace the state by ``state`` (any array library), after checking every entry.

        Every key of :meth:`state_spec` must be present and no other; shapes must match, float
        entries must be finite floats within the state dtype's range, EMA counts >= 0, flags
        booleans.  Nothing is changed unless everything is right.  Drops the backward cache.
        """
        arrays, flags = files.check_state_entries(state, self.state_spec(), self._dtype_name)
        with self._exclusive():
            new_arrays = self._place(arrays, self.xp, self.device)
            self._commit(self._updated(arrays=new_arrays, flags=flags, cache=None))

    def save(self, path: str) -> None:
        """Save configuration and state to an ``.npz`` file (plain arrays and JSON, no pickle)."""
        files.check_path(path)
        arrays = {k: np.asarray(B.to_numpy(v)) for k, v in self.state_dict().items()}
        files.write(path, type(self).__name__, self.config(), arrays)

    def load(self, path: str) -> None:
        """Load the state saved by :meth:`save`; the file's configuration must match this module's
        (every option but ``chunk_size`` and ``dtype``).  Drops the backward cache."""
        _, state = files.read(path, type(self), expected_config=self.config())
        try:
            self.load_state_dict(state)
        except ValueError as e:  # a value the entry's dtype allows but the state does not (NaN, ...)
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def from_file(cls, path: str, *, seed: Any = None, xp: Any = None, device: Any = None, dtype: Any = None):
        """Build a module from a file written by :meth:`save`.

        The file provides the configuration and the state, and nothing else: the array library,
        device and seed come from the caller; the dtype is the caller's, or (by default) the dtype
        of the stored arrays.  See :mod:`vqref.quantizers.files` for what is checked.
        """
        # the caller's arguments first: their errors are theirs, not the file's
        files.check_path(path)
        check_seed("seed", seed)
        namespace = B.namespace_from_module(xp)
        dtype = None if dtype is None else check_dtype_name("dtype", dtype)
        config, state = files.read(path, cls)
        saved = config.pop("dtype")  # the caller's choice wins; else the stored arrays' dtype
        if dtype is None:
            dtype = files.stored_dtype(state, default=saved)
        module = cls(**config, seed=seed, xp=namespace, device=device, dtype=dtype)
        try:
            module.load_state_dict(state)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        return module

    def to(self, xp: Any, device: Any = None):
        """Move the state to another array library (``numpy``, ``cupy``, ``array_api_strict``).

        A transaction too: if the move fails (no such device, a library that cannot hold the
        arrays), the module stays on its old library, unchanged.  Drops the backward cache and
        the gradients.
        """
        new_xp = B.namespace_from_module(xp)
        with self._exclusive():
            moved = self._place({k: B.to_numpy(v) for k, v in self._state.arrays.items()}, new_xp, device)
            self._commit(self._updated(arrays=moved, cache=None, xp=new_xp, device=device))
            self.grads.clear()  # in place: views of this dict stay valid
        return self

    # ---------------------------------------------------------------- copying and pickling

    def __getstate__(self) -> dict:
        # Modules (the namespace) and locks cannot be pickled: store the library by name and the
        # arrays on the host; the cache (a pending backward) is not kept.
        d = dict(self.__dict__)
        s = d.pop("_state")
        d.pop("_lock", None)
        d["_pickled_state"] = {
            "arrays": {k: np.array(B.to_numpy(v), copy=True) for k, v in s.arrays.items()},
            "flags": dict(s.flags),
            "rngs": s.rngs,
            "library": _library_of(s.xp),
            "device": None if B.is_numpy(s.xp) else s.device,
            "stats": dict(s.stats),
        }
        d["grads"] = {}
        return d

    def __setstate__(self, d: dict) -> None:
        p = d.pop("_pickled_state")
        self.__dict__.update(d)
        xp = B.namespace_from_module(p["library"])
        self._init_state(p["arrays"], p["flags"], p["rngs"], xp=xp, device=p["device"])
        self._commit(self._updated(cache=p.get("cache"), stats=p.get("stats", {})))
        self.grads = p.get("grads", {})

    def __deepcopy__(self, memo: dict):
        # a copy keeps everything, the pending backward and the gradients included
        import copy

        new = object.__new__(type(self))
        memo[id(self)] = new
        d = self.__getstate__()
        d["_pickled_state"].update(cache=self._state.cache, grads=self.grads)
        new.__setstate__(copy.deepcopy(d, memo))
        return new


def _library_of(xp: Any) -> str:
    if B.is_numpy(xp):
        return "numpy"
    if B.is_cupy(xp):
        return "cupy"
    name = getattr(xp, "__name__", "")
    for lib in B.KNOWN_LIBRARIES:
        if name.startswith(lib):
            return lib
    raise TypeError(f"cannot pickle a module whose arrays live in {name!r}")


class _Release:
    def __init__(self, lock: threading.Lock):
        self._lock = lock

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()
