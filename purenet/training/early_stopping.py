"""Early stopping as a pure state machine over epochs."""
import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from purenet.layers.base import Array, PyTree

__all__ = ["EarlyStopping", "EarlyStoppingState", "MONITOR_MODES"]


class EarlyStoppingState(NamedTuple):
    """Early stopping's state between epochs (`EarlyStopping.init`, `EarlyStopping.update`).

    Attributes:
        best: the best monitored value so far, float32 scalar (inf, or -inf
            for mode "max", before the first epoch).
        best_epoch: the epoch of `best`, int32 scalar (-1 before any improvement).
        wait: epochs since the last improvement, int32 scalar.
        stopped: whether early stopping has fired, bool scalar.
        best_params: the params at `best_epoch` (with restore_best; else the
            initial params).
        best_model_state: the model state at `best_epoch` (likewise).
    """

    best: jnp.ndarray
    best_epoch: jnp.ndarray
    wait: jnp.ndarray
    stopped: jnp.ndarray
    best_params: Any
    best_model_state: Any


# What early stopping can monitor, and which way is better.
MONITOR_MODES = {"loss": "min", "val_loss": "min", "val_accuracy": "max"}


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
    """Stop when `monitor` has not improved by more than `min_delta` for `patience` epochs.

    A pure state machine: `init(params, model_state)`, then once per epoch
    `update(es_state, value, epoch, params, model_state)`. `stopped` becomes
    True after `patience` epochs without improvement; with restore_best the
    best params seen are kept in the state (fit returns them).
    monitor is "loss", "val_loss" or "val_accuracy"; mode (None: from the
    monitor, "min" for losses and "max" for accuracy) says which way is better.

    Args:
        patience: epochs without improvement before stopping, an int >= 1.
        min_delta: the least change that counts as an improvement, >= 0.
        monitor: the history entry watched: "loss", "val_loss" or
            "val_accuracy" (the last two need validation data).
        mode: "min" or "max", or None to take it from `monitor`.
        restore_best: keep the best epoch's params and model state in the
            state (`fit` then returns them).

    Raises:
        ValueError: if `monitor` or `mode` is not one of the values above,
            `patience` < 1 or `min_delta` < 0.
    """

    patience: int
    min_delta: float = 0.0
    monitor: str = "val_loss"
    mode: Optional[str] = None
    restore_best: bool = True

    def __post_init__(self) -> None:
        if self.monitor not in MONITOR_MODES:
            raise ValueError(f"EarlyStopping monitor must be one of {sorted(MONITOR_MODES)}, got {self.monitor!r}")
        if self.mode is None:
            object.__setattr__(self, "mode", MONITOR_MODES[self.monitor])
        if self.mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping mode must be 'min' or 'max', got {self.mode!r}")
        if self.patience < 1:
            raise ValueError(f"EarlyStopping patience must be >= 1, got {self.patience}")
        if self.min_delta < 0:
            raise ValueError(f"EarlyStopping min_delta must be >= 0, got {self.min_delta}")

    def init(self, params: PyTree, model_state: PyTree) -> EarlyStoppingState:
        """The state before the first epoch.

        Args:
            params: the initial parameters (kept as the best until an epoch improves).
            model_state: the initial model state.

        Returns:
            An `EarlyStoppingState` with the worst possible `best`, best_epoch -1,
                wait 0 and stopped False.
        """
        worst = jnp.inf if self.mode == "min" else -jnp.inf
        return EarlyStoppingState(
            jnp.asarray(worst, jnp.float32), jnp.asarray(-1, jnp.int32), jnp.asarray(0, jnp.int32),
            jnp.asarray(False), params, model_state,
        )

    def update(self, es: EarlyStoppingState, value: float | Array, epoch: int | Array, params: PyTree,
               model_state: PyTree) -> EarlyStoppingState:
        """The state after one more epoch whose monitored value is `value` (pure, jittable).

        An epoch improves when `value < best - min_delta` (mode "min") or
        `value > best + min_delta` (mode "max"); once stopped, the state no
        longer changes.

        Args:
            es: the state so far.
            value: this epoch's monitored value, a scalar.
            epoch: this epoch's number, a scalar int.
            params: this epoch's parameters.
            model_state: this epoch's model state.

        Returns:
            The next `EarlyStoppingState`.
        """
        value = jnp.asarray(value, jnp.float32)
        if self.mode == "min":
            improved = value < es.best - self.min_delta
        else:
            improved = value > es.best + self.min_delta
        improved = improved & ~es.stopped
        wait = jnp.where(improved, 0, es.wait + jnp.where(es.stopped, 0, 1))

        def keep(new, old):
            return jax.tree_util.tree_map(lambda n, o: jnp.where(improved, n, o), new, old)

        return EarlyStoppingState(
            best=jnp.where(improved, value, es.best),
            best_epoch=jnp.where(improved, jnp.asarray(epoch, jnp.int32), es.best_epoch),
            wait=wait,
            stopped=es.stopped | (wait >= self.patience),
            best_params=keep(params, es.best_params) if self.restore_best else es.best_params,
            best_model_state=keep(model_state, es.best_model_state) if self.restore_best else es.best_model_state,
        )
