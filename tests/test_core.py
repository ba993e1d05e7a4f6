"""metaif.core: the pure building blocks compose inside a user's jit, vmap and grad and agree with
the checked functions."""

import jax
import numpy as np
import pytest

import metaif
from metaif import core, problems

N, M, Q, DIM, WAYS = 8, 4, 3, 3, 3
TASKS = problems.classification_tasks(N, M, Q, DIM, WAYS, seed=0)
TEST = problems.classification_tasks(4, M, Q, DIM, WAYS, seed=1)
LOSS = problems.linear_cross_entropy
PROBLEM = metaif.BilevelProblem(LOSS, LOSS, metaif.Unrolled(steps=2, lr=0.5), meta_reg=0.1)
LAM = problems.linear_init(jax.random.key(0), DIM, WAYS)
SOLVER = metaif.solvers.Dense(damping=0.05)

pytestmark = pytest.mark.filterwarnings("ignore::metaif.NonStationaryWarning")  # λ is the initialisation


def target(lam):
    return core.task_losses(PROBLEM, lam, TEST).mean()


def test_docs_example_slice_inside_jit_equals_rows_of_the_checked_call():
    @jax.jit
    def scores_of_a_slice(problem, lam, tasks, start):
        _, _, op = core.operator(problem, lam, tasks, chunk_size=3)
        solver = metaif.solvers.CG(damping=0.05, tol=1e-12, maxiter=64)
        v, _ = solver.solve_one(op, jax.grad(target)(lam))
        piece = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, 4), tasks)
        return core.target_scores(problem, lam, piece, v, n_tasks=tasks.n_tasks)

    whole = metaif.influence(PROBLEM, LAM, TASKS, target=target, solver=metaif.solvers.Dense(damping=0.05))
    part = scores_of_a_slice(PROBLEM, LAM, TASKS, 2)
    for got, full in zip(part, whole[:3]):
        np.testing.assert_allclose(got, full[2:6], rtol=1e-8, atol=1e-12)


def test_pure_influence_equals_checked_and_vmaps_over_targets():
    checked = metaif.influence(PROBLEM, LAM, TASKS, target=target, solver=SOLVER)
    pure = jax.jit(lambda lam: core.influence_on_target(PROBLEM, lam, TASKS, target, solver=SOLVER))(LAM)
    for a, b in zip(pure[:3], checked[:3]):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    np.testing.assert_allclose(pure.diagnostics.grad_norm, checked.grad_norm, rtol=1e-12)
    rows = jax.jacrev(lambda lam: core.task_losses(PROBLEM, lam, TEST))(LAM)
    mapped = jax.jit(jax.vmap(lambda g: core.influence_from_gradient(PROBLEM, LAM, TASKS, g, solver=SOLVER).tasks))(
        rows
    )
    pairwise = metaif.pairwise_influence(
        PROBLEM, LAM, TASKS, lambda lam: core.task_losses(PROBLEM, lam, TEST), solver=SOLVER
    )
    np.testing.assert_allclose(mapped, pairwise.tasks, rtol=1e-10, atol=1e-14)


def test_grad_through_influence_matches_finite_differences():
    """Influence is differentiable: d/dλ of a score, through the solve and the scores."""
    score = lambda lam: core.influence_on_target(PROBLEM, lam, TASKS, target, solver=SOLVER).tasks[0]
    leaves, treedef = jax.tree.flatten(LAM)  # a random direction (all-ones is a softmax symmetry)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    direction = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
    derivative = jax.jvp(score, (LAM,), (direction,))[1]
    h = 1e-5
    shifted = lambda s: jax.tree.map(lambda x, d: x + s * d, LAM, direction)
    fd = (score(shifted(h)) - score(shifted(-h))) / (2 * h)
    np.testing.assert_allclose(derivative, fd, rtol=1e-5)


def test_train_steps_is_meta_train():
    import optax

    optimizer = optax.adam(0.05)
    state = optimizer.init(LAM)
    lam, _, values, _ = jax.jit(core.train_steps, static_argnames=("optimizer", "steps", "minibatch"))(
        PROBLEM, optimizer, LAM, state, TASKS, steps=10, key=jax.random.split(jax.random.key(0))[1]
    )
    trained = metaif.meta_train(PROBLEM, LAM, TASKS, optimizer, steps=10)
    np.testing.assert_allclose(values, trained.losses, rtol=1e-12)
    for a, b in zip(jax.tree.leaves(lam), jax.tree.leaves(trained.meta_params)):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_predicted_change_is_minus_influence():
    result = metaif.influence(PROBLEM, LAM, TASKS, target=target, solver=SOLVER)
    change = result.predicted_change()
    for a, b in zip(change[:3], result[:3]):
        np.testing.assert_array_equal(a, -b)
    assert isinstance(change, metaif.Scores) and change.solve is None
