"""Multi-head self-attention (grouped-query, rotary positions, dense or blockwise), with its handwritten backward.

For x (batch, T, d), h query heads of width dh = d / h and hk key/value
heads (hk divides h; hk = h by default):

    q = x Wq + bq (batch, T, d),   k = x Wk + bk,  v = x Wv + bv  (batch, T, hk dh)
    query head i uses columns [i dh, (i+1) dh) of q and key/value head i // (h / hk) of k and v
    with rope: q_i, k_j rotated by their position (`rope`)
    S_i = q_i k^T / sqrt(dh)      (T, T), with S_i[t, s] = -inf for s > t when causal
    P_i = softmax(S_i) over s,      o_i = P_i v
    y = concat_i(o_i) Wo + bo

The three input projections run as one matrix product x [Wq Wk Wv]; the
core softmax(q k^T) v is `attention_kernels`' dense or blockwise form.
"""
import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from purenet import initializers
from purenet.initializers import default_float
from purenet.layers import attention_kernels as kernels
from purenet.layers import dense
from purenet.layers.base import Array, Layer, PyTree, Static, as_shape
from purenet.layers.structure import DenseProduct

__all__ = ["IMPLEMENTATIONS", "MultiHeadAttention", "rope", "rope_angles", "rope_backward"]

_NAMES = ("q", "k", "v")
IMPLEMENTATIONS = ("auto", "dense", "blockwise")
# From benchmarks/attention.py: the sequence length from which "auto" runs the blockwise form.
_BLOCKWISE_FROM = {"cpu": 1024, "gpu": 1024, "tpu": 1024}


# ---------------------------------------------------------------- rotary positions


def rope_angles(positions: Array, dh: int, dtype: Any) -> tuple[Array, Array]:
    """The rotary angles' cosines and sines, `pos * 10000^(-2j/dh)` for j < dh/2.

    Args:
        positions: the positions, shape (T,) (integers or floats).
        dh: the head width (even).
        dtype: the dtype of the result (the angles are computed in at least float32).

    Returns:
        (cos, sin): each of shape (T, dh/2) and dtype `dtype`.
    """
    j = jnp.arange(dh // 2, dtype=jnp.promote_types(dtype, jnp.float32))
    angle = jnp.asarray(positions, j.dtype)[:, None] * (10000.0 ** (-2.0 * j / dh))[None, :]
    return jnp.cos(angle).astype(dtype), jnp.sin(angle).astype(dtype)


def rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate-half RoPE (Su et al. 2021) on the last axis, positions on the one before it.

        y_j = x_j cos - x_{j+dh/2} sin,   y_{j+dh/2} = x_{j+dh/2} cos + x_j sin     (j < dh/2)

    Args:
        x: queries or keys, shape (..., T, dh) with dh even.
        cos: the angles' cosines from `rope_angles`, shape (T, dh/2).
        sin: the angles' sines from `rope_angles`, shape (T, dh/2).

    Returns:
        The rotated x, x's shape.
    """
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def rope_backward(dy: Array, cos: Array, sin: Array) -> Array:
    """The transpose of `rope` (a rotation): rotate dy back by the same angles.

    Args:
        dy: the gradient with respect to `rope`'s output, shape (..., T, dh).
        cos: the cosines `rope` used, shape (T, dh/2).
        sin: the sines `rope` used, shape (T, dh/2).

    Returns:
        The gradient with respect to `rope`'s input, dy's shape.
    """
    d1, d2 = jnp.split(dy, 2, axis=-1)
    return jnp.concatenate([d1 * cos + d2 * sin, d2 * cos - d1 * sin], axis=-1)


class _AttentionCache(NamedTuple):
    x: jnp.ndarray      # (B, T, d) the input
    q: jnp.ndarray      # (B, hk, G, T, dh) queries, rotated and scaled by 1/sqrt(dh)
    k: jnp.ndarray      # (B, hk, T, dh) keys, rotated
    v: jnp.ndarray      # (B, hk, T, dh)
    o: jnp.ndarray      # (B, T, d) the heads, concatenated (the input of Wo)
    stats: jnp.ndarray  # dense: P (B, hk, G, T, T); blockwise: the log-sum-exp (B, hk, G, T)
    how: Static         # (implementation, block)


@dataclasses.dataclass(frozen=True, init=False)
class MultiHeadAttention(Layer):
    """Self-attention on (batch, T, d) with `num_heads` heads (d must divide by it).

    params {"Wq", "Wo": (d, d), "Wk", "Wv": (d, hk dh)} and, with use_bias,
    {"bq", "bo": (d,), "bk", "bv": (hk dh,)}; hk = num_kv_heads (default
    num_heads; 1 is multi-query attention); weights drawn by the initializer
    named by `init` (default xavier_uniform), biases zero. causal=True lets
    position t attend only to positions s <= t (a language model). rope=True
    rotates each head's q and k by its position (`rope`; dh must be even).

    implementation: "dense" keeps P (batch, h, T, T) for the backward;
    "blockwise" keeps only the outputs and each query's log-sum-exp and
    recomputes P block by block in the backward (`attention_kernels`:
    memory linear in T); "auto" runs blockwise from T >= 1024, the length
    from which the blockwise form is the faster one on the CPU
    (benchmarks/README.md, section "Long sequences: blockwise attention and
    the KV cache"; GPUs and TPUs use the same threshold, not measured there
    yet). block_size: the blockwise form's block (default
    `attention_kernels.default_block`).

    Backward, for dy = dL/dy, per head (P the probabilities, q already divided by sqrt(dh)):

        dWo = o^T dy,  do = dy Wo^T
        dv = P^T do,   dP = do v^T
        dS = P * (dP - sum_s dP * P)         (the softmax backward, as in pn.Softmax)
        dq = dS k / sqrt(dh),   dk = dS^T q  (summed over the heads sharing a key/value head)
        with rope, dq and dk rotated back (`rope_backward`);
        then [dq dk dv] through the input projections as in Dense:
        d[Wq Wk Wv] = x^T [dq dk dv],  dx = [dq dk dv] [Wq Wk Wv]^T.

    Masked positions have P = 0 exactly, so their dS (and every gradient
    through them) is exactly zero. Without rope, dbk is exactly zero too: bk
    adds q . bk to every score of a row, which the softmax ignores (autodiff
    returns rounding noise of order 1e-17 there; tests compare it absolutely).

    Scores that overflow (|q . k| / sqrt(dh) beyond the dtype's range, 3.4e38
    in float32) make that row NaN, as `jax.nn.dot_product_attention` does;
    unlike the losses, which clip logits to the finite range, attention does
    not clip (a clipped score would have a zero derivative that the backward
    above does not take). Inputs that large mean the network has diverged;
    pre-norm blocks (LayerNorm, RMSNorm, exact at any magnitude) keep x finite
    and small in front of every attention layer.

    Decoding (`pn.generate(cache=True)`): `decode_init` makes a key/value
    cache of kv heads only, (batch, hk, length, dh) each, and `decode` runs one
    position against it.

    Args:
        num_heads: h, the number of query heads; the width d of the input
            must be a multiple of it (head width dh = d / h).
        causal: True to let position t attend only to positions s <= t.
        use_bias: True to give the four projections biases (bq, bk, bv, bo).
        num_kv_heads: hk, the key/value heads (grouped-query attention); it
            must divide `num_heads`. None (the default) means `num_heads`;
            1 is multi-query attention.
        rope: True to rotate each head's queries and keys by their position
            (rotary embeddings; the head width must be even).
        implementation: "auto" (the default), "dense" or "blockwise": how the
            core softmax(q k^T) v and its backward are computed (see above).
        init: the name of the weights' initializer (`purenet.initializers`),
            default "xavier_uniform".
        block_size: the blockwise form's block length (keyword only); None
            for `attention_kernels.default_block`.
        initializer: the same as `init` under the field's name (keyword only;
            `dataclasses.replace` passes it); it wins when given.

    Raises:
        ValueError: if `num_heads`, `num_kv_heads` or `block_size` is not a
            positive integer, `num_heads` is not a multiple of
            `num_kv_heads`, `implementation` is unknown, or `init` names no
            initializer.
    """

    num_heads: int
    causal: bool
    use_bias: bool
    initializer: str
    num_kv_heads: int | None
    rope: bool
    implementation: str
    block_size: int | None

    roles = {**{f"W{n}": "weight" for n in "qkvo"}, **{f"b{n}": "bias" for n in "qkvo"}}

    def tensor_split(self, params: PyTree, split_in: bool) -> tuple[PyTree, bool]:
        """Megatron's attention: heads split (Wq, Wk, Wv by columns, their biases with them), each
        device attends with its own heads, Wo by rows (partial sums, one all-reduce); bo whole."""
        del split_in
        return {k: (-2 if k == "Wo" else None if k == "bo" else -1) for k in params}, False

    def __init__(self, num_heads: int, causal: bool = False, use_bias: bool = True,
                 num_kv_heads: int | None = None, rope: bool = False, implementation: str = "auto",
                 init: str = "xavier_uniform", *, block_size: int | None = None,
                 initializer: str | None = None) -> None:
        init = init if initializer is None else initializer  # the field's name: dataclasses.replace passes it

        def positive(name, value):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MultiHeadAttention {name} must be a positive integer, got {value!r}")
        positive("num_heads", num_heads)
        if num_kv_heads is not None:
            positive("num_kv_heads", num_kv_heads)
            if num_heads % num_kv_heads:
                raise ValueError(f"MultiHeadAttention num_heads={num_heads} must be a multiple of "
                                 f"num_kv_heads={num_kv_heads} (each kv head serves a whole group of query heads)")
        if block_size is not None:
            positive("block_size", block_size)
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"MultiHeadAttention implementation must be one of {IMPLEMENTATIONS}, "
                             f"got {implementation!r}")
        initializers.get(init)
        for name, value in (("num_heads", num_heads), ("causal", bool(causal)), ("use_bias", bool(use_bias)),
                            ("initializer", init), ("num_kv_heads", num_kv_heads), ("rope", bool(rope)),
                            ("implementation", implementation), ("block_size", block_size)):
            object.__setattr__(self, name, value)

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    def _sizes(self, d):
        """(h, hk, G, dh) for width d."""
        h, hk = self.num_heads, self.kv_heads
        return h, hk, h // hk, d // h

    def init(self, key: Array, in_shape: Any, dtype: Any = None) -> tuple[PyTree, PyTree, tuple[int, ...]]:
        in_shape, dtype = as_shape(in_shape), dtype or default_float()
        if len(in_shape) != 2:
            raise ValueError(f"{self} takes examples of shape (T, d), got {in_shape}")
        d = in_shape[-1]
        if d % self.num_heads:
            raise ValueError(f"{self}: the width d={d} does not divide into {self.num_heads} heads")
        if self.rope and (d // self.num_heads) % 2:
            raise ValueError(f"{self}: rope rotates pairs of a head's features, but the head width "
                             f"d/num_heads = {d // self.num_heads} is odd")
        h, hk, _, dh = self._sizes(d)
        draw = initializers.get(self.initializer)
        keys = jax.random.split(key, 4)
        widths = {"q": d, "k": hk * dh, "v": hk * dh, "o": d}
        params = {f"W{n}": draw(k, (d, widths[n]), dtype) for n, k in zip(("q", "k", "v", "o"), keys)}
        if self.use_bias:
            params.update({f"b{n}": jnp.zeros((widths[n],), dtype) for n in ("q", "k", "v", "o")})
        return params, {}, in_shape

    def implementation_for(self, t: int) -> str:
        """The formulation this layer runs at sequence length t (its own, or "auto"'s choice)."""
        if self.implementation != "auto":
            return self.implementation
        return "blockwise" if t >= _BLOCKWISE_FROM.get(jax.default_backend(), 1024) else "dense"

    # ------------------------------------------------------------ forward

    def _w_qkv(self, params):
        return jnp.concatenate([params["Wq"], params["Wk"], params["Wv"]], axis=1)

    def _project(self, params, x, positions):
        """q (B, hk, G, T, dh) rotated and scaled, k and v (B, hk, T, dh) (k rotated)."""
        b, t, d = x.shape
        h, hk, g, dh = self._sizes(d)
        qkv = x @ self._w_qkv(params)
        if self.use_bias:
            qkv = qkv + jnp.concatenate([params["bq"], params["bk"], params["bv"]])
        q = jnp.transpose(jnp.reshape(qkv[..., :d], (b, t, h, dh)), (0, 2, 1, 3))
        k = jnp.transpose(jnp.reshape(qkv[..., d:d + hk * dh], (b, t, hk, dh)), (0, 2, 1, 3))
        v = jnp.transpose(jnp.reshape(qkv[..., d + hk * dh:], (b, t, hk, dh)), (0, 2, 1, 3))
        if self.rope:
            cos, sin = rope_angles(positions, dh, x.dtype)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
        q = q * (1.0 / jnp.sqrt(jnp.asarray(dh, x.dtype)))
        return jnp.reshape(q, (b, hk, g, t, dh)), k, v

    def _output(self, params, o):
        """(B, hk, G, T, dh) heads -> concatenated (B, T, d) and y = o Wo + bo."""
        b, hk, g, t, dh = o.shape
        o = jnp.reshape(jnp.transpose(jnp.reshape(o, (b, hk * g, t, dh)), (0, 2, 1, 3)), (b, t, hk * g * dh))
        y = o @ params["Wo"]
        if self.use_bias:
            y = y + params["bo"]
        return y, o

    def forward(self, params: PyTree, state: PyTree, x: Array, train: bool = False,
                key: Array | None = None) -> tuple[Array, PyTree, PyTree]:
        del train, key
        d = params["Wq"].shape[0]
        if jnp.ndim(x) != 3 or x.shape[-1] != d:
            raise ValueError(f"{self} expects x of shape (batch, T, {d}), got {jnp.shape(x)}")
        t = x.shape[1]
        q, k, v = self._project(params, x, jnp.arange(t))
        impl = self.implementation_for(t)
        block = self.block_size or kernels.default_block(t, x.shape[0] * self.num_heads)
        if impl == "dense":
            o, stats = kernels.dense_attention(q, k, v, self.causal)
        else:
            o, stats = kernels.blockwise_attention(q, k, v, self.causal, block)
        y, o_cat = self._output(params, o)
        return y, state, _AttentionCache(x, q, k, v, o_cat, stats, Static((impl, block)))

    # ------------------------------------------------------------ decoding one position at a time

    def decode_init(self, params: PyTree, batch: int, length: int) -> PyTree:
        """An empty key/value cache for `length` positions: kv heads only, (batch, hk, length, dh) each."""
        if not self.causal:
            raise ValueError(f"{self}: decoding one position at a time needs causal attention")
        d = params["Wq"].shape[0]
        _, hk, _, dh = self._sizes(d)
        zeros = jnp.zeros((batch, hk, length, dh), params["Wq"].dtype)
        return {"k": zeros, "v": zeros}

    def decode(self, params: PyTree, state: PyTree, x: Array, kv: PyTree, pos: Array) -> tuple[Array, PyTree]:
        """y for the one position `pos` (x: (batch, 1, d)), writing its key and value into the cache."""
        q, k, v = self._project(params, x, jnp.reshape(pos, (1,)))
        kv = {"k": lax.dynamic_update_slice_in_dim(kv["k"], k, pos, axis=2),
              "v": lax.dynamic_update_slice_in_dim(kv["v"], v, pos, axis=2)}
        s = lax.dot_general(q, kv["k"], (((4,), (3,)), ((0, 1), (0, 1))))  # (B, hk, G, 1, length)
        s = jnp.where(jnp.arange(s.shape[-1]) <= pos, s, -jnp.inf)
        o = lax.dot_general(jax.nn.softmax(s, axis=-1), kv["v"], (((4,), (2,)), ((0, 1), (0, 1))))
        y, _ = self._output(params, o)
        return y, kv

    # ------------------------------------------------------------ backward

    def _d_qkv(self, params, c, dy):
        """dL/d[q k v] before the input projections, (B, T, d + 2 hk dh)."""
        b, t, d = c.x.shape
        h, hk, g, dh = self._sizes(d)
        do = lax.dot_general(dy, params["Wo"], (((2,), (1,)), ((), ())))  # dy Wo^T
        do = jnp.reshape(jnp.transpose(jnp.reshape(do, (b, t, h, dh)), (0, 2, 1, 3)), (b, hk, g, t, dh))
        impl, block = c.how.value
        if impl == "dense":
            dq, dk, dv = kernels.dense_attention_backward(c.q, c.k, c.v, c.stats, do)
        else:
            o = jnp.reshape(jnp.transpose(jnp.reshape(c.o, (b, t, h, dh)), (0, 2, 1, 3)), (b, hk, g, t, dh))
            dq, dk, dv = kernels.blockwise_attention_backward(c.q, c.k, c.v, o, c.stats, do, self.causal, block)
        dq = jnp.reshape(dq, (b, h, t, dh)) * (1.0 / jnp.sqrt(jnp.asarray(dh, dq.dtype)))
        if self.rope:
            cos, sin = rope_angles(jnp.arange(t), dh, dq.dtype)
            dq, dk = rope_backward(dq, cos, sin), rope_backward(dk, cos, sin)
        rows = [jnp.reshape(jnp.transpose(a, (0, 2, 1, 3)), (b, t, -1)) for a in (dq, dk, dv)]
        return jnp.concatenate(rows, axis=-1)

    def _split(self, grads, d):
        widths = (d, *(2 * [self.kv_heads * (d // self.num_heads)]))
        out, start = {}, 0
        for n, width in zip(_NAMES, widths):
            out[f"W{n}"] = grads["W"][..., start:start + width]
            if self.use_bias:
                # Without rope, bk shifts all of a row's scores by the same q . bk, which softmax
                # ignores: its gradient is exactly zero (summing dk would give rounding noise instead).
                b = grads["b"][..., start:start + width]
                out[f"b{n}"] = jnp.zeros_like(b) if n == "k" and not self.rope else b
            start += width
        return out

    def _collect(self, params, grads_in, grads_out):
        d = params["Wq"].shape[0]
        out = self._split(grads_in, d)
        out["Wo"] = grads_out["W"]
        if self.use_bias:
            out["bo"] = grads_out["b"]
        return {k: out[k] for k in params}  # params' own key order

    def _grads(self, params, cache, dqkv, dy):
        """The four projections' gradients from dL/d[q k v] and dy, and dx."""
        proj_out = dense.Dense(params["Wo"].shape[1], use_bias=self.use_bias)
        grads_out, _ = proj_out.backward({"W": params["Wo"]}, cache.o, dy)
        w = self._w_qkv(params)
        proj_in = dense.Dense(w.shape[1], use_bias=self.use_bias)
        grads_in, dx = proj_in.backward({"W": w}, cache.x, dqkv)
        return self._collect(params, grads_in, grads_out), dx

    def backward(self, params: PyTree, cache: PyTree, dy: Array) -> tuple[PyTree, Array]:
        return self._grads(params, cache, self._d_qkv(params, cache, dy), dy)

    def _dx(self, params, dqkv):
        return lax.dot_general(dqkv, self._w_qkv(params), (((2,), (1,)), ((), ())))

    def structure(self, params: PyTree) -> tuple[DenseProduct, DenseProduct]:
        """Two dense products over the positions: x [Wq Wk Wv] (+ [bq bk bv]) and concat_i(o_i) Wo (+ bo).
        Every per-example feature and K-FAC (each projection its own G, Wq, Wk, Wv sharing A) come
        from their rules."""
        b = self.use_bias
        return (DenseProduct(("Wq", "Wk", "Wv"), ("bq", "bk", "bv") if b else (None,) * 3),
                DenseProduct(("Wo",), ("bo" if b else None,)))

    def products(self, params: PyTree, cache: PyTree, dy: Array) -> tuple[tuple, Array]:
        """(x, dL/d[q k v]) and (the heads' concatenation, dy), from one attention backward; dx."""
        dqkv = self._d_qkv(params, cache, dy)
        return ((cache.x, dqkv), (cache.o, dy)), self._dx(params, dqkv)
