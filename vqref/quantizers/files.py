"""Model files: a quantizer's configuration and state as an ``.npz`` archive, read as data only.

Layout (what :meth:`Quantizer.save` writes): one ``config.npy`` entry holding a JSON object (the
class name and the constructor arguments of :meth:`config`) and one ``<name>.npy`` entry per
state array (float32/float64 arrays, 0-d booleans for flags).

Reading never runs anything from the file:

* no pickle (object arrays are refused), no import, no lookup of anything by a name the file
  gives: the array library, device and seed always come from the caller, the dtype from the
  caller or the stored arrays;
* the archive's directory first: at most a few thousand ``.npy`` entries, no duplicates,
  stored or deflated only, each declaring no more bytes than its compressed bytes in the file
  can hold (stored: as many; deflated: at most 1032 times as many);
* then every entry's ``.npy`` header, from a bounded read (at most :data:`MAX_HEADER_BYTES`):
  no object dtype, and a declared size equal to what the header's shape and dtype need;
* then the configuration (at most :data:`MAX_CONFIG_BYTES` of JSON), checked as the
  constructor checks its arguments: exactly the class's option names, each of the right type
  and within its range (sizes included, so it cannot ask for an absurd state);
* then the entries against the configuration: exactly the ones it implies, each with the
  dtype and shape it implies -- all before any array is decompressed, so a file cannot make
  vqref allocate more than the model its (bounded) configuration describes;
* every refusal is a ``ValueError`` that names the file and the entry.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import zipfile
import zlib
from typing import Any

import numpy as np

from .. import backend as B
from .options import MAX_NUM_QUANTIZERS

__all__ = ["write", "read", "check_path", "check_state_entries", "stored_dtype", "MAX_CONFIG_BYTES", "MAX_HEADER_BYTES"]

MAX_CONFIG_BYTES = 1 << 16  # a configuration is a few hundred bytes of JSON
MAX_HEADER_BYTES = 10_000  # numpy's own bound on a .npy header
_MAX_DEFLATE_RATIO = 1032  # the most DEFLATE can expand: 258 bytes from one 2-bit code, at best

_FLOAT_DTYPES = ("float32", "float64")
_MAX_ENTRIES = 1 + 4 * MAX_NUM_QUANTIZERS  # the config and four entries per codebook, at most


def check_path(path: Any) -> Any:
    """``path`` if it is a file name (``str`` or ``os.PathLike``).  An integer would be taken as
    an open file descriptor by ``open`` -- ``save(1)`` would write to, and close, stdout."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file name (str or os.PathLike), got {path!r} ({type(path).__name__})")
    return path


def write(path: str, class_name: str, config: dict, arrays: dict) -> None:
    """Write ``config`` (JSON) and the host ``arrays`` to ``path``."""
    entries = dict(arrays)
    entries["config"] = np.asarray(json.dumps({"class": class_name, **config}))
    with open(check_path(path), "wb") as f:
        np.savez(f, **entries)


def _header(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[tuple, np.dtype, int]:
    """Shape, dtype and header length of one ``.npy`` entry, reading at most its first
    ``MAX_HEADER_BYTES``; its declared size must be what the header needs."""
    name = info.filename
    with zf.open(info) as f:
        magic = f.read(8)  # b"\x93NUMPY", major, minor
        if len(magic) < 8 or magic[:6] != b"\x93NUMPY":
            raise ValueError(f"entry {name!r} is not a .npy array")
        version = (magic[6], magic[7])
        if version not in ((1, 0), (2, 0), (3, 0)):
            raise ValueError(f"entry {name!r} has an unsupported .npy version {version}")
        length_format = "<H" if version == (1, 0) else "<I"
        length_bytes = f.read(struct.calcsize(length_format))
        if len(length_bytes) != struct.calcsize(length_format):
            raise ValueError(f"entry {name!r} ends inside its header")
        (header_bytes,) = struct.unpack(length_format, length_bytes)
        if header_bytes > MAX_HEADER_BYTES:
            raise ValueError(f"entry {name!r} declares a {header_bytes}-byte header (at most {MAX_HEADER_BYTES})")
        text = f.read(header_bytes)
        if len(text) != header_bytes:
            raise ValueError(f"entry {name!r} ends inside its header")
    # numpy parses the header (a Python literal, read with ast.literal_eval) from the bounded copy
    buf = io.BytesIO(magic + length_bytes + text)
    np.lib.format.read_magic(buf)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(buf)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(buf)
    if dtype.hasobject:
        raise ValueError(f"Object arrays cannot be loaded (entry {name!r} would need pickle)")
    shape = tuple(int(n) for n in shape)
    header_len = len(magic) + len(length_bytes) + header_bytes
    if info.file_size != header_len + math.prod(shape) * dtype.itemsize:
        raise ValueError(f"entry {name!r} holds {info.file_size} bytes, not the size its header declares")
    return shape, dtype, header_len


def read(path: str, cls: type, *, expected_config: dict | None = None) -> tuple[dict, dict]:
    """Read and check a model file for quantizer class ``cls``.

    Parameters
    ----------
    path : the ``.npz`` file
    cls : the quantizer class; its ``check_config`` says which configurations are valid and its
        ``spec_from_config`` which entries, shapes and dtypes a configuration implies
    expected_config : for :meth:`Quantizer.load`, the configuration of the module being loaded
        into; any difference (besides ``chunk_size`` and ``dtype``) is refused

    Returns
    -------
    config : the checked constructor arguments (without the class name)
    state : name -> host numpy array, checked against the configuration
    """
    check_path(path)
    try:
        zf = zipfile.ZipFile(path)
        size = os.path.getsize(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, NotImplementedError, zlib.error) as e:
        raise ValueError(f"{path} is not a readable vqref .npz file: {_why_not_a_zip(path, e)}") from None
    with zf:
        try:
            return _read_archive(zf, size, cls, expected_config)
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
            RuntimeError,  # RecursionError (deeply nested JSON) and encrypted entries among them
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


def _check_directory(zf: zipfile.ZipFile, archive_size: int) -> dict:
    """name -> ZipInfo of the archive's ``.npy`` entries, from its directory alone."""
    if len(zf.infolist()) > _MAX_ENTRIES:
        raise ValueError(f"it has {len(zf.infolist())} entries; a vqref file has at most {_MAX_ENTRIES}")
    infos = {}
    for info in zf.infolist():
        name = info.filename
        if not name.endswith(".npy"):
            raise ValueError(f"unexpected entry {name!r} (entries are .npy arrays)")
        if name[:-4] in infos:
            raise ValueError(f"entry {name!r} appears twice")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise ValueError(f"entry {name!r} uses compression method {info.compress_type} (stored or deflated only)")
        # what the entry claims to decompress to must fit in the bytes the file holds for it
        ratio = 1 if info.compress_type == zipfile.ZIP_STORED else _MAX_DEFLATE_RATIO
        if info.compress_size > archive_size or info.file_size > ratio * info.compress_size + 1024:
            raise ValueError(
                f"entry {name!r} claims {info.file_size} bytes from {info.compress_size} compressed bytes "
                f"in a {archive_size}-byte file"
            )
        infos[name[:-4]] = info
    return infos


def _read_archive(zf: zipfile.ZipFile, archive_size: int, cls: type, expected_config: dict | None) -> tuple[dict, dict]:
    infos = _check_directory(zf, archive_size)
    # every entry's header first (a bounded read each): object arrays and entries whose declared
    # size is not what their header needs are refused before anything else is read
    headers = {key: _header(zf, info) for key, info in infos.items()}
    if "config" not in infos:
        raise _Mismatch("not a vqref file: it has no 'config' entry")
    config = _read_config(zf, infos.pop("config"), headers.pop("config"))
    name = config.pop("class", None)
    if name != cls.__name__:
        if expected_config is not None:
            raise _Mismatch(
                f"the file was saved from a different configuration: class: file {name!r} vs module {cls.__name__!r}"
            )
        raise _Mismatch(f"it does not hold a {cls.__name__} (its class entry is {name!r})")
    # options added after the file format (``cls.CONFIG_DEFAULTS``) may be absent: an older file
    # means the behaviour from before they existed
    config = {**getattr(cls, "CONFIG_DEFAULTS", {}), **config}
    unknown = sorted(set(config) - set(cls.CONFIG_KEYS))
    missing = sorted(set(cls.CONFIG_KEYS) - set(config))
    if unknown or missing:
        problems = ([f"unknown options {unknown}"] if unknown else []) + ([f"no {missing}"] if missing else [])
        raise _Mismatch(
            f"config entry has {' and '.join(problems)}; a {cls.__name__} has exactly {sorted(cls.CONFIG_KEYS)}"
        )
    try:
        config = cls.check_config(config)  # types and ranges, as the constructor checks them
        spec = cls.spec_from_config(config)
    except (TypeError, ValueError) as e:
        raise _Mismatch(f"config entry: {e}") from None
    if expected_config is not None:
        diff = {
            k: (config[k], v)
            for k, v in expected_config.items()
            if k not in ("chunk_size", "dtype") and (type(config[k]), config[k]) != (type(v), v)
        }
        if diff:
            raise _Mismatch(
                "the file was saved from a different configuration: "
                + ", ".join(f"{k}: file {a!r} vs module {b!r}" for k, (a, b) in diff.items())
            )
    missing = sorted(set(spec) - set(infos))
    extra = sorted(set(infos) - set(spec))
    if missing or extra:
        raise _Mismatch(f"state entries mismatch: missing {missing}, unexpected {extra}")
    # every entry's shape and dtype against the configuration, before any array is decompressed
    for key, shape in spec.items():
        got_shape, dtype, _ = headers[key]
        want = () if shape is None else tuple(shape)
        if got_shape != want:
            raise _Mismatch(f"state_dict[{key!r}] must have shape {want}, got {got_shape}")
        if shape is None and dtype != np.bool_:
            raise _Mismatch(f"state_dict[{key!r}] must be a boolean, got dtype {dtype}")
        if shape is not None and dtype.name not in _FLOAT_DTYPES:
            raise _Mismatch(f"state_dict[{key!r}] must be float32 or float64, got dtype {dtype}")
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
    except (json.JSONDecodeError, RecursionError, ValueError) as e:
        # ValueError: an integer of more digits than Python converts; RecursionError: deep nesting
        raise _Mismatch(f"its configuration is not valid JSON ({type(e).__name__}: {e})") from None
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


def stored_dtype(state: dict, default: str = "float32") -> str:
    """``"float64"`` if any stored float array is float64, ``"float32"`` if they are all float32,
    ``default`` (the file's configured dtype) when the state holds no float array (FSQ)."""
    names = {a.dtype.name for a in state.values() if a.dtype.name in _FLOAT_DTYPES}
    if not names:
        return default
    return "float64" if "float64" in names else "float32"
