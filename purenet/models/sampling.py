"""Sampling from a language model: pn.generate, one compiled lax.scan.

    ids = pn.generate(net, params, state, prompt_ids, key, steps=200, temperature=0.8)

Each step takes the logits of the next position, divides them by the
temperature and draws the next id from the softmax of the result
(temperature 0: the most likely id). The network must be causal (as
`pn.gpt` and `pn.llama` are).

cache=True (the default) runs one position a step (`layers.base.decode`):
attention keeps the keys and values of the positions before (a KV cache of
the key/value heads only, (batch, kv_heads, context, dh) per layer), so a
step costs O(T) instead of a whole forward pass. The prompt fills the cache
one position at a time. Once the sequence outgrows the context, each step
runs the network on the last `context` ids (the sliding window cache=False
uses throughout): the cache holds absolute positions, and a sliding window
changes every position's input. With the same key, cache=True and
cache=False give the same tokens (the same random draws, logits equal to
rounding).
"""
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from purenet._checks import check_hyperparameter, check_index_range
from purenet.layers.base import Array, LayerLike, PyTree
from purenet.layers.roles import id_layer, output_kind
from purenet.layers.traversal import decode, decode_init
from purenet.network import _body_trees, _split_head

__all__ = ["generate"]


def _context(net):
    layer = id_layer(net)
    context = getattr(layer, "context", None)
    if context is None:
        raise ValueError(f"pn.generate needs a network that starts with a layer knowing its context length "
                         f"(such as pn.gpt's GPT), got {type(net).__name__}")
    return context


def generate(net: LayerLike, params: PyTree, state: PyTree, prompt_ids: Any, key: Array, steps: int,
             temperature: float = 1.0, cache: bool = True) -> Array:
    """Extend `prompt_ids` by `steps` ids sampled from the language model `net`.

    Pure: the same key gives the same text. The whole loop is jit-compiled
    `lax.scan`s over the steps (net, steps and cache are static). cache: a
    key/value cache, one position a step (see the module docstring); the
    tokens equal cache=False's. Concrete prompt ids must lie in [0, vocab),
    checked as given, before the cast to int32 (an int64 `2**32 + 1` is an
    error, not id 1); traced prompt ids cannot be checked.

    Args:
        net: a causal language model that reads integer ids and outputs
            next-token logits or probabilities (`pn.gpt`, `pn.llama`, `pn.GPT`).
        params: its parameters.
        state: its state.
        prompt_ids: integer ids (batch, T0) or (T0,), T0 >= 1.
        key: the PRNG key the draws come from (one split per step).
        steps: how many ids to add (a non-negative int; static).
        temperature: the logits are divided by it before sampling, >= 0
            (default 1.0); 0 takes the most likely id (greedy).
        cache: True (the default) to decode one position a step against a
            key/value cache; False to rerun the network on the window of ids
            before each new position.

    Returns:
        int32 ids (batch, T0 + steps), the prompt followed by the sampled ids;
            (T0 + steps,) for a 1-D prompt.

    Raises:
        ValueError: if `steps` is not a non-negative int, `temperature` is
            NaN, negative or infinite, `prompt_ids` is not (T0,) or (batch, T0)
            with T0 >= 1, a concrete prompt id lies outside [0, vocab), or
            `net` outputs neither logits nor probabilities or has no context
            length.
        TypeError: if `prompt_ids` is not of an integer dtype.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    check_hyperparameter("temperature", temperature, 0.0, None)
    prompt = jnp.asarray(prompt_ids)
    if not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise TypeError(f"prompt_ids must be integer ids, got dtype {prompt.dtype}")
    single = prompt.ndim == 1
    prompt = prompt[None] if single else prompt
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt_ids must have shape (T0,) or (batch, T0) with T0 >= 1, got {prompt.shape}")
    layer = id_layer(net)
    if layer is not None:  # the ids as given: jnp.asarray wraps int64 ids >= 2**31 when x64 is off
        check_index_range(prompt_ids, layer.num_embeddings, "prompt_ids")
    kind = output_kind(net)
    if kind not in ("logits", "probabilities"):
        raise ValueError(f"pn.generate samples from a network that outputs next-token logits (pn.GPT) or "
                         f"probabilities (ending in pn.Softmax, as pn.gpt); {type(net).__name__} outputs neither")
    greedy = not isinstance(temperature, jax.core.Tracer) and float(temperature) == 0.0
    out = _generate(net, params, state, prompt.astype(jnp.int32), key, steps,
                    jnp.asarray(1.0 if greedy else temperature), greedy, bool(cache))
    return out[0] if single else out


def _sample(logits, k, temperature, greedy):
    """The next ids (batch,) from logits (batch, vocab)."""
    if greedy:
        return jnp.argmax(logits, axis=-1)
    # shifted so the largest is 0: a tiny temperature tends to greedy instead of overflowing
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
    return jax.random.categorical(k, shifted / temperature.astype(logits.dtype), axis=-1)


@partial(jax.jit, static_argnames=("net", "steps", "greedy", "cache"))
def _generate(net, params, state, prompt, key, steps, temperature, greedy, cache):
    body, fused = _split_head(net, "cross_entropy")
    bparams, bstate = _body_trees(net, fused, params, state)
    b, t0 = prompt.shape
    total = t0 + steps
    context = _context(net)
    window = min(context, total)
    buf = jnp.concatenate([prompt, jnp.zeros((b, steps), prompt.dtype)], axis=1)
    keys = jax.random.split(key, steps)
    as_logits = fused or output_kind(body) == "logits"

    def next_ids(out, pos, k):
        logits = out if as_logits else jnp.log(out)
        return _sample(logits, k, temperature, greedy).astype(buf.dtype)

    first_window_pos = t0
    if cache and steps:
        # positions 1 .. min(total, context) - 1 from the cache: feed id p, read the logits of p + 1
        end = min(total, context)
        kv = decode_init(body, bparams, b, end)

        def cached_step(carry, p):
            buf, kv = carry
            ids = jax.lax.dynamic_slice_in_dim(buf, p, 1, axis=1)
            out, kv = decode(body, bparams, bstate, ids, kv, p)
            nxt = next_ids(out[:, 0], p + 1, keys[jnp.maximum(p + 1 - t0, 0)])
            keep = jax.lax.dynamic_index_in_dim(buf, p + 1, axis=1, keepdims=False)
            buf = jax.lax.dynamic_update_slice(buf, jnp.where(p + 1 >= t0, nxt, keep)[:, None], (0, p + 1))
            return (buf, kv), None

        (buf, _), _ = jax.lax.scan(cached_step, (buf, kv), jnp.arange(end - 1))
        first_window_pos = max(end, t0)

    def step(buf, pos):  # predict the id at `pos` from (at most `window`) ids before it
        start = jnp.maximum(pos - window, 0)
        ids = jax.lax.dynamic_slice(buf, (0, start), (b, window))
        out, _, _ = body.forward(bparams, bstate, ids, train=False)
        last = jax.lax.dynamic_index_in_dim(out, pos - 1 - start, axis=1, keepdims=False)  # (b, vocab)
        buf = jax.lax.dynamic_update_slice(buf, next_ids(last, pos, keys[pos - t0])[:, None], (0, pos))
        return buf, None

    if first_window_pos < total:
        buf, _ = jax.lax.scan(step, buf, jnp.arange(first_window_pos, total))
    return buf
