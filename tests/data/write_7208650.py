# Run from a checkout of 7208650 with PYTHONPATH pointing at it: python write_7208650.py tests/data
"""Written by purenet at 7208650 (before the tree moved): a fit checkpoint and a saved digits Split."""
import sys, jax, numpy as np
import purenet as pn
assert pn.__file__.startswith("/root/orig"), pn.__file__
out = sys.argv[1]
d = pn.datasets.digits()
x, y = d.x_train[:64], d.y_train[:64]
net = pn.mlp([64, 8, 10])
pn.fit(net, pn.optim.adam(1e-2), (x, y), key=jax.random.key(0), epochs=1, batch_size=32,
       early_stopping=pn.EarlyStopping(patience=3), validation=(d.x_test[:32], d.y_test[:32]),
       checkpoint=f"{out}/fit_7208650.ckpt")
small = pn.datasets.Split(*(a[:4] for a in d))
pn.save(f"{out}/split_7208650.ckpt", {"split": small})
