"""Renamed keywords and positions keep working for one release, with a DeprecationWarning that says
what to write (issue 14: chunk_size for memory chunks, minibatch for optimisation, shift and ridge
where "damping" meant something else, solver keyword-only)."""

import jax
import numpy as np
import optax
import pytest

import metaif
from metaif import evaluation, problems

TASKS = problems.classification_tasks(6, 3, 3, 3, 3, seed=0)
TEST = problems.classification_tasks(3, 3, 3, 3, 3, seed=1)
LOSS = problems.linear_cross_entropy
PROBLEM = metaif.BilevelProblem(LOSS, LOSS, metaif.Unrolled(steps=1, lr=0.5), meta_reg=0.1)
LAM = problems.linear_init(jax.random.key(0), 3, 3)
SOLVER = metaif.solvers.Dense(damping=0.1)
pytestmark = pytest.mark.filterwarnings("ignore::metaif.NonStationaryWarning")  # λ is the initialisation


def target(lam):
    return metaif.task_losses(PROBLEM, lam, TEST).mean()


def _same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-12)


@pytest.mark.parametrize(
    "name, old, new, message",
    [
        (
            "influence",
            lambda: metaif.influence(PROBLEM, LAM, TASKS, target, SOLVER, chunk_size=2),
            lambda: metaif.influence(PROBLEM, LAM, TASKS, target, solver=SOLVER, chunk_size=2),
            "solver=...",
        ),
        (
            "task_influence",
            lambda: metaif.task_influence(PROBLEM, LAM, TASKS, target, solver=SOLVER, batch_size=2),
            lambda: metaif.task_influence(PROBLEM, LAM, TASKS, target, solver=SOLVER, chunk_size=2),
            "chunk_size=...",
        ),
        (
            "self_influence",
            lambda: metaif.self_influence(PROBLEM, LAM, TASKS, SOLVER),
            lambda: metaif.self_influence(PROBLEM, LAM, TASKS, solver=SOLVER),
            "solver=...",
        ),
        (
            "pairwise_influence",
            lambda: metaif.pairwise_influence(
                PROBLEM,
                LAM,
                TASKS,
                lambda lam: metaif.task_losses(PROBLEM, lam, TEST),
                solver=SOLVER,
                target_batch_size=2,
            ),
            lambda: metaif.pairwise_influence(
                PROBLEM,
                LAM,
                TASKS,
                lambda lam: metaif.task_losses(PROBLEM, lam, TEST),
                solver=SOLVER,
                target_chunk_size=2,
            ),
            "target_chunk_size=...",
        ),
        (
            "hessian_operator",
            lambda: metaif.hessian_operator(PROBLEM, LAM, TASKS, batch_size=2).hvp(LAM),
            lambda: metaif.hessian_operator(PROBLEM, LAM, TASKS, chunk_size=2).hvp(LAM),
            "chunk_size=...",
        ),
        (
            "meta_train",
            lambda: metaif.meta_train(PROBLEM, LAM, TASKS, optax.adam(0.1), steps=3, batch_size=2).meta_params,
            lambda: metaif.meta_train(PROBLEM, LAM, TASKS, optax.adam(0.1), steps=3, minibatch=2).meta_params,
            "minibatch=...",
        ),
        (
            "newton_refine",
            lambda: metaif.newton_refine(PROBLEM, LAM, TASKS, steps=2, damping=0.5).meta_params,
            lambda: metaif.newton_refine(PROBLEM, LAM, TASKS, steps=2, shift=0.5).meta_params,
            "shift=...",
        ),
        (
            "trak",
            lambda: evaluation.baselines.trak(PROBLEM, LAM, TASKS, target, damping=0.01),
            lambda: evaluation.baselines.trak(PROBLEM, LAM, TASKS, target, ridge=0.01),
            "ridge=...",
        ),
    ],
)
def test_old_names_warn_and_mean_the_same(name, old, new, message):
    with pytest.warns(DeprecationWarning, match=message) as record:
        before = old()
    assert record[0].filename == __file__, "the warning points at the caller"
    assert "next release" in str(record[0].message)
    _same(
        before[:3] if isinstance(before, tuple) and hasattr(before, "diagnostics") else before,
        (lambda r: r[:3] if isinstance(r, tuple) and hasattr(r, "diagnostics") else r)(new()),
    )


def test_both_names_or_too_many_positions_are_errors():
    with pytest.raises(TypeError, match="both batch_size= .deprecated. and chunk_size="):
        metaif.influence(PROBLEM, LAM, TASKS, target, batch_size=2, chunk_size=2)
    with pytest.raises(TypeError, match="positional"):
        metaif.influence(PROBLEM, LAM, TASKS, target, SOLVER, None)
    with pytest.raises(TypeError, match="both by position and by keyword"):
        metaif.influence(PROBLEM, LAM, TASKS, target, SOLVER, solver=SOLVER)
