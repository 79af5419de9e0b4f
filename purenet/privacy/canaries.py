"""Canaries for auditing a DP-SGD run: white-box gradient canaries and black-box example canaries.

White box (Nasr et al. 2023; Steinke, Nasr & Jagielski 2023): canary c is a
gradient, clip_norm times the unit vector of one parameter entry (a Dirac
canary). Each canary is a member with probability 1/2; in every step each
member joins the batch with the run's Poisson rate q, as an example would,
and its gradient is added to the clipped sum before the noise. The auditor
sees every step's privatized gradient g_t (an optimizer's input) and scores
canary c by its entry of them:

    "sum":      s_c = sum_t g_t[c]                  (members drift by q C / B a step)
    "variance": s_c = var_t g_t[c]                  (members vary with their sampling; noise
                                                    that repeats across steps cancels out of it)

    canaries = pn.privacy.gradient_canaries(params, count=1000, key=k, sample_rate=q, net=net)
    opt = pn.optim.chain(canaries.observe(), pn.optim.sgd(0.1))        # the observer comes first
    run = pn.fit(net, opt, data, dp=pn.DPSGD(1.0, sigma, canaries=canaries), batch_size=b, ...)
    result = pn.privacy.audit(*canaries.scores(run.opt_state), delta=1e-5)

Black box: canaries are examples (mislabelled or out-of-distribution), each
in the training set with probability 1/2 (`insert_canaries`), scored from
the final model by their negated loss (`loss_scores`). Weaker than the white
box, and what an attacker without the training trace can do.
"""
import dataclasses
import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from purenet.layers.base import Array, LayerLike, PyTree
from purenet.optim.base import Transform, find_slot
from purenet.privacy.accounting import _count, _real

__all__ = ["CanaryObservations", "GradientCanaries", "STATISTICS", "gradient_canaries", "insert_canaries",
           "loss_scores"]

STATISTICS = ("sum", "variance")


def _host_rng(key: Array) -> np.random.Generator:
    """A numpy generator seeded by a jax key's bits (canary placement is host-side set-up)."""
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())


class CanaryObservations(NamedTuple):
    """The observer's optimizer slot: running sums of each canary's gradient entry over the steps.

    Attributes:
        total: (count,) float32, `sum_t g_t[c]` for each canary c.
        squares: (count,) float32, `sum_t g_t[c]^2`.
        steps: () int32, how many steps were observed.
        fingerprint: () int32, which canaries these are (`GradientCanaries.fingerprint`).
    """

    total: jax.Array        # (count,) sum_t g_t[c]
    squares: jax.Array      # (count,) sum_t g_t[c]^2
    steps: jax.Array        # () steps observed
    fingerprint: jax.Array  # () int32: which canaries these are (`GradientCanaries.fingerprint`)


@dataclasses.dataclass(frozen=True, eq=False)
class GradientCanaries:
    """Dirac gradient canaries: canary c is clip_norm at entry `entry[c]` of trainable leaf `leaf[c]`.

    Attributes:
        leaf: (count,) the index of each canary's leaf in params' flattened leaves.
        entry: (count,) the flat index of each canary's entry within its leaf.
        members: (count,) bool: whether the canary is in the training set.
        sample_rate: q, the rate at which a member joins each step's batch (the run's
            batch_size / n; `fit` checks it, a loop of your own must pass that value).
        structure: the parameter tree's structure and leaf shapes, to check the trees it meets.
    """

    leaf: np.ndarray
    entry: np.ndarray
    members: np.ndarray
    sample_rate: float
    structure: tuple

    @property
    def count(self) -> int:
        """How many canaries."""
        return int(self.members.size)

    @property
    def fingerprint(self) -> int:
        """A checksum of the canaries' places and memberships: the observer's slot carries it, so scores
        are never read from another set of canaries' observations."""
        data = np.concatenate([self.leaf, self.entry, self.members]).astype(np.int64).tobytes()
        return zlib.crc32(data) & 0x7FFFFFFF

    def _check(self, tree: PyTree) -> list:
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        found = (str(treedef), tuple(tuple(np.shape(x)) for x in leaves))
        if found != self.structure:
            raise ValueError(f"these canaries were placed in a parameter tree with leaf shapes {self.structure[1]} "
                             f"({self.structure[0]}); this tree has {found[1]} ({found[0]}): make them with "
                             f"gradient_canaries(params, ...) of this network")
        return leaves

    def gradient(self, marks: Array, clip_norm: float, like: PyTree) -> PyTree:
        """sum_c marks_c clip_norm e_c, a tree like `like` (the canaries of this step's batch).

        Args:
            marks: (count,) 0/1: which canaries joined this step's batch.
            clip_norm: C, each canary gradient's norm (what clipping lets one example contribute).
            like: the parameter (or gradient) tree the canaries live in.

        Returns:
            A tree like `like`, zero except at the marked canaries' entries.

        Raises:
            ValueError: if `like` is not shaped like the params the canaries were placed in.
        """
        return self.add(jax.tree_util.tree_map(jnp.zeros_like, like), marks, clip_norm)

    def add(self, tree: PyTree, marks: Array, scale: Any) -> PyTree:
        """tree + scale sum_c marks_c e_c: the marked canaries scattered into their entries of `tree` (the
        leaves without canaries are passed through untouched).

        Args:
            tree: a tree like the params the canaries were placed in (a gradient).
            marks: (count,) 0/1: which canaries to add.
            scale: each canary's size (DP-SGD's clip_norm over its divisor).

        Returns:
            A tree like `tree`.

        Raises:
            ValueError: if `tree` is not shaped like the params the canaries were placed in.
        """
        leaves = self._check(tree)
        out = list(leaves)
        for i in np.unique(self.leaf):
            mine = np.flatnonzero(self.leaf == i)
            x = leaves[i]
            out[i] = jnp.ravel(x).at[self.entry[mine]].add((scale * marks[mine]).astype(x.dtype)).reshape(x.shape)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree), out)

    def project(self, grads: PyTree) -> Array:
        """Each canary's entry of a gradient tree.

        Args:
            grads: a tree like the params the canaries were placed in.

        Returns:
            (count,) `<grads, e_c>` for every canary c.

        Raises:
            ValueError: if `grads` is not shaped like the params the canaries were placed in.
        """
        leaves = self._check(grads)
        out = jnp.zeros((self.count,), jnp.result_type(*leaves) if leaves else jnp.float32)
        for i, x in enumerate(leaves):
            mine = np.flatnonzero(self.leaf == i)
            if mine.size:
                out = out.at[mine].set(jnp.ravel(x)[self.entry[mine]].astype(out.dtype))
        return out

    def marks(self, key: Array) -> Array:
        """Which canaries join one step's batch: each member independently with probability q.

        Args:
            key: the step's canary key (independent of its batch sampling and its noise).

        Returns:
            (count,) float32 0/1 marks; non-members are always 0.
        """
        joined = jax.random.bernoulli(key, self.sample_rate, (self.count,))
        return (joined & jnp.asarray(self.members)).astype(jnp.float32)

    def observe(self) -> Transform:
        """The white-box observer: an optimizer transform that records each canary's entry of every
        gradient it receives and passes the gradient on unchanged.

        Returns:
            A `pn.optim.Transform` whose slot is `CanaryObservations`; chain it first
            (`pn.optim.chain(canaries.observe(), opt)`), so what it sees is DP-SGD's privatized gradient
            (after another transform it sees that transform's output: a weaker audit, still valid).
        """
        fingerprint = self.fingerprint

        def init(params):
            self._check(params)
            zeros = jnp.zeros((self.count,), jnp.float32)
            return CanaryObservations(zeros, zeros, jnp.zeros((), jnp.int32), jnp.asarray(fingerprint, jnp.int32))

        def update(direction, slot, params, count):
            seen = self.project(direction).astype(jnp.float32)
            return direction, slot._replace(total=slot.total + seen, squares=slot.squares + seen * seen,
                                            steps=slot.steps + 1)

        return Transform(init, update)

    def scores(self, opt_state: Any, statistic: str = "sum") -> tuple[np.ndarray, np.ndarray]:
        """(members' scores, non-members' scores) from the observer's slot in `opt_state`.

        Args:
            opt_state: the state of an optimizer chained after `observe()` (e.g.
                `fit(...).opt_state`).
            statistic: "sum" (`sum_t g_t[c]`) or "variance" (the variance of `g_t[c]` over the
                steps).

        Returns:
            Two 1-D float64 arrays, for `pn.privacy.audit`.

        Raises:
            ValueError: if `statistic` is not "sum" or "variance", `opt_state` holds no
                `CanaryObservations`, or its observations are of other canaries.
        """
        if statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
        slot = find_slot(opt_state, CanaryObservations)
        if slot is None:
            raise ValueError("the optimizer state holds no canary observations: chain canaries.observe() first "
                             "in the optimizer, pn.optim.chain(canaries.observe(), opt)")
        if int(slot.fingerprint) != self.fingerprint:
            raise ValueError("the optimizer state's observations are of other canaries (their places or "
                             "memberships differ): read them with the canaries whose observe() made the slot")
        total, squares = np.asarray(slot.total, np.float64), np.asarray(slot.squares, np.float64)
        steps = max(int(slot.steps), 1)
        s = total if statistic == "sum" else squares / steps - (total / steps) ** 2
        return s[self.members], s[~self.members]


def gradient_canaries(params: PyTree, count: int, key: Array, sample_rate: float,
                      net: LayerLike | None = None, where: PyTree = None) -> GradientCanaries:
    """`count` Dirac gradient canaries on distinct trainable entries of `params`, each a member with
    probability 1/2.

    A canary's score also holds the data's gradient at its entry, summed over the steps: on an entry
    the data move, that drift drowns the canary's q C / B a step. Nasr et al. (2023) put Dirac
    canaries where the data's gradient is zero; `where` says which entries those are (the
    first-layer weights of inputs that are zero in every example: the border pixels of MNIST).

    Args:
        params: the parameter tree of the run (its shapes fix the canaries' places).
        count: how many canaries (at most the number of trainable entries).
        key: a jax key: the entries and the memberships are drawn from it.
        sample_rate: q, the run's Poisson rate (batch_size / n): a member joins each step's
            batch with it.
        net: the network, to keep canaries off parameters inside `pn.Frozen` (None: every
            leaf is trainable).
        where: a tree like params of bools (or None for every entry): the entries canaries
            may take.

    Returns:
        The `GradientCanaries`, for `pn.DPSGD(..., canaries=)` and its observer.

    Raises:
        ValueError: `count` not an int >= 1 or more canaries than allowed trainable entries;
            `sample_rate` not in (0, 1]; `where` not a tree like params of bool arrays.
    """
    count = _count("count", count, 1)
    sample_rate = _real("sample_rate", sample_rate, 0.0, 1.0, True, False)
    leaves = jax.tree_util.tree_leaves(params)
    if net is None:
        trainable = [True] * len(leaves)
    else:
        from purenet.analysis.per_example import trainable_mask
        trainable = jax.tree_util.tree_leaves(trainable_mask(net, params))
    if where is None:
        allowed = [np.ones(np.shape(x), bool) for x in leaves]
    else:
        allowed = [np.asarray(w) for w in jax.tree_util.tree_leaves(where)]
        if (str(jax.tree_util.tree_structure(where)) != str(jax.tree_util.tree_structure(params))
                or [a.shape for a in allowed] != [np.shape(x) for x in leaves]
                or any(a.dtype != np.bool_ for a in allowed)):
            raise ValueError("where must be a tree like params of bool arrays (one per parameter entry), "
                             "e.g. jax.tree_util.tree_map(lambda p: np.zeros(p.shape, bool), params)")
    places = [(i, np.flatnonzero(a.ravel())) for i, (a, t) in enumerate(zip(allowed, trainable)) if t]
    leaf_of = np.concatenate([np.full(e.size, i) for i, e in places] or [np.zeros(0, int)])
    entry_of = np.concatenate([e for _, e in places] or [np.zeros(0, int)])
    if count > leaf_of.size:
        raise ValueError(f"count={count} canaries need as many allowed trainable parameter entries; "
                         f"there are {leaf_of.size}")
    rng = _host_rng(key)
    chosen = np.sort(rng.choice(leaf_of.size, size=count, replace=False))
    members = rng.random(count) < 0.5
    structure = (str(jax.tree_util.tree_structure(params)), tuple(tuple(np.shape(x)) for x in leaves))
    return GradientCanaries(leaf=leaf_of[chosen], entry=entry_of[chosen], members=members,
                            sample_rate=sample_rate, structure=structure)


def insert_canaries(x: Array, y: Array, canary_x: Array, canary_y: Array,
                    key: Array) -> tuple[Array, Array, np.ndarray]:
    """Black-box canaries: each of the m canary examples joins the training set with probability 1/2.

    Args:
        x: the training inputs, `(n, *in_shape)`.
        y: their targets, one row per example.
        canary_x: (m, ...) the canaries' inputs (mislabelled or out-of-distribution examples),
            shaped like x's rows.
        canary_y: (m, ...) the canaries' targets, shaped like y's rows.
        key: a jax key for the memberships.

    Returns:
        (x', y', members): the training set with the member canaries appended (jax arrays),
            and (m,) bool memberships (numpy).

    Raises:
        ValueError: if canary_x and canary_y differ in rows, or the canaries are not shaped
            like the training examples.
    """
    m = np.shape(canary_x)[0]
    if np.shape(canary_y)[0] != m:
        raise ValueError(f"canary_x has {m} rows, canary_y {np.shape(canary_y)[0]}")
    if np.shape(canary_x)[1:] != np.shape(x)[1:] or np.shape(canary_y)[1:] != np.shape(y)[1:]:
        raise ValueError(f"canaries must be shaped like the training examples: x {np.shape(x)[1:]} and y "
                         f"{np.shape(y)[1:]} per example, got {np.shape(canary_x)[1:]} and {np.shape(canary_y)[1:]}")
    members = _host_rng(key).random(m) < 0.5
    index = np.flatnonzero(members)
    return (jnp.concatenate([jnp.asarray(x), jnp.asarray(canary_x)[index]]),
            jnp.concatenate([jnp.asarray(y), jnp.asarray(canary_y)[index]]), members)


def loss_scores(net: LayerLike, params: PyTree, state: PyTree, canary_x: Array, canary_y: Array,
                members: np.ndarray, loss: Any = "cross_entropy") -> tuple[np.ndarray, np.ndarray]:
    """Black-box scores: each canary's negated loss under the final model (evaluation mode).

    Args:
        net: the trained network.
        params: its trained parameters.
        state: its state.
        canary_x: (m, ...) the canaries' inputs, as given to `insert_canaries`.
        canary_y: (m, ...) the canaries' targets, as given to `insert_canaries`.
        members: (m,) bool, from `insert_canaries`.
        loss: the loss the run trained with (a registered name or a `pn.Loss`).

    Returns:
        (members' scores, non-members' scores): two 1-D float64 arrays, for `pn.privacy.audit`.

    Raises:
        ValueError: members not one bool per canary; `loss` unknown; canary_x without a batch
            axis.
        TypeError: canary_x not floating point (integer ids for a network that starts with an
            Embedding).
    """
    from purenet.network import loss_pass
    from purenet.analysis.per_example import per_example_values
    p = loss_pass(net, params, state, jnp.asarray(canary_x), loss, False, None)
    s = -np.asarray(per_example_values(p, jnp.asarray(canary_y)), np.float64)
    members = np.asarray(members)
    if members.shape != s.shape or members.dtype != np.bool_:
        raise ValueError(f"members must be a ({s.size},) bool array (one per canary), got shape {members.shape}")
    return s[members], s[~members]
