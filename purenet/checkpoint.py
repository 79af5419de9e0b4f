"""Checkpoints that never lose data: `save(path, tree)` and `load(path, like=None)`.

File format (version 1), all integers little-endian:

    b"PURENETCKPT1\\n"           13-byte magic, with the format version
    uint64  manifest length      n
    32 bytes                     SHA-256 of the manifest
    n bytes                      manifest: UTF-8 JSON
    data                         every leaf's raw bytes (C order), back to back

The manifest holds the tree's structure (dicts, lists, tuples, named tuples,
None) and, per leaf, its key path, shape, dtype, byte offset, length and
SHA-256. `load` checks the magic, the file length, the manifest's checksum
and every leaf's checksum, so a truncated or corrupted file is an error
naming what is wrong, never wrong values.

Writes go to a temporary file in the same directory, which is flushed and
fsync'ed, then renamed over the target with os.replace, and the directory
is fsync'ed: a crash at any point leaves either the old checkpoint or the
new one, whole.
"""
import hashlib
import importlib
import json
import os
import struct
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

MAGIC = b"PURENETCKPT1\n"
_HEADER = len(MAGIC) + 8 + 32


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted, or that does not fit `like`."""


# ---------------------------------------------------------------- structure <-> JSON


def _is_namedtuple(x):
    return isinstance(x, tuple) and hasattr(x, "_fields")


def _encode(tree, leaves):
    """JSON description of tree's containers; arrays go to `leaves`."""
    if tree is None:
        return {"t": "none"}
    if isinstance(tree, dict):
        if not all(isinstance(k, str) for k in tree):
            raise TypeError("checkpoint dicts need string keys")
        keys = sorted(tree)
        return {"t": "dict", "keys": keys, "items": [_encode(tree[k], leaves) for k in keys]}
    if _is_namedtuple(tree):
        cls = type(tree)
        return {"t": "namedtuple", "class": f"{cls.__module__}:{cls.__qualname__}",
                "fields": list(tree._fields), "items": [_encode(v, leaves) for v in tree]}
    if isinstance(tree, (tuple, list)):
        return {"t": type(tree).__name__, "items": [_encode(v, leaves) for v in tree]}
    leaves.append(tree)
    return {"t": "leaf", "index": len(leaves) - 1}


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
    if kind == "namedtuple":
        module, _, name = node["class"].partition(":")
        try:
            cls = getattr(importlib.import_module(module), name)
            return cls(*items)
        except (ImportError, AttributeError, TypeError):
            return dict(zip(node["fields"], items))  # the class is gone: keep the fields
    raise CheckpointError(f"unknown container type {kind!r} in manifest")


# ---------------------------------------------------------------- save


def _leaf_record(path, value):
    key_impl = None
    if isinstance(value, jax.Array) and jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
        key_impl = str(jax.random.key_impl(value))
        value = jax.random.key_data(value)
    array = np.asarray(value, order="C")
    if array.dtype == object:
        raise TypeError(f"checkpoint leaf {path} is not an array (got {type(value).__name__})")
    data = array.tobytes()
    record = {"path": path, "shape": list(array.shape), "dtype": array.dtype.name,
              "nbytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if key_impl is not None:
        record["key_impl"] = key_impl
    return record, data


def save(path, tree):
    """Write `tree` (a pytree of arrays) to `path` atomically; returns the path."""
    path = os.fspath(path)
    leaves = []
    structure = _encode(tree, leaves)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
    if len(paths) != len(leaves):
        raise TypeError("checkpoints hold dicts, lists, tuples, named tuples, None and arrays; "
                        "this tree has another container type")
    records, blobs, offset = [], [], 0
    for p, value in zip(paths, leaves):
        record, data = _leaf_record(p, value)
        record["offset"] = offset
        offset += len(data)
        records.append(record)
        blobs.append(data)
    manifest = json.dumps({"format": "purenet-checkpoint", "version": 1, "structure": structure,
                           "leaves": records}).encode()
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(manifest)) + hashlib.sha256(manifest).digest())
            f.write(manifest)
            for data in blobs:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)
    return path


def _fsync_directory(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- load


def _read_manifest(path, raw):
    if len(raw) < _HEADER:
        raise CheckpointError(f"{path}: truncated ({len(raw)} bytes is shorter than the header)")
    if raw[: len(MAGIC)] != MAGIC:
        raise CheckpointError(f"{path}: not a purenet checkpoint (bad magic bytes)")
    (length,) = struct.unpack("<Q", raw[len(MAGIC): len(MAGIC) + 8])
    digest = raw[len(MAGIC) + 8: _HEADER]
    manifest = raw[_HEADER: _HEADER + length]
    if len(manifest) != length:
        raise CheckpointError(f"{path}: truncated inside the manifest")
    if hashlib.sha256(manifest).digest() != digest:
        raise CheckpointError(f"{path}: manifest checksum mismatch (the file is corrupted)")
    return json.loads(manifest), _HEADER + length


def load(path, like=None):
    """Read a checkpoint, verifying every checksum.

    With `like` (a tree of the expected structure, e.g. freshly initialised
    params), the key paths, shapes and dtypes must match, and the result has
    like's exact structure; a mismatch names the key path and both shapes.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    manifest, start = _read_manifest(path, raw)
    records = manifest["leaves"]
    expected = start + sum(r["nbytes"] for r in records)
    if len(raw) != expected:
        kind = "truncated" if len(raw) < expected else "has trailing bytes"
        raise CheckpointError(f"{path}: {kind} ({len(raw)} bytes, the manifest describes {expected})")
    leaves = []
    for r in records:
        data = raw[start + r["offset"]: start + r["offset"] + r["nbytes"]]
        if hashlib.sha256(data).hexdigest() != r["sha256"]:
            raise CheckpointError(f"{path}: checksum mismatch in leaf {r['path']} (the file is corrupted)")
        array = np.frombuffer(data, dtype=jnp.dtype(r["dtype"])).reshape(r["shape"])
        value = jnp.asarray(array)
        if "key_impl" in r:
            value = jax.random.wrap_key_data(value, impl=r["key_impl"])
        leaves.append(value)
    tree = _decode(manifest["structure"], leaves)
    return tree if like is None else conform(tree, like, where=path)


def conform(tree, like, where="checkpoint"):
    """`tree` rebuilt with like's structure, after checking key paths, shapes and dtypes."""
    by_path = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}
    wanted = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(like)}
    missing, extra = sorted(set(wanted) - set(by_path)), sorted(set(by_path) - set(wanted))
    if missing or extra:
        raise CheckpointError(f"{where} does not match the expected structure: missing leaves {missing}, "
                              f"extra leaves {extra}")
    out = []
    for key, want in wanted.items():
        got = by_path[key]
        if jnp.shape(got) != jnp.shape(want):
            raise CheckpointError(f"{where}: leaf {key} has shape {jnp.shape(got)}, expected {jnp.shape(want)}")
        if jnp.result_type(got) != jnp.result_type(want):
            raise CheckpointError(f"{where}: leaf {key} has dtype {jnp.result_type(got)}, "
                                  f"expected {jnp.result_type(want)}")
        out.append(got)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), out)
