"""Editing the meta-parameters without retraining: first-order removal by influence, how far such
a removal can be trusted (`removal_reach`), and the gradient-ascent unlearning baseline.

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

from .._deprecation import renamed
from .. import _hessian, _linalg, _tree, _validate
from .._objective import Weights, check_arguments, objective, unit_weights
from .._problem import BilevelProblem, TaskSet
from .._removal import DENSE_LIMIT
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
        raise TypeError(
            "removed must be a non-empty mapping from 'tasks', 'support' or 'query' to masks shaped [n], "
            f"[n, m] or [n, q]; received {_validate.describe(removed)}."
        )
    out = {}
    for level, shape in shapes.items():
        if level not in removed:
            out[level] = jnp.zeros(shape, dtype)
            continue
        value = np.asarray(removed[level])
        if value.shape != shape or not (value.dtype == np.bool_ or np.issubdtype(value.dtype, np.floating)):
            raise ValueError(
                f"removed[{level!r}] must be a bool or float array of shape {shape}; received {_validate.describe(value)}."
            )
        if not np.all(np.isfinite(value)):
            raise ValueError(
                f"removed[{level!r}] must be finite; received {_validate.describe(value)} with NaN or inf."
            )
        out[level] = jnp.asarray(value, dtype)
    return out


def _task_shapes(tasks: TaskSet) -> dict[str, tuple[int, ...]]:
    return {level: level_shape(level, tasks.n_tasks, tasks.n_support, tasks.n_query) for level in LEVELS}


def remaining_weights(tasks: TaskSet, removed: Mapping[str, Any], dtype=jnp.float64) -> Weights:
    """The weights 1 − removed of every level (leaves [n], [n, m], [n, q])."""
    amounts = _amounts(removed, _task_shapes(tasks), dtype)
    return Weights(*(1.0 - amounts[level] for level in LEVELS))


@jax.jit
def _reduced_grad_norm(problem, meta_params, tasks, weights, proximal, center):
    """‖∇_λ [F(λ; w) + (ρ/2)‖λ − center‖²]‖."""
    grad = jax.grad(objective, argnums=1)(problem, meta_params, tasks, weights)
    return _tree.norm(jax.tree.map(lambda g, x, c: g + proximal * (x - c), grad, meta_params, center))


def _influence_shapes(influence_params: Any, meta_params: PyTree) -> dict[str, tuple[int, ...]]:
    """The leading (per-datum) shape of each level's I_λ pytree, validated against meta_params."""
    if not all(hasattr(influence_params, level) for level in LEVELS):
        raise TypeError(
            "influence_params must be a metaif.Influence of I_λ pytrees (metaif.influence without a target); "
            f"received {_validate.describe(influence_params)}."
        )
    structure, likes = jax.tree.structure(meta_params), jax.tree.leaves(meta_params)
    shapes = {}
    for level in LEVELS:
        scores = getattr(influence_params, level)
        if scores is None:
            continue
        if jax.tree.structure(scores) != structure:
            raise ValueError(
                f"influence_params.{level} must be a pytree like meta_params with leading per-datum axes "
                f"(I_λ, no target); received {_validate.describe(scores)}."
            )
        leading = {
            leaf.shape[: leaf.ndim - like.ndim]
            for leaf, like in zip(jax.tree.leaves(scores), likes)
            if leaf.shape[leaf.ndim - like.ndim :] == like.shape
        }
        if len(leading) != 1 or len(next(iter(leading))) != (1 if level == "tasks" else 2):
            raise ValueError(
                f"influence_params.{level} leaves must have shapes [n{'' if level == 'tasks' else ', k'}, "
                f"*meta_params leaf shape]; received {[l.shape for l in jax.tree.leaves(scores)]}."
            )
        shapes[level] = next(iter(leading))
    if not shapes:
        raise ValueError("influence_params holds no level (tasks, support and query are all None).")
    return shapes


def edit(
    meta_params: PyTree,
    influence_params: Any,
    removed: Mapping[str, Any],
    *,
    problem: BilevelProblem | None = None,
    tasks: TaskSet | None = None,
    steps: int = 0,
    proximal: float = 0.0,
) -> Edited:
    """First-order removal without retraining: λ_edit = λ* − Σ_{ω removed} amount(ω) · I_λ(ω).

    Args:
      meta_params: λ*.
      influence_params: I_λ per datum, e.g. `metaif.influence(problem, λ*, tasks)` without a target
        (pytrees like meta_params with leading axes [n], [n, m], [n, q]). With solver damping δ
        the edit estimates the proximal retraining `retrain(..., proximal=δ)`.
      removed: {"tasks": [n], "support": [n, m], "query": [n, q]}: booleans or amounts ε.
      problem, tasks: needed for `steps` > 0 and for the returned gradient norm.
      steps: Newton steps on the reduced objective F(λ; 1 − removed), warm-started at λ_edit.
      proximal: ρ >= 0: the reduced objective gains (ρ/2)‖λ − λ*‖² (for the Newton steps and the
        returned gradient norm), matching `retrain(..., proximal=ρ)` and influence with δ = ρ.

    Returns:
      `Edited` (grad_norm None without problem and tasks).
    """
    _validate.floating_tree("meta_params", meta_params)
    shapes = _influence_shapes(influence_params, meta_params)
    if isinstance(steps, (bool, np.bool_)) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be an int >= 0; received {_validate.describe(steps)}.")
    proximal = _validate.non_negative("proximal", proximal)
    if (problem is None) != (tasks is None) or (steps > 0 and problem is None):
        raise ValueError(
            "problem and tasks must be given together (and are required when steps > 0); received "
            f"problem={_validate.describe(problem)}, tasks={_validate.describe(tasks)}."
        )
    if tasks is not None:
        meta_params = check_arguments(problem, meta_params, tasks)
        for level, shape in shapes.items():
            if shape != _task_shapes(tasks)[level]:
                raise ValueError(
                    f"influence_params.{level} has per-datum shape {shape} but tasks have {_task_shapes(tasks)[level]}."
                )
    dtype = _tree.float_dtype(meta_params)
    amounts = _amounts(removed, shapes, dtype)
    for level in removed:
        if level not in shapes:
            raise ValueError(
                f"removed[{level!r}] removes data but influence_params.{level} is None: compute it with "
                "metaif.influence(problem, meta_params, tasks) (no target)."
            )
    edited = meta_params
    for level, mask in amounts.items():  # at most three static levels, not a loop over data
        scores = getattr(influence_params, level)
        edited = jax.tree.map(lambda lam, s: lam - jnp.tensordot(mask, s, axes=mask.ndim), edited, scores)
    if problem is None or tasks is None:  # given together (checked above)
        return Edited(edited, None)
    weights = remaining_weights(tasks, removed, dtype)
    if steps > 0:
        result = retrain(
            problem,
            edited,
            tasks,
            Weights(*(w[None] for w in weights)),
            steps=int(steps),
            chunk_size=None,
            proximal=proximal,
            center=meta_params,
        )
        return Edited(jax.tree.map(lambda x: x[0], result.meta_params), result.grad_norm[0])
    return Edited(
        edited, _reduced_grad_norm(problem, edited, tasks, weights, jnp.asarray(proximal, dtype), meta_params)
    )


class Reach(NamedTuple):
    """How far a removal can go before λ* stops being a minimum of the reduced objective.

    Attributes:
      reach: t* in [0, inf]: the smallest scale t > 0 at which H(λ*; 1 − t·removed) + δI turns
        singular (inf: never; 0: H + δI is already not positive definite). t* < 1 means the full
        removal lies beyond a fold of the minimiser path as seen from λ*: retraining can jump to
        another basin there, and no local prediction (influence, edits, Newton steps from λ*)
        follows it.
      min_eigenvalue: smallest eigenvalue of H(λ*) + δI (all data).
      reduced_min_eigenvalue: smallest eigenvalue of H(λ*; 1 − removed) + δI (the full removal).
    """

    reach: jax.Array
    min_eigenvalue: jax.Array
    reduced_min_eigenvalue: jax.Array


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _reach(problem, chunk_size, meta_params, tasks, weights, damping):
    dense = lambda w: _linalg.dense_matrix(
        _hessian.operator(problem, meta_params, tasks, w, chunk_size=chunk_size)[2].hvp, meta_params
    )
    full, reduced = dense(unit_weights(meta_params, tasks)), dense(weights)
    eye = jnp.eye(full.shape[0], dtype=full.dtype)
    factor = _linalg.eigh(full + damping * eye)
    positive = factor.values[0] > 0
    root = factor.vectors / jnp.sqrt(jnp.where(positive, factor.values, 1.0))[None, :]  # V Λ^(-1/2): rootᵀ A root = I
    removed_share = full - reduced  # Hessian of the removed data's share (F is linear in task and query weights)
    largest = _linalg.eigh(root.T @ removed_share @ root).values[-1]  # max eigenvalue of (H + δI)⁻¹ H_removed
    reach = jnp.where(largest > 0, 1.0 / largest, jnp.inf)
    reduced_min = _linalg.eigh(reduced + damping * eye).values[0]
    return Reach(jnp.where(positive, reach, 0.0), factor.values[0], reduced_min)


@renamed(batch_size="chunk_size")
def removal_reach(
    problem: BilevelProblem,
    meta_params: PyTree,
    tasks: TaskSet,
    removed: Mapping[str, Any],
    *,
    damping: float = 0.0,
    chunk_size: int | None = None,
) -> Reach:
    """How much of a removal local predictions can follow: t* = 1 / λ_max((H + δI)⁻¹ H_removed).

    Removing an amount t of the data in `removed` leaves the Hessian H(λ*; 1 − t·removed) =
    H − t·H_removed (task and query weights enter F linearly). It stays positive definite exactly
    for t < t*. Past t*, λ* is a saddle of the reduced objective: the minimiser path λ(t) that
    influence linearises has folded (near t*, typically a little before, since H also changes
    along the path), and retraining lands in a different basin. An edit with t* < 1 is an
    extrapolation across that fold; `experiments/edit_reach.py` measures the consequences.

    Args:
      problem, meta_params, tasks: as in `metaif.influence` (λ* a stationary point).
      removed: {"tasks": [n], "query": [n, q]}: booleans or amounts, as in `edit`. Support weights
        enter adaptation nonlinearly, so support removals are not covered.
      damping: δ >= 0 added to H (proximal retraining toward λ* with ρ = δ).
      chunk_size: tasks per chunk in the Hessian products.

    Returns:
      `Reach(reach, min_eigenvalue, reduced_min_eigenvalue)`. Forms two dense d×d Hessians
      (d <= 8192, `metaif.task_removal`'s limit).
    """
    meta_params = check_arguments(problem, meta_params, tasks)
    _validate.finite_tree("meta_params", meta_params)
    if isinstance(removed, Mapping) and "support" in removed:
        raise ValueError(
            "removed['support'] is not supported by removal_reach: support weights enter the inner adaptation "
            "nonlinearly, so the reduced Hessian is not linear in the removed amount. Pass 'tasks' and/or 'query'."
        )
    d = _tree.size(meta_params)
    if d > DENSE_LIMIT:
        raise ValueError(
            f"removal_reach forms dense d×d Hessians, so d must be <= {DENSE_LIMIT}; meta_params has d = {d}."
        )
    damping = _validate.non_negative("damping", damping)
    if chunk_size is not None:
        chunk_size = _validate.positive_int("chunk_size", chunk_size)
    dtype = _tree.float_dtype(meta_params)
    weights = remaining_weights(tasks, removed, dtype)
    return _reach(problem, chunk_size, meta_params, tasks, weights, jnp.asarray(damping, dtype))


@functools.partial(jax.jit, static_argnames=("steps",))
def _ascent(problem, steps, lr, meta_params, tasks, weights):
    ones = Weights(*(jnp.ones_like(w) for w in weights))
    forget = lambda lam: objective(problem, lam, tasks, ones) - objective(problem, lam, tasks, weights)
    grad = jax.grad(forget)

    def step(lam, _):
        return _tree.axpy(lr, grad(lam), lam), None

    lam, _ = jax.lax.scan(step, meta_params, None, length=steps)
    return lam, _tree.norm(jax.grad(objective, argnums=1)(problem, lam, tasks, weights))


def unlearn(
    problem: BilevelProblem,
    meta_params: PyTree,
    tasks: TaskSet,
    removed: Mapping[str, Any],
    steps: int = 5,
    lr: float = 0.1,
) -> Edited:
    """Gradient-ascent unlearning baseline: `steps` steps λ ← λ + lr ∇D(λ) on the removed data's
    share of the objective, D(λ) = F(λ; 1) − F(λ; 1 − removed) (for removed tasks and query
    examples, their weighted loss; for support examples, the change they cause through adaptation).

    Returns `Edited` with the gradient norm of the reduced objective F(λ; 1 − removed).
    """
    meta_params = check_arguments(problem, meta_params, tasks)
    _validate.finite_tree("meta_params", meta_params)
    steps = _validate.positive_int("steps", steps)
    lr = _validate.positive("lr", lr)
    weights = remaining_weights(tasks, removed, _tree.float_dtype(meta_params))
    return Edited(*_ascent(problem, steps, lr, meta_params, tasks, weights))
