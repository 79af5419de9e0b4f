"""Training: the lecture's loop (compute y_hat, compute L, update, till satisfied),
as pure functions that run whole epochs on device.

- `train_epoch`  one epoch: a fresh permutation from the key, then a
                 `lax.scan` of (value_and_grad, opt.step) over its mini-batches.
- `train`        a whole run, all epochs in one `lax.scan`: jittable and
                 vmappable (that is what `sweep` does).
- `fit`          the convenient front door: checks the data, runs epoch by
                 epoch (each a jitted scan) with a progress bar, validation
                 and early stopping, and returns a FitResult.

Batches: batch_size=None is full-batch gradient descent, 1 is stochastic
gradient descent, anything else mini-batch. Each epoch uses n // batch_size
full batches of a fresh permutation; the n mod batch_size examples left at
the end of that permutation wait for the next epoch. Since the permutation
is new every epoch, no example is left out for good (each is skipped in an
epoch with probability (n mod batch_size) / n). A batch_size above n is n.

Keys: a run's key k gives the initial params from fold_in(k, 0) (when none
are passed); epoch e shuffles with purenet.shuffle.permutation(k1, n, salt=e)
and its dropout and augmentation draw from fold_in(k1, e), k1 = fold_in(k, 1).
The same key gives bit-identical results; nothing reads global random state.
"""
import dataclasses
import hashlib
import itertools
import os
import warnings
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from purenet import diagnostics, distributed, losses, metrics, network, per_example, shuffle, stats
from purenet._checks import check_finite_rows, check_float_input, check_hyperparameter
from purenet.optim import KFAC


class TrainState(NamedTuple):
    """What a run carries between epochs: optimizer state (with params), model state, epochs done."""

    opt_state: Any
    model_state: Any
    epoch: jnp.ndarray


# ---------------------------------------------------------------- early stopping


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

    def __post_init__(self):
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

    def init(self, params, model_state):
        worst = jnp.inf if self.mode == "min" else -jnp.inf
        return EarlyStoppingState(
            jnp.asarray(worst, jnp.float32), jnp.asarray(-1, jnp.int32), jnp.asarray(0, jnp.int32),
            jnp.asarray(False), params, model_state,
        )

    def update(self, es, value, epoch, params, model_state):
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


# ---------------------------------------------------------------- one epoch


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _batch_size(n, batch_size):
    if batch_size is None:
        return n
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer or None (full batch), got {batch_size!r}")
    return min(int(batch_size), n)


def _check_arguments(epochs, batch_size, l2, checkpoint_every=1):
    """Eager checks of the run's arguments, each error naming the argument."""
    if not _is_int(epochs) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
    _batch_size(1, batch_size)
    check_hyperparameter("l2", l2, 0.0, None)
    if not _is_int(checkpoint_every) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive integer (epochs), got {checkpoint_every!r}")


def train_epoch(net, opt, train_state, x, y, key, *, batch_size=64, loss="cross_entropy",
                l2=0.0, augment=None, mesh=None, dp=None):
    """One epoch over (x, y): returns (train_state, mean training loss of its batches).

    With a `mesh` (see purenet.distributed) every batch is split over its
    devices and XLA reduces the gradients across them. With dp=pn.DPSGD(...)
    each step uses DP-SGD's clipped, noised gradient. With a K-FAC optimizer
    (pn.optim.kfac) each step also computes the batch's K-FAC factors.
    """
    if dp is not None and isinstance(opt, KFAC):
        raise ValueError("dp= (DP-SGD) and a K-FAC optimizer cannot be combined")
    n = x.shape[0]
    bs = _batch_size(n, batch_size)
    steps = n // bs
    order = jnp.arange(n) if bs == n else shuffle.permutation(key, n, salt=train_state.epoch)
    key = jax.random.fold_in(key, train_state.epoch)
    batches = order[: steps * bs].reshape(steps, bs)

    def step(carry, inputs):
        opt_state, model_state = carry
        index, i = inputs
        step_key = jax.random.fold_in(key, i + 1)
        k_drop, k_aug = jax.random.split(step_key)
        xb, yb = x[index], y[index]
        if mesh is not None:
            xb, yb = (jax.lax.with_sharding_constraint(v, distributed.batch_sharding(mesh)) for v in (xb, yb))
        if augment is not None:
            xb, yb = augment(k_aug, xb, yb)
        if isinstance(opt, KFAC):  # K-FAC's factors come from the same forward and backward
            value, grads, factors, model_state = stats.kfac_value_and_grad(
                net, opt_state.params, model_state, xb, yb, loss=loss, l2=l2, train=True, key=k_drop)
            return (opt.step(opt_state, grads, factors), model_state), value
        if dp is None:
            value, grads, model_state = network.value_and_grad(
                net, opt_state.params, model_state, xb, yb, loss=loss, l2=l2, train=True, key=k_drop)
        else:
            value, grads, model_state = per_example.clipped_value_and_grad(
                net, opt_state.params, model_state, xb, yb, clip_norm=dp.clip_norm,
                noise_multiplier=dp.noise_multiplier, noise_key=jax.random.fold_in(step_key, 2),
                loss=loss, l2=l2, train=True, key=k_drop)
        return (opt.step(opt_state, grads), model_state), value

    (opt_state, model_state), values = jax.lax.scan(
        step, (train_state.opt_state, train_state.model_state), (batches, jnp.arange(steps)))
    return TrainState(opt_state, model_state, train_state.epoch + 1), jnp.mean(values)


def _evaluate(net, params, model_state, validation, loss):
    xv, yv = validation
    value, _ = network.loss(net, params, model_state, xv, yv, loss=loss)
    return {"val_loss": value, "val_accuracy": metrics.accuracy(net, params, model_state, xv, yv)}


def _epoch_with_metrics(net, opt, *, batch_size, loss, l2, augment, early_stopping, mesh=None, dp=None):
    """run((train_state, es), (x, y, validation, key)) -> ((train_state, es), record of this epoch).

    The data are arguments, not closed-over constants, so a jitted `run`
    neither bakes the data set into the program nor recompiles for new data.
    """

    def run(carry, data):
        (train_state, es), (x, y, validation, key, probe, stats_probe) = carry, data
        epoch = train_state.epoch
        before = train_state.opt_state.params
        train_state, mean_loss = train_epoch(net, opt, train_state, x, y, key, batch_size=batch_size,
                                             loss=loss, l2=l2, augment=augment, mesh=mesh, dp=dp)
        record = {"loss": mean_loss, "learning_rate": train_state.opt_state.learning_rate}
        if validation is not None:
            record.update(_evaluate(net, train_state.opt_state.params, train_state.model_state,
                                    validation, loss))
        if probe is not None:
            after = train_state.opt_state.params
            record.update(diagnostics.gradient_flow(net, after, train_state.model_state, *probe, loss=loss, l2=l2))
            record["update_ratio"] = diagnostics.update_ratio(net, before, after)
        if stats_probe is not None:
            noise = stats.gradient_noise(net, train_state.opt_state.params, train_state.model_state, *stats_probe,
                                         loss=loss, l2=l2)
            record.update(noise_scale=noise.b_simple, trace_cov=noise.trace_cov, grad_sq_norm=noise.grad_sq_norm,
                          fisher_trace=noise.mean_sq_norm)
        if early_stopping is not None:
            es = early_stopping.update(es, record[early_stopping.monitor], epoch,
                                       train_state.opt_state.params, train_state.model_state)
        return (train_state, es), record

    return run


def _init_run(net, opt, x, key, params, state):
    check_float_input(x)
    declared = getattr(net, "in_shape", None)
    if params is None and declared is not None and tuple(declared) != tuple(x.shape[1:]):
        what = f"inputs of width {declared[0]}" if len(declared) == 1 else f"examples of shape {declared}"
        raise ValueError(f"the network is declared for {what} (its in_shape), got x of shape {x.shape}; "
                         f"build it for {x.shape[1:]} or pass matching data")
    if params is None:
        params, init_state = network.init(net, jax.random.fold_in(key, 0), in_shape=x.shape[1:],
                                          dtype=x.dtype)
        state = init_state if state is None else state
    if state is None:
        raise ValueError("pass the model state together with params (pn.init returns both)")
    return TrainState(opt.init(params), state, jnp.zeros((), jnp.int32))


def _place(mesh, data, batch_size, train_state, es):
    """With a mesh: check the batch divides over it; replicate data and state on it."""
    if mesh is None:
        return data, train_state, es
    distributed.check_divisible(_batch_size(data[0].shape[0], batch_size), mesh)
    return distributed.replicate((data, train_state, es), mesh)


def _check_monitor(early_stopping, validation):
    if early_stopping is not None and early_stopping.monitor != "loss" and validation is None:
        raise ValueError(f"EarlyStopping monitors {early_stopping.monitor!r}, which needs validation data")


def train(net, opt, data, *, key, epochs, batch_size=64, loss="cross_entropy", l2=0.0,
          params=None, state=None, validation=None, early_stopping=None, augment=None, mesh=None, dp=None):
    """A whole training run, every epoch inside one `lax.scan`: pure, jittable, vmappable.

    Returns (train_state, history, es_state): history maps each metric to an
    array over epochs; once early stopping fires, later epochs are skipped
    (their history entries are NaN). The data are checked as `fit` checks
    them (value checks need concrete data: under jit only shapes and dtypes).
    Use `fit` for the same with progress and best-params restoring done for you.
    """
    _check_arguments(epochs, batch_size, l2)
    x, y = jnp.asarray(data[0]), jnp.asarray(data[1])
    if validation is not None:
        validation = (jnp.asarray(validation[0]), jnp.asarray(validation[1]))
    _check_monitor(early_stopping, validation)
    train_state = _init_run(net, opt, x, key, params, state)
    _check_inputs(net, x, y, validation, loss, train_state.opt_state.params, train_state.model_state)
    es = early_stopping.init(train_state.opt_state.params, train_state.model_state) if early_stopping else None
    if mesh is not None:
        distributed.check_divisible(_batch_size(x.shape[0], batch_size), mesh)
    epoch_fn = _epoch_with_metrics(net, opt, batch_size=batch_size, loss=loss, l2=l2, augment=augment,
                                   early_stopping=early_stopping, mesh=mesh, dp=dp)
    data = (x, y, validation, jax.random.fold_in(key, 1), None, None)
    run = lambda carry: epoch_fn(carry, data)  # noqa: E731
    record_shape = jax.eval_shape(run, (train_state, es))[1]

    def body(carry, _):
        if early_stopping is None:
            return run(carry)
        skipped = jax.tree_util.tree_map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype), record_shape)
        return jax.lax.cond(carry[1].stopped, lambda c: (c, skipped), run, carry)

    (train_state, es), history = jax.lax.scan(body, (train_state, es), None, length=epochs)
    return train_state, history, es


# ---------------------------------------------------------------- fit


class FitResult(NamedTuple):
    params: Any
    state: Any
    opt_state: Any
    history: dict
    stopped_epoch: Any = None  # the epoch early stopping fired at (None if it did not)


def check_data(net, x, y, loss, params, state, name="x"):
    """Eager checks every entry point runs before training: dtypes, shapes, finiteness, label ranges.

    params and state may be abstract (jax.ShapeDtypeStruct); value checks
    run when x and y are concrete.
    """
    check_float_input(x, name)
    if jnp.ndim(y) == 0:
        raise ValueError(f"{name}'s targets must have a batch axis, got a scalar")
    if jnp.shape(y)[0] != jnp.shape(x)[0]:
        raise ValueError(f"{name} has {jnp.shape(x)[0]} rows but its targets have {jnp.shape(y)[0]}")
    check_finite_rows(x, name)
    out = jax.eval_shape(lambda p, s, x: network.forward(net, p, s, x)[0], params, state,
                         jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)))
    loss_fn = losses.get(loss)
    if isinstance(loss, losses.Loss):  # a user's loss judges its own targets (and its shapes are checked)
        jax.eval_shape(losses.checked(loss_fn).backward, out, jax.ShapeDtypeStruct(jnp.shape(y), jnp.result_type(y)))
        return
    target_check = losses.class_targets if loss == "cross_entropy" else losses.value_targets
    target_check(loss, jnp.zeros(out.shape, out.dtype), y)


def _check_inputs(net, x, y, validation, loss, params, state):
    """check_data on the training data and the validation data, if any."""
    check_data(net, x, y, loss, params, state)
    if validation is not None:
        check_data(net, *validation, loss, params, state, name="validation x")


def fit(net, opt, data, *, key, epochs, batch_size=64, loss="cross_entropy", l2=0.0,
        params=None, state=None, validation=None, early_stopping=None, augment=None,
        progress=False, checkpoint=None, checkpoint_every=1, resume=False, mesh=None, dp=None,
        diagnostics=None, statistics=None):
    """Train `net` with `opt` on data = (x, y); see the module docstring for batching and keys.

    validation=(x_val, y_val) adds val_loss and val_accuracy to the history
    each epoch; early_stopping=pn.EarlyStopping(...) stops the run (and, with
    restore_best, returns the best params); augment=(key, x, y) -> (x, y) is
    applied to every training batch; progress=True shows a tqdm bar.

    checkpoint=path saves the whole run (optimizer and model state, epoch,
    early stopping, history, key) every `checkpoint_every` epochs and at the
    end, atomically (see purenet.checkpoint). With resume=True a run whose
    checkpoint exists continues from it, bit-identical to a run that was
    never interrupted; without the file it starts fresh. The path is checked
    writable before training; a save that fails later warns and training goes
    on. Resuming with other data, validation or diagnostics data than the run
    that wrote the file is a CheckpointError naming which.

    mesh=pn.distributed.data_mesh() trains data-parallel: each batch is split
    over the mesh's devices (batch_size must divide evenly), params and
    state are replicated, and XLA reduces gradients and batch-norm
    statistics over the global batch. dp=pn.DPSGD(clip_norm, noise_multiplier)
    trains with DP-SGD's per-example clipping and Gaussian noise.
    diagnostics=(x_probe, y_probe) records purenet.diagnostics.gradient_flow
    on that batch and each Dense layer's update_ratio every epoch (arrays of
    shape (epochs, layers) in the history); it does not change training.
    statistics=(x_probe, y_probe) records pn.stats.gradient_noise on that
    batch every epoch: noise_scale (B_simple), trace_cov, grad_sq_norm and
    fisher_trace (the empirical Fisher's trace, mean_i |g_i|^2).

    Returns FitResult(params, state, opt_state, history, stopped_epoch), with
    history a dict of numpy arrays over the epochs run.
    """
    _check_arguments(epochs, batch_size, l2, checkpoint_every)
    x, y = jnp.asarray(data[0]), jnp.asarray(data[1])
    if validation is not None:
        validation = (jnp.asarray(validation[0]), jnp.asarray(validation[1]))
    _check_monitor(early_stopping, validation)
    train_state = _init_run(net, opt, x, key, params, state)
    _check_inputs(net, x, y, validation, loss, train_state.opt_state.params, train_state.model_state)
    if checkpoint is not None:
        from purenet.checkpoint import check_writable

        check_writable(checkpoint)  # fail now, not after the last epoch
    es = early_stopping.init(train_state.opt_state.params, train_state.model_state) if early_stopping else None
    probe = None if diagnostics is None else (jnp.asarray(diagnostics[0]), jnp.asarray(diagnostics[1]))
    stats_probe = None if statistics is None else (jnp.asarray(statistics[0]), jnp.asarray(statistics[1]))
    data = (x, y, validation, jax.random.fold_in(key, 1), probe, stats_probe)
    run = jax.jit(_epoch_with_metrics(net, opt, batch_size=batch_size, loss=loss, l2=l2, augment=augment,
                                      early_stopping=early_stopping, mesh=mesh, dp=dp))
    records, inputs = [], None if checkpoint is None else _fingerprints(x, y, validation, probe, stats_probe)
    if checkpoint is not None and resume and os.path.exists(checkpoint):
        metrics = set(jax.eval_shape(run, (train_state, es), data)[1])
        train_state, es, records = _resume(checkpoint, key, train_state, es, inputs, metrics)
    data, train_state, es = _place(mesh, data, batch_size, train_state, es)
    stopped_epoch = None
    if es is not None and bool(es.stopped):
        stopped_epoch = int(train_state.epoch) - 1
    bar = _progress(epochs) if progress else None
    if bar is not None:
        bar.update(int(train_state.epoch))
    while stopped_epoch is None and int(train_state.epoch) < epochs:
        (train_state, es), record = run((train_state, es), data)
        records.append(jax.device_get(record))
        done = int(train_state.epoch)
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{float(v):.4g}" for k, v in records[-1].items()
                             if k != "learning_rate" and np.ndim(v) == 0})
        if es is not None and bool(es.stopped):
            stopped_epoch = done - 1
        if checkpoint is not None and (done % checkpoint_every == 0 or done == epochs or stopped_epoch is not None):
            _save_run(checkpoint, key, train_state, es, records, inputs)
    if bar is not None:
        bar.close()
    history = _stack(records)
    params, model_state = train_state.opt_state.params, train_state.model_state
    if es is not None and early_stopping.restore_best and int(es.best_epoch) >= 0:
        params, model_state = es.best_params, es.best_model_state
    return FitResult(params, model_state, train_state.opt_state, history, stopped_epoch)


def _stack(records):
    return {k: np.array([r[k] for r in records]) for k in records[0]} if records else {}


def _fingerprints(x, y, validation, probe, stats_probe=None):
    """SHA-256 of each input that shapes a run's history (None where absent), to check a resume against."""
    def digest(arrays):
        if arrays is None:
            return None
        h = hashlib.sha256()
        for a in map(np.asarray, arrays):
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
        return np.frombuffer(h.digest(), np.uint8)

    return {"data": digest((x, y)), "validation": digest(validation), "diagnostics": digest(probe),
            "statistics": digest(stats_probe)}


# What each fingerprint is, and the argument that passes it.
_INPUTS = {"data": ("training data", "data"), "validation": ("validation data", "validation="),
           "diagnostics": ("diagnostics probe", "diagnostics="),
           "statistics": ("statistics probe", "statistics=")}


def _save_run(path, key, train_state, es, records, inputs):
    """Save the run; a failed save warns and training goes on (the result is never lost)."""
    from purenet import checkpoint

    try:
        checkpoint.save(path, {"train_state": train_state, "early_stopping": es,
                               "history": _stack(records), "key": key, "inputs": inputs})
    except OSError as e:
        warnings.warn(f"could not save checkpoint {path} after epoch {int(train_state.epoch)} ({e}); "
                      f"training goes on and fit still returns its result", RuntimeWarning, stacklevel=3)


def _check_same_inputs(path, saved, inputs):
    """Raise naming the input that differs from the run that wrote the checkpoint."""
    from purenet.checkpoint import CheckpointError

    for name, (what, argument) in _INPUTS.items():
        old, new = saved.get(name), inputs[name]
        if old is None and new is None:
            continue
        if old is None:
            raise CheckpointError(f"{path} was written by a run without {what}; resume without {argument} "
                                  f"(or use another checkpoint path)")
        if new is None:
            raise CheckpointError(f"{path} was written by a run with {what}; pass the same {argument} to resume")
        if not np.array_equal(np.asarray(old), new):
            raise CheckpointError(f"{path} was written with different {what} (shape, dtype or values); "
                                  f"resume with the original {argument} (or use another checkpoint path)")


def _resume(path, key, train_state, es, inputs, metrics):
    from purenet import checkpoint

    likes = {"train_state": train_state} if es is None else {"train_state": train_state, "early_stopping": es}
    saved = checkpoint.load_entries(path, likes)  # structure from this run's state: field names must match
    if not {"train_state", "early_stopping", "history", "key"} <= set(saved):
        raise checkpoint.CheckpointError(f"{path} is not a checkpoint of a fit run")
    if isinstance(saved.get("inputs"), dict):  # absent in checkpoints of older versions
        _check_same_inputs(path, saved["inputs"], inputs)
    if not np.array_equal(jax.random.key_data(saved["key"]), jax.random.key_data(key)):
        raise checkpoint.CheckpointError(f"{path} was written by a run with a different key; "
                                         f"resume with the same key (or use another checkpoint path)")
    train_state = saved["train_state"]
    if es is not None:
        if saved["early_stopping"] is None:
            raise checkpoint.CheckpointError(f"{path} was written by a run without early stopping")
        es = saved["early_stopping"]
    history = {k: np.asarray(v) for k, v in saved["history"].items()}
    if history and set(history) != metrics:
        raise checkpoint.CheckpointError(f"{path} records the metrics {sorted(history)}, this run records "
                                         f"{sorted(metrics)}; resume with the same validation=, diagnostics= "
                                         f"and statistics=")
    records = [{k: v[i] for k, v in history.items()} for i in range(int(train_state.epoch))]
    return train_state, es, records


def _progress(total):
    try:
        from tqdm.auto import tqdm
    except ImportError as e:  # pragma: no cover - tqdm is in the examples extra
        raise ImportError("progress=True needs tqdm: pip install 'purenet[examples]'") from e
    return tqdm(total=total, unit="epoch")


# ---------------------------------------------------------------- sweeps


@dataclasses.dataclass
class SweepResult:
    """Stacked results of a sweep: member i used the config {name: configs[name][i]}."""

    configs: dict
    params: Any
    state: Any
    history: dict

    def __len__(self):
        return len(next(iter(self.configs.values())))

    def config(self, i):
        return {name: values[i].item() for name, values in self.configs.items()}

    def member(self, i):
        """(params, state) of member i."""
        take = lambda t: jax.tree_util.tree_map(lambda v: v[i], t)  # noqa: E731
        return take(self.params), take(self.state)

    def best(self, metric="val_accuracy", mode="max"):
        """Index of the member with the best final value of `metric`."""
        final = np.asarray(self.history[metric])[:, -1]
        return int(np.nanargmax(final) if mode == "max" else np.nanargmin(final))


def sweep(build, data, *, grid, epochs, batch_size=64, loss="cross_entropy", l2=0.0,
          validation=None, augment=None):
    """Train one model per point of the Cartesian product of `grid`, all at once (vmapped).

    build(hp) -> (net, opt) receives a dict with one traced value per grid
    entry (e.g. hp["learning_rate"], hp["dropout"]); the network's structure
    must not depend on them. "seed" (required) gives member i the key
    jax.random.key(seed), exactly as `train(..., key=jax.random.key(seed))`
    would use; "l2", if in the grid, overrides `l2`. Batch size cannot be
    swept (it sets the shapes). Returns a SweepResult.

    Before training, build runs once per grid point with concrete values,
    so the constructors check each one (a negative learning rate, a dropout
    rate of 1), and the data are checked as `fit` checks them.
    """
    if "seed" not in grid:
        raise ValueError("sweep grid needs a 'seed' entry (a list of integer seeds)")
    if "batch_size" in grid:
        raise ValueError("batch_size cannot be swept in one vmapped call: it sets the array shapes")
    _check_arguments(epochs, batch_size, l2)
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
                                        validation=validation, augment=augment)
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
    x, y = jnp.asarray(data[0]), jnp.asarray(data[1])
    if validation is not None:
        validation = (jnp.asarray(validation[0]), jnp.asarray(validation[1]))
    key = jax.random.key(int(configs["seed"][0]))
    abstract = jax.eval_shape(lambda k: _init_run(net, opt, x, k, None, None), key)
    _check_inputs(net, x, y, validation, loss, abstract.opt_state.params, abstract.model_state)
