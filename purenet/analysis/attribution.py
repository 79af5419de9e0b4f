"""Attributions: which input features, pixels or attention heads a prediction rests on, from the
handwritten backward.

    pn.attribution.saliency(net, params, state, x, target)                    d score / dx, x's shape
    pn.attribution.integrated_gradients(net, params, state, x, target, baseline=None, steps=50,
                                        method="gausslegendre")           Captum's quadratures
    pn.attribution.grad_cam(net, params, state, x, target, layer, relu=True)  (batch, H, W) at a conv
    pn.attribution.head_attribution(net, params, state, ids, target, layers=None, position=-1,
                                    baseline=None)                        {path: (batch, heads)}
    pn.attribution.quadrature(steps, method)                              the nodes and weights IG uses

The score. Every method explains one number per example, the network's
output *before* its output activation (the logit of a Softmax network, the
pre-sigmoid value of a Sigmoid one: the activation `pn.loss` fuses with a
loss is left out) for the example's target class, and the batch's scores
are summed:

    S(x) = sum_b z(x)_b[t_b]          z: the logits (batch, classes), t: the targets (batch,)

so that d S / d x_b is example b's own gradient (examples do not interact in
evaluation mode). A sequence model's output (batch, T, classes) is scored at
one position (`head_attribution`'s `position`). `target` is an int (every
example's class) or one int per example, concrete or traced (under `jit`).

How. S is a `pn.Loss` whose value is the sum above and whose backward is
the one-hot seed dS/dz = onehot(t); the input gradient is the network's own
backward from that seed (`pn.input_grad`), and the layer quantities come from
`pn.capture` with the same seed: one forward and one handwritten backward per
evaluation, no autodiff. The conventions are Captum's (0.9.0), so results
compare with it on a PyTorch network with the same weights (the tests do, in
float64): `Saliency(abs=False)`, `IntegratedGradients` (its methods, nodes,
weights and defaults), `LayerGradCam` and, per head, `LayerGradientXActivation`
at the input of the attention's output projection. Images are NHWC here
and NCHW in Captum; Grad-CAM maps are (batch, H, W) here, (batch, 1, H, W)
there.
"""
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from purenet._checks import check_float_input, check_index_range
from purenet.analysis.capture import capture
from purenet.layers.attention import MultiHeadAttention
from purenet.layers.conv import Conv1D, Conv2D
from purenet.layers.roles import id_layer
from purenet.layers.transposed import ConvTranspose2D
from purenet.layers.traversal import is_container, layer_paths
from purenet.losses import Loss
from purenet.network import input_grad, output_head

__all__ = ["saliency", "integrated_gradients", "quadrature", "METHODS", "grad_cam", "head_attribution"]

PyTree = Any
Array = jax.Array

METHODS = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre")
"""The quadrature rules of `integrated_gradients`: Captum's `SUPPORTED_METHODS`, same names."""

_CONVOLUTIONS = (Conv1D, Conv2D, ConvTranspose2D)


# ---------------------------------------------------------------- the score


def _logits_net(net: Any, params: PyTree, state: PyTree) -> tuple[Any, PyTree, PyTree]:
    """(the network without the output activation a loss fuses with, its params, its state)."""
    head = output_head(net)
    if head is None:
        return net, params, state
    if head is net:
        raise ValueError(f"pn.attribution: the network is only an output activation ({type(net).__name__}); "
                         f"there is no score before it to attribute")
    body = net.without_output()
    return body, body.join(net.split(params)[:-1]), body.join(net.split(state)[:-1])


def _targets(target: Any, batch: int, what: str) -> Array:
    """The target class of each example, (batch,) integers (an int is every example's)."""
    if isinstance(target, bool) or isinstance(target, (float, complex)):
        raise TypeError(f"{what}: target is a class index (an int or one int per example), got {target!r}")
    t = jnp.asarray(target)
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise TypeError(f"{what}: target must hold integer class indices, got dtype {t.dtype}")
    if t.ndim == 0:
        return jnp.broadcast_to(t, (batch,))
    if t.shape != (batch,):
        raise ValueError(f"{what}: target is an int or one int per example, shape ({batch},), got shape {t.shape}")
    return t


def _score(what: str, position: int | None = None) -> Loss:
    """S = sum_b z_b[t_b] (at `position` of a sequence output) as a pn.Loss: value S, backward onehot(t)."""

    def at(out: Array) -> tuple[Array, int]:
        if out.ndim == 2:
            return out, out.shape[-1]
        if position is None:
            raise ValueError(f"{what}: the score is one logit per example, so the network's output must be "
                             f"(batch, classes); got shape {out.shape} (for a sequence model's (batch, T, classes) "
                             f"use pn.attribution.head_attribution, which takes a position)")
        if out.ndim != 3:
            raise ValueError(f"{what}: the network's output must be (batch, classes) or (batch, T, classes), "
                             f"got shape {out.shape}")
        if not -out.shape[1] <= position < out.shape[1]:
            raise ValueError(f"{what}: position {position} is out of range for a sequence of {out.shape[1]}")
        return out[:, position], out.shape[-1]

    def value(out: Array, t: Array) -> Array:
        z, k = at(out)
        check_index_range(t, k, what, "target class", "classes")
        return jnp.sum(jnp.take_along_axis(z, t[:, None], axis=1))

    def backward(out: Array, t: Array) -> Array:
        z, k = at(out)
        check_index_range(t, k, what, "target class", "classes")
        seed = jax.nn.one_hot(t, k, dtype=out.dtype)
        if out.ndim == 2:
            return seed
        return jnp.zeros_like(out).at[:, position].set(seed)

    return Loss(value, backward, name="attribution score")


def _float_input(net: Any, x: Any, what: str) -> Array:
    if id_layer(net) is not None:
        raise ValueError(f"{what}: {type(id_layer(net)).__name__} reads integer ids, which have no gradient; "
                         f"attribute to a layer instead (pn.attribution.head_attribution for attention heads)")
    x = jnp.asarray(x)
    check_float_input(x)
    return x


# ---------------------------------------------------------------- saliency and integrated gradients


def saliency(net: Any, params: PyTree, state: PyTree, x: Array, target: Any) -> Array:
    """The gradient of the target's logit with respect to the input (Simonyan et al., 2014).

        saliency(x)_b = d z(x)_b[t_b] / d x_b

    the signed gradient (Captum's `Saliency(...).attribute(x, target, abs=False)`;
    take `jnp.abs` for the usual map), from one forward and one handwritten
    backward seeded with onehot(t) at the logits.

    Args:
        net: the network (a layer or a container); an output Softmax or
            Sigmoid is left out (the score is the logit before it).
        params: its parameters, as `pn.init` returns them.
        state: its state (evaluation mode: BatchNorm's running statistics).
        x: float inputs (batch, *in_shape).
        target: the class explained: an int (every example's) or (batch,)
            ints, concrete or traced.

    Returns:
        d score / dx, x's shape.

    Raises:
        ValueError: if the network reads integer ids, its output is not
            (batch, classes), or target's shape or (concrete) values do not fit.
        TypeError: if x is not floating point or target is not integer.
    """
    what = "pn.attribution.saliency"
    x = _float_input(net, x, what)
    body, bparams, bstate = _logits_net(net, params, state)
    return input_grad(body, bparams, bstate, x, _targets(target, x.shape[0], what), loss=_score(what))


def quadrature(steps: int = 50, method: str = "gausslegendre") -> tuple[np.ndarray, np.ndarray]:
    """Captum's nodes (alphas) and weights (step sizes) for integrating over [0, 1], in float64.

        riemann_left       alpha_k = k/n,                weight 1/n         (k = 0..n-1)
        riemann_right      alpha_k = (k+1)/n,            weight 1/n
        riemann_middle     alpha_k = (k+1/2)/n,          weight 1/n
        riemann_trapezoid  alpha_k = k/(n-1),            weight 1/n, halved at both ends
        gausslegendre      alpha_k = (1 + x_k)/2,        weight w_k/2       (x, w: numpy's leggauss(n))

    as captum/attr/_utils/approximation_methods.py (0.9.0) defines them,
    linspace for linspace. Captum's trapezoid rule is its own: its weights
    sum to (n-1)/n, not 1, and we keep them so that results compare. Captum
    rounds these numbers to float32 (the alphas come from `torch.linspace`
    in the default dtype, the step sizes pass through `.float()`); here they
    stay float64, so in float64 purenet's integral is the rule itself, where
    Captum's carries float32 rounding of about 1e-8 relative.

    Args:
        steps: the number of nodes n (at least 2 for the Riemann rules, 1 for
            Gauss-Legendre), a Python int.
        method: one of `METHODS`.

    Returns:
        (alphas, weights), two float64 numpy arrays of shape (steps,).

    Raises:
        ValueError: if `method` is unknown or `steps` too small.
    """
    if method not in METHODS:
        raise ValueError(f"pn.attribution: unknown integration method {method!r}; the methods are {METHODS}")
    least = 1 if method == "gausslegendre" else 2
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < least:
        raise ValueError(f"pn.attribution: steps must be an int >= {least} for {method!r}, got {steps!r}")
    n = int(steps)
    if method == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(n)
        return 0.5 * (1.0 + x), 0.5 * w
    weights = np.full(n, 1.0 / n)
    if method == "riemann_trapezoid":
        weights[0] /= 2
        weights[-1] /= 2
        return np.linspace(0.0, 1.0, n), weights
    start, stop = {"riemann_left": (0.0, 1 - 1 / n), "riemann_right": (1 / n, 1.0),
                   "riemann_middle": (1 / (2 * n), 1 - 1 / (2 * n))}[method]
    return np.linspace(start, stop, n), weights


def integrated_gradients(net: Any, params: PyTree, state: PyTree, x: Array, target: Any, baseline: Any = None,
                         steps: int = 50, method: str = "gausslegendre", chunk_size: int | None = None) -> Array:
    """Integrated gradients (Sundararajan et al., 2017), with Captum's quadrature rules and defaults.

        IG(x) = (x - x') * integral_0^1 dS/dx (x' + a (x - x')) da
              ~ (x - x') * sum_k w_k dS/dx (x' + alpha_k (x - x'))

    x' the baseline, S the target's logit, (alpha_k, w_k) the rule's nodes
    and weights (`quadrature`, computed in float64 and used in x's dtype).
    Equal to Captum's `IntegratedGradients(f).attribute(x, baselines, target,
    n_steps=steps, method=method)` up to Captum's float32 rounding of the
    nodes and weights (see `quadrature`). The completeness check: with an
    exact rule the attributions sum to S(x) - S(x') per example.

    Memory: the gradients at all `steps` points are computed as one batch of
    steps x batch rows (Captum's default, `internal_batch_size=None`); pass
    `chunk_size` to run `chunk_size` points at a time (a `lax.scan` over the
    chunks: memory of chunk_size x batch rows, the same result up to the
    order of the sum).

    Args:
        net: the network (a layer or a container); an output Softmax or
            Sigmoid is left out.
        params: its parameters, as `pn.init` returns them.
        state: its state (evaluation mode).
        x: float inputs (batch, *in_shape).
        target: the class explained: an int or (batch,) ints, concrete or traced.
        baseline: x' (None, the default: zeros), anything that broadcasts to x.
        steps: the number of points n (default 50, Captum's), a Python int.
        method: the rule, one of `METHODS` (default "gausslegendre", Captum's).
        chunk_size: points evaluated together (None, the default: all of them).

    Returns:
        The attributions, x's shape.

    Raises:
        ValueError: if the method is unknown, steps or chunk_size is too
            small, the baseline does not broadcast to x, the network reads
            ids or its output is not (batch, classes).
        TypeError: if x is not floating point or target is not integer.
    """
    what = "pn.attribution.integrated_gradients"
    alphas, weights = quadrature(steps, method)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"{what}: chunk_size must be a positive int or None, got {chunk_size!r}")
    x = _float_input(net, x, what)
    t = _targets(target, x.shape[0], what)
    if baseline is None:
        base = jnp.zeros_like(x)
    else:
        base = jnp.asarray(baseline, x.dtype)
        try:
            base = jnp.broadcast_to(base, x.shape)
        except ValueError:
            raise ValueError(f"{what}: the baseline's shape {base.shape} does not broadcast to x's {x.shape}") from None
    body, bparams, bstate = _logits_net(net, params, state)
    score = _score(what)
    diff = x - base
    chunk = steps if chunk_size is None else min(chunk_size, steps)
    chunks = math.ceil(steps / chunk)
    pad = chunks * chunk - steps  # extra points with weight 0 fill the last chunk
    a = jnp.asarray(np.concatenate([alphas, np.zeros(pad)]).reshape(chunks, chunk), x.dtype)
    w = jnp.asarray(np.concatenate([weights, np.zeros(pad)]).reshape(chunks, chunk), x.dtype)
    lift = (slice(None),) + (None,) * x.ndim

    def weighted_grads(a_c: Array, w_c: Array) -> Array:
        """sum_k w_k dS/dx at the chunk's points, from one pass over chunk x batch rows."""
        points = base[None] + a_c[lift] * diff[None]
        g = input_grad(body, bparams, bstate, points.reshape((-1,) + x.shape[1:]), jnp.tile(t, chunk), loss=score)
        return jnp.tensordot(w_c, g.reshape((chunk,) + x.shape), axes=1)

    if chunks == 1:
        total = weighted_grads(a[0], w[0])
    else:
        total, _ = lax.scan(lambda acc, aw: (acc + weighted_grads(*aw), None), jnp.zeros_like(x), (a, w))
    return total * diff


# ---------------------------------------------------------------- at a layer


def _as_path(layer: Any, what: str) -> tuple:
    if isinstance(layer, int) and not isinstance(layer, bool):
        return (layer,)
    if isinstance(layer, (tuple, list)) and all(isinstance(i, int) and not isinstance(i, bool) for i in layer):
        return tuple(layer)
    raise TypeError(f"{what}: a layer is named by its path, a tuple of child indices such as (3,) or (0, 1, 2) "
                    f"(pn.layer_paths lists them), got {layer!r}")


def _layer_at(net: Any, body: Any, path: tuple, what: str) -> Any:
    """The layer at `path` of the network, checked to be a layer of the scored body."""
    where = dict(layer_paths(net))
    if path not in where or path == ():
        shown = ", ".join(f"{p} {type(layer).__name__}" for p, layer in where.items() if not is_container(layer))
        raise ValueError(f"{what}: the path {path} names no layer of the network; its leaf layers are at {shown}")
    if path not in dict(layer_paths(body)):
        raise ValueError(f"{what}: the layer at {path} ({type(where[path]).__name__}) is the output activation, "
                         f"which the score leaves out")
    return where[path]


def _tree_at(net: Any, tree: PyTree, path: tuple) -> PyTree:
    """The part of a params tree that belongs to the layer at `path`."""
    for i in path:
        tree, net = net.split(tree)[i], net.children()[i]
    return tree


def grad_cam(net: Any, params: PyTree, state: PyTree, x: Array, target: Any, layer: Any,
             relu: bool = True) -> Array:
    """Grad-CAM (Selvaraju et al., 2017) at a convolutional layer: where in the image the class's evidence is.

        A = the layer's output (batch, H, W, C)       (the convolution's, before its ReLU)
        alpha_c = mean over (H, W) of dS/dA[..., c]
        map = relu(sum_c alpha_c A[..., c])           (batch, H, W)

    A and dS/dA are the layer's record from one `pn.capture` pass seeded
    with onehot(t) at the logits. Captum's `LayerGradCam(f, layer).attribute(x,
    target, relu_attributions=relu)` on the NCHW twin gives the same map with
    a channel axis of 1; note Captum's default is relu_attributions=False,
    ours relu=True (the paper's). A 1-D convolution's map is (batch, W).
    Upsample it to the input's size to overlay it.

    Args:
        net: the network (a layer or a container); an output Softmax or
            Sigmoid is left out.
        params: its parameters, as `pn.init` returns them.
        state: its state (evaluation mode).
        x: float inputs (batch, H_in, W_in, C_in).
        target: the class explained: an int or (batch,) ints, concrete or traced.
        layer: the path of a `pn.Conv2D` (or `pn.Conv1D`, `pn.ConvTranspose2D`)
            in the network, e.g. (3,) for the fourth layer of a Sequential
            (`pn.layer_paths(net)` lists them).
        relu: True (the default) to keep only the positive evidence.

    Returns:
        The map, (batch, H, W): the layer's output's spatial shape.

    Raises:
        ValueError: if the path names no layer, names the output activation
            or a layer that is not a convolution, or the output is not
            (batch, classes).
        TypeError: if the path is not a tuple of ints, x is not floating
            point or target is not integer.
    """
    what = "pn.attribution.grad_cam"
    path = _as_path(layer, what)
    x = _float_input(net, x, what)
    body, bparams, bstate = _logits_net(net, params, state)
    conv = _layer_at(net, body, path, what)
    if not isinstance(conv, _CONVOLUTIONS):
        raise ValueError(f"{what}: Grad-CAM reads a convolution's output, but the layer at {path} is "
                         f"{type(conv).__name__}; name a Conv2D (before its activation)")
    rec = capture(body, bparams, bstate, x, _targets(target, x.shape[0], what), loss=_score(what),
                  layers=[path]).layers[path]
    spatial = tuple(range(1, rec.y.ndim - 1))
    cam = jnp.sum(jnp.mean(rec.dy, axis=spatial, keepdims=True) * rec.y, axis=-1)
    return jnp.maximum(cam, 0) if relu else cam


def _heads(layer: MultiHeadAttention, params: PyTree, x: Array) -> Array:
    """The attention's heads, concatenated (batch, T, d): the input of its output projection Wo (attention
    has no state)."""
    return layer.forward(params, {}, x)[2].o


def head_attribution(net: Any, params: PyTree, state: PyTree, x: Array, target: Any, layers: Any = None,
                     position: int = -1, baseline: Any = None) -> dict:
    """How much each attention head carries the score: gradient x activation per head (attribution patching).

    Each `pn.MultiHeadAttention` computes out = concat_h(o_h) Wo + bo, o_h the
    output of head h (batch, T, d/h). Head h's attribution is the first-order
    (Taylor) estimate of the change in the score S when its output moves from
    the baseline's to the input's:

        A_h = sum over t and head h's features of (o_h - o'_h) * dS/do_h,    dS/do = dS/dout Wo^T

    o'_h = 0 without a baseline: the gradient x activation of the head, what
    zero-ablating it would cost (Captum's `LayerGradientXActivation` at the
    input of the output projection, summed over the positions and each
    head's slice). With a baseline (a corrupted input of x's shape, e.g. a
    prompt with one token changed), o'_h is the head's output on it:
    attribution patching (Nanda, 2023), the linear estimate of
    S(x) - S(x with head h's output patched in from the baseline), for every
    head of every layer from one forward and one backward (one forward more
    for the baseline). The score S is the target's logit at `position` of a
    sequence output (batch, T, classes), or at the output (batch, classes).

    Args:
        net: the network (`pn.gpt`, `pn.llama`, or any network with
            `pn.MultiHeadAttention` layers); an output Softmax is left out.
        params: its parameters, as `pn.init` returns them.
        state: its state (evaluation mode).
        x: the input: token ids (batch, T) or floats (batch, T, d).
        target: the class (token) explained: an int or (batch,) ints,
            concrete or traced.
        layers: the attention layers: None (the default) for every
            `pn.MultiHeadAttention` in the network, one path, or a list of
            paths (`pn.layer_paths(net)` lists them).
        position: the position scored in a sequence output (default -1, the
            last); unused for an output (batch, classes).
        baseline: None (zero ablation) or an input of x's shape whose head
            outputs are the reference.

    Returns:
        {path: (batch, heads)} for each attention layer, in forward order.

    Raises:
        ValueError: if a path names no layer or a layer that is not
            `pn.MultiHeadAttention`, the network has none, the baseline's
            shape is not x's, or position is out of range.
        TypeError: if `layers` is not None, a path or a list of paths, or
            target is not integer.
    """
    what = "pn.attribution.head_attribution"
    body, bparams, bstate = _logits_net(net, params, state)
    if layers is None:
        paths = [p for p, layer in layer_paths(body) if isinstance(layer, MultiHeadAttention)]
        if not paths:
            raise ValueError(f"{what}: the network has no pn.MultiHeadAttention layer")
    else:
        if isinstance(layers, str) or not isinstance(layers, (int, tuple, list)):
            raise TypeError(f"{what}: layers is None, a path or a list of paths, got {layers!r}")
        one = isinstance(layers, int) or all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
        paths = [_as_path(layers, what)] if one else [_as_path(p, what) for p in layers]
        for p in paths:
            if not isinstance(_layer_at(net, body, p, what), MultiHeadAttention):
                raise ValueError(f"{what}: the layer at {p} is {type(dict(layer_paths(net))[p]).__name__}, not a "
                                 f"pn.MultiHeadAttention")
    x = jnp.asarray(x)
    t = _targets(target, x.shape[0], what)
    if baseline is not None:
        baseline = jnp.asarray(baseline)
        if baseline.shape != x.shape:
            raise ValueError(f"{what}: the baseline's shape {baseline.shape} is not x's {x.shape}")
    score = _score(what, position)
    clean = capture(body, bparams, bstate, x, t, loss=score, layers=paths).layers
    if baseline is not None:
        base = capture(body, bparams, bstate, baseline, t, loss=score, layers=paths).layers
    where = dict(layer_paths(body))
    out = {}
    for p in paths:
        layer, lp = where[p], _tree_at(body, bparams, p)
        o = _heads(layer, lp, clean[p].x)
        if baseline is not None:
            o = o - _heads(layer, lp, base[p].x)
        do = lax.dot_general(clean[p].dy, lp["Wo"], (((2,), (1,)), ((), ())))  # dS/dout Wo^T
        b, n, d = o.shape
        out[p] = jnp.sum(jnp.reshape(o * do, (b, n, layer.num_heads, d // layer.num_heads)), axis=(1, 3))
    return out
