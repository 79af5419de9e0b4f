"""Multi-head self-attention, with its handwritten backward.

For x (batch, T, d) and h heads of width dh = d / h:

    q = x Wq + bq,  k = x Wk + bk,  v = x Wv + bv                  (batch, T, d) each
    head i uses columns [i dh, (i+1) dh) of q, k, v:
    S_i = q_i k_i^T / sqrt(dh)      (T, T), with S_i[t, s] = -inf for s > t when causal
    P_i = softmax(S_i) over s,      o_i = P_i v_i
    y = concat_i(o_i) Wo + bo

The three input projections run as one matrix product x [Wq Wk Wv], and
the heads as one batched product over (batch, head).
"""
import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from purenet import initializers
from purenet.initializers import default_float
from purenet.layers import dense
from purenet.layers.base import Array, Layer, PyTree, as_shape

__all__ = ["MultiHeadAttention"]

_NAMES = ("q", "k", "v")


class _AttentionCache(NamedTuple):
    x: jnp.ndarray    # (B, T, d) the input
    q: jnp.ndarray    # (B, H, T, dh) queries, already scaled by 1/sqrt(dh)
    k: jnp.ndarray    # (B, H, T, dh)
    v: jnp.ndarray    # (B, H, T, dh)
    p: jnp.ndarray    # (B, H, T, T) attention probabilities (exact zeros where masked)
    o: jnp.ndarray    # (B, T, d) the heads, concatenated (the input of Wo)


def _bmm(a, b, contract_a, contract_b):
    """A product batched over the two leading axes (batch, head)."""
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((0, 1), (0, 1))))


@dataclasses.dataclass(frozen=True, init=False)
class MultiHeadAttention(Layer):
    """Self-attention on (batch, T, d) with `num_heads` heads (d must divide by it).

    params {"Wq", "Wk", "Wv", "Wo": (d, d)} and, with use_bias, {"bq", "bk", "bv", "bo": (d,)};
    weights drawn by the initializer named by `init` (default xavier_uniform), biases zero.
    causal=True lets position t attend only to positions s <= t (a language model).

    Backward, for dy = dL/dy, per head (P the probabilities, q already divided by sqrt(dh)):

        dWo = o^T dy,  do = dy Wo^T
        dv = P^T do,   dP = do v^T
        dS = P * (dP - sum_s dP * P)         (the softmax backward, as in pn.Softmax)
        dq = dS k / sqrt(dh),   dk = dS^T q
        then [dq dk dv] through the input projections as in Dense:
        d[Wq Wk Wv] = x^T [dq dk dv],  dx = [dq dk dv] [Wq Wk Wv]^T.

    Masked positions have P = 0 exactly, so their dS (and every gradient
    through them) is exactly zero. dbk is exactly zero too: bk adds q . bk
    to every score of a row, which the softmax ignores (autodiff returns
    rounding noise of order 1e-17 there; tests compare it absolutely).

    Scores that overflow (|q . k| / sqrt(dh) beyond the dtype's range, 3.4e38
    in float32) make that row NaN, as `jax.nn.dot_product_attention` does;
    unlike the losses, which clip logits to the finite range, attention does
    not clip (a clipped score would have a zero derivative that the backward
    above does not take). Inputs that large mean the network has diverged;
    pre-norm blocks (LayerNorm, RMSNorm, exact at any magnitude) keep x finite
    and small in front of every attention layer.
    """

    num_heads: int
    causal: bool
    use_bias: bool
    initializer: str

    roles = {**{f"W{n}": "weight" for n in "qkvo"}, **{f"b{n}": "bias" for n in "qkvo"}}

    def __init__(self, num_heads: int, causal: bool = False, use_bias: bool = True,
                 init: str = "xavier_uniform") -> None:
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"MultiHeadAttention num_heads must be a positive integer, got {num_heads!r}")
        initializers.get(init)
        object.__setattr__(self, "num_heads", num_heads)
        object.__setattr__(self, "causal", bool(causal))
        object.__setattr__(self, "use_bias", bool(use_bias))
        object.__setattr__(self, "initializer", init)

    def init(self, key: Array, in_shape: Any, dtype: Any = None) -> tuple[PyTree, PyTree, tuple[int, ...]]:
        in_shape, dtype = as_shape(in_shape), dtype or default_float()
        if len(in_shape) != 2:
            raise ValueError(f"{self} takes examples of shape (T, d), got {in_shape}")
        d = in_shape[-1]
        if d % self.num_heads:
            raise ValueError(f"{self}: the width d={d} does not divide into {self.num_heads} heads")
        draw = initializers.get(self.initializer)
        keys = jax.random.split(key, 4)
        params = {f"W{n}": draw(k, (d, d), dtype) for n, k in zip(("q", "k", "v", "o"), keys)}
        if self.use_bias:
            params.update({f"b{n}": jnp.zeros((d,), dtype) for n in ("q", "k", "v", "o")})
        return params, {}, in_shape

    # ------------------------------------------------------------ forward

    def _w_qkv(self, params):
        return jnp.concatenate([params["Wq"], params["Wk"], params["Wv"]], axis=1)

    def forward(self, params: PyTree, state: PyTree, x: Array, train: bool = False,
                key: Array | None = None) -> tuple[Array, PyTree, PyTree]:
        del train, key
        d = params["Wq"].shape[0]
        if jnp.ndim(x) != 3 or x.shape[-1] != d:
            raise ValueError(f"{self} expects x of shape (batch, T, {d}), got {jnp.shape(x)}")
        b, t, _ = x.shape
        h = self.num_heads
        dh = d // h
        qkv = x @ self._w_qkv(params)
        if self.use_bias:
            qkv = qkv + jnp.concatenate([params["bq"], params["bk"], params["bv"]])
        qkv = jnp.transpose(jnp.reshape(qkv, (b, t, 3, h, dh)), (2, 0, 3, 1, 4))  # (3, B, H, T, dh)
        q, k, v = qkv[0] * (1.0 / jnp.sqrt(jnp.asarray(dh, x.dtype))), qkv[1], qkv[2]
        s = _bmm(q, k, 3, 3)  # (B, H, T, T)
        if self.causal:
            s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
        p = jax.nn.softmax(s, axis=-1)
        o = _bmm(p, v, 3, 2)  # (B, H, T, dh)
        o = jnp.reshape(jnp.transpose(o, (0, 2, 1, 3)), (b, t, d))
        y = o @ params["Wo"]
        if self.use_bias:
            y = y + params["bo"]
        return y, state, _AttentionCache(x, q, k, v, p, o)

    # ------------------------------------------------------------ backward

    def _d_qkv(self, params, c, dy):
        """dL/d[q k v] before the input projections, (B, T, 3d), and dL/do's part: dWo's inputs."""
        b, t, d = c.x.shape
        h, dh = self.num_heads, d // self.num_heads
        do = lax.dot_general(dy, params["Wo"], (((2,), (1,)), ((), ())))  # dy Wo^T
        do = jnp.transpose(jnp.reshape(do, (b, t, h, dh)), (0, 2, 1, 3))  # (B, H, T, dh)
        dv = _bmm(c.p, do, 2, 2)  # P^T do: (B, H, T(s), dh)
        dp = _bmm(do, c.v, 3, 3)  # do v^T: (B, H, T, T)
        u = c.p * dp
        ds = u - c.p * jnp.sum(u, axis=-1, keepdims=True)
        dq = _bmm(ds, c.k, 3, 2) * (1.0 / jnp.sqrt(jnp.asarray(dh, ds.dtype)))
        dk = _bmm(ds, c.q, 2, 2)  # dS^T q
        dqkv = jnp.stack([dq, dk, dv])  # (3, B, H, T, dh)
        return jnp.reshape(jnp.transpose(dqkv, (1, 3, 0, 2, 4)), (b, t, 3 * d))

    def _split(self, grads, d):
        out = {}
        for i, n in enumerate(_NAMES):
            out[f"W{n}"] = grads["W"][..., i * d:(i + 1) * d]
            if self.use_bias:
                # bk shifts all of a row's scores by the same q . bk, which softmax ignores:
                # its gradient is exactly zero (summing dk would give rounding noise instead).
                b = grads["b"][..., i * d:(i + 1) * d]
                out[f"b{n}"] = jnp.zeros_like(b) if n == "k" else b
        return out

    def _collect(self, params, grads_in, grads_out):
        d = params["Wq"].shape[0]
        out = self._split(grads_in, d)
        out["Wo"] = grads_out["W"]
        if self.use_bias:
            out["bo"] = grads_out["b"]
        return {k: out[k] for k in params}  # params' own key order

    def backward(self, params: PyTree, cache: PyTree, dy: Array) -> tuple[PyTree, Array]:
        proj_out = dense.Dense(params["Wo"].shape[1], use_bias=self.use_bias)
        grads_out, _ = proj_out.backward({"W": params["Wo"]}, cache.o, dy)
        dqkv = self._d_qkv(params, cache, dy)
        w = self._w_qkv(params)
        proj_in = dense.Dense(w.shape[1], use_bias=self.use_bias)
        grads_in, dx = proj_in.backward({"W": w}, cache.x, dqkv)
        return self._collect(params, grads_in, grads_out), dx

    def _dx(self, params, dqkv):
        return lax.dot_general(dqkv, self._w_qkv(params), (((2,), (1,)), ((), ())))

    def per_example_backward(self, params: PyTree, cache: PyTree, dy: Array) -> tuple[PyTree, Array]:
        """Each example's gradients: its own sums over positions of the four projections' outer products."""
        dqkv = self._d_qkv(params, cache, dy)
        grads_in = dense.per_example_grads(cache.x, dqkv, self.use_bias)
        grads_out = dense.per_example_grads(cache.o, dy, self.use_bias)
        return self._collect(params, grads_in, grads_out), self._dx(params, dqkv)

    def per_example_sq_norms(self, params: PyTree, cache: PyTree, dy: Array, l2: Any = 0.0) -> tuple[Array, Array]:
        """The projections' ghost norms (see `purenet.layers.dense.per_example_sq_norms`); l2
        covers the four weight matrices (their role), not the biases."""
        dqkv = self._d_qkv(params, cache, dy)
        sq = (dense.per_example_sq_norms(cache.x, dqkv, self._w_qkv(params), self.use_bias, l2)
              + dense.per_example_sq_norms(cache.o, dy, params["Wo"], self.use_bias, l2))
        return sq, self._dx(params, dqkv)
