"""Many targets at once: pairwise scores equal single-target calls, self-influence equals its
definition by finite differences of re-solved optima, new-task attributions add up, top-k equals a
full sort."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metaif
from metaif import problems

N, M, Q, DIM, WAYS = 6, 4, 3, 3, 3
TASKS = problems.classification_tasks(N, M, Q, DIM, WAYS, seed=11)
TEST = problems.classification_tasks(5, M, Q, DIM, WAYS, seed=12)
LOSS = problems.linear_cross_entropy
PROBLEM = metaif.BilevelProblem(LOSS, LOSS, metaif.Unrolled(steps=2, lr=0.5), meta_reg=0.05)


@pytest.fixture(scope="module")
def LAM():
    """A stationary point, computed when the first test needs it (not at import)."""
    return metaif.newton_refine(
        PROBLEM, problems.linear_init(jax.random.key(3), DIM, WAYS), TASKS, steps=10
    ).meta_params


def test_at_stationary_point(LAM):
    assert float(metaif.influence(PROBLEM, LAM, TASKS).grad_norm) < 1e-12


def targets(lam):
    """T = 5 test-task losses plus 3 logit margins of one test input: 8 targets."""
    losses = metaif.task_losses(PROBLEM, lam, TEST)
    theta = metaif.adapt(PROBLEM, lam, jax.tree.map(lambda x: x[0], TEST.support))
    logits = problems.linear_logits(theta, TEST.query["x"][0, 0])
    return jnp.concatenate([losses, logits - jnp.max(jax.lax.stop_gradient(logits))])


@pytest.mark.parametrize(
    "method,solver,batch_size,target_batch_size",
    [
        ("per_target", None, None, None),
        ("mixed", None, 4, 3),
        # a given δ: with the default, one target's CG picks δ from its own Lanczos run and many
        # targets share a 5-product estimate, so the two δ differ slightly
        ("auto", metaif.solvers.CG(damping=1e-2, tol=1e-13, maxiter=200), None, 5),
    ],
)
def test_pairwise_equals_separate_single_target_calls(method, solver, batch_size, target_batch_size, LAM):
    result = metaif.pairwise_influence(
        PROBLEM,
        LAM,
        TASKS,
        targets,
        solver=solver,
        method=method,
        chunk_size=batch_size,
        target_chunk_size=target_batch_size,
    )
    assert result.tasks.shape == (8, N) and result.support.shape == (8, N, M) and result.query.shape == (8, N, Q)
    # single-target calls through the pure core, jitted once with the target's index traced (the
    # checked `influence` equals the core: tests/test_core.py)
    single_target = jax.jit(
        lambda lam, t: metaif.core.influence_on_target(PROBLEM, lam, TASKS, lambda l: targets(l)[t], solver=solver)
    )
    for t in range(8):
        single = single_target(LAM, t)
        for pair, one in zip(result[:3], single[:3]):
            np.testing.assert_allclose(pair[t], one, rtol=1e-8, atol=1e-11 * float(np.max(np.abs(one))))
    assert bool(result.solve.converged)


def one_test_loss(lam, task):
    """The query loss of one test task after adaptation (a scalar target mapped over test tasks)."""
    theta = metaif.adapt(PROBLEM, lam, task.support)
    return jnp.mean(jax.vmap(LOSS, in_axes=(None, None, 0))(theta, lam, task.query))


def test_pairwise_over_target_data_equals_vector_targets(LAM):
    mapped = metaif.pairwise_influence(PROBLEM, LAM, TASKS, one_test_loss, target_data=TEST)
    vector = metaif.pairwise_influence(PROBLEM, LAM, TASKS, lambda lam: metaif.task_losses(PROBLEM, lam, TEST))
    for a, b in zip(mapped[:3], vector[:3]):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-14)
    with pytest.raises(ValueError, match="must return a scalar for one item"):
        metaif.pairwise_influence(PROBLEM, LAM, TASKS, lambda lam, task: task.query["x"], target_data=TEST)


def test_self_influence_equals_finite_differences(LAM):
    result = metaif.self_influence(PROBLEM, LAM, TASKS)
    h = 1e-4
    ones = dict(task_weights=jnp.ones(N), support_weights=jnp.ones((N, M)), query_weights=jnp.ones((N, Q)))
    own_loss = lambda lam, k, a: metaif.task_losses(PROBLEM, lam, TASKS, support_weights=a)[k]
    for name, index, score in [
        ("task_weights", (2,), result.tasks[2]),
        ("support_weights", (1, 3), result.support[1, 3]),
        ("query_weights", (4, 0), result.query[4, 0]),
    ]:

        def value(delta):
            weights = dict(ones, **{name: ones[name].at[index].add(delta)})
            lam = metaif.newton_refine(PROBLEM, LAM, TASKS, steps=6, **weights).meta_params
            return own_loss(lam, index[0], weights["support_weights"])  # its task's mean query loss

        finite_difference = (value(h) - value(-h)) / (2 * h)
        np.testing.assert_allclose(score, finite_difference, rtol=1e-6, atol=1e-10)
    assert np.all(result.tasks < 0)  # −(1/n) gᵀ(H)⁻¹g with H positive definite here
    chunked = metaif.self_influence(
        PROBLEM, LAM, TASKS, solver=metaif.solvers.CG(damping=0.0, tol=1e-13, maxiter=100), chunk_size=4
    )
    for a, b in zip(result[:3], chunked[:3]):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-13)


def mixed_predict(params, meta_params, example):
    """Logits that use λ directly as well as θ, so both parts of the attribution are non-zero."""
    return problems.linear_logits(params, example["x"]) + 0.5 * problems.linear_logits(meta_params, example["x"])


def test_new_task_influence_parts_add_up_and_match_finite_differences(LAM):
    support = jax.tree.map(lambda x: x[1], TEST.support)
    inputs = jax.tree.map(lambda x: x[1], TEST.query)
    result = metaif.new_task_influence(PROBLEM, LAM, TASKS, support, mixed_predict, inputs)
    assert result.predictions.shape == (Q, WAYS) and result.tasks.shape == (Q, WAYS, N)
    assert result.support.shape == (Q, WAYS, N, M) and result.query.shape == (Q, WAYS, N, Q)
    for total, meta, adapt in zip(result[2:5], result.through_meta, result.through_adaptation):
        np.testing.assert_allclose(total, meta + adapt, rtol=1e-12, atol=1e-14)
        assert np.max(np.abs(meta)) > 1e-4 and np.max(np.abs(adapt)) > 1e-4
    # the through-adaptation part is adapted_influence on g(θ) = predict(θ, λ*, x)
    g = lambda theta: mixed_predict(theta, LAM, jax.tree.map(lambda x: x[2], inputs))[1]
    adapted = metaif.adapted_influence(PROBLEM, LAM, TASKS, support, target=g)
    np.testing.assert_allclose(result.through_adaptation[0][2, 1], adapted.tasks, rtol=1e-9, atol=1e-13)
    # total against finite differences of the re-solved meta-optimum
    h = 1e-4

    def prediction(delta):
        lam = metaif.newton_refine(PROBLEM, LAM, TASKS, steps=6, task_weights=jnp.ones(N).at[3].add(delta)).meta_params
        theta = metaif.adapt(PROBLEM, lam, support)
        return jax.vmap(mixed_predict, in_axes=(None, None, 0))(theta, lam, inputs)

    np.testing.assert_allclose(result.tasks[..., 3], (prediction(h) - prediction(-h)) / (2 * h), rtol=1e-6, atol=1e-10)


def test_top_k_agrees_with_a_full_sort(LAM):
    scores = metaif.influence(PROBLEM, LAM, TASKS, target=lambda lam: targets(lam)[0])
    for array in (scores.tasks, scores.support, scores.query):
        explanation = metaif.explain.top_k(array, 4)
        flat = np.asarray(array).ravel()
        order = np.argsort(flat)
        np.testing.assert_array_equal(explanation.proponents.score, flat[order[:4]])
        np.testing.assert_array_equal(explanation.opponents.score, flat[order[::-1][:4]])
        picked = np.asarray(array)[tuple(explanation.opponents.index.T)]
        np.testing.assert_array_equal(picked, explanation.opponents.score)
        assert "removing the datum changes f by about −score" in explanation.convention
    everything = metaif.explain.top_k(scores.support, 10_000)
    assert len(everything.proponents.score) == N * M
    assert "rank" in metaif.explain.task_table(metaif.explain.top_k(scores.tasks, 2))


def test_plot_examples_draws_images():
    import matplotlib  # a dependency: no skip

    matplotlib.use("Agg")
    images = np.random.default_rng(0).random((N, M, 5, 5))
    scores = np.random.default_rng(1).normal(size=(N, M))
    fig = metaif.explain.plot_examples(metaif.explain.top_k(scores, 3), images)
    assert len(fig.axes) == 6
    matplotlib.pyplot.close(fig)


@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda lam: jnp.sum(lam["w"]), "1-D array"),
        (lambda lam: jnp.zeros((0,)), "non-empty"),
        ("loss", "targets must be a function"),
    ],
)
def test_pairwise_rejects_bad_targets(bad, match, LAM):
    with pytest.raises((ValueError, TypeError), match=match):
        metaif.pairwise_influence(PROBLEM, LAM, TASKS, bad)


def test_bad_arguments_are_named(LAM):
    with pytest.raises(ValueError, match="method"):
        metaif.pairwise_influence(PROBLEM, LAM, TASKS, targets, method="fast")
    with pytest.raises(ValueError, match="target_chunk_size"):
        metaif.pairwise_influence(PROBLEM, LAM, TASKS, targets, target_chunk_size=0)
    with pytest.raises(ValueError, match="scores must be"):
        metaif.explain.top_k(np.zeros((2, 2, 2)), 1)
    with pytest.raises(ValueError, match="non-finite"):
        metaif.explain.top_k(np.array([1.0, np.nan]), 1)
    with pytest.raises(ValueError, match="support must have the structure"):
        metaif.new_task_influence(PROBLEM, LAM, TASKS, {"z": jnp.zeros((3, DIM))}, mixed_predict, TEST.query)
