"""Checkpoints that never lose data: `save(path, tree)` and `load(path, like=None)`.

File format (version 1), all integers little-endian:

    b"PURENETCKPT1\\n"           13-byte magic, with the format version
    uint64  manifest length      n
    32 bytes                     SHA-256 of the manifest
    n bytes                      manifest: UTF-8 JSON
    data                         every leaf's raw bytes (C order, little-endian), back to back

The manifest holds the tree's structure (dicts, lists, tuples, named tuples,
None) and, per leaf, its key path, shape, dtype, byte offset, length and
SHA-256. `load` checks the magic, the file length, the manifest's checksum
and every leaf's checksum, so a truncated or corrupted file is an error
naming what is wrong, never wrong values.

Security: a checkpoint is data, never code. Checksums only detect
corruption (anyone can write a file whose checksums pass), so `load` trusts
nothing the file names. It never imports, calls or unpickles anything the
file names: a named tuple comes back as its class only when the class is one
of purenet's own state types listed in `_NAMED_TUPLES` (and its fields match),
otherwise as a dict of its fields; dtypes come from a fixed list (numbers,
bool, ml_dtypes floats, fixed-width strings) and PRNG keys from JAX's own
implementations. Everything in the manifest is validated (types, ranges,
offsets, each leaf used once) before any data is read, and anything
malformed is a CheckpointError. With `like`, the result has like's
structure and the file supplies only arrays, matched by key path (so field
names, not positions, must match).

Values come back exactly as saved: a leaf JAX can hold exactly is a jax
array; one it cannot (float64, int64, uint64, complex128 with
jax_enable_x64 off; strings) is a numpy array of the saved dtype. `like`
compares against the saved dtype.

Writes go to a temporary file in the same directory (created with the
permissions a plain write would give, under the umask; replacing a file
keeps that file's mode), which is flushed and fsync'ed, then renamed over
the target with os.replace, and the directory is fsync'ed: a crash at any
point leaves either the old checkpoint or the new one, whole. A killed save
leaves its temporary file (`.<name>.<12 hex>.tmp`) behind; the next save of
the same path removes those of that path older than its own (so two
processes must not save one path at once; other files are never touched).
"""
import hashlib
import importlib
import json
import math
import os
import re
import secrets
import stat
import struct
from typing import IO, Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import DictKey, GetAttrKey, SequenceKey, keystr

from purenet import _trees

__all__ = ["CheckpointError", "MAGIC", "check_writable", "conform", "load", "load_entries", "save", "write_atomically"]

MAGIC = b"PURENETCKPT1\n"
"""The first 13 bytes of every checkpoint file (format version 1)."""
_HEADER = len(MAGIC) + 8 + 32
_MAX_MANIFEST = 1 << 28  # 2^28 bytes: about a million leaves; a larger claim is not a file of ours
_MAX_NDIM = 32  # numpy 1.x's limit (numpy 2 allows 64): a checkpoint loads under both
_MAX_BYTES = np.iinfo(np.intp).max  # numpy's bound on the bytes of any shape, zero-size ones included

# The named tuples `load` rebuilds without `like`: purenet's own state types,
# by the name the manifest records -> where the class lives. Nothing outside
# this table is ever imported; any other named tuple loads as a dict.
_NAMED_TUPLES = {
    "purenet.training.loop:TrainState": ("purenet.training.loop", "TrainState"),
    "purenet.training.early_stopping:EarlyStoppingState": ("purenet.training.early_stopping", "EarlyStoppingState"),
    "purenet.training.fit:FitResult": ("purenet.training.fit", "FitResult"),
    # the names checkpoints written before the training package record
    "purenet.train:TrainState": ("purenet.training.loop", "TrainState"),
    "purenet.train:EarlyStoppingState": ("purenet.training.early_stopping", "EarlyStoppingState"),
    "purenet.train:FitResult": ("purenet.training.fit", "FitResult"),
    "purenet.optim.base:OptState": ("purenet.optim.base", "OptState"),
    "purenet.optim.loss_scale:LossScale": ("purenet.optim.loss_scale", "LossScale"),
    "purenet.optim.wrappers:EMAState": ("purenet.optim.wrappers", "EMAState"),
    "purenet.optim.transforms:AdamState": ("purenet.optim.transforms", "AdamState"),
    "purenet.optim.kfac:KFACState": ("purenet.optim.kfac", "KFACState"),
    "purenet.layers.base:KFACFactors": ("purenet.layers.base", "KFACFactors"),
    "purenet.layers.base:KFACBlocks": ("purenet.layers.base", "KFACBlocks"),
    "purenet.data.datasets:Split": ("purenet.data.datasets", "Split"),
    "purenet.privacy.canaries:CanaryObservations": ("purenet.privacy.canaries", "CanaryObservations"),
    "purenet.analysis.influence:Factors": ("purenet.analysis.influence", "Factors"),
    "purenet.analysis.influence:Block": ("purenet.analysis.influence", "Block"),
    # the names checkpoints written before the data, io and privacy packages record
    "purenet.datasets:Split": ("purenet.data.datasets", "Split"),
}

# Dtypes a checkpoint may hold: numbers and bool by name, fixed-width strings by "<U<n>" / "|S<n>".
_NUMERIC_DTYPES = (
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128", "bfloat16",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3b11fnuz", "float8_e4m3fnuz", "float8_e5m2fnuz",
    "float8_e3m4", "float8_e4m3", "float8_e8m0fnu", "float4_e2m1fn", "int4", "uint4", "int2", "uint2",
)
_STRING_DTYPE = re.compile(r"<U[1-9][0-9]{0,8}|\|S[1-9][0-9]{0,8}")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted, that does not fit `like`, or a path that cannot hold one."""


def _dtype_name(dtype):
    """The manifest's name for `dtype` (little-endian), or None if checkpoints do not store it."""
    if dtype.kind in "US":
        return dtype.str
    return dtype.name if dtype.name in _NUMERIC_DTYPES else None


def _parse_dtype(name):
    """The dtype a manifest names, from the fixed list only; None if unknown."""
    if not isinstance(name, str):
        return None
    if _STRING_DTYPE.fullmatch(name):
        return np.dtype(name)
    if name in _NUMERIC_DTYPES:
        try:
            return jnp.dtype(name)
        except TypeError:  # an ml_dtypes float this installation lacks
            return None
    return None


def _little_endian(array):
    """Big-endian arrays (e.g. read from IDX files) converted; the file is little-endian."""
    return array.astype(array.dtype.newbyteorder("<")) if array.dtype.byteorder == ">" else array


def _bad_code_point(array: np.ndarray) -> int | None:
    """The first UCS-4 code unit of a "<U" array that is not a Unicode scalar value
    (above 0x10FFFF, or a surrogate), or None; other dtypes: None."""
    if array.dtype.kind != "U" or array.size == 0:
        return None
    codes = np.frombuffer(array.tobytes(), "<u4")
    bad = (codes > 0x10FFFF) | ((codes >= 0xD800) & (codes <= 0xDFFF))
    return int(codes[np.argmax(bad)]) if bad.any() else None


def _is_namedtuple(x):
    return isinstance(x, tuple) and hasattr(x, "_fields")


# ---------------------------------------------------------------- save


def _encode(tree, leaves, path=()):
    """JSON description of tree's containers; (key path, array) pairs go to `leaves`, in file order."""
    if tree is None:
        return {"t": "none"}
    if isinstance(tree, dict):
        if not all(isinstance(k, str) for k in tree):
            raise TypeError("checkpoint dicts need string keys")
        keys = sorted(tree)
        return {"t": "dict", "keys": keys,
                "items": [_encode(tree[k], leaves, path + (DictKey(k),)) for k in keys]}
    if _is_namedtuple(tree):
        cls = type(tree)
        return {"t": "namedtuple", "class": f"{cls.__module__}:{cls.__qualname__}",
                "fields": list(tree._fields),
                "items": [_encode(v, leaves, path + (GetAttrKey(f),)) for f, v in zip(tree._fields, tree)]}
    if isinstance(tree, (tuple, list)):
        return {"t": type(tree).__name__,
                "items": [_encode(v, leaves, path + (SequenceKey(i),)) for i, v in enumerate(tree)]}
    leaves.append((keystr(path), tree))
    return {"t": "leaf", "index": len(leaves) - 1}


def _leaf_record(path, value):
    key_impl = None
    if isinstance(value, jax.Array) and jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
        key_impl = str(jax.random.key_impl(value))
        value = jax.random.key_data(value)
    array = _little_endian(np.asarray(value, order="C"))
    if array.dtype == object:
        raise TypeError(f"checkpoint leaf {path} is not an array (got {type(value).__name__})")
    name = _dtype_name(array.dtype)
    if name is None:
        raise TypeError(f"checkpoint leaf {path} has dtype {array.dtype}, which checkpoints do not store "
                        f"(numbers, bool and fixed-width strings)")
    if array.ndim > _MAX_NDIM:
        raise ValueError(f"checkpoint leaf {path} has {array.ndim} dimensions, checkpoints hold at most {_MAX_NDIM}")
    code = _bad_code_point(array)
    if code is not None:  # load refuses these, so never write them
        raise ValueError(f"checkpoint leaf {path} holds code point {code:#x}, which is not a Unicode character")
    data = array.tobytes()
    record = {"path": path, "shape": list(array.shape), "dtype": name,
              "nbytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if key_impl is not None:
        record["key_impl"] = key_impl
    return record, data


def save(path: str | os.PathLike[str], tree: Any) -> str:
    """Write `tree` (a pytree of arrays) to `path` atomically; returns the path.

    Args:
        path: the file to write (replaced whole if it exists; its directory must exist).
        tree: dicts with string keys, lists, tuples, named tuples and None, with
            arrays (jax or numpy: numbers, bool, ml_dtypes floats, fixed-width
            strings; PRNG keys) or scalars as leaves.

    Returns:
        `path`, as a str.

    Raises:
        TypeError: if the tree holds another container type, a dict key that
            is not a string, or a leaf that is not an array of a stored dtype.
        ValueError: if a leaf has more than 32 dimensions, or a string leaf
            holds a code point that is not a Unicode character.
        OSError: if the file cannot be written.
    """
    path = os.fspath(path)
    leaves: list = []
    structure = _encode(tree, leaves)
    if len(jax.tree_util.tree_leaves(tree)) != len(leaves):
        raise TypeError("checkpoints hold dicts, lists, tuples, named tuples, None and arrays; "
                        "this tree has another container type")
    records, blobs, offset = [], [], 0
    for p, value in leaves:
        record, data = _leaf_record(p, value)
        record["offset"] = offset
        offset += len(data)
        records.append(record)
        blobs.append(data)
    manifest = json.dumps({"format": "purenet-checkpoint", "version": 1, "structure": structure,
                           "leaves": records}).encode()

    def write(f):
        f.write(MAGIC + struct.pack("<Q", len(manifest)) + hashlib.sha256(manifest).digest())
        f.write(manifest)
        for data in blobs:
            f.write(data)

    return write_atomically(path, write)


def write_atomically(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]):
    """Replace the file `path` by what `write` writes, atomically.

    write(f) fills a temporary file beside `path`, which is fsync'ed, then
    os.replace'd over `path`, and the directory is fsync'ed: a crash leaves
    the old file or the new one, never a mix. Stale temporary files of this
    path from killed writers are removed; a new file gets the umask's mode,
    a replaced one keeps its.

    Args:
        path: the file to write.
        write: called once with the temporary file, open for binary writing.

    Returns:
        `path`, as given.

    Raises:
        OSError: if the temporary file cannot be created, written or moved
            over `path`; whatever `write` raises is raised too, the temporary
            file removed.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = _create_temporary(path)
    started = os.fstat(fd).st_mtime_ns  # the file system's clock, as the stale files' mtimes
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        _keep_mode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _remove_stale_temporaries(path, started)
    _fsync_directory(directory)
    return path


def _temporary_name(path) -> re.Pattern:
    """The names `_create_temporary` gives the temporary files of `path`."""
    return re.compile(re.escape(f".{os.path.basename(os.path.abspath(path))}.") + r"[0-9a-f]{12}\.tmp")


def _remove_stale_temporaries(path, before_ns: int) -> None:
    """Delete the temporary files killed saves of `path` left: regular files beside it named as
    `_create_temporary` names them, last modified before `before_ns`. Best effort: errors are ignored."""
    directory, pattern = os.path.dirname(os.path.abspath(path)), _temporary_name(path)
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        try:
            if (pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False)
                    and entry.stat(follow_symlinks=False).st_mtime_ns < before_ns):
                os.unlink(entry.path)
        except OSError:
            continue


def _create_temporary(path):
    """(fd, name) of a new file beside `path`, with the mode a plain open() would give (0o666 & ~umask)."""
    directory, base = os.path.split(os.path.abspath(path))
    while True:
        tmp = os.path.join(directory, f".{base}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:  # pragma: no cover - a 48-bit name collision
            continue


def _keep_mode(path, tmp):
    """Give `tmp` the permissions of the file it replaces, if there is one."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return
    os.chmod(tmp, mode)


def check_writable(path: str | os.PathLike[str]) -> None:
    """Raise CheckpointError, before any work is done, when `save(path, ...)` could not write.

    It creates and removes a temporary file beside `path`, as `save` would.

    Args:
        path: the checkpoint file a later `save` will write.

    Raises:
        CheckpointError: if the directory does not exist, `path` is a
            directory, or a file cannot be created there.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise CheckpointError(f"cannot write checkpoint {path}: the directory {directory} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"cannot write checkpoint {path}: it is a directory")
    try:
        fd, tmp = _create_temporary(path)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}") from e
    os.close(fd)
    os.unlink(tmp)


def _fsync_directory(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- load: the manifest


def _read_manifest(path, f, size):
    """The manifest (a dict) and where the data start; only the header and manifest are read."""
    header = f.read(_HEADER)
    if header[: len(MAGIC)] != MAGIC[: len(header)]:
        raise CheckpointError(f"{path}: not a purenet checkpoint (bad magic bytes)")
    if len(header) < _HEADER:
        raise CheckpointError(f"{path}: truncated ({size} bytes is shorter than the header)")
    (length,) = struct.unpack("<Q", header[len(MAGIC): len(MAGIC) + 8])
    if length > size - _HEADER:
        raise CheckpointError(f"{path}: truncated inside the manifest")
    if length > _MAX_MANIFEST:
        raise CheckpointError(f"{path}: the header claims a manifest of {length} bytes, "
                              f"more than the {_MAX_MANIFEST} this reader accepts")
    manifest = f.read(length)
    if hashlib.sha256(manifest).digest() != header[len(MAGIC) + 8:]:
        raise CheckpointError(f"{path}: manifest checksum mismatch (the file is corrupted)")
    try:
        manifest = json.loads(manifest.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: malformed manifest (not JSON: {e})") from None
    return manifest, _HEADER + length


def _malformed(path, what):
    return CheckpointError(f"{path}: malformed manifest: {what}")


def _check_leaves(path, records, labels):
    """Validate the leaf records: types, dtypes, shapes, sizes, contiguous offsets. Returns the dtypes.
    `labels` are the leaves' key paths, which errors name."""
    count = len(labels)
    if not isinstance(records, list) or len(records) != count:
        raise _malformed(path, f"'leaves' must be a list of {count} records (one per leaf in the structure)")
    dtypes, offset = [], 0
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise _malformed(path, f"leaf record {i} is not an object")
        leaf = f"leaf record {i} ({labels[i] or 'the root'})"
        shape, nbytes = r.get("shape"), r.get("nbytes")
        if isinstance(shape, list) and len(shape) > _MAX_NDIM:
            raise _malformed(path, f"{leaf} has a shape of {len(shape)} dimensions, at most {_MAX_NDIM} are allowed")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise _malformed(path, f"{leaf} has shape {shape!r}, not a list of non-negative integers")
        dtype = _parse_dtype(r.get("dtype"))
        if dtype is None:
            raise _malformed(path, f"{leaf} has unknown dtype {r.get('dtype')!r}")
        if type(nbytes) is not int or nbytes != math.prod(shape) * dtype.itemsize:
            raise _malformed(path, f"{leaf} has nbytes {nbytes!r}, its shape {shape} and "
                                   f"dtype {r['dtype']} need {math.prod(shape) * dtype.itemsize}")
        if math.prod(d for d in shape if d) * dtype.itemsize > _MAX_BYTES:  # zero-size arrays too
            raise _malformed(path, f"{leaf} has shape {shape}, too large for any array of dtype {r['dtype']}")
        if r.get("offset") != offset or type(r.get("offset")) is not int:
            raise _malformed(path, f"{leaf} has offset {r.get('offset')!r}, expected {offset}")
        sha = r.get("sha256")
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise _malformed(path, f"{leaf} has no valid sha256")
        if "key_impl" in r and not (isinstance(r["key_impl"], str) and dtype == np.uint32):
            raise _malformed(path, f"{leaf} has key_impl {r['key_impl']!r} with dtype {dtype}")
        dtypes.append(dtype)
        offset += nbytes
    return dtypes, offset


_CONTAINERS = ("none", "leaf", "dict", "list", "tuple", "namedtuple")


def _walk(path, node, key_path=()):
    """Validate a structure node; yields (key path, leaf index) for each leaf, in order."""
    kind = node.get("t") if isinstance(node, dict) else None
    where = keystr(key_path) or "the root"
    if kind not in _CONTAINERS:
        raise _malformed(path, f"unknown container {kind!r} at {where}")
    if kind == "none":
        return
    if kind == "leaf":
        if type(node.get("index")) is not int:
            raise _malformed(path, f"leaf at {where} has no integer index")
        yield key_path, node["index"]
        return
    items = node.get("items")
    if not isinstance(items, list):
        raise _malformed(path, f"{kind} at {where} has no list of items")
    if kind in ("dict", "namedtuple"):
        names = node.get("keys" if kind == "dict" else "fields")
        if (not isinstance(names, list) or len(names) != len(items)
                or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names)):
            raise _malformed(path, f"{kind} at {where} needs {len(items)} distinct string names")
        if kind == "namedtuple" and not isinstance(node.get("class"), str):
            raise _malformed(path, f"namedtuple at {where} has no class name")
        keys = [DictKey(n) if kind == "dict" else GetAttrKey(n) for n in names]
    else:
        keys = [SequenceKey(i) for i in range(len(items))]
    for key, item in zip(keys, items):
        yield from _walk(path, item, key_path + (key,))


def _check_manifest(path, manifest, start, size):
    """Validate the whole manifest; returns (structure, records, dtypes, each leaf's key path)."""
    if not isinstance(manifest, dict) or manifest.get("format") != "purenet-checkpoint":
        raise _malformed(path, "not a purenet-checkpoint manifest")
    if manifest.get("version") != 1:
        raise CheckpointError(f"{path}: checkpoint format version {manifest.get('version')!r}, "
                              f"this purenet reads version 1")
    structure, records = manifest.get("structure"), manifest.get("leaves")
    pairs = list(_walk(path, structure))
    labels = {index: keystr(key_path) for key_path, index in pairs}
    if len(labels) != len(pairs) or sorted(labels) != list(range(len(pairs))):
        raise _malformed(path, "leaf indices must be 0..n-1, each used once")
    labels = [labels[i] for i in range(len(labels))]
    dtypes, total = _check_leaves(path, records, labels)
    if size != start + total:
        kind = "truncated" if size < start + total else "has trailing bytes"
        raise CheckpointError(f"{path}: {kind} ({size} bytes, the manifest describes {start + total})")
    return structure, records, dtypes, labels


# ---------------------------------------------------------------- load: the data


def _read_leaf(path, f, start, record, dtype, label):
    f.seek(start + record["offset"])
    data = bytearray(record["nbytes"])
    if f.readinto(data) != len(data):
        raise CheckpointError(f"{path}: truncated in leaf {label}")
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise CheckpointError(f"{path}: checksum mismatch in leaf {label} (the file is corrupted)")
    array = np.frombuffer(data, dtype=dtype).reshape(record["shape"])
    code = _bad_code_point(array)
    if code is not None:  # numpy holds it, but str(), .tolist() and printing fail on it
        raise CheckpointError(f"{path}: leaf {label} holds code point {code:#x}, which is not a Unicode character")
    if "key_impl" in record:
        try:
            return jax.random.wrap_key_data(jnp.asarray(array), impl=record["key_impl"])
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: leaf {label} is not a valid PRNG key ({e})") from None
    if dtype.kind in "US" or jax.dtypes.canonicalize_dtype(dtype) != dtype:
        return array  # JAX cannot hold it exactly (e.g. float64 without x64): numpy, as saved
    return jnp.asarray(array)


def _named_tuple(node):
    """purenet's own class for a named-tuple node, or None (resolved from _NAMED_TUPLES only)."""
    location = _NAMED_TUPLES.get(node["class"])
    if location is None:
        return None
    cls = getattr(importlib.import_module(location[0]), location[1])
    return cls if list(cls._fields) == node["fields"] else None


def _decode(node, leaves):
    kind = node["t"]
    if kind == "none":
        return None
    if kind == "leaf":
        return leaves[node["index"]]
    items = [_decode(item, leaves) for item in node["items"]]
    if kind == "dict":
        return dict(zip(node["keys"], items))
    if kind == "list":
        return items
    if kind == "tuple":
        return tuple(items)
    cls = _named_tuple(node)
    return dict(zip(node["fields"], items)) if cls is None else cls(*items)


def load(path: str | os.PathLike[str], like: Any = None) -> Any:
    """Read a checkpoint, verifying every checksum; never runs code the file names.

    Without `like`, containers are rebuilt as dicts, lists, tuples and None;
    named tuples as purenet's own state types when they are one (see
    _NAMED_TUPLES), else as dicts of their fields. With `like` (a tree of
    the expected structure, e.g. freshly initialised params), the result has
    like's exact structure; the file's key paths (dict keys, named-tuple
    field names, indices), shapes and saved dtypes must match, and a
    mismatch names the key path and both shapes or dtypes.

    Leaves JAX cannot hold exactly (float64/int64/uint64 without
    jax_enable_x64, strings) come back as numpy arrays of the saved dtype.

    Args:
        path: the checkpoint file.
        like: a tree of arrays of the expected structure, shapes and dtypes
            (e.g. freshly initialised params), or None to rebuild the saved
            structure.

    Returns:
        The saved tree: jax arrays (numpy where JAX cannot hold the dtype), in
            like's structure when `like` is given.

    Raises:
        CheckpointError: if the file is not a purenet checkpoint, is truncated,
            corrupted or malformed, or does not match `like` (key paths,
            shapes or dtypes).
        OSError: if the file cannot be read (FileNotFoundError if it does not exist).
    """
    structure, labels, leaves = _read(path)
    if like is None:
        return _decode(structure, leaves)
    return _conform_leaves(list(zip(labels, leaves)), like, where=os.fspath(path))


def load_entries(path: str | os.PathLike[str], likes: Mapping[str, Any]) -> dict[str, Any]:
    """Load a checkpoint whose root is a dict, each entry named in `likes` conformed to its like.

    The entries named in `likes` come back as load(like=likes[name]) would
    give them (an entry saved as None stays None), the others as load() would.

    Args:
        path: the checkpoint file.
        likes: {entry name: a tree of that entry's expected structure}.

    Returns:
        {entry name: entry}, every entry of the saved dict.

    Raises:
        CheckpointError: if the file's root is not a dict, the file cannot be
            trusted (as `load`), or an entry does not match its like.
        OSError: if the file cannot be read.
    """
    path = os.fspath(path)
    structure, _, leaves = _read(path)
    if structure["t"] != "dict":
        raise CheckpointError(f"{path}: expected a dict at the root, got a {structure['t']}")
    out = {}
    for name, node in zip(structure["keys"], structure["items"]):
        if name not in likes or node["t"] == "none":
            out[name] = _decode(node, leaves)
        else:
            pairs = [(keystr(key_path), leaves[i]) for key_path, i in _walk(path, node)]
            out[name] = _conform_leaves(pairs, likes[name], where=f"{path} {name}")
    return out


def _read(path):
    """(structure, each leaf's key path, leaves) of a verified checkpoint."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            manifest, start = _read_manifest(path, f, size)
            structure, records, dtypes, labels = _check_manifest(path, manifest, start, size)
        except RecursionError:
            raise CheckpointError(f"{path}: malformed manifest (nested too deeply)") from None
        leaves = [_read_leaf(path, f, start, r, d, label) for r, d, label in zip(records, dtypes, labels)]
    return structure, labels, leaves


def _dtype(x):
    """The dtype a leaf has (numpy's for numpy arrays: float64 stays float64 without x64)."""
    return x.dtype if hasattr(x, "dtype") else jnp.result_type(x)


def _named(path: str) -> str:
    """A key path with every identifier dict key written as a field (['m'] -> .m): a named tuple and a
    dict of the same names are one structure to `like` (Adam's slot was the dict {"m", "v"} before it
    was AdamState(m, v); checkpoints of either resume into the other)."""
    return re.sub(r"\['([A-Za-z_][A-Za-z0-9_]*)'\]", r".\1", path)


def _conform_leaves(pairs, like, where):
    """The leaves of `pairs` ((key path, leaf), ...) placed into like's structure, checked (errors name
    the paths as written: the file's for extra leaves, like's for the others)."""
    like_paths = _trees.by_path(like)
    saved = {_named(k): k for k, _ in pairs}
    expected = {_named(k): k for k in like_paths}
    by_path = {_named(k): v for k, v in pairs}
    wanted = {_named(k): v for k, v in like_paths.items()}
    m = _trees.first_mismatch(by_path, wanted, dtype=_dtype)
    if m is not None and m.kind == "paths":
        raise CheckpointError(f"{where} does not match the expected structure: missing leaves "
                              f"{[expected[k] for k in m.missing]}, extra leaves {[saved[k] for k in m.extra]}")
    if m is not None:
        raise CheckpointError(f"{where}: leaf {expected[m.path]} has {m.kind} {m.actual}, expected {m.expected}")
    out = [by_path[key] for key in wanted]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), out)


def conform(tree: Any, like: Any, where: str = "checkpoint") -> Any:
    """`tree` rebuilt with like's structure, after checking key paths, shapes and dtypes.

    Key paths are compared with dict keys and named-tuple fields of the same
    name as one (a slot saved as a dict fits its named tuple).

    Args:
        tree: the tree whose leaves to keep.
        like: a tree of the expected structure.
        where: what the error messages name as the tree's origin.

    Returns:
        `tree`'s leaves in like's structure.

    Raises:
        CheckpointError: if a key path is missing or extra, or a leaf's shape
            or dtype differs from like's.
    """
    pairs = [(keystr(p), v) for p, v in jax.tree_util.tree_leaves_with_path(tree)]
    return _conform_leaves(pairs, like, where)
