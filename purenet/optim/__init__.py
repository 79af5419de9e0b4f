"""Optimizers as pure (state, grads) -> state transitions; no optax in the core."""
from purenet.optim import schedules
from purenet.optim.alias import adagrad, adam, adamw, momentum, nesterov, rmsprop, sgd
from purenet.optim.base import OptState, Optimizer, Transform, apply_if_finite, chain, find_slot
from purenet.optim.kfac import KFACState, kfac, scale_by_kfac
from purenet.optim.loss_scale import LossScale, current_loss_scale, dynamic_loss_scale
from purenet.optim.optax_adapter import from_optax, to_optax
from purenet.optim.wrappers import EMAState, ema, ema_params, has_ema, masked
from purenet.optim.transforms import (
    AdamState, add_decayed_weights, clip_by_global_norm, scale_by_adam, scale_by_momentum,
    scale_by_rms, scale_by_rss,
)

__all__ = [
    "AdamState", "EMAState", "KFACState", "LossScale", "OptState", "Optimizer", "Transform", "adagrad", "adam", "adamw",
    "add_decayed_weights", "apply_if_finite", "chain", "clip_by_global_norm", "current_loss_scale",
    "dynamic_loss_scale", "ema", "ema_params", "find_slot", "from_optax", "has_ema", "kfac", "masked", "momentum",
    "nesterov", "rmsprop", "scale_by_adam", "scale_by_kfac", "scale_by_momentum", "scale_by_rms", "scale_by_rss",
    "schedules", "sgd", "to_optax",
]
