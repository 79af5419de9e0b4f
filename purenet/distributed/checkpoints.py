"""Sharded checkpoints: every process writes only its own shards; restore onto any mesh.

    pn.distributed.save_sharded(path, tree)                 # on every process, collectively
    tree = pn.distributed.load_sharded(path, like, shardings)   # shardings: any mesh (None: one device)

`path` is a directory:

    index.ckpt                  the tree's structure and global shapes, the dtypes, the save's id, the
                                process count, and which leaves are PRNG keys ({leaf: impl})
    shards-<id>-<p>.ckpt        process p's shards: for each leaf, the parts its devices hold
                                (one copy of each: a replicated part is written once, by its first holder)

Every file is a purenet checkpoint (`purenet.io.checkpoint`): checksummed,
written atomically, loaded without executing anything. A save writes its
shard files under a fresh id first, then (process 0, after every process
has written) the index that names that id, then removes older saves'
shard files: a crash at any point leaves the previous save or the new one
loadable, whole. `load_sharded` checks every file's checksums and that the
shards tile each leaf exactly once, so a missing, truncated or corrupted
shard file is a CheckpointError naming it, never wrong values. The arrays
come back bit-identical, on whatever mesh (or single device) `shardings`
names: each leaf is assembled from the saved parts on the host, then
placed with `jax.make_array_from_callback` (each process keeps its own part).

The leaves are those `pn.save` stores, and they come back as `pn.load`
returns them: arrays, Python and numpy scalars (as 0-d arrays), fixed-width
strings, typed PRNG keys (saved as their key data, rebuilt with their
implementation); None is structure. A leaf JAX cannot hold exactly
(float64, int64, uint64, complex128 without jax_enable_x64; strings) comes
back as a numpy array of the saved dtype, whatever `shardings` says. A leaf
pn.save refuses is refused here too, before any file is written.

The index is trusted no more than a shard file: before anything is
allocated, each leaf's shape must be at most 32 non-negative integers, its
dtype one checkpoints store, its bytes no more than the save's shard files
hold (and all leaves' together), the id 16 hex digits and the process count
a positive integer; else a CheckpointError names the leaf.
"""
import glob
import math
import os
import re
import secrets
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from purenet.io import checkpoint
from purenet.io.checkpoint import CheckpointError

__all__ = ["load_sharded", "save_sharded"]

INDEX = "index.ckpt"
_ID = re.compile(r"[0-9a-f]{16}")  # _save_id's 8 random bytes in hex


class _Leaf(NamedTuple):
    """A leaf as the index describes it (checked): key path, shape, dtype, PRNG key impl or None."""
    label: str
    shape: tuple[int, ...]
    dtype: np.dtype
    impl: str | None


def _shard_name(save_id: str, process: int) -> str:
    return f"shards-{save_id}-{process}.ckpt"


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _save_id() -> str:
    token = np.frombuffer(secrets.token_bytes(8), np.uint8)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        token = np.asarray(multihost_utils.broadcast_one_to_all(token))
    return bytes(token.astype(np.uint8)).hex()


def _host_leaf(label: str, leaf: Any) -> tuple[Any, str | None]:
    """(what is saved for `leaf`: a jax array or a numpy array, its PRNG key impl or None), refusing
    what `pn.save` refuses: a TypeError or ValueError naming the leaf."""
    impl = None
    if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        impl, leaf = str(jax.random.key_impl(leaf)), jax.random.key_data(leaf)
    elif not isinstance(leaf, jax.Array):
        leaf = np.asarray(leaf)
        if leaf.dtype == object:
            raise TypeError(f"sharded checkpoint leaf {label} is not an array (got {type(leaf).__name__})")
        code = checkpoint._bad_code_point(leaf)
        if code is not None:
            raise ValueError(f"sharded checkpoint leaf {label} holds code point {code:#x}, which is not a "
                             f"Unicode character")
    if checkpoint._dtype_name(np.dtype(leaf.dtype)) is None:
        raise TypeError(f"sharded checkpoint leaf {label} has dtype {leaf.dtype}, which checkpoints do not store "
                        f"(numbers, bool and fixed-width strings)")
    if leaf.ndim > checkpoint._MAX_NDIM:
        raise ValueError(f"sharded checkpoint leaf {label} has {leaf.ndim} dimensions, checkpoints hold at most "
                         f"{checkpoint._MAX_NDIM}")
    return leaf, impl


def _own_shards(leaf: Any) -> list[dict]:
    """The parts of `leaf` this process writes: each distinct part once (replica 0), with its start."""
    if not isinstance(leaf, jax.Array):  # a numpy array (_host_leaf's), the same on every process
        return [] if jax.process_index() else [{"start": np.zeros(leaf.ndim, np.int64), "data": leaf}]
    parts = []
    for shard in leaf.addressable_shards:
        if shard.replica_id != 0:
            continue
        start = [0 if s.start is None else s.start for s in shard.index] if shard.index else []
        parts.append({"start": np.asarray(start, np.int64).reshape(leaf.ndim), "data": np.asarray(shard.data)})
    return parts


def save_sharded(path: str | os.PathLike[str], tree: Any) -> str:
    """Save a tree of (sharded) arrays to directory `path`; every process calls it and writes its own shards.

    See the module docstring for the format, the leaves and the guarantees.
    Every leaf is checked before anything is written; older saves' shard
    files in `path` are removed once the new index is written.

    Args:
        path: the checkpoint directory (created if missing).
        tree: a pytree of arrays (sharded `jax.Array`s, numpy arrays, scalars,
            fixed-width strings, typed PRNG keys); None is structure.

    Returns:
        The save's id, 16 hexadecimal digits (it names the shard files).

    Raises:
        TypeError: if a leaf is not an array or has a dtype checkpoints do not store.
        ValueError: if a leaf has more than 32 dimensions or a string leaf
            holds a code point that is not a Unicode character.
        OSError: if a file cannot be written.
    """
    path = os.fspath(path)
    labelled, treedef = jax.tree_util.tree_flatten_with_path(tree)
    leaves, impls = [], {}
    for i, (key_path, leaf) in enumerate(labelled):  # every leaf checked before anything is written
        leaf, impl = _host_leaf(jax.tree_util.keystr(key_path), leaf)
        leaves.append(leaf)
        if impl is not None:
            impls[str(i)] = impl
    os.makedirs(path, exist_ok=True)
    save_id = _save_id()
    own = {str(i): parts for i, leaf in enumerate(leaves) if (parts := _own_shards(leaf))}
    checkpoint.save(os.path.join(path, _shard_name(save_id, jax.process_index())), {"id": save_id, "shards": own})
    _sync(f"purenet-save-shards-{save_id}")
    if jax.process_index() == 0:
        shapes = jax.tree_util.tree_unflatten(treedef, [np.asarray(v.shape, np.int64) for v in leaves])
        dtypes = [checkpoint._dtype_name(np.dtype(v.dtype)) for v in leaves]
        checkpoint.save(os.path.join(path, INDEX), {"id": save_id, "processes": jax.process_count(),
                                                    "shapes": shapes, "dtypes": dtypes, "keys": impls})
    _sync(f"purenet-save-index-{save_id}")
    for old in glob.glob(os.path.join(path, f"shards-*-{jax.process_index()}.ckpt")):
        if os.path.basename(old) != _shard_name(save_id, jax.process_index()):
            os.remove(old)
    return save_id


def _text(value: Any) -> str | None:
    """A string the index holds (a 0-d string array after pn.load), or None."""
    value = np.asarray(value) if isinstance(value, (str, np.ndarray)) else None
    return str(value) if value is not None and value.ndim == 0 and value.dtype.kind == "U" else None


def _index_leaves(where: str, index: dict) -> tuple[str, int, list[_Leaf]]:
    """(id, process count, each leaf) of an index, every field checked; nothing is allocated."""
    save_id, processes = _text(index["id"]), np.asarray(index["processes"])
    if save_id is None or not _ID.fullmatch(save_id):
        raise CheckpointError(f"{where}: the save's id must be 16 hexadecimal digits, got {save_id or index['id']!r}")
    if processes.ndim or processes.dtype.kind not in "iu" or processes < 1:
        raise CheckpointError(f"{where}: processes must be a positive integer, got {processes.tolist()!r}")
    labelled = jax.tree_util.tree_leaves_with_path(index["shapes"])
    dtypes, impls = index["dtypes"], index.get("keys", {})
    if not isinstance(dtypes, list) or len(dtypes) != len(labelled):
        raise CheckpointError(f"{where} is malformed: {len(labelled)} shapes but dtypes {dtypes!r:.100}")
    if not isinstance(impls, dict) or not all(k.isdigit() and int(k) < len(labelled) for k in impls):
        raise CheckpointError(f"{where} is malformed: keys must map leaf numbers to PRNG implementations")
    leaves = []
    for i, ((key_path, shape), name) in enumerate(zip(labelled, dtypes)):
        label = jax.tree_util.keystr(key_path)
        shape = np.asarray(shape)
        if shape.ndim != 1 or shape.dtype.kind not in "iu" or len(shape) > checkpoint._MAX_NDIM or (shape < 0).any():
            raise CheckpointError(f"{where}: leaf {label} has shape {shape.tolist()}, not a list of at most "
                                  f"{checkpoint._MAX_NDIM} non-negative integers")
        dtype = checkpoint._parse_dtype(_text(name))
        if dtype is None:
            raise CheckpointError(f"{where}: leaf {label} has unknown dtype {_text(name) or name!r}")
        dims = tuple(int(n) for n in shape)
        if math.prod(n for n in dims if n) * dtype.itemsize > checkpoint._MAX_BYTES:
            raise CheckpointError(f"{where}: leaf {label} has shape {list(dims)}, too large for any array")
        impl = _text(impls[str(i)]) if str(i) in impls else None
        if str(i) in impls and (impl is None or dtype != np.uint32):
            raise CheckpointError(f"{where}: leaf {label} is a PRNG key of dtype {dtype} (implementation "
                                  f"{impls[str(i)]!r}); key data are uint32")
        leaves.append(_Leaf(label, dims, dtype, impl))
    return save_id, int(processes), leaves


def _shard_files(path: str, save_id: str, processes: int, leaves: list[_Leaf]) -> list[str]:
    """Each process's shard file, checked to exist and to hold at least the bytes the index claims."""
    names, held = [], 0
    for p in range(processes):
        name = os.path.join(path, _shard_name(save_id, p))
        if not os.path.exists(name):
            raise CheckpointError(f"{name} is missing: the sharded checkpoint {path} needs the shard file of "
                                  f"each of its {processes} processes")
        names.append(name)
        held += os.path.getsize(name)
    total = 0
    for leaf in leaves:
        nbytes = math.prod(leaf.shape) * leaf.dtype.itemsize
        total += nbytes
        if nbytes > held or total > held:
            what = "," if nbytes > held else ", with the leaves before it,"
            raise CheckpointError(f"{path}/{INDEX}: leaf {leaf.label} has shape {list(leaf.shape)} and dtype "
                                  f"{leaf.dtype} ({nbytes} bytes){what} more than the {held} bytes the shard "
                                  f"files hold")
    return names


def _assemble(path: str, index: dict) -> tuple[list[_Leaf], list[np.ndarray]]:
    """The leaves the index describes and their values, assembled on the host from every shard file."""
    save_id, processes, leaves = _index_leaves(f"{path}/{INDEX}", index)
    names = _shard_files(path, save_id, processes, leaves)
    out = [np.zeros(leaf.shape, leaf.dtype) for leaf in leaves]
    covered = [np.zeros(leaf.shape, np.int8) for leaf in leaves]
    for name in names:
        part = checkpoint.load(name)  # checks magic, length and every checksum
        if not isinstance(part, dict) or _text(part.get("id")) != save_id or not isinstance(part.get("shards"), dict):
            raise CheckpointError(f"{name} belongs to another save than {path}/{INDEX}")
        for key, shards in part["shards"].items():
            if not str(key).isdigit() or int(key) >= len(out) or not isinstance(shards, list):
                raise CheckpointError(f"{name} holds shards of a leaf {key!r} the index does not have")
            i, leaf = int(key), leaves[int(key)]
            for shard in shards:
                if not isinstance(shard, dict) or not {"data", "start"} <= set(shard):
                    raise CheckpointError(f"{name}: a shard of leaf {leaf.label} is not {{data, start}}")
                data, start = np.asarray(shard["data"]), np.asarray(shard["start"]).reshape(-1).tolist()
                if data.dtype != leaf.dtype or len(start) != len(leaf.shape) or any(
                        type(s) is not int or s < 0 or s + n > m for s, n, m in zip(start, data.shape, leaf.shape)):
                    raise CheckpointError(f"{name}: a shard of leaf {leaf.label} does not fit its shape "
                                          f"{list(leaf.shape)} and dtype {leaf.dtype}")
                where = tuple(slice(s, s + n) for s, n in zip(start, data.shape))
                out[i][where] = data
                covered[i][where] += 1
    for leaf, c in zip(leaves, covered):
        if c.size and (c.min() != 1 or c.max() != 1):
            raise CheckpointError(f"{path}: the shards of leaf {leaf.label} do not cover it exactly once (a shard "
                                  f"file is from another save or was tampered with)")
    return leaves, out


def _value(path: str, leaf: _Leaf, data: np.ndarray) -> Any:
    """An assembled leaf as pn.load returns it: a PRNG key rebuilt (on the default device), numpy
    where JAX cannot hold the dtype exactly, else the numpy array (placed later)."""
    if leaf.impl is None:
        return data
    try:
        return jax.random.wrap_key_data(jnp.asarray(data), impl=leaf.impl)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: leaf {leaf.label} is not a valid PRNG key ({e})") from None


def _host_only(value: Any) -> bool:
    """Whether JAX cannot hold `value` exactly (strings; 64-bit without x64): it stays numpy, as pn.load's."""
    return isinstance(value, np.ndarray) and (
        value.dtype.kind in "US" or jax.dtypes.canonicalize_dtype(value.dtype) != value.dtype)


def load_sharded(path: str | os.PathLike[str], like: Any = None, shardings: Any = None) -> Any:
    """The tree saved by `save_sharded`, bit-identical, placed with `shardings`.

    The mesh of `shardings` may have any shape, unrelated to the one that
    saved. Leaves JAX cannot hold exactly stay numpy arrays (the module
    docstring).

    Args:
        path: the checkpoint directory `save_sharded` wrote.
        like: a tree of the expected structure (key paths, shapes and dtypes
            are checked, as `purenet.io.checkpoint.load(like=)` does); None
            rebuilds the saved structure.
        shardings: one `jax.sharding.Sharding` for every leaf, a tree of them
            like the result, or None (arrays on the default device).

    Returns:
        The saved tree (the structure of `like` when given), each leaf a
            `jax.Array` placed with its sharding (a PRNG key rebuilt with its
            implementation), or a numpy array where JAX cannot hold its dtype.

    Raises:
        CheckpointError: if the index or a shard file is missing, corrupt,
            truncated, from another save or malformed, the shards do not tile a
            leaf exactly once, or the tree does not match `like`.
        ValueError: if `shardings` is a tree with another number of leaves
            than the checkpoint.
    """
    path = os.fspath(path)
    index_name = os.path.join(path, INDEX)
    if not os.path.exists(index_name):
        raise CheckpointError(f"{index_name} is missing: {path} is not a sharded checkpoint "
                              f"(write one with pn.distributed.save_sharded)")
    index = checkpoint.load(index_name)
    if not isinstance(index, dict) or not {"id", "processes", "shapes", "dtypes"} <= set(index):
        raise CheckpointError(f"{index_name} is not the index of a sharded checkpoint")
    described, data = _assemble(path, index)
    leaves = [_value(path, leaf, d) for leaf, d in zip(described, data)]
    treedef = jax.tree_util.tree_structure(index["shapes"])
    if like is not None:
        wanted, treedef = jax.tree_util.tree_flatten(like)
        if len(wanted) != len(leaves):
            raise CheckpointError(f"{path} holds {len(leaves)} arrays, like has {len(wanted)} leaves")
        for leaf, w, v in zip(described, wanted, leaves):
            if tuple(np.shape(w)) != v.shape or getattr(w, "dtype", v.dtype) != v.dtype:
                raise CheckpointError(f"{path}: leaf {leaf.label} is {v.dtype}{list(v.shape)} in the checkpoint, "
                                      f"like has {getattr(w, 'dtype', v.dtype)}{list(np.shape(w))}")
    if shardings is None:
        placed = [v if _host_only(v) else jax.device_put(v) for v in leaves]
    else:
        if isinstance(shardings, jax.sharding.Sharding):
            per_leaf = [shardings] * len(leaves)
        else:
            per_leaf = jax.tree_util.tree_leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
        if len(per_leaf) != len(leaves):
            raise ValueError(f"shardings has {len(per_leaf)} leaves, the checkpoint {len(leaves)}; pass one "
                             f"Sharding or a tree of them like the result")
        placed = [v if _host_only(v) else _placed(v, s) for v, s in zip(leaves, per_leaf)]
    return jax.tree_util.tree_unflatten(treedef, placed)


def _placed(value: Any, sharding: Any) -> jax.Array:
    """`value` (whole, on the host, or a PRNG key on the default device) as a global array with
    `sharding`: each device takes its slice."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


