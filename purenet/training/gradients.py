"""A gradient function is a value: grad_fn(params, state, x, y, key) -> (loss, grads, state).

`grad_fn(net, loss, l2)` is the handwritten `value_and_grad` in training
mode; the others wrap a gradient function or a network and return a
function of the same signature, so a training step composes them:

    fn = accumulate(dp_sgd(net, pn.DPSGD(1.0, 1.1)), micro_batches=4)

`key` is the step's randomness (dropout masks; DP-SGD's noise). Each is a
`GradFn`, which declares its contract: the keywords it takes beside the
five arguments (`loss_scale`: mixed precision scales its seed gradient;
`weight`: DP-SGD's Poisson marks; `count`: K-FAC's factors every k-th
step), the per-step arguments it provides the optimizer (K-FAC's
"factors"), and how it accumulates itself (DP-SGD draws its noise once).
`make_step` reads the contract; a plain function is a GradFn that takes
and provides nothing else.
"""
import dataclasses
from typing import TYPE_CHECKING, Any, Callable

import jax

from purenet import chunks, network
from purenet.privacy import clipping
from purenet.layers.base import Array, LayerLike
from purenet.losses import Loss

if TYPE_CHECKING:  # precision.py is imported where it is used (in `gradients`)
    from purenet.training.precision import Precision

__all__ = ["GradFn", "TAKES", "accumulate", "as_grad_fn", "dp_sgd", "grad_fn", "gradients", "kfac"]

# The keywords a gradient function may take beside (params, state, x, y, key).
TAKES = ("loss_scale", "weight", "count")


@dataclasses.dataclass(frozen=True)
class GradFn:
    """A gradient function and its contract:

        value, grads, state[, provided] = fn(params, state, x, y, key, **taken)

    Attributes:
        fn: the function.
        takes: the keywords it takes beside the five arguments, a subset of TAKES: "loss_scale" (the
            scale of its seed gradient: mixed precision; `make_step` passes the dynamic scale the
            optimizer state keeps), "weight" (a padded Poisson batch's 0/1 marks: DP-SGD), "count"
            (the optimizer's step count: K-FAC computes its factors every k-th step).
        provides: the per-step arguments of the optimizer it returns, as a dict in a fourth value
            (K-FAC's "factors").
        micro_batched: k -> the GradFn that runs a batch as k micro-batches itself (DP-SGD clips them
            one after another and draws the noise once), or None (`accumulate` averages k calls).

    Raises:
        TypeError: if `fn` is not callable.
        ValueError: if `takes` names a keyword outside TAKES.
    """

    fn: Callable[..., tuple]
    takes: frozenset = frozenset()
    provides: tuple[str, ...] = ()
    micro_batched: Callable[[int], "GradFn"] | None = None

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"GradFn needs a callable, got {type(self.fn).__name__}")
        object.__setattr__(self, "takes", frozenset(self.takes))
        unknown = sorted(self.takes - set(TAKES))
        if unknown:
            raise ValueError(f"a gradient function may take {TAKES} beside (params, state, x, y, key), "
                             f"got {unknown}")

    def __call__(self, *args: Any, **kwargs: Any) -> tuple:
        return self.fn(*args, **kwargs)


def as_grad_fn(fn: Callable[..., tuple]) -> GradFn:
    """`fn` as a GradFn: itself, or a plain function wrapped (it takes and provides nothing else).

    Args:
        fn: a `GradFn`, or a plain function `(params, state, x, y, key) -> (loss, grads, state)`
            (wrap it in `GradFn(fn, takes={"loss_scale"})` yourself to say more).

    Returns:
        `fn` itself when it is a GradFn, else `GradFn(fn)`.

    Raises:
        TypeError: if `fn` is not callable.
    """
    return fn if isinstance(fn, GradFn) else GradFn(fn)


def grad_fn(net: LayerLike, loss: str | Loss = "cross_entropy", l2: float | Array = 0.0) -> GradFn:
    """The loss and its handwritten gradient on one batch, in training mode.

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        loss: the loss, a name (e.g. "cross_entropy", "mse") or a `Loss`.
        l2: weight decay coefficient on the parameters whose role is "weight".

    Returns:
        A `GradFn` `fn(params, state, x, y, key) -> (loss, grads, state)`: loss
            the batch's mean loss (a scalar, the l2 term included), grads like
            params, state the model state after the forward (BatchNorm's running
            statistics); `key` draws dropout masks.
    """

    def fn(params, state, x, y, key):
        return network.value_and_grad(net, params, state, x, y, loss=loss, l2=l2, train=True, key=key)

    return GradFn(fn)


def dp_sgd(net: LayerLike, dp: clipping.DPSGD, loss: str | Loss = "cross_entropy", l2: float | Array = 0.0,
           micro_batches: int = 1,
           expected_batch_size: int | None = None) -> GradFn:
    """DP-SGD's clipped, noised gradient (`pn.clipped_value_and_grad`) for dp = pn.DPSGD(...).

    fn(params, state, x, y, key, weight=None): with `weight` (a padded Poisson
    batch's 0/1 marks) the clipped sum and the noise are divided by
    `expected_batch_size`. The step key splits once into two independent
    branches, k_forward, k_noise = split(key): the forward (dropout, and the
    chunks or micro-batches, fold_in(k_forward, i)) draws from the first,
    the noise from the second, so no dropout mask shares random bits with
    the noise. Accumulated (`accumulate(fn, k)`), the batch is clipped
    k micro-batches at a time and the noise is drawn once, for the whole
    batch's sum: averaging k noised micro-batch gradients would add sqrt(k)
    times the noise DP-SGD asks for. With `dp.canaries` the key splits in
    three: the third draws which member canaries join the step.

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        dp: DP-SGD's settings, `pn.DPSGD(clip_norm, noise_multiplier, ...)`.
        loss: the loss, a name or a `Loss`.
        l2: weight decay coefficient on the parameters whose role is "weight".
        micro_batches: how many micro-batches a batch is clipped in, one after
            another (`accumulate` sets it; 1: `dp.chunk_size` decides).
        expected_batch_size: the divisor of the clipped sum and the noise for
            Poisson batches (`weight` given): the expected batch size q n.

    Returns:
        A `GradFn` `fn(params, state, x, y, key, weight=None) -> (loss, grads, state)`
            that takes "weight" and accumulates itself (`micro_batched`): grads
            the clipped, noised mean gradient, like params.
    """

    def fn(params, state, x, y, key, weight=None):
        if micro_batches == 1:
            chunk = dp.chunk_size
        elif weight is not None:  # a padded batch: k chunks, the last one shorter
            chunk = -(-x.shape[0] // micro_batches)
        else:
            chunk = _micro_batch_size(x.shape[0], micro_batches)
        if dp.canaries is None:
            k_forward, k_noise = jax.random.split(key)
            canaries = {}
        else:
            k_forward, k_noise, k_canary = jax.random.split(key, 3)
            canaries = {"canaries": dp.canaries, "canary_marks": dp.canaries.marks(k_canary)}
        return clipping.clipped_value_and_grad(
            net, params, state, x, y, clip_norm=dp.clip_norm, noise_multiplier=dp.noise_multiplier,
            noise_key=k_noise, loss=loss, l2=l2, train=True, key=k_forward, chunk_size=chunk,
            weight=weight, expected_batch_size=expected_batch_size, one_pass=dp.one_pass, **canaries)

    return GradFn(fn, takes=frozenset({"weight"}), micro_batched=lambda k: dp_sgd(
        net, dp, loss, l2, micro_batches=k, expected_batch_size=expected_batch_size))


def _micro_batch_size(n, k):
    if n % k:
        raise ValueError(f"a batch of {n} examples does not split into {k} equal micro-batches "
                         f"(accumulate={k}); choose a batch_size that is a multiple of {k}")
    return n // k


def accumulate(fn: Callable[..., tuple], micro_batches: int) -> GradFn:
    """Run each batch as `micro_batches` equal micro-batches in a `lax.scan` and average.

    The loss is a mean over examples, so the mean of the micro-batches'
    losses and gradients is the whole batch's (to rounding): the same update
    with a k-times smaller working set. Model state threads through the
    micro-batches in order, so BatchNorm normalises each micro-batch by its
    own statistics and updates its running statistics k times; micro-batch
    i draws its randomness from fold_in(key, i). A GradFn with a
    `micro_batched` rule (DP-SGD's) accumulates itself; one that provides
    per-step arguments or takes the step count (K-FAC's) does not accumulate.

    Args:
        fn: the gradient function, a `GradFn` or a plain function
            `(params, state, x, y, key) -> (loss, grads, state)`.
        micro_batches: k, the number of equal micro-batches, a positive int
            (the batch size must be a multiple of it).

    Returns:
        A `GradFn` of the same signature (and the same `takes`): `fn` itself
            when k is 1, the GradFn's own `micro_batched(k)` when it has one.
            Called on a batch that k does not divide, it raises a ValueError.

    Raises:
        ValueError: if `micro_batches` is not a positive integer, or k > 1 and
            `fn` provides per-step arguments or takes anything but "loss_scale".
    """
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, (int, float)) or micro_batches != micro_batches:
        raise ValueError(f"accumulate must be a positive integer (micro-batches per batch), got {micro_batches!r}")
    k = int(micro_batches) if abs(micro_batches) != float("inf") else 0
    if k < 1 or k != micro_batches:
        raise ValueError(f"accumulate must be a positive integer (micro-batches per batch), got {micro_batches!r}")
    fn = as_grad_fn(fn)
    if k == 1:
        return fn
    if fn.micro_batched is not None:
        return fn.micro_batched(k)
    if fn.provides or fn.takes - {"loss_scale"}:
        raise ValueError(f"this gradient function (takes {sorted(fn.takes)}, provides {list(fn.provides)}) does "
                         f"not accumulate over micro-batches: only loss_scale passes through accumulate")

    def accumulated(params, state, x, y, key, **scaled):
        size = _micro_batch_size(x.shape[0], k)
        return chunks.mean_in_chunks(lambda state, xb, yb, kb: fn(params, state, xb, yb, kb, **scaled),
                                     size, state, x, y, key)

    return GradFn(accumulated, takes=fn.takes)


def kfac(net: LayerLike, loss: str | Loss = "cross_entropy", l2: float | Array = 0.0, fisher: str = "empirical",
         samples: int = 1,
         factors_every: int = 1) -> GradFn:
    """The gradient and the batch's K-FAC factors (`pn.stats.kfac_value_and_grad` with `fisher`):
    (params, state, x, y, key, count) -> (loss, grads, state, {"factors": factors}), for an
    optimizer whose extra_args name "factors" (`pn.optim.kfac`). With factors_every = k the
    factors are computed only when count % k == 0 (zeros otherwise, which the optimizer ignores);
    the Monte-Carlo labels draw from fold_in(key, 1), dropout from key.

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        loss: the loss, a name or a `Loss`.
        l2: weight decay coefficient on the parameters whose role is "weight".
        fisher: which Fisher the factors estimate: "empirical", "mc" (labels
            sampled from the model) or "exact" (see `pn.stats.kfac_value_and_grad`).
        samples: Monte-Carlo label samples per example, for a sampled Fisher.
        factors_every: k, compute the factors every k-th step (by the
            optimizer's step count).

    Returns:
        A `GradFn` that takes "count" and provides "factors".
    """
    from purenet.analysis import stats

    def with_factors(params, state, x, y, key):
        value, grads, factors, state = stats.kfac_value_and_grad(net, params, state, x, y, loss=loss, l2=l2,
                                                                  train=True, key=key, fisher=fisher,
                                                                  samples=samples)
        return value, grads, state, {"factors": factors}

    def without(params, state, x, y, key):
        value, grads, state = network.value_and_grad(net, params, state, x, y, loss=loss, l2=l2, train=True,
                                                     key=key)
        return value, grads, state, {"factors": stats.kfac_zeros(net, params)}

    def fn(params, state, x, y, key, count=None):
        if factors_every == 1 or count is None:
            return with_factors(params, state, x, y, key)
        return jax.lax.cond(count % factors_every == 0, with_factors, without, params, state, x, y, key)

    return GradFn(fn, takes=frozenset({"count"}), provides=("factors",))


def gradients(net: LayerLike, loss: str | Loss = "cross_entropy", l2: float | Array = 0.0,
              dp: clipping.DPSGD | None = None, accumulate_steps: int = 1, precision: "Precision | None" = None,
              extra_args: tuple[str, ...] = (), expected_batch_size: int | None = None,
              extra_options: dict | None = None) -> GradFn:
    """The gradient function `fit` and `train` build from their options.

    Args:
        net: the network (a layer or a container, e.g. `pn.Sequential`).
        loss: the loss, a name or a `Loss`.
        l2: weight decay coefficient on the parameters whose role is "weight".
        dp: DP-SGD's settings (`dp_sgd`), or None.
        accumulate_steps: micro-batches per batch (`accumulate`).
        precision: mixed precision (`purenet.training.precision.mixed_precision`), or None.
        extra_args: the per-step arguments the optimizer needs beside the
            gradient (K-FAC's "factors").
        expected_batch_size: DP-SGD's divisor for Poisson batches (`dp_sgd`).
        extra_options: the options `extra_args` are computed with (the
            optimizer's: K-FAC's fisher, samples and factors_every).

    Returns:
        A `GradFn`: `kfac`, `mixed_precision`, `dp_sgd` or `grad_fn`, accumulated.

    Raises:
        ValueError: if `extra_args` names anything but "factors", K-FAC is
            combined with dp, accumulate or precision, dp is combined with
            precision, or `accumulate_steps` is not a positive integer.
    """
    from purenet.training.precision import mixed_precision

    unknown = [n for n in extra_args if n != "factors"]
    if unknown:
        raise ValueError(f"the optimizer needs per-step arguments {unknown} that no gradient function provides")
    if extra_args:
        if dp is not None or accumulate_steps != 1 or precision is not None:
            raise ValueError("a K-FAC optimizer does not combine with dp=, accumulate= or precision=")
        return kfac(net, loss, l2, **(extra_options or {}))
    if dp is not None and precision is not None:
        raise ValueError("dp= and precision= do not combine yet: DP-SGD computes in the params' dtype")
    if precision is not None:
        fn = mixed_precision(net, precision, loss, l2)
    else:
        fn = grad_fn(net, loss, l2) if dp is None else dp_sgd(net, dp, loss, l2,
                                                              expected_batch_size=expected_batch_size)
    return accumulate(fn, accumulate_steps)
