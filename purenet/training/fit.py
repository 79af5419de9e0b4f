"""`fit`: the thin driver around `train`'s pieces: checks, a jitted epoch at a time,
progress bar, validation, early stopping (restoring the best params), and
checkpoints that resume bit-identically.
"""
import hashlib
import os
import warnings
from typing import Any, NamedTuple

import jax
import numpy as np

from purenet import distributed
from purenet._checks import as_array
from purenet.optim import ema_params
from purenet.training.checks import batch_size_of, check_data, check_divisible
from purenet.training.loop import poisson, prepare_run


__all__ = ["FitResult", "fit", "place"]


class FitResult(NamedTuple):
    """What `fit` returns: the trained (or best) params and model state, the optimizer state, the history.

    Attributes:
        params: the trained parameters; with early stopping's restore_best the
            best epoch's, with evaluate_with_ema the parameter average.
        state: the model state that goes with `params`.
        opt_state: the final optimizer state (its params are the last epoch's).
        history: {metric: numpy array over the epochs run}, e.g. "loss",
            "learning_rate", "val_loss", "val_accuracy", "epsilon".
        stopped_epoch: the (0-based) epoch early stopping fired at, or None if
            it did not.
    """

    params: Any
    state: Any
    opt_state: Any
    history: dict
    stopped_epoch: Any = None  # the epoch early stopping fired at (None if it did not)


def fit(net: Any, opt: Any, data: tuple, *, key: jax.Array, epochs: int,
        # the model and its loss
        loss: Any = "cross_entropy", l2: Any = 0.0, params: Any = None, state: Any = None,
        # batches and gradients (the same options as `train`, `train_epoch` and `build_step`)
        batch_size: int | None = 64, augment: Any = None, dp: Any = None, accumulate: int = 1,
        precision: Any = None, mesh: Any = None, strategy: str | None = None,
        # evaluation and stopping
        validation: tuple | None = None, early_stopping: Any = None, evaluate_with_ema: bool = False,
        # recording
        diagnostics: tuple | None = None, statistics: tuple | None = None, progress: bool = False,
        # checkpoints
        checkpoint: Any = None, checkpoint_every: int = 1, resume: bool = False) -> FitResult:
    """Train `net` with `opt` on data = (x, y); see `purenet.training.loop` for batching and keys.

    The options come in five groups (all keywords): the model and its loss;
    batches and gradients; evaluation and stopping; recording; checkpoints.

    validation=(x_val, y_val) adds val_loss and val_accuracy to the history
    each epoch; early_stopping=pn.EarlyStopping(...) stops the run (and, with
    restore_best, returns the best params); augment=(key, x, y) -> (x, y) is
    applied to every training batch; progress=True shows a tqdm bar.

    checkpoint=path saves the whole run (optimizer and model state, epoch,
    early stopping, history, key) every `checkpoint_every` epochs and at the
    end, atomically (see purenet.io.checkpoint). With resume=True a run whose
    checkpoint exists continues from it, bit-identical to a run that was
    never interrupted; without the file it starts fresh. The path is checked
    writable before training; a save that fails later warns and training goes
    on. Resuming with other data, validation or diagnostics data than the run
    that wrote the file is a CheckpointError naming which.

    mesh=pn.distributed.data_mesh() trains data-parallel: each batch is split
    over the mesh's devices (batch_size must divide evenly), params and
    state are replicated, and XLA reduces gradients and batch-norm
    statistics over the global batch. With strategy="fsdp", "tensor" or
    "fsdp+tensor" and a mesh from pn.distributed.mesh({...}) the params and
    every params-shaped part of the optimizer state stay split over the mesh
    as pn.distributed.shard_params places them (the returned params and
    opt_state are sharded arrays). dp=pn.DPSGD(clip_norm, noise_multiplier)
    trains with DP-SGD's per-example clipping and Gaussian noise; with
    Poisson sampling history["epsilon"] is the privacy spent after each
    epoch. The accountant's settings are checked before the first epoch;
    validation=, diagnostics= and statistics= may not hold training
    examples (their metrics would not be covered by epsilon); a checkpoint
    keeps each epoch's (noise multiplier, sample rate, steps), so a run
    resumed with other settings is accounted as the composition of what ran,
    and resuming a DP run without DP-SGD (or the reverse) is an error. Each
    DP run needs its own key: two runs with one key draw the same batches
    and noise, and the difference of their updates carries no noise at all.
    diagnostics=(x_probe, y_probe) records purenet.analysis.diagnostics.gradient_flow
    on that batch and each Dense layer's update_ratio every epoch (arrays of
    shape (epochs, layers) in the history); it does not change training.
    statistics=(x_probe, y_probe) records pn.stats.gradient_noise on that
    batch every epoch: noise_scale (`B_simple`), trace_cov, grad_sq_norm and
    fisher_trace (the empirical Fisher's trace, `mean_i |g_i|^2`). With a
    K-FAC optimizer (pn.optim.kfac) each step computes the batch's factors.
    accumulate=k runs each batch as k micro-batches in a scan and averages
    their gradients: the update of the whole batch with a k-times smaller
    working set (BatchNorm then normalises per micro-batch).
    evaluate_with_ema=True (with an optimizer from `pn.optim.ema`) validates,
    early-stops on and returns the parameter average instead of the params.
    precision=pn.Precision(compute="bfloat16") trains in mixed precision:
    float32 params and optimizer, bfloat16 activations and matmuls (see
    `purenet.training.precision`). float16 wants loss_scale="dynamic": the
    scale then lives in opt_state, halves and skips the step on an overflow,
    and is recorded each epoch as history["loss_scale"].

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        opt: the optimizer (`pn.optim`).
        data: (x, y), x of shape `(n, *in_shape)` (floats, or integer ids for
            a network that starts with an embedding) and y of shape (n, ...).
        key: the run's key (see `purenet.training.loop` for what derives from it).
        epochs: the number of epochs, an int >= 0.
        loss: the loss, a name (e.g. "cross_entropy", "mse") or a `Loss`.
        l2: weight decay coefficient on the parameters whose role is "weight".
        params: starting parameters, or None to draw them from fold_in(key, 0).
        state: the model state of `params`, or None.
        batch_size: examples per step (None: full batch).
        augment: an augmentation `(key, x, y) -> (x, y)` for each training batch, or None.
        dp: DP-SGD's settings, `pn.DPSGD(clip_norm, noise_multiplier, ...)`, or None.
        accumulate: k, micro-batches per batch, a positive int.
        precision: mixed precision, `pn.Precision(...)`, or None.
        mesh: a device mesh (`pn.distributed.data_mesh()`, `pn.distributed.mesh({...})`), or None.
        strategy: "fsdp", "tensor" or "fsdp+tensor" (with `mesh`), or None (replicated params).
        validation: (x_val, y_val), or None.
        early_stopping: a `pn.EarlyStopping`, or None.
        evaluate_with_ema: validate, early-stop on and return the EMA of the params.
        diagnostics: (x_probe, y_probe) for gradient flow and update ratios each epoch, or None.
        statistics: (x_probe, y_probe) for `pn.stats.gradient_noise` each epoch, or None.
        progress: show a tqdm progress bar.
        checkpoint: a file path to save the run to, or None.
        checkpoint_every: epochs between checkpoints, a positive int.
        resume: continue from `checkpoint` when the file exists.

    Returns:
        FitResult(params, state, opt_state, history, stopped_epoch), with
            history a dict of numpy arrays over the epochs run.

    Raises:
        TypeError: if the inputs or the labels have the wrong dtype.
        ValueError: if an argument is out of range, the data do not fit the
            network or the loss, the batch does not divide over the mesh, the
            options do not combine, or under dp= validation, diagnostics or
            statistics data hold training examples.
        CheckpointError: if resuming from a checkpoint of another run (other
            data, key, metrics, early stopping or privacy settings), or the
            checkpoint path is not writable.
        ImportError: if progress=True and tqdm is not installed.
    """
    if checkpoint is not None:
        from purenet.io.checkpoint import check_writable

        check_writable(checkpoint)  # fail now, not after the last epoch
    r = prepare_run(net, opt, data, key=key, epochs=epochs, batch_size=batch_size, loss=loss, l2=l2, params=params,
                    state=state, validation=validation, early_stopping=early_stopping, augment=augment, mesh=mesh,
                    dp=dp, accumulate=accumulate, evaluate_with_ema=evaluate_with_ema, precision=precision,
                    strategy=strategy, checkpoint_every=checkpoint_every)
    x, y, validation, train_state, es = r.x, r.y, r.validation, r.train_state, r.es
    probe = None if diagnostics is None else (as_array(diagnostics[0], "diagnostics x"),
                                              as_array(diagnostics[1], "diagnostics y"))
    stats_probe = None if statistics is None else (as_array(statistics[0], "statistics x"),
                                                   as_array(statistics[1], "statistics y"))
    for name, batch in (("diagnostics", probe), ("statistics", stats_probe)):
        if batch is not None:  # the probes get the training data's checks (labels, NaN rows, shapes)
            check_data(net, *batch, loss, train_state.opt_state.params, train_state.model_state, name=f"{name} x")
    phase = _dp_phase(dp, x.shape[0], batch_size_of(x.shape[0], batch_size))
    if phase is not None:
        _check_dp_run(dp, phase, x, validation, probe, stats_probe)
    data = (x, y, validation, jax.random.fold_in(key, 1), probe, stats_probe)
    run = jax.jit(_pinned(r.epoch, net, mesh, strategy))
    records, inputs = [], None if checkpoint is None else _fingerprints(x, y, validation, probe, stats_probe)
    phases: list | None = None if phase is None else []  # each epoch's DP-SGD mechanism (sigma, q, steps)
    if checkpoint is not None and resume and os.path.exists(checkpoint):
        metrics = set(jax.eval_shape(run, (train_state, es), data)[1])
        train_state, es, records, phases = _resume(checkpoint, key, train_state, es, inputs, metrics, phase)
    data, train_state, es = place(mesh, data, batch_size, train_state, es, net, strategy)
    stopped_epoch = None
    if es is not None and bool(es.stopped):
        stopped_epoch = int(train_state.epoch) - 1
    bar = _progress(epochs) if progress else None
    if bar is not None:
        bar.update(int(train_state.epoch))
    while stopped_epoch is None and int(train_state.epoch) < epochs:
        (train_state, es), record = run((train_state, es), data)
        records.append(jax.device_get(record))
        if phases is not None:
            phases.append(phase)
        done = int(train_state.epoch)
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{float(v):.4g}" for k, v in records[-1].items()
                             if k != "learning_rate" and np.ndim(v) == 0})
        if es is not None and bool(es.stopped):
            stopped_epoch = done - 1
        if checkpoint is not None and (done % checkpoint_every == 0 or done == epochs or stopped_epoch is not None):
            _save_run(checkpoint, key, train_state, es, records, inputs, phases)
    if bar is not None:
        bar.close()
    history = _stack(records)
    if phases and history:
        history["epsilon"] = _epsilons(dp, phases)
    params, model_state = train_state.opt_state.params, train_state.model_state
    if evaluate_with_ema:
        params = ema_params(train_state.opt_state)
    if es is not None and early_stopping.restore_best and int(es.best_epoch) >= 0:
        params, model_state = es.best_params, es.best_model_state
    return FitResult(params, model_state, train_state.opt_state, history, stopped_epoch)


def _dp_phase(dp, n, batch_size):
    """One epoch of Poisson-sampled DP-SGD as the accountant sees it: (sigma, q, steps), or None
    (no DP-SGD, or shuffled batches, which have no accounting)."""
    if not poisson(dp):
        return None
    return (float(dp.noise_multiplier), batch_size / n, n // batch_size)


def _check_dp_run(dp, phase, x, validation, probe, stats_probe):
    """Before the first epoch: the accountant takes these settings (a bad one would otherwise fail after
    the last epoch, losing the run), and no data whose metrics the history records each epoch holds a
    training example. Those metrics are functions of the DP-SGD params (post-processing, covered by
    epsilon) only when their data are not training data; gradients or losses of training examples
    released beside epsilon are not private."""
    from purenet import privacy

    privacy.epsilon(*phase, dp.target_delta, dp.accountant)
    rows = {np.ascontiguousarray(r).tobytes() for r in np.asarray(x)}
    for name, batch in (("validation", validation), ("diagnostics", probe), ("statistics", stats_probe)):
        if batch is None:
            continue
        shared = sum(np.ascontiguousarray(r).tobytes() in rows for r in np.asarray(batch[0]))
        if shared:
            raise ValueError(f"{name}= holds {shared} of the training examples: under dp= the history records "
                             f"its metrics every epoch, and metrics of training examples are not covered by the "
                             f"run's epsilon; pass held-out data")


def _epsilons(dp, phases):
    """epsilon after each epoch, composing every epoch's mechanism so far (`pn.privacy.epsilon_of`):
    a run resumed with another noise multiplier or batch size is accounted as the run it was."""
    from purenet import privacy

    return np.array([privacy.epsilon_of(phases[:e + 1], dp.target_delta, dp.accountant)
                     for e in range(len(phases))])


def _stack(records):
    return {k: np.array([r[k] for r in records]) for k in records[0]} if records else {}


def _fingerprints(x, y, validation, probe, stats_probe):
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


def _save_run(path, key, train_state, es, records, inputs, phases):
    """Save the run; a failed save warns and training goes on (the result is never lost). `phases`
    (Poisson DP-SGD runs) is each epoch's (sigma, q, steps): the privacy history a resume composes."""
    from purenet.io import checkpoint

    privacy = None if phases is None else np.array(phases, np.float64).reshape(-1, 3)
    try:
        checkpoint.save(path, {"train_state": train_state, "early_stopping": es,
                               "history": _stack(records), "key": key, "inputs": inputs, "privacy": privacy})
    except OSError as e:
        warnings.warn(f"could not save checkpoint {path} after epoch {int(train_state.epoch)} ({e}); "
                      f"training goes on and fit still returns its result", RuntimeWarning, stacklevel=3)


def _check_same_inputs(path, saved, inputs):
    """Raise naming the input that differs from the run that wrote the checkpoint."""
    from purenet.io.checkpoint import CheckpointError

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


def _resumed_phases(path, saved, history, epochs, phase):
    """The privacy history of the checkpointed epochs, which this run's `phase` continues: refuse to mix
    private and non-private epochs; a checkpoint from before the history was kept is taken to have run
    with this run's settings (with a warning)."""
    from purenet.io.checkpoint import CheckpointError

    was_private = saved.get("privacy") is not None or "poisson_overflow" in history
    if was_private and phase is None:
        raise CheckpointError(f"{path} was written by a DP-SGD run (Poisson sampling); resume it with a dp= "
                              f"that samples Poisson batches, so its privacy history goes on being accounted")
    if phase is None:
        return None
    if not was_private:
        raise CheckpointError(f"{path} was written by a run without DP-SGD's Poisson sampling: its epochs have "
                              f"no privacy guarantee, so no epsilon covers the resumed run; start a fresh DP run "
                              f"(another checkpoint path)")
    if saved.get("privacy") is None:
        warnings.warn(f"{path} predates the privacy history in checkpoints: its {epochs} epochs are accounted "
                      f"with this run's noise multiplier and batch size", RuntimeWarning, stacklevel=4)
        return [phase] * epochs
    phases = [(float(s), float(q), int(t)) for s, q, t in np.asarray(saved["privacy"], np.float64)]
    if len(phases) != epochs:
        raise CheckpointError(f"{path} records the privacy of {len(phases)} epochs for {epochs} epochs run")
    return phases


def _resume(path, key, train_state, es, inputs, metrics, phase):
    from purenet.io import checkpoint

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
    phases = _resumed_phases(path, saved, history, int(train_state.epoch), phase)
    if history and set(history) != metrics:
        raise checkpoint.CheckpointError(f"{path} records the metrics {sorted(history)}, this run records "
                                         f"{sorted(metrics)}; resume with the same validation=, diagnostics= "
                                         f"and statistics=")
    records = [{k: v[i] for k, v in history.items()} for i in range(int(train_state.epoch))]
    return train_state, es, records, phases


def _progress(total):
    try:
        from tqdm.auto import tqdm
    except ImportError as e:  # pragma: no cover - tqdm is in the examples extra
        raise ImportError("progress=True needs tqdm: pip install 'purenet[examples]'") from e
    return tqdm(total=total, unit="epoch")


def _pinned(run, net, mesh, strategy):
    """`run` whose returned (train_state, es) keep the strategy's shardings (params-shaped parts
    split as the params, the rest replicated), not whatever XLA would pick after the epoch's loop."""
    if strategy is None:
        return run

    def pinned(carry, data):
        carry, record = run(carry, data)
        shardings = distributed.tree_shardings(net, carry, carry[0].opt_state.params, mesh, strategy)
        return distributed.constrain(carry, shardings), record

    return pinned


def place(mesh: Any, data: tuple, batch_size: int | None, train_state: Any, es: Any, net: Any = None,
          strategy: str | None = None) -> tuple:
    """With a mesh: check the batch divides over it; replicate data and state on it.

    With a strategy, the params-shaped parts of the state split as
    `pn.distributed.shard_params` splits the params.

    Args:
        mesh: the device mesh, or None (nothing is placed).
        data: the epoch's data tuple (x, y, validation, key, probe, stats_probe).
        batch_size: examples per step (None: full batch).
        train_state: the `TrainState`.
        es: early stopping's state, or None.
        net: the network, needed with `strategy`.
        strategy: "fsdp", "tensor" or "fsdp+tensor", or None.

    Returns:
        (data, train_state, es), placed on `mesh`.

    Raises:
        ValueError: if the batch does not divide over the mesh, or `strategy`
            is unknown, lacks its mesh axes or is given without a mesh.
    """
    if mesh is None:
        if strategy is not None:
            distributed.check_strategy(strategy, mesh)
        return data, train_state, es
    check_divisible(mesh, data[0].shape[0], batch_size)
    if strategy is None:
        return distributed.replicate((data, train_state, es), mesh)
    params = train_state.opt_state.params
    state = distributed.shard_tree(net, (train_state, es), params, mesh, strategy)
    return (distributed.replicate(data, mesh), *state)
