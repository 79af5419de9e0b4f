"""The optimizer as a pure transition: opt_state = opt.step(opt_state, grads).

An optimizer is a chain of transforms, each turning the gradient into an
update direction (and updating its own slots), followed by

    params <- params - learning_rate(count) * direction.

Transforms are small and composable (clipping, momentum, Adam's moments,
weight decay); `chain` joins them with a learning rate.
"""
import dataclasses
from typing import Any, Callable, NamedTuple, TypeVar

import jax
import jax.numpy as jnp

from purenet._checks import check_hyperparameter
from purenet.initializers import default_float
from purenet.layers.base import PyTree
from purenet.optim import tree
from purenet.optim.schedules import Schedule

__all__ = ["OptState", "Optimizer", "Transform", "apply_if_finite", "chain", "find_slot"]

_Slot = TypeVar("_Slot")


class OptState(NamedTuple):
    """Everything an optimizer carries between steps (a pytree).

    Attributes:
        params: the current parameters (a pytree).
        count: steps taken so far, an int32 scalar.
        slots: a tuple with each transform's state (velocity, moments, ...),
            one per transform, in the chain's order.
        learning_rate: the rate the most recent step used, a float scalar
            (before any step: the rate the first step will use).
    """

    params: Any
    count: jnp.ndarray  # type: ignore[assignment]  # the step count shadows tuple.count (a stable name)
    slots: tuple
    learning_rate: jnp.ndarray


class Transform(NamedTuple):
    """One gradient transform: its slot's initialiser and its update, gradient -> direction.

        init(params) -> slots
        update(grads, slots, params, count, **extra) -> (direction, slots)

    `after(slots, new_params, count) -> slots`, when given, runs once the
    step has moved the params (a parameter average keeps its slot this way).
    `on_skip(slots) -> slots`, when given, is the slot after a step that the
    "skip" guard skipped (instead of the unchanged slot): the dynamic loss
    scale shrinks this way. Such a transform needs guard "skip".
    `extra_args` names the per-step arguments `update` takes beyond the
    gradient (as optax's GradientTransformationExtraArgs): K-FAC's
    ("factors",). `opt.step(state, grads, factors=...)` passes them, and the
    training step computes what the optimizer's `extra_args` name.
    `options` are the settings those arguments are computed with (K-FAC's
    {"fisher": "mc", "samples": 1, "factors_every": 1}), read by the
    training step's gradient function (`Optimizer.extra_options`).
    A transform's slot is found by its type (`find_slot`), never by position.

    Attributes:
        init: `init(params) -> slots`, the transform's state before the first step.
        update: `update(grads, slots, params, count, **extra) -> (direction, slots)`:
            the incoming direction (a tree like params) turned into the outgoing one.
        after: `after(slots, new_params, count) -> slots`, run after the params
            moved, or None.
        on_skip: `on_skip(slots) -> slots`, the slot after a step the "skip"
            guard skipped, or None (the slot stays unchanged).
        extra_args: the names of the per-step keyword arguments `update` takes.
        options: how the training step computes those arguments (a dict), or None.
    """

    init: Callable
    update: Callable
    after: Callable | None = None
    on_skip: Callable | None = None
    extra_args: tuple = ()
    options: Any = None


def _rate(learning_rate, count):
    rate = learning_rate(count) if callable(learning_rate) else learning_rate
    return jnp.asarray(rate, dtype=default_float())


_compiled_rate = jax.jit(_rate, static_argnums=0)


def _initial_rate(learning_rate, count):
    """`_rate` at an optimizer's init: a schedule called eagerly runs as one compiled program instead of
    one per operation (cosine_decay: eight), unless it needs a concrete step (then as it is)."""
    if not callable(learning_rate):
        return _rate(learning_rate, count)
    try:
        return _compiled_rate(learning_rate, count)
    except jax.errors.JAXTypeError:  # Python control flow on the step, or another concrete-only schedule
        return _rate(learning_rate, count)


@dataclasses.dataclass(frozen=True, eq=False)
class Optimizer:
    """A chain of transforms and a learning rate (a float, a traced scalar or a schedule).

    `guard` ("skip" or "raise", see `apply_if_finite`) decides what a step
    with NaN/inf gradients does; None trusts the gradients. Build one with
    `chain` or an alias (`pn.optim.adam`, ...) rather than directly.

    Args:
        transforms: the `Transform`s, applied in order to the gradient.
        learning_rate: a float, a traced scalar, or a schedule step -> rate.
        guard: "skip", "raise" or None: what a step with non-finite gradients does.

    Raises:
        ValueError: if a concrete `learning_rate` is negative, NaN or infinite;
            if `guard` is not None, "skip" or "raise"; if a transform has
            `on_skip` (a dynamic loss scale) and `guard` is not "skip".
    """

    transforms: tuple
    learning_rate: Any
    guard: str | None = None

    def __post_init__(self) -> None:
        check_hyperparameter("learning_rate", self.learning_rate, 0.0, None)
        if self.guard not in (None, "skip", "raise"):
            raise ValueError(f"apply_if_finite policy must be 'skip' or 'raise', got {self.guard!r}")
        if self.guard != "skip" and any(t.on_skip is not None for t in self.transforms):
            raise ValueError(f"a transform that acts on skipped steps (pn.optim.dynamic_loss_scale) needs "
                             f"apply_if_finite(opt, 'skip'), got guard {self.guard!r}")

    @property
    def extra_args(self) -> tuple:
        """The per-step arguments `step` needs beyond the gradient (the transforms' extra_args)."""
        names: list = []
        for t in self.transforms:
            names += [n for n in t.extra_args if n not in names]
        return tuple(names)

    @property
    def extra_options(self) -> dict:
        """The transforms' `options`, merged: how the training step computes the extra arguments."""
        merged: dict = {}
        for t in self.transforms:
            merged.update(t.options or {})
        return merged

    def init(self, params: PyTree) -> OptState:
        """The state before the first step.

        Args:
            params: the initial parameters (a pytree of arrays).

        Returns:
            An `OptState` with these params, count 0, each transform's initial
                slot and the rate the first step will use.
        """
        slots = tuple(t.init(params) for t in self.transforms)
        count = jnp.zeros((), jnp.int32)
        return OptState(params, count, slots, _initial_rate(self.learning_rate, count))

    def step(self, state: OptState, grads: PyTree, **extra: Any) -> OptState:
        """One step: `params <- params - learning_rate(count) * direction`.

        The gradients run through the transforms in order (in at least
        float32), the params move, then each transform's `after` runs. With
        guard "skip", a step whose gradients are not all finite keeps params
        and slots (the count and rate still advance).

        Args:
            state: the optimizer state (from `init` or a previous `step`).
            grads: the gradients, a tree with the params' key paths and shapes.
            **extra: the per-step arguments the transforms' `extra_args` name
                (K-FAC's `factors`), and no others.

        Returns:
            The next `OptState`.

        Raises:
            TypeError: if `extra` misses a name in `extra_args` or holds one not in it.
            ValueError: if `grads` does not match the params' key paths, shapes
                or structure; if the state has another number of slots than
                this optimizer has transforms; with guard "raise", if a
                gradient is NaN or inf (under jit: a runtime error).
        """
        missing = [n for n in self.extra_args if n not in extra]
        unknown = [n for n in extra if n not in self.extra_args]
        if missing or unknown:
            raise TypeError(f"this optimizer's step takes the per-step arguments {self.extra_args or '()'}"
                            + (f"; missing {missing}" if missing else "")
                            + (f"; unexpected {unknown}" if unknown else "")
                            + ("" if not missing else " (pn.stats.kfac_value_and_grad gives K-FAC's factors)"))
        tree.check_matching(state.params, grads)
        if len(state.slots) != len(self.transforms):
            raise ValueError(f"the optimizer state has {len(state.slots)} slots, this optimizer "
                             f"{len(self.transforms)} transforms: initialise the state with this optimizer's init")
        if self.guard == "raise":
            _raise_if_not_finite(grads)
        direction = tree.upcast(grads)
        slots: Any = []  # filled, then a tuple
        for transform, slot in zip(self.transforms, state.slots):
            own = {n: extra[n] for n in transform.extra_args}
            direction, slot = transform.update(direction, slot, state.params, state.count, **own)
            slots.append(slot)
        rate = _rate(self.learning_rate, state.count)
        params = tree.map(
            lambda p, d: (p - rate.astype(d.dtype) * d).astype(jnp.result_type(p)),
            state.params, direction,
        )
        slots = tuple(slot if t.after is None else t.after(slot, params, state.count)
                      for t, slot in zip(self.transforms, slots))
        new = OptState(params, state.count + 1, slots, rate)
        if self.guard != "skip":
            return new
        finite = tree.all_finite(grads)
        slots = tuple(tree.where(finite, n, o if t.on_skip is None else t.on_skip(o))
                      for t, n, o in zip(self.transforms, new.slots, state.slots))
        # a skipped step keeps params and slots (bit-identical); count and rate advance (schedules stay aligned)
        return new._replace(params=tree.where(finite, new.params, state.params), slots=slots)


def find_slot(opt_state: Any, kind: type[_Slot]) -> _Slot | None:
    """The slot of type `kind` in opt_state (EMAState, LossScale, KFACState, ...), or None.

    Found by type through any wrapper: `masked`, `chain`, `apply_if_finite`
    all keep a flat tuple of their transforms' slots. More than one is an error.

    Args:
        opt_state: an optimizer state (`OptState`); anything without `slots` has none.
        kind: the slot's type, e.g. `pn.optim.EMAState`.

    Returns:
        The one slot of that type, or None if the state holds none.

    Raises:
        ValueError: if the state holds more than one slot of type `kind`.
    """
    found = [slot for slot in getattr(opt_state, "slots", ()) if isinstance(slot, kind)]
    if len(found) > 1:
        raise ValueError(f"the optimizer state holds {len(found)} {kind.__name__} slots; expected at most one")
    return found[0] if found else None


def chain(*parts: "Transform | Optimizer", learning_rate: float | jax.Array | Schedule | None = None) -> Optimizer:
    """Join transforms (and at most one Optimizer, whose rate is used) into an Optimizer.

        pn.optim.chain(pn.optim.clip_by_global_norm(1.0), pn.optim.adam(1e-3))
        pn.optim.chain(pn.optim.scale_by_adam(), learning_rate=1e-3)

    The guard is the strictest of the parts' ("raise", then "skip"); a
    transform with `on_skip` (pn.optim.dynamic_loss_scale) implies "skip".

    Args:
        *parts: `Transform`s and `Optimizer`s, in the order the gradient meets
            them (an Optimizer contributes its transforms, rate and guard).
        learning_rate: the rate, when no part is an Optimizer: a float, a
            traced scalar, or a schedule step -> rate.

    Returns:
        An `Optimizer` of every part's transforms, in order.

    Raises:
        TypeError: if a part is neither a Transform nor an Optimizer.
        ValueError: unless exactly one learning rate is given (one Optimizer
            among the parts, or `learning_rate`); if a concrete rate is
            negative, NaN or infinite.
    """
    transforms: list[Transform]
    rates: list[Any]
    guards: set[str | None]
    transforms, rates, guards = [], [], set()
    for part in parts:
        if isinstance(part, Optimizer):
            transforms.extend(part.transforms)
            rates.append(part.learning_rate)
            guards.add(part.guard)
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
    if any(t.on_skip is not None for t in transforms) and "raise" not in guards:
        guards.add("skip")  # a dynamic loss scale shrinks on the steps the skip guard skips
    guard = "raise" if "raise" in guards else "skip" if "skip" in guards else None
    return Optimizer(tuple(transforms), rates[0], guard)


def apply_if_finite(opt: Optimizer, policy: str = "skip") -> Optimizer:
    """Guard an optimizer against NaN/inf gradients (an Optimizer again: `chain` accepts it).

    policy="skip": a step whose gradients are not all finite leaves params and
    slots unchanged (the count still advances, so schedules stay aligned).
    policy="raise": raise (eagerly: a ValueError; under jit: a runtime error
    from jax.debug.callback) naming the first bad leaf.

    Args:
        opt: the optimizer to guard.
        policy: "skip" or "raise".

    Returns:
        A copy of `opt` with guard `policy`.

    Raises:
        ValueError: if `policy` is not "skip" or "raise", or if it is "raise"
            and `opt` holds a transform with `on_skip` (a dynamic loss scale).
    """
    if policy not in ("skip", "raise"):
        raise ValueError(f"apply_if_finite policy must be 'skip' or 'raise', got {policy!r}")
    return dataclasses.replace(opt, guard=policy)


def _raise_if_not_finite(grads):
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        if isinstance(g, jax.core.Tracer):
            def check(value, path=jax.tree_util.keystr(path)):
                if not jnp.all(jnp.isfinite(value)):
                    raise ValueError(f"non-finite gradient (NaN or inf) in leaf {path}")
            jax.debug.callback(check, g)
        elif not bool(jnp.all(jnp.isfinite(g))):
            raise ValueError(f"non-finite gradient (NaN or inf) in leaf {jax.tree_util.keystr(path)}")
