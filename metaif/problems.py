"""Reference problems: generated task sets and ready-made models for examples, tests and benchmarks.

Each model is a pair of pure functions, `init(key, ...) -> params` and a per-example loss
`(params, meta_params, example) -> scalar` usable as `BilevelProblem.inner_loss`/`outer_loss`.
Examples are dicts `{"x": [...], "y": ...}`; task sets are `TaskSet`s with leading axes
[n_tasks, n_examples].
"""

from __future__ import annotations

from typing import Any, Callable

from jax.typing import DTypeLike as JaxDTypeLike
from numpy.typing import DTypeLike

import jax
import jax.numpy as jnp
import numpy as np

from . import _validate
from ._problem import TaskSet

PyTree = Any


# ----------------------------------------------------------------------------- task sets


def regression_tasks(
    n_tasks: int,
    n_support: int,
    n_query: int,
    dim: int,
    noise: float = 0.1,
    spread: float = 0.5,
    seed: int = 0,
    family_seed: int = 0,
    dtype: DTypeLike = np.float64,
) -> tuple[TaskSet, np.ndarray]:
    """Linear-regression tasks y = x·w_i + ε with w_i = w_0 + spread·N(0, I).

    `family_seed` draws the shared w_0 (the task distribution); `seed` draws the tasks, so task
    sets with different `seed` and the same `family_seed` come from one distribution.
    Returns (TaskSet with {"x": [n, k, dim], "y": [n, k]}, the task weights w_i [n, dim]).
    """
    base = np.random.default_rng([family_seed, 0]).normal(size=dim)
    rng = np.random.default_rng([family_seed, 1, seed])
    w = base + spread * rng.normal(size=(n_tasks, dim))

    def sample(k):
        x = rng.normal(size=(n_tasks, k, dim))
        y = np.einsum("nkd,nd->nk", x, w) + noise * rng.normal(size=(n_tasks, k))
        return {"x": jnp.asarray(x, dtype), "y": jnp.asarray(y, dtype)}

    return TaskSet(sample(n_support), sample(n_query)), w


def classification_tasks(
    n_tasks: int,
    n_support: int,
    n_query: int,
    dim: int,
    ways: int,
    spread: float = 0.5,
    scale: float = 2.0,
    seed: int = 0,
    family_seed: int = 0,
    dtype: DTypeLike = np.float64,
) -> TaskSet:
    """Linear softmax tasks: inputs x ~ N(0, I); labels drawn from softmax(x·W_i) with
    W_i = scale·(W_0 + spread·N(0, I)), so tasks share structure that meta-learning can find.

    `family_seed` draws the shared W_0 (the task distribution); `seed` draws the tasks, so a
    held-out test set is `seed=1` with the training set's `family_seed`.
    Returns a TaskSet with {"x": [n, k, dim] float, "y": [n, k] int32}.
    """
    base = np.random.default_rng([family_seed, 0]).normal(size=(dim, ways)) / np.sqrt(dim)
    rng = np.random.default_rng([family_seed, 1, seed])
    weights = scale * (base + spread * rng.normal(size=(n_tasks, dim, ways)) / np.sqrt(dim))

    def sample(k):
        x = rng.normal(size=(n_tasks, k, dim))
        logits = np.einsum("nkd,ndc->nkc", x, weights)
        gumbel = -np.log(-np.log(rng.uniform(size=logits.shape)))
        y = np.argmax(logits + gumbel, axis=-1)
        return {"x": jnp.asarray(x, dtype), "y": jnp.asarray(y, jnp.int32)}

    return TaskSet(sample(n_support), sample(n_query))


def corrupt_labels(
    tasks: TaskSet, ways: int, task_fraction: float = 0.0, support_fraction: float = 0.0, seed: int = 0
) -> tuple[TaskSet, np.ndarray, np.ndarray]:
    """Corrupt classification tasks: a fraction of tasks gets random query labels (breaking the
    support-query link) and a fraction of support labels is flipped to another class.

    Returns (corrupted TaskSet, task mask [n] bool, support mask [n, m] bool).
    """
    ways = _validate.positive_int("corrupt_labels(ways)", ways)
    rng = np.random.default_rng(seed)
    ys, yq = np.array(tasks.support["y"]), np.array(tasks.query["y"])
    for part, y in (("support", ys), ("query", yq)):
        outside = (y < 0) | (y >= ways)
        if outside.any():
            task, example = np.argwhere(outside)[0]
            raise ValueError(
                f"corrupt_labels(tasks): {int(outside.sum())} {part} label(s) lie outside [0, ways={ways}), e.g. "
                f"{int(y[task, example])} in task {int(task)}. Pass the tasks' number of classes as ways."
            )
    n, m = ys.shape
    task_mask = np.zeros(n, bool)
    task_mask[rng.choice(n, int(round(task_fraction * n)), replace=False)] = True
    yq[task_mask] = rng.integers(0, ways, size=yq[task_mask].shape)
    support_mask = rng.uniform(size=(n, m)) < support_fraction
    ys[support_mask] = (ys[support_mask] + rng.integers(1, ways, size=support_mask.sum())) % ways
    support = dict(tasks.support, y=jnp.asarray(ys, tasks.support["y"].dtype))
    query = dict(tasks.query, y=jnp.asarray(yq, tasks.query["y"].dtype))
    return TaskSet(support, query), task_mask, support_mask


# ----------------------------------------------------------------------------- models


def squared_loss(params: PyTree, meta_params: PyTree, example: PyTree) -> jax.Array:
    """Linear regression: ½(x·w − y)² with params {"w": [dim]}."""
    return 0.5 * (example["x"] @ params["w"] - example["y"]) ** 2


def linear_init(key: jax.Array, dim: int, ways: int, dtype: JaxDTypeLike = jnp.float64) -> PyTree:
    """Multinomial logistic regression params {"w": [dim, ways] ~ N(0, 0.01²), "b": [ways] zeros}."""
    return {"w": 0.01 * jax.random.normal(key, (dim, ways), dtype), "b": jnp.zeros((ways,), dtype)}


def _affine(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """x @ w + b for one example [d] or a batch [..., d], without rank promotion."""
    out = x @ w
    return out + b.reshape((1,) * (out.ndim - 1) + b.shape)


def linear_logits(params: PyTree, x: jax.Array) -> jax.Array:
    """Logits [..., ways] for inputs [..., dim]."""
    return _affine(x, params["w"], params["b"])


def mlp_init(key: jax.Array, sizes: tuple[int, ...], dtype: JaxDTypeLike = jnp.float64) -> PyTree:
    """He-initialised MLP params [{"w", "b"}, ...] for layer sizes (in, hidden..., out)."""
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {"w": jax.random.normal(k, (a, b), dtype) * np.sqrt(2.0 / a), "b": jnp.zeros((b,), dtype)}
        for k, a, b in zip(keys, sizes[:-1], sizes[1:])
    ]


def mlp_logits(params: PyTree, x: jax.Array) -> jax.Array:
    """Logits [..., out] of a tanh MLP (params from `mlp_init`) for inputs [..., in]; tanh is
    smooth, so third derivatives (the total Hessian's third-order terms) exist."""
    for layer in params[:-1]:
        x = jnp.tanh(_affine(x, layer["w"], layer["b"]))
    return _affine(x, params[-1]["w"], params[-1]["b"])


def cross_entropy(logits: jax.Array, label: jax.Array) -> jax.Array:
    """−log softmax(logits)[label] for one example: logits [ways], integer label [] -> scalar.

    A label outside [0, ways) gives NaN, which the non-finite-loss checks of metaif's functions
    report by task (plain JAX indexing would clamp it: label 7 of 2 ways would score as label 1);
    a concrete (untraced) one raises a ValueError at once.
    """
    ways = jnp.shape(logits)[-1]
    if np.ndim(label) == 0 and _validate.is_concrete(label) and not 0 <= int(label) < ways:
        raise ValueError(
            f"cross_entropy: label {int(label)} is outside [0, {ways}) for {ways} logits. Labels must be "
            f"class indices 0..{ways - 1} within the task (few_shot_tasks numbers them so)."
        )
    return jnp.where((label >= 0) & (label < ways), -jax.nn.log_softmax(logits)[label], jnp.nan)


def linear_cross_entropy(params: PyTree, meta_params: PyTree, example: PyTree) -> jax.Array:
    """Multinomial logistic regression loss of one example, params {"w": [dim, ways], "b": [ways]}."""
    return cross_entropy(linear_logits(params, example["x"]), example["y"])


def mlp_cross_entropy(params: PyTree, meta_params: PyTree, example: PyTree) -> jax.Array:
    """Cross-entropy of a tanh MLP (params from `mlp_init`) on one example {"x": [in], "y": int []}."""
    return cross_entropy(mlp_logits(params, example["x"]), example["y"])


def accuracy(
    logits_fn: Callable[[PyTree, jax.Array], jax.Array], params: PyTree, x: jax.Array, y: jax.Array
) -> jax.Array:
    """Fraction of inputs x [k, dim] whose argmax logit equals the label y [k]."""
    predicted = jnp.argmax(logits_fn(params, x), axis=-1)
    return jnp.mean((predicted == y.astype(predicted.dtype)).astype(x.dtype))


__all__ = [
    "accuracy",
    "classification_tasks",
    "corrupt_labels",
    "cross_entropy",
    "linear_cross_entropy",
    "linear_init",
    "linear_logits",
    "mlp_cross_entropy",
    "mlp_init",
    "mlp_logits",
    "regression_tasks",
    "squared_loss",
]
