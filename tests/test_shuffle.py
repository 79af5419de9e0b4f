"""The epoch shuffle: exact permutations, uniform positions, no threefry in the program."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from purenet.data.shuffle import permutation


@pytest.mark.parametrize("n", [0, 1, 2, 7, 1000])
@pytest.mark.parametrize("impl", [None, "rbg"])
def test_is_an_exact_permutation(n, impl):
    for seed in range(3):
        order = np.asarray(permutation(jax.random.key(seed, impl=impl), n, salt=seed))
        assert order.dtype == np.int32
        np.testing.assert_array_equal(np.sort(order), np.arange(n))


def test_deterministic_and_every_key_and_salt_bit_matters():
    key = jax.random.key(0)
    a = np.asarray(permutation(key, 100))
    np.testing.assert_array_equal(a, permutation(key, 100))
    np.testing.assert_array_equal(a, jax.jit(permutation, static_argnums=1)(key, 100))
    legacy = jax.random.PRNGKey(0)  # raw uint32 keys give the same words
    np.testing.assert_array_equal(a, permutation(legacy, 100))
    others = [permutation(jax.random.key(1), 100), permutation(key, 100, salt=1),
              permutation(jax.random.fold_in(key, 0), 100)]
    for other in others:
        assert not np.array_equal(a, other)


def test_positions_are_uniform_and_orders_unbiased():
    n, keys = 6, 6000
    orders = np.asarray(jax.vmap(lambda k: permutation(k, n))(jax.random.split(jax.random.key(3), keys)))
    counts = np.stack([(orders == i).sum(0) for i in range(n)])  # element i at each position
    expected = keys / n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 25 degrees of freedom: P(chi2 > 70) ~ 4e-6 for a uniform shuffle
    assert chi2 < 70, counts
    before = (np.argsort(orders, 1)[:, 0] < np.argsort(orders, 1)[:, 1]).mean()  # element 0 before 1
    assert abs(before - 0.5) < 4 * np.sqrt(0.25 / keys)
    by_salt = np.asarray(jax.vmap(lambda s: permutation(jax.random.key(3), n, s))(jnp.arange(keys)))
    counts = np.stack([(by_salt == i).sum(0) for i in range(n)])
    assert float(((counts - expected) ** 2 / expected).sum()) < 70, counts


def test_rejects_what_is_not_a_key():
    with pytest.raises(TypeError, match="PRNG key"):
        permutation(jnp.zeros(2, jnp.float32), 5)
    with pytest.raises(ValueError, match="length"):
        permutation(jax.random.key(0), -1)
    with pytest.raises(ValueError, match=r"one PRNG key, got an array of \(3,\) keys"):
        permutation(jax.random.split(jax.random.key(0), 3), 5)


def test_any_python_int_salt():
    key = jax.random.key(0)
    np.testing.assert_array_equal(permutation(key, 50, salt=2**32 + 7), permutation(key, 50, salt=7))
    np.testing.assert_array_equal(permutation(key, 50, salt=-1), permutation(key, 50, salt=2**32 - 1))
    assert not np.array_equal(permutation(key, 50, salt=2**31), permutation(key, 50, salt=0))


def test_consecutive_epochs_are_uncorrelated_at_a_real_size():
    """Digits-size n: the rank correlation of an element's position between epochs e and e+1 is ~N(0, 1/n)."""
    n, epochs = 1438, 200
    orders = np.asarray(jax.vmap(lambda s: permutation(jax.random.key(0), n, s))(jnp.arange(epochs)))
    positions = np.argsort(orders, axis=1)  # where each element lands, per epoch
    centred = positions - (n - 1) / 2
    rho = (centred[:-1] * centred[1:]).sum(1) / (centred[0] ** 2).sum()
    z = rho * np.sqrt(n - 1)
    assert abs(z.mean()) < 4 / np.sqrt(len(z)) and 0.75 < z.std() < 1.25, (z.mean(), z.std())


def test_draws_no_random_bits():
    """The reason this module exists: threefry is the costliest thing XLA compiles in a small epoch."""
    jaxpr = str(jax.make_jaxpr(lambda k, s: permutation(k, 1000, s))(jax.random.key(0), 3))
    assert "random_bits" not in jaxpr and "threefry" not in jaxpr
    assert "random_bits" in str(jax.make_jaxpr(lambda k: jax.random.permutation(k, 1000))(jax.random.key(0)))
