"""`sweep`: one model per point of a hyperparameter grid, every run at once (vmapped `train`)."""
import dataclasses
import itertools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from purenet._checks import check_hyperparameter
from purenet.layers.base import Array, LayerLike, PyTree
from purenet.losses import Loss
from purenet.training.checks import check_arguments, check_inputs
from purenet.training.loop import as_arrays, init_run, train

__all__ = ["SweepResult", "sweep"]


@dataclasses.dataclass
class SweepResult:
    """Stacked results of a sweep: member i used the config `{name: configs[name][i]}`.

    `len(result)` is the number of members; `result.member(i)` and
    `result.config(i)` read one.

    Args:
        configs: {grid entry: numpy array (members,) of its value for each member}.
        params: the members' parameters, each leaf with a leading axis (members, ...).
        state: the members' model states, stacked likewise.
        history: {metric: numpy array (members, epochs, ...)}.
    """

    configs: dict
    params: Any
    state: Any
    history: dict

    def __len__(self) -> int:
        return len(next(iter(self.configs.values())))

    def config(self, i: int) -> dict[str, Any]:
        """The grid point of member i.

        Args:
            i: the member's index.

        Returns:
            {grid entry: its value for member i, a Python scalar}.
        """
        return {name: values[i].item() for name, values in self.configs.items()}

    def member(self, i: int) -> tuple[PyTree, PyTree]:
        """(params, state) of member i.

        Args:
            i: the member's index.

        Returns:
            (params, state): member i's slices of the stacked trees.
        """
        take = lambda t: jax.tree_util.tree_map(lambda v: v[i], t)  # noqa: E731
        return take(self.params), take(self.state)

    def best(self, metric: str = "val_accuracy", mode: str = "max") -> int:
        """Index of the member with the best final value of `metric`.

        NaN values (e.g. of members early stopping stopped) are ignored.

        Args:
            metric: a history entry, e.g. "val_accuracy" or "val_loss".
            mode: "max" (higher is better) or "min".

        Returns:
            The index of the best member.

        Raises:
            KeyError: if the history has no `metric`.
        """
        final = np.asarray(self.history[metric])[:, -1]
        return int(np.nanargmax(final) if mode == "max" else np.nanargmin(final))


def sweep(build: Callable[[dict[str, Array]], tuple[LayerLike, Any]], data: tuple, *, grid: dict[str, Any], epochs: int,
          batch_size: int | None = 64, loss: str | Loss = "cross_entropy", l2: float | Array = 0.0,
          validation: tuple | None = None, augment: Callable[..., tuple[Array, Array]] | None = None,
          **options: Any) -> SweepResult:
    """Train one model per point of the Cartesian product of `grid`, all at once (vmapped).

    build(hp) -> (net, opt) receives a dict with one traced value per grid
    entry (e.g. hp["learning_rate"], hp["dropout"]); the network's structure
    must not depend on them. "seed" (required) gives member i the key
    jax.random.key(seed), exactly as `train(..., key=jax.random.key(seed))`
    would use; "l2", if in the grid, overrides `l2`. Batch size cannot be
    swept (it sets the shapes). Every other option of `train` (early_stopping,
    dp, accumulate, mesh, evaluate_with_ema) passes through `options`.
    Returns a SweepResult.

    Before training, build runs once per grid point with concrete values,
    so the constructors check each one (a negative learning rate, a dropout
    rate of 1), and the data are checked as `fit` checks them.

    Args:
        build: `build(hp) -> (net, opt)`, hp a dict of one (traced) scalar per
            grid entry.
        data: (x, y), x of shape `(n, *in_shape)` and y of shape (n, ...).
        grid: {name: list of values}; must hold "seed" (integer seeds), may
            hold "l2", and every entry build reads.
        epochs: the number of epochs, an int >= 0.
        batch_size: examples per step (None: full batch); not sweepable.
        loss: the loss, a name or a `Loss`.
        l2: weight decay coefficient, unless the grid sweeps "l2".
        validation: (x_val, y_val), or None.
        augment: an augmentation `(key, x, y) -> (x, y)` for each batch, or None.
        **options: any other option of `train` (early_stopping, dp,
            accumulate, mesh, evaluate_with_ema, ...).

    Returns:
        A `SweepResult`, one member per point of the grid's Cartesian product
            (in `itertools.product` order of the grid's entries).

    Raises:
        ValueError: if the grid lacks "seed", sweeps "batch_size", has an empty
            entry or non-integer seeds, a grid point fails build's checks, or
            the data or an argument fail `fit`'s checks.
    """
    if "seed" not in grid:
        raise ValueError("sweep grid needs a 'seed' entry (a list of integer seeds)")
    if "batch_size" in grid:
        raise ValueError("batch_size cannot be swept in one vmapped call: it sets the array shapes")
    check_arguments(epochs, batch_size, l2, accumulate=options.get("accumulate", 1))
    names = list(grid)
    for n in names:
        if len(list(grid[n])) == 0:
            raise ValueError(f"sweep grid entry {n!r} is empty")
    points = list(itertools.product(*(list(grid[n]) for n in names)))
    configs = {n: np.array([p[i] for p in points]) for i, n in enumerate(names)}
    if not np.issubdtype(configs["seed"].dtype, np.integer):
        raise ValueError(f"sweep grid 'seed' values must be integers, got {list(grid['seed'])}")
    _check_grid(build, data, configs, loss, validation)

    def member(hp):
        net, opt = build(hp)
        train_state, history, _ = train(net, opt, data, key=jax.random.key(hp["seed"]), epochs=epochs,
                                        batch_size=batch_size, loss=loss, l2=hp.get("l2", l2),
                                        validation=validation, augment=augment, **options)
        return train_state.opt_state.params, train_state.model_state, history

    params, state, history = jax.jit(jax.vmap(member))({n: jnp.asarray(v) for n, v in configs.items()})
    return SweepResult(configs, params, state, jax.device_get(history))


def _check_grid(build, data, configs, loss, validation):
    """Eager checks of every grid point (by building it with concrete values) and of the data."""
    for i in range(len(next(iter(configs.values())))):
        point = {n: v[i].item() for n, v in configs.items()}
        try:
            if "l2" in point:
                check_hyperparameter("l2", point["l2"], 0.0, None)
            net, opt = build({n: jnp.asarray(v[i]) for n, v in configs.items()})
        except ValueError as e:
            raise ValueError(f"sweep grid point {point}: {e}") from e
    x, y, validation = as_arrays(data, validation)
    key = jax.random.key(int(configs["seed"][0]))
    abstract = jax.eval_shape(lambda k: init_run(net, opt, x, k, None, None), key)
    check_inputs(net, x, y, validation, loss, abstract.opt_state.params, abstract.model_state)
