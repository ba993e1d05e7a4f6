"""meta_train, newton_refine and leave-one-out retraining: histories, stationarity, weights."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import metaif
from metaif import evaluation, problems

N, M, Q, DIM, WAYS = 8, 5, 5, 3, 3
TASKS = problems.classification_tasks(N, M, Q, DIM, WAYS, seed=4)
LOSS = problems.linear_cross_entropy
PROBLEM = metaif.BilevelProblem(LOSS, LOSS, metaif.Unrolled(steps=2, lr=0.5), meta_reg=0.05)
INIT = problems.linear_init(jax.random.key(0), DIM, WAYS)
OPTIMIZER = optax.adam(0.05)


def test_full_batch_training_reaches_stationarity(capsys):
    result = metaif.meta_train(PROBLEM, INIT, TASKS, OPTIMIZER, steps=600, log_every=200)
    assert result.losses.shape == (600,) and result.grad_norms.shape == (600,)
    assert result.losses[-1] < result.losses[0]
    grad = jax.grad(lambda lam: metaif.meta_objective(PROBLEM, lam, TASKS))(result.meta_params)
    np.testing.assert_allclose(result.grad_norm, np.sqrt(sum(np.sum(g**2) for g in jax.tree.leaves(grad))), rtol=1e-10)
    assert result.grad_norm < 1e-6
    assert capsys.readouterr().out.count("meta_train step") == 3
    assert "||grad F||" in result.summary()


def test_minibatch_training_and_newton_polish():
    result = metaif.meta_train(PROBLEM, INIT, TASKS, OPTIMIZER, steps=300, batch_size=3, seed=1)
    assert result.grad_norm < 0.1
    polished = metaif.newton_refine(PROBLEM, result.meta_params, TASKS, steps=6)
    assert polished.grad_norm < 1e-12
    again = metaif.meta_train(PROBLEM, INIT, TASKS, OPTIMIZER, steps=300, batch_size=3, seed=1)
    np.testing.assert_array_equal(again.losses, result.losses)  # seeded: reproducible


def test_weights_remove_data_in_training_and_retraining():
    lam = metaif.newton_refine(PROBLEM, INIT, TASKS, steps=10).meta_params
    weights = evaluation.removal_weights(N, M, Q, "tasks", [2, 5])
    assert weights.tasks.shape == (2, N) and float(weights.tasks[0, 2]) == 0.0 and float(weights.tasks.sum()) == 2 * N - 2
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
