"""nanoGPT (Karpathy's model.py) checkpoints in and out (`pn.weights` re-exports these).

    net, params = pn.weights.from_nanogpt(state_dict_or_ckpt, heads=n_head)
    state = pn.weights.empty_state(net)                         # GPT keeps no state arrays
    state_dict = pn.weights.to_nanogpt(net, params)             # numpy arrays, nanoGPT's names and layouts
"""
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from purenet.io.safetensors import WeightsError, _to_numpy, flatten
from purenet.io.state_dicts import from_state_dict
from purenet.models.gpt import GPT, gpt
from purenet.models.nanogpt import NanoGPT
from purenet.layers.sequential import Sequential
from purenet.layers.softmax import Softmax
from purenet.network import init

__all__ = ["empty_state", "from_nanogpt", "nanogpt", "to_nanogpt"]

PyTree = Any


def nanogpt(vocab_size: int, context: int, layers: int, heads: int, features: int, dropout: float = 0.0,
            bias: bool = True) -> Sequential:
    """nanoGPT's GPT as a purenet net: `pn.gpt(...)` when bias (the same net), else the bias-free
    `NanoGPT` (purenet.models.nanogpt) in the same Sequential([model, Softmax()]).

    Args:
        vocab_size: the number of token ids (nanoGPT's vocab_size).
        context: the longest sequence, T (block_size).
        layers: the number of transformer blocks (n_layer).
        heads: attention heads per block (n_head).
        features: the model width d (n_embd).
        dropout: the dropout rate, in [0, 1).
        bias: True for Linear and LayerNorm biases (nanoGPT's bias=True), False for none.

    Returns:
        A `pn.Sequential` of the GPT and a final Softmax; it reads integer token ids of shape
            (batch, T).
    """
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

    Layouts: wte/wpe as they are; attn.c_attn.weight (3d, d) is split into Wq, Wk, Wv (rows [0, d),
    [d, 2d), [2d, 3d), each transposed, as nanoGPT's q, k, v = c_attn(x).split(d)); every other
    Linear weight (out, in) is transposed to Dense's (in, out); LayerNorm weight/bias -> gamma/beta.
    bias=False checkpoints (no Linear or LayerNorm biases, detected from the keys) give the
    bias-free `NanoGPT`. lm_head.weight, when present, must equal transformer.wte.weight (nanoGPT
    ties them). The attention's causal-mask buffer (attn.bias, (1, 1, T, T), in checkpoints of
    PyTorch without flash attention) is checked and dropped. dropout defaults to model_args' (else
    0). heads and model_args' sizes must be positive integers (ints, numpy integers or integral
    floats; not bools), bias a bool and dropout a number in [0, 1), or a WeightsError names the
    field and the value. The dtype is the state_dict's. A GPT keeps no state arrays:
    `empty_state(net)` is the state pn.forward and pn.loss take.

    Args:
        state_dict: model.state_dict() (torch tensors or numpy arrays), or the dict train.py
            saves ({"model": state_dict, "model_args": {n_layer, n_head, n_embd, block_size,
            bias, vocab_size, dropout}, ...}); keys may carry torch.compile's "_orig_mod."
            prefix.
        heads: n_head, the attention heads per block (read from model_args when given the
            checkpoint dict; required with a bare state_dict).
        dropout: the net's dropout rate in [0, 1); None for model_args' (else 0).

    Returns:
        (net, params): the `pn.Sequential` of `nanogpt(...)` and its parameters, in the
            state_dict's dtype.

    Raises:
        WeightsError: if the state_dict is not a nanoGPT one (missing or misshaped tensors,
            non-string keys, a key twice, a non-float embedding, lm_head.weight not tied to
            wte, an attn.bias that is not the causal mask), if heads or model_args are
            missing, malformed or disagree with the tensors, or if dropout is not in [0, 1).
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
    anything (jax.eval_shape of pn.init). A network with state arrays (BatchNorm) is a ValueError.

    Args:
        net: the network.
        in_shape: the shape of one example, as `pn.init` takes it; None for the network's own
            (a GPT's is (context,)).

    Returns:
        The state tree (empty containers, no arrays).

    Raises:
        ValueError: if the network keeps state arrays, or `pn.init` needs an in_shape the
            network does not record.
    """
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

    Args:
        net: a `pn.gpt` network (or the `nanogpt(...)` one, or a bare `pn.GPT`).
        params: its parameters.
        checkpoint: False for the bare state_dict, True for train.py's checkpoint dict.

    Returns:
        {nanoGPT name: numpy array} in model.py's order, or with checkpoint=True
            {"model": that state_dict, "model_args": {...}}.

    Raises:
        TypeError: if `net` is not a `pn.gpt` network or a `pn.GPT`.
        WeightsError: if the GPT's head is not tied to its token embedding, or params do not
            match the net (missing or extra tensors, or a shape that differs).
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
