"""The lecture's worked example, step by step: forward pass, loss, and every
chain-rule path from the loss to one weight, summed and checked against jax.grad.

Network 4-4-2: a1 = W1 x, h1 = sigmoid(a1), a2 = W2 h1, y_hat = softmax(a2),
L = sum_k (y_hat_k - y_k)^2, zero biases. Weights are named as on the slides:
w_{l i j} is row i, column j of W_l (W_l maps layer l-1 to layer l).

    python examples/backprop_walkthrough.py            # the slide's w131
    python examples/backprop_walkthrough.py --weight w212
"""
import argparse

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402

import purenet as pn  # noqa: E402

pn.xla_flags.configure()  # purenet's recommended XLA flags, before any JAX computation

W1 = jnp.array([[0.1, 0.3, 0.8, -0.4], [-0.3, -0.2, 0.5, 0.5], [-0.3, 0.0, 0.5, 0.4], [0.2, 0.5, -0.9, 0.7]])
W2 = jnp.array([[0.5, 0.8, 0.2, 0.4], [0.5, 0.2, 0.3, -0.5]])
X = jnp.array([2.0, 5.0, 3.0, 3.0])
Y = jnp.array([1.0, 0.0])
NET = pn.Sequential([pn.Dense(4), pn.Sigmoid(), pn.Dense(2), pn.Softmax()])


def vec(v):
    return "[" + ", ".join(f"{float(e):.6g}" for e in v) + "]"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weight", default="w131", help="w1ij (first layer) or w2ij (output layer), 1-based")
    args = parser.parse_args()
    layer, i, j = int(args.weight[1]), int(args.weight[2]) - 1, int(args.weight[3]) - 1
    if layer not in (1, 2) or not (0 <= i < (4 if layer == 1 else 2)) or not 0 <= j < 4:
        parser.error(f"no weight {args.weight} in the 4-4-2 network")

    # Forward, by hand, with the slide's (out, in) matrices.
    a1 = W1 @ X
    h1 = jax.nn.sigmoid(a1)
    a2 = W2 @ h1
    y_hat = jax.nn.softmax(a2)
    L = jnp.sum((y_hat - Y) ** 2)
    print("Forward pass")
    print(f"  a1 = W1 x        = {vec(a1)}")
    print(f"  h1 = sigmoid(a1) = {vec(h1)}")
    print(f"  a2 = W2 h1       = {vec(a2)}")
    print(f"  y_hat = softmax  = {vec(y_hat)}")
    print(f"  L = sum (y_hat - y)^2 = {float(L):.6f}\n")

    # Local derivatives, each stated next to its forward computation.
    dL_dy = 2 * (y_hat - Y)                                            # talk to the output
    dy_da2 = jnp.diag(y_hat) - jnp.outer(y_hat, y_hat)                 # softmax Jacobian, dy_k/da_m
    dh1_da1 = h1 * (1 - h1)                                            # sigmoid'
    paths = []
    print(f"Chain-rule paths from L to {args.weight}")
    if layer == 2:
        # a2_i = sum_j W2_ij h1_j, so da2_i/dW2_ij = h1_j; L reaches a2_i through every y_hat_k.
        for k in range(2):
            factors = [("dL/dy_hat%d" % (k + 1), dL_dy[k], "talk to the output layer"),
                       ("dy_hat%d/da2%d" % (k + 1, i + 1), dy_da2[k, i], "through the softmax"),
                       ("da2%d/dw2%d%d = h1%d" % (i + 1, i + 1, j + 1, j + 1), h1[j], "talk to the weight")]
            paths.append(factors)
    else:
        # a1_i = sum_j W1_ij x_j; h1_i feeds both a2_m, and each a2_m feeds both y_hat_k.
        for k in range(2):
            for m in range(2):
                factors = [("dL/dy_hat%d" % (k + 1), dL_dy[k], "talk to the output layer"),
                           ("dy_hat%d/da2%d" % (k + 1, m + 1), dy_da2[k, m], "through the softmax"),
                           ("da2%d/dh1%d = w2%d%d" % (m + 1, i + 1, m + 1, i + 1), W2[m, i],
                            "talk to the previous hidden layer"),
                           ("dh1%d/da1%d" % (i + 1, i + 1), dh1_da1[i], "through the sigmoid"),
                           ("da1%d/dw1%d%d = x%d" % (i + 1, i + 1, j + 1, j + 1), X[j], "talk to the weight")]
                paths.append(factors)
    total = 0.0
    for n, factors in enumerate(paths, 1):
        product = jnp.prod(jnp.array([f[1] for f in factors]))
        total += product
        print(f"  path {n}: " + " * ".join(f"{f[0]}" for f in factors))
        for name, value, role in factors:
            print(f"      {name:<22} = {float(value):+.6f}   ({role})")
        print(f"      product = {float(product):+.8f}")
    print(f"  sum over {len(paths)} paths: dL/d{args.weight} = {float(total):+.8f}\n")

    # The same number from purenet's handwritten backward and from jax.grad.
    params = ({"W": W1.T, "b": jnp.zeros(4)}, {}, {"W": W2.T, "b": jnp.zeros(2)}, {})
    state = ({}, {}, {}, {})
    _, grads, _ = pn.value_and_grad(NET, params, state, X[None], Y[None], loss="mse")
    reference = jax.grad(lambda p: pn.loss(NET, p, state, X[None], Y[None], loss="mse")[0])(params)
    slot = 0 if layer == 1 else 2
    ours, ref = grads[slot]["W"][j, i], reference[slot]["W"][j, i]  # Dense stores W^T
    print(f"purenet backward: {float(ours):+.8f}   jax.grad: {float(ref):+.8f}   "
          f"paths: {float(total):+.8f}")
    assert abs(float(ours - ref)) <= 1e-12 and abs(float(ours - total)) <= 1e-12

    print("\nWhere the slide differs")
    print("  The slide writes dy_hat1/da21 = y_hat1 (1 - y_hat1)(-a22) = -0.079; softmax's true")
    print(f"  derivative is y_hat1 (1 - y_hat1) = {float(dy_da2[0, 0]):.5f}, and a2_1 also reaches L")
    print(f"  through y_hat2 (dy_hat2/da21 = -y_hat1 y_hat2 = {float(dy_da2[1, 0]):.5f}). Summing both")
    print(f"  paths gives dL/dw212 = {float(grads[2]['W'][1, 0]):.5f}, not the slide's -0.029;")
    print(f"  for w131 all four paths give {float(grads[0]['W'][0, 2]):.7f}.")


if __name__ == "__main__":
    main()
