"""Sampling from a language model: pn.generate, one compiled lax.scan.

    ids = pn.generate(net, params, state, prompt_ids, key, steps=200, temperature=0.8)

Each step runs the network (evaluation mode) on the last `context` ids,
takes the logits at the last position, divides them by the temperature and
draws the next id from the softmax of the result (temperature 0: the most
likely id). The network must be causal (as `pn.gpt` is), so ids after the
current position within the window cannot change its logits.
"""
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from purenet._checks import check_hyperparameter
from purenet.layers.base import Array, LayerLike, PyTree, id_layer, output_kind
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
             temperature: float = 1.0) -> Array:
    """Extend `prompt_ids` (batch, T0) (or (T0,)) by `steps` sampled ids: returns (batch, T0 + steps).

    Pure: the same key gives the same text. The whole loop is one jit-compiled
    `lax.scan` over the steps (net and steps are static).
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
    if layer is not None:
        from purenet.layers.embedding import check_ids
        check_ids(prompt, layer.num_embeddings, "prompt_ids")
    kind = output_kind(net)
    if kind not in ("logits", "probabilities"):
        raise ValueError(f"pn.generate samples from a network that outputs next-token logits (pn.GPT) or "
                         f"probabilities (ending in pn.Softmax, as pn.gpt); {type(net).__name__} outputs neither")
    greedy = not isinstance(temperature, jax.core.Tracer) and float(temperature) == 0.0
    out = _generate(net, params, state, prompt.astype(jnp.int32), key, steps,
                    jnp.asarray(1.0 if greedy else temperature), greedy)
    return out[0] if single else out


@partial(jax.jit, static_argnames=("net", "steps", "greedy"))
def _generate(net, params, state, prompt, key, steps, temperature, greedy):
    body, fused = _split_head(net, "cross_entropy")
    bparams, bstate = _body_trees(net, fused, params, state)
    b, t0 = prompt.shape
    total = t0 + steps
    window = min(_context(net), total)
    buf = jnp.concatenate([prompt, jnp.zeros((b, steps), prompt.dtype)], axis=1)

    def step(buf, inputs):
        pos, k = inputs  # predict the id at `pos` from the ids before it
        start = jnp.maximum(pos - window, 0)
        ids = jax.lax.dynamic_slice(buf, (0, start), (b, window))
        out, _, _ = body.forward(bparams, bstate, ids, train=False)
        last = jax.lax.dynamic_index_in_dim(out, pos - 1 - start, axis=1, keepdims=False)  # (b, vocab)
        logits = last if fused or output_kind(body) == "logits" else jnp.log(last)
        if greedy:
            nxt = jnp.argmax(logits, axis=-1)
        else:  # shifted so the largest is 0: a tiny temperature tends to greedy instead of overflowing
            logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
            shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
            nxt = jax.random.categorical(k, shifted / temperature.astype(logits.dtype), axis=-1)
        buf = jax.lax.dynamic_update_slice(buf, nxt.astype(buf.dtype)[:, None], (0, pos))
        return buf, None

    positions = jnp.arange(t0, total)
    buf, _ = jax.lax.scan(step, buf, (positions, jax.random.split(key, steps)))
    return buf
