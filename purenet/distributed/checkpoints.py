"""Sharded checkpoints: every process writes only its own shards; restore onto any mesh.

    pn.distributed.save_sharded(path, tree)                 # on every process, collectively
    tree = pn.distributed.load_sharded(path, like, shardings)   # shardings: any mesh (None: one device)

`path` is a directory:

    index.ckpt                  the tree's structure and global shapes, the save's id, the process count
    shards-<id>-<p>.ckpt        process p's shards: for each leaf, the parts its devices hold
                                (one copy of each: a replicated part is written once, by its first holder)

Every file is a purenet checkpoint (`purenet.checkpoint`): checksummed,
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
"""
import glob
import os
import secrets
from typing import Any

import jax
import numpy as np

from purenet import checkpoint
from purenet.checkpoint import CheckpointError

__all__ = ["load_sharded", "save_sharded"]

INDEX = "index.ckpt"


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


def _own_shards(leaf: Any) -> list[dict]:
    """The parts of `leaf` this process writes: each distinct part once (replica 0), with its start."""
    if not isinstance(leaf, jax.Array):
        leaf = np.asarray(leaf)
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

    Returns the save's id. See the module docstring for the format and the guarantees.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    leaves = jax.tree_util.tree_leaves(tree)
    save_id = _save_id()
    own = {str(i): parts for i, leaf in enumerate(leaves) if (parts := _own_shards(leaf))}
    checkpoint.save(os.path.join(path, _shard_name(save_id, jax.process_index())), {"id": save_id, "shards": own})
    _sync(f"purenet-save-shards-{save_id}")
    if jax.process_index() == 0:
        shapes = jax.tree_util.tree_map(lambda v: np.asarray(np.shape(v), np.int64), tree)
        dtypes = [np.dtype(v.dtype).name for v in leaves]
        checkpoint.save(os.path.join(path, INDEX), {"id": save_id, "processes": jax.process_count(),
                                                    "shapes": shapes, "dtypes": dtypes})
    _sync(f"purenet-save-index-{save_id}")
    for old in glob.glob(os.path.join(path, f"shards-*-{jax.process_index()}.ckpt")):
        if os.path.basename(old) != _shard_name(save_id, jax.process_index()):
            os.remove(old)
    return save_id


def _assemble(path: str, index: dict) -> list[np.ndarray]:
    shapes = [tuple(int(n) for n in s) for s in jax.tree_util.tree_leaves(index["shapes"])]
    dtypes = [np.dtype(jax.numpy.dtype(str(d))) for d in index["dtypes"]]
    if len(shapes) != len(dtypes):
        raise CheckpointError(f"{path}/{INDEX} is malformed: {len(shapes)} shapes but {len(dtypes)} dtypes")
    out = [np.zeros(s, d) for s, d in zip(shapes, dtypes)]
    covered = [np.zeros(s, np.int8) for s in shapes]
    for p in range(int(index["processes"])):
        name = os.path.join(path, _shard_name(str(index["id"]), p))
        if not os.path.exists(name):
            raise CheckpointError(f"{name} is missing: the sharded checkpoint {path} needs the shard file of "
                                  f"each of its {int(index['processes'])} processes")
        part = checkpoint.load(name)  # checks magic, length and every checksum
        if str(part.get("id")) != str(index["id"]):
            raise CheckpointError(f"{name} belongs to another save than {path}/{INDEX}")
        for key, shards in part.get("shards", {}).items():
            if not str(key).isdigit() or int(key) >= len(out):
                raise CheckpointError(f"{name} holds shards of a leaf {key!r} the index does not have")
            i = int(key)
            for shard in shards:
                data, start = np.asarray(shard["data"]), [int(s) for s in np.asarray(shard["start"])]
                if data.dtype != dtypes[i] or len(start) != len(shapes[i]) or any(
                        s < 0 or s + n > m for s, n, m in zip(start, data.shape, shapes[i])):
                    raise CheckpointError(f"{name}: a shard of leaf {i} does not fit its shape {shapes[i]} "
                                          f"and dtype {dtypes[i]}")
                where = tuple(slice(s, s + n) for s, n in zip(start, data.shape))
                out[i][where] = data
                covered[i][where] += 1
    for i, c in enumerate(covered):
        if c.size and (c.min() != 1 or c.max() != 1):
            raise CheckpointError(f"{path}: the shards of leaf {i} do not cover it exactly once (a shard file "
                                  f"is from another save or was tampered with)")
    return out


def load_sharded(path: str | os.PathLike[str], like: Any = None, shardings: Any = None) -> Any:
    """The tree saved by `save_sharded`, bit-identical, placed with `shardings`.

    like: a tree of the expected structure (key paths, shapes and dtypes are
    checked, as `purenet.checkpoint.load(like=)` does); None rebuilds the
    saved structure. shardings: one `jax.sharding.Sharding` for every leaf,
    a tree of them like the result, or None (arrays on the default device):
    the mesh may have any shape, unrelated to the one that saved.
    """
    path = os.fspath(path)
    index_name = os.path.join(path, INDEX)
    if not os.path.exists(index_name):
        raise CheckpointError(f"{index_name} is missing: {path} is not a sharded checkpoint "
                              f"(write one with pn.distributed.save_sharded)")
    index = checkpoint.load(index_name)
    if not {"id", "processes", "shapes", "dtypes"} <= set(index):
        raise CheckpointError(f"{index_name} is not the index of a sharded checkpoint")
    leaves = _assemble(path, index)
    treedef = jax.tree_util.tree_structure(index["shapes"])
    if like is not None:
        wanted, treedef = jax.tree_util.tree_flatten(like)
        if len(wanted) != len(leaves):
            raise CheckpointError(f"{path} holds {len(leaves)} arrays, like has {len(wanted)} leaves")
        for i, (w, v) in enumerate(zip(wanted, leaves)):
            if tuple(np.shape(w)) != v.shape or np.dtype(getattr(w, "dtype", v.dtype)) != v.dtype:
                raise CheckpointError(f"{path}: leaf {i} is {v.dtype}{list(v.shape)} in the checkpoint, like has "
                                      f"{np.dtype(w.dtype)}{list(np.shape(w))}")
    if shardings is None:
        placed = [jax.device_put(v) for v in leaves]
    else:
        if isinstance(shardings, jax.sharding.Sharding):
            per_leaf = [shardings] * len(leaves)
        else:
            per_leaf = jax.tree_util.tree_leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
        if len(per_leaf) != len(leaves):
            raise ValueError(f"shardings has {len(per_leaf)} leaves, the checkpoint {len(leaves)}; pass one "
                             f"Sharding or a tree of them like the result")
        placed = [_placed(v, s) for v, s in zip(leaves, per_leaf)]
    return jax.tree_util.tree_unflatten(treedef, placed)


def _placed(value: Any, sharding: Any) -> jax.Array:
    """`value` (whole, on the host) as a global array with `sharding`: each device takes its slice."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


