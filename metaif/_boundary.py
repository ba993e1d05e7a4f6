"""The checked boundary of the influence functions: validate once, call one jitted core, check
the result once.

Validation looks at structure, shapes and dtypes only (nothing is computed or copied to the host).
The jitted core returns, beside the result, a few flags (`Flags`) about the finiteness of what it
computed; `check_result` copies those and the scalar diagnostics to the host in one transfer,
turns a silent NaN into an error that names its source (meta_params, the losses, the target, its
gradient, the solve) and warns when the curvature is indefinite, the target is constant or λ is
far from stationary. Under tracing (a user's own `jit`) every check is skipped.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _memory, _tree, _validate, curvature as _curvature
from ._objective import check_arguments, check_finite_losses, unit_weights
from .curvature import Curvature
from .solvers import Solver, default_solver
from .solvers._damping import caller_level, warn_if_inaccurate, warn_if_indefinite

PyTree = Any


class NonStationaryWarning(RuntimeWarning):
    """meta_params is far from a stationary point of F compared with the effects measured."""


class ConstantTargetWarning(RuntimeWarning):
    """The target's gradient is zero at meta_params, so every influence score is zero."""


class Options(NamedTuple):
    solver: Solver
    curvature: Curvature
    chunk_size: int | None


def check_options(problem, meta_params, tasks, solver, curvature, chunk_size) -> tuple[Options, PyTree]:
    """Validate the problem, meta-parameters, tasks and influence options (no computation);
    returns them with the meta-parameters placed on the tasks' mesh."""
    meta_params = check_arguments(problem, meta_params, tasks)
    if solver is None:
        solver = default_solver(meta_params)
    elif not isinstance(solver, Solver):
        raise TypeError(
            "solver must be a metaif.solvers.Solver such as metaif.solvers.Dense() or "
            f"metaif.solvers.CG(); received {_validate.describe(solver)}."
        )
    curvature = _curvature.check(curvature)
    curvature.check(problem, meta_params, tasks)
    if isinstance(chunk_size, str):
        if chunk_size != _memory.AUTO:
            raise ValueError(
                f"chunk_size must be an int >= 1, None or 'auto'; received {_validate.describe(chunk_size)}."
            )
        chunk_size = _memory.auto_chunk_size(problem, meta_params, tasks)
    elif chunk_size is not None:
        chunk_size = _validate.positive_int("chunk_size", chunk_size)
    return Options(solver, curvature, chunk_size), meta_params


def check_scalar_fn(name: str, fn: Callable, argument: PyTree, argument_name: str) -> None:
    """`fn(argument)` must trace to a scalar (checked by shape only)."""
    _validate.callable_(name, fn, f"{argument_name} -> scalar")
    try:
        out = jax.eval_shape(fn, argument)
    except Exception as error:
        raise ValueError(f"{name} failed when called on {argument_name}: {error}") from error
    leaves = jax.tree.leaves(out)
    if len(leaves) != 1 or leaves[0].shape != ():
        raise ValueError(f"{name} must return a scalar; it returned {jax.tree.map(lambda s: s.shape, out)}.")


@functools.partial(jax.jit, static_argnums=0)
def _grad(fn, x):
    return jax.grad(fn)(x)


def target_gradient(target: Callable, meta_params: PyTree, name: str = "target") -> PyTree:
    """∇target(meta_params), checked: a scalar function with a finite gradient (for callers that
    need the gradient before their own jitted call, such as the baselines)."""
    check_scalar_fn(name, target, meta_params, "meta_params")
    grad = _grad(target, meta_params)
    _validate.finite_tree(f"the gradient of {name} at meta_params", grad)
    return grad


class Flags(NamedTuple):
    """Computed inside the jitted core, read by `check_result` (all scalars)."""

    meta_params_finite: jax.Array
    gradient_finite: jax.Array  # of the target (True without one)
    gradient_zero: jax.Array  # the target's gradient is exactly 0 (False without one)
    scores_finite: jax.Array
    task_score_scale: jax.Array  # max |task score| on a scalar target (NaN otherwise)


def _all_finite(tree: PyTree) -> jax.Array:
    leaves = [
        jnp.all(jnp.isfinite(leaf))
        for leaf in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def flags(
    meta_params: PyTree, scores: PyTree, target_grad: PyTree | None = None, task_scores: jax.Array | None = None
) -> Flags:
    """The finiteness flags of a result (traceable)."""
    no_grad = target_grad is None
    scale = (
        jnp.full((), jnp.nan) if task_scores is None or jnp.ndim(task_scores) != 1 else jnp.max(jnp.abs(task_scores))
    )
    return Flags(
        _all_finite(meta_params),
        jnp.asarray(True) if no_grad else _all_finite(target_grad),
        jnp.asarray(False) if no_grad else _tree.sq_norm(target_grad) == 0,
        _all_finite(scores),
        scale,
    )


def check_result(
    result, problem, meta_params, tasks, flag: Flags | None = None, *, target_name: str = "target"
) -> None:
    """Raise on a non-finite result, naming the cause; warn on indefinite curvature, a solve far
    from converged, a constant target and a non-stationary λ. Skipped under tracing."""
    d = result.diagnostics
    if not _validate.is_concrete((d.objective, flag)):
        return
    objective, target, change, flag = jax.device_get((d.objective, d.target, d.nonstationary_change, flag))
    if flag is not None and not flag.meta_params_finite:
        _validate.finite_tree("meta_params", meta_params)  # names the leaf
    if not np.isfinite(objective):
        check_finite_losses(
            problem,
            meta_params,
            tasks,
            unit_weights(meta_params, tasks),
            f"The meta-objective at meta_params is {float(objective)}",
        )
        raise ValueError(
            f"The meta-objective at meta_params is {float(objective)} although every task loss is finite: check meta_params."
        )
    if target is not None and not np.isfinite(target):
        raise ValueError(
            f"{target_name}(meta_params) is {float(target)}: the target must be finite at meta_params "
            "(check it for log(0), overflow or NaN in the data it reads)."
        )
    if flag is None:
        if not warn_if_indefinite(d.solve):
            warn_if_inaccurate(d.solve)
        return
    if not flag.gradient_finite:
        known = "" if target is None else f" although {target_name}(meta_params) = {float(target):.6g} is finite"
        raise ValueError(
            f"the gradient of {target_name} at meta_params must be finite, but it holds NaN or inf values{known}: "
            "check the target for operations whose derivative overflows (sqrt or log at 0, division by 0)."
        )
    if flag.gradient_zero:
        warnings.warn(
            f"The gradient of {target_name} at meta_params is zero, so every influence score is zero: the target "
            "does not depend on meta_params (is it constant, or computed from stop_gradient values?).",
            ConstantTargetWarning,
            stacklevel=caller_level(),
        )
    if not flag.scores_finite:
        info = d.solve
        residual = (
            ""
            if info is None
            else f" (solve: relative residual {float(np.max(np.asarray(info.relative_residual))):.3g})"
        )
        raise ValueError(
            f"The influence scores are not finite although the objective, the losses and the target are{residual}: the "
            "inverse-Hessian solve failed. With Dense(), H + δI is singular: pass a damping above |λ_min(H)| (for example "
            "solver=metaif.solvers.Dense(damping=1e-3)); with an iterative solver, raise its damping."
        )
    if warn_if_indefinite(d.solve):
        return  # the more fundamental warning: no local minimum, so no stationarity to speak of
    warn_if_inaccurate(d.solve)
    # rounding floor: at a point polished to machine precision both numbers are noise
    floor = (
        1e3 * np.finfo(np.asarray(objective).dtype).eps * max(1.0, abs(float(target)) if target is not None else 1.0)
    )
    if (
        change is not None
        and np.isfinite(flag.task_score_scale)
        and abs(float(change)) > max(float(flag.task_score_scale), floor)
    ):
        delta = "" if d.solve is None else f" (δ = {float(np.max(np.asarray(d.solve.damping))):.3g})"
        warnings.warn(
            f"meta_params is not a stationary point of the meta-objective (‖∇F‖ = {float(d.grad_norm):.3g}): retraining with "
            f"nothing removed would change the target by about {float(change):.3g}, more than the largest task score "
            f"({float(flag.task_score_scale):.3g}). The scores then describe a retraining that stays near meta_params, as "
            f"far as the damping allows{delta}, not retraining to convergence. Train further or polish with "
            "metaif.newton_refine (small models); or, if the proximal reading is what you want, silence this with "
            "warnings.simplefilter('ignore', metaif.NonStationaryWarning). Result.diagnostics.nonstationary_change holds "
            "the number.",
            NonStationaryWarning,
            stacklevel=caller_level(),
        )
