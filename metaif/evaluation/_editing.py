"""Editing the meta-parameters without retraining: first-order removal by influence, and the
gradient-ascent unlearning baseline.

`removed` is a mapping from level ("tasks", "support", "query") to an array of the level's shape
([n], [n, m], [n, q]): boolean (True = removed) or the amount ε by which each weight drops
(weight 1 → 1 − ε). Levels left out remove nothing.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import _tree, _validate
from .._objective import Weights, check_arguments, objective
from .._problem import BilevelProblem, TaskSet
from ._retrain import LEVELS, level_shape, retrain

PyTree = Any


class Edited(NamedTuple):
    """Edited meta-parameters and, when the problem and tasks were given, the gradient norm of the
    reduced objective F(λ; 1 − removed) there (how far the edit is from a retrained optimum)."""

    meta_params: PyTree
    grad_norm: jax.Array | None


def _amounts(removed: Any, shapes: Mapping[str, tuple[int, ...]], dtype) -> dict[str, jax.Array]:
    """Validated removal amounts per level (levels not in `removed`: zeros of the level's shape)."""
    if not isinstance(removed, Mapping) or not removed or not set(removed) <= set(LEVELS):
        raise TypeError("removed must be a non-empty mapping from 'tasks', 'support' or 'query' to masks shaped [n], "
                        f"[n, m] or [n, q]; received {_validate.describe(removed)}.")
    out = {}
    for level, shape in shapes.items():
        if level not in removed:
            out[level] = jnp.zeros(shape, dtype)
            continue
        value = np.asarray(removed[level])
        if value.shape != shape or not (value.dtype == np.bool_ or np.issubdtype(value.dtype, np.floating)):
            raise ValueError(f"removed[{level!r}] must be a bool or float array of shape {shape}; received {_validate.describe(value)}.")
        if not np.all(np.isfinite(value)):
            raise ValueError(f"removed[{level!r}] must be finite; received {_validate.describe(value)} with NaN or inf.")
        out[level] = jnp.asarray(value, dtype)
    return out


def _task_shapes(tasks: TaskSet) -> dict[str, tuple[int, ...]]:
    return {level: level_shape(level, tasks.n_tasks, tasks.n_support, tasks.n_query) for level in LEVELS}


def remaining_weights(tasks: TaskSet, removed: Mapping[str, Any], dtype=jnp.float64) -> Weights:
    """The weights 1 − removed of every level (leaves [n], [n, m], [n, q])."""
    amounts = _amounts(removed, _task_shapes(tasks), dtype)
    return Weights(*(1.0 - amounts[level] for level in LEVELS))


@functools.partial(jax.jit, static_argnames=("problem",))
def _reduced_grad_norm(problem, meta_params, tasks, weights):
    return _tree.norm(jax.grad(objective, argnums=1)(problem, meta_params, tasks, weights))


def _influence_shapes(influence_params: Any, meta_params: PyTree) -> dict[str, tuple[int, ...]]:
    """The leading (per-datum) shape of each level's I_λ pytree, validated against meta_params."""
    if not all(hasattr(influence_params, level) for level in LEVELS):
        raise TypeError("influence_params must be a metaif.Influence of I_λ pytrees (metaif.influence without a target); "
                        f"received {_validate.describe(influence_params)}.")
    structure, likes = jax.tree.structure(meta_params), jax.tree.leaves(meta_params)
    shapes = {}
    for level in LEVELS:
        scores = getattr(influence_params, level)
        if scores is None:
            continue
        if jax.tree.structure(scores) != structure:
            raise ValueError(f"influence_params.{level} must be a pytree like meta_params with leading per-datum axes "
                             f"(I_λ, no target); received {_validate.describe(scores)}.")
        leading = {leaf.shape[:leaf.ndim - like.ndim] for leaf, like in zip(jax.tree.leaves(scores), likes)
                   if leaf.shape[leaf.ndim - like.ndim:] == like.shape}
        if len(leading) != 1 or len(next(iter(leading))) != (1 if level == "tasks" else 2):
            raise ValueError(f"influence_params.{level} leaves must have shapes [n{'' if level == 'tasks' else ', k'}, "
                             f"*meta_params leaf shape]; received {[l.shape for l in jax.tree.leaves(scores)]}.")
        shapes[level] = next(iter(leading))
    if not shapes:
        raise ValueError("influence_params holds no level (tasks, support and query are all None).")
    return shapes


def edit(meta_params: PyTree, influence_params: Any, removed: Mapping[str, Any], *, problem: BilevelProblem | None = None,
         tasks: TaskSet | None = None, steps: int = 0) -> Edited:
    """First-order removal without retraining: λ_edit = λ* − Σ_{ω removed} amount(ω) · I_λ(ω).

    Args:
      meta_params: λ*.
      influence_params: I_λ per datum, e.g. `metaif.influence(problem, λ*, tasks)` without a target
        (pytrees like meta_params with leading axes [n], [n, m], [n, q]). With solver damping δ
        the edit estimates the proximal retraining `retrain(..., proximal=δ)`.
      removed: {"tasks": [n], "support": [n, m], "query": [n, q]}: booleans or amounts ε.
      problem, tasks: needed for `steps` > 0 and for the returned gradient norm.
      steps: Newton steps on the reduced objective F(λ; 1 − removed), warm-started at λ_edit.

    Returns:
      `Edited` (grad_norm None without problem and tasks).
    """
    _validate.floating_tree("meta_params", meta_params)
    shapes = _influence_shapes(influence_params, meta_params)
    if isinstance(steps, (bool, np.bool_)) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be an int >= 0; received {_validate.describe(steps)}.")
    if (problem is None) != (tasks is None) or (steps > 0 and problem is None):
        raise ValueError("problem and tasks must be given together (and are required when steps > 0); received "
                         f"problem={_validate.describe(problem)}, tasks={_validate.describe(tasks)}.")
    if tasks is not None:
        check_arguments(problem, meta_params, tasks)
        for level, shape in shapes.items():
            if shape != _task_shapes(tasks)[level]:
                raise ValueError(f"influence_params.{level} has per-datum shape {shape} but tasks have {_task_shapes(tasks)[level]}.")
    amounts = _amounts(removed, shapes, _tree.float_dtype(meta_params))
    for level in removed:
        if level not in shapes:
            raise ValueError(f"removed[{level!r}] removes data but influence_params.{level} is None: compute it with "
                             "metaif.influence(problem, meta_params, tasks) (no target).")
    edited = meta_params
    for level, mask in amounts.items():  # at most three static levels, not a loop over data
        scores = getattr(influence_params, level)
        edited = jax.tree.map(lambda lam, s: lam - jnp.tensordot(mask, s, axes=mask.ndim), edited, scores)
    if problem is None:
        return Edited(edited, None)
    weights = remaining_weights(tasks, removed, _tree.float_dtype(meta_params))
    if steps > 0:
        result = retrain(problem, edited, tasks, Weights(*(w[None] for w in weights)), steps=int(steps), batch_size=None)
        return Edited(jax.tree.map(lambda x: x[0], result.meta_params), result.grad_norm[0])
    return Edited(edited, _reduced_grad_norm(problem, edited, tasks, weights))


@functools.partial(jax.jit, static_argnames=("problem", "steps"))
def _ascent(problem, steps, lr, meta_params, tasks, weights):
    ones = Weights(*(jnp.ones_like(w) for w in weights))
    forget = lambda lam: objective(problem, lam, tasks, ones) - objective(problem, lam, tasks, weights)
    grad = jax.grad(forget)

    def step(lam, _):
        return _tree.axpy(lr, grad(lam), lam), None

    lam, _ = jax.lax.scan(step, meta_params, None, length=steps)
    return lam, _tree.norm(jax.grad(objective, argnums=1)(problem, lam, tasks, weights))


def unlearn(problem: BilevelProblem, meta_params: PyTree, tasks: TaskSet, removed: Mapping[str, Any], steps: int = 5,
            lr: float = 0.1) -> Edited:
    """Gradient-ascent unlearning baseline: `steps` steps λ ← λ + lr ∇D(λ) on the removed data's
    share of the objective, D(λ) = F(λ; 1) − F(λ; 1 − removed) (for removed tasks and query
    examples, their weighted loss; for support examples, the change they cause through adaptation).

    Returns `Edited` with the gradient norm of the reduced objective F(λ; 1 − removed).
    """
    check_arguments(problem, meta_params, tasks)
    _validate.finite_tree("meta_params", meta_params)
    steps = _validate.positive_int("steps", steps)
    lr = _validate.positive("lr", lr)
    weights = remaining_weights(tasks, removed, _tree.float_dtype(meta_params))
    return Edited(*_ascent(problem, steps, lr, meta_params, tasks, weights))
