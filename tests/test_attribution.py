"""pn.attribution against Captum 0.9.0 on PyTorch twins with the same weights, in float64.

Twins: an MLP (Dense, Tanh, BatchNorm in evaluation mode, ReLU), a small CNN (Conv2D, ReLU, MaxPool2D,
Dense; NHWC here, NCHW there) and nanoGPT's model (`pn.weights.from_nanogpt` copies its weights).
The twins output logits: our networks end in Softmax (or Sigmoid), which the score leaves out.

Captum in float64. Captum rounds the integration rule to float32 twice: its Riemann alphas come
from `torch.linspace` in torch's default dtype, and `IntegratedGradients._attribute` multiplies the
gradients by `torch.tensor(step_sizes).float()`. The fixture `captum64` sets torch's default dtype
to float64 and makes that one cast float64 (the module's `torch.tensor` returns a float64 tensor
whose `.float()` is itself); everything else is Captum's own code. At 16 steps the Riemann rules'
numbers are exact in float32, and there unpatched Captum is compared too.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import purenet as pn
from purenet.layers.base import Wrapper
from purenet.layers.traversal import map_layers

torch = pytest.importorskip("torch")
captum_attr = pytest.importorskip("captum.attr")
ig_module = pytest.importorskip("captum.attr._core.integrated_gradients")
approximation = pytest.importorskip("captum.attr._utils.approximation_methods")

nn = torch.nn
TOL = 1e-10

# ---------------------------------------------------------------- Captum in float64


class _Float64Tensor:
    """`torch.tensor(step_sizes)` in Captum's integrated_gradients: `.float()` keeps it float64."""

    def __init__(self, data):
        self.tensor = torch.tensor(data, dtype=torch.float64)

    def float(self):
        return self.tensor


class _Torch64:
    """The module `torch` as integrated_gradients.py sees it, with that one cast kept float64."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def tensor(data, *args, **kwargs):
        return _Float64Tensor(data)


@pytest.fixture
def default_float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def captum64(default_float64, monkeypatch):
    monkeypatch.setattr(ig_module, "torch", _Torch64())


# ---------------------------------------------------------------- the twins


def _randomized(params, key, scale=0.5):
    """Every parameter redrawn (biases non-zero, so no ReLU input or max-pool window sits at a tie)."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(tree, [p + scale * jax.random.normal(k, p.shape, p.dtype)
                                               for p, k in zip(leaves, keys)])


def _t(a):
    return torch.tensor(np.asarray(a))


class _FlattenNHWC(nn.Module):
    """pn.Flatten's order (H, W, C) on an NCHW tensor."""

    def forward(self, x):
        return x.permute(0, 2, 3, 1).flatten(1)


def _torch_twin(net, params, state):
    """The network in PyTorch (NCHW), its weights copied; without the output Softmax / Sigmoid."""
    mods = []
    for layer, p, s in zip(net.layers, params, state):
        if isinstance(layer, pn.Dense):
            m = nn.Linear(*p["W"].shape)
            m.weight.data, m.bias.data = _t(np.asarray(p["W"]).T.copy()), _t(p["b"])
        elif isinstance(layer, pn.Conv2D):
            kh, kw, cin, cout = p["W"].shape
            m = nn.Conv2d(cin, cout, (kh, kw), padding=layer.padding.lower())
            m.weight.data, m.bias.data = _t(np.asarray(p["W"]).transpose(3, 2, 0, 1).copy()), _t(p["b"])
        elif isinstance(layer, pn.BatchNorm):
            m = nn.BatchNorm1d(p["gamma"].shape[0], eps=layer.eps)
            m.weight.data, m.bias.data = _t(p["gamma"]), _t(p["beta"])
            m.running_mean.data, m.running_var.data = _t(s["mean"]), _t(s["var"])
        elif isinstance(layer, (pn.Softmax, pn.Sigmoid)):
            continue
        elif isinstance(layer, pn.MaxPool2D):
            m = nn.MaxPool2d(layer.window)
        else:
            m = {pn.Tanh: nn.Tanh, pn.ReLU: nn.ReLU, pn.Flatten: _FlattenNHWC}[type(layer)]()
        mods.append(m)
    return nn.Sequential(*mods).double().eval()


MLP = pn.Sequential([pn.Dense(6), pn.Tanh(), pn.Dense(5), pn.BatchNorm(), pn.ReLU(), pn.Dense(4), pn.Softmax()])
CNN = pn.Sequential([pn.Conv2D(3, 3), pn.ReLU(), pn.MaxPool2D(2), pn.Conv2D(4, 3, padding="VALID"), pn.ReLU(),
                     pn.Flatten(), pn.Dense(5), pn.ReLU(), pn.Dense(3), pn.Softmax()])
SHAPES = {"mlp": (5,), "cnn": (8, 8, 2)}
BATCH = 3


@functools.lru_cache(maxsize=None)
def _case(model, seed=0):
    """(net, params, state, x, the torch twin, x in torch's layout), built once per process."""
    net = {"mlp": MLP, "cnn": CNN}[model]
    params, state = pn.init(net, jax.random.key(seed), SHAPES[model])
    params = _randomized(params, jax.random.key(seed + 1))
    if model == "mlp":  # running statistics away from (0, 1)
        state = list(state)
        state[3] = {"mean": jax.random.normal(jax.random.key(seed + 2), (5,)),
                    "var": 0.5 + jax.random.uniform(jax.random.key(seed + 3), (5,))}
        state = tuple(state)
    x = jax.random.normal(jax.random.key(seed + 4), (BATCH, *SHAPES[model]))
    return net, params, state, x, _torch_twin(net, params, state), _to_torch(x)


def _to_torch(x):
    x = np.asarray(x)
    return torch.tensor(x.transpose(0, 3, 1, 2).copy() if x.ndim == 4 else x)


def _from_torch(t):
    a = t.detach().numpy()
    return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


def _close(got, want, tol=TOL):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = max(float(np.max(np.abs(want))), 1e-300)
    err = float(np.max(np.abs(got - want)))
    print(f"max |difference| {err:.1e}, relative {err / scale:.1e}")
    assert err <= tol * scale, f"max |difference| {err:.3e}, relative {err / scale:.3e}"
    return err / scale


def _jitted(fn, net, params, state, x, target, **kw):
    """fn(net, params, state, x, target, **kw) under jit: the arrays (the target and a baseline too) traced,
    the rest static (compiling one program is faster than running the first eager call op by op)."""
    arrays = {k: v for k, v in kw.items() if k == "baseline" and v is not None}
    static = {k: v for k, v in kw.items() if k not in arrays}
    run = jax.jit(lambda p, s, v, t, a: fn(net, p, s, v, t, **a, **static))
    return run(params, state, x, jnp.asarray(target), arrays)


TARGETS = {"int": 1, "per_example": np.array([2, 0, 1])}

# ---------------------------------------------------------------- saliency


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("target", list(TARGETS))
def test_saliency_equals_captum(model, target):
    net, params, state, x, twin, xt = _case(model)
    t = TARGETS[target]
    got = _jitted(pn.attribution.saliency, net, params, state, x, t)
    want = captum_attr.Saliency(twin).attribute(xt, target=_t(t) if np.ndim(t) else t, abs=False)
    _close(got, _from_torch(want))


def test_saliency_of_a_sigmoid_network_is_taken_before_the_sigmoid():
    net = pn.Sequential([pn.Dense(4), pn.Tanh(), pn.Dense(1), pn.Sigmoid()])
    params, state = pn.init(net, jax.random.key(0), 3)
    params = _randomized(params, jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (BATCH, 3))
    twin = _torch_twin(net, params, state)
    want = captum_attr.Saliency(twin).attribute(_to_torch(x), target=0, abs=False)
    _close(_jitted(pn.attribution.saliency, net, params, state, x, 0), _from_torch(want))


# ---------------------------------------------------------------- integrated gradients


def test_quadrature_equals_captums_rules(default_float64):
    for method in pn.attribution.METHODS:
        for n in (2, 3, 7, 50):
            sizes, alphas = approximation.approximation_parameters(method)
            a, w = pn.attribution.quadrature(n, method)
            assert a.dtype == w.dtype == np.float64 and a.shape == w.shape == (n,)
            np.testing.assert_allclose(a, alphas(n), rtol=0, atol=1e-15)
            np.testing.assert_allclose(w, sizes(n), rtol=0, atol=1e-15)
    a, w = pn.attribution.quadrature(1, "gausslegendre")
    assert a.tolist() == [0.5] and w.tolist() == [1.0]


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("method", pn.attribution.METHODS)
def test_integrated_gradients_equal_captum_in_float64(captum64, model, method):
    """9 steps (1/9 is not a float32: the patch matters), a random baseline, one target per example."""
    net, params, state, x, twin, xt = _case(model)
    base = 0.3 * jax.random.normal(jax.random.key(9), x.shape)
    t = TARGETS["per_example"]
    got = _jitted(pn.attribution.integrated_gradients, net, params, state, x, t, baseline=base, steps=9,
                  method=method)
    want = captum_attr.IntegratedGradients(twin).attribute(xt, baselines=_to_torch(base), target=_t(t), n_steps=9,
                                                           method=method)
    _close(got, _from_torch(want))


def test_integrated_gradients_defaults_are_captums(captum64):
    """No baseline, steps and method given: zeros, 50 Gauss-Legendre points, on both sides."""
    net, params, state, x, twin, xt = _case("cnn")
    got = _jitted(pn.attribution.integrated_gradients, net, params, state, x, 1)
    _close(got, _from_torch(captum_attr.IntegratedGradients(twin).attribute(xt, target=1)))


def test_unpatched_captum_differs_by_its_float32_rule_only():
    """Captum as installed (alphas and step sizes rounded to float32) against our float64 rule: the
    difference is that rounding, ~1e-8 relative, far above float64's 1e-16 and far below float32's."""
    net, params, state, x, twin, xt = _case("cnn")
    got = _jitted(pn.attribution.integrated_gradients, net, params, state, x, 1, steps=9, method="riemann_middle")
    want = _from_torch(captum_attr.IntegratedGradients(twin).attribute(xt, target=1, n_steps=9,
                                                                       method="riemann_middle"))
    rel = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
    assert 1e-12 < rel < 1e-7, rel


@pytest.mark.parametrize("method", pn.attribution.METHODS[:4])
def test_riemann_rules_at_16_steps_equal_unpatched_captum(default_float64, method):
    """At 16 steps Captum's float32 step sizes are exact (k/16, k/32): its own code, no patch."""
    net, params, state, x, twin, xt = _case("cnn")
    got = _jitted(pn.attribution.integrated_gradients, net, params, state, x, 2, steps=16, method=method)
    want = captum_attr.IntegratedGradients(twin).attribute(xt, target=2, n_steps=16, method=method)
    _close(got, _from_torch(want))


def test_chunks_equal_one_pass_and_completeness_holds():
    net, params, state, x, _, _ = _case("mlp")
    t = TARGETS["per_example"]
    whole = _jitted(pn.attribution.integrated_gradients, net, params, state, x, t, steps=20)
    for chunk in (1, 6):  # a scan over single points; chunks of 6 and a last one padded with weight 0
        _close(_jitted(pn.attribution.integrated_gradients, net, params, state, x, t, steps=20, chunk_size=chunk),
               whole, tol=1e-14)
    # completeness: the attributions sum to S(x) - S(0) per example (Gauss-Legendre, a smooth network)
    smooth = pn.Sequential([pn.Dense(6), pn.Tanh(), pn.Dense(4), pn.Tanh(), pn.Dense(3), pn.Softmax()])
    p, s = pn.init(smooth, jax.random.key(0), 5)
    p = _randomized(p, jax.random.key(1))
    ig = _jitted(pn.attribution.integrated_gradients, smooth, p, s, x, t, steps=30)
    logits = lambda v: pn.forward(smooth.without_output(), p[:-1], s[:-1], v)[0][np.arange(BATCH), t]  # noqa: E731
    _close(jnp.sum(ig, axis=1), logits(x) - logits(jnp.zeros_like(x)), tol=1e-13)


# ---------------------------------------------------------------- Grad-CAM


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("layer", [0, 3])
def test_grad_cam_equals_captum(relu, layer):
    net, params, state, x, twin, xt = _case("cnn")
    torch_layer = {0: twin[0], 3: twin[3]}[layer]
    t = TARGETS["per_example"]
    got = _jitted(pn.attribution.grad_cam, net, params, state, x, t, layer=(layer,), relu=relu)
    want = captum_attr.LayerGradCam(twin, torch_layer).attribute(xt, target=_t(t), relu_attributions=relu)
    assert want.shape[1] == 1
    _close(got, want.detach().numpy()[:, 0])
    if not relu:
        assert float(jnp.min(got)) < 0  # the negative evidence is there to be removed


# ---------------------------------------------------------------- attention heads


class _NanoAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.c_attn, self.c_proj, self.heads = nn.Linear(d, 3 * d), nn.Linear(d, d), heads

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(o.transpose(1, 2).contiguous().view(b, t, d))


class _NanoBlock(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(d), _NanoAttention(d, heads), nn.LayerNorm(d)
        self.mlp = nn.Module()
        self.mlp.c_fc, self.mlp.c_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp.c_proj(torch.nn.functional.gelu(self.mlp.c_fc(self.ln_2(x))))


class _NanoGPT(nn.Module):
    """nanoGPT's module names (what `pn.weights.from_nanogpt` reads), biases on, tied embeddings."""

    def __init__(self, vocab=11, context=8, layers=2, heads=2, d=8):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, d), wpe=nn.Embedding(context, d),
            h=nn.ModuleList([_NanoBlock(d, heads) for _ in range(layers)]), ln_f=nn.LayerNorm(d)))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight

    def forward(self, ids):
        x = self.transformer.wte(ids) + self.transformer.wpe(torch.arange(ids.shape[1]))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


@functools.lru_cache(maxsize=None)
def _gpt_twin():
    """(nanoGPT's model, pn's copy of it, its params, its state), built once per process."""
    torch.manual_seed(0)
    model = _NanoGPT().double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if ".ln_" in name and name.endswith("weight") else 0.0) + 0.4 * torch.randn_like(p))
    net, params = pn.weights.from_nanogpt(model.state_dict(), heads=2)
    return model, net, params, pn.weights.empty_state(net)


def _attention_paths(net):
    return [p for p, layer in pn.layer_paths(net) if isinstance(layer, pn.MultiHeadAttention)]


@pytest.mark.parametrize("position", [-1, 3])
def test_head_attribution_equals_captum_on_a_nanogpt_twin(position):
    model, net, params, state = _gpt_twin()
    ids = np.random.default_rng(0).integers(0, 11, size=(BATCH, 7))
    corrupt = ids.copy()
    corrupt[:, 1] = (corrupt[:, 1] + 3) % 11  # one token changed
    t = np.array([4, 0, 9])
    fwd = lambda i: model(i)[:, position]  # noqa: E731 - the score's position, logits (batch, vocab)
    paths = _attention_paths(net)
    assert len(paths) == 2
    got = _jitted(pn.attribution.head_attribution, net, params, state, ids, t, position=position)
    patched = _jitted(pn.attribution.head_attribution, net, params, state, ids, t, position=position,
                      baseline=corrupt)
    assert list(got) == paths and list(patched) == paths
    for path, block in zip(paths, model.transformer.h):
        layer = block.attn.c_proj
        gxa = captum_attr.LayerGradientXActivation(fwd, layer).attribute(_t(ids), target=_t(t),
                                                                           attribute_to_layer_input=True)
        want = gxa.detach().numpy().reshape(BATCH, 7, 2, 4).sum(axis=(1, 3))
        assert got[path].shape == (BATCH, 2)
        _close(got[path], want)
        grad = captum_attr.LayerGradientXActivation(fwd, layer, multiply_by_inputs=False).attribute(
            _t(ids), target=_t(t), attribute_to_layer_input=True)
        act = captum_attr.LayerActivation(fwd, layer)
        o, o_base = (act.attribute(_t(i), attribute_to_layer_input=True) for i in (ids, corrupt))
        want = ((o - o_base) * grad).detach().numpy().reshape(BATCH, 7, 2, 4).sum(axis=(1, 3))
        _close(patched[path], want)


def _scaled_heads_net(net, scales):
    """`net` with head h's output of example b multiplied by scales[path][b, h] before Wo (plain JAX)."""

    @dataclasses.dataclass(frozen=True)
    class Scaled(Wrapper):
        block: pn.MultiHeadAttention
        scale: object

        def init(self, key, in_shape, dtype=None):
            return self.block.init(key, in_shape, dtype)

        def forward(self, params, state, x, train=False, key=None):
            _, state, cache = self.block.forward(params, state, x)
            o = cache.o * jnp.repeat(self.scale, cache.o.shape[-1] // self.block.num_heads, axis=-1)[:, None]
            return o @ params["Wo"] + (params["bo"] if self.block.use_bias else 0.0), state, None

    return map_layers(net, lambda path, layer: Scaled(layer, scales[path]) if path in scales else layer)


@functools.lru_cache(maxsize=None)
def _attention_classifier():
    """(net, params, state, x): floats (batch, 4, 5) -> Dense -> Residual(attention, 2 heads) -> 3 classes."""
    net = pn.Sequential([pn.Dense(8), pn.Residual(pn.MultiHeadAttention(2)), pn.Flatten(), pn.Dense(3),
                         pn.Softmax()])
    params, state = pn.init(net, jax.random.key(0), (4, 5))
    return net, _randomized(params, jax.random.key(2), scale=0.3), state, jax.random.normal(jax.random.key(1),
                                                                                            (BATCH, 4, 5))


@pytest.mark.parametrize("kind", ["classifier", pytest.param("llama", marks=pytest.mark.slow)])
def test_head_attribution_equals_autodiff_of_a_scale_on_each_head(kind):
    """A_h = d S / d s_h at s = 1, s_h a scale on head h's output: gradient x activation by autodiff."""
    if kind == "llama":  # grouped-query attention, rope, no biases, logits out
        net = pn.llama(vocab_size=9, context=6, layers=2, heads=4, features=8, kv_heads=2)
        params, state = pn.init(net, jax.random.key(0), (6,))
        params = _randomized(params, jax.random.key(2), scale=0.3)
        x, position = jax.random.randint(jax.random.key(1), (BATCH, 6), 0, 9), 2
    else:  # float input, an output (batch, classes)
        (net, params, state, x), position = _attention_classifier(), -1
    t = np.array([1, 2, 0])
    got = _jitted(pn.attribution.head_attribution, net, params, state, x, t, position=position)
    paths = _attention_paths(net)
    assert list(got) == paths

    body, bparams, bstate = (net, params, state) if kind == "llama" else (
        net.without_output(), params[:-1], state[:-1])
    heads = {p: dict(pn.layer_paths(net))[p].num_heads for p in paths}

    @jax.jit
    @jax.grad
    def per_example(scales):  # examples are independent: d (sum of scores) / d scales[b] is example b's
        out = pn.forward(_scaled_heads_net(body, scales), bparams, bstate, x)[0]
        out = out[:, position] if out.ndim == 3 else out
        return jnp.sum(out[np.arange(BATCH), t])

    want = per_example({p: jnp.ones((BATCH, heads[p])) for p in paths})
    for p in paths:
        _close(got[p], want[p])
    one = _jitted(pn.attribution.head_attribution, net, params, state, x, t, position=position, layers=paths[-1])
    assert list(one) == paths[-1:]
    _close(one[paths[-1]], got[paths[-1]])  # another compiled program: equal to float64 rounding, not bit for bit


# ---------------------------------------------------------------- jit, traced targets


def test_every_method_under_jit_with_a_traced_target_equals_eager():
    net, params, state, x, _, _ = _case("cnn")
    t = jnp.asarray(TARGETS["per_example"])
    calls = {
        "saliency": lambda p, v, tt: pn.attribution.saliency(net, p, state, v, tt),
        "ig": lambda p, v, tt: pn.attribution.integrated_gradients(net, p, state, v, tt, steps=5,
                                                                   method="riemann_middle", chunk_size=2),
        "grad_cam": lambda p, v, tt: pn.attribution.grad_cam(net, p, state, v, tt, (3,)),
    }
    for name, f in calls.items():
        np.testing.assert_allclose(jax.jit(f)(params, x, t), f(params, x, t), rtol=1e-13, atol=1e-15,
                                   err_msg=name)
        one = jax.jit(f)(params, x, jnp.asarray(2))  # a traced scalar target: every example's class
        np.testing.assert_allclose(one, f(params, x, 2), rtol=1e-13, atol=1e-15, err_msg=name)
    anet, aparams, astate, ax = _attention_classifier()
    h = lambda p, v, tt, b: pn.attribution.head_attribution(anet, p, astate, v, tt, baseline=b)  # noqa: E731
    eager, jitted = h(aparams, ax, t, ax[::-1]), jax.jit(h)(aparams, ax, t, ax[::-1])
    for path in eager:
        np.testing.assert_allclose(jitted[path], eager[path], rtol=1e-13, atol=1e-15)


# ---------------------------------------------------------------- errors


def test_errors_name_the_problem():
    net, params, state, x, _, _ = _case("cnn")
    A = pn.attribution
    with pytest.raises(ValueError, match=r"the path \(42,\) names no layer.*\(0,\) Conv2D"):
        A.grad_cam(net, params, state, x, 0, (42,))
    with pytest.raises(TypeError, match="a tuple of child indices"):
        A.grad_cam(net, params, state, x, 0, "conv")
    with pytest.raises(ValueError, match=r"the layer at \(1,\) is ReLU; name a Conv2D"):
        A.grad_cam(net, params, state, x, 0, (1,))
    with pytest.raises(ValueError, match=r"at \(9,\) \(Softmax\) is the output activation"):
        A.grad_cam(net, params, state, x, 0, (9,))
    with pytest.raises(ValueError, match="unknown integration method 'simpson'.*gausslegendre"):
        A.integrated_gradients(net, params, state, x, 0, method="simpson")
    with pytest.raises(ValueError, match="steps must be an int >= 2 for 'riemann_left'"):
        A.integrated_gradients(net, params, state, x, 0, steps=1, method="riemann_left")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        A.integrated_gradients(net, params, state, x, 0, chunk_size=0)
    with pytest.raises(ValueError, match=r"baseline's shape \(2, 8, 8, 2\) does not broadcast"):
        A.integrated_gradients(net, params, state, x, 0, baseline=jnp.zeros((2, 8, 8, 2)))
    with pytest.raises(TypeError, match="integer class indices"):
        A.saliency(net, params, state, x, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(TypeError, match="target is a class index"):
        A.saliency(net, params, state, x, 1.0)
    with pytest.raises(ValueError, match=r"one int per example, shape \(3,\), got shape \(2,\)"):
        A.saliency(net, params, state, x, np.array([0, 1]))
    with pytest.raises(ValueError, match="target class 3 is out of range for 3 classes"):
        A.saliency(net, params, state, x, 3)
    _, gnet, gparams, gstate = _gpt_twin()
    ids = np.zeros((2, 4), np.int32)
    with pytest.raises(ValueError, match="GPT reads integer ids, which have no gradient"):
        A.saliency(gnet, gparams, gstate, ids, 0)
    with pytest.raises(ValueError, match="no pn.MultiHeadAttention layer"):
        A.head_attribution(net, params, state, x, 0)
    with pytest.raises(ValueError, match=r"the layer at \(0,\) is Conv2D, not a pn.MultiHeadAttention"):
        A.head_attribution(net, params, state, x, 0, layers=[(0,)])
    with pytest.raises(TypeError, match="layers is None, a path or a list of paths"):
        A.head_attribution(net, params, state, x, 0, layers="attention")
    with pytest.raises(ValueError, match=r"baseline's shape \(2, 3\) is not x's \(2, 4\)"):
        A.head_attribution(gnet, gparams, gstate, ids, 0, baseline=np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match="position 4 is out of range for a sequence of 4"):  # found in tracing
        jax.jit(lambda p, i: A.head_attribution(gnet, p, gstate, i, 0, position=4))(gparams, ids)
    seq = pn.Sequential([pn.Dense(3)])  # a (batch, T, classes) output for a method without a position
    sp, ss = pn.init(seq, jax.random.key(0), (4, 2))
    with pytest.raises(ValueError, match=r"must be \(batch, classes\); got shape \(2, 4, 3\)"):
        A.saliency(seq, sp, ss, jnp.ones((2, 4, 2)), 0)
