"""Audit the DP-SGD run of dp_mnist.py in that one run: canaries in, guesses out, a lower bound on epsilon.

The accountant says the run is (epsilon, delta)-DP; an audit measures it
(Steinke, Nasr & Jagielski 2023; the f-DP bound of Mahloujifar, Melis &
Chaudhuri 2024). The same CNN, data and settings as dp_mnist.py, with two
kinds of canaries, each in the run with probability 1/2:

- white box: m Dirac gradient canaries (clip_norm on one parameter entry,
  joining each step with the Poisson rate q, summed before the noise), placed
  on the entries where the data's gradient at the start is smallest; scored
  by the sum of their entry of every step's privatized gradient, which an
  observer chained before Adam records;
- black box: held-out images with a wrong label, scored by their loss under
  the final model.

Prints each audit's lower bounds beside the claimed epsilon and plots the
scores, the attacks' ROC curves against the claim's, and the bounds.

    python examples/dp_audit.py [--epsilon 3] [--canaries 5000] [--out dp_audit.png]
"""
import time

import jax
import jax.numpy as jnp
import numpy as np

import purenet as pn
from _common import FAST, mnist_split, save
from dp_mnist import cnn, run_arguments

pn.xla_flags.configure()  # purenet's recommended XLA flags, before any JAX computation

def quietest(net, params, state, x, y, count):
    """A tree of bools like params: the `count` entries where the gradient of (x, y) at the start is smallest
    (where the data's drift least hides a canary). Held-out data pick them: the placement then depends
    on nothing the audit's memberships do."""
    _, grads, _ = pn.value_and_grad(net, params, state, x, y)
    flat = np.concatenate([np.abs(np.ravel(g)) for g in jax.tree_util.tree_leaves(grads)])
    cut = np.sort(flat)[count - 1]
    return jax.tree_util.tree_map(lambda g: np.abs(np.asarray(g)) <= cut, grads)


def main():
    parser = run_arguments(__doc__)
    parser.add_argument("--canaries", type=int, default=5000, help="white-box gradient canaries")
    parser.add_argument("--black-box", type=int, default=1000, help="mislabelled example canaries")
    parser.add_argument("--out", default="dp_audit.png")
    args = parser.parse_args()

    n_train, n_held = (1024, 500) if FAST else (8000, 1000)  # and m_black more held-out images: the canaries
    m_white, m_black = (500, 200) if FAST else (args.canaries, args.black_box)
    x, y, train, held = mnist_split(args.data, "test", args.seed, n_train, n_held + m_black)
    canary_rows = held[n_held:]  # black-box canaries: held-out images, each with a wrong label
    rng = np.random.default_rng(args.seed)
    canary_x, canary_y = x[canary_rows], (y[canary_rows] + rng.integers(1, 10, m_black)) % 10
    x_train, y_train, members = pn.privacy.insert_canaries(x[train], y[train], canary_x, canary_y,
                                                           jax.random.key(args.seed + 1))
    n = x_train.shape[0]
    q = args.batch_size / n
    steps = args.epochs * (n // args.batch_size)
    # sigma from the expected training-set size, so the noise does not depend on which canaries are in;
    # fit's accountant then reports the epsilon of the q and steps that ran
    expected_n = n_train + m_black // 2
    sigma = pn.privacy.noise_multiplier_for(args.epsilon, args.delta, args.batch_size / expected_n,
                                            args.epochs * (expected_n // args.batch_size))
    print(f"MNIST: {n_train} training images + {int(members.sum())} of {m_black} mislabelled canaries; "
          f"q = {q:.4f}, {steps} steps, sigma = {sigma:.4f} for epsilon {args.epsilon} at delta {args.delta}")

    net = cnn()
    params, state = pn.init(net, jax.random.key(args.seed), (28, 28, 1))
    where = quietest(net, params, state, x[held[:n_held]], y[held[:n_held]], 4 * m_white)
    white = pn.privacy.gradient_canaries(params, m_white, jax.random.key(args.seed + 2), sample_rate=q, net=net,
                                         where=where)
    opt = pn.optim.chain(white.observe(), pn.optim.adam(args.lr))
    start = time.perf_counter()
    run = pn.fit(net, opt, (x_train, y_train), key=jax.random.key(args.seed + 3), epochs=args.epochs,
                 batch_size=args.batch_size, params=params, state=state, progress=not FAST,
                 dp=pn.DPSGD(1.0, sigma, delta=args.delta, canaries=white), validation=(x[held[:n_held]], y[held[:n_held]]))
    claimed = float(run.history["epsilon"][-1])
    print(f"trained in {time.perf_counter() - start:.1f} s: held-out accuracy {run.history['val_accuracy'][-1]:.4f}, "
          f"epsilon {claimed:.3f} (PLD) with {m_white} white-box canaries in the run")

    audits = {
        "white box (every step)": pn.privacy.audit(*white.scores(run.opt_state), args.delta),
        "black box (final model)": pn.privacy.audit(*pn.privacy.loss_scores(net, run.params, run.state, canary_x,
                                                                            jnp.asarray(canary_y), members),
                                                    args.delta),
    }
    print(f"{'audit':<26} {'canaries':>8} {'AUROC':>6} {'eps one-run':>11} {'eps f-DP':>8} {'of the claim':>13}")
    for name, a in audits.items():
        print(f"{name:<26} {a.members + a.non_members:>8} {a.auroc:>6.3f} {a.epsilon:>11.3f} {a.epsilon_fdp:>8.3f} "
              f"{a.epsilon / claimed:>6.0%} / {a.epsilon_fdp / claimed:.0%}")
    print(f"claimed: epsilon {claimed:.3f} at delta {args.delta}; a one-run bound above it would refute the claim "
          f"(with 95% confidence); the f-DP bound refutes the Gaussian trade-off curve through it, which "
          f"Poisson-sampled DP-SGD only approaches")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    s_in, s_out = white.scores(run.opt_state)
    bins = np.linspace(min(s_in.min(), s_out.min()), max(s_in.max(), s_out.max()), 50)
    ax1.hist(s_out, bins, alpha=0.6, label=f"not in the run ({s_out.size})")
    ax1.hist(s_in, bins, alpha=0.6, label=f"in the run ({s_in.size})")
    ax1.set_xlabel("score: sum over steps of the canary's gradient entry"), ax1.set_ylabel("canaries")
    ax1.set_title("white-box canaries' scores"), ax1.legend()
    grid = np.logspace(-4, 0, 200)
    for name, a in audits.items():
        ax2.plot(a.fpr, a.tpr, label=f"{name}: AUROC {a.auroc:.3f}")
    ax2.plot(grid, np.minimum(1, np.exp(claimed) * grid + args.delta), "k--", label=f"most a claim of epsilon "
                                                                                     f"{claimed:.2f} allows")
    ax2.set_xscale("log"), ax2.set_yscale("log"), ax2.set_xlim(1e-3, 1), ax2.set_ylim(1e-3, 1)
    ax2.set_xlabel("false positive rate"), ax2.set_ylabel("true positive rate"), ax2.legend(fontsize=8)
    ax2.set_title("the attacks' guesses")
    names = list(audits)
    at = np.arange(len(names))
    ax3.bar(at - 0.2, [audits[k].epsilon for k in names], 0.4, label="one-run (Steinke et al.)")
    ax3.bar(at + 0.2, [audits[k].epsilon_fdp for k in names], 0.4,
            label="f-DP one-run (Mahloujifar et al.; Gaussian curve)")
    ax3.axhline(claimed, color="k", linestyle="--", label=f"claimed epsilon {claimed:.2f}")
    ax3.set_xticks(at, names), ax3.set_ylabel("epsilon lower bound (95%)"), ax3.legend(fontsize=8)
    ax3.set_title("what the audits prove")
    fig.suptitle(f"Auditing DP-SGD on MNIST in one run: {run.history['val_accuracy'][-1]:.2%} held-out accuracy")
    save(fig, args.out)
    if any(a.epsilon > claimed for a in audits.values()):
        raise SystemExit("a one-run bound exceeds the claimed epsilon: the run is not as private as its accountant "
                         "says")


if __name__ == "__main__":
    main()
