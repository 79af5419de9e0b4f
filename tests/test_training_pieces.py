"""The training pieces: gradient accumulation, freezing, parameter EMA, rematerialisation,
guards that chain, and sweep taking every option of train."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import purenet as pn
from purenet.testing import compare_trees

NET = pn.Sequential([pn.Dense(8), pn.Tanh(), pn.Residual(pn.Sequential([pn.LayerNorm(), pn.Dense(8)])),
                     pn.Dense(3), pn.Softmax()])


def _data(n=64, seed=0):
    kx, ky = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (n, 5)), jax.random.randint(ky, (n,), 0, 3)


def test_accumulated_micro_batches_give_the_big_batch_update():
    x, y = _data()
    params, state = pn.init(NET, jax.random.key(1), 5)
    big = pn.training.grad_fn(NET, l2=0.1)
    small = pn.accumulate(big, 4)
    v1, g1, _ = big(params, state, x, y, jax.random.key(2))
    v4, g4, _ = small(params, state, x, y, jax.random.key(2))
    np.testing.assert_allclose(v4, v1, rtol=1e-12)
    assert max(compare_trees(g4, g1).values()) <= 1e-12
    with pytest.raises(ValueError, match="does not split into 4 equal micro-batches"):
        small(params, state, x[:10], y[:10], jax.random.key(2))


def test_accumulated_dp_sgd_draws_the_noise_once():
    x, y = _data()
    params, state = pn.init(NET, jax.random.key(1), 5)
    dp = pn.training.dp_sgd(NET, pn.DPSGD(0.5, noise_multiplier=2.0), l2=0.1)
    v1, g1, _ = dp(params, state, x, y, jax.random.key(2))
    v4, g4, _ = pn.accumulate(dp, 4)(params, state, x, y, jax.random.key(2))
    np.testing.assert_allclose(v4, v1, rtol=1e-12)
    assert max(compare_trees(g4, g1).values()) <= 1e-12  # not the mean of four noised gradients
    with pytest.raises(ValueError, match="does not split into 4 equal micro-batches"):
        pn.accumulate(dp, 4)(params, state, x[:10], y[:10], jax.random.key(2))


@pytest.mark.parametrize("run", ["fit", "train"])
def test_fit_and_train_with_accumulate_equal_the_big_batch(run):
    x, y = _data()
    results = []
    for k in (1, 4):
        if run == "fit":
            r = pn.fit(NET, pn.optim.adam(1e-2), (x, y), key=jax.random.key(3), epochs=3, batch_size=32, accumulate=k)
            results.append(r.params)
        else:
            ts, _, _ = pn.train(NET, pn.optim.adam(1e-2), (x, y), key=jax.random.key(3), epochs=3, batch_size=32,
                                accumulate=k)
            results.append(ts.opt_state.params)
    assert max(compare_trees(results[1], results[0]).values()) <= 1e-9
    with pytest.raises(ValueError, match="accumulate must be a positive integer"):
        pn.fit(NET, pn.optim.adam(1e-2), (x, y), key=jax.random.key(3), epochs=1, accumulate=0)


def test_masked_optimizer_freezes_leaves_bit_identically_and_trains_the_rest_as_a_subset():
    x, y = _data()
    params, state = pn.init(NET, jax.random.key(1), 5)
    trainable = jax.tree_util.tree_map_with_path(lambda path, _: path[0].idx != 0, params)  # freeze layer 0
    opt = pn.optim.masked(pn.optim.adamw(1e-2, weight_decay=0.1), trainable)
    s = opt.init(params)
    step = jax.jit(lambda s: opt.step(s, pn.value_and_grad(NET, s.params, state, x, y)[1]))
    for _ in range(5):
        s = step(s)
    chex.assert_trees_all_equal(s.params[0], params[0])  # bit-identical
    # the rest: adamw on the trainable subset alone, layer 0 held as a constant
    rest = pn.optim.adamw(1e-2, weight_decay=0.1)
    r = rest.init(params[1:])
    grads_rest = lambda p: pn.value_and_grad(NET, (params[0], *p), state, x, y)[1][1:]  # noqa: E731
    for _ in range(5):
        r = rest.step(r, grads_rest(r.params))
    assert max(compare_trees(s.params[1:], r.params).values()) <= 1e-12


def test_frozen_layer_returns_zero_grads_and_skips_its_weight_gradient():
    frozen = pn.Sequential([pn.Frozen(pn.Dense(64)), pn.ReLU(), pn.Dense(10), pn.Softmax()])
    plain = pn.Sequential([pn.Dense(64), pn.ReLU(), pn.Dense(10), pn.Softmax()])
    params, state = pn.init(plain, jax.random.key(0), 32)
    x, y = jax.random.normal(jax.random.key(1), (16, 32)), jnp.arange(16) % 10
    _, g_frozen, _ = pn.value_and_grad(frozen, params, state, x, y)
    _, g_plain, _ = pn.value_and_grad(plain, params, state, x, y)
    chex.assert_trees_all_equal(g_frozen[0], jax.tree_util.tree_map(jnp.zeros_like, params[0]))
    chex.assert_trees_all_close(g_frozen[2], g_plain[2], rtol=1e-12)

    def dots(net):
        hlo = jax.jit(lambda p: pn.value_and_grad(net, p, state, x, y)[1]).lower(params).compile().as_text()
        return hlo.count(" dot(")

    # plain: 2 forward, 2 dL/dW, 1 dL/dx (the input's is unused). Frozen first layer: its dL/dW goes, and
    # with it the dL/dx that fed it: 2 forward and the last layer's dL/dW.
    assert (dots(plain), dots(frozen)) == (5, 3)


def test_ema_equals_its_definition_and_fit_can_evaluate_with_it():
    x, y = _data()
    params, state = pn.init(NET, jax.random.key(1), 5)
    opt = pn.optim.ema(pn.optim.sgd(0.1), decay=0.9)
    s, average = opt.init(params), params
    for _ in range(4):
        s = opt.step(s, pn.value_and_grad(NET, s.params, state, x, y)[1])
        average = jax.tree_util.tree_map(lambda a, p: 0.9 * a + 0.1 * p, average, s.params)
    assert max(compare_trees(pn.optim.ema_params(s), average).values()) <= 1e-12
    plain = pn.optim.sgd(0.1).init(params)
    for _ in range(4):
        plain = pn.optim.sgd(0.1).step(plain, pn.value_and_grad(NET, plain.params, state, x, y)[1])
    chex.assert_trees_all_close(s.params, plain.params, rtol=1e-12)  # averaging does not change training
    result = pn.fit(NET, opt, (x, y), key=jax.random.key(0), epochs=2, batch_size=32, validation=(x, y),
                    evaluate_with_ema=True)
    chex.assert_trees_all_equal(result.params, pn.optim.ema_params(result.opt_state))


def test_remat_gives_the_plain_gradients_exactly_with_less_memory():
    blocks = [pn.Sequential([pn.Dense(256), pn.Tanh(), pn.Dense(256), pn.Tanh()]) for _ in range(8)]
    plain = pn.Sequential([*blocks, pn.Dense(10), pn.Softmax()])
    remat = pn.Sequential([*(pn.Remat(b) for b in blocks), pn.Dense(10), pn.Softmax()])
    params, state = pn.init(plain, jax.random.key(0), 256, dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(1), (512, 256), jnp.float32)
    y = jnp.arange(512) % 10
    ours = {net: jax.jit(lambda p, net=net: pn.value_and_grad(net, p, state, x, y)[1]) for net in (plain, remat)}
    chex.assert_trees_all_equal(ours[remat](params), ours[plain](params))

    def checkpointed(p):  # JAX's own rematerialisation of the same blocks, through autodiff
        h = x
        for i, block in enumerate(blocks):
            h = jax.checkpoint(lambda q, v, block=block, i=i: block.forward(q, state[i], v)[0])(p[i], h)
        return pn.loss(pn.Sequential(plain.layers[-2:]), p[-2:], state[-2:], h, y)[0]

    def temp(fn):
        return jax.jit(fn).lower(params).compile().memory_analysis().temp_size_in_bytes

    sizes = {"plain": temp(ours[plain]), "Remat": temp(ours[remat]), "jax.checkpoint": temp(jax.grad(checkpointed))}
    print("16-layer MLP, batch 512, temporary MiB:", {k: v / 2**20 for k, v in sizes.items()})
    assert sizes["Remat"] < 0.7 * sizes["plain"]  # 5.0 MiB against 8.5 MiB on the CPU
    assert sizes["Remat"] <= sizes["jax.checkpoint"]


def test_remat_keeps_dropout_masks_and_batchnorm():
    block = pn.Sequential([pn.Dense(6, use_bias=False), pn.BatchNorm(), pn.ReLU(), pn.Dropout(0.5)])
    x, y = jax.random.normal(jax.random.key(0), (8, 4)), jnp.arange(8) % 3
    plain, remat = (pn.Sequential([b, pn.Dense(3), pn.Softmax()]) for b in (block, pn.Remat(block)))
    params, state = pn.init(plain, jax.random.key(1), 4)
    a = pn.value_and_grad(plain, params, state, x, y, train=True, key=jax.random.key(2))
    b = pn.value_and_grad(remat, params, state, x, y, train=True, key=jax.random.key(2))
    chex.assert_trees_all_close(a, b, rtol=1e-12)
    assert pn.check_grads(remat, x, y, loss="cross_entropy", params=params, state=state, train=True,
                          key=jax.random.key(2)).ok


def test_apply_if_finite_chains():
    guarded = pn.optim.chain(pn.optim.clip_by_global_norm(1.0), pn.optim.apply_if_finite(pn.optim.adam(0.1)))
    params = {"W": jnp.ones(3)}
    s = guarded.init(params)
    s = guarded.step(s, {"W": jnp.array([1.0, jnp.nan, 0.0])})
    chex.assert_trees_all_equal(s.params, params)
    assert int(s.count) == 1


def test_sweep_takes_every_option_of_train():
    x, y = _data()
    result = pn.sweep(lambda hp: (NET, pn.optim.adam(hp["learning_rate"])), (x, y),
                      grid={"seed": [0], "learning_rate": [1e-3, 1e-1]}, epochs=4, batch_size=32,
                      validation=(x, y), early_stopping=pn.EarlyStopping(patience=1), accumulate=2,
                      dp=pn.DPSGD(clip_norm=1.0))
    assert np.asarray(result.history["val_loss"]).shape == (2, 4)


DIGITS_NET = pn.Sequential([pn.Dense(128), pn.LayerNorm(), pn.ReLU(), pn.Dense(128), pn.BatchNorm(), pn.ReLU(),
                            pn.Dense(10), pn.Softmax()], in_shape=64)


@pytest.mark.slow
def test_bfloat16_compute_reaches_float32_accuracy_on_digits():
    data = pn.datasets.digits()
    runs = {}
    for precision in (None, pn.Precision(compute="bfloat16")):
        runs[precision] = pn.fit(DIGITS_NET, pn.optim.adam(1e-3), (data.x_train, data.y_train), key=jax.random.key(0),
                                 epochs=15, batch_size=32, validation=(data.x_test, data.y_test), precision=precision)
    full, half = runs.values()
    assert jax.tree_util.tree_leaves(half.params)[0].dtype == jnp.float32  # float32 master params
    assert not np.allclose(half.history["loss"], full.history["loss"], rtol=1e-4)  # it did compute in bfloat16
    assert half.history["val_accuracy"][-1] >= full.history["val_accuracy"][-1] - 0.005
    assert full.history["val_accuracy"][-1] >= 0.97


def test_mixed_precision_step_computes_in_the_compute_dtype():
    x, y = _data()
    x = x.astype(jnp.float32)
    params, state = pn.init(NET, jax.random.key(1), 5, dtype=jnp.float32)
    fn = pn.training.mixed_precision(NET, pn.Precision(compute="bfloat16"), l2=0.1)
    value, grads, _ = fn(params, state, x, y, jax.random.key(2))
    ref_value, ref_grads, _ = pn.training.grad_fn(NET, l2=0.1)(params, state, x, y, jax.random.key(2))
    chex.assert_trees_all_equal_dtypes(grads, params)
    assert value.dtype == jnp.float32
    assert 0 < max(compare_trees(grads, ref_grads).values()) < 0.05  # bfloat16's rounding, no more
    jaxpr = str(jax.make_jaxpr(fn)(params, state, x, y, jax.random.key(2)))
    assert "bf16[64,8]" in jaxpr and "dot_general" in jaxpr


def test_float16_with_loss_scaling_skips_an_overflow_and_keeps_params_finite():
    x, y = _data()
    x = x.at[7].set(1e5)  # finite in float32, inf in float16: the batch holding it overflows
    precision = pn.Precision(compute="float16", loss_scale=2.0**8)
    opt = pn.optim.apply_if_finite(pn.optim.adam(1e-2), "skip")
    result = pn.fit(NET, opt, (x, y), key=jax.random.key(3), epochs=3, batch_size=16, precision=precision)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(result.params))
    assert int(result.opt_state.count) == 12  # every step counted, the overflowing ones skipped
    with pytest.raises(ValueError, match="Precision compute must be a floating dtype"):
        pn.Precision(compute="int8")


BN_NET = pn.Sequential([pn.Dense(8), pn.BatchNorm(), pn.ReLU(), pn.Dense(3), pn.Softmax()])


def _scale_reference(finite, initial, growth_interval, factor, minimum):
    """The dynamic loss scale by its definition, one step at a time: [(S, n) after each step]."""
    scale, good, out = initial, 0, []
    for ok in finite:
        if not ok:
            scale, good = max(scale / factor, minimum), 0
        else:
            good += 1
            if good == growth_interval:
                scale, good = scale * factor, 0
        out.append((scale, good))
    return out


@pytest.mark.parametrize("jit", [False, True])
def test_dynamic_loss_scale_equals_its_definition_and_a_skipped_step_keeps_params_and_slots(jit):
    opt = pn.optim.chain(pn.optim.dynamic_loss_scale(initial=8.0, growth_interval=3, factor=2.0, minimum=2.0),
                         pn.optim.adam(0.1))
    assert opt.guard == "skip"
    params = {"W": jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float32).reshape(2, 3), "b": jnp.ones(3, jnp.float32)}
    finite = [True, True, True, True, False, True, False, False, False, True, True, True, True, True, True, True]
    step = jax.jit(opt.step) if jit else opt.step
    s, seen = opt.init(params), []
    for i, ok in enumerate(finite):
        g = jax.tree_util.tree_map(lambda p: jnp.cos(p + i), params)
        if not ok:
            g = {**g, "b": g["b"].at[i % 3].set(jnp.inf if i % 2 else jnp.nan)}
        before, s = s, step(s, g)
        seen.append((float(s.slots[0].scale), int(s.slots[0].good_steps)))
        if not ok:  # params and the Adam moments bit-identical; the count advances
            chex.assert_trees_all_equal((s.params, s.slots[1:]), (before.params, before.slots[1:]))
            assert int(s.count) == int(before.count) + 1
        else:
            assert not np.array_equal(s.params["W"], before.params["W"])
    assert seen == _scale_reference(finite, 8.0, 3, 2.0, 2.0)
    assert s.slots[0].scale.dtype == jnp.float32 and s.slots[0].good_steps.dtype == jnp.int32
    assert pn.optim.current_loss_scale(s) == s.slots[0].scale


def test_dynamic_loss_scale_needs_the_skip_guard_and_never_grows_to_inf():
    scale = pn.optim.dynamic_loss_scale()
    with pytest.raises(ValueError, match=r"needs apply_if_finite\(opt, 'skip'\), got guard 'raise'"):
        pn.optim.apply_if_finite(pn.optim.chain(scale, pn.optim.sgd(0.1)), "raise")
    with pytest.raises(ValueError, match="got guard None"):
        pn.optim.Optimizer((scale,), 0.1)
    with pytest.raises(ValueError, match="growth_interval must be a positive integer"):
        pn.optim.dynamic_loss_scale(growth_interval=0)
    with pytest.raises(ValueError, match="loss scale factor"):
        pn.optim.dynamic_loss_scale(factor=1.0)
    top = pn.optim.chain(pn.optim.dynamic_loss_scale(initial=2.0 ** 127, growth_interval=1), pn.optim.sgd(0.1))
    s = top.step(top.init({"w": jnp.ones(2)}), {"w": jnp.ones(2)})
    assert float(s.slots[0].scale) == 2.0 ** 127  # 2^128 is inf in float32: S stays
    twice = pn.optim.chain(scale, pn.optim.sgd(0.1), scale)
    with pytest.raises(ValueError, match="keeps 2 dynamic loss scales"):
        pn.optim.current_loss_scale(twice.init({"w": jnp.ones(2)}))


def test_float16_step_with_dynamic_scale_skips_an_overflow_keeping_params_slots_and_model_state():
    x, y = _data()
    x32 = x.astype(jnp.float32)
    precision = pn.Precision(compute="float16", loss_scale="dynamic")
    opt = precision.optimizer(pn.optim.adam(1e-2))
    params, state = pn.init(BN_NET, jax.random.key(1), 5, dtype=jnp.float32)
    fn = pn.accumulate(pn.training.mixed_precision(BN_NET, precision), 2)
    step = pn.make_step(fn, opt)
    start = (opt.init(params), state)
    ran = {}
    for jit in (False, True):
        run = jax.jit(step) if jit else step
        good, _ = run(start, (x32, y, jax.random.key(2)))
        bad, value = run(good, (x32.at[3].set(1e5), y, jax.random.key(3)))  # 1e5 is inf in float16
        assert not np.isfinite(value)
        chex.assert_trees_all_equal((bad[0].params, bad[0].slots[1:], bad[1]),
                                    (good[0].params, good[0].slots[1:], good[1]))
        assert float(good[0].slots[0].scale) == 2.0 ** 15 and int(good[0].slots[0].good_steps) == 1
        assert float(bad[0].slots[0].scale) == 2.0 ** 14 and int(bad[0].count) == 2
        ran[jit] = good
    # eager and jit may round float16 apart; one Adam step moves a param by at most lr = 1e-2,
    # and float16 rounding (2^-10 relative) moves that step by no more than lr * 2^-10
    chex.assert_trees_all_close(ran[False], ran[True], rtol=0, atol=1e-2 * 2.0 ** -10)
    with pytest.raises(ValueError, match=r"build the state with precision.optimizer\(opt\)"):
        pn.training.mixed_precision(BN_NET, precision)(params, state, x32, y, jax.random.key(2))
    with pytest.raises(ValueError, match=r"build the state with precision.optimizer\(opt\)"):
        step((pn.optim.adam(1e-2).init(params), state), (x32, y, jax.random.key(2)))  # a state without the scale
    with pytest.raises(ValueError, match="gradient function takes no loss_scale="):
        pn.make_step(pn.accumulate(pn.grad_fn(BN_NET), 2), opt)(start, (x32, y, jax.random.key(2)))
    with pytest.raises(ValueError, match="Precision loss_scale must be a positive number or 'dynamic'"):
        pn.Precision(compute="float16", loss_scale="auto")
    with pytest.raises(ValueError, match="initialise the state with this optimizer's init"):
        opt.step(pn.optim.adam(1e-2).init(params), params)


def test_the_step_hands_the_state_scale_to_the_gradient_function():
    x, y = _data()
    x32 = x.astype(jnp.float32)
    params, state = pn.init(NET, jax.random.key(1), 5, dtype=jnp.float32)
    fn = pn.accumulate(pn.training.mixed_precision(NET, pn.Precision(compute="float16")), 2)
    for initial, finite in ((1.0, True), (2.0 ** 40, False)):  # 2^40 overflows float16's seed
        opt = pn.optim.chain(pn.optim.dynamic_loss_scale(initial=initial), pn.optim.sgd(0.1))
        (s, _), _ = pn.make_step(fn, opt)((opt.init(params), state), (x32, y, jax.random.key(2)))
        assert bool(jnp.all(s.params[0]["W"] != params[0]["W"])) == finite
        assert float(s.slots[0].scale) == (initial if finite else initial / 2)


def test_dynamic_scale_state_round_trips_checkpoints_and_fit_resumes_bit_identically(tmp_path):
    x, y = _data()
    x32 = x.astype(jnp.float32)
    precision = pn.Precision(compute="float16", loss_scale="dynamic")
    opt = pn.optim.adam(1e-2)
    run = lambda epochs, **kw: pn.fit(BN_NET, opt, (x32, y), key=jax.random.key(3), epochs=epochs,  # noqa: E731
                                      batch_size=16, precision=precision, **kw)
    whole = run(4)
    assert isinstance(whole.opt_state.slots[0], pn.optim.LossScale)
    np.testing.assert_array_equal(whole.history["loss_scale"], np.full(4, 2.0 ** 15, np.float32))
    pn.save(tmp_path / "state", whole.opt_state)
    loaded = pn.load(tmp_path / "state")  # no `like`: the named tuples come back as purenet's own
    assert type(loaded) is pn.optim.OptState and type(loaded.slots[0]) is pn.optim.LossScale
    chex.assert_trees_all_equal(loaded, whole.opt_state)
    path = tmp_path / "run"
    run(2, checkpoint=path)
    resumed = run(4, checkpoint=path, resume=True)
    chex.assert_trees_all_equal(resumed.opt_state, whole.opt_state)
    np.testing.assert_array_equal(resumed.history["loss_scale"], whole.history["loss_scale"])


@pytest.mark.slow
def test_float16_with_dynamic_scaling_survives_overflows_on_digits_and_reaches_float32_accuracy():
    data = pn.datasets.digits()
    x_bad = jnp.asarray(data.x_train).at[5].set(1e5)  # inf in float16: its batch overflows, once an epoch

    def fit(x, precision):
        return pn.fit(DIGITS_NET, pn.optim.adam(1e-3), (x, data.y_train), key=jax.random.key(0), epochs=15,
                      batch_size=32, validation=(data.x_test, data.y_test), precision=precision)

    full = fit(data.x_train, None)
    half = fit(x_bad, pn.Precision(compute="float16", loss_scale="dynamic"))
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves((half.params, half.state)))
    scales = half.history["loss_scale"]
    print("float16 loss scale after each epoch:", scales)
    assert scales[0] == 2.0 ** 14 and np.all(np.diff(scales) <= 0) and scales[-1] < 2.0 ** 4  # halved per overflow
    assert int(half.opt_state.count) == 15 * (1438 // 32)  # every step counted, the overflowing ones skipped
    print("val accuracy float32, float16:", full.history["val_accuracy"][-1], half.history["val_accuracy"][-1])
    assert half.history["val_accuracy"][-1] >= full.history["val_accuracy"][-1] - 0.01


def test_a_gradient_function_declares_its_contract_and_the_step_reads_it():
    """GradFn replaces function attributes and signature sniffing: what a gradient function takes
    (loss_scale, weight, count) and provides (K-FAC's factors) is declared, and the step checks it."""
    x, y = _data()
    x32 = x.astype(jnp.float32)
    params, state = pn.init(NET, jax.random.key(1), 5, dtype=jnp.float32)
    assert pn.training.grad_fn(NET).takes == frozenset()
    assert pn.training.mixed_precision(NET, pn.Precision(compute="float16")).takes == {"loss_scale"}
    assert pn.training.dp_sgd(NET, pn.DPSGD(1.0)).takes == {"weight"}
    kfac = pn.training.gradients.kfac(NET)
    assert kfac.takes == {"count"} and kfac.provides == ("factors",)
    with pytest.raises(ValueError, match="may take"):
        pn.training.GradFn(lambda *a: a, takes={"loss_scaling"})
    with pytest.raises(ValueError, match="does not accumulate"):
        pn.accumulate(kfac, 2)
    with pytest.raises(ValueError, match="takes no weight="):
        pn.make_step(pn.grad_fn(NET), pn.optim.sgd(0.1))((pn.optim.sgd(0.1).init(params), state),
                                                         (x32, y, jax.random.key(2), jnp.ones(x.shape[0])))

    def mine(params, state, x, y, key, loss_scale=None):  # a user's own: its signature is not read
        value, grads, state = pn.value_and_grad(NET, params, state, x, y, train=True, key=key)
        return value, jax.tree_util.tree_map(lambda g: g * loss_scale / loss_scale, grads), state

    opt = pn.optim.chain(pn.optim.dynamic_loss_scale(initial=4.0), pn.optim.sgd(0.1))
    start = (opt.init(params), state)
    with pytest.raises(ValueError, match=r"takes no loss_scale=.*GradFn\(fn, takes=\{'loss_scale'\}\)"):
        pn.make_step(mine, opt)(start, (x32, y, jax.random.key(2)))
    (declared, _), _ = pn.make_step(pn.training.GradFn(mine, takes={"loss_scale"}), opt)(
        start, (x32, y, jax.random.key(2)))
    (plain, _), _ = pn.make_step(pn.grad_fn(NET), pn.optim.sgd(0.1))(
        (pn.optim.sgd(0.1).init(params), state), (x32, y, jax.random.key(2)))
    chex.assert_trees_all_close(declared.params, plain.params, rtol=1e-6)


def test_fit_and_train_share_one_preparation_of_a_run():
    """pn.training.prepare_run is what fit and train run before their epochs: its epoch, run by hand,
    gives train's first epoch and fit's history; and its checks are theirs (one error for all three)."""
    net = pn.mlp([4, 8, 3])
    x, y = jax.random.normal(jax.random.key(0), (32, 4)), jnp.arange(32) % 3
    opt, key = pn.optim.adam(1e-2), jax.random.key(1)
    run = pn.training.prepare_run(net, opt, (x, y), key=key, epochs=1, batch_size=8)
    assert isinstance(run, pn.training.Run) and run.es is None
    (state, _), record = jax.jit(run.epoch)((run.train_state, run.es), (run.x, run.y, None, jax.random.fold_in(key, 1),
                                                                       None, None))
    trained, history, _ = pn.training.train(net, opt, (x, y), key=key, epochs=1, batch_size=8)
    fitted = pn.fit(net, opt, (x, y), key=key, epochs=1, batch_size=8, progress=False)
    np.testing.assert_allclose(record["loss"], history["loss"][0], rtol=1e-6)
    np.testing.assert_allclose(record["loss"], fitted.history["loss"][0], rtol=1e-6)
    assert max(compare_trees(state.opt_state.params, trained.opt_state.params).values()) <= 1e-6
    for entry in (pn.training.prepare_run, pn.training.train, pn.fit):
        with pytest.raises(ValueError, match="batch_size"):
            entry(net, opt, (x, y), key=key, epochs=1, batch_size=0)
