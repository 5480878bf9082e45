"""Parameter mappings: how optimizers and training loops see the learnable arrays of vqref.

Symbols: none; a parameter is any named array that receives a gradient.

Two mappings, one rule: **an array is only ever changed by assigning to a name.**

* :class:`ParamView` -- the learnable arrays of one owner (a quantizer, a :class:`vqref.nn.Linear`)
  by name.  Reading returns a *copy*; assigning checks the value (shape, dtype, library, finite)
  and lets the owner commit a copy of it.  So ``params[k] -= lr * grads[k]`` works (Python reads
  a copy, updates it in place, assigns it back), a refused value leaves the owner unchanged, and
  no caller holds a reference through which the owner's state could change later.
* :class:`NamedArrays` -- several owners' mappings seen as one flat mapping with dotted names
  (``"encoder.0.W"``), which is how a whole VQ-VAE hands one mapping to one optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, MutableMapping

from . import backend as B
from .backend import Array

__all__ = ["ParamView", "NamedArrays"]


class ParamView(MutableMapping):
    """The learnable arrays of one owner, by name, as copies (see the module docstring).

    Parameters
    ----------
    names : callable returning the parameter names (evaluated on each use: an owner's set of
        learnable arrays may depend on its configuration)
    read : ``read(name) -> array``, the owner's current array (it is copied here)
    write : ``write(name, value)``, which validates ``value`` and commits a copy, or raises and
        changes nothing
    """

    def __init__(self, names: Callable[[], tuple], read: Callable[[str], Array], write: Callable[[str, Array], None]):
        self._names = names
        self._read = read
        self._write = write

    def __getitem__(self, name: str) -> Array:
        if name not in self._names():
            raise KeyError(name)
        a = self._read(name)
        return B.get_namespace(a).asarray(a, copy=True)

    def __setitem__(self, name: str, value: Array) -> None:
        if name not in self._names():
            raise KeyError(f"unknown parameter {name!r}; parameters are {sorted(self._names())}")
        self._write(name, value)

    def __delitem__(self, name: str) -> None:
        raise TypeError("parameters cannot be deleted")

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __repr__(self) -> str:
        return "ParamView(" + ", ".join(f"{k}: {tuple(self._read(k).shape)}" for k in self) + ")"


class NamedArrays(MutableMapping):
    """Arrays owned by several mappings, seen as one flat mapping with dotted names.

    ``NamedArrays({"0": layer0.params, "1": layer1.params})`` has keys ``"0.W", "0.b", "1.W", ...``.
    Reading ``view["1.W"]`` reads ``layer1.params["W"]`` (a copy, from a :class:`ParamView`), and
    assigning ``view["1.W"] = new`` assigns ``layer1.params["W"] = new`` (checked and committed by
    the layer), so an optimizer that writes its update back through the view updates the layer.  Views nest: the owners may
    themselves be views (``NamedArrays({"enc": encoder.params, "dec": decoder.params})`` gives
    ``"enc.0.W"``, ...), which is how a whole VQ-VAE hands one mapping to one optimizer.

    Only existing names can be assigned, and only with an array of the same shape: a typo or a
    transposed array raises at once rather than silently adding a parameter nobody reads.
    Entries cannot be deleted.
    """

    def __init__(self, owners: Mapping[str, MutableMapping]):
        for prefix in owners:
            if not prefix or "." in prefix:
                raise ValueError(f"NamedArrays: prefix {prefix!r} must be non-empty and contain no '.'")
        self._owners = dict(owners)

    def _locate(self, name: str) -> tuple[MutableMapping, str]:
        prefix, dot, rest = str(name).partition(".")
        owner = self._owners.get(prefix)
        if not dot or owner is None or rest not in owner:
            raise KeyError(name)
        return owner, rest

    def __getitem__(self, name: str) -> Array:
        owner, rest = self._locate(name)
        return owner[rest]

    def __setitem__(self, name: str, value: Array) -> None:
        owner, rest = self._locate(name)
        old = owner[rest]
        if tuple(value.shape) != tuple(old.shape):
            raise ValueError(
                f"{name}: cannot replace an array of shape {tuple(old.shape)} by one of shape {tuple(value.shape)}"
            )
        owner[rest] = value

    def __delitem__(self, name: str) -> None:
        raise TypeError("NamedArrays: entries cannot be deleted (they belong to the layers)")

    def __iter__(self) -> Iterator[str]:
        for prefix, owner in self._owners.items():
            for key in owner:
                yield f"{prefix}.{key}"

    def __len__(self) -> int:
        return sum(len(owner) for owner in self._owners.values())

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self.items())
        return f"NamedArrays({{{shapes}}})"
