"""Transform invariances (testing ladder, rung 5): the same numbers whatever the transformation.

* jit vs no jit (`jax.disable_jit`), and a user's own `jax.jit` around the public functions;
* all tasks at once (vmap inside the library) vs task by task in a Python loop, against a dense
  Hessian oracle;
* scores with a target vs the no-target influence pytrees contracted with the target gradient;
* no recompilation for same-shaped inputs, a rebuilt equal problem and the same target object;
* `TaskSet` as a pytree;
* float32 vs float64 within a stated tolerance.

Problems are tiny (3 to 4 tasks, 3 support and query examples, 2 or 3 features).
"""

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import metaif
from metaif import problems
from metaif._objective import Weights, objective

# Invariances hold at any λ: these tests use untrained meta-parameters on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::metaif.NonStationaryWarning")

N, M, Q, DIM = 4, 3, 3, 2
WAYS = 3

ADAPTS = {
    # Dense inner solves: the same implicit-derivative machinery as the default CG, with about half
    # the compile time (the no-jit test below covers CG).
    "proximal": metaif.Proximal(reg=1.0, steps=40, lr=0.3, inner_solve="dense"),
    "unrolled": metaif.Unrolled(steps=3, lr=0.2),
}


class Case(NamedTuple):
    problem: metaif.BilevelProblem
    meta: dict
    tasks: metaif.TaskSet
    test_tasks: metaif.TaskSet
    target: Callable


def meta_test_loss(problem, test_tasks):
    """The usual target: mean query loss of held-out tasks after adaptation."""
    return lambda meta_params: metaif.task_losses(problem, meta_params, test_tasks).mean()


def regression(adapt, n=N, meta_reg=0.1, seed=0):
    tasks, _ = problems.regression_tasks(n, M, Q, DIM, seed=seed)
    test_tasks, _ = problems.regression_tasks(2, M, Q, DIM, seed=seed + 100)
    problem = metaif.BilevelProblem(problems.squared_loss, problems.squared_loss, adapt, meta_reg=meta_reg)
    meta = {"w": jnp.asarray(np.random.default_rng(seed).normal(size=DIM) * 0.3)}
    return Case(problem, meta, tasks, test_tasks, meta_test_loss(problem, test_tasks))


@functools.lru_cache(maxsize=None)
def classification(kind) -> Case:
    """Linear softmax tasks with two-leaf meta-parameters {"w": [3, 3], "b": [3]} (built once per
    kind, so compiled code is shared between tests). meta_reg > 0 removes the softmax shift
    invariance, so the total Hessian is invertible."""
    tasks = problems.classification_tasks(N, M, Q, DIM + 1, WAYS, seed=0)
    test_tasks = problems.classification_tasks(2, M, Q, DIM + 1, WAYS, seed=100)
    problem = metaif.BilevelProblem(
        problems.linear_cross_entropy, problems.linear_cross_entropy, ADAPTS[kind], meta_reg=0.1
    )
    meta = problems.linear_init(jax.random.key(0), DIM + 1, WAYS)
    shift = problems.linear_init(jax.random.key(1), DIM + 1, WAYS)
    meta = jax.tree.map(lambda leaf, s: leaf + 30.0 * s, meta, shift)  # away from the symmetric start
    return Case(problem, meta, tasks, test_tasks, meta_test_loss(problem, test_tasks))


@functools.lru_cache(maxsize=None)
def classification_influence(kind) -> tuple[metaif.Influence, metaif.Influence]:
    """(influence on the meta-parameters, influence on the case's target), computed once."""
    case = classification(kind)
    return (
        metaif.influence(case.problem, case.meta, case.tasks),
        metaif.influence(case.problem, case.meta, case.tasks, target=case.target),
    )


def flat(tree):
    return ravel_pytree(tree)[0]


def assert_tree_close(actual, expected, rtol, atol):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert a.shape == e.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol)


def contract(influence_tree, gradient, batch_ndim):
    """Σ over parameter leaves of ⟨I_λ[..., :], ∇f⟩ for pytrees with `batch_ndim` leading axes."""
    parts = [
        jnp.tensordot(leaf, g, axes=g.ndim)
        for leaf, g in zip(jax.tree.leaves(influence_tree), jax.tree.leaves(gradient))
    ]
    assert all(p.ndim == batch_ndim for p in parts)
    return sum(parts[1:], parts[0])


# ----------------------------------------------------------------------------- jit vs no jit


@pytest.mark.parametrize(
    "adapt",
    # Eager execution compiles every primitive separately (~10 s here); few inner steps suffice, as
    # exact convergence is irrelevant to this identity. Proximal keeps its default CG inner solve.
    [metaif.Proximal(reg=1.0, steps=3, lr=0.3), metaif.Unrolled(steps=3, lr=0.2)],
    ids=["proximal", "unrolled"],
)
def test_influence_with_and_without_jit(adapt):
    case = regression(adapt, n=3)
    jitted = metaif.influence(case.problem, case.meta, case.tasks, target=case.target)
    with jax.disable_jit():
        eager = metaif.influence(case.problem, case.meta, case.tasks, target=case.target)
    for level in ("tasks", "support", "query", "objective", "grad_norm"):
        np.testing.assert_allclose(getattr(eager, level), getattr(jitted, level), rtol=1e-10, atol=1e-10, err_msg=level)
    assert bool(eager.solve.converged) and bool(jitted.solve.converged)


# ----------------------------------------------------------------------------- all tasks vs one by one


def test_meta_objective_is_differentiable():
    case = regression(ADAPTS["unrolled"])
    public = jax.grad(lambda lam: metaif.meta_objective(case.problem, lam, case.tasks))(case.meta)
    ones = Weights.ones(N, M, Q, jnp.float64)
    private = jax.grad(lambda lam: objective(case.problem, lam, case.tasks, ones))(case.meta)
    assert_tree_close(public, private, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["proximal", "unrolled"])
def test_task_influence_matches_per_task_loop(kind):
    """I_λ(t_k) = −H⁻¹ (1/n) ∇_λ L_k, with H the dense Hessian of F and ∇L_k from task k alone."""
    problem, meta, tasks, _, _ = classification(kind)
    n = tasks.n_tasks
    influence = metaif.task_influence(problem, meta, tasks)
    for leaf, like in zip(jax.tree.leaves(influence), jax.tree.leaves(meta)):
        assert leaf.shape == (n, *like.shape)

    flat_meta, unravel = ravel_pytree(meta)
    hessian = np.asarray(jax.jit(jax.hessian(lambda x: metaif.meta_objective(problem, unravel(x), tasks)))(flat_meta))
    np.testing.assert_allclose(hessian, hessian.T, rtol=1e-8, atol=1e-10)
    # ∇L_k from task k alone (without meta_reg), compiled once for every k
    one_task_gradient = jax.jit(jax.grad(lambda x, task: metaif.task_losses(problem, unravel(x), task)[0]))
    for k in range(n):
        gradient_k = np.asarray(one_task_gradient(flat_meta, tasks[k : k + 1]))
        expected = -np.linalg.solve(hessian, gradient_k / n)
        actual = np.asarray(flat(jax.tree.map(lambda leaf: leaf[k], influence)))
        np.testing.assert_allclose(actual, expected, rtol=1e-7, atol=1e-10 * np.abs(expected).max())

    # The all-levels call gives the same task influence.
    assert_tree_close(classification_influence(kind)[0].tasks, influence, rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------- target vs contraction


@pytest.mark.parametrize("kind", ["proximal", "unrolled"])
def test_target_scores_are_contractions_of_parameter_influence(kind):
    case = classification(kind)
    on_params, on_target = classification_influence(kind)
    gradient = jax.grad(case.target)(case.meta)
    assert on_target.tasks.shape == (N,) and on_target.support.shape == (N, M) and on_target.query.shape == (N, Q)
    for level, batch_ndim in (("tasks", 1), ("support", 2), ("query", 2)):
        expected = contract(getattr(on_params, level), gradient, batch_ndim)
        actual = getattr(on_target, level)
        scale = np.abs(np.asarray(expected)).max()
        np.testing.assert_allclose(actual, expected, rtol=1e-8, atol=1e-10 * scale, err_msg=level)
    np.testing.assert_allclose(on_target.objective, on_params.objective, rtol=1e-13)
    np.testing.assert_allclose(on_target.grad_norm, on_params.grad_norm, rtol=1e-10)
    # Same compiled core, same numbers, through the other entry points.
    np.testing.assert_allclose(
        metaif.task_influence(case.problem, case.meta, case.tasks, target=case.target), on_target.tasks, rtol=1e-12
    )
    instances = metaif.instance_influence(case.problem, case.meta, case.tasks, target=case.target)
    np.testing.assert_allclose(instances.support, on_target.support, rtol=1e-12)
    np.testing.assert_allclose(instances.query, on_target.query, rtol=1e-12)


# ----------------------------------------------------------------------------- no recompilation


def test_no_recompile_for_same_shapes_and_equal_problem():
    """Every jitted function an influence call uses, counted by JAX's compile events
    (test_no_recompile.count_compiles): new values of the same shapes compile nothing."""
    from test_no_recompile import count_compiles

    case = classification("unrolled")
    classification_influence("unrolled")  # compiled (at most) once here
    problem, meta, tasks, target = case.problem, case.meta, case.tasks, case.target
    other_meta = jax.tree.map(lambda leaf: leaf + 0.25, meta)
    other_tasks = problems.classification_tasks(N, M, Q, DIM + 1, WAYS, seed=7)
    rebuilt = metaif.BilevelProblem(
        problem.inner_loss, problem.outer_loss, metaif.Unrolled(steps=3, lr=0.2), meta_reg=problem.meta_reg
    )
    assert rebuilt == problem and hash(rebuilt) == hash(problem) and rebuilt is not problem
    metaif.influence(problem, meta, tasks, target=target)
    metaif.influence(problem, other_meta, other_tasks)
    metaif.influence(rebuilt, meta, other_tasks, solver=metaif.solvers.Dense())
    with count_compiles() as compiled:
        first = metaif.influence(problem, meta, tasks, target=target)
        second = metaif.influence(problem, other_meta, other_tasks, target=target)
        metaif.influence(problem, other_meta, other_tasks)
        metaif.influence(rebuilt, other_meta, tasks, target=target)
        metaif.influence(rebuilt, meta, other_tasks, solver=metaif.solvers.Dense())  # the default solver, rebuilt
    assert compiled == []
    assert not np.allclose(first.tasks, second.tasks)  # the new values were used

    # Control: a new target object (same code) is new code to JAX: the call compiles again.
    with count_compiles() as compiled:
        metaif.influence(problem, meta, tasks, target=meta_test_loss(problem, case.test_tasks))
    assert compiled


# ----------------------------------------------------------------------------- TaskSet as a pytree


def test_taskset_is_a_pytree():
    tasks = problems.classification_tasks(5, 4, 3, DIM, WAYS)
    assert (tasks.n_tasks, tasks.n_support, tasks.n_query) == (5, 4, 3)
    assert len(jax.tree.leaves(tasks)) == 4

    doubled = jax.tree.map(lambda leaf: leaf * 2, tasks)
    assert isinstance(doubled, metaif.TaskSet)
    np.testing.assert_array_equal(doubled.support["x"], 2 * tasks.support["x"])

    placed = jax.device_put(tasks, jax.devices()[0])
    assert isinstance(placed, metaif.TaskSet)
    assert jax.tree.structure(placed) == jax.tree.structure(tasks)

    sliced = tasks[1:3]
    assert isinstance(sliced, metaif.TaskSet)
    assert (sliced.n_tasks, sliced.n_support, sliced.n_query) == (2, 4, 3)
    assert sliced.support["x"].shape == (2, 4, DIM) and sliced.query["y"].shape == (2, 3)
    np.testing.assert_array_equal(sliced.query["x"], tasks.query["x"][1:3])

    picked = tasks[np.array([4, 0])]
    assert isinstance(picked, metaif.TaskSet) and picked.n_tasks == 2
    np.testing.assert_array_equal(picked.support["y"], tasks.support["y"][np.array([4, 0])])

    leaves, treedef = jax.tree.flatten(tasks)
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert isinstance(rebuilt, metaif.TaskSet)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), rebuilt, tasks))

    # Through jit (as an argument) and vmap (over the task axis).
    counts = jax.jit(lambda ts: (ts.n_tasks, jnp.sum(ts.query["y"])))(tasks)
    assert counts[0] == 5
    per_task = jax.vmap(lambda ts: jnp.sum(ts.support["x"]))(tasks)
    assert per_task.shape == (5,)


# ----------------------------------------------------------------------------- float32 vs float64


def cast(tree, dtype):
    return jax.tree.map(lambda leaf: leaf.astype(dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf, tree)


@pytest.mark.parametrize("kind", ["proximal", "unrolled"])
def test_float32_agrees_with_float64(kind):
    """Stated tolerance: task, support and query scores computed in float32 (data, meta-parameters
    and target all cast; integer labels kept) are within 1e-4 of the float64 scores, relative to
    the largest float64 score of that level (observed: below 1e-6; H's condition number is about 4)."""
    case = classification(kind)
    reference = classification_influence(kind)[1]
    test32 = cast(case.test_tasks, jnp.float32)
    target32 = meta_test_loss(case.problem, test32)
    low = metaif.influence(case.problem, cast(case.meta, jnp.float32), cast(case.tasks, jnp.float32), target=target32)
    for level in ("tasks", "support", "query"):
        a, b = getattr(low, level), getattr(reference, level)
        assert a.dtype == jnp.float32 and b.dtype == jnp.float64, level
        scale = float(np.abs(b).max())
        np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=1e-4, atol=1e-4 * scale, err_msg=level)
    np.testing.assert_allclose(float(low.objective), float(reference.objective), rtol=1e-5)
    assert low.objective.dtype == jnp.float32


# ----------------------------------------------------------------------------- the user's own jit


def test_user_jit_matches_eager():
    """Tracers pass the boundary checks (value checks are skipped, shape checks are not)."""
    case = classification("proximal")
    eager = classification_influence("proximal")[1]

    @jax.jit  # one compilation for all three calls
    def jitted(lam, task_set):
        tasks_scores = metaif.influence(case.problem, lam, case.tasks, target=case.target).tasks  # tasks closed over
        instances = metaif.instance_influence(case.problem, lam, task_set, target=case.target)  # tasks traced
        return tasks_scores, instances.support, instances.query, metaif.meta_objective(case.problem, lam, task_set)

    tasks_scores, support, query, value = jitted(case.meta, case.tasks)
    np.testing.assert_allclose(tasks_scores, eager.tasks, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(support, eager.support, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(query, eager.query, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(value, eager.objective, rtol=1e-13)


def test_user_jit_skips_value_checks_but_keeps_shape_checks():
    case = regression(ADAPTS["unrolled"])
    nan_meta = {"w": jnp.array([jnp.nan, 0.0])}
    with pytest.raises(ValueError, match="meta_params must be finite"):
        metaif.influence(case.problem, nan_meta, case.tasks, target=case.target)
    # Under tracing the values are unknown: no error, the NaN propagates to the scores.
    scores = jax.jit(lambda lam: metaif.influence(case.problem, lam, case.tasks, target=case.target).tasks)(nan_meta)
    assert scores.shape == (N,) and not np.all(np.isfinite(scores))
    # Shapes are known while tracing, so shape errors still surface.
    with pytest.raises(ValueError, match=r"target must return a scalar"):
        jax.jit(lambda lam: metaif.influence(case.problem, lam, case.tasks, target=lambda x: x["w"]).tasks)(case.meta)
