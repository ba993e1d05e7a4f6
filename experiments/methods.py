"""Every way of scoring training data that the experiments compare: influence with each solver and
curvature option that metaif has, and the baselines of `metaif.evaluation.baselines`.

Each method maps (setup, λ*, target) to `Scores(tasks [n], support [n, m], query [n, q])` with
influence's sign (higher = more harmful to the target; removal changes the target by about
−score). Solvers that another part of the project may not have yet are skipped when absent.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

import metaif
from metaif import problems
from metaif.evaluation import baselines

from common import Setup


class Scores(NamedTuple):
    tasks: np.ndarray
    support: np.ndarray | None  # None: the method scores tasks only
    query: np.ndarray | None
    info: dict


def _predict(params, meta_params, example):
    return problems.mlp_logits(params, example["x"])


def _output_loss(outputs, example):
    return problems.cross_entropy(outputs, example["y"])


GAUSS_NEWTON = metaif.curvature.GaussNewton(_predict, _output_loss)


def _solve_info(info) -> dict:
    if info is None:
        return {}
    out = {}
    for name in ("iterations", "residual", "converged", "indefinite", "min_eigenvalue"):
        value = getattr(info, name, None)
        if value is not None:
            value = np.asarray(value)
            out[name] = value.item() if value.size == 1 else value.tolist()
    return out


def _from_influence(result) -> Scores:
    return Scores(
        np.asarray(result.tasks),
        np.asarray(result.support),
        np.asarray(result.query),
        {**_solve_info(result.solve), "grad_norm": float(result.grad_norm)},
    )


def _from_baseline(result) -> Scores:
    return Scores(
        np.asarray(result.tasks),
        np.asarray(result.support),
        np.asarray(result.query),
        _solve_info(getattr(result, "solve", None)),
    )


def _influence(solver=None, curvature=None) -> Callable:
    def run(setup: Setup, lam, target):
        return _from_influence(
            metaif.influence(setup.problem, lam, setup.train, target, solver=solver, curvature=curvature)
        )

    return run


def _task_removal(damping: float) -> Callable:
    """Second order in the removal (`metaif.task_removal`): score = −(predicted change of the
    target when the task is removed), tasks only."""

    def run(setup: Setup, lam, target):
        result = metaif.task_removal(setup.problem, lam, setup.train, target, damping=damping)
        return Scores(-np.asarray(result.change), None, None, {**_solve_info(result.solve), "second_order": True})

    return run


def _has(name: str) -> bool:
    return hasattr(metaif.solvers, name)


def influence_methods(damping: float = 0.0) -> dict[str, Callable]:
    """Influence with every solver and curvature option present in metaif (exact mixed derivatives;
    only the inverse-Hessian solve changes)."""
    S = metaif.solvers
    out = {"IF Dense (exact)": _influence(S.Dense(damping=damping))}
    out["task removal (2nd order)"] = _task_removal(damping)
    out["IF CG"] = _influence(S.CG(damping=damping, maxiter=300, tol=1e-10))
    if "preconditioner" in getattr(S.CG, "__dataclass_fields__", {}):
        out["IF CG+lowrank precond."] = _influence(
            S.CG(damping=damping, maxiter=300, tol=1e-10, preconditioner="lowrank")
        )
    if _has("Neumann"):
        out["IF Neumann (J=100)"] = _influence(S.Neumann(damping=damping, iterations=100))
    if _has("LiSSA"):
        out["IF LiSSA (J=100, B=8)"] = _influence(S.LiSSA(damping=damping, iterations=100, batch=8, repeats=4))
    if _has("LowRank"):
        out["IF LowRank (r=20)"] = _influence(S.LowRank(rank=20, damping=max(damping, 1e-2)))
    out["IF Truncated H̄"] = _influence(S.Dense(damping=damping), metaif.curvature.Truncated())
    out["IF Γ surrogate"] = _influence(S.Dense(damping=damping), metaif.curvature.Gamma())
    out["IF Gauss-Newton"] = _influence(S.Dense(damping=max(damping, 1e-8)), GAUSS_NEWTON)
    return out


def baseline_methods(damping: float = 0.0) -> dict[str, Callable]:
    """The paper's and reviewers' baselines."""
    return {
        "Direct-IF": lambda s, lam, f: _from_baseline(
            baselines.direct_if(s.problem, lam, s.train, f, solver=metaif.solvers.Dense(damping=damping))
        ),
        "single-level IF": lambda s, lam, f: _from_baseline(
            baselines.single_level(s.problem, lam, s.train, f, solver=metaif.solvers.Dense(damping=1e-3))
        ),
        "TracIn (grad dot)": lambda s, lam, f: _from_baseline(baselines.grad_dot(s.problem, lam, s.train, f)),
        "TRAK (k=32)": lambda s, lam, f: _from_baseline(baselines.trak(s.problem, lam, s.train, f, dim=32)),
        "raw loss": lambda s, lam, f: _from_baseline(baselines.raw_loss(s.problem, lam, s.train)),
        "random": lambda s, lam, f: _from_baseline(baselines.random_scores(s.train, seed=0)),
    }


def run_timed(method: Callable, setup: Setup, lam, target) -> tuple[Scores, float, float]:
    """(scores, first call seconds incl. compilation, second call seconds)."""
    import time

    start = time.perf_counter()
    scores = method(setup, lam, target)
    first = time.perf_counter() - start
    start = time.perf_counter()
    scores = method(setup, lam, target)
    return scores, first, time.perf_counter() - start
