"""Training: strategies, exactness against a hand loop, early stopping, sweeps, data checks."""
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import purenet as pn


@pytest.fixture(scope="module")
def digits():
    return pn.datasets.digits(dtype=np.float64)


@pytest.fixture(scope="module")
def small(digits):
    return digits.x_train[:240], digits.y_train[:240]


NET = pn.mlp([64, 32, 10], hidden="tanh")


@pytest.mark.parametrize("batch_size,lr", [(None, 0.5), (32, 0.1), (1, 0.01)])
def test_full_mini_and_stochastic_batches_reduce_the_loss(small, batch_size, lr):
    x, y = small
    result = pn.fit(NET, pn.optim.sgd(lr), (x, y), key=jax.random.key(0), epochs=5, batch_size=batch_size)
    before = pn.loss(NET, *pn.init(NET, jax.random.fold_in(jax.random.key(0), 0), dtype=x.dtype), x, y)[0]
    after = pn.loss(NET, result.params, result.state, x, y)[0]
    assert float(after) < 0.5 * float(before)
    assert np.all(np.diff(result.history["loss"]) < 0)


def test_full_batch_trainer_equals_a_hand_written_loop_exactly(small):
    x, y = small
    opt = pn.optim.momentum(0.1)
    key = jax.random.key(3)
    train_state, history, _ = jax.jit(
        lambda k: pn.train(NET, opt, (x, y), key=k, epochs=6, batch_size=None, l2=1e-3))(key)
    params, state = pn.init(NET, jax.random.fold_in(key, 0), in_dim=64, dtype=x.dtype)
    opt_state = opt.init(params)

    @jax.jit  # one compiled step, as inside the trainer's scan
    def step(opt_state, state):
        value, grads, state = pn.value_and_grad(NET, opt_state.params, state, x, y, l2=1e-3, train=True)
        return opt.step(opt_state, grads), state, value

    losses = []
    for _ in range(6):
        opt_state, state, value = step(opt_state, state)
        losses.append(value)
    chex.assert_trees_all_equal(train_state.opt_state.params, opt_state.params)
    np.testing.assert_array_equal(history["loss"], np.array(losses))


def test_every_example_is_used_despite_a_partial_last_batch():
    x = jnp.arange(10.0)[:, None]
    seen = set()
    net = pn.Sequential([pn.Dense(1, init="zeros", use_bias=False), pn.Identity()])
    params, state = pn.init(net, jax.random.key(0), in_dim=1)
    train_state = pn.TrainState(pn.optim.sgd(0.0).init(params), state, jnp.zeros((), jnp.int32))
    for epoch in range(12):
        ts = train_state._replace(epoch=jnp.asarray(epoch, jnp.int32))
        n, bs = 10, 4
        order = pn.shuffle.permutation(jax.random.key(0), n, salt=epoch)[: (n // bs) * bs]
        seen |= set(np.asarray(order).tolist())
        _, loss = pn.train_epoch(net, pn.optim.sgd(0.0), ts, x, x, jax.random.key(0), batch_size=bs, loss="mse")
        np.testing.assert_allclose(loss, jnp.mean(x[order] ** 2), rtol=1e-12)
    assert seen == set(range(10))


def test_same_key_gives_bit_identical_runs_and_other_keys_differ(small):
    x, y = small
    net = pn.mlp([64, 16, 10], dropout=0.2)
    run = lambda k: pn.fit(net, pn.optim.adam(1e-2), (x, y), key=k, epochs=2, batch_size=16,  # noqa: E731
                           augment=pn.augment.gaussian_noise(0.1))
    a, b, c = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
    chex.assert_trees_all_equal(a.params, b.params)
    np.testing.assert_array_equal(a.history["loss"], b.history["loss"])
    assert not np.array_equal(a.history["loss"], c.history["loss"])


def test_fit_history_and_result_fields(small):
    x, y = small
    result = pn.fit(NET, pn.optim.adam(pn.schedules.exponential_decay(1e-2, 7, 0.5)), (x, y),
                    key=jax.random.key(0), epochs=3, batch_size=32, validation=(x[:50], y[:50]))
    assert set(result.history) == {"loss", "learning_rate", "val_loss", "val_accuracy"}
    assert all(len(v) == 3 for v in result.history.values())
    np.testing.assert_allclose(result.history["learning_rate"], [1e-2 * 0.5 ** (s / 7) for s in (6, 13, 20)],
                               rtol=1e-6)
    assert int(result.opt_state.count) == 21
    acc = pn.metrics.accuracy(NET, result.params, result.state, x[:50], y[:50])
    np.testing.assert_allclose(result.history["val_accuracy"][-1], acc)


# ------------------------------------------------------------------ early stopping


def test_early_stopping_state_machine_on_a_scripted_sequence():
    es_config = pn.EarlyStopping(patience=2, min_delta=0.01)
    es = es_config.init({"w": jnp.zeros(())}, {})
    values = [1.0, 0.8, 0.795, 0.9, 0.85, 0.5]
    stopped_at = None
    for epoch, v in enumerate(values):
        es = es_config.update(es, v, epoch, {"w": jnp.asarray(float(epoch))}, {})
        if bool(es.stopped) and stopped_at is None:
            stopped_at = epoch
    # 0.795 is not an improvement by more than min_delta; 0.9 makes two epochs without one
    assert stopped_at == 3
    assert int(es.best_epoch) == 1 and float(es.best) == pytest.approx(0.8)
    assert float(es.best_params["w"]) == 1.0  # the later 0.5 came after the stop and is ignored


def test_early_stopping_mode_follows_the_monitor():
    assert pn.EarlyStopping(2).mode == "min" and pn.EarlyStopping(2, monitor="loss").mode == "min"
    es_config = pn.EarlyStopping(patience=1, monitor="val_accuracy")
    assert es_config.mode == "max"
    es = es_config.init({"w": jnp.zeros(())}, {})
    for epoch, v in enumerate([0.5, 0.7, 0.6]):
        es = es_config.update(es, v, epoch, {"w": jnp.asarray(float(epoch))}, {})
    assert int(es.best_epoch) == 1 and float(es.best_params["w"]) == 1.0  # the best accuracy, not the worst
    with pytest.raises(ValueError, match="EarlyStopping monitor must be one of .* got 'val_acc'"):
        pn.EarlyStopping(2, monitor="val_acc")


def test_early_stopping_max_mode():
    es_config = pn.EarlyStopping(patience=1, monitor="val_accuracy", mode="max")
    es = es_config.init({}, {})
    for epoch, v in enumerate([0.5, 0.7, 0.6]):
        es = es_config.update(es, v, epoch, {}, {})
    assert bool(es.stopped) and int(es.best_epoch) == 1


def test_fit_stops_early_and_restores_the_best_params(small):
    x, y = small
    xv, yv = x[200:], y[200:]
    opt = pn.optim.adam(3e-2)  # fast enough to overfit 200 examples
    result = pn.fit(NET, opt, (x[:200], y[:200]), key=jax.random.key(0), epochs=60, batch_size=20,
                    validation=(xv, yv), early_stopping=pn.EarlyStopping(patience=3))
    assert result.stopped_epoch is not None and result.stopped_epoch < 59
    best = int(np.argmin(result.history["val_loss"]))
    assert result.stopped_epoch == best + 3
    replay = pn.fit(NET, opt, (x[:200], y[:200]), key=jax.random.key(0), epochs=best + 1, batch_size=20,
                    validation=(xv, yv))
    chex.assert_trees_all_close(result.params, replay.params, rtol=1e-6)
    np.testing.assert_allclose(pn.loss(NET, result.params, result.state, xv, yv)[0],
                               result.history["val_loss"][best], rtol=1e-6)


def test_train_with_early_stopping_skips_later_epochs(small):
    x, y = small
    _, history, es = pn.train(NET, pn.optim.adam(3e-2), (x[:200], y[:200]), key=jax.random.key(0),
                              epochs=40, batch_size=20, validation=(x[200:], y[200:]),
                              early_stopping=pn.EarlyStopping(patience=3))
    stop = int(es.best_epoch) + 3
    assert np.all(np.isfinite(history["loss"][: stop + 1]))
    assert np.all(np.isnan(history["loss"][stop + 1:]))


def test_early_stopping_on_validation_metrics_needs_validation(small):
    with pytest.raises(ValueError, match="needs validation data"):
        pn.fit(NET, pn.optim.sgd(0.1), small, key=jax.random.key(0), epochs=1,
               early_stopping=pn.EarlyStopping(patience=2))


# ------------------------------------------------------------------ augmentation


@pytest.mark.parametrize("augment", [
    pn.augment.gaussian_noise(0.3),
    pn.augment.random_translation((8, 8), 2),
    pn.augment.compose(pn.augment.random_translation((8, 8), 1), pn.augment.gaussian_noise(0.1)),
])
def test_augmentations_keep_shapes_and_dtypes_and_are_deterministic(small, augment):
    x, y = jnp.asarray(small[0][:16], jnp.float32), jnp.asarray(small[1][:16])
    a = augment(jax.random.key(0), x, y)
    b = augment(jax.random.key(0), x, y)
    c = augment(jax.random.key(1), x, y)
    chex.assert_trees_all_equal_shapes_and_dtypes(a, (x, y))
    chex.assert_trees_all_equal(a, b)
    assert not np.array_equal(a[0], c[0])
    np.testing.assert_array_equal(a[1], y)


def test_translation_moves_pixels_as_stated():
    image = jnp.zeros((5, 6)).at[2, 3].set(1.0)
    aug = pn.augment.random_translation((5, 6), 2)
    shifted, _ = aug(jax.random.key(4), image.reshape(1, -1), jnp.zeros(1))
    dy, dx = np.asarray(jax.random.randint(jax.random.key(4), (1, 2), -2, 3))[0]
    expected = np.zeros((5, 6))
    expected[2 + dy, 3 + dx] = 1.0
    np.testing.assert_array_equal(shifted.reshape(5, 6), expected)
    # pixels shifted in from outside are zero: a full image moved by (1, -2)
    ones = jnp.ones((1, 4, 4))
    mover = pn.augment.random_translation((4, 4), 2)
    keys = [k for k in range(50) if tuple(np.asarray(jax.random.randint(jax.random.key(k), (1, 2), -2, 3))[0]) == (1, -2)]
    moved, _ = mover(jax.random.key(keys[0]), ones.reshape(1, -1), jnp.zeros(1))
    np.testing.assert_array_equal(moved.reshape(4, 4), np.pad(np.ones((3, 2)), ((1, 0), (0, 2))))


def test_mixup_mixes_inputs_and_labels_with_one_lambda():
    x = jnp.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    y = jnp.array([0, 1, 2])
    mx, my = pn.augment.mixup(0.4, 3)(jax.random.key(0), x, y)
    chex.assert_shape(my, (3, 3))
    np.testing.assert_allclose(jnp.sum(my, axis=1), 1.0, rtol=1e-6)
    lam = float(jnp.max(my))  # the own label keeps weight lam >= 1 - lam, or the partner's
    lam = max(lam, 1 - lam)
    # each mixed row is lam * x_i + (1 - lam) * x_j for the j its label mixes with
    for i in range(3):
        weights = np.asarray(my[i])
        np.testing.assert_allclose(mx[i], weights @ np.asarray(x), rtol=1e-5)


def test_fit_with_mixup_trains(small):
    x, y = small
    result = pn.fit(NET, pn.optim.adam(1e-2), (x, y), key=jax.random.key(0), epochs=3, batch_size=32,
                    augment=pn.augment.mixup(0.2, 10))
    assert result.history["loss"][-1] < result.history["loss"][0]


# ------------------------------------------------------------------ metrics


def test_batched_metrics_equal_one_pass(small):
    x, y = small
    params, state = pn.init(NET, jax.random.key(0), dtype=x.dtype)
    out, _ = pn.forward(NET, params, state, x)
    np.testing.assert_allclose(pn.metrics.predict(NET, params, state, x, batch_size=7), out, rtol=1e-12)
    acc = pn.metrics.accuracy(NET, params, state, x, y, batch_size=7)
    np.testing.assert_allclose(acc, np.mean(np.argmax(out, 1) == y))
    cm = pn.metrics.confusion_matrix(NET, params, state, x, y, 10, batch_size=50)
    assert int(cm.sum()) == len(x) and int(jnp.trace(cm)) == int(round(float(acc) * len(x)))
    np.testing.assert_allclose(pn.metrics.per_class_accuracy(cm)[3],
                               np.mean(np.argmax(out, 1)[y == 3] == 3))


def test_accuracy_of_a_sequence_model_reads_integer_labels_per_position():
    """Integer labels (n, T) are classes at every position (they were once read as distributions over T)."""
    net = pn.gpt(vocab_size=5, context=4, layers=1, heads=1, features=4)
    params, state = pn.init(net, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (6, 4), 0, 5)
    labels = jnp.roll(ids, -1, axis=1)
    out, _ = pn.forward(net, params, state, ids)
    expected = np.mean(np.argmax(out, -1) == labels)
    np.testing.assert_allclose(pn.metrics.accuracy(net, params, state, ids, labels), expected)
    cm = pn.metrics.confusion_matrix(net, params, state, ids, labels, 5)
    assert int(cm.sum()) == labels.size and int(jnp.trace(cm)) == int(round(expected * labels.size))


def test_predicted_classes_come_from_the_logits():
    """A final Softmax/Sigmoid is skipped: same classes as the probabilities, and logits break their ties."""
    x = jnp.array([[800.0, 790.0, 0.0], [0.0, 1.0, 2.0], [-3.0, 5.0, 5.5]])
    net = pn.Sequential([pn.Identity(), pn.Softmax()])
    params, state = pn.init(net, jax.random.key(0), in_dim=3)
    probs, _ = pn.forward(net, params, state, x)
    np.testing.assert_array_equal(pn.metrics.predicted_classes(net, params, state, x), np.argmax(x, 1))
    np.testing.assert_array_equal(np.argmax(probs[1:], 1), [2, 2])
    z = jnp.array([[-40.0], [1e-9], [0.0], [3.0]], jnp.float32)  # sigmoid(1e-9) rounds to 1/2
    binary = pn.Sequential([pn.Identity(), pn.Sigmoid()])
    params, state = pn.init(binary, jax.random.key(0), in_dim=1)
    assert float(pn.forward(binary, params, state, z)[0][1, 0]) == 0.5
    np.testing.assert_array_equal(pn.metrics.predicted_classes(binary, params, state, z), [0, 1, 0, 1])
    one_unit_softmax = pn.Sequential([pn.Identity(), pn.Softmax()])  # probability 1: always class 1
    np.testing.assert_array_equal(pn.metrics.predicted_classes(one_unit_softmax, ({}, {}), ({}, {}), z), [1] * 4)
    no_head = pn.Sequential([pn.Identity()])
    np.testing.assert_array_equal(pn.metrics.predicted_classes(no_head, ((),), ((),), z * 0 + 0.7), [1] * 4)


def test_confusion_matrix_by_hand():
    net = pn.Sequential([pn.Identity(), pn.Softmax()])
    x = jnp.array([[5.0, 0, 0], [0, 5.0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    cm = pn.metrics.confusion_matrix(net, ({}, {}), ({}, {}), x, jnp.array([0, 1, 2, 2]), 3)
    np.testing.assert_array_equal(cm, [[1, 0, 0], [0, 1, 0], [0, 1, 1]])
    np.testing.assert_allclose(pn.metrics.per_class_accuracy(cm), [1.0, 1.0, 0.5])


# ------------------------------------------------------------------ sweeps


def test_sweep_equals_separate_runs(small):
    x, y = small
    data, validation = (x[:200], y[:200]), (x[200:], y[200:])

    def build(hp):  # the structure must not depend on hp, so Dropout is there even at rate 0
        net = pn.Sequential([pn.Dense(16), pn.ReLU(), pn.Dropout(hp["dropout"]), pn.Dense(10), pn.Softmax()])
        return net, pn.optim.adam(hp["learning_rate"])

    grid = {"learning_rate": [3e-3, 1e-2], "dropout": [0.0, 0.3], "l2": [0.0, 1e-3], "seed": [0, 1]}
    result = pn.sweep(build, data, grid=grid, epochs=2, batch_size=25, validation=validation)
    assert len(result) == 16
    for i in (0, 5, 10, 15):
        hp = result.config(i)
        net, opt = build(hp)
        ts, history, _ = pn.train(net, opt, data, key=jax.random.key(hp["seed"]), epochs=2, batch_size=25,
                                  l2=hp["l2"], validation=validation)
        params, _ = result.member(i)
        chex.assert_trees_all_close(params, ts.opt_state.params, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(result.history["val_loss"][i], history["val_loss"], rtol=1e-6)
    best = result.best("val_accuracy")
    assert result.history["val_accuracy"][best, -1] == np.max(result.history["val_accuracy"][:, -1])


def test_sweep_rejects_batch_size_and_needs_seeds(small):
    with pytest.raises(ValueError, match="batch_size cannot be swept"):
        pn.sweep(lambda hp: (NET, pn.optim.sgd(0.1)), small, grid={"seed": [0], "batch_size": [8]}, epochs=1)
    with pytest.raises(ValueError, match="'seed'"):
        pn.sweep(lambda hp: (NET, pn.optim.sgd(0.1)), small, grid={"learning_rate": [0.1]}, epochs=1)


# ------------------------------------------------------------------ data checks


def test_fit_names_bad_data(small):
    x, y = small
    bad = np.array(x)
    bad[17, 3] = np.nan
    with pytest.raises(ValueError, match="row 17"):
        pn.fit(NET, pn.optim.sgd(0.1), (bad, y), key=jax.random.key(0), epochs=1)
    with pytest.raises(ValueError, match="label 10 is out of range for 10 classes"):
        pn.fit(NET, pn.optim.sgd(0.1), (x, np.where(y == 3, 10, y)), key=jax.random.key(0), epochs=1)
    with pytest.raises(ValueError, match="label -1"):
        pn.fit(NET, pn.optim.sgd(0.1), (x, np.where(y == 3, -1, y)), key=jax.random.key(0), epochs=1)
    with pytest.raises(ValueError, match="240 rows but its targets have 239"):
        pn.fit(NET, pn.optim.sgd(0.1), (x, y[:-1]), key=jax.random.key(0), epochs=1)
    with pytest.raises(TypeError, match="floating-point"):
        pn.fit(NET, pn.optim.sgd(0.1), (x.astype(np.int32), y), key=jax.random.key(0), epochs=1)
    with pytest.raises(ValueError, match="validation x has a non-finite value"):
        pn.fit(NET, pn.optim.sgd(0.1), (x, y), key=jax.random.key(0), epochs=1, validation=(bad, y))


def test_train_and_sweep_check_data_like_fit(small):
    x, y = small
    build = lambda hp: (NET, pn.optim.sgd(hp["learning_rate"]))  # noqa: E731
    grid = {"learning_rate": [0.1], "seed": [0]}
    for bad_y, message in [(y[:-1], "240 rows but its targets have 239"),
                           (np.where(y == 3, 10, y), "label 10 is out of range for 10 classes")]:
        with pytest.raises(ValueError, match=message):
            pn.train(NET, pn.optim.sgd(0.1), (x, bad_y), key=jax.random.key(0), epochs=1)
        with pytest.raises(ValueError, match=message):
            pn.sweep(build, (x, bad_y), grid=grid, epochs=1)
    bad = np.array(x)
    bad[5, 0] = np.nan
    with pytest.raises(ValueError, match="validation x has a non-finite value .* row 5"):
        pn.sweep(build, (x, y), grid=grid, epochs=1, validation=(bad, y))


# ------------------------------------------------------------------ the real task


def test_digits_reaches_97_percent(digits, record_property):
    net = pn.mlp([64, 128, 64, 10], dropout=0.3)
    x, y = digits.x_train.astype(np.float32), digits.y_train
    start = time.perf_counter()
    steps = 60 * ((len(x) - 200) // 32)
    result = pn.fit(net, pn.optim.adam(pn.schedules.cosine_decay(1e-3, steps, 0.05)), (x[200:], y[200:]),
                    key=jax.random.key(0), epochs=60, batch_size=32, l2=1e-3, validation=(x[:200], y[:200]),
                    early_stopping=pn.EarlyStopping(15))
    seconds = time.perf_counter() - start
    acc = float(pn.metrics.accuracy(net, result.params, result.state, digits.x_test.astype(np.float32),
                                    digits.y_test))
    record_property("digits", f"{acc:.4f} test accuracy, {len(result.history['loss'])} epochs, {seconds:.1f} s")
    print(f"digits: {acc:.4f} test accuracy, {len(result.history['loss'])} epochs, {seconds:.1f} s")
    assert acc >= 0.97


def test_progress_bar_shows_the_metrics(small, capsys):
    x, y = small
    pn.fit(NET, pn.optim.sgd(0.1), (x, y), key=jax.random.key(0), epochs=2, batch_size=64,
           validation=(x[:40], y[:40]), progress=True)
    err = capsys.readouterr().err
    assert "2/2" in err and "val_accuracy=" in err and "loss=" in err


@pytest.mark.parametrize("net,loss,classes", [
    (pn.mlp([8, 6, 3], hidden="tanh"), "cross_entropy", 3),  # fused: one pass over the logits
    (pn.Sequential([pn.Dense(6), pn.BatchNorm(), pn.Tanh(), pn.Dense(1), pn.Sigmoid()]), "binary_cross_entropy", 2),
    (pn.mlp([8, 6, 3], hidden="tanh"), "mse", 3),  # not fused: the probabilities, accuracy's own pass
])
def test_validation_pass_equals_the_loss_and_the_accuracy(net, loss, classes):
    """fit's one chunked validation pass (300 rows: chunks of 128 and padding) gives what pn.loss and
    pn.metrics.accuracy give on the whole set."""
    from purenet.training.loop import evaluate

    params, state = pn.init(net, jax.random.key(0), in_shape=(8,))
    x = jax.random.normal(jax.random.key(1), (300, 8), jnp.float64)
    labels = jnp.arange(300) % classes
    y = jax.nn.one_hot(labels, 3) if loss == "mse" else labels[:, None].astype(x.dtype) if classes == 2 else labels
    got = jax.jit(lambda p: evaluate(net, p, state, (x, y), loss))(params)
    np.testing.assert_allclose(got["val_loss"], pn.loss(net, params, state, x, y, loss=loss)[0], rtol=1e-12)
    assert got["val_accuracy"] == pn.metrics.accuracy(net, params, state, x, y)
    explicit = jnp.mean(pn.metrics.predicted_classes(net, params, state, x) == labels)
    assert got["val_accuracy"] == explicit and 0.1 < float(explicit) < 0.9  # (n, 1) targets read as 0/1 labels
