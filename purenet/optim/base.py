"""The optimizer as a pure transition: opt_state = opt.step(opt_state, grads).

An optimizer is a chain of transforms, each turning the gradient into an
update direction (and updating its own slots), followed by

    params <- params - learning_rate(count) * direction.

Transforms are small and composable (clipping, momentum, Adam's moments,
weight decay); `chain` joins them with a learning rate.
"""
import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from purenet._checks import check_hyperparameter
from purenet.initializers import default_float
from purenet.optim import tree


class OptState(NamedTuple):
    """Everything an optimizer carries between steps (a pytree).

    params:        the current parameters.
    count:         steps taken so far (int32).
    slots:         a tuple with each transform's state (velocity, moments, ...).
    learning_rate: the rate the most recent step used (before any step: the
                   rate the first step will use).
    """

    params: Any
    count: jnp.ndarray
    slots: tuple
    learning_rate: jnp.ndarray


class Transform(NamedTuple):
    """init(params) -> slots;  update(grads, slots, params, count) -> (direction, slots)."""

    init: Callable
    update: Callable


def _rate(learning_rate, count):
    rate = learning_rate(count) if callable(learning_rate) else learning_rate
    return jnp.asarray(rate, dtype=default_float())


@dataclasses.dataclass(frozen=True, eq=False)
class Optimizer:
    """A chain of transforms and a learning rate (a float, a traced scalar or a schedule)."""

    transforms: tuple
    learning_rate: Any

    def __post_init__(self):
        check_hyperparameter("learning_rate", self.learning_rate, 0.0, None)

    def init(self, params):
        slots = tuple(t.init(params) for t in self.transforms)
        count = jnp.zeros((), jnp.int32)
        return OptState(params, count, slots, _rate(self.learning_rate, count))

    def step(self, state, grads):
        tree.check_matching(state.params, grads)
        direction = tree.upcast(grads)
        slots = []
        for transform, slot in zip(self.transforms, state.slots):
            direction, slot = transform.update(direction, slot, state.params, state.count)
            slots.append(slot)
        rate = _rate(self.learning_rate, state.count)
        params = tree.map(
            lambda p, d: (p - rate.astype(d.dtype) * d).astype(jnp.result_type(p)),
            state.params, direction,
        )
        return OptState(params, state.count + 1, tuple(slots), rate)


def chain(*parts, learning_rate=None):
    """Join transforms (and at most one Optimizer, whose rate is used) into an Optimizer.

        pn.optim.chain(pn.optim.clip_by_global_norm(1.0), pn.optim.adam(1e-3))
        pn.optim.chain(pn.optim.scale_by_adam(), learning_rate=1e-3)
    """
    transforms, rates = [], []
    for part in parts:
        if isinstance(part, Optimizer):
            transforms.extend(part.transforms)
            rates.append(part.learning_rate)
        elif isinstance(part, Transform):
            transforms.append(part)
        else:
            raise TypeError(f"chain takes Transforms and Optimizers, got {type(part).__name__}")
    if learning_rate is not None:
        rates.append(learning_rate)
    if len(rates) != 1:
        raise ValueError(
            f"chain needs exactly one learning rate (from one Optimizer or learning_rate=), got {len(rates)}"
        )
    return Optimizer(tuple(transforms), rates[0])


def apply_if_finite(opt, policy="skip"):
    """Guard an optimizer against NaN/inf gradients.

    policy="skip": a step whose gradients are not all finite leaves params and
    slots unchanged (the count still advances, so schedules stay aligned).
    policy="raise": raise (eagerly: a ValueError; under jit: a runtime error
    from jax.debug.callback) naming the first bad leaf.
    """
    if policy not in ("skip", "raise"):
        raise ValueError(f"apply_if_finite policy must be 'skip' or 'raise', got {policy!r}")

    def step(state, grads):
        if policy == "raise":
            _raise_if_not_finite(grads)
            return opt.step(state, grads)
        finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)]))
        new = opt.step(state, grads)
        kept = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, state)
        return kept._replace(count=new.count, learning_rate=new.learning_rate)

    return _Guarded(opt, step)


@dataclasses.dataclass(frozen=True, eq=False)
class _Guarded:
    inner: Optimizer
    _step: Callable

    def init(self, params):
        return self.inner.init(params)

    def step(self, state, grads):
        return self._step(state, grads)


def _raise_if_not_finite(grads):
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        if isinstance(g, jax.core.Tracer):
            def check(value, path=jax.tree_util.keystr(path)):
                if not jnp.all(jnp.isfinite(value)):
                    raise ValueError(f"non-finite gradient (NaN or inf) in leaf {path}")
            jax.debug.callback(check, g)
        elif not bool(jnp.all(jnp.isfinite(g))):
            raise ValueError(f"non-finite gradient (NaN or inf) in leaf {jax.tree_util.keystr(path)}")
