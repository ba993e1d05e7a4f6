"""meta_train, newton_refine and leave-one-out retraining: histories, stationarity, weights."""

import logging
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metaif
from metaif import evaluation, problems
from metaif.training import trust_region_step

N, M, Q, DIM, WAYS = 8, 5, 5, 3, 3
TASKS = problems.classification_tasks(N, M, Q, DIM, WAYS, seed=4)
LOSS = problems.linear_cross_entropy
PROBLEM = metaif.BilevelProblem(LOSS, LOSS, metaif.Unrolled(steps=2, lr=0.5), meta_reg=0.05)
INIT = problems.linear_init(jax.random.key(0), DIM, WAYS)
OPTIMIZER = optax.adam(0.05)


def test_full_batch_training_reaches_stationarity(caplog):
    with caplog.at_level(logging.INFO, logger="metaif"):
        result = metaif.meta_train(PROBLEM, INIT, TASKS, OPTIMIZER, steps=600, log_every=200)
    assert result.losses.shape == (600,) and result.grad_norms.shape == (600,)
    assert result.losses[-1] < result.losses[0]
    grad = jax.grad(lambda lam: metaif.meta_objective(PROBLEM, lam, TASKS))(result.meta_params)
    np.testing.assert_allclose(result.grad_norm, np.sqrt(sum(np.sum(g**2) for g in jax.tree.leaves(grad))), rtol=1e-10)
    assert result.grad_norm < 1e-6
    assert [r.getMessage().startswith("meta_train step") for r in caplog.records].count(
        True
    ) == 3  # logged, not printed
    assert "||grad F||" in result.summary()


def test_minibatch_training_and_newton_polish():
    result = metaif.meta_train(PROBLEM, INIT, TASKS, OPTIMIZER, steps=300, minibatch=3, seed=1)
    assert result.grad_norm < 0.1
    polished = metaif.newton_refine(PROBLEM, result.meta_params, TASKS, steps=6)
    assert polished.grad_norm < 1e-12
    again = metaif.meta_train(PROBLEM, INIT, TASKS, OPTIMIZER, steps=300, minibatch=3, seed=1)
    np.testing.assert_array_equal(again.losses, result.losses)  # seeded: reproducible


def test_chunked_gradients_train_the_same():
    # chunk_size sums each gradient a few tasks at a time (lax.map): the same steps, in less memory
    plain = metaif.meta_train(PROBLEM, INIT, TASKS, OPTIMIZER, steps=20, minibatch=5, seed=2)
    chunked = metaif.meta_train(PROBLEM, INIT, TASKS, OPTIMIZER, steps=20, minibatch=5, seed=2, chunk_size=2)
    np.testing.assert_allclose(chunked.losses, plain.losses, rtol=1e-12)
    for a, b in zip(jax.tree.leaves(chunked.meta_params), jax.tree.leaves(plain.meta_params)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(chunked.grad_norm, plain.grad_norm, rtol=1e-10)
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1; received int 0"):
        metaif.meta_train(PROBLEM, INIT, TASKS, OPTIMIZER, steps=2, chunk_size=0)


def test_weights_remove_data_in_training_and_retraining():
    lam = metaif.newton_refine(PROBLEM, INIT, TASKS, steps=10).meta_params
    weights = evaluation.removal_weights(N, M, Q, "tasks", [2, 5])
    assert (
        weights.tasks.shape == (2, N) and float(weights.tasks[0, 2]) == 0.0 and float(weights.tasks.sum()) == 2 * N - 2
    )
    retrained = evaluation.retrain(PROBLEM, lam, TASKS, weights, steps=8)
    keep = np.array([k for k in range(N) if k != 2])
    # removing task 2 with weight 0 (denominator n) = training on the other tasks with
    # meta_reg scaled by n / (n - 1) (denominator n - 1)
    sub = metaif.BilevelProblem(LOSS, LOSS, PROBLEM.adapt, meta_reg=0.05 * N / (N - 1))
    direct = metaif.newton_refine(sub, lam, TASKS[keep], steps=10).meta_params
    for a, b in zip(jax.tree.leaves(jax.tree.map(lambda x: x[0], retrained.meta_params)), jax.tree.leaves(direct)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    assert float(jnp.max(retrained.grad_norm)) < 1e-12
    support = evaluation.removal_weights(N, M, Q, "support", [[1, 3]])
    assert float(support.support[0, 1, 3]) == 0.0 and float(support.support.sum()) == N * M - 1


def test_trust_region_step_solves_the_subproblem():
    """Moré–Sorensen conditions of min g·p + ½pᵀHp s.t. ‖p‖ <= r: (H + σI)p = −g with σ >= 0,
    H + σI positive semi-definite and σ(r − ‖p‖) = 0, on positive definite (step inside and on
    the boundary), indefinite and hard-case (g ⟂ lowest eigenvector) matrices."""
    rng = np.random.default_rng(0)
    d = 6
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
    cases = [
        (np.linspace(0.5, 3, d), 10.0),
        (np.linspace(0.5, 3, d), 0.1),
        (np.linspace(-2, 3, d), 1.0),
        (np.linspace(-2, 3, d), 100.0),
        ("hard", 5.0),
    ]
    for values, radius in cases:
        g = rng.normal(size=d)
        if isinstance(values, str):
            values = np.linspace(-1, 3, d)
            g = g - (g @ basis[:, 0]) * basis[:, 0]
        h = basis @ np.diag(values) @ basis.T
        p, decrease = trust_region_step(jnp.asarray(values), jnp.asarray(basis), jnp.asarray(g), jnp.asarray(radius))
        p = np.asarray(p)
        length = np.linalg.norm(p)
        sigma = -(p @ (h @ p + g)) / (p @ p)
        assert length <= radius * (1 + 1e-10)
        np.testing.assert_allclose(h @ p + sigma * p, -g, atol=1e-9 * np.linalg.norm(g))
        assert sigma >= -1e-10 and sigma + values[0] >= -1e-9
        assert abs(sigma * (radius - length)) <= 1e-8 * (1 + sigma * radius)
        np.testing.assert_allclose(float(decrease), -(g @ p + 0.5 * p @ h @ p), rtol=1e-10)
        if values[0] > 0 and np.linalg.norm(np.linalg.solve(h, g)) <= radius:
            np.testing.assert_allclose(p, -np.linalg.solve(h, g), rtol=1e-10)  # the Newton step


def _stalling_problem():
    """A tanh MLP (d = 31) meta-trained with MAML to ‖∇F‖ ~ 1e-15, meta_reg 1e-3: its smallest
    Hessian eigenvalues are near meta_reg, so removing a task tilts flat directions. The former
    damped Newton (14 steps, damping floor 1e-3·λ_max) stalled at ‖∇F‖ = 5e-2, 4e-2, 3e-2 for the
    removals of tasks 2, 4 and 6."""
    n, m, q, dim, ways = 8, 4, 4, 3, 3
    tasks = problems.classification_tasks(n, m, q, dim, ways, seed=2, scale=3.0)
    problem = metaif.BilevelProblem(
        problems.mlp_cross_entropy, problems.mlp_cross_entropy, metaif.Unrolled(steps=1, lr=0.5), meta_reg=1e-3
    )
    init = problems.mlp_init(jax.random.key(2), (dim, 4, ways))
    with jax.numpy_dtype_promotion("standard"):
        adam = metaif.meta_train(problem, init, tasks, optax.adam(0.02), steps=300)
    return problem, tasks, metaif.newton_refine(problem, adam.meta_params, tasks, steps=50, tol=1e-13)


def test_trust_region_newton_converges_where_damped_newton_stalled():
    problem, tasks, trained = _stalling_problem()
    assert trained.grad_norm < 1e-13
    assert trained.losses.shape[0] < 50 and np.all(
        np.diff(np.asarray(trained.losses)) <= 1e-15
    )  # steps taken; F never rises
    n, m, q = tasks.n_tasks, tasks.n_support, tasks.n_query
    weights = evaluation.removal_weights(n, m, q, "tasks", [2, 4, 6])
    retrained = evaluation.retrain(problem, trained.meta_params, tasks, weights, steps=40, chunk_size=None, tol=1e-10)
    assert float(jnp.max(retrained.grad_norm)) <= 1e-10
    assert int(jnp.max(retrained.iterations)) < 40  # measured 20, 13, 27
    unravel = jax.flatten_util.ravel_pytree(trained.meta_params)[1]
    flat = jax.vmap(lambda lam: jax.flatten_util.ravel_pytree(lam)[0])(retrained.meta_params)
    hessians = jax.jit(
        jax.vmap(jax.hessian(lambda x, w: metaif.meta_objective(problem, unravel(x), tasks, task_weights=w)))
    )(flat, weights.tasks)
    assert (
        np.linalg.eigvalsh(np.asarray(hessians))[:, 0].min() > -1e-8
    )  # local minima of the reduced objectives, not saddles


def test_meta_objective_is_traceable():
    """The public meta_objective under jit (traced tasks and weights), vmap over weights and grad."""
    value = metaif.meta_objective(PROBLEM, INIT, TASKS)
    weights = jnp.ones((2, N), jnp.float64).at[1, 3].set(0.0)
    jitted = jax.jit(lambda lam, tasks, w: metaif.meta_objective(PROBLEM, lam, tasks, task_weights=w))
    np.testing.assert_allclose(jitted(INIT, TASKS, weights[0]), value, rtol=1e-14)
    batched = jax.vmap(lambda w: metaif.meta_objective(PROBLEM, INIT, TASKS, task_weights=w))(weights)
    assert batched.shape == (2,) and float(batched[1]) < float(batched[0])
    grad = jax.jit(jax.grad(lambda lam: metaif.meta_objective(PROBLEM, lam, TASKS)))(INIT)
    assert jax.tree.structure(grad) == jax.tree.structure(INIT)


def test_train_result_reports_the_inner_residual_of_proximal_adaptation():
    """Proximal adaptation: TrainResult carries max_i ‖∇_θ L_I(θ_i, λ)‖ at the end (equal to
    metaif.adaptation_residual), large when the inner descent is cut short and ~0 when it
    converges; Unrolled adaptation: None."""
    short = metaif.BilevelProblem(LOSS, LOSS, metaif.Proximal(reg=1.0, steps=2, lr=0.1), meta_reg=0.05)
    converged = metaif.BilevelProblem(LOSS, LOSS, metaif.Proximal(reg=1.0, steps=300, lr=0.3), meta_reg=0.05)
    results = {}
    for name, problem in (("short", short), ("converged", converged)):
        trained = metaif.meta_train(problem, INIT, TASKS, OPTIMIZER, steps=20)
        refined = metaif.newton_refine(problem, trained.meta_params, TASKS, steps=2)
        for result in (trained, refined):
            expected = float(jnp.max(metaif.adaptation_residual(problem, result.meta_params, TASKS)))
            np.testing.assert_allclose(float(result.adaptation_residual), expected, rtol=1e-12)
            assert "max inner residual" in result.summary()
        results[name] = float(trained.adaptation_residual)
    assert results["short"] > 1e-2 and results["converged"] < 1e-8, results
    assert metaif.meta_train(PROBLEM, INIT, TASKS, OPTIMIZER, steps=5).adaptation_residual is None
