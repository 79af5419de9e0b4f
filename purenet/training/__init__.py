"""Training as composed pure pieces (the lecture's loop: compute y_hat, compute L, update, till satisfied).

    grad_fn(net, loss, l2)            (params, state, x, y, key) -> (loss, grads, state), a GradFn:
                                      it declares what it takes (loss_scale, weight, count) and provides
      dp_sgd(net, dp, ...), accumulate(fn, k)        wrappers of the same signature
      mixed_precision(net, pn.Precision(...), ...)   bfloat16 / float16 compute, float32 master params;
                                                     fn(..., loss_scale=S) for a dynamic float16 scale
    make_step(grad_fn, opt, augment, mesh)           one pure update (reads a dynamic loss scale from
                                                     the optimizer state and passes it to grad_fn)
    build_step(net, opt, ...)                        make_step(gradients(...)) from fit's options
    init_run(net, opt, x, key, params, state)        a run's TrainState (params from the key if None)
    prepare_run(net, opt, data, key=..., ...)        one preparation shared by fit and train (and sweep):
                                                     checks, optimizer, states, step, epoch (a Run)
    run_epoch(step, ...)                             a lax.scan of the step over an epoch's batches
    run_epoch_steps(step, ...)                       the same, with every step's loss
    evaluate(net, params, state, validation, loss)   val_loss and val_accuracy in one forward pass
    train(...)                                       every epoch in one scan: jittable, vmappable
    fit(...)                                         the thin driver: checks, progress, checkpoints
    sweep(...)                                       a grid of `train` runs, vmapped
    EarlyStopping                                    a pure state machine over epochs

Each option of `fit` and `train` builds one piece; none is threaded
through the others.
"""
from purenet.training.checks import check_data
from purenet.training.early_stopping import EarlyStopping, EarlyStoppingState
from purenet.training.fit import FitResult, fit
from purenet.training.gradients import GradFn, accumulate, dp_sgd, grad_fn
from purenet.training.loop import (Run, TrainState, build_step, evaluate, init_run, prepare_run, run_epoch,
                                   run_epoch_steps, train, train_epoch)
from purenet.training.precision import Precision, mixed_precision
from purenet.training.step import Step, make_step
from purenet.training.sweep import SweepResult, sweep

__all__ = [
    "EarlyStopping", "EarlyStoppingState", "FitResult", "GradFn", "Precision", "Run", "Step", "SweepResult", "TrainState",
    "accumulate",
    "build_step", "check_data", "dp_sgd", "evaluate", "fit", "grad_fn", "init_run", "make_step", "mixed_precision",
    "prepare_run", "run_epoch", "run_epoch_steps", "sweep", "train", "train_epoch",
]
