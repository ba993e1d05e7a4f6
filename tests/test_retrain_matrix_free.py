"""Matrix-free retraining (`retrain(..., solver=metaif.solvers.CG(...))`, Newton–CG with a
Levenberg–Marquardt shift): equal to dense trust-region Newton where both apply, convergent from
an indefinite start, validated, and free of recompiles when only numbers change."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_no_recompile import count_compiles

import metaif
from metaif import evaluation, problems
from metaif._tree import ravel

# A tanh MLP meta-learned with MAML (d = 45): non-convex, as the networks this path is built for.
N, M, Q, DIM, WAYS = 8, 5, 5, 3, 3
TASKS = problems.classification_tasks(N, M, Q, DIM, WAYS, seed=7)
LOSS = problems.mlp_cross_entropy
PROBLEM = metaif.BilevelProblem(LOSS, LOSS, metaif.Unrolled(steps=2, lr=0.3), meta_reg=0.01)
INIT = problems.mlp_init(jax.random.key(1), (DIM, 6, WAYS))
RHO = 0.05
SOLVER = metaif.solvers.CG(maxiter=200, tol=1e-10)
# One weight-setting shape and one chunking for most tests: they share a compiled program.
TWO_TASKS = np.array([0, 3])
CHUNKED = {"solver": SOLVER, "chunk_size": None, "task_chunk_size": 4}


@functools.cache
def _trained():
    """λ from 200 Adam steps (‖∇F‖ about 1e-4: not a stationary point)."""
    return metaif.meta_train(PROBLEM, INIT, TASKS, optax.adam(0.05), steps=200).meta_params


def _flat_rows(batched):
    """[B, d] rows of a batched pytree."""
    return np.asarray(jax.vmap(lambda tree: ravel(tree)[0])(batched))


def _hessian_of_g(lam, weights, rho):
    """The dense Hessian of G(λ) = F(λ; w) + (ρ/2)‖λ − c‖² (d×d, for checks only)."""
    flat, unravel = ravel(lam)
    return np.asarray(_hessian(flat, unravel, weights)) + rho * np.eye(flat.size)


@functools.partial(jax.jit, static_argnums=1)
def _hessian(flat, unravel, weights):
    objective = lambda x: metaif.meta_objective(
        PROBLEM,
        unravel(x),
        TASKS,
        task_weights=weights.tasks,
        support_weights=weights.support,
        query_weights=weights.query,
    )
    return jax.hessian(objective)(flat)


def test_newton_cg_equals_dense_proximal_retraining_at_task_and_query_level():
    """Leave-one-task-out and leave-one-query-example-out proximal retraining from an Adam-trained
    λ: Newton–CG (tasks in chunks of 4) reaches tol and lands on the
    dense retraining's λ (measured difference 5e-11)."""
    lam = _trained()
    tol = 1e-11
    weights = evaluation.removal_weights(N, M, Q, "tasks", TWO_TASKS)
    dense = evaluation.retrain(PROBLEM, lam, TASKS, weights, steps=30, chunk_size=None, proximal=RHO, tol=tol)
    cg = evaluation.retrain(PROBLEM, lam, TASKS, weights, steps=30, proximal=RHO, tol=tol, **CHUNKED)
    assert float(jnp.max(dense.grad_norm)) <= tol and float(jnp.max(cg.grad_norm)) <= tol
    np.testing.assert_allclose(_flat_rows(cg.meta_params), _flat_rows(dense.meta_params), rtol=0, atol=1e-8)
    assert np.all(np.asarray(cg.products) > np.asarray(cg.iterations)) and dense.products is None

    # leave_one_out forwards solver and task_chunk_size: the same change of a target as the dense path
    target = lambda l: metaif.task_losses(PROBLEM, l, TASKS).mean()
    args = (PROBLEM, lam, TASKS, "query", np.array([[1, 2], [5, 0]]), target)
    exact, _ = evaluation.leave_one_out(*args, steps=30, chunk_size=None, proximal=RHO, tol=tol)
    matrix_free, norms = evaluation.leave_one_out(*args, steps=30, proximal=RHO, tol=tol, **CHUNKED)
    assert float(jnp.max(norms)) <= tol
    assert float(jnp.min(jnp.abs(exact))) > 1e-5  # the removals move the target
    np.testing.assert_allclose(matrix_free, exact, rtol=0, atol=1e-10)


def test_newton_cg_converges_from_an_indefinite_start():
    """At the untrained λ the Hessian of F(λ; w) has eigenvalue −0.27: plain CG Newton steps are
    undefined there. The Levenberg–Marquardt shift still drives ‖∇G‖ below tol (ρ = 0, plain
    retraining), at a local minimum of G."""
    weights = evaluation.removal_weights(N, M, Q, "tasks", TWO_TASKS)
    first = jax.tree.map(lambda w: w[0], weights)
    assert np.linalg.eigvalsh(_hessian_of_g(INIT, first, 0.0))[0] < -0.2
    tol = 1e-9
    result = evaluation.retrain(PROBLEM, INIT, TASKS, weights, steps=80, chunk_size=None, tol=tol, solver=SOLVER)
    assert float(jnp.max(result.grad_norm)) <= tol, result.grad_norm
    found = jax.tree.map(lambda x: x[0], result.meta_params)
    assert np.linalg.eigvalsh(_hessian_of_g(found, first, 0.0))[0] > -1e-8


def test_retrain_rejects_bad_solver_and_task_chunk_size():
    lam = _trained()
    weights = evaluation.removal_weights(N, M, Q, "tasks", np.array([0]))
    with pytest.raises(TypeError, match=r"solver must be None .* or a metaif.solvers.CG instance.*received .*Dense"):
        evaluation.retrain(PROBLEM, lam, TASKS, weights, solver=metaif.solvers.Dense())
    with pytest.raises(ValueError, match="task_chunk_size chunks the matrix-free path.*solver=None"):
        evaluation.retrain(PROBLEM, lam, TASKS, weights, task_chunk_size=2)
    with pytest.raises(ValueError, match="task_chunk_size"):
        evaluation.retrain(PROBLEM, lam, TASKS, weights, solver=SOLVER, task_chunk_size=0)


def test_new_numbers_compile_nothing():
    """steps, ρ, tol, shift and the solver's damping (μ₀, None or a number) and tol are traced:
    new values reuse the compiled program of the first test."""
    lam = _trained()
    weights = evaluation.removal_weights(N, M, Q, "tasks", TWO_TASKS)
    settings = [
        (20, 0.05, 1e-8, 0.0, metaif.solvers.CG(maxiter=200, tol=1e-10)),
        (20, 0.05, 1e-8, 0.0, metaif.solvers.CG(damping=1e-3, tol=1e-8, maxiter=200)),
        (25, 0.1, 1e-9, 0.01, metaif.solvers.CG(damping=2e-3, tol=1e-6, maxiter=200)),
    ]
    for i, (steps, rho, tol, shift, solver) in enumerate(settings):
        with count_compiles() as compiled:
            result = evaluation.retrain(
                PROBLEM,
                lam,
                TASKS,
                weights,
                steps,
                shift,
                None,
                proximal=rho,
                tol=tol,
                solver=solver,
                task_chunk_size=4,
            )
            jax.block_until_ready(result)
        assert float(jnp.max(result.grad_norm)) <= tol
        if i:  # the first may compile when this test runs alone
            assert compiled == [], compiled
