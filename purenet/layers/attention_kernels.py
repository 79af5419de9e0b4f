"""The core of attention, o = softmax(q k^T) v per head, in two formulations with handwritten backwards.

Shapes (grouped-query attention built in): q (B, K, G, T, dh), k and v
(B, K, T, dh): K key/value heads, each read by a group of G query heads
(query head K g + j ... see `MultiHeadAttention`; G = 1 is ordinary
multi-head attention, K = 1 multi-query). q arrives already scaled by
1/sqrt(dh), so the scores are S = q k^T. Causal masking sets S[t, s] = -inf
for s > t.

dense:     P = softmax(S) is formed and kept for the backward, (B, K, G, T, T):

               o = P v;   dv = P^T do,  dP = do v^T,  dS = P * (dP - rowsum(dP * P)),
               dq = dS k,  dk = dS^T q

blockwise: the keys in blocks of `block` (Rabe & Staats 2021; FlashAttention,
           Dao et al. 2022). For each query block, an online softmax over the
           key blocks keeps a running max m, sum l and unnormalised output:

               m' = max(m, rowmax S_j),  l' = l e^{m - m'} + rowsum e^{S_j - m'},
               acc' = acc e^{m - m'} + e^{S_j - m'} v_j;   o = acc / l,  lse = m + log l

           Only o and lse (B, K, G, T) are saved. The backward recomputes each
           block's probabilities from them, P_ij = exp(S_ij - lse_i), and uses
           rowsum(dP * P) = rowsum(do * o) =: D (as dP = do v^T and o = P v):

               dv_j += P_ij^T do_i,  dP_ij = do_i v_j^T,  dS_ij = P_ij * (dP_ij - D_i),
               dk_j += dS_ij^T q_i,  dq_i += dS_ij k_j

           Under the causal mask, blocks above the diagonal are skipped (the
           loops run j <= i). Any T works: the sequence is padded to a whole
           number of blocks, padded keys are masked and padded queries dropped.
           Memory is O(T block) instead of O(T^2).
"""
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

__all__ = ["blockwise_attention", "blockwise_attention_backward", "dense_attention", "dense_attention_backward"]

# dot_general dimension numbers for q-shaped (B, K, G, t, dh) and k-shaped (B, K, s, dh) operands.
_BATCH = ((0, 1), (0, 1))


def _scores(q, k):                       # (B,K,G,t,dh) x (B,K,s,dh) -> (B,K,G,t,s)
    return lax.dot_general(q, k, (((4,), (3,)), _BATCH))


def _mix(p, v):                          # (B,K,G,t,s) x (B,K,s,dh) -> (B,K,G,t,dh)
    return lax.dot_general(p, v, (((4,), (2,)), _BATCH))


def _to_keys(p, x):                      # (B,K,G,t,s) x (B,K,G,t,dh) -> (B,K,s,dh): sums over G and t
    return lax.dot_general(p, x, (((2, 3), (2, 3)), _BATCH))


def _mask(s, rows, cols, causal, length):
    """-inf where a key is after its query (causal) or past the true sequence length (padding)."""
    keep = cols[None, :] < length
    if causal:
        keep = keep & (cols[None, :] <= rows[:, None])
    return jnp.where(keep, s, -jnp.inf)


# ---------------------------------------------------------------- dense


def dense_attention(q: Array, k: Array, v: Array, causal: bool) -> tuple[Array, Array]:
    """(o, P): the probabilities are formed and returned for the backward."""
    t = q.shape[3]
    s = _scores(q, k)
    if causal:
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    return _mix(p, v), p


def dense_attention_backward(q: Array, k: Array, v: Array, p: Array, do: Array) -> tuple[Array, Array, Array]:
    """(dq, dk, dv) from the kept probabilities (masked entries of P are exact zeros)."""
    dv = _to_keys(p, do)
    u = p * lax.dot_general(do, v, (((4,), (3,)), _BATCH))   # P * dP, dP = do v^T
    ds = u - p * jnp.sum(u, axis=-1, keepdims=True)
    return _mix(ds, k), _to_keys(ds, q), dv


# ---------------------------------------------------------------- blockwise


def _blocks(x: Array, axis: int, block: int) -> Array:
    """Pad `axis` to a multiple of `block` and move the block index to the front: (n, ..., block, ...)."""
    t = x.shape[axis]
    n = -(-t // block)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n * block - t)
    x = jnp.pad(x, pad)
    x = x.reshape(x.shape[:axis] + (n, block) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _unblocks(x: Array, axis: int, length: int) -> Array:
    """The inverse of `_blocks` (axis counted without the block index), cut back to `length`."""
    x = jnp.moveaxis(x, 0, axis)
    x = x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])
    return lax.slice_in_dim(x, 0, length, axis=axis)


def blockwise_attention(q: Array, k: Array, v: Array, causal: bool, block: int) -> tuple[Array, Array]:
    """(o, lse): the online softmax over key blocks; lse (B, K, G, T) is the log-sum-exp of each query's scores."""
    t = q.shape[3]
    block = min(block, t)
    qb, kb, vb = _blocks(q, 3, block), _blocks(k, 2, block), _blocks(v, 2, block)
    n = qb.shape[0]
    offsets = jnp.arange(block)
    acc_dtype = jnp.promote_types(q.dtype, jnp.float32)

    def row(i):
        q_i = qb[i]
        rows = i * block + offsets

        def step(j, carry):
            m, l, acc = carry
            s = _mask(_scores(q_i, kb[j]).astype(acc_dtype), rows, j * block + offsets, causal, t)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            correction = jnp.exp(m - m_new)
            p = jnp.exp(s - m_new[..., None])
            l = l * correction + jnp.sum(p, axis=-1)
            acc = acc * correction[..., None] + _mix(p.astype(vb.dtype), vb[j]).astype(acc_dtype)
            return m_new, l, acc

        shape = q_i.shape[:-1]
        init = (jnp.full(shape, -jnp.inf, acc_dtype), jnp.zeros(shape, acc_dtype),
                jnp.zeros(q_i.shape, acc_dtype))
        if causal:  # skip the blocks above the diagonal (a static loop with a branch: autodiff of
            # pn.loss, the reference, cannot run through a loop of dynamic length)
            m, l, acc = lax.fori_loop(0, n, lambda j, c: lax.cond(j <= i, partial(step, j), lambda c: c, c), init)
        else:
            m, l, acc = lax.fori_loop(0, n, step, init)
        return (acc / l[..., None]).astype(q.dtype), m + jnp.log(l)

    ob, lse = lax.map(row, jnp.arange(n))
    return _unblocks(ob, 3, t), _unblocks(lse, 3, t)


def blockwise_attention_backward(q: Array, k: Array, v: Array, o: Array, lse: Array, do: Array,
                                 causal: bool, block: int) -> tuple[Array, Array, Array]:
    """(dq, dk, dv), recomputing each block's probabilities from the saved log-sum-exp."""
    t = q.shape[3]
    block = min(block, t)
    qb, kb, vb, dob = _blocks(q, 3, block), _blocks(k, 2, block), _blocks(v, 2, block), _blocks(do, 3, block)
    lse_b = _blocks(lse, 3, block)
    d_b = _blocks(jnp.sum(do * o, axis=-1), 3, block)            # D = rowsum(do * o)
    n = qb.shape[0]
    offsets = jnp.arange(block)

    def column(dq, j):
        k_j, v_j = kb[j], vb[j]
        cols = j * block + offsets

        def step(i, carry):
            dq, dk, dv = carry
            q_i, do_i = qb[i], dob[i]
            s = _mask(_scores(q_i, k_j), i * block + offsets, cols, causal, t)
            p = jnp.exp(s - lse_b[i][..., None].astype(s.dtype))
            dv = dv + _to_keys(p, do_i)
            ds = p * (lax.dot_general(do_i, v_j, (((4,), (3,)), _BATCH)) - d_b[i][..., None])
            dk = dk + _to_keys(ds, q_i)
            dq = dq.at[i].add(_mix(ds, k_j))
            return dq, dk, dv

        zeros = jnp.zeros_like(k_j)
        dq, dk, dv = lax.fori_loop(j if causal else 0, n, step, (dq, zeros, zeros))
        return dq, (dk, dv)

    dqb, (dkb, dvb) = lax.scan(column, jnp.zeros_like(qb), jnp.arange(n))
    return _unblocks(dqb, 3, t), _unblocks(dkb, 2, t), _unblocks(dvb, 2, t)


def default_block(t: int, rows: int = 1) -> int:
    """The block size: the largest power of two in [64, 512] whose score block, rows (batch x
    heads) x block^2, has at most 2^19 entries (2^21 bytes in float32, so it stays in cache; measured
    in benchmarks/README.md, "Long sequences: blockwise attention and the KV cache"), and never
    more than T."""
    block = 512
    while block > 64 and rows * block * block > 2 ** 19:
        block //= 2
    return max(1, min(block, t))


def flops(b: int, heads: int, t: int, dh: int, causal: bool) -> float:
    """Matrix-multiply flops of attention's forward (2 products of 2 b h t^2 dh; half when causal)."""
    return 4.0 * b * heads * t * t * dh * (0.5 if causal else 1.0)

