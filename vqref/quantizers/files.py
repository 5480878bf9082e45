"""Model files: a quantizer's configuration and state as an ``.npz`` archive, read as data only.

Layout (what :meth:`Quantizer.save` writes): one ``config.npy`` entry holding a JSON object (the
class name and the constructor arguments of :meth:`config`) and one ``<name>.npy`` entry per
state array (float32/float64 arrays, 0-d booleans for flags).

Reading never runs anything from the file:

* no pickle (object arrays are refused), no import, no lookup of anything by a name the file
  gives: the array library, device and seed always come from the caller;
* the archive's directory is checked before anything is decompressed: exactly the expected
  entries, each ``.npy`` header parsed and its dtype and shape compared with what the
  configuration implies, and each entry's declared size equal to what that header needs -- so a
  file cannot make vqref allocate more than the model it describes;
* every refusal is a ``ValueError`` that names the file and the entry.
"""

from __future__ import annotations

import json
import math
import zipfile
import zlib
from typing import Any

import numpy as np

from .. import backend as B

__all__ = ["write", "read", "check_state_entries", "build", "stored_dtype", "MAX_CONFIG_BYTES"]

MAX_CONFIG_BYTES = 1 << 16  # a configuration is a few hundred bytes of JSON

_FLOAT_DTYPES = ("float32", "float64")


def write(path: str, class_name: str, config: dict, arrays: dict) -> None:
    """Write ``config`` (JSON) and the host ``arrays`` to ``path``."""
    entries = dict(arrays)
    entries["config"] = np.asarray(json.dumps({"class": class_name, **config}))
    with open(path, "wb") as f:
        np.savez(f, **entries)


def _header(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[tuple, np.dtype, int]:
    """Shape, dtype and header length of one ``.npy`` entry, reading only its first bytes."""
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:  # pragma: no cover - read_magic refuses other versions already
            raise ValueError(f"unsupported .npy version {version}")
        header_len = f.tell()
    if dtype.hasobject:
        raise ValueError("Object arrays cannot be loaded (the entry would need pickle)")
    return tuple(int(n) for n in shape), dtype, header_len


def read(path: str, cls: type, *, expected_config: dict | None = None) -> tuple[dict, dict]:
    """Read and check a model file for quantizer class ``cls``.

    Parameters
    ----------
    path : the ``.npz`` file
    cls : the quantizer class; its ``CONFIG_KEYS`` and ``spec_from_config`` say what the
        configuration may hold and which entries, shapes and dtypes it implies
    expected_config : for :meth:`Quantizer.load`, the configuration of the module being loaded
        into; any difference (besides ``chunk_size`` and ``dtype``) is refused

    Returns
    -------
    config : the constructor arguments (without the class name)
    state : name -> host numpy array, checked against the configuration
    """
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, NotImplementedError, zlib.error) as e:
        raise ValueError(f"{path} is not a readable vqref .npz file: {_why_not_a_zip(path, e)}") from None
    with zf:
        try:
            return _read_archive(zf, path, cls, expected_config)
        except _Mismatch as e:
            raise ValueError(f"{path}: {e}") from None
        except (
            ValueError,
            OSError,
            EOFError,
            zipfile.BadZipFile,
            NotImplementedError,
            KeyError,
            zlib.error,
            RuntimeError,
        ) as e:
            raise ValueError(f"{path} is not a readable vqref .npz file: {e}") from None


class _Mismatch(Exception):
    """A readable vqref file that does not fit (another configuration, class or shape)."""


def _why_not_a_zip(path: str, error: Exception) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return str(error)
    if head[:1] == b"\x80":
        return "it holds pickled data, which vqref never loads"
    if head[:6] == b"\x93NUMPY":
        return "it is a single .npy array, not an .npz archive"
    return str(error)


def _read_archive(zf: zipfile.ZipFile, path: str, cls: type, expected_config: dict | None) -> tuple[dict, dict]:
    infos = {}
    for info in zf.infolist():
        if not info.filename.endswith(".npy"):
            raise ValueError(f"unexpected entry {info.filename!r} (entries are .npy arrays)")
        infos[info.filename[:-4]] = info
    # every entry's header first (a few bytes each): object arrays are refused before anything else
    headers = {key: _header(zf, info) for key, info in infos.items()}
    if "config" not in infos:
        raise _Mismatch("not a vqref file: it has no 'config' entry")
    config = _read_config(zf, infos.pop("config"), headers.pop("config"))
    name = config.pop("class", None)
    if expected_config is not None:
        mine = {"class": cls.__name__, **expected_config}
        theirs = {"class": name, **config}
        diff = {
            k: (theirs.get(k), v) for k, v in mine.items() if k not in ("chunk_size", "dtype") and theirs.get(k) != v
        }
        diff.update({k: (v, None) for k, v in theirs.items() if k not in mine})
        if diff:
            raise _Mismatch(
                "the file was saved from a different configuration: "
                + ", ".join(f"{k}: file {a!r} vs module {b!r}" for k, (a, b) in diff.items())
            )
    elif name != cls.__name__:
        raise _Mismatch(f"it does not hold a {cls.__name__} (its class entry is {name!r})")
    unknown = sorted(set(config) - set(cls.CONFIG_KEYS))
    if unknown:
        raise _Mismatch(f"config entry has unknown options {unknown}; a {cls.__name__} takes {sorted(cls.CONFIG_KEYS)}")
    try:
        spec = cls.spec_from_config(config)
    except (TypeError, ValueError) as e:
        raise _Mismatch(f"config entry: {e}") from None
    missing = sorted(set(spec) - set(infos))
    extra = sorted(set(infos) - set(spec))
    if missing or extra:
        raise _Mismatch(f"state entries mismatch: missing {missing}, unexpected {extra}")
    # every header and declared size first, before any array is decompressed
    for key, shape in spec.items():
        got_shape, dtype, header_len = headers[key]
        want = () if shape is None else tuple(shape)
        if got_shape != want:
            raise _Mismatch(f"state_dict[{key!r}] must have shape {want}, got {got_shape}")
        if shape is None and dtype != np.bool_:
            raise _Mismatch(f"state_dict[{key!r}] must be a boolean, got dtype {dtype}")
        if shape is not None and dtype.name not in _FLOAT_DTYPES:
            raise _Mismatch(f"state_dict[{key!r}] must be float32 or float64, got dtype {dtype}")
        if infos[key].file_size != header_len + math.prod(want) * dtype.itemsize:
            raise ValueError(f"entry {key!r} holds {infos[key].file_size} bytes, not the size its header declares")
    state = {}
    for key in spec:
        with zf.open(infos[key]) as f:
            state[key] = np.lib.format.read_array(f, allow_pickle=False)
    return config, state


def _read_config(zf: zipfile.ZipFile, info: zipfile.ZipInfo, header: tuple) -> dict:
    if info.file_size > MAX_CONFIG_BYTES:
        raise ValueError(f"its config entry is {info.file_size} bytes (at most {MAX_CONFIG_BYTES})")
    shape, dtype, _ = header
    if dtype.kind != "U" or shape != ():
        raise _Mismatch(f"its config entry must be a JSON string, got a {dtype} array of shape {shape}")
    with zf.open(info) as f:
        text = str(np.lib.format.read_array(f, allow_pickle=False))
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise _Mismatch(f"its configuration is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise _Mismatch(f"its config entry must be a JSON object, got {type(config).__name__}")
    return config


def check_state_entries(state: Any, spec: dict, dtype_name: str) -> tuple[dict, dict]:
    """Check a state dict against ``spec`` (name -> shape, ``None`` for flags); host copies.

    Returns ``(arrays, flags)``: float64 host arrays and Python bools.  Raises ``ValueError``
    naming the entry (``KeyError`` for missing/unexpected keys, as a mapping would).
    """
    if not hasattr(state, "keys"):
        raise TypeError(f"a state dict must be a mapping name -> array, got {type(state).__name__}")
    missing = [k for k in spec if k not in state]
    extra = [k for k in state if k not in spec]
    if missing or extra:
        raise KeyError(f"state_dict keys mismatch: missing {missing}, unexpected {extra}")
    big = float(np.finfo(dtype_name).max)
    arrays, flags = {}, {}
    for key, shape in spec.items():
        value = state[key]
        if shape is None:
            if isinstance(value, (bool, np.bool_)):
                flags[key] = bool(value)
                continue
            a = np.asarray(B.to_numpy(value)) if B.is_array(value) else None
            if a is not None and a.shape != ():
                raise ValueError(f"state_dict[{key!r}] must have shape (), got {a.shape}")
            if a is None or not (a.dtype == np.bool_ or (np.issubdtype(a.dtype, np.integer) and int(a) in (0, 1))):
                raise TypeError(f"state_dict[{key!r}] must be a boolean, got {value!r}")
            flags[key] = bool(a)
            continue
        if not B.is_array(value):
            raise TypeError(f"state_dict[{key!r}] must be an array, got {type(value).__name__}")
        a = np.asarray(B.to_numpy(value))
        if a.shape != tuple(shape):
            raise ValueError(f"state_dict[{key!r}] must have shape {tuple(shape)}, got {a.shape}")
        if a.dtype.name not in _FLOAT_DTYPES:
            raise TypeError(f"state_dict[{key!r}] must be floating point (float32 or float64), got {a.dtype}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"state_dict[{key!r}] contains NaN or infinite values")
        if a.size and float(np.max(np.abs(a))) > big:
            raise ValueError(f"state_dict[{key!r}] holds values beyond the {dtype_name} range of this module's state")
        if key.endswith("cluster_size") and np.any(a < 0):
            raise ValueError(f"state_dict[{key!r}] holds EMA counts, which must be >= 0")
        arrays[key] = a
    return arrays, flags


def stored_dtype(state: dict) -> str:
    """``"float64"`` if any stored float array is float64, else ``"float32"``."""
    names = {a.dtype.name for a in state.values() if a.dtype.name in _FLOAT_DTYPES}
    return "float64" if "float64" in names else "float32"


def build(cls: type, config: dict, *, seed: Any, xp: Any, device: Any, dtype: Any):
    """``cls(**config)`` with the caller's seed/xp/device/dtype; a bad option is a ValueError."""
    try:
        return cls(**config, seed=seed, xp=xp, device=device, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise ValueError(f"the file's configuration is refused: {e}") from None
