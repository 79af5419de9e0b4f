"""Early stopping as a pure state machine over epochs."""
import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from purenet.layers.base import Array, PyTree

__all__ = ["EarlyStopping", "EarlyStoppingState", "MONITOR_MODES"]


class EarlyStoppingState(NamedTuple):
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
        worst = jnp.inf if self.mode == "min" else -jnp.inf
        return EarlyStoppingState(
            jnp.asarray(worst, jnp.float32), jnp.asarray(-1, jnp.int32), jnp.asarray(0, jnp.int32),
            jnp.asarray(False), params, model_state,
        )

    def update(self, es: EarlyStoppingState, value: float | Array, epoch: int | Array, params: PyTree,
               model_state: PyTree) -> EarlyStoppingState:
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
