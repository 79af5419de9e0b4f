"""Influence functions: which training examples made a prediction, with kronfluence's conventions.

The influence of training example j on query q (Koh & Liang, 2017; Grosse et
al., 2023) is the preconditioned inner product of their gradients

    score(q, j) = g_q^T (F + damping I)^-1 g_j,

g the gradient of an example's own loss, F a curvature of the training loss.
`fit` estimates F once over a training set, streamed in batches; `scores`
preconditions each query's gradient once and streams the training set in
chunks; `self_influence` scores each example against itself.

    factors = pn.influence.fit(net, params, state, (x, y), method="ekfac")
    s = pn.influence.scores(net, params, state, factors, (xq, yq), (x, y))   # (n_queries, n_train)
    s_self = pn.influence.self_influence(net, params, state, factors, (x, y))  # (n_train,)
    helpful, helpful_s, harmful, harmful_s = pn.influence.top_k(s, 5)       # each (n_queries, 5)

A positive score is a helpful training example (its gradient points along
the query's: a step on it lowers the query's loss), a negative one harmful.

Conventions, kronfluence 1.0.1's (Bae et al.), so the numbers compare with it
to float64 rounding:

- Gradients are of each example's own summed loss (kronfluence's task sums
  the loss over the batch, so row i of dL/d(output) is example i's): N T
  dL/d(output) for purenet's losses, which average over the N examples and
  their T positions. Scores carry no 1/N and no sign flip: a positive score
  means a training example whose gradient points along the query's.
- One Kronecker block per weight matrix of a dense or convolution product
  (`purenet.layers.structure`: Dense, Conv2D, and every layer built on the
  same products: attention's projections, SwiGLU, the recurrent layers'
  steps, Conv1D, ConvTranspose2D). Its bias joins the block as an appended
  ones column of the input, a = [h, 1], so a block's gradient is the matrix
  dW_i = sum_t a_it^T g_it (d_a = d_in + 1 rows, d_g = d_out columns, the
  bias gradient its last row). A convolution's a is its im2col patch.
- Parameters outside those products (a norm's gain and shift, an embedding
  table, GPT's tied table) are left out of every score, as kronfluence
  tracks only the modules it supports (Linear and Conv2d) and ignores the
  rest. So are the layers inside `pn.Frozen`.

The curvature, per block, from the rows (example i, position t) of the layer's
input a and output gradient g, R = N T rows in all (kronfluence divides both
factors by the rows they average over, unlike `pn.stats.kfac_factors`,
whose G of a convolution sums over the positions):

    A = 1/R sum_{i,t} a_it a_it^T = Q_A diag(e_A) Q_A^T,    G = 1/R sum_{i,t} g_it g_it^T = Q_G diag(e_G) Q_G^T

and `method` picks the preconditioner P = (Lambda + damping)^-1 applied in a basis:

    "identity"   P g = g                                   (no curvature; TracIn-like; damping unused)
    "diagonal"   Lambda = 1/N sum_i dW_i**2                 P g = g / (Lambda + damping)
    "kfac"       Lambda = e_A e_G^T (A (x) G's eigenvalues)  P g = Q_A [(Q_A^T g Q_G) / (Lambda + damping)] Q_G^T
    "ekfac"      Lambda = 1/N sum_i (Q_A^T dW_i Q_G)**2     (George et al., 2018's eigenvalue correction), as "kfac"

damping None is kronfluence's heuristic, 0.1 times the mean of Lambda, per
block; a float is added as it is (kronfluence's `damping_factor`). Then

    scores[q, j] = sum_blocks <P dW_q, dW_j>,      self_influence[j] = sum_blocks <P dW_j, dW_j>.

`fisher` picks the output gradients the curvature is fitted with:
"empirical" (kronfluence's `use_empirical_fisher=True`) at the labels,
"mc" at labels drawn once per example from the model's predictive
distribution (kronfluence's default, a fresh draw in each pass over the
data). The scores' gradients are always at the labels.

On a `pn.gpt` the covered blocks are every transformer block's attention
projections Wq, Wk, Wv and Wo (each with its bias) and the MLP's two Dense
layers, and with `tie_embeddings=False` the head W (a dense product h W: its
block, keyed "head/W", stands in the factors' tree for the whole of GPT's
`TiedEnds`, under "ends"). Left out are the LayerNorms' gains and shifts,
the positional table P and the token table E, tied or not: a tied E is both
the lookup and the output projection h E^T (one `TiedTable` product, not a
dense one), so its read-out counts in no score. kronfluence on a PyTorch
GPT-2 would differ there: its tied `lm_head` is an `nn.Linear`, which it
tracks as a block of the read-out's gradient alone. Untie the embeddings to
score through the output projection.

No per-example gradient of the whole training set is formed: `fit` reads
the rows batch by batch (the covariance pass, the eigendecomposition, then
for "diagonal" and "ekfac" the pass that averages Lambda), and `scores`
holds only the queries' preconditioned gradients. Each batch's work is one
jitted function of fixed shapes (the last batch padded by repeating its
last example and masked out). Everything is read from the handwritten
backward's caches and output gradients (the products' rules); no autodiff.

At scale: `mesh=` splits every batch's rows over a mesh's data axis (the
params, the state and the queries' preconditioned gradients replicated;
XLA sums the factors across the devices), `progress=True` prints one line
per stage on stderr, and `fit(checkpoint=path)` saves the factors after
each stage and resumes from the stages a matching file already holds.
"""
import os
import sys
import time
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from purenet import losses
from purenet.analysis import curvature
from purenet.analysis.kfac import KFAC_RULES, kfac_weights
from purenet.distributed.data import check_divisible, replicate, shard_batch
from purenet.io.checkpoint import CheckpointError, load, save
from purenet.layers import conv, structure
from purenet.layers.base import Array, LayerLike, PyTree, Visit, positions, wide
from purenet.layers.defaults import has_params
from purenet.layers.structure import Convolution, DenseProduct
from purenet.layers.traversal import is_container, map_in_walk_order
from purenet.network import backward_pass, loss_pass

__all__ = [
    "Block", "FISHERS", "Factors", "HEURISTIC_DAMPING_SCALE", "METHODS", "fit", "scores", "self_influence", "top_k",
]

METHODS = ("identity", "diagonal", "kfac", "ekfac")  # kronfluence's strategies
FISHERS = ("empirical", "mc")
HEURISTIC_DAMPING_SCALE = 0.1  # damping=None: this times the mean of Lambda, per block (kronfluence's)


class Block(NamedTuple):
    """The fitted curvature of one weight matrix (with its bias as a last row): what `method` keeps.

    "identity" keeps nothing (every field None); "diagonal" keeps `lam`; "kfac"
    keeps the eigendecompositions of A and G; "ekfac" keeps them and `lam`.

    Attributes:
        q_a: (d_a, d_a) eigenvectors of A (columns), d_a = d_in + 1 with a bias, else d_in.
        eig_a: (d_a,) eigenvalues of A.
        q_g: (d_g, d_g) eigenvectors of G (columns), d_g = d_out.
        eig_g: (d_g,) eigenvalues of G.
        lam: (d_a, d_g) "ekfac": the corrected eigenvalues 1/N sum_i (Q_A^T dW_i Q_G)**2;
            "diagonal": 1/N sum_i dW_i**2.
    """

    q_a: Any = None
    eig_a: Any = None
    q_g: Any = None
    eig_g: Any = None
    lam: Any = None


class Factors(NamedTuple):
    """What `fit` returns and `scores` reads: a pytree of arrays, so `pn.save` checkpoints it.

    Attributes:
        blocks: a tree like params: at each covered layer a dict {weight key: `Block`}
            (the weight's key as `purenet.layers.structure.flat` names it, "W"); None
            elsewhere (layers without a dense or conv product, and inside `pn.Frozen`).
        method: "identity", "diagonal", "kfac" or "ekfac".
        loss: the registered loss name fitted with, or "" for a `pn.Loss` (which `scores`
            and `self_influence` then need as `loss=`).
        fisher: "empirical" or "mc".
        examples: how many training examples the factors average over.
    """

    blocks: PyTree
    method: str
    loss: str
    fisher: str
    examples: int


class _Preconditioner(NamedTuple):
    """One block's P: the eigenbases (None for "identity" and "diagonal") and 1/(Lambda + damping)
    (None for "identity")."""

    q_a: Any
    q_g: Any
    inv: Any


# ---------------------------------------------------------------- one layer: its blocks' rows


def _with_ones(a: Array, bias: bool) -> Array:
    """[a, 1] when the weight has a bias (its gradient the last row of the block's), else a."""
    if not bias:
        return a
    return jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], axis=-1)


def _rows(p: Any, named: dict, weights: list) -> dict:
    """{weight key: (a, g)} of one product: a (n, T, d_a) the input rows (with the bias's ones), g
    (n, T, d_g) the output gradient's rows of the weight's columns, T the positions."""
    out = {}
    if isinstance(p, DenseProduct):
        a, g = wide(structure.positions_of(p.a)), wide(structure.positions_of(p.g))
        for w, b, s, n in structure.columns(p, named):
            if w in weights:
                out[w] = (_with_ones(a, b is not None), g if n == g.shape[-1] else g[..., s:s + n])
    elif isinstance(p, Convolution):
        patches = conv.conv_patches(p.conv, structure.conv_weight(p, named), p.cache)
        out[p.weight] = (_with_ones(wide(structure.positions_of(patches)), p.bias is not None),
                         wide(structure.positions_of(p.g)))
    return out


def _covered(layer: Any, params: PyTree) -> list:
    """[(product, its weight keys)] of the layer's dense and conv products ([] for a layer without)."""
    if not hasattr(layer, "structure") or not has_params(params):
        return []
    return kfac_weights(layer, params)


def _dims(layer: Any, params: PyTree) -> dict:
    """{weight key: (d_a, d_g)} of a covered layer's blocks: K-FAC's factor sizes (`KFAC_RULES`)."""
    named, out = structure.flat(params), {}
    for p, weights in _covered(layer, params):
        out.update({w: dims for (w, _), dims in KFAC_RULES[type(p)][1](p, named, weights).items()})
    return out


def _layout(net: LayerLike, params: PyTree) -> list:
    """The covered layers' {weight key: (d_a, d_g)}, in the order a backward walk visits them."""
    found: list = []

    def leaf(layer, p):
        if _covered(layer, p):
            found.append(_dims(layer, p))
    map_in_walk_order(net, leaf, params)
    if not found:
        raise ValueError("influence needs a layer with a dense or convolution product (Dense, Conv2D, attention, "
                         "...) outside pn.Frozen; this network has none")
    return found


def _tree(net: LayerLike, params: PyTree, blocks: list) -> PyTree:
    """The walk-order list of {key: Block} placed like params (None at layers without blocks)."""
    it = iter(blocks)
    return map_in_walk_order(net, lambda layer, p: next(it) if _covered(layer, p) else None, params)


def _pairs(net: Any, a: PyTree, b: PyTree):
    """(a's, b's) value at every leaf layer outside `pn.Frozen`, in forward order, splitting two trees
    of the network's shape side by side (no walk: a walk would read the trees as parameters)."""
    if not is_container(net):
        yield a, b
        return
    if net.freezes:
        return
    for child, sa, sb in zip(net.children(), net.split(a), net.split(b)):
        yield from _pairs(child, sa, sb)


def _listed(net: LayerLike, params: PyTree, factors: "Factors") -> list:
    """The factors' blocks in walk order, checked against the network's blocks and their sizes."""
    expected = _layout(net, params)
    counter = iter(range(len(expected)))
    order = map_in_walk_order(net, lambda layer, p: next(counter) if _covered(layer, p) else None, params)
    found: dict = {}
    try:
        for i, sub in _pairs(net, order, factors.blocks):
            if isinstance(i, int) and not isinstance(i, bool):
                found[i] = sub
    except (TypeError, KeyError, IndexError, ValueError, AttributeError) as e:
        raise ValueError(f"these factors were not fitted on this network: their blocks do not follow its layers "
                         f"({type(e).__name__}: {e})") from None
    listed: list[Any] = [found.get(i) for i in range(len(expected))]

    def keys(d):
        return sorted(d) if isinstance(d, dict) and all(isinstance(v, Block) for v in d.values()) else d
    if [keys(d) for d in listed] != [sorted(d) for d in expected]:
        raise ValueError(f"these factors were not fitted on this network: it has {len(expected)} covered layers "
                         f"with weights {[sorted(d) for d in expected]}, the factors "
                         f"{[keys(d) for d in listed]}")
    for i, (have, want) in enumerate(zip(listed, expected)):
        for k, (da, dg) in want.items():
            b = have[k]
            shapes = {"q_a": (da, da), "eig_a": (da,), "q_g": (dg, dg), "eig_g": (dg,), "lam": (da, dg)}
            for field, shape in shapes.items():
                value = getattr(b, field)
                if value is not None and tuple(np.shape(value)) != shape:
                    raise ValueError(f"factors do not match the parameters: covered layer {i} (walk order), weight "
                                     f"{k!r}: {field} has shape {tuple(np.shape(value))}, the parameters need {shape}")
    return listed


# ---------------------------------------------------------------- the rules per pass, on one block's rows


def _per_example(a: Array, g: Array) -> Array:
    """dW_i = sum_t a_it^T g_it, (n, d_a, d_g)."""
    return jnp.einsum("nti,ntj->nij", a, g)


def _sum_sq(a: Array, g: Array) -> Array:
    """sum_i dW_i**2 (d_a, d_g); with one position the outer product's square, (a**2)^T (g**2)."""
    if a.shape[1] == 1:
        return (a[:, 0] ** 2).T @ (g[:, 0] ** 2)
    return jnp.sum(_per_example(a, g) ** 2, axis=0)


def _rotated(a: Array, g: Array, pre: Any) -> tuple[Array, Array]:
    """The rows in the eigenbases, a Q_A and g Q_G (so that Q_A^T dW_i Q_G = sum_t (a Q_A)_t^T (g Q_G)_t)."""
    if pre is None or pre.q_a is None:
        return a, g
    return a @ pre.q_a, g @ pre.q_g


def _covariance(a, g, mask, item):
    rows = a.shape[0] * a.shape[1]
    a2, g2 = jnp.reshape(a, (rows, -1)), jnp.reshape(g, (rows, -1))
    return a2.T @ a2, g2.T @ g2, jnp.sum(mask) * a.shape[1]


def _lambda(a, g, mask, item):
    return _sum_sq(*_rotated(a, g, item))


def _query(a, g, mask, pre):
    """P dW_i for each example, (n, d_a, d_g)."""
    x = _per_example(*_rotated(a, g, pre))
    if pre.inv is None:
        return x
    x = x * pre.inv
    if pre.q_a is None:
        return x
    return jnp.einsum("ai,nij,bj->nab", pre.q_a, x, pre.q_g)


def _train(a, g, mask, pq):
    """<P dW_q, dW_j>, (n_queries, n): with one position a_j (P dW_q) g_j^T; with T > 1 through dW_j
    (n d_a d_g numbers, fewer flops and less memory than a_jt (P dW_q) for every t when T and the
    queries exceed one)."""
    if a.shape[1] == 1:
        return jnp.einsum("qij,ni,nj->qn", pq, a[:, 0], g[:, 0])
    return jnp.einsum("qij,nij->qn", pq, _per_example(a, g))


def _self(a, g, mask, pre):
    """<P dW_j, dW_j> = sum (Q_A^T dW_j Q_G)**2 / (Lambda + damping) (orthogonal Q), (n,)."""
    a, g = _rotated(a, g, pre)
    if a.shape[1] == 1:
        a2, g2 = a[:, 0] ** 2, g[:, 0] ** 2
        if pre.inv is None:
            return jnp.sum(a2, axis=1) * jnp.sum(g2, axis=1)
        return jnp.einsum("ni,ij,nj->n", a2, pre.inv, g2)
    x2 = _per_example(a, g) ** 2
    if pre.inv is None:
        return jnp.sum(x2, axis=(1, 2))
    return jnp.einsum("nij,ij->n", x2, pre.inv)


# stage: (the rule at each block, whether the blocks' outs are summed into one array)
_STAGES = {"covariance": (_covariance, False), "lambda": (_lambda, False), "query": (_query, False),
           "train": (_train, True), "self": (_self, True)}


@partial(jax.jit, static_argnames=("net", "loss", "fisher", "stage"))
def _pass(params: PyTree, state: PyTree, x: Array, y: Any, mask: Array, key: Any, inputs: Any, *,
          net: Any, loss: Any, fisher: str, stage: str) -> Any:
    """One batch: the forward, the per-example backward (rows of example i's summed loss, padded rows
    zero), and `stage`'s rule at every block; its outs in walk order (or summed over the blocks)."""
    p = loss_pass(net, params, state, x, loss, False, None)
    target = y if fisher == "empirical" else curvature.sample_targets(p, key, 1)[0]
    weights = jnp.reshape(mask, (-1,) + (1,) * (p.out.ndim - 1)).astype(p.out.dtype)
    npos = positions(p.out.shape)  # N T: dL/dout -> d(example i's summed loss)/dout
    rule, summed = _STAGES[stage]
    it = iter(inputs) if inputs is not None else None
    found: list = []

    def leaf(layer, lparams, caches, dys):
        (cache,), (dy,) = caches, dys
        if not _covered(layer, lparams):
            return None, (layer.backward(lparams, cache, dy)[1],)
        products, dx = structure.declared(layer, lparams, cache, dy)
        named = structure.flat(lparams)
        items = next(it) if it is not None else None
        out = {}
        for product, keys in kfac_weights(layer, lparams, products):
            for k, (a, g) in _rows(product, named, keys).items():
                a = a * jnp.reshape(mask, (-1, 1, 1)).astype(a.dtype)
                out[k] = rule(a, g, mask, None if items is None else items[k])
        found.append(out)
        return None, (dx,)

    backward_pass(p, net, target, Visit(leaf, lambda params, dys: None), seed=lambda d: d * (npos * weights))
    if summed:
        return sum(v for out in found for v in out.values())
    return found


# ---------------------------------------------------------------- streaming


def _data(data: Any, what: str) -> tuple[Any, Any, int]:
    """(x, y, n) of an (x, y) pair, checked."""
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise ValueError(f"{what} must be a pair (x, y) of arrays with the examples on the first axis, "
                         f"got {type(data).__name__}")
    x, y = (v if hasattr(v, "shape") else np.asarray(v) for v in data)
    if x.ndim == 0 or y.ndim == 0:
        raise ValueError(f"{what}: x and y need a batch axis, got shapes {x.shape} and {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{what}: x has {x.shape[0]} examples and y {y.shape[0]}; they must match")
    if x.shape[0] == 0:
        raise ValueError(f"{what} is empty")
    return x, y, int(x.shape[0])


def _check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return int(batch_size)


def _check_mesh(mesh: Any, batch_size: int) -> None:
    """With a mesh, raise unless it is a `jax.sharding.Mesh` whose data axis divides `batch_size`."""
    if mesh is None:
        return
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (pn.distributed.data_mesh(), pn.distributed.mesh({{...}})) "
                        f"or None, got {type(mesh).__name__}")
    check_divisible(batch_size, mesh, "batch_size")


def _batches(x: Any, y: Any, n: int, size: int):
    """(start, x, y, mask) of each batch of `size`, the last padded by repeating its last example."""
    for start in range(0, n, size):
        idx = np.minimum(np.arange(start, start + size), n - 1)
        yield start, x[idx], y[idx], np.arange(start, start + size) < n


class _Progress:
    """One line on stderr for a stage: its name, the units done of the total and the seconds since it
    began, redrawn in place (at most ten times a second) and ended with a newline; a no-op when off."""

    def __init__(self, on: bool, what: str, stage: str, total: int, unit: str = "batches"):
        self.on, self.label, self.total, self.unit = on, f"{what} {stage}", total, unit
        self.start = self.drawn = time.perf_counter()
        self.shown = -1
        if on:
            self.update(0, force=True)

    def update(self, done: int, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.on or (not force and done < self.total and now - self.drawn < 0.1):
            return
        self.drawn, self.shown = now, done
        width = 24
        filled = width * done // max(self.total, 1)
        sys.stderr.write(f"\r{self.label}: |{'#' * filled}{'.' * (width - filled)}| {done}/{self.total} "
                         f"{self.unit}, {now - self.start:.1f} s")
        sys.stderr.flush()

    def close(self) -> None:
        if self.on:
            if self.shown != self.total:
                self.update(self.total, force=True)
            sys.stderr.write("\n")
            sys.stderr.flush()


def _note(on: bool, line: str) -> None:
    if on:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _run(net, params, state, data, loss, stage, inputs, batch_size, fisher="empirical", key=None, total=False,
         mesh=None, progress=None):
    """`_pass` over every batch: [(start, valid rows, outs)], or with `total` the outs summed over the
    batches as they come (the factors' sums: one batch's outs held at a time). On a mesh each batch's
    rows are split over its data axis and everything else (params, state, the stage's inputs, the
    key) is replicated. `progress`: (what, stage name) for a progress line on stderr, or None."""
    x, y, n = data
    if mesh is not None:
        params, state, inputs = replicate((params, state, inputs), mesh)
    bar = _Progress(progress is not None, *(progress or ("", "")), -(-n // batch_size))
    out = []
    running = None
    for i, (start, xb, yb, mask) in enumerate(_batches(x, y, n, batch_size)):
        k = None if key is None else jax.random.fold_in(key, i)
        if mesh is not None:
            xb, yb, mask = (shard_batch(v, mesh) for v in (xb, yb, mask))
            k = None if k is None else replicate(k, mesh)
        outs = _pass(params, state, xb, yb, mask, k, inputs, net=net, loss=loss, fisher=fisher, stage=stage)
        if total:
            running = outs if running is None else jax.tree_util.tree_map(jnp.add, running, outs)
        else:
            out.append((start, min(batch_size, n - start), outs))
        if bar.on:
            jax.block_until_ready(outs)  # the line reports work done, not work dispatched
            bar.update(i + 1)
    bar.close()
    return running if total else out


def _eigh(m: Array) -> tuple[Array, Array]:
    """(eigenvalues, eigenvectors) of the symmetrised m, in float64 (kronfluence's default), cast back."""
    m64 = np.asarray(m, np.float64)
    values, vectors = np.linalg.eigh((m64 + m64.T) / 2)
    return jnp.asarray(values, m.dtype), jnp.asarray(vectors, m.dtype)


def _has(blocks: list, *fields: str) -> bool:
    """Whether every block holds every one of `fields` (a stage of the fit is done)."""
    return all(getattr(b, f) is not None for layer in blocks for b in layer.values() for f in fields)


def _resumed(path: str, net: LayerLike, params: PyTree, want: dict) -> list:
    """The blocks (walk order) of the factors checkpointed at `path`, checked against this fit's `want`
    ({field: value} of method, fisher, loss and examples) and the network's blocks; a mismatch is an
    error that leaves the file as it is."""
    keep = "the file is left as it is: pass another checkpoint path, or remove the file to fit afresh"
    try:
        saved = load(path)
    except CheckpointError as e:
        raise ValueError(f"checkpoint {path} cannot be read back as influence factors ({e}); {keep}") from None
    if not isinstance(saved, Factors):
        raise ValueError(f"checkpoint {path} holds a {type(saved).__name__}, not the Factors of "
                         f"pn.influence.fit; {keep}")
    for field, value in want.items():
        have = getattr(saved, field)
        have = int(have) if isinstance(value, int) else str(have)
        if have != value:
            raise ValueError(f"checkpoint {path} holds factors with {field}={have!r}, this fit has "
                             f"{field}={value!r}; {keep}")
    try:
        blocks = _listed(net, params, saved)
    except ValueError as e:
        raise ValueError(f"checkpoint {path} does not match this network ({e}); {keep}") from None
    if str(saved.method) == "ekfac" and _has(blocks, "lam") and not _has(blocks, "q_a", "eig_a", "q_g", "eig_g"):
        raise ValueError(f"checkpoint {path} holds 'ekfac' factors with Lambda but without their eigenbases; {keep}")
    return blocks


def fit(net: LayerLike, params: PyTree, state: PyTree, data: tuple[Array, Any],
        loss: str | losses.Loss = "cross_entropy", method: str = "ekfac", fisher: str = "empirical",
        batch_size: int = 128, key: Array | None = None, *, mesh: Mesh | None = None, progress: bool = False,
        checkpoint: str | os.PathLike[str] | None = None) -> Factors:
    """Fit the curvature of the training loss for influence functions (kronfluence's factors).

    Streams `data` in batches of `batch_size`, in stages: for "kfac" and
    "ekfac" one pass sums each block's A = 1/R sum a a^T and G = 1/R sum g
    g^T (R = examples x positions, the "covariance" stage) and
    eigendecomposes them (in float64, symmetrised, as kronfluence does: the
    "eigendecomposition" stage); for "ekfac" a second pass averages the
    corrected eigenvalues Lambda = 1/N sum_i (Q_A^T dW_i Q_G)**2, for
    "diagonal" one pass averages Lambda = 1/N sum_i dW_i**2 (the "lambda"
    stage). "identity" reads no data. The module docstring has the
    conventions (kronfluence 1.0.1's).

    With `checkpoint`, the factors are saved there (`pn.save`, atomically)
    after each stage, and a fit that finds the file resumes from it: the
    stages it holds are not recomputed (a finished file is returned as it
    is, reading no data). The file must match the fit: its method, fisher,
    loss name, number of examples and the network's blocks and their sizes
    are checked, and a mismatch is an error that leaves the file alone. The
    data themselves are not checked: resume with the data the file was
    fitted on (and, for "mc", the same key).

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        params: its parameters.
        state: its state (as `pn.init` returns it); the forward runs in evaluation mode.
        data: (x, y), the training set, examples on the first axis (numpy or jax arrays;
            only one batch at a time is moved to the device).
        loss: a registered loss name ("cross_entropy", "mse", ...) or a `pn.Loss`.
        method: "identity", "diagonal", "kfac" or "ekfac" (kronfluence's strategies).
        fisher: "empirical" (the output gradients at the labels: kronfluence's
            `use_empirical_fisher=True`) or "mc" (at labels drawn from the model, a fresh
            draw in each pass; needs `key` and a loss that declares `sample`).
        batch_size: examples per batch (a positive int); the last batch is padded and masked,
            so every batch compiles once.
        key: the PRNG key of "mc"'s labels; unused by "empirical".
        mesh: a device mesh (`pn.distributed.data_mesh()`, `pn.distributed.mesh({...})`), or
            None: each batch's rows split over its data axis (`batch_size` must divide by its
            size), params and state replicated; the factors equal one device's up to rounding.
        progress: print one line per stage on stderr (its name, batches done of the total,
            seconds elapsed).
        checkpoint: a file to save the factors to after each stage and to resume from, or None.

    Returns:
        `Factors`: the blocks (a tree like params, a dict of `Block` at each covered layer),
            the method, loss name, fisher and the number of examples.

    Raises:
        TypeError: if `mesh` is neither None nor a `jax.sharding.Mesh`.
        ValueError: if `method` or `fisher` is unknown, "mc" has no `key`, `batch_size` is not a
            positive int or does not divide over the mesh's data axis, `data` is not an (x, y)
            pair of equal, nonzero length, `loss` is unknown (or declares no sampling, for "mc"),
            the network has no Dense, Conv2D or other layer with a dense or convolution product
            outside `pn.Frozen`, or `checkpoint` names a file that is not these factors (another
            method, fisher, loss, number of examples or network, or not influence factors).
        OSError: if the checkpoint cannot be read or written.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS} (kronfluence's strategies), got {method!r}")
    if fisher not in FISHERS:
        raise ValueError(f"fisher must be one of {FISHERS} (kronfluence's use_empirical_fisher True or False), "
                         f"got {fisher!r}")
    if fisher == "mc" and key is None:
        raise ValueError("fisher='mc' samples labels from the model: pass key=jax.random.key(...)")
    batch_size = _check_batch_size(batch_size)
    _check_mesh(mesh, batch_size)
    x, y, n = _data(data, "data")
    losses.get(loss)  # an unknown name raises here
    name = loss if isinstance(loss, str) else ""
    layout = _layout(net, params)
    blocks = [{k: Block() for k in d} for d in layout]
    path = None if checkpoint is None else os.fspath(checkpoint)
    resumed = path is not None and os.path.exists(path)
    if path is not None and resumed:
        blocks = _resumed(path, net, params, {"method": method, "fisher": fisher, "loss": name, "examples": n})

    def key_of(i: int) -> Array | None:
        return None if key is None or fisher == "empirical" else jax.random.fold_in(key, i)

    def saved() -> None:
        if path is not None:
            save(path, Factors(_tree(net, params, blocks), method, name, fisher, n))

    run = partial(_run, net, params, state, (x, y, n), loss, batch_size=batch_size, fisher=fisher, total=True,
                  mesh=mesh)
    if method in ("kfac", "ekfac"):
        if _has(blocks, "q_a", "eig_a", "q_g", "eig_g"):
            _note(progress, f"fit covariance, eigendecomposition: read from the checkpoint {path}")
        else:
            sums = run("covariance", None, key=key_of(0), progress=("fit", "covariance") if progress else None)
            bar = _Progress(progress, "fit", "eigendecomposition", sum(len(d) for d in layout), "blocks")
            blocks = [{} for _ in layout]
            for layer, blk in zip(sums, blocks):
                for k, (a_sum, g_sum, rows) in layer.items():
                    eig_a, q_a = _eigh(a_sum / rows)
                    eig_g, q_g = _eigh(g_sum / rows)
                    blk[k] = Block(q_a, eig_a, q_g, eig_g)
                    bar.update(sum(len(d) for d in blocks))
            bar.close()
            saved()
    if method in ("diagonal", "ekfac"):
        if _has(blocks, "lam"):
            _note(progress, f"fit lambda: read from the checkpoint {path}")
        else:
            bases = None if method == "diagonal" else [
                {k: _Preconditioner(b.q_a, b.q_g, None) for k, b in blk.items()} for blk in blocks]
            sums = run("lambda", bases, key=key_of(1), progress=("fit", "lambda") if progress else None)
            blocks = [{k: b._replace(lam=layer[k] / n) for k, b in blk.items()} for layer, blk in zip(sums, blocks)]
            saved()
    if method == "identity" and not resumed:
        saved()
    return Factors(_tree(net, params, blocks), method, name, fisher, n)


# ---------------------------------------------------------------- scores


def _method_of(factors: Any) -> str:
    if not isinstance(factors, Factors):
        raise TypeError(f"factors must be what pn.influence.fit returns (Factors), got {type(factors).__name__}")
    method = str(factors.method)
    if method not in METHODS:
        raise ValueError(f"factors.method must be one of {METHODS}, got {method!r}")
    return method


def _loss_of(factors: Factors, loss: Any) -> str | losses.Loss:
    """The loss as the network functions take it (a name fuses with a Softmax / Sigmoid output)."""
    if loss is None:
        loss = str(factors.loss)
        if not loss:
            raise ValueError("these factors were fitted with a pn.Loss, which they do not record: pass it again "
                             "as loss=")
    losses.get(loss)  # an unknown name raises here
    return loss


def _check_damping(damping: Any) -> float | None:
    if damping is None:
        return None
    if isinstance(damping, bool) or not isinstance(damping, (int, float, np.integer, np.floating)) \
            or not np.isfinite(damping) or damping < 0:
        raise ValueError(f"damping must be None (kronfluence's heuristic) or a finite float >= 0, got {damping!r}")
    return float(damping)


def _preconditioners(blocks: list, method: str, damping: float | None) -> list:
    """Per block P = (Lambda + damping)^-1 in its basis; damping None: 0.1 times the mean of Lambda."""
    def one(b: Block) -> _Preconditioner:
        if method == "identity":
            return _Preconditioner(None, None, None)
        missing = [f for f in (("lam",) if method == "diagonal" else ("q_a", "eig_a", "q_g", "eig_g"))
                   + (("lam",) if method == "ekfac" else ()) if getattr(b, f) is None]
        if missing:
            raise ValueError(f"{method!r} factors need {missing} in every block; these were not fitted with it")
        lam = jnp.outer(b.eig_a, b.eig_g) if method == "kfac" else jnp.asarray(b.lam)
        d = HEURISTIC_DAMPING_SCALE * jnp.mean(lam) if damping is None else damping
        inv = 1 / (lam + d)
        if method == "diagonal":
            return _Preconditioner(None, None, inv)
        return _Preconditioner(jnp.asarray(b.q_a), jnp.asarray(b.q_g), inv)
    return [{k: one(b) for k, b in layer.items()} for layer in blocks]


def _prepared(net, params, factors, loss, damping, batch_size, mesh):
    method = _method_of(factors)
    loss = _loss_of(factors, loss)
    batch_size = _check_batch_size(batch_size)
    _check_mesh(mesh, batch_size)
    return loss, _preconditioners(_listed(net, params, factors), method, _check_damping(damping)), batch_size


def scores(net: LayerLike, params: PyTree, state: PyTree, factors: Factors, queries: tuple[Array, Any],
           train: tuple[Array, Any], damping: float | None = None, *, loss: str | losses.Loss | None = None,
           batch_size: int = 128, mesh: Mesh | None = None, progress: bool = False) -> Array:
    """Pairwise influence scores, kronfluence's: `scores[q, j] = sum_blocks <P dW_q, dW_j>`.

    Each query's gradient is preconditioned once (P = (Lambda + damping)^-1
    in the method's basis, see the module docstring); the training set then
    streams in chunks of `batch_size`, each chunk's scores one jitted
    contraction of the stored P dW_q with its rows (no training gradient is
    kept). Gradients are of each example's own summed loss at its label; no
    sign flip, no 1/N: a positive score is a helpful training example (its
    gradient points along the query's), a negative one a harmful one (see
    `top_k`). Only the covered blocks count (Dense, Conv2D and the other
    dense and convolution products; not norms' gains or embeddings).

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        params: its parameters (those `factors` were fitted at).
        state: its state; the forward runs in evaluation mode.
        factors: what `fit` returned (or `pn.load` read back).
        queries: (x, y) of the examples whose predictions are explained.
        train: (x, y) of the training examples scored.
        damping: None for kronfluence's heuristic (0.1 times the mean of Lambda, per block), or
            a float >= 0 added to Lambda (kronfluence's `damping_factor`); "identity" ignores it.
        loss: the loss, None for the one the factors were fitted with (needed when that was a
            `pn.Loss`).
        batch_size: queries per batch, and training examples per chunk (a positive int).
        mesh: a device mesh, or None: each batch of queries and chunk of the training set is
            split over its data axis (`batch_size` must divide by its size); the queries'
            preconditioned gradients, the params and the state are replicated.
        progress: print one line per stage on stderr ("queries", then "train": batches done of
            the total, seconds elapsed).

    Returns:
        (n_queries, n_train) the scores, in the parameters' (at least float32) dtype.

    Raises:
        TypeError: if `factors` is not a `Factors`, or `mesh` is neither None nor a
            `jax.sharding.Mesh`.
        ValueError: if the factors do not match the network (other layers or sizes) or lack
            their method's arrays, `damping` is negative or not a number, `batch_size` is not a
            positive int or does not divide over the mesh's data axis, `queries` or `train` is
            not an (x, y) pair of equal, nonzero length, or the factors were fitted with a
            `pn.Loss` and `loss` is None.
    """
    loss, pre, batch_size = _prepared(net, params, factors, loss, damping, batch_size, mesh)
    q, t = _data(queries, "queries"), _data(train, "train")
    parts = _run(net, params, state, q, loss, "query", pre, batch_size, mesh=mesh,
                 progress=("scores", "queries") if progress else None)
    pq = [{k: jnp.concatenate([out[i][k] for _, _, out in parts])[:q[2]] for k in layer}
          for i, layer in enumerate(pre)]
    chunks = _run(net, params, state, t, loss, "train", pq, batch_size, mesh=mesh,
                  progress=("scores", "train") if progress else None)
    return jnp.concatenate([out[:, :valid] for _, valid, out in chunks], axis=1)


def self_influence(net: LayerLike, params: PyTree, state: PyTree, factors: Factors, data: tuple[Array, Any],
                   damping: float | None = None, *, loss: str | losses.Loss | None = None,
                   batch_size: int = 128, mesh: Mesh | None = None, progress: bool = False) -> Array:
    """Each example's influence on itself, kronfluence's: `sum_blocks <P dW_j, dW_j>`.

    With the blocks' eigenbases orthogonal this is sum (Q_A^T dW_j Q_G)**2 /
    (Lambda + damping), formed without P dW_j ("diagonal": sum dW_j**2 /
    (Lambda + damping); "identity": ||dW_j||^2, one position: ||a||^2 ||g||^2).
    Streams `data` in batches of `batch_size`.

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        params: its parameters (those `factors` were fitted at).
        state: its state; the forward runs in evaluation mode.
        factors: what `fit` returned (or `pn.load` read back).
        data: (x, y) of the examples scored.
        damping: None for kronfluence's heuristic (0.1 times the mean of Lambda, per block), or
            a float >= 0 added to Lambda (kronfluence's `damping_factor`); "identity" ignores it.
        loss: the loss, None for the one the factors were fitted with (needed when that was a
            `pn.Loss`).
        batch_size: examples per batch (a positive int).
        mesh: a device mesh, or None: each batch is split over its data axis (`batch_size` must
            divide by its size); the params, state and preconditioners are replicated.
        progress: print one line on stderr (batches done of the total, seconds elapsed).

    Returns:
        (n,) the self-influence of each example.

    Raises:
        TypeError: as `scores`.
        ValueError: as `scores`.
    """
    loss, pre, batch_size = _prepared(net, params, factors, loss, damping, batch_size, mesh)
    runs = _run(net, params, state, _data(data, "data"), loss, "self", pre, batch_size, mesh=mesh,
                progress=("self_influence", "data") if progress else None)
    return jnp.concatenate([out[:valid] for _, valid, out in runs])


def top_k(scores: Array, k: int) -> tuple[Array, Array, Array, Array]:
    """The k most helpful and the k most harmful training examples of each query.

    Sign convention (kronfluence's, as `scores` returns them): a positive
    score is helpful (the training example's gradient points along the
    query's: training on it lowered the query's loss), a negative one is
    harmful. So the helpful are the k largest scores of each row, in
    descending order, and the harmful the k smallest (most negative), in
    ascending order; ties go to the lower index first (as a stable sort).
    A row with fewer than k positive scores still returns k "helpful"
    entries: read their signs.

    Args:
        scores: (n_queries, n_train) scores, as `scores` returns them.
        k: how many of each, an int in [1, n_train].

    Returns:
        (helpful_indices, helpful_scores, harmful_indices, harmful_scores), each
            (n_queries, k): int32 indices into the training set and their scores.

    Raises:
        ValueError: if `scores` is not 2-D, or `k` is not an int in [1, n_train].
    """
    s = jnp.asarray(scores)
    if s.ndim != 2:
        raise ValueError(f"scores must be (n_queries, n_train), got shape {s.shape} (a single query: scores[None])")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= s.shape[1]:
        raise ValueError(f"k must be an int in [1, n_train = {s.shape[1]}], got {k!r}")
    # + 0.0 makes -0.0 a 0.0: top_k orders -0.0 below 0.0, a stable sort ties them
    _, helpful = jax.lax.top_k(s + 0.0, int(k))
    _, harmful = jax.lax.top_k(-s + 0.0, int(k))
    return helpful, jnp.take_along_axis(s, helpful, 1), harmful, jnp.take_along_axis(s, harmful, 1)
