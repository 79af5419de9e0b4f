"""Epochs and whole runs as scans of a training step.

    run_epoch(step, train_state, x, y, key, batch_size)   one epoch: a scan of `step` over its batches
    train_epoch(net, opt, train_state, x, y, key, ...)    the same, with the step built from options
    train(net, opt, data, key=..., epochs=...)            every epoch in one scan: jittable, vmappable

Batches: batch_size=None is full-batch gradient descent, 1 is stochastic
gradient descent, anything else mini-batch. Each epoch uses n // batch_size
full batches of a fresh permutation; the n mod batch_size examples left at
the end of that permutation wait for the next epoch. Since the permutation
is new every epoch, no example is left out for good (each is skipped in an
epoch with probability (n mod batch_size) / n). A batch_size above n is n.

Keys: a run's key k gives the initial params from fold_in(k, 0) (when none
are passed); epoch e shuffles with purenet.data.shuffle.permutation(k1, n, salt=e),
k1 = fold_in(k, 1), and step i of epoch e draws from fold_in(fold_in(k1, e), i + 1).
The same key gives bit-identical results; nothing reads global random state.
"""
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from purenet import metrics, network, privacy
from purenet.analysis import diagnostics
from purenet.data import shuffle
from purenet.data.augment import mixes_examples
from purenet._checks import as_array, check_float_input
from purenet.initializers import default_float
from purenet.layers.base import Array, LayerLike, PyTree
from purenet.layers.roles import id_layer
from purenet.analysis import stats
from purenet.losses import Loss
from purenet.optim import current_loss_scale, ema_params, has_ema
from purenet.privacy.clipping import DPSGD
from purenet.training.checks import (batch_size_of, check_arguments, check_divisible, check_inputs,
                                     check_monitor)
from purenet.training.early_stopping import EarlyStopping, EarlyStoppingState
from purenet.training.gradients import gradients
from purenet.training.precision import Precision, optimizer_for
from purenet.training.step import make_step

__all__ = [
    "Run", "TrainState", "as_arrays", "build_step", "check_canaries", "check_ema", "epoch_with_metrics", "evaluate", "init_run", "poisson",
    "prepare_run", "run_epoch", "run_epoch_steps", "run_poisson_epoch", "train", "train_epoch",
]


class TrainState(NamedTuple):
    """What a run carries between epochs: optimizer state (with params), model state, epochs done.

    Attributes:
        opt_state: the optimizer state; `opt_state.params` are the parameters.
        model_state: the model state (BatchNorm's running statistics; empty
            for a stateless network).
        epoch: the number of epochs done, an int32 scalar.
    """

    opt_state: Any
    model_state: Any
    epoch: jnp.ndarray


def run_epoch(step: Callable[..., tuple], train_state: TrainState, x: Array, y: Array, key: Array,
              batch_size: int | None = 64) -> tuple[TrainState, Array]:
    """One epoch of `step` (see `make_step`) over (x, y): returns (train_state, mean loss of its batches).

    With a step that skips non-finite gradients (apply_if_finite(opt, "skip"),
    dynamic loss scaling) the mean is over the steps it applied; a skipped
    step's loss (often inf in float16) does not make the epoch's loss NaN.

    Args:
        step: the training step, `step((opt_state, model_state), (x, y, key)) -> (carry, loss)`.
        train_state: the state before the epoch.
        x: training inputs, shape `(n, *in_shape)`.
        y: training targets, shape (n, ...).
        key: the run's data key (k1 in the module docstring): the shuffle and
            the steps' keys derive from it and the epoch number.
        batch_size: examples per step (None: full batch; above n: n).

    Returns:
        (train_state, loss): the state after the epoch (epoch + 1) and the mean
            loss of its n // batch_size steps, a scalar.

    Raises:
        ValueError: if `batch_size` is not a positive int or None.
    """
    train_state, values = run_epoch_steps(step, train_state, x, y, key, batch_size)
    mean = jnp.nanmean(values) if getattr(step, "skips", False) else jnp.mean(values)  # a Step, or a plain function
    return train_state, mean


def run_epoch_steps(step: Callable[..., tuple], train_state: TrainState, x: Array, y: Array, key: Array,
                    batch_size: int | None = 64) -> tuple[TrainState, Array]:
    """`run_epoch` with every step's loss: (train_state, losses of shape (steps,)).

    The batches are a shuffle of (x, y) by `key` and the epoch number; step i
    draws its randomness from fold_in(fold_in(key, epoch), i + 1).

    Args:
        step: the training step, `step((opt_state, model_state), (x, y, key)) -> (carry, loss)`.
        train_state: the state before the epoch.
        x: training inputs, shape `(n, *in_shape)`.
        y: training targets, shape (n, ...).
        key: the run's data key: the shuffle and the steps' keys derive from it
            and the epoch number.
        batch_size: examples per step (None: full batch; above n: n).

    Returns:
        (train_state, losses): the state after the epoch and each step's loss,
            shape (n // batch_size,) (NaN for a step a guarded optimizer skipped).

    Raises:
        ValueError: if `batch_size` is not a positive int or None.
    """
    n = x.shape[0]
    bs = batch_size_of(n, batch_size)
    steps = n // bs
    order = jnp.arange(n) if bs == n else shuffle.permutation(key, n, salt=train_state.epoch)
    key = jax.random.fold_in(key, train_state.epoch)
    batches = order[: steps * bs].reshape(steps, bs)

    def body(carry, inputs):
        index, i = inputs
        return step(carry, (x[index], y[index], jax.random.fold_in(key, i + 1)))

    (opt_state, model_state), values = jax.lax.scan(
        body, (train_state.opt_state, train_state.model_state), (batches, jnp.arange(steps)))
    return TrainState(opt_state, model_state, train_state.epoch + 1), values


def run_poisson_epoch(step: Callable[..., tuple], train_state: TrainState, x: Array, y: Array, key: Array,
                      batch_size: int | None = 64) -> tuple[TrainState, Array, Array]:
    """One epoch of DP-SGD with Poisson sampling: n // batch_size steps of Poisson batches.

    In each step's batch every example joined with probability
    q = batch_size / n; the batch is padded to `pn.privacy.poisson_batch_bound(n, q)`
    rounded up to a multiple of 8 (at most n), so that it splits over a mesh
    of up to 8 devices. Step i of epoch e samples from
    fold_in(fold_in(fold_in(key, e), i + 1), 0) and draws its own randomness
    (dropout, noise) from fold_in(..., 1).

    Args:
        step: the training step; its batch is (x, y, key, weight), weight the
            padded batch's 0/1 marks (`pn.training.dp_sgd` takes them).
        train_state: the state before the epoch.
        x: training inputs, shape `(n, *in_shape)`.
        y: training targets, shape (n, ...).
        key: the run's data key.
        batch_size: the expected batch size q n (None: n).

    Returns:
        (train_state, loss, overflow): the state after the epoch, the mean
            loss of its steps, and how many sampled examples the padded
            batches had no room for (int, summed over the steps).

    Raises:
        ValueError: if `batch_size` is not a positive int or None.
    """
    n = x.shape[0]
    bs = batch_size_of(n, batch_size)
    rate = bs / n
    bound = privacy.poisson_batch_bound(n, rate)
    bound = min(n, -(-bound // 8) * 8)  # a multiple of 8: the padded batch splits over a mesh of up to 8 devices
    key = jax.random.fold_in(key, train_state.epoch)

    def body(carry, i):
        k = jax.random.fold_in(key, i + 1)
        batch = privacy.poisson_batch(jax.random.fold_in(k, 0), n, rate, bound)
        carry, value = step(carry, (x[batch.rows], y[batch.rows], jax.random.fold_in(k, 1), batch.weight))
        return carry, (value, batch.overflow)

    (opt_state, model_state), (values, overflow) = jax.lax.scan(
        body, (train_state.opt_state, train_state.model_state), jnp.arange(n // bs))
    mean = jnp.nanmean(values) if getattr(step, "skips", False) else jnp.mean(values)  # a Step, or a plain function
    return TrainState(opt_state, model_state, train_state.epoch + 1), mean, jnp.sum(overflow)


def poisson(dp: DPSGD | None) -> bool:
    """Whether DP-SGD option `dp` samples Poisson batches.

    Args:
        dp: DP-SGD's settings, or None.

    Returns:
        True when `dp` is given with sampling="poisson".
    """
    return dp is not None and dp.sampling == "poisson"


def check_canaries(dp: DPSGD | None, n: int, batch_size: int, opt_state: Any = None) -> None:
    """Check that DP-SGD's canaries join each step at the rate the examples do, batch_size / n.

    An audit of canaries sampled at another rate audits another mechanism.
    Without an observer in the optimizer (`canaries.observe()`) nothing
    records their scores: a warning says so.

    Args:
        dp: DP-SGD's settings, or None (nothing to check).
        n: the number of training examples.
        batch_size: the (expected) batch size.
        opt_state: the optimizer state, searched for a canary observer; None
            skips that check.

    Raises:
        ValueError: if the canaries' sample rate is not batch_size / n.
    """
    if dp is None or dp.canaries is None:
        return
    from purenet.optim import find_slot
    from purenet.privacy.canaries import CanaryObservations
    if opt_state is not None and find_slot(opt_state, CanaryObservations) is None:
        import warnings
        warnings.warn("DPSGD(canaries=) puts white-box canaries into the run, but the optimizer has no observer to "
                      "record them: chain canaries.observe() first, pn.optim.chain(canaries.observe(), opt)",
                      stacklevel=3)
    rate = batch_size / n
    if abs(dp.canaries.sample_rate - rate) > 1e-12 * rate:
        raise ValueError(f"the DPSGD canaries join at sample_rate={dp.canaries.sample_rate}, but this run samples "
                         f"each example with q = batch_size / n = {batch_size} / {n} = {rate}: make them with "
                         f"pn.privacy.gradient_canaries(..., sample_rate={batch_size} / {n})")


def build_step(net: LayerLike, opt: Any, *, loss: str | Loss = "cross_entropy", l2: float | Array = 0.0,
               augment: Callable[..., tuple[Array, Array]] | None = None, mesh: Mesh | None = None,
               dp: DPSGD | None = None, accumulate: int = 1, precision: Precision | None = None,
               batch_size: int | None = None, strategy: str | None = None) -> Callable[[tuple, tuple], tuple[tuple, Array]]:
    """The step `fit`, `train` and `train_epoch` run: make_step(gradients(net, ...), opt, ...).

    `opt` is the optimizer as the state was built with (precision.optimizer(opt), see
    `purenet.training.precision`).

    An optimizer with per-step arguments (pn.optim.kfac's factors) gets them from the same pass.
    strategy= ("fsdp", "tensor", "fsdp+tensor", with a mesh) keeps params, gradients and optimizer
    slots sharded (see `make_step` and `purenet.distributed.strategies`).
    DP-SGD with Poisson sampling divides by `batch_size`, the expected batch size.

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        opt: the optimizer, as the state was built with.
        loss: the loss, a name or a `Loss`.
        l2: weight decay coefficient on the parameters whose role is "weight".
        augment: an augmentation `(key, x, y) -> (x, y)` for each batch, or None.
        mesh: a device mesh to split each batch over, or None.
        dp: DP-SGD's settings (`pn.DPSGD`), or None.
        accumulate: micro-batches per batch, a positive int.
        precision: mixed precision (`pn.Precision`), or None.
        batch_size: the batch size (needed for Poisson-sampled DP-SGD), or None.
        strategy: "fsdp", "tensor" or "fsdp+tensor" (with `mesh`), or None.

    Returns:
        A `Step`: `step((opt_state, model_state), (x, y, key[, weight])) -> ((opt_state, model_state), loss)`.

    Raises:
        ValueError: if Poisson-sampled DP-SGD lacks `batch_size`, `augment`
            mixes examples under DP-SGD, the options do not combine (see
            `purenet.training.gradients.gradients`), `accumulate` is not a
            positive integer, or `strategy` is unknown, lacks its mesh axes or
            is given without a mesh.
    """
    if poisson(dp) and batch_size is None:
        raise ValueError("DP-SGD with Poisson sampling needs the expected batch size: build_step(..., batch_size=)")
    if dp is not None and mixes_examples(augment):
        raise ValueError("augment= mixes examples (mixup), which DP-SGD cannot clip: one example reaches several "
                         "rows of the batch (and, with Poisson sampling, padding rows mix into sampled ones), so "
                         "its influence on the clipped sum exceeds clip_norm and the accounted epsilon does not "
                         "hold; train with an augmentation that transforms each example on its own")
    fn = gradients(net, loss, l2, dp, accumulate, precision, extra_args=getattr(opt, "extra_args", ()),
                   expected_batch_size=batch_size if poisson(dp) else None,
                   extra_options=getattr(opt, "extra_options", None))
    return make_step(fn, opt, augment=augment, mesh=mesh, strategy=strategy, net=net)


def train_epoch(net: LayerLike, opt: Any, train_state: TrainState, x: Array, y: Array, key: Array, *,
                batch_size: int | None = 64, loss: str | Loss = "cross_entropy", l2: float | Array = 0.0,
                augment: Callable[..., tuple[Array, Array]] | None = None, mesh: Mesh | None = None,
                dp: DPSGD | None = None, accumulate: int = 1,
                precision: Precision | None = None, strategy: str | None = None) -> tuple[TrainState, Array]:
    """One epoch over (x, y): returns (train_state, mean training loss of its batches).

    With a `mesh` (see purenet.distributed) every batch is split over its
    devices and XLA reduces the gradients across them. With dp=pn.DPSGD(...)
    each step uses DP-SGD's clipped, noised gradient; with accumulate=k each
    batch runs as k micro-batches (see `purenet.training.gradients.accumulate`);
    with precision=pn.Precision(...) in mixed precision (see `purenet.training.precision`;
    with loss_scale="dynamic" initialise the state with precision.optimizer(opt)).

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        opt: the optimizer (without the precision's dynamic loss scale: it is
            added here).
        train_state: the state before the epoch (`init_run`).
        x: training inputs, shape `(n, *in_shape)`.
        y: training targets, shape (n, ...).
        key: the run's data key (see `run_epoch`).
        batch_size: examples per step (None: full batch).
        loss: the loss, a name or a `Loss`.
        l2: weight decay coefficient on the parameters whose role is "weight".
        augment: an augmentation `(key, x, y) -> (x, y)` for each batch, or None.
        mesh: a device mesh to split each batch over, or None.
        dp: DP-SGD's settings (`pn.DPSGD`), or None.
        accumulate: micro-batches per batch, a positive int.
        precision: mixed precision (`pn.Precision`), or None.
        strategy: "fsdp", "tensor" or "fsdp+tensor" (with `mesh`), or None.

    Returns:
        (train_state, loss): the state after the epoch and the mean training
            loss of its batches, a scalar.

    Raises:
        ValueError: as `build_step`, or if `batch_size` is not a positive int
            or None, or DP-SGD's canaries join at another rate than batch_size / n.
    """
    opt = optimizer_for(opt, precision)
    bs = batch_size_of(x.shape[0], batch_size)
    check_canaries(dp, x.shape[0], bs, train_state.opt_state)
    step = build_step(net, opt, loss=loss, l2=l2, augment=augment, mesh=mesh, dp=dp, accumulate=accumulate,
                      precision=precision, batch_size=bs, strategy=strategy)
    if poisson(dp):
        return run_poisson_epoch(step, train_state, x, y, key, bs)[:2]
    return run_epoch(step, train_state, x, y, key, batch_size)


# validation rows a forward chunk: small chunks evaluated the LeNet's held-out set faster on the CPU than
# large ones (measured in benchmarks/README.md, "Whole processes: the CNN and the autoencoder")
EVALUATION_BATCH = 128


def evaluate(net: LayerLike, params: PyTree, model_state: PyTree, validation: tuple[Array, Array],
             loss: str | Loss) -> dict[str, Array]:
    """val_loss and val_accuracy from one forward pass over the validation set.

    The pass runs EVALUATION_BATCH rows at a time: the loss from the body's output (logits where the
    loss is fused with the output layer), and the classes from those same logits as
    `metrics.predicted_classes` reads them. Where the body's output is not a batch of logit rows (no
    fused head, sequences), accuracy runs its own pass. One pass is faster than the loss and the
    accuracy as two (measured in benchmarks/README.md, "Whole processes: the CNN and the autoencoder").

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        params: its parameters.
        model_state: its model state (evaluation mode: BatchNorm uses the running statistics).
        validation: (x_val, y_val), x_val of shape `(n_val, *in_shape)`.
        loss: the loss, a name or a `Loss`.

    Returns:
        {"val_loss": scalar, "val_accuracy": scalar in [0, 1]}.
    """
    xv, yv = validation
    body, body_params, body_state, loss_fn, head = network.evaluation_body(net, params, model_state, loss)
    out = metrics.predict(body, body_params, body_state, xv, EVALUATION_BATCH)
    value = loss_fn.value(out, yv)
    if head is not None and out.ndim == 2:
        accuracy = jnp.mean(metrics.classes_of(out, head) == metrics.labels_of(yv))
    else:
        accuracy = metrics.accuracy(net, params, model_state, xv, yv)
    return {"val_loss": value, "val_accuracy": accuracy}


def epoch_with_metrics(net: LayerLike, step: Callable[..., tuple], *, batch_size: int | None, loss: str | Loss,
                       l2: float | Array, early_stopping: EarlyStopping | None, evaluate_with_ema: bool = False,
                       sampling: str = "shuffle") -> Callable[[tuple, tuple], tuple[tuple, dict[str, Array]]]:
    """run((train_state, es), (x, y, validation, key, probe, stats_probe)) -> ((train_state, es), record).

    The data are arguments, not closed-over constants, so a jitted `run`
    neither bakes the data set into the program nor recompiles for new data.
    With evaluate_with_ema the validation metrics and early stopping read the
    parameter average that `pn.optim.ema` keeps.

    Args:
        net: the network.
        step: the training step (`build_step`).
        batch_size: examples per step (None: full batch).
        loss: the loss, a name or a `Loss`.
        l2: weight decay coefficient (for the diagnostics and statistics probes).
        early_stopping: the early stopping, or None.
        evaluate_with_ema: validate and early-stop on the EMA of the params.
        sampling: "shuffle" (`run_epoch`) or "poisson" (`run_poisson_epoch`).

    Returns:
        `run`, whose record maps each metric of the epoch ("loss",
            "learning_rate", the validation metrics, ...) to its value.
    """

    def run(carry, data):
        (train_state, es), (x, y, validation, key, probe, stats_probe) = carry, data
        epoch = train_state.epoch
        before = train_state.opt_state.params
        if sampling == "poisson":
            train_state, mean_loss, overflow = run_poisson_epoch(step, train_state, x, y, key, batch_size)
            record = {"loss": mean_loss, "learning_rate": train_state.opt_state.learning_rate,
                      "poisson_overflow": overflow}
        else:
            train_state, mean_loss = run_epoch(step, train_state, x, y, key, batch_size)
            record = {"loss": mean_loss, "learning_rate": train_state.opt_state.learning_rate}
        scale = current_loss_scale(train_state.opt_state)
        if scale is not None:
            record["loss_scale"] = scale
        params = ema_params(train_state.opt_state) if evaluate_with_ema else train_state.opt_state.params
        if validation is not None:
            record.update(evaluate(net, params, train_state.model_state, validation, loss))
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
            es = early_stopping.update(es, record[early_stopping.monitor], epoch, params, train_state.model_state)
        return (train_state, es), record

    return run


def check_ema(evaluate_with_ema: bool, opt_state: Any) -> None:
    """Check that evaluate_with_ema=True has an optimizer that keeps a parameter average.

    Args:
        evaluate_with_ema: the option.
        opt_state: the optimizer state.

    Raises:
        ValueError: if `evaluate_with_ema` and `opt_state` holds no `pn.optim.ema` slot.
    """
    if evaluate_with_ema and not has_ema(opt_state):
        raise ValueError("evaluate_with_ema=True needs an optimizer that keeps a parameter average: wrap it "
                         "in pn.optim.ema(opt, decay) (it may sit inside masked, chain or apply_if_finite)")


def init_run(net: LayerLike, opt: Any, x: Array, key: Array, params: PyTree, state: PyTree,
             dtype: Any = None) -> TrainState:
    """A run's starting TrainState: the optimizer state of `params`, the model state, epoch 0.

    When `params` is None they are drawn by pn.init from fold_in(key, 0) for
    x's example shape, and the model `state` (when None) is init's.

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        opt: the optimizer (as the state will be stepped with).
        x: the training inputs, shape `(n, *in_shape)`, checked as fit checks
            them (floats, or ids for a network that reads them).
        key: the run's key.
        params: a starting point, or None for a fresh init.
        state: the model state of `params`, or None (init's, when params are drawn).
        dtype: the params' dtype when drawn (default: x's float dtype, else JAX's default float).

    Returns:
        TrainState(opt.init(params), state, 0).

    Raises:
        TypeError: if x is not floating point (integer ids for an id network).
        ValueError: if x does not fit a network that declares its in_shape, has
            no batch axis or is empty, or state is None while params are given.
    """
    check_float_input(x, ids=id_layer(net))
    declared = getattr(net, "in_shape", None)
    if params is None and declared is not None and tuple(declared) != tuple(x.shape[1:]):
        what = f"inputs of width {declared[0]}" if len(declared) == 1 else f"examples of shape {declared}"
        raise ValueError(f"the network is declared for {what} (its in_shape), got x of shape {x.shape}; "
                         f"build it for {x.shape[1:]} or pass matching data")
    if params is None:
        dtype = dtype or (x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else default_float())
        params, init_state = network.init(net, jax.random.fold_in(key, 0), in_shape=x.shape[1:], dtype=dtype)
        state = init_state if state is None else state
    if state is None:
        raise ValueError("pass the model state together with params (pn.init returns both)")
    return TrainState(opt.init(params), state, jnp.zeros((), jnp.int32))


def as_arrays(data: tuple, validation: tuple | None) -> tuple[Array, Array, tuple[Array, Array] | None]:
    """The data and validation as jax arrays; integers the cast would wrap (int64 with x64 off) are an error.

    Args:
        data: (x, y).
        validation: (x_val, y_val), or None.

    Returns:
        (x, y, validation) as jax arrays (validation None when not given).

    Raises:
        ValueError: if an integer array holds values the cast would wrap.
    """
    x, y = as_array(data[0], "x"), as_array(data[1], "y")
    if validation is not None:
        validation = (as_array(validation[0], "validation x"), as_array(validation[1], "validation y"))
    return x, y, validation


class Run(NamedTuple):
    """A prepared run (`prepare_run`): the checked data, the optimizer, the initial states, the step, one epoch.

    Attributes:
        x: training inputs (a jax array), shape `(n, *in_shape)`.
        y: training targets, shape (n, ...).
        validation: (x_val, y_val) as jax arrays, or None.
        opt: the optimizer the state was built with (with the precision's
            dynamic loss scale, if any).
        train_state: the initial `TrainState`.
        es: early stopping's initial state, or None.
        step: the training step (`build_step`).
        epoch: one epoch with its metrics,
            `epoch((train_state, es), (x, y, validation, key, probe, stats_probe)) -> ((train_state, es), record)`
            (`epoch_with_metrics`).
    """

    x: Array
    y: Array
    validation: tuple[Array, Array] | None
    opt: Any
    train_state: TrainState
    es: EarlyStoppingState | None
    step: Callable[..., tuple]
    epoch: Callable[..., tuple]


def prepare_run(net: LayerLike, opt: Any, data: tuple, *, key: Array, epochs: int, batch_size: int | None = 64,
                loss: str | Loss = "cross_entropy", l2: float | Array = 0.0, params: PyTree = None,
                state: PyTree = None, validation: tuple | None = None,
                early_stopping: EarlyStopping | None = None, augment: Callable[..., tuple[Array, Array]] | None = None,
                mesh: Mesh | None = None, dp: DPSGD | None = None, accumulate: int = 1,
                evaluate_with_ema: bool = False, precision: Precision | None = None, strategy: str | None = None,
                checkpoint_every: int = 1) -> Run:
    """One preparation of a run, shared by `fit` and `train` (and `sweep`, through `train`).

    The arguments and the data checked, the optimizer for the precision, the initial train state (params
    from fold_in(key, 0) unless given), early stopping's state, the step built from the options and
    one epoch with its metrics. Nothing is compiled.

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        opt: the optimizer.
        data: (x, y), x of shape `(n, *in_shape)` and y of shape (n, ...).
        key: the run's key.
        epochs: the number of epochs, an int >= 0 (checked here).
        batch_size: examples per step (None: full batch).
        loss: the loss, a name or a `Loss`.
        l2: weight decay coefficient on the parameters whose role is "weight".
        params: starting parameters, or None to draw them from fold_in(key, 0).
        state: the model state of `params`, or None.
        validation: (x_val, y_val), or None.
        early_stopping: an `EarlyStopping`, or None.
        augment: an augmentation `(key, x, y) -> (x, y)` for each batch, or None.
        mesh: a device mesh to split each batch over, or None.
        dp: DP-SGD's settings (`pn.DPSGD`), or None.
        accumulate: micro-batches per batch, a positive int.
        evaluate_with_ema: validate and early-stop on the EMA of the params.
        precision: mixed precision (`pn.Precision`), or None.
        strategy: "fsdp", "tensor" or "fsdp+tensor" (with `mesh`), or None.
        checkpoint_every: epochs between checkpoints (checked here; `fit` saves).

    Returns:
        A `Run`.

    Raises:
        TypeError: if the inputs or the labels have the wrong dtype (`check_data`).
        ValueError: if an argument is out of range, the data do not fit the
            network or the loss, early stopping monitors a validation metric
            without validation data, the batch does not divide over the mesh,
            or the options do not combine (`build_step`).
    """
    check_arguments(epochs, batch_size, l2, checkpoint_every, accumulate)
    x, y, validation = as_arrays(data, validation)
    check_monitor(early_stopping, validation)
    opt = optimizer_for(opt, precision)
    train_state = init_run(net, opt, x, key, params, state, precision and jnp.dtype(precision.params))
    check_ema(evaluate_with_ema, train_state.opt_state)
    check_inputs(net, x, y, validation, loss, train_state.opt_state.params, train_state.model_state)
    check_divisible(mesh, x.shape[0], batch_size)
    es = early_stopping.init(train_state.opt_state.params, train_state.model_state) if early_stopping else None
    check_canaries(dp, x.shape[0], batch_size_of(x.shape[0], batch_size), train_state.opt_state)
    step = build_step(net, opt, loss=loss, l2=l2, augment=augment, mesh=mesh, dp=dp, accumulate=accumulate,
                      precision=precision, batch_size=batch_size_of(x.shape[0], batch_size), strategy=strategy)
    epoch = epoch_with_metrics(net, step, batch_size=batch_size, loss=loss, l2=l2, early_stopping=early_stopping,
                               evaluate_with_ema=evaluate_with_ema, sampling="poisson" if poisson(dp) else "shuffle")
    return Run(x, y, validation, opt, train_state, es, step, epoch)


def train(net: LayerLike, opt: Any, data: tuple, *, key: Array, epochs: int, batch_size: int | None = 64,
          loss: str | Loss = "cross_entropy", l2: float | Array = 0.0, params: PyTree = None, state: PyTree = None,
          validation: tuple | None = None, early_stopping: EarlyStopping | None = None,
          augment: Callable[..., tuple[Array, Array]] | None = None, mesh: Mesh | None = None,
          dp: DPSGD | None = None, accumulate: int = 1, evaluate_with_ema: bool = False,
          precision: Precision | None = None,
          strategy: str | None = None) -> tuple[TrainState, dict[str, Array], EarlyStoppingState | None]:
    """A whole training run, every epoch inside one `lax.scan`: pure, jittable, vmappable.

    Returns (train_state, history, es_state): history maps each metric to an
    array over epochs; once early stopping fires, later epochs are skipped
    (their history entries are NaN). The data are checked as `fit` checks
    them (value checks need concrete data: under jit only shapes and dtypes).
    Use `fit` for the same with progress and best-params restoring done for you.

    With dp=pn.DPSGD(...) the history records no epsilon (the accountant is
    Python, outside the jitted run); `fit` records it, or compute it as
    pn.privacy.epsilon(dp.noise_multiplier, b / n, epochs * (n // b),
    dp.target_delta, dp.accountant) for batch size b and n examples.

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        opt: the optimizer.
        data: (x, y), x of shape `(n, *in_shape)` and y of shape (n, ...).
        key: the run's key (see the module docstring for what derives from it).
        epochs: the number of epochs, an int >= 0.
        batch_size: examples per step (None: full batch).
        loss: the loss, a name or a `Loss`.
        l2: weight decay coefficient on the parameters whose role is "weight".
        params: starting parameters, or None to draw them from fold_in(key, 0).
        state: the model state of `params`, or None.
        validation: (x_val, y_val), or None; adds val_loss and val_accuracy.
        early_stopping: an `EarlyStopping`, or None.
        augment: an augmentation `(key, x, y) -> (x, y)` for each batch, or None.
        mesh: a device mesh to split each batch over, or None.
        dp: DP-SGD's settings (`pn.DPSGD`), or None.
        accumulate: micro-batches per batch, a positive int.
        evaluate_with_ema: validate and early-stop on the EMA of the params.
        precision: mixed precision (`pn.Precision`), or None.
        strategy: "fsdp", "tensor" or "fsdp+tensor" (with `mesh`), or None.

    Returns:
        (train_state, history, es_state): the final `TrainState`; history,
            {metric: array of shape (epochs, ...)}; early stopping's state (None
            without early stopping; its best_params are not restored here).

    Raises:
        TypeError: as `prepare_run`.
        ValueError: as `prepare_run`.
    """
    r = prepare_run(net, opt, data, key=key, epochs=epochs, batch_size=batch_size, loss=loss, l2=l2, params=params,
                    state=state, validation=validation, early_stopping=early_stopping, augment=augment, mesh=mesh,
                    dp=dp, accumulate=accumulate, evaluate_with_ema=evaluate_with_ema, precision=precision,
                    strategy=strategy)
    x, y, validation, train_state, es, epoch_fn = r.x, r.y, r.validation, r.train_state, r.es, r.epoch
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
