"""safetensors files, written and read without the `safetensors` package (`pn.weights` re-exports these).

    pn.weights.save_safetensors(path, params, metadata=None)    # a file the `safetensors` library reads
    params = pn.weights.load_safetensors(path, like)            # and back, exactly (like=None: {name: array})

The safetensors format (written and read here without the `safetensors`
package, which the tests use as the reference; all integers little-endian):

    uint64  n                     the header's length in bytes
    n bytes header                UTF-8 JSON object, padded with spaces to a multiple of 8 bytes:
                                  {"__metadata__": {str: str, ...},            (optional)
                                   name: {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...}
    data                          each tensor's raw bytes (C order, little-endian), back to back;
                                  offsets count from the start of the data

dtypes: F64 F32 F16 BF16 C64 I64 I32 I16 I8 U64 U32 U16 U8 BOOL, and the
float8s F8_E5M2, F8_E4M3 (ml_dtypes' float8_e4m3fn), F8_E4M3FNUZ,
F8_E5M2FNUZ, F8_E8M0 (float8_e8m0fnu). Other dtypes (complex128, int4,
float4, strings, PRNG keys) have no safetensors name, and saving them is a
TypeError naming the leaf.

The name rule (stable: files written today load tomorrow). A tensor's name
is its key path in the tree, the keys joined with ".": a dict key as it is
(keys must be strings), a list or tuple index as its decimal number, a
named-tuple field by its name. So pn.gpt's params `(gpt, softmax)` have
"0.token.E", "0.body.0.P", "0.body.1.0.1.Wq" (the first block's attention),
and a flat dict {"transformer.wte.weight": w} keeps its keys as names.
`flatten(tree)` lists them. Two leaves with one name, an empty name (a bare
array as the tree) and the reserved `"__metadata__"` are errors.

Tensors are written in order of decreasing item size (tree order among
equal sizes), so each tensor starts at a multiple of its item size (the
header's length is a multiple of 8). Writes are atomic, as `pn.save`'s:
a temporary file beside the target, flushed and fsync'ed, `os.replace`d
over it, and the directory fsync'ed (purenet.io.checkpoint's helpers).

Loading executes nothing the file names (JSON and raw bytes only) and
validates the whole header before reading any tensor: the 8-byte length
against a bound (100,000,000 bytes, the `safetensors` library's) and the
file size, UTF-8 JSON that is an object starting with "{" without
duplicate names, `"__metadata__"` a str -> str object, each entry exactly
{"dtype", "shape", "data_offsets"} with a known dtype, a shape of at most
32 non-negative integers, offsets [begin, end] with end - begin =
prod(shape) * itemsize, and the ranges, sorted, contiguous from 0 to the
end of the file (no gap, no overlap, nothing past the end). BOOL bytes
must be 0 or 1. With `like`, the file's names, shapes and dtypes must
equal like's, checked before any data are read; any failure is a
`WeightsError` naming the file and the tensor. `WeightsError` subclasses
`pn.CheckpointError` (itself a ValueError): code that guards loads with
`except pn.CheckpointError` covers weight files too, and the subclass
tells them apart.

Values come back exactly as saved, as `pn.load` returns them: with `like`
a jax array where JAX holds the dtype exactly, else (float64, int64,
uint64 without jax_enable_x64) a numpy array of the saved dtype;
without `like` a dict {name: numpy array} in the file's header order.

Values of torch tensors are converted with .detach().cpu().numpy() (torch
is never imported here; bfloat16 and float8 tensors bit for bit through an
integer view).
"""
import json
import math
import os
import struct
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

from purenet.io.checkpoint import CheckpointError, write_atomically

__all__ = ["WeightsError", "flatten", "load_safetensors", "safetensors_metadata", "save_safetensors"]

PyTree = Any

MAX_HEADER = 100_000_000  # the `safetensors` library's bound on the header's length
_MAX_NDIM = 32  # as purenet checkpoints: numpy 1.x's limit
_MAX_BYTES = np.iinfo(np.intp).max

# safetensors' dtype names -> dtypes (ml_dtypes for bfloat16 and the float8s)
_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16), "I16": np.dtype(np.int16), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "U32": np.dtype(np.uint32), "I32": np.dtype(np.int32),
    "F32": np.dtype(np.float32), "C64": np.dtype(np.complex64), "F64": np.dtype(np.float64),
    "U64": np.dtype(np.uint64), "I64": np.dtype(np.int64),
}
for _name, _ml in (("F8_E5M2", "float8_e5m2"), ("F8_E4M3", "float8_e4m3fn"), ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
                   ("F8_E5M2FNUZ", "float8_e5m2fnuz"), ("F8_E8M0", "float8_e8m0fnu")):
    if hasattr(ml_dtypes, _ml):  # an older ml_dtypes may lack one
        _DTYPES[_name] = np.dtype(getattr(ml_dtypes, _ml))
del _name, _ml
_NAMES: dict[np.dtype, str] = {dtype: name for name, dtype in _DTYPES.items()}


class WeightsError(CheckpointError):
    """A weights file (safetensors) or state_dict that cannot be trusted or does not fit what it should fill.

    A subclass of `pn.CheckpointError`, itself a ValueError."""


# ---------------------------------------------------------------- names and values


def _key_name(key: Any) -> str:
    if isinstance(key, DictKey):
        if not isinstance(key.key, str):
            raise TypeError(f"weights need string dict keys, got {key.key!r}")
        return key.key
    if isinstance(key, SequenceKey):
        return str(key.idx)
    if isinstance(key, GetAttrKey):
        return key.name
    if isinstance(key, FlattenedIndexKey):
        return str(key.key)
    raise TypeError(f"weights cannot name the tree key {key!r}")  # pragma: no cover - jax's key types above


def _to_numpy(value: Any) -> np.ndarray:
    """A numpy array of value's exact bits: torch tensors via .detach().cpu().numpy() (bfloat16 and
    float8 through an integer view, as numpy has no such dtypes), everything else via np.asarray."""
    if isinstance(value, jax.Array) and jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
        raise TypeError("a PRNG key is not a tensor (save jax.random.key_data(key) instead)")
    if all(hasattr(value, a) for a in ("detach", "cpu", "numpy")):  # a torch tensor, duck-typed
        tensor = value.detach().cpu()
        exotic = str(tensor.dtype).removeprefix("torch.")
        if exotic == "bfloat16" or exotic.startswith("float8"):
            import torch  # only ever for torch tensors
            if not hasattr(ml_dtypes, exotic):
                raise TypeError(f"torch dtype {tensor.dtype} has no numpy counterpart here")
            bits = torch.int16 if tensor.element_size() == 2 else torch.uint8
            return tensor.contiguous().view(bits).numpy().view(getattr(ml_dtypes, exotic))
        return tensor.numpy()
    return np.asarray(value)


def flatten(tree: PyTree) -> dict[str, Any]:
    """{name: leaf} in tree order, each name the leaf's key path joined with "." (the module docstring's rule).

    Args:
        tree: a tree (dicts with string keys, lists, tuples, named tuples) of arrays.

    Returns:
        {name: leaf}, the leaves themselves (not copied), in tree order.

    Raises:
        TypeError: if a dict key is not a string, or the tree is a bare array (an empty name).
        ValueError: if two leaves get one name, or a name is the reserved `"__metadata__"`.
    """
    out: dict[str, Any] = {}
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        name = ".".join(_key_name(k) for k in key_path)
        if not name:
            raise TypeError("weights need a tree (dict, list or tuple) of arrays, not a bare array")
        if name == "__metadata__":
            raise ValueError("the tensor name '__metadata__' is reserved by the safetensors format")
        if name in out:
            raise ValueError(f"two leaves have the tensor name {name!r} (a dict key with a '.' "
                             f"collides with a nested path)")
        out[name] = leaf
    return out


def _little_endian(array: np.ndarray) -> np.ndarray:
    array = array if array.flags.c_contiguous else array.copy(order="C")  # (ascontiguousarray makes 0-d 1-d)
    return array.astype(array.dtype.newbyteorder("<")) if array.dtype.byteorder == ">" else array


# ---------------------------------------------------------------- save


def save_safetensors(path: str | os.PathLike[str], params: PyTree,
                     metadata: Mapping[str, str] | None = None) -> str:
    """Write `params` (a tree of arrays: jax, numpy or torch) as a safetensors file, atomically; returns the path.

    Names follow the module docstring's rule; `metadata` (str -> str) is stored as `"__metadata__"`
    (read it back with `safetensors_metadata`). A dtype safetensors cannot name is a TypeError naming
    the leaf, raised before anything is written.

    Args:
        path: the file to write (replaced atomically if it exists).
        params: a tree of arrays (jax, numpy or torch tensors).
        metadata: {str: str} to store in the header, or None.

    Returns:
        The path written, as a str.

    Raises:
        TypeError: if metadata is not a str -> str mapping, a leaf has a dtype safetensors
            cannot name (or is a PRNG key), a dict key is not a string, or params is a bare
            array.
        ValueError: if two leaves get one name or one is named `"__metadata__"`, a tensor has
            more than 32 dimensions, or the header would exceed 100,000,000 bytes.
    """
    path = os.fspath(path)
    if metadata is not None and (not isinstance(metadata, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise TypeError("safetensors metadata must map strings to strings")
    tensors = []
    for name, leaf in flatten(params).items():
        try:
            array = _little_endian(_to_numpy(leaf))
        except TypeError as e:
            raise TypeError(f"tensor {name}: {e}") from None
        if array.dtype not in _NAMES:
            raise TypeError(f"tensor {name} has dtype {array.dtype}, which safetensors cannot hold "
                            f"(its dtypes: {', '.join(str(d) for d in _NAMES)})")
        if array.ndim > _MAX_NDIM:
            raise ValueError(f"tensor {name} has {array.ndim} dimensions; at most {_MAX_NDIM} load")
        tensors.append((name, array))
    tensors.sort(key=lambda t: -t[1].dtype.itemsize)  # stable: tree order among equal item sizes
    header: dict[str, Any] = {} if metadata is None else {"__metadata__": dict(metadata)}
    offset = 0
    for name, array in tensors:
        header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    if len(text) > MAX_HEADER:
        raise ValueError(f"the header would be {len(text)} bytes, more than the {MAX_HEADER} readers accept")

    def write(f):
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _, array in tensors:
            f.write(array.reshape(-1).view(np.uint8).data)  # the bytes, without a copy

    return write_atomically(path, write)


# ---------------------------------------------------------------- load: the header


def _bad(path: str, what: str) -> WeightsError:
    return WeightsError(f"{path}: not a valid safetensors file: {what}")


def _unique_pairs(path: str) -> Callable[[list], dict]:
    def hook(pairs: list) -> dict:
        seen: dict = {}
        for k, v in pairs:
            if k in seen:
                raise _bad(path, f"the header names {k!r} twice")
            seen[k] = v
        return seen
    return hook


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


class _Entry:
    __slots__ = ("name", "dtype", "shape", "begin", "end")

    def __init__(self, name: str, dtype: np.dtype, shape: tuple[int, ...], begin: int, end: int) -> None:
        self.name, self.dtype, self.shape, self.begin, self.end = name, dtype, shape, begin, end


def _check_entry(path: str, name: str, info: Any) -> _Entry:
    where = f"tensor {name!r}"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(path, f"{where} is not a valid Unicode name") from None
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        keys = sorted(info) if isinstance(info, dict) else type(info).__name__
        raise _bad(path, f"{where} must be an object with exactly dtype, shape and data_offsets, got {keys}")
    dtype = _DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise _bad(path, f"{where} has unknown dtype {info['dtype']!r} (known: {', '.join(_DTYPES)})")
    shape = info["shape"]
    if not isinstance(shape, list) or len(shape) > _MAX_NDIM or not all(type(d) is int and d >= 0 for d in shape):
        raise _bad(path, f"{where} has shape {shape!r}, not a list of at most {_MAX_NDIM} non-negative integers")
    if math.prod(d for d in shape if d) * dtype.itemsize > _MAX_BYTES:
        raise _bad(path, f"{where} has shape {shape}, too large for any array")
    offsets = info["data_offsets"]
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise _bad(path, f"{where} has data_offsets {offsets!r}, not [begin, end] with 0 <= begin <= end")
    nbytes = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise _bad(path, f"{where} has data_offsets {offsets} ({offsets[1] - offsets[0]} bytes), but its shape "
                         f"{shape} and dtype {info['dtype']} need {nbytes} bytes")
    return _Entry(name, dtype, tuple(shape), offsets[0], offsets[1])


def _read_header(path: str, f: Any, size: int) -> tuple[list[_Entry], dict[str, str] | None, int]:
    """(entries in header order, metadata, where the data start); reads the 8 + n header bytes only."""
    if size < 8:
        raise _bad(path, f"{size} bytes is shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > MAX_HEADER:
        raise _bad(path, f"the header claims {n} bytes, more than the {MAX_HEADER} this reader accepts")
    if n > size - 8:
        raise _bad(path, f"truncated: the header claims {n} bytes, the file has {size - 8} after the length")
    raw = f.read(n)
    if len(raw) != n:  # pragma: no cover - the file shrank while being read
        raise _bad(path, "truncated inside the header")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad(path, "the header is not UTF-8") from None
    if not text.startswith("{"):
        raise _bad(path, "the header does not start with '{'")
    try:
        header = json.loads(text, object_pairs_hook=_unique_pairs(path), parse_constant=_no_constant)
    except WeightsError:
        raise
    except (ValueError, RecursionError) as e:
        raise _bad(path, f"the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise _bad(path, "the header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and (not isinstance(metadata, dict) or not all(
            isinstance(v, str) for v in metadata.values())):
        raise _bad(path, "__metadata__ must be an object of strings")
    entries = [_check_entry(path, name, info) for name, info in header.items()]
    end = 0
    for entry in sorted(entries, key=lambda t: (t.begin, t.end)):
        if entry.begin != end:
            kind = ("overlaps the previous tensor" if entry.begin < end
                    else f"leaves a gap of {entry.begin - end} bytes")
            raise _bad(path, f"tensor {entry.name!r} starts at data offset {entry.begin}, expected {end}: it {kind}")
        end = entry.end
    if end != size - 8 - n:
        kind = "truncated" if end > size - 8 - n else "has trailing bytes"
        raise _bad(path, f"{kind}: the header describes {end} data bytes, the file holds {size - 8 - n}")
    return entries, metadata, 8 + n


def _read_tensor(path: str, f: Any, start: int, e: _Entry) -> np.ndarray:
    f.seek(start + e.begin)
    data = bytearray(e.end - e.begin)
    if f.readinto(data) != len(data):  # pragma: no cover - the file shrank while being read
        raise _bad(path, f"truncated in tensor {e.name!r}")
    if e.dtype == np.bool_ and data and np.frombuffer(data, np.uint8).max() > 1:
        raise _bad(path, f"BOOL tensor {e.name!r} holds a byte other than 0 and 1")
    array = np.frombuffer(data, dtype=e.dtype.newbyteorder("<")).reshape(e.shape)
    return array if array.dtype.isnative else array.astype(e.dtype.newbyteorder("="))


def safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """A safetensors file's `"__metadata__"` ({} when it has none); reads and validates the header only.

    Args:
        path: the safetensors file.

    Returns:
        {str: str}, the header's `"__metadata__"` ({} when it has none).

    Raises:
        WeightsError: if the header is not valid (see the module docstring).
        OSError: if the file cannot be read.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        _, metadata, _ = _read_header(path, f, os.fstat(f.fileno()).st_size)
    return dict(metadata or {})


def _shape_dtype(leaf: Any) -> tuple[tuple[int, ...], np.dtype]:
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):  # arrays, jax.ShapeDtypeStruct
        return tuple(leaf.shape), np.dtype(leaf.dtype)
    return np.shape(leaf), np.result_type(leaf)


def load_safetensors(path: str | os.PathLike[str], like: PyTree = None) -> Any:
    """Read a safetensors file (ours or anyone's); executes nothing, validates the whole header first.

    With `like` (e.g. freshly initialised params, or jax.eval_shape of them) the result has like's
    structure; the file must hold exactly like's tensor names (the module docstring's rule), each
    with like's shape and dtype, or a WeightsError names every missing and extra tensor, or the
    tensor and both shapes / dtypes. Without it: {name: numpy array} in the file's order.

    Args:
        path: the safetensors file.
        like: a tree of arrays or `jax.ShapeDtypeStruct`s whose names, shapes and dtypes the
            file must match, or None to read every tensor by name.

    Returns:
        With `like`, a tree like it (jax arrays; numpy arrays for dtypes JAX does not hold
            exactly, e.g. float64 without jax_enable_x64); without, {name: numpy array} in the
            header's order.

    Raises:
        WeightsError: if the file is not a valid safetensors file, or (with `like`) its names,
            shapes or dtypes differ from like's.
        TypeError: if `like` has a non-string dict key or is a bare array.
        OSError: if the file cannot be read.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        entries, _, start = _read_header(path, f, os.fstat(f.fileno()).st_size)
        if like is None:
            return {e.name: _read_tensor(path, f, start, e) for e in entries}
        wanted = flatten(like)
        by_name = {e.name: e for e in entries}
        missing, extra = [n for n in wanted if n not in by_name], [n for n in by_name if n not in wanted]
        if missing or extra:
            raise WeightsError(f"{path} does not match the expected parameters: missing tensors {missing}, "
                               f"extra tensors {extra}")
        for name, leaf in wanted.items():
            shape, dtype = _shape_dtype(leaf)
            e = by_name[name]
            if e.shape != shape:
                raise WeightsError(f"{path}: tensor {name} has shape {e.shape}, expected {shape}")
            if e.dtype != dtype:
                raise WeightsError(f"{path}: tensor {name} has dtype {e.dtype}, expected {dtype}")
        leaves = [_as_jax(_read_tensor(path, f, start, by_name[name])) for name in wanted]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves)


def _as_jax(array: np.ndarray) -> Any:
    """A jax array when JAX holds the dtype exactly, else the numpy array (as pn.load does)."""
    return jnp.asarray(array) if jax.dtypes.canonicalize_dtype(array.dtype) == array.dtype else array
