"""One training step, pure: step((opt_state, model_state), (x, y, key)) -> ((opt_state, model_state), loss)."""
import jax

from purenet import distributed


def make_step(grad_fn, opt, augment=None, mesh=None, with_factors=False):
    """A training step from a gradient function (see `purenet.training.gradients`) and an optimizer.

    The step's key splits in two: dropout (and DP noise) draw from the
    first, `augment(key, x, y) -> (x, y)` from the second. With a `mesh`
    (see purenet.distributed) the batch is split over its devices and XLA
    reduces the gradients across them.
    """

    def step(carry, batch):
        opt_state, model_state = carry
        x, y, key = batch
        k_grad, k_aug = jax.random.split(key)
        if mesh is not None:
            x, y = (jax.lax.with_sharding_constraint(v, distributed.batch_sharding(mesh)) for v in (x, y))
        if augment is not None:
            x, y = augment(k_aug, x, y)
        value, grads, model_state = grad_fn(opt_state.params, model_state, x, y, k_grad)
        return (opt.step(opt_state, *grads) if with_factors else opt.step(opt_state, grads), model_state), value

    return step
