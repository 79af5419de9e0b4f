"""pn.weights: safetensors files (against the `safetensors` library) and nanoGPT checkpoints (against PyTorch).

The PyTorch reference is our own small model with nanoGPT's module names
and structure (model.py: transformer.wte / wpe / h.{i}.ln_1, attn.c_attn,
attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj / ln_f, lm_head tied to wte), with
nanoGPT's `bias` switch (no Linear or LayerNorm biases when False).
"""
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import purenet as pn

jax.config.update("jax_enable_x64", True)

torch = pytest.importorskip("torch")
safetensors = pytest.importorskip("safetensors")
from safetensors import numpy as st_numpy  # noqa: E402
from safetensors import torch as st_torch  # noqa: E402

nn, F = torch.nn, torch.nn.functional
ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"

# ---------------------------------------------------------------- a nanoGPT-shaped PyTorch reference


class LayerNorm(nn.Module):
    """nanoGPT's LayerNorm: an optional bias."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, d, heads, block_size, bias, mask_buffer):
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d, bias=bias), nn.Linear(d, d, bias=bias)
        self.d, self.heads, self.mask_buffer = d, heads, mask_buffer
        if mask_buffer:  # nanoGPT without flash attention registers the causal mask as a buffer "bias"
            self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size))
                                 .view(1, 1, block_size, block_size))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(self.d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        if self.mask_buffer:
            att = (q @ k.transpose(-2, -1)) / (k.size(-1) ** 0.5)
            att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
            y = F.softmax(att, dim=-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, d))


class MLP(nn.Module):
    def __init__(self, d, bias):
        super().__init__()
        self.c_fc, self.gelu, self.c_proj = nn.Linear(d, 4 * d, bias=bias), nn.GELU(), nn.Linear(4 * d, d, bias=bias)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, d, heads, block_size, bias, mask_buffer):
        super().__init__()
        self.ln_1 = LayerNorm(d, bias)  # registered in model.py's order: ln_1, attn, ln_2, mlp
        self.attn = CausalSelfAttention(d, heads, block_size, bias, mask_buffer)
        self.ln_2 = LayerNorm(d, bias)
        self.mlp = MLP(d, bias)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TorchGPT(nn.Module):
    def __init__(self, vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=16, bias=True, mask_buffer=False):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd), wpe=nn.Embedding(block_size, n_embd), drop=nn.Dropout(0.0),
            h=nn.ModuleList([Block(n_embd, n_head, block_size, bias, mask_buffer) for _ in range(n_layer)]),
            ln_f=LayerNorm(n_embd, bias)))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # nanoGPT's weight tying

    def forward(self, idx):
        pos = torch.arange(idx.shape[1])
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def torch_gpt(bias=True, dtype=torch.float64, seed=0, mask_buffer=False, **kw):
    """Random weights everywhere (gains near 1, biases and embeddings non-zero), so every tensor matters."""
    torch.manual_seed(seed)
    model = TorchGPT(bias=bias, mask_buffer=mask_buffer, **kw).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if name.endswith("ln_1.weight") or name.endswith("ln_2.weight")
                     or name.endswith("ln_f.weight") else 0.0) + 0.3 * torch.randn_like(p))
    return model.eval()


def model_args(model, bias):
    t = model.transformer
    return dict(n_layer=len(t.h), n_head=t.h[0].attn.heads, n_embd=t.wte.weight.shape[1],
                block_size=t.wpe.weight.shape[0], bias=bias, vocab_size=t.wte.weight.shape[0], dropout=0.0)


def logits_of(net, params, ids):
    model, model_params = net.layers[0], params[0]  # pn.gpt = Sequential([GPT, Softmax]): the GPT gives logits
    state = pn.weights.empty_state(net)[0]
    return np.asarray(model.forward(model_params, state, jnp.asarray(ids))[0])


IDS = np.random.default_rng(0).integers(0, 13, size=(3, 8))


# ---------------------------------------------------------------- nanoGPT


@pytest.mark.parametrize("bias", [True, False])
def test_imported_nanogpt_equals_pytorch_in_float64_and_float32(bias):
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        model = torch_gpt(bias, dtype)
        net, params = pn.weights.from_nanogpt(model.state_dict(), heads=2)
        assert jax.tree_util.tree_leaves(params)[0].dtype == np.dtype(str(dtype).removeprefix("torch."))
        with torch.no_grad():
            expect = model(torch.tensor(IDS)).numpy()
        got = logits_of(net, params, IDS)
        diff = np.max(np.abs(got - expect))
        print(f"bias={bias} {dtype}: max |logit difference| {diff:.2e} (logits up to {np.max(np.abs(expect)):.1f})")
        assert diff <= tol * max(1.0, np.max(np.abs(expect)))
        # the loss: cross-entropy over every position against F.cross_entropy
        x, y = IDS[:, :-1], IDS[:, 1:]
        with torch.no_grad():
            ref = F.cross_entropy(model(torch.tensor(x)).flatten(0, 1), torch.tensor(y).flatten()).item()
        value, _ = pn.loss(net, params, pn.weights.empty_state(net), jnp.asarray(x), jnp.asarray(y),
                           loss="cross_entropy")
        assert abs(float(value) - ref) <= tol * max(1.0, abs(ref))


def test_bias_free_net_is_built_from_pn_layers():
    net, params = pn.weights.from_nanogpt(torch_gpt(False).state_dict(), heads=2)
    names = pn.weights.flatten(params)
    assert not any(n.endswith((".beta", ".bq", ".bo", ".b")) for n in names)
    assert isinstance(net.layers[0], pn.GPT) and net.layers[0].bias is False
    net_b, _ = pn.weights.from_nanogpt(torch_gpt(True).state_dict(), heads=2)
    assert net_b == pn.gpt(13, 8, 2, 2, 16)  # bias=True: exactly pn.gpt


@pytest.mark.parametrize("bias", [True, False])
def test_to_nanogpt_loads_strictly_into_pytorch_and_round_trips(bias):
    model = torch_gpt(bias)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    net, params = pn.weights.from_nanogpt(model.state_dict(), heads=2)
    sd = pn.weights.to_nanogpt(net, params)
    assert list(sd) == list(original)  # nanoGPT's names, in model.py's order
    fresh = torch_gpt(bias, seed=1)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, original[k]), k
    assert sd["lm_head.weight"] is sd["transformer.wte.weight"]
    ckpt = pn.weights.to_nanogpt(net, params, checkpoint=True)
    assert ckpt["model_args"] == model_args(model, bias)


def test_checkpoint_dict_with_compile_prefix_and_mask_buffers_loads(tmp_path):
    model = torch_gpt(True, mask_buffer=True)
    assert "transformer.h.0.attn.bias" in model.state_dict()  # the causal-mask buffer
    ckpt = {"model": {"_orig_mod." + k: v for k, v in model.state_dict().items()},
            "model_args": model_args(model, True), "iter_num": 5, "best_val_loss": 2.0, "config": {"lr": 1e-3}}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=True)
    net, params = pn.weights.from_nanogpt(loaded)  # heads from model_args
    with torch.no_grad():
        expect = model(torch.tensor(IDS)).numpy()
    np.testing.assert_allclose(logits_of(net, params, IDS), expect, rtol=0, atol=1e-10)
    # numpy values and a plain state_dict give the same params
    _, same = pn.weights.from_nanogpt({k: v.numpy() for k, v in model.state_dict().items()}, heads=2)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(params),
                                                    jax.tree_util.tree_leaves(same)))


def test_dropout_nets_map_the_same_names_and_torch_stays_unimported():
    model = torch_gpt(False)
    net, params = pn.weights.from_nanogpt({"model": model.state_dict(), "model_args": {**model_args(model, False),
                                                                                    "dropout": 0.1}})
    assert net.layers[0].dropout == 0.1 and "0.body.2.0.1.Wq" in pn.weights.flatten(params)  # a Dropout at 1
    sd = pn.weights.to_nanogpt(net, params)
    assert all(np.array_equal(sd[k], v.numpy()) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="keeps state arrays"):
        pn.weights.empty_state(pn.Sequential([pn.Dense(3), pn.BatchNorm()], in_shape=(2,)))
    code = "import sys, purenet; assert 'torch' not in sys.modules and 'safetensors' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_nanogpt_errors_name_the_problem():
    model = torch_gpt(True)
    sd = dict(model.state_dict())
    with pytest.raises(pn.weights.WeightsError, match="needs heads="):
        pn.weights.from_nanogpt(sd)
    with pytest.raises(pn.weights.WeightsError, match="heads=4 but .* n_head=2"):
        pn.weights.from_nanogpt({"model": sd, "model_args": model_args(model, True)}, heads=4)
    with pytest.raises(pn.weights.WeightsError, match="n_layer=3"):
        pn.weights.from_nanogpt({"model": sd, "model_args": {**model_args(model, True), "n_layer": 3}})
    with pytest.raises(pn.weights.WeightsError, match="lm_head.weight differs"):
        pn.weights.from_nanogpt({**sd, "lm_head.weight": sd["lm_head.weight"] + 1}, heads=2)
    missing = {k: v for k, v in sd.items() if k != "transformer.h.1.mlp.c_fc.bias"}
    with pytest.raises(pn.weights.WeightsError, match="transformer.h.1.mlp.c_fc.bias"):
        pn.weights.from_nanogpt(missing, heads=2)
    with pytest.raises(pn.weights.WeightsError, match="transformer.h.0.extra"):
        pn.weights.from_nanogpt({**sd, "transformer.h.0.extra": sd["transformer.ln_f.bias"]}, heads=2)
    bad = {**sd, "transformer.h.0.attn.c_attn.weight": sd["transformer.h.0.attn.c_attn.weight"][:32]}
    with pytest.raises(pn.weights.WeightsError, match="c_attn"):
        pn.weights.from_nanogpt(bad, heads=2)
    with pytest.raises(pn.weights.WeightsError, match="no 'transformer.wte.weight'"):
        pn.weights.from_nanogpt({"weight": sd["transformer.ln_f.bias"]}, heads=2)
    net = pn.gpt(13, 8, 1, 2, 16, tie_embeddings=False)
    with pytest.raises(pn.weights.WeightsError, match="untied"):
        pn.weights.to_nanogpt(net, pn.init(net, jax.random.key(0))[0])


def test_to_nanogpt_refuses_params_that_do_not_fit_the_net():
    net = pn.gpt(13, 8, 2, 2, 16)
    params, _ = pn.init(net, jax.random.key(0))
    wide, _ = pn.init(pn.gpt(13, 8, 2, 2, 32), jax.random.key(0))  # the same names, every shape different
    for checkpoint in (False, True):
        with pytest.raises(pn.weights.WeightsError, match=r"0.body.0.P has shape \(8, 32\), the net's is \(8, 16\)"):
            pn.weights.to_nanogpt(net, wide, checkpoint=checkpoint)
    bigger, _ = pn.init(pn.gpt(14, 8, 2, 2, 16), jax.random.key(0))  # one tensor off: model_args would lie
    with pytest.raises(pn.weights.WeightsError, match=r"0.token.E has shape \(14, 16\), the net's is \(13, 16\)"):
        pn.weights.to_nanogpt(net, bigger, checkpoint=True)
    with pytest.raises(pn.weights.WeightsError, match=r"fit the net: token.E has shape \(14, 16\)"):  # a bare GPT
        pn.weights.to_nanogpt(net.layers[0], bigger[0])
    one = jax.tree_util.tree_map(lambda a: a, params)
    one[0]["body"][2][1][1]["W"] = jnp.zeros((16, 63))
    with pytest.raises(pn.weights.WeightsError, match=r"0.body.2.1.1.W has shape \(16, 63\), the net's is \(16, 64\)"):
        pn.weights.to_nanogpt(net, one)
    assert pn.weights.to_nanogpt(net, params, checkpoint=True)["model_args"]["n_embd"] == 16


BAD_MODEL_ARGS = [("n_head", 2.7), ("n_head", True), ("n_head", 0), ("n_head", -2), ("n_head", "2"),
                  ("n_layer", 2.5), ("n_layer", False), ("n_embd", True), ("n_embd", 16.5), ("block_size", 8.5),
                  ("vocab_size", 0), ("vocab_size", np.float64(13.2)), ("vocab_size", [13])]


@pytest.mark.parametrize("field,value", BAD_MODEL_ARGS, ids=[f"{f}={v!r}" for f, v in BAD_MODEL_ARGS])
def test_from_nanogpt_needs_positive_integer_model_args(field, value):
    model = torch_gpt(True)
    ckpt = {"model": model.state_dict(), "model_args": {**model_args(model, True), field: value}}
    with pytest.raises(pn.weights.WeightsError, match=rf"model_args' {field} must be a positive integer, "
                                                       rf"got {re.escape(repr(value))}"):
        pn.weights.from_nanogpt(ckpt)


@pytest.mark.parametrize("value", [2.7, True, 0, -1, np.float32(2.5), "2"])
def test_from_nanogpt_needs_a_positive_integer_heads(value):
    pattern = rf"heads must be a positive integer, got {re.escape(repr(value))}"
    with pytest.raises(pn.weights.WeightsError, match=pattern):
        pn.weights.from_nanogpt(torch_gpt(True).state_dict(), heads=value)


@pytest.mark.parametrize("value", [1.0, 1, -0.1, True, float("nan"), "0.1", np.float64(1.5)])
def test_from_nanogpt_needs_a_dropout_in_0_1(value):
    model = torch_gpt(True)
    pattern = rf"dropout must be a number in \[0, 1\), got {re.escape(repr(value))}"
    with pytest.raises(pn.weights.WeightsError, match="model_args' " + pattern):
        pn.weights.from_nanogpt({"model": model.state_dict(), "model_args": {**model_args(model, True),
                                                                             "dropout": value}})
    with pytest.raises(pn.weights.WeightsError, match=pattern):
        pn.weights.from_nanogpt(model.state_dict(), heads=2, dropout=value)


def test_from_nanogpt_takes_numpy_integers_and_integral_floats():
    model = torch_gpt(True)
    args = {k: (np.int64(v) if type(v) is int else v) for k, v in model_args(model, True).items()}
    for ckpt_args, heads in ((args, None), ({**args, "n_head": 2.0, "dropout": np.float32(0.25)}, None),
                             ({**args, "n_head": None}, np.int32(2))):
        net, _ = pn.weights.from_nanogpt({"model": model.state_dict(), "model_args": ckpt_args}, heads=heads)
        assert type(net.layers[0].heads) is int and net.layers[0].heads == 2
        assert net.layers[0].dropout == float(ckpt_args["dropout"])
    with pytest.raises(pn.weights.WeightsError, match="model_args' bias must be a bool, got 1"):
        pn.weights.from_nanogpt({"model": model.state_dict(), "model_args": {**args, "bias": 1}})


# ---------------------------------------------------------------- any state_dict (the README's recipe)


def test_from_state_dict_maps_a_pytorch_cnn_as_the_readme_recipe_says():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).double()
    net = pn.Sequential([pn.Conv2D(4, 3, padding="SAME"), pn.ReLU(), pn.Flatten(), pn.Dense(5)])
    like, state = pn.init(net, jax.random.key(0), (6, 6, 3), dtype=jnp.float64)
    assert list(pn.weights.flatten(like)) == ["0.W", "0.b", "3.W", "3.b"]
    names = {"0.W": "0.weight", "0.b": "0.bias", "3.W": "3.weight", "3.b": "3.bias"}
    # torch flattens (C, H, W), purenet (H, W, C): the Linear's input columns are permuted, then transposed
    flat_linear = lambda w: w.reshape(5, 4, 6, 6).transpose(0, 2, 3, 1).reshape(5, -1).T  # noqa: E731
    params = pn.weights.from_state_dict(like, cnn.state_dict(), names, {"0.W": "conv2d", "3.W": flat_linear})
    x = np.random.default_rng(1).normal(size=(2, 3, 6, 6))  # NCHW
    y, _ = pn.forward(net, params, state, jnp.asarray(x.transpose(0, 2, 3, 1)))  # NCHW -> NHWC
    with torch.no_grad():
        ref = cnn(torch.tensor(x)).numpy()
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-12, atol=1e-12)

    linear = nn.Linear(5, 2).double()
    dense = pn.Sequential([pn.Dense(2)])
    like, _ = pn.init(dense, jax.random.key(0), 5, dtype=jnp.float32)  # float64 weights cast to like's float32
    params = pn.weights.from_state_dict(like, linear.state_dict(), {"0.W": "weight", "0.b": "bias"},
                                        {"0.W": "linear"})
    assert params[0]["W"].dtype == jnp.float32
    np.testing.assert_array_equal(params[0]["W"], linear.weight.detach().numpy().T.astype(np.float32))
    with pytest.raises(pn.weights.WeightsError, match=r"no state_dict key for \['0.b'\]"):
        pn.weights.from_state_dict(like, linear.state_dict(), {"0.W": "weight"}, {"0.W": "linear"})
    with pytest.raises(pn.weights.WeightsError, match=r"gives 0.W shape \(2, 5\), expected \(5, 2\)"):
        pn.weights.from_state_dict(like, linear.state_dict(), {"0.W": "weight", "0.b": "bias"})
    with pytest.raises(pn.weights.WeightsError, match="does not use: \\['extra'\\]"):
        pn.weights.from_state_dict(like, {**linear.state_dict(), "extra": linear.bias},
                                   {"0.W": "weight", "0.b": "bias"}, {"0.W": "linear"})
    with pytest.raises(pn.weights.WeightsError, match="Conv2d weight has 4 axes"):
        pn.weights.from_state_dict(like, linear.state_dict(), {"0.W": "weight", "0.b": "bias"}, {"0.W": "conv2d"})
    with pytest.raises(pn.weights.WeightsError, match="int64, 0.W needs float32"):
        pn.weights.from_state_dict(like, {"w": np.ones((5, 2), np.int64), "b": np.ones(2)}, {"0.W": "w", "0.b": "b"})


def test_from_state_dict_refuses_casts_that_change_values_but_rounds_floats():
    like = {"w": np.zeros(3, np.float32), "i": np.zeros(2, np.int32)}
    names = {"w": "w", "i": "i"}
    w = np.array([1 / 3, np.nan, -np.inf])  # float64: rounded to float32, NaN and inf kept
    got = pn.weights.from_state_dict(like, {"w": w, "i": np.array([-2**31, 2**31 - 1])}, names)
    assert got["w"].dtype == jnp.float32 and bits(got["w"]) == bits(w.astype(np.float32))
    assert got["i"].dtype == jnp.int32 and got["i"].tolist() == [-2**31, 2**31 - 1]
    with pytest.raises(pn.weights.WeightsError, match=r"state_dict\['i'\] -> i: 2147483648 is outside int32's "
                                                       r"range \[-2147483648, 2147483647\]"):
        pn.weights.from_state_dict(like, {"w": w, "i": np.array([0, 2**31])}, names)
    with pytest.raises(pn.weights.WeightsError, match=r"state_dict\['w'\] -> w: the finite float64 value "
                                                       r"1e\+39 overflows float32"):
        pn.weights.from_state_dict(like, {"w": np.array([0.0, 1e39, 1.0]), "i": np.zeros(2, np.int64)}, names)
    with pytest.raises(pn.weights.WeightsError, match=r"-> u: 4294967296 is outside uint32's range"):
        pn.weights.from_state_dict({"u": np.zeros(1, np.uint32)}, {"u": np.array([2**32], np.uint64)}, {"u": "u"})
    with pytest.raises(pn.weights.WeightsError, match=r"-> b: the finite float32 value 1000.0 overflows float8_e4m3fn"):
        pn.weights.from_state_dict({"b": np.zeros(1, ml_dtypes.float8_e4m3fn)}, {"k": np.array([1e3], np.float32)},
                                   {"b": "k"})


def test_from_state_dict_without_x64_refuses_what_jax_would_overflow():
    with jax.enable_x64(False):  # JAX holds like's int64 / float64 as int32 / float32: that is the cast checked
        like = {"i": np.zeros(1, np.int64), "w": np.zeros(1, np.float64)}
        got = pn.weights.from_state_dict(like, {"i": np.array([7]), "w": np.array([0.1])}, {"i": "i", "w": "w"})
        assert got["i"].dtype == jnp.int32 and got["w"].dtype == jnp.float32 and float(got["w"][0]) == np.float32(0.1)
        with pytest.raises(pn.weights.WeightsError, match=r"-> i: 1099511627776 is outside int32's range"):
            pn.weights.from_state_dict(like, {"i": np.array([2**40]), "w": np.array([0.1])}, {"i": "i", "w": "w"})
        with pytest.raises(pn.weights.WeightsError, match=r"-> w: the finite float64 value -1e\+300 overflows float32"):
            pn.weights.from_state_dict(like, {"i": np.array([1]), "w": np.array([-1e300])}, {"i": "i", "w": "w"})


# ---------------------------------------------------------------- safetensors


def every_dtype():
    """One tensor per dtype safetensors names, with awkward values (NaN, inf, extremes) and shapes."""
    rng = np.random.default_rng(0)
    floats = np.array([0.0, -0.0, 1.5, -2.25, np.inf, -np.inf, np.nan, 1e-3])
    tree = {
        "f64": rng.normal(size=(2, 3)), "f32": floats.astype(np.float32).reshape(2, 4),
        "f16": floats.astype(np.float16), "bf16": floats.astype(ml_dtypes.bfloat16).reshape(4, 2),
        "c64": (rng.normal(size=3) + 1j * rng.normal(size=3)).astype(np.complex64),
        "i64": np.array([np.iinfo(np.int64).min, -1, np.iinfo(np.int64).max]),
        "i32": np.arange(-3, 3, dtype=np.int32).reshape(3, 2), "i16": np.array([-32768, 7], np.int16),
        "i8": np.array([-128, 0, 127], np.int8), "u64": np.array([0, np.iinfo(np.uint64).max], np.uint64),
        "u32": np.array([4_000_000_000], np.uint32), "u16": np.array([65535], np.uint16),
        "u8": np.arange(256, dtype=np.uint8).reshape(16, 16), "bool": np.array([[True, False, True]]),
        "scalar": np.array(3.0, np.float32), "empty": np.zeros((0, 5), np.float32),
    }
    for name in ("float8_e5m2", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"):
        tree[name] = np.array([0.5, 1.0, 2.0, 4.0]).astype(getattr(ml_dtypes, name))
    return tree


def bits(a):
    a = np.asarray(a)
    return a.dtype, a.shape, np.ascontiguousarray(a).reshape(-1).view(np.uint8).tobytes()


def test_round_trip_is_exact_for_every_dtype(tmp_path):
    tree = {"layer": every_dtype(), "seq": (np.ones(2, np.float32), [np.zeros(1, np.int8)])}
    path = pn.weights.save_safetensors(tmp_path / "w.safetensors", tree, metadata={"format": "pt", "k": "v"})
    back = pn.weights.load_safetensors(path, tree)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
    for a, b in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(back)):
        assert bits(a) == bits(b)
    flat = pn.weights.load_safetensors(path)
    assert set(flat) == set(pn.weights.flatten(tree)) and "seq.1.0" in flat
    assert pn.weights.safetensors_metadata(path) == {"format": "pt", "k": "v"}
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_the_library_reads_our_file_and_we_read_its(tmp_path):
    tree = every_dtype()
    path = pn.weights.save_safetensors(tmp_path / "ours.safetensors", {"t": tree}, metadata={"who": "purenet"})
    raw = dict(safetensors.deserialize(open(path, "rb").read()))  # the library's parser: every dtype, as bytes
    for name, a in tree.items():
        assert raw["t." + name]["shape"] == list(np.shape(a)) and bytes(raw["t." + name]["data"]) == bits(a)[2]
    plain = {k: v for k, v in tree.items() if np.dtype(v.dtype).name in
             {"float64", "float32", "float16", "complex64", "int64", "int32", "int16", "int8", "uint64", "uint32",
              "uint16", "uint8", "bool"}}
    pn.weights.save_safetensors(tmp_path / "plain.safetensors", plain)
    for name, a in st_numpy.load_file(tmp_path / "plain.safetensors").items():
        assert bits(a) == bits(plain[name])
    with safetensors.safe_open(path, framework="pt") as f:  # bfloat16 through the library's torch path
        assert f.metadata() == {"who": "purenet"}
        bf = f.get_tensor("t.bf16")
        assert bf.dtype == torch.bfloat16
        assert bf.view(torch.int16).numpy().tobytes() == bits(tree["bf16"])[2]
    # the other way: files the library writes (numpy's writer takes bfloat16 and the float8s by name)
    st_numpy.save_file(tree, tmp_path / "theirs.safetensors", metadata={"who": "safetensors"})
    back = pn.weights.load_safetensors(tmp_path / "theirs.safetensors", tree)
    for name in tree:
        assert bits(back[name]) == bits(tree[name]), name
    st_torch.save_file({"w": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)}, tmp_path / "torch.safetensors")
    w = pn.weights.load_safetensors(tmp_path / "torch.safetensors")["w"]
    assert w.dtype == ml_dtypes.bfloat16 and np.array_equal(w.astype(np.float32), np.arange(6.0).reshape(2, 3))
    assert pn.weights.safetensors_metadata(tmp_path / "theirs.safetensors") == {"who": "safetensors"}


def test_gpt_params_save_and_load_with_the_documented_names(tmp_path):
    net = pn.gpt(11, 8, 1, 2, 16)
    params, _ = pn.init(net, jax.random.key(0))
    names = list(pn.weights.flatten(params))
    assert "0.token.E" in names and "0.body.0.P" in names and "0.body.1.0.1.Wq" in names
    assert "0.body.1.1.3.W" in names and "0.body.2.gamma" in names
    path = pn.weights.save_safetensors(tmp_path / "gpt.safetensors", params)
    assert set(st_numpy.load_file(path)) == set(names)
    back = pn.weights.load_safetensors(path, params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(params),
                                                    jax.tree_util.tree_leaves(back)))
    # a nanoGPT state_dict saved flat keeps its names: the file loads straight into from_nanogpt
    sd = pn.weights.to_nanogpt(net, params)
    path = pn.weights.save_safetensors(tmp_path / "nano.safetensors", sd)
    net2, params2 = pn.weights.from_nanogpt(pn.weights.load_safetensors(path), heads=2)
    assert net2 == net and all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(params),
                                                                    jax.tree_util.tree_leaves(params2)))


def test_like_mismatches_are_errors_naming_the_tensor(tmp_path):
    tree = {"a": np.zeros((2, 3), np.float32), "b": {"c": np.ones(4, np.int32)}}
    path = pn.weights.save_safetensors(tmp_path / "w.safetensors", tree)
    with pytest.raises(pn.weights.WeightsError, match=r"missing tensors \['b.d'\], extra tensors \['b.c'\]"):
        pn.weights.load_safetensors(path, {"a": tree["a"], "b": {"d": tree["b"]["c"]}})
    with pytest.raises(pn.weights.WeightsError, match=r"tensor a has shape \(2, 3\), expected \(3, 2\)"):
        pn.weights.load_safetensors(path, {"a": np.zeros((3, 2), np.float32), "b": tree["b"]})
    with pytest.raises(pn.weights.WeightsError, match="tensor b.c has dtype int32, expected float32"):
        pn.weights.load_safetensors(path, {"a": tree["a"], "b": {"c": np.ones(4, np.float32)}})
    shapes = jax.eval_shape(lambda: jax.tree_util.tree_map(jnp.asarray, tree))  # like may be shapes alone
    assert pn.weights.load_safetensors(path, shapes)["b"]["c"].dtype == jnp.int32
    assert isinstance(pn.WeightsError("x"), pn.CheckpointError) and isinstance(pn.WeightsError("x"), ValueError)


def test_unsavable_trees_are_errors_before_anything_is_written(tmp_path):
    path = tmp_path / "w.safetensors"
    pn.weights.save_safetensors(path, {"keep": np.ones(3, np.float32)})
    before = path.read_bytes()
    with pytest.raises(TypeError, match="tensor x.z has dtype complex128"):
        pn.weights.save_safetensors(path, {"x": {"y": np.ones(1), "z": np.ones(1, np.complex128)}})
    with pytest.raises(TypeError, match="PRNG key"):
        pn.weights.save_safetensors(path, {"k": jax.random.key(0)})
    with pytest.raises(ValueError, match="'a.b'"):
        pn.weights.save_safetensors(path, {"a.b": np.ones(1), "a": {"b": np.ones(1)}})
    with pytest.raises(TypeError, match="bare array"):
        pn.weights.save_safetensors(path, np.ones(1))
    with pytest.raises(TypeError, match="metadata"):
        pn.weights.save_safetensors(path, {"a": np.ones(1)}, metadata={"n": 1})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["w.safetensors"]


# ---------------------------------------------------------------- hostile files


def st_file(header, data=b"", length=None, pad=True):
    text = header if isinstance(header, bytes) else __import__("json").dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text) if length is None else length) + text + data


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "I8", "shape": [4], "data_offsets": [8, 12]}}

HOSTILE = [
    ("short", b"\x01\x02", "shorter than the 8-byte header length"),
    ("huge header length", st_file(GOOD, bytes(12), length=2**63), "claims 9223372036854775808 bytes, more than"),
    ("header past the end", st_file(GOOD, bytes(12), length=4096), "truncated: the header claims 4096 bytes"),
    ("truncated data", st_file(GOOD, bytes(10)), "truncated: the header describes 12 data bytes, the file holds 10"),
    ("trailing bytes", st_file(GOOD, bytes(14)), "has trailing bytes"),
    ("offsets past the file", st_file({**GOOD, "b": {**GOOD["b"], "data_offsets": [8, 8 + 2**40], "shape": [2**40]}},
                                      bytes(12)), "truncated: the header describes 1099511627784 data bytes"),
    ("size lies", st_file({**GOOD, "b": {**GOOD["b"], "shape": [5]}}, bytes(12)), "need 5 bytes"),
    ("overlap", st_file({**GOOD, "b": {**GOOD["b"], "data_offsets": [4, 8]}}, bytes(8)), "overlaps"),
    ("gap", st_file({**GOOD, "b": {**GOOD["b"], "data_offsets": [9, 13]}}, bytes(13)), "gap of 1 bytes"),
    ("not starting at 0", st_file({"a": {**GOOD["a"], "data_offsets": [4, 12]}}, bytes(12)), "gap of 4"),
    ("reversed offsets", st_file({"a": {**GOOD["a"], "data_offsets": [8, 0]}}, bytes(8)), "0 <= begin <= end"),
    ("unknown dtype", st_file({"a": {**GOOD["a"], "dtype": "F128"}}, bytes(8)), "unknown dtype 'F128'"),
    ("negative shape", st_file({"a": {**GOOD["a"], "shape": [-2]}}, bytes(8)), "non-negative integers"),
    ("float shape", st_file({"a": {**GOOD["a"], "shape": [2.0]}}, bytes(8)), "non-negative integers"),
    ("bool offsets", st_file({"a": {**GOOD["a"], "data_offsets": [False, 8]}}, bytes(8)), "data_offsets"),
    ("extra field", st_file({"a": {**GOOD["a"], "code": "print(1)"}}, bytes(8)), "exactly dtype, shape and"),
    ("entry not an object", st_file({"a": [1, 2]}), "exactly dtype, shape and data_offsets"),
    ("non-JSON", st_file(b"{not json at all}"), "not JSON"),
    ("NaN literal", st_file(b'{"a": NaN}'), "not JSON"),
    ("not an object", st_file(b"[1, 2, 3]"), "does not start with '{'"),
    ("not UTF-8", st_file(b'{"\xff": 1}'), "not UTF-8"),
    ("duplicate names", st_file(b'{"a": {}, "a": {}}'), "names 'a' twice"),
    ("metadata not strings", st_file({"__metadata__": {"k": 1}}), "__metadata__ must be an object of strings"),
    ("deep nesting", st_file(b"{" + b'"a":[' * 100000 + b"]" * 100000 + b"}"), "not JSON"),
    ("bool bytes", st_file({"a": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}, b"\x00\x02"),
     "byte other than 0 and 1"),
]


class Spy:
    """A file that records how far anything read or sought."""

    def __init__(self, f, size, log):
        self.f, self.size, self.log = f, size, log

    def read(self, n=-1):
        out = self.f.read(n)
        self.log.append(self.f.tell())
        return out

    def readinto(self, b):
        n = self.f.readinto(b)
        self.log.append(self.f.tell())
        return n

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.f.close()


@pytest.mark.parametrize("case,content,message", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_files_are_clear_errors_that_read_nothing_beyond_the_file(tmp_path, monkeypatch, case, content,
                                                                          message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    log = []
    monkeypatch.setattr(pn.weights, "open", lambda p, mode: Spy(open(p, mode), len(content), log), raising=False)
    with pytest.raises(pn.weights.WeightsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pn.weights.load_safetensors(path)
    assert all(pos <= len(content) for pos in log)
    if case != "bool bytes":  # everything else is refused from the header alone
        header_end = 8 + struct.unpack("<Q", content[:8])[0] if len(content) >= 8 else 0
        assert all(pos <= min(header_end, len(content)) for pos in log)


def test_a_hand_written_file_loads_and_the_library_agrees(tmp_path):
    content = st_file(GOOD, np.array([1.5, -2], np.float32).tobytes() + bytes([1, 2, 3, 255]))
    (tmp_path / "good.safetensors").write_bytes(content)
    ours = pn.weights.load_safetensors(tmp_path / "good.safetensors")
    theirs = st_numpy.load_file(tmp_path / "good.safetensors")
    assert list(ours) == ["a", "b"] and all(bits(ours[k]) == bits(theirs[k]) for k in theirs)
    assert ours["b"].tolist() == [1, 2, 3, -1]


# ---------------------------------------------------------------- the example


def test_finetune_example_runs_on_a_pytorch_checkpoint(tmp_path):
    if not SHAKESPEARE.exists():
        pytest.skip(f"the shared data file {SHAKESPEARE} is not there")
    model = torch_gpt(True, torch.float32, vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=16)
    ckpt = {"model": {"_orig_mod." + k: v.clone() for k, v in model.state_dict().items()},
            "model_args": model_args(model, True), "iter_num": 0}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    env = dict(os.environ, PURENET_FAST="1", MPLBACKEND="Agg", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "finetune_nanogpt.py"), str(tmp_path / "ckpt.pt"),
                          "--out", str(tmp_path / "curves.png"), "--out-dir", str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "validation loss before fine-tuning" in out.stdout and "token embedding unchanged: True" in out.stdout
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    back = torch.load(tmp_path / "out" / "finetuned.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(back["model"], strict=True)  # nanoGPT's model takes the fine-tuned weights
    assert torch.equal(back["model"]["transformer.wte.weight"], ckpt["model"]["_orig_mod.transformer.wte.weight"])
    assert not torch.equal(back["model"]["transformer.h.0.mlp.c_fc.weight"],
                           ckpt["model"]["_orig_mod.transformer.h.0.mlp.c_fc.weight"])
    flat = st_numpy.load_file(tmp_path / "out" / "finetuned.safetensors")
    assert all(np.array_equal(flat[k], v.numpy()) for k, v in back["model"].items())
