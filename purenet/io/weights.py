"""Weights in and out: safetensors files, nanoGPT checkpoints, and any PyTorch state_dict.

    pn.weights.save_safetensors(path, params, metadata=None)    # a file the `safetensors` library reads
    params = pn.weights.load_safetensors(path, like)            # and back, exactly (like=None: {name: array})
    net, params = pn.weights.from_nanogpt(state_dict_or_ckpt, heads=n_head)
    state = pn.weights.empty_state(net)                         # GPT keeps no state arrays
    state_dict = pn.weights.to_nanogpt(net, params)             # numpy arrays, nanoGPT's names and layouts
    params = pn.weights.from_state_dict(like, state_dict, names, transforms)   # any other module

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
array as the tree) and the reserved "__metadata__" are errors.

Tensors are written in order of decreasing item size (tree order among
equal sizes), so each tensor starts at a multiple of its item size (the
header's length is a multiple of 8). Writes are atomic, as `pn.save`'s:
a temporary file beside the target, flushed and fsync'ed, `os.replace`d
over it, and the directory fsync'ed (purenet.io.checkpoint's helpers).

Loading executes nothing the file names (JSON and raw bytes only) and
validates the whole header before reading any tensor: the 8-byte length
against a bound (100,000,000 bytes, the `safetensors` library's) and the
file size, UTF-8 JSON that is an object starting with "{" without
duplicate names, "__metadata__" a str -> str object, each entry exactly
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
complex64 without jax_enable_x64) a numpy array of the saved dtype;
without `like` a dict {name: numpy array} in the file's header order.

nanoGPT (Karpathy's model.py): see `from_nanogpt` and `to_nanogpt`. Other
PyTorch modules: `from_state_dict` with a name map and the layout rules in
`LAYOUTS` (Linear (out, in) -> Dense W (in, out); Conv2d (out, in, kh, kw)
-> Conv2D W (kh, kw, in, out)); the README's section "Weights in and out" is
the recipe. torch is never imported here unless a value is a torch
tensor (converted with .detach().cpu().numpy(); bfloat16 and float8
tensors bit for bit through an integer view).
"""
import json
import math
import os
import re
import struct
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

from purenet.io.checkpoint import CheckpointError, write_atomically
from purenet.models.gpt import GPT, gpt
from purenet.models.nanogpt import NanoGPT
from purenet.layers.sequential import Sequential
from purenet.layers.softmax import Softmax
from purenet.network import init

__all__ = ["LAYOUTS", "WeightsError", "empty_state", "flatten", "from_nanogpt", "from_state_dict", "load_safetensors",
           "nanogpt", "safetensors_metadata", "save_safetensors", "to_nanogpt"]

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
    """{name: leaf} in tree order, each name the leaf's key path joined with "." (the module docstring's rule)."""
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

    Names follow the module docstring's rule; `metadata` (str -> str) is stored as "__metadata__"
    (read it back with `safetensors_metadata`). A dtype safetensors cannot name is a TypeError naming
    the leaf, raised before anything is written.
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
    """A safetensors file's "__metadata__" ({} when it has none); reads and validates the header only."""
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


# ---------------------------------------------------------------- any state_dict


def _layout(rank: int, axes: tuple[int, ...], what: str) -> Callable[[np.ndarray], np.ndarray]:
    def move(w: np.ndarray) -> np.ndarray:
        if w.ndim != rank:
            raise ValueError(f"a {what} weight has {rank} axes, got shape {w.shape}")
        return np.transpose(w, axes)
    return move


LAYOUTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda w: w,
    "linear": _layout(2, (1, 0), "Linear"),           # nn.Linear (out, in) -> Dense W (in, out)
    "conv1d": _layout(3, (2, 1, 0), "Conv1d"),        # nn.Conv1d (out, in, k) -> Conv1D W (k, in, out)
    "conv2d": _layout(4, (2, 3, 1, 0), "Conv2d"),     # nn.Conv2d (out, in, kh, kw) -> Conv2D W (kh, kw, in, out)
}
"""PyTorch's weight layouts -> purenet's, by name, for `from_state_dict`'s transforms."""


def _castable(src: np.dtype, dst: np.dtype) -> bool:
    kinds = (jnp.floating, jnp.complexfloating, jnp.signedinteger, jnp.unsignedinteger, jnp.bool_)
    return any(jnp.issubdtype(src, k) and jnp.issubdtype(dst, k) for k in kinds)


def _cast(value: np.ndarray, dtype: np.dtype, where: str) -> np.ndarray:
    """`value` as `dtype` (a kind `_castable` allows), refusing a cast that changes values rather than
    rounding them: an integer outside dtype's range, or a finite float (complex) that overflows to
    inf or NaN. A narrower float rounds to nearest (tiny values may become 0): that stays allowed."""
    if value.dtype == dtype:
        return value
    if jnp.issubdtype(dtype, jnp.integer) and value.size:
        info, low, high = jnp.iinfo(dtype), int(value.min()), int(value.max())
        for v in (low, high):
            if not info.min <= v <= info.max:
                raise WeightsError(f"{where}: {v} is outside {dtype}'s range [{info.min}, {info.max}]")
    with np.errstate(over="ignore", invalid="ignore"):
        out = value.astype(dtype)
    if jnp.issubdtype(dtype, jnp.inexact):
        lost = np.isfinite(value) & ~np.isfinite(out)
        if lost.any():
            raise WeightsError(f"{where}: the finite {value.dtype} value {value[lost][0]} overflows {dtype} "
                               f"(to {out[lost][0]})")
    return out


def from_state_dict(like: PyTree, state_dict: Mapping[str, Any], names: Mapping[str, str],
                    transforms: Mapping[str, str | Callable[[np.ndarray], np.ndarray]] | None = None, *,
                    strict: bool = True) -> PyTree:
    """Fill a params tree shaped like `like` from a PyTorch-style state_dict.

    names: {purenet tensor name (`flatten(like)`'s keys): state_dict key}, one for every leaf
    of like (several leaves may read one key, e.g. slices of a fused matrix). transforms:
    {purenet name: a name in LAYOUTS ("linear", "conv1d", "conv2d") or a function array -> array},
    applied to the state_dict's value (numpy; torch tensors converted) before the shape check.
    Each value must then have like's shape; it is cast to like's dtype within its kind (float to
    float, int to int), as JAX holds that dtype (int64 -> int32, float64 -> float32 without
    jax_enable_x64). A cast that changes values is a WeightsError naming the tensor: an integer
    outside the dtype's range, a finite float that overflows (to inf, or NaN in a float8 without
    inf). Floats narrower than the value's round to nearest (float64 -> float32 keeps about 7
    digits; values below float32's range become subnormal or 0), as torch's .float() does. With
    strict (the default) every state_dict key must be used. Any mismatch is a WeightsError naming
    the tensors. Returns like's structure with jax arrays.
    """
    wanted = flatten(like)
    names, transforms = dict(names), dict(transforms or {})
    missing = [n for n in wanted if n not in names]
    unknown = [n for n in names if n not in wanted] + [n for n in transforms if n not in names]
    if missing or unknown:
        raise WeightsError(f"the name map does not match the parameters: no state_dict key for {missing}; "
                           f"not parameters: {sorted(set(unknown))}")
    absent = sorted({key for key in names.values() if key not in state_dict})
    if absent:
        raise WeightsError(f"the state_dict has no {absent}")
    unused = sorted(set(state_dict) - set(names.values()))
    if strict and unused:
        raise WeightsError(f"the state_dict has keys the name map does not use: {unused} (strict=False ignores them)")
    leaves = []
    for name, leaf in wanted.items():
        key = names[name]
        value = _to_numpy(state_dict[key])
        transform = transforms.get(name, "identity")
        if isinstance(transform, str):
            if transform not in LAYOUTS:
                raise ValueError(f"unknown layout {transform!r} for {name} (known: {', '.join(LAYOUTS)})")
            transform = LAYOUTS[transform]
        try:
            value = np.asarray(transform(value))
        except ValueError as e:
            raise WeightsError(f"state_dict[{key!r}] -> {name}: {e}") from None
        shape, dtype = _shape_dtype(leaf)
        if value.shape != shape:
            raise WeightsError(f"state_dict[{key!r}] gives {name} shape {value.shape}, expected {shape}")
        if not _castable(value.dtype, dtype):
            raise WeightsError(f"state_dict[{key!r}] has dtype {value.dtype}, {name} needs {dtype}")
        held = np.dtype(jax.dtypes.canonicalize_dtype(dtype))  # what jnp.asarray makes of dtype
        leaves.append(jnp.asarray(_cast(value, held, f"state_dict[{key!r}] -> {name}")))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves)


# ---------------------------------------------------------------- nanoGPT


def nanogpt(vocab_size: int, context: int, layers: int, heads: int, features: int, dropout: float = 0.0,
            bias: bool = True) -> Sequential:
    """nanoGPT's GPT as a purenet net: `pn.gpt(...)` when bias (the same net), else the bias-free
    `NanoGPT` (purenet.models.nanogpt) in the same Sequential([model, Softmax()])."""
    if bias:
        return gpt(vocab_size, context, layers, heads, features, dropout)
    model = NanoGPT(vocab_size, context, layers, heads, features, dropout, bias=False)
    return Sequential([model, Softmax()], in_shape=(context,))


# (purenet name, nanoGPT name, transposed, part): part p of a fused tensor is its rows [p d, (p + 1) d)
_Row = tuple[str, str, bool, int | None]


def _nanogpt_rows(model: GPT, bias: bool) -> list[_Row]:
    """nanoGPT's state_dict, in its order, against the GPT's params (names relative to the GPT)."""
    body = model.body.layers
    first = len(body) - 1 - model.layers  # the blocks come after the position embedding (and a Dropout)
    rows: list[_Row] = [("token.E", "transformer.wte.weight", False, None),
                        ("body.0.P", "transformer.wpe.weight", False, None)]

    def norm(ours: str, theirs: str) -> list[_Row]:
        gamma: list[_Row] = [(ours + ".gamma", theirs + ".weight", False, None)]
        return gamma + ([(ours + ".beta", theirs + ".bias", False, None)] if bias else [])

    def linear(ours_w: str, ours_b: str, theirs: str, part: int | None = None) -> tuple[list[_Row], list[_Row]]:
        return [(ours_w, theirs + ".weight", True, part)], ([(ours_b, theirs + ".bias", False, part)] if bias else [])

    for i in range(model.layers):
        a, m, h = f"body.{first + i}.0.", f"body.{first + i}.1.", f"transformer.h.{i}."
        rows += norm(a + "0", h + "ln_1")
        qkv = [linear(a + "1.W" + c, a + "1.b" + c, h + "attn.c_attn", p) for p, c in enumerate("qkv")]
        rows += [r for w, _ in qkv for r in w] + [r for _, b in qkv for r in b]
        for w, b in (linear(a + "1.Wo", a + "1.bo", h + "attn.c_proj"),):
            rows += w + b
        rows += norm(m + "0", h + "ln_2")
        for w, b in (linear(m + "1.W", m + "1.b", h + "mlp.c_fc"), linear(m + "3.W", m + "3.b", h + "mlp.c_proj")):
            rows += w + b
    rows += norm(f"body.{len(body) - 1}", "transformer.ln_f")
    return rows


_ORIG_MOD = "_orig_mod."  # torch.compile's prefix: nanoGPT's train.py saves the compiled model's state_dict
_INT_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")  # model_args' sizes


def _positive_int(value: Any, what: str) -> int:
    """`value` as an int: a positive int, numpy integer or integral float, never a bool; else a WeightsError."""
    integral = isinstance(value, (int, np.integer)) or (
        isinstance(value, (float, np.floating)) and float(value).is_integer())
    if isinstance(value, (bool, np.bool_)) or not integral or value <= 0:
        raise WeightsError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _dropout_rate(value: Any, what: str) -> float:
    """`value` as a float in [0, 1) (an int or float, never a bool); else a WeightsError."""
    if (isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating))
            or not 0 <= value < 1):
        raise WeightsError(f"{what} must be a number in [0, 1), got {value!r}")
    return float(value)


def _model_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """model_args checked: sizes positive integers (as ints), bias a bool, dropout in [0, 1); None is absent."""
    out = dict(args)
    for name, value in args.items():
        if value is None:
            continue
        if name in _INT_ARGS:
            out[name] = _positive_int(value, f"the checkpoint's model_args' {name}")
        elif name == "bias":
            if not isinstance(value, (bool, np.bool_)):
                raise WeightsError(f"the checkpoint's model_args' bias must be a bool, got {value!r}")
            out[name] = bool(value)
        elif name == "dropout":
            out[name] = _dropout_rate(value, "the checkpoint's model_args' dropout")
    return out


def _nanogpt_input(state_dict: Mapping[str, Any], heads: int | None) -> tuple[dict[str, np.ndarray], dict, int]:
    """(the state_dict as numpy arrays without compile prefixes, model_args or {}, heads)."""
    args: Any = {}
    if "model" in state_dict and isinstance(state_dict["model"], Mapping):  # train.py's ckpt.pt
        args = state_dict.get("model_args") or {}
        if not isinstance(args, Mapping):
            raise WeightsError(f"the checkpoint's model_args is a {type(args).__name__}, not a dict")
        state_dict = state_dict["model"]
    args = _model_args(args)
    if heads is not None:
        heads = _positive_int(heads, "heads")
    if heads is None:
        heads = args.get("n_head")
        if heads is None:
            raise WeightsError("from_nanogpt needs heads= (nanoGPT's n_head): a bare state_dict does not record it "
                               "(train.py's checkpoint dict does, in model_args)")
    elif args.get("n_head") is not None and args["n_head"] != heads:
        raise WeightsError(f"heads={heads} but the checkpoint's model_args has n_head={args['n_head']}")
    tensors: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise WeightsError(f"state_dict keys are strings, got {key!r}")
        name = key
        while name.startswith(_ORIG_MOD):
            name = name[len(_ORIG_MOD):]
        if name in tensors:
            raise WeightsError(f"the state_dict has {name!r} twice (with and without {_ORIG_MOD!r})")
        tensors[name] = _to_numpy(value)
    return tensors, args, heads


def from_nanogpt(state_dict: Mapping[str, Any], heads: int | None = None, *,
                 dropout: float | None = None) -> tuple[Sequential, PyTree]:
    """nanoGPT's GPT (model.py) -> (net, params): `pn.gpt` (or the bias-free `NanoGPT`) and its params.

    state_dict: model.state_dict() (torch tensors or numpy arrays), or the dict train.py saves
    ({"model": state_dict, "model_args": {n_layer, n_head, n_embd, block_size, bias, vocab_size,
    dropout}, ...}); keys may carry torch.compile's "_orig_mod." prefix. heads: n_head (read from
    model_args when given the checkpoint dict). Layouts: wte/wpe as they are; attn.c_attn.weight
    (3d, d) is split into Wq, Wk, Wv (rows [0, d), [d, 2d), [2d, 3d), each transposed, as nanoGPT's
    q, k, v = c_attn(x).split(d)); every other Linear weight (out, in) is transposed to Dense's
    (in, out); LayerNorm weight/bias -> gamma/beta. bias=False checkpoints (no Linear or LayerNorm
    biases, detected from the keys) give the bias-free `NanoGPT`. lm_head.weight, when present, must
    equal transformer.wte.weight (nanoGPT ties them). The attention's causal-mask buffer
    (attn.bias, (1, 1, T, T), in checkpoints of PyTorch without flash attention) is checked and
    dropped. dropout defaults to model_args' (else 0). heads and model_args' sizes must be positive
    integers (ints, numpy integers or integral floats; not bools), bias a bool and dropout a number
    in [0, 1), or a WeightsError names the field and the value. The dtype is the state_dict's. A
    GPT keeps no state arrays: `empty_state(net)` is the state pn.forward and pn.loss take.
    """
    tensors, args, heads = _nanogpt_input(state_dict, heads)
    for key in ("transformer.wte.weight", "transformer.wpe.weight"):
        if key not in tensors:
            raise WeightsError(f"not a nanoGPT state_dict: no {key!r} (keys: {sorted(tensors)[:6]}...)")
    wte, wpe = tensors["transformer.wte.weight"], tensors["transformer.wpe.weight"]
    if wte.ndim != 2 or wpe.ndim != 2 or wpe.shape[1] != wte.shape[1]:
        raise WeightsError(f"transformer.wte.weight {wte.shape} and transformer.wpe.weight {wpe.shape} must be "
                           f"(vocab, d) and (block_size, d)")
    if not jnp.issubdtype(wte.dtype, jnp.floating):
        raise WeightsError(f"transformer.wte.weight has dtype {wte.dtype}, not a float")
    (vocab, d), context = wte.shape, wpe.shape[0]
    blocks = {int(m.group(1)) for k in tensors if (m := re.match(r"transformer\.h\.(\d+)\.", k))}
    layers = max(blocks) + 1 if blocks else 0
    if layers == 0:
        raise WeightsError("not a nanoGPT state_dict: no transformer.h.{i} blocks")
    bias = "transformer.ln_f.bias" in tensors
    found = {"n_layer": layers, "n_embd": d, "vocab_size": vocab, "block_size": context, "bias": bias}
    for name, value in found.items():
        if args.get(name) is not None and args[name] != value:
            raise WeightsError(f"the checkpoint's model_args has {name}={args[name]!r}, its state_dict has {value!r}")
    if "lm_head.weight" in tensors:
        head = tensors.pop("lm_head.weight")
        if head.shape != wte.shape or not np.array_equal(head, wte, equal_nan=True):
            raise WeightsError("lm_head.weight differs from transformer.wte.weight: nanoGPT ties them, and pn.gpt "
                               "exports a tied head only")
    for i in range(layers):
        mask = tensors.get(f"transformer.h.{i}.attn.bias")
        if mask is not None and mask.ndim == 4:  # the causal mask, a buffer (a bias would be 1-D)
            if mask.shape[:2] != (1, 1) or mask.shape[2] != mask.shape[3] or not np.array_equal(
                    mask, np.tril(np.ones(mask.shape[2:]))[None, None]):
                raise WeightsError(f"transformer.h.{i}.attn.bias {mask.shape} is not nanoGPT's causal mask")
            del tensors[f"transformer.h.{i}.attn.bias"]
    if dropout is None:
        dropout = float(args.get("dropout") or 0.0)
    else:
        dropout = _dropout_rate(dropout, "dropout")
    net = nanogpt(vocab, context, layers, heads, d, dropout, bias)
    dtype = jax.dtypes.canonicalize_dtype(wte.dtype)
    like = jax.eval_shape(lambda k: _init(net, k, dtype), jax.random.key(0))
    model = net.layers[0]
    names, transforms = {}, {}
    for ours, theirs, transposed, part in _nanogpt_rows(model, bias):
        names["0." + ours] = theirs
        transforms["0." + ours] = _nanogpt_transform(d, transposed, part)
    try:
        params = from_state_dict(like, tensors, names, transforms)
    except WeightsError as e:
        raise WeightsError(f"not the nanoGPT state_dict of a {layers}-layer, bias={bias} model: {e}") from None
    return net, params


def _init(net: Any, key: Any, dtype: Any) -> PyTree:
    return init(net, key, dtype=dtype)[0]


def empty_state(net: Any, in_shape: Any = None) -> PyTree:
    """The state tree of a network that keeps no state arrays (pn.gpt's: empty containers), for
    pn.forward / pn.loss after `from_nanogpt` or `load_safetensors`, found without initialising
    anything (jax.eval_shape of pn.init). A network with state arrays (BatchNorm) is a ValueError."""
    state = jax.eval_shape(lambda k: init(net, k, in_shape)[1], jax.random.key(0))
    if jax.tree_util.tree_leaves(state):
        raise ValueError(f"{type(net).__name__} keeps state arrays; load or initialise them (pn.init)")
    return state


def _nanogpt_transform(d: int, transposed: bool, part: int | None) -> Callable[[np.ndarray], np.ndarray]:
    def transform(w: np.ndarray) -> np.ndarray:
        if part is not None:
            if w.shape[0] != 3 * d:
                raise ValueError(f"c_attn's first axis must be 3 * {d}, got shape {w.shape}")
            w = w[part * d:(part + 1) * d]
        return w.T if transposed else w
    return transform


def _gpt_of(net: Any, params: PyTree) -> tuple[GPT, PyTree]:
    if isinstance(net, GPT):
        return net, params
    if (isinstance(net, Sequential) and net.layers and isinstance(net.layers[0], GPT)
            and all(not jax.tree_util.tree_leaves(p) for p in params[1:])):
        return net.layers[0], params[0]
    raise TypeError(f"to_nanogpt takes a pn.gpt network (or a pn.GPT), got {type(net).__name__}")


def to_nanogpt(net: Any, params: PyTree, *, checkpoint: bool = False) -> dict[str, Any]:
    """A pn.gpt net's params as nanoGPT's state_dict: {name: numpy array} in model.py's names, order and
    layouts (the inverse of `from_nanogpt`; lm_head.weight is wte's array, as nanoGPT ties them), which
    `GPT.load_state_dict(..., strict=True)` accepts after torch.from_numpy. With checkpoint=True:
    {"model": that state_dict, "model_args": {...}}, the dict nanoGPT's train.py saves (torch.save it).
    Every tensor must have the shape the net's init gives it (jax.eval_shape of pn.init), so the
    model_args describe the tensors; else a WeightsError names the tensor and both shapes.
    """
    model, params = _gpt_of(net, params)
    prefix = "" if model is net else "0."  # the user's tree path: inside pn.gpt's Sequential, or a bare GPT
    if not model.tie_embeddings:
        raise WeightsError("nanoGPT ties lm_head to wte; this GPT has an untied head")
    bias = bool(getattr(model, "bias", True))
    ours = {name: np.array(leaf) for name, leaf in flatten(params).items()}
    shapes = jax.eval_shape(lambda k: init(model, k, (model.context,))[0], jax.random.key(0))
    expected = {name: tuple(s.shape) for name, s in flatten(shapes).items()}
    missing, extra = [n for n in expected if n not in ours], [n for n in ours if n not in expected]
    if missing or extra:
        raise WeightsError(f"params do not match the net (bias={bias}): missing {missing}, extra {extra}")
    for name, shape in expected.items():
        if ours[name].shape != shape:
            raise WeightsError(f"params do not fit the net: {prefix}{name} has shape {ours[name].shape}, "
                               f"the net's is {shape}")
    rows = _nanogpt_rows(model, bias)
    parts: dict[str, list[tuple[int, np.ndarray]]] = {}
    for name, theirs, transposed, part in rows:
        w = ours[name].T if transposed else ours[name]
        parts.setdefault(theirs, []).append((part or 0, w))
    state_dict = {theirs: (ws[0][1] if len(ws) == 1 else np.concatenate([w for _, w in sorted(ws, key=lambda t: t[0])]))
                  for theirs, ws in parts.items()}
    state_dict = {k: v if v.flags.c_contiguous else v.copy(order="C") for k, v in state_dict.items()}
    state_dict["lm_head.weight"] = state_dict["transformer.wte.weight"]
    if not checkpoint:
        return state_dict
    args = {"n_layer": model.layers, "n_head": model.heads, "n_embd": model.features,
            "block_size": model.context, "bias": bias, "vocab_size": model.vocab_size,
            "dropout": float(model.dropout)}
    return {"model": state_dict, "model_args": args}
