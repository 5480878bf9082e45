"""Model files are data: generated hostile files, each refused before anything large is read.

``Quantizer.save`` writes an ``.npz`` archive (a JSON configuration and one ``.npy`` entry per
state array); ``load`` and ``from_file`` read it through :mod:`vqref.quantizers.files`.  This
file *generates* what a hostile or damaged file can be and checks, for each:

* ``load`` and ``from_file`` raise a ``ValueError`` whose message names the file's problem (the
  entry, the option) -- never another exception, never a partial load;
* ``load`` leaves the module bit-identical: state arrays, flags, generators, and the pending
  backward (by the gradient a copy computes from it), see ``test_integrity.snapshot``;
* nothing is imported (a module on ``sys.path`` whose import would create a marker file is
  named in every place a file could name it), nothing is unpickled;
* nothing large is allocated: for the oversized cases (an entry claiming 10 GB, a header with a
  huge shape, a 100 MB header, a configuration asking for 10**12 codes), ``tracemalloc``'s peak
  stays under 1 MiB -- and a positive control shows that it does see numpy's allocations.

The files that must load (the saved file, deflated, reordered, big-endian, Fortran-ordered)
are loaded too, so that the generators are known to produce otherwise well-formed files.

Symbols: D = 5 features, K = 7 codes, Q = 3 depths.
"""

from __future__ import annotations

import copy
import io
import json
import math
import pickle
import sys
import tracemalloc
import zipfile

import numpy as np
import pytest
from test_integrity import assert_same, evil_module_on_path, snapshot

from vqref import ResidualVQ, VectorQuantize
from vqref import backend as B
from vqref.quantizers.options import CONFIG_DEFAULTS, CONFIG_KEYS

D, K, Q = 5, 7, 3
N = 11
MiB = 1 << 20

# ------------------------------------------------------------------ building files


def npy(a: np.ndarray, version: tuple | None = None) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asanyarray(a), version=version, allow_pickle=True)
    return buf.getvalue()


def npy_raw(header: str, data: bytes, version: tuple = (1, 0), header_len: int | None = None) -> bytes:
    """A hand-made .npy entry: ``header`` is the dict literal, ``header_len`` may lie about it."""
    text = header.encode("latin1")
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    fmt = "<H" if version == (1, 0) else "<I"
    import struct

    length = struct.pack(fmt, len(text) if header_len is None else header_len)
    return b"\x93NUMPY" + bytes(version) + length + text + data


def write_zip(path, members: dict, *, compression=zipfile.ZIP_STORED, claims: dict | None = None) -> None:
    """Write ``members`` (name -> bytes); ``claims`` patches the sizes the directory declares
    (name -> (file_size, compress_size or None)), as a hostile writer would."""
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, (file_size, compress_size) in (claims or {}).items():
            info = zf.getinfo(name)
            info.file_size = file_size
            if compress_size is not None:
                info.compress_size = compress_size


class File:
    """The entries of a valid file for ``module``, to be spoiled by a case."""

    def __init__(self, module):
        self.cls = type(module)
        self.config = {"class": self.cls.__name__, **module.config()}
        self.state = {k: np.array(B.to_numpy(v)) for k, v in module.state_dict().items()}

    def key(self, suffix: str) -> str:
        return next(k for k in self.state if k.endswith(suffix))

    def members(self, config: dict | None = None, state: dict | None = None) -> dict:
        out = {"config.npy": npy(np.asarray(json.dumps(self.config if config is None else config)))}
        out.update({k + ".npy": npy(v) for k, v in (self.state if state is None else state).items()})
        return out

    def with_config(self, **changes) -> dict:
        return self.members(config={**self.config, **changes})

    def with_entry(self, suffix: str, value) -> dict:
        return self.members(state={**self.state, self.key(suffix): value})


def _modules():
    """The modules files are loaded into: plain (learnable, a pending backward) and residual."""
    vq = VectorQuantize(D, K, seed=0, learnable_codebook=True, ema_update=False, threshold_ema_dead_code=1.5)
    rvq = ResidualVQ(dim=D, num_quantizers=Q, codebook_size=K, seed=0, kmeans_init=True, threshold_ema_dead_code=1.5)
    gen = np.random.default_rng(0)
    for m in (vq, rvq):
        m(gen.standard_normal((N, D)))
        m.backward(gen.standard_normal((N, D)))
        m(gen.standard_normal((N, D)))  # pending
    return {"vq": vq, "rvq": rvq}


@pytest.fixture(scope="module")
def _built() -> dict:
    return _modules()


@pytest.fixture(params=["vq", "rvq"])
def module(request, _built):
    return copy.deepcopy(_built[request.param])  # a copy keeps the pending backward


# ------------------------------------------------------------------ the cases

READ = r"is not a readable vqref \.npz file"


def _truncations(raw: bytes) -> list:
    return sorted({0, 1, 4, 22, 30, len(raw) // 3, len(raw) // 2, len(raw) - 100, len(raw) - 22, len(raw) - 1})


# id -> (build(f: File, tmp) -> dict of members, or bytes, or a path;  message pattern;  oversized?)
CASES: dict = {}


def case(name: str, pattern: str, oversized: bool = False):
    def register(fn):
        CASES[name] = (fn, pattern, oversized)
        return fn

    return register


# -- not an archive at all
case("empty-file", READ)(lambda f, tmp: b"")
case("random-bytes", READ)(lambda f, tmp: np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes())
case("pickle", r"pickled data, which vqref never loads")(lambda f, tmp: pickle.dumps(f.state))
case("single-npy", r"single \.npy array, not an \.npz archive")(lambda f, tmp: npy(f.state[f.key("codebook")]))
case("a-directory", READ)(lambda f, tmp: tmp)
case("missing-file", READ)(lambda f, tmp: tmp / "no-such-file.npz")
for _i in range(10):  # truncations of a valid file at ten places, from nothing to one byte short
    case(f"truncated-{_i}", READ)(
        lambda f, tmp, i=_i: (lambda raw: raw[: _truncations(raw)[i]])(_saved_bytes(f, tmp))
    )  # fmt: skip
case("bad-npy-magic", r"entry '[\w.]*codebook\.npy' is not a \.npy array")(
    lambda f, tmp: {**f.members(), _entry(f, "codebook"): b"\x00" + f.members()[_entry(f, "codebook")][1:]}
)


def _saved_bytes(f: File, tmp) -> bytes:
    path = tmp / "valid.npz"
    write_zip(path, f.members())
    return path.read_bytes()


def _entry(f: File, suffix: str) -> str:
    return f.key(suffix) + ".npy"


# -- oversized: an entry or a configuration asking for more than the model it describes
GiB10 = 10 * (1 << 30)
case("claims-10GB-stored", r"claims 10737418240 bytes", True)(
    lambda f, tmp: (f.members(), dict(claims={_entry(f, "codebook"): (GiB10, None)}))
)
case("claims-10GB-deflated", r"claims 10737418240 bytes", True)(
    lambda f, tmp: (f.members(), dict(compression=zipfile.ZIP_DEFLATED, claims={_entry(f, "codebook"): (GiB10, None)}))
)
case("claims-10GB-compressed-too", r"claims 10737418240 bytes from 10737418240 compressed bytes", True)(
    lambda f, tmp: (f.members(), dict(claims={_entry(f, "codebook"): (GiB10, GiB10)}))
)
case("claims-4GB-config", r"claims 4294967000 bytes", True)(
    lambda f, tmp: (f.members(), dict(compression=zipfile.ZIP_DEFLATED, claims={"config.npy": (4294967000, None)}))
)
case("claims-8-bytes-more", r"entry '[\w.]*codebook\.npy' holds \d+ bytes, not the size its header declares", True)(
    lambda f, tmp: (
        f.members(),
        dict(
            compression=zipfile.ZIP_DEFLATED,
            claims={_entry(f, "codebook"): (len(f.members()[_entry(f, "codebook")]) + 8, None)},
        ),
    )
)
case("huge-shape-header", r"holds \d+ bytes, not the size its header declares", True)(
    lambda f, tmp: {
        **f.members(),
        _entry(f, "codebook"): npy_raw(
            "{'descr': '<f8', 'fortran_order': False, 'shape': (1000000, 1000000), }", b"\0" * (K * D * 8)
        ),
    }
)
case("huge-shape-consistent-size", r"claims 40000000128 bytes", True)(
    # a header for (10**9, 5) floats and a directory that declares exactly that size
    lambda f, tmp: (
        {
            **f.members(),
            _entry(f, "codebook"): npy_raw("{'descr': '<f8', 'fortran_order': False, 'shape': (1000000000, 5), }", b""),
        },
        dict(compression=zipfile.ZIP_DEFLATED, claims={_entry(f, "codebook"): (40000000128, None)}),
    )
)


def _honest_headers_without_data(f: File):
    """A valid configuration for a 512 MiB state, every header consistent with it and every
    declared size exactly what the header needs -- but no data: only the check of the declared
    sizes against the compressed bytes in the file stops ``read_array`` allocating 512 MiB."""
    config = {**f.config, "codebook_size": 1 << 16, "dim": 1 << 10}
    spec = f.cls.spec_from_config(config)
    members, claims = {"config.npy": npy(np.asarray(json.dumps(config)))}, {}
    for key, shape in spec.items():
        descr, shape = ("|b1", ()) if shape is None else ("<f8", tuple(shape))
        head = npy_raw(f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}", b"")
        members[key + ".npy"] = head
        claims[key + ".npy"] = (len(head) + math.prod(shape) * np.dtype(descr).itemsize, None)
    return members, dict(compression=zipfile.ZIP_DEFLATED, claims=claims)


case("honest-headers-no-data", r"claims \d+ bytes from \d+ compressed bytes", True)(
    lambda f, tmp: _honest_headers_without_data(f)
)
case("header-length-100MB", r"declares a 100000000-byte header \(at most 10000\)", True)(
    lambda f, tmp: (
        {
            **f.members(),
            _entry(f, "codebook"): npy_raw("{}", b" " * 100_000_000, version=(2, 0), header_len=100_000_000),
        },
        dict(compression=zipfile.ZIP_DEFLATED),
    )
)
case("config-over-64KB", r"config entry is \d+ bytes \(at most 65536\)", True)(
    lambda f, tmp: f.with_config(padding="x" * 20_000)
)
case("config-dtype-400MB-string", r"entry 'config\.npy' holds \d+ bytes, not the size its header declares", True)(
    lambda f, tmp: {
        **f.members(),
        "config.npy": npy_raw("{'descr': '<U100000000', 'fortran_order': False, 'shape': (), }", b"{}"),
    }
)
case("codebook_size-1e12", r"config entry: num_quantizers \* codebook_size \* dim = \d+ \* 1000000000000", True)(
    lambda f, tmp: f.with_config(codebook_size=10**12)
)
case("dim-1e12", r"exceeds 4294967296 elements", True)(lambda f, tmp: f.with_config(dim=10**12))
case("num_quantizers-1e9", r"num_quantizers must be <= 4096, got 1000000000", True)(
    lambda f, tmp: f.with_config(num_quantizers=10**9)
)
case("kmeans_iters-1e9", r"kmeans_iters must be <= 10000", True)(lambda f, tmp: f.with_config(kmeans_iters=10**9))
# (its directory is parsed into ZipInfo objects by zipfile: memory in proportion to the file's size)
case("20000-entries", r"it has 200\d\d entries; a vqref file has at most 16385")(
    lambda f, tmp: {**f.members(), **{f"e{i}.npy": b"" for i in range(20_000)}}
)

# -- the archive's directory
case("duplicate-entry", r"entry '[\w.]*codebook\.npy' appears twice")(lambda f, tmp: "duplicate")
case("bzip2-entry", r"compression method 12 \(stored or deflated only\)")(
    lambda f, tmp: (f.members(), dict(compression=zipfile.ZIP_BZIP2))
)
case("lzma-entry", r"compression method 14 \(stored or deflated only\)")(
    lambda f, tmp: (f.members(), dict(compression=zipfile.ZIP_LZMA))
)
case("extra-array", r"state entries mismatch: missing \[\], unexpected \['evil'\]")(
    lambda f, tmp: {**f.members(), "evil.npy": npy(np.zeros(3))}
)
case("extra-non-npy", r"unexpected entry 'readme\.txt' \(entries are \.npy arrays\)")(
    lambda f, tmp: {**f.members(), "readme.txt": b"hello"}
)
case("extra-in-a-folder", r"unexpected \['sub/[\w.]+'\]")(
    lambda f, tmp: {**f.members(), "sub/" + _entry(f, "codebook"): f.members()[_entry(f, "codebook")]}
)
case("no-config", r"not a vqref file: it has no 'config' entry")(
    lambda f, tmp: {k: v for k, v in f.members().items() if k != "config.npy"}
)
for _suffix in ("codebook", "cluster_size", "embed_avg", "initted"):
    case(f"missing-{_suffix}", rf"missing \['[\w.]*{_suffix}'\], unexpected \[\]")(
        lambda f, tmp, s=_suffix: {k: v for k, v in f.members().items() if k != _entry(f, s)}
    )

# -- wrong dtypes, for a float entry and for the flag
BAD_FLOAT_DTYPES = {
    "int32": np.int32,
    "int64": np.int64,
    "float16": np.float16,
    "complex64": np.complex64,
    "complex128": np.complex128,
    "bool": np.bool_,
    "unicode": "<U3",
    "structured": [("a", "<f4"), ("b", "<f4")],
    "void": "V8",
}
for _name, _dt in BAD_FLOAT_DTYPES.items():
    for _suffix in ("codebook", "cluster_size"):
        case(f"dtype-{_name}-{_suffix}", rf"\[\'[\w.]*{_suffix}\'\] must be float32 or float64, got dtype")(
            lambda f, tmp, dt=_dt, s=_suffix: f.with_entry(s, np.zeros(f.state[f.key(s)].shape, dtype=dt))
        )
case("dtype-object-codebook", r"Object arrays cannot be loaded \(entry '[\w.]*codebook\.npy' would need pickle\)")(
    lambda f, tmp: f.with_entry("codebook", np.empty(f.state[f.key("codebook")].shape, dtype=object))
)
for _name, _value in {"float64": np.asarray(1.0), "int64": np.asarray(1), "unicode": np.asarray("True")}.items():
    case(f"dtype-{_name}-initted", r"\[\'[\w.]*initted\'\] must be a boolean, got dtype")(
        lambda f, tmp, v=_value: f.with_entry("initted", v)
    )

# -- wrong shapes
for _suffix, _bad in {
    "codebook": [(D, K), (K, D, 1), (), (0, D), (K + 1, D)],
    "cluster_size": [(K, 1), (K + 1,), ()],
    "embed_avg": [(1, K, D)],
    "initted": [(1,), (2, 2)],
}.items():
    for _shape in _bad:
        case(f"shape-{_suffix}-{_shape}", rf"\[\'[\w.]*{_suffix}\'\] must have shape \([\d, ]*\), got")(
            lambda f, tmp, s=_suffix, shp=_shape: f.with_entry(
                s, np.zeros(shp, dtype=bool if s == "initted" else np.float64)
            )
        )

# -- values: not finite, negative counts, beyond the module's float32 range (load only checks these)
case("value-nan", r"\[\'[\w.]*codebook\'\] contains NaN or infinite values")(
    lambda f, tmp: f.with_entry("codebook", np.full(f.state[f.key("codebook")].shape, np.nan))
)
case("value-negative-counts", r"EMA counts, which must be >= 0")(
    lambda f, tmp: f.with_entry("cluster_size", -np.ones(K))
)

# -- the configuration entry itself
for _i, _text in enumerate(["[1, 2]", "3", '"VectorQuantize"', "null", "true"]):
    case(f"config-not-an-object-{_i}", r"its config entry must be a JSON object")(
        lambda f, tmp, t=_text: {**f.members(), "config.npy": npy(np.asarray(t))}
    )
for _i, _text in enumerate(["{not json", "", "{'dim': 5}", "[" * 8000 + "]" * 8000, '{"dim": ' + "9" * 5000 + "}"]):
    case(f"config-not-json-{_i}", r"its configuration is not valid JSON")(
        lambda f, tmp, t=_text: {**f.members(), "config.npy": npy(np.asarray(t))}
    )
for _i, _arr in enumerate([np.zeros(3), np.asarray(b'{"dim": 5}'), np.asarray(["{}", "{}"]), np.asarray([["{}"]])]):
    case(f"config-not-a-string-{_i}", r"its config entry must be a JSON string")(
        lambda f, tmp, a=_arr: {**f.members(), "config.npy": npy(a)}
    )
case("config-object-array", r"Object arrays cannot be loaded \(entry 'config\.npy'")(
    lambda f, tmp: {**f.members(), "config.npy": npy(np.asarray([f.config], dtype=object))}
)
for _key in ("xp", "device", "seed", "__class__", "module", "n_embed"):
    case(f"config-unknown-{_key}", rf"config entry has unknown options \['{_key}'\]")(
        lambda f, tmp, k=_key: f.with_config(**{k: "numpy"})
    )
for _key in (k for k in CONFIG_KEYS if k not in CONFIG_DEFAULTS):  # a default fills the others
    case(f"config-without-{_key}", rf"config entry has no \['{_key}'\]")(
        lambda f, tmp, k=_key: f.members(config={a: b for a, b in f.config.items() if a != k})
    )
case("config-without-class", r"does not hold a \w+ \(its class entry is None\)|class: file None")(
    lambda f, tmp: f.members(config={a: b for a, b in f.config.items() if a != "class"})
)

INT_OPTIONS = ("dim", "codebook_size", "num_quantizers", "kmeans_iters", "orthogonal_reg_max_codes", "chunk_size")
REAL_OPTIONS = (
    "decay",
    "eps",
    "commitment_weight",
    "codebook_weight",
    "orthogonal_reg_weight",
    "threshold_ema_dead_code",
)
FLAG_OPTIONS = ("ema_update", "learnable_codebook", "kmeans_init", "use_cosine_sim", "orthogonal_reg_active_codes_only",
                "rotation_trick", "shared_codebook")  # fmt: skip
BAD_VALUES = {
    **{k: ["7", 7.0, True, -1, 0, 1e400, [7]] for k in INT_OPTIONS},
    **{k: ["0.5", True, float("nan"), float("inf"), -1.0, [0.5], {"v": 1}] for k in REAL_OPTIONS},
    **{k: ["False", "True", 0, 1, 0.0, [True]] for k in FLAG_OPTIONS},
    "gradient_routing": ["evil_module_xyz", 1, None, ["sum"]],
    "dtype": ["float16", "int32", "evil_module_xyz", None, 32, "numpy.float32"],
}
for _key, _values in BAD_VALUES.items():
    for _v in _values:
        case(f"config-{_key}={_v!r}", rf"config entry: {_key}|config entry: num_quantizers \* codebook_size \* dim")(
            lambda f, tmp, k=_key, v=_v: f.with_config(**{k: v})
        )
# required options given as null
for _key in ("dim", "codebook_size", "num_quantizers", "decay", "ema_update"):
    case(f"config-{_key}=null", rf"config entry: (\w+ needs )?{_key}")(
        lambda f, tmp, k=_key: f.with_config(**{k: None})
    )


def materialise(case_id: str, module, tmp) -> object:
    """The case's file on disk (or a path that is not one); returns its path."""
    fn = CASES[case_id][0]
    f = File(module)
    made = fn(f, tmp)
    path = tmp / f"{case_id.replace('/', '_')[:80]}.npz"
    if made == "duplicate":
        members = f.members()
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in members.items():
                zf.writestr(name, data)
            with pytest.warns(UserWarning, match="Duplicate name"):
                zf.writestr(_entry(f, "codebook"), members[_entry(f, "codebook")])
        return path
    if isinstance(made, bytes):
        path.write_bytes(made)
        return path
    if isinstance(made, dict):
        write_zip(path, made)
        return path
    if isinstance(made, tuple):
        write_zip(path, made[0], **made[1])
        return path
    return made  # a path (a directory, a missing file)


# ------------------------------------------------------------------ the tests


def _peak_while(fn) -> int:
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_load_refuses_and_changes_nothing(case_id, module, tmp_path):
    _, pattern, oversized = CASES[case_id]
    path = materialise(case_id, module, tmp_path)
    before = snapshot(module)
    errors = []

    def load():
        with pytest.raises(ValueError, match=pattern) as info:
            module.load(str(path))
        errors.append(info.value)

    peak = _peak_while(load) if oversized else (load() or 0)
    assert str(path) in str(errors[0]), "the message names the file"
    assert peak < MiB, f"reading the file allocated {peak / MiB:.1f} MiB"
    assert_same(before, snapshot(module))


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_from_file_refuses(case_id, module, tmp_path):
    _, pattern, oversized = CASES[case_id]
    path = materialise(case_id, module, tmp_path)
    # from_file has no module to compare with: a configuration it accepts must still match the entries
    pattern = pattern.replace(r"the file was saved from a different configuration", "")

    def build():
        with pytest.raises(ValueError, match=pattern):
            type(module).from_file(str(path), seed=3)

    peak = _peak_while(build) if oversized else (build() or 0)
    assert peak < MiB, f"reading the file allocated {peak / MiB:.1f} MiB"


def test_tracemalloc_sees_what_a_load_allocates(tmp_path):
    """Positive control for the memory bound above: loading a 3 x 2 MiB state shows up."""
    big = VectorQuantize(64, 4096, seed=0, dtype="float64")
    path = tmp_path / "big.npz"
    big.save(str(path))
    peak = _peak_while(lambda: big.load(str(path)))
    assert peak > 4 * MiB


# -- files that must load: the generators above spoil otherwise valid files


def _variants(f: File) -> dict:
    codebook = f.key("codebook")
    return {
        "as-saved": (f.members(), {}),
        "deflated": (f.members(), dict(compression=zipfile.ZIP_DEFLATED)),
        "reordered": (dict(reversed(list(f.members().items()))), {}),
        "big-endian": (f.members(state={k: v.astype(v.dtype.newbyteorder(">")) for k, v in f.state.items()}), {}),
        "fortran-order": (f.members(state={**f.state, codebook: np.asfortranarray(f.state[codebook])}), {}),
        "npy-version-2": ({**f.members(), codebook + ".npy": npy(f.state[codebook], version=(2, 0))}, {}),
    }


@pytest.mark.parametrize(
    "variant", ["as-saved", "deflated", "reordered", "big-endian", "fortran-order", "npy-version-2"]
)
def test_valid_variants_load_exactly(variant, module, tmp_path):
    f = File(module)
    members, kw = _variants(f)[variant]
    path = tmp_path / f"{variant}.npz"
    write_zip(path, members, **kw)
    target = copy.deepcopy(module)
    target.load(str(path))
    built = type(module).from_file(str(path), seed=3)
    for loaded in (target, built):
        for k, v in loaded.state_dict().items():
            np.testing.assert_array_equal(B.to_numpy(v), f.state[k], err_msg=k)
    assert target.state.cache is None  # a load drops the pending backward (documented)


@pytest.mark.parametrize("lib", ["numpy", "array_api_strict"])
def test_a_float64_file_beyond_float32_is_refused_by_a_float32_module(lib, tmp_path):
    module = VectorQuantize(D, K, seed=0, xp=lib)  # float32 state
    module(B.from_numpy(np.random.default_rng(0).standard_normal((N, D)), module.xp))
    f = File(module)
    path = tmp_path / "huge.npz"
    write_zip(path, f.with_entry("codebook", np.full((K, D), 1e39)))
    before = snapshot(module)
    with pytest.raises(ValueError, match=r"\['codebook'\] holds values beyond the float32 range"):
        module.load(str(path))
    assert_same(before, snapshot(module))
    with pytest.raises(ValueError, match=r"beyond the float32 range"):
        VectorQuantize.from_file(str(path), dtype="float32")
    # by default the state's dtype is the stored arrays' (float64 here): the values fit
    assert VectorQuantize.from_file(str(path)).config()["dtype"] == "float64"


# ------------------------------------------------------------------ nothing is ever imported


@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    yield from evil_module_on_path(tmp_path, monkeypatch)


EVIL = "evil_module_xyz"
EVIL_CONFIGS = {
    "xp": dict(xp=EVIL),
    "device": dict(device=EVIL),
    "seed": dict(seed=EVIL),
    "dtype": dict(dtype=EVIL),
    "dtype-dotted": dict(dtype=EVIL + ".float32"),
    "gradient_routing": dict(gradient_routing=EVIL),
    "class": {"class": EVIL},
    "class-dotted": {"class": EVIL + ".VectorQuantize"},
}


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("where", [*EVIL_CONFIGS, "entry-name", "object-entry", "caller-xp"])
def test_no_name_from_a_file_is_imported(where, module, tmp_path, evil_module):
    f = File(module)
    path = tmp_path / "evil.npz"
    if where in EVIL_CONFIGS:
        write_zip(path, f.with_config(**EVIL_CONFIGS[where]))
    elif where == "entry-name":
        write_zip(path, {**f.members(), EVIL + ".npy": npy(np.zeros(3))})
    elif where == "object-entry":
        write_zip(path, f.with_entry("codebook", np.array([_Payload(str(evil_module))], dtype=object)))
    else:
        module.save(str(path))
    before = snapshot(module)
    if where == "caller-xp":
        with pytest.raises(ValueError, match=r"xp must be one of the array libraries"):
            type(module).from_file(str(path), xp=EVIL)
    else:
        for call in (module.load, type(module).from_file):
            with pytest.raises(ValueError):
                call(str(path))
    assert not evil_module.exists(), "something from the file was imported or unpickled"
    assert EVIL not in sys.modules
    assert_same(before, snapshot(module))


@pytest.mark.parametrize("bad_path", [3, None, 1.5, b"file.npz", ["file.npz"]], ids=repr)
def test_paths_are_file_names(bad_path, module):
    """An integer is an open file descriptor to ``open``: ``save(1)`` would write to stdout and close it."""
    before = snapshot(module)
    for call in (module.save, module.load, type(module).from_file):
        with pytest.raises(TypeError, match=r"path must be a file name"):
            call(bad_path)
    assert_same(before, snapshot(module))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_stateless_module_keeps_its_configured_dtype_through_a_file(tmp_path, dtype):
    # FSQ stores no array: from_file takes the dtype from the file's configuration, not a default
    from vqref import FSQ

    path = str(tmp_path / "fsq.npz")
    FSQ(levels=[5, 4], dtype=dtype).save(path)
    assert FSQ.from_file(path).dtype == getattr(np, dtype)
    assert FSQ.from_file(path, dtype="float32").dtype == np.float32  # the caller's choice wins
