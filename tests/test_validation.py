"""Bad input at the public boundary gets a clear ValueError or TypeError.

Every check asserts that the message names the offending argument and shows something of what was
received (a wrong shape, a dtype, a value), so a user can fix the call from the message alone.
Problems are tiny (4 tasks, 3 support and 3 query examples, 2 features): most errors are raised
before anything is compiled.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metaif
from metaif import problems

N, M, Q, DIM = 4, 3, 3, 2

TASKS, _ = problems.regression_tasks(N, M, Q, DIM, seed=0)
META = {"w": jnp.zeros((DIM,))}
ADAPT = metaif.Proximal(reg=1.0, steps=20, lr=0.3)
PROBLEM = metaif.BilevelProblem(problems.squared_loss, problems.squared_loss, ADAPT)
SUPPORT0 = jax.tree.map(lambda leaf: leaf[0], TASKS.support)


def scalar_target(meta_params):
    return jnp.sum(meta_params["w"] ** 2)


# Every public function that takes (problem, meta_params, tasks), called with defaults that keep it
# cheap. `adapt` takes one task's support set instead and is covered separately.
CALLS = {
    "task_influence": lambda p, lam, ts: metaif.task_influence(p, lam, ts),
    "instance_influence": lambda p, lam, ts: metaif.instance_influence(p, lam, ts),
    "influence": lambda p, lam, ts: metaif.influence(p, lam, ts),
    "influence_target": lambda p, lam, ts: metaif.influence(p, lam, ts, target=scalar_target),
    "adapted_influence": lambda p, lam, ts: metaif.adapted_influence(p, lam, ts, 0),
    "meta_objective": lambda p, lam, ts: metaif.meta_objective(p, lam, ts),
    "task_losses": lambda p, lam, ts: metaif.task_losses(p, lam, ts),
    "meta_train": lambda p, lam, ts: metaif.meta_train(p, lam, ts, steps=2),
    "newton_refine": lambda p, lam, ts: metaif.newton_refine(p, lam, ts, steps=1),
}
INFLUENCE_CALLS = ["task_influence", "instance_influence", "influence", "influence_target", "adapted_influence"]
# Functions that run a computation on meta_params and must refuse non-finite values or losses.
CHECKED_CALLS = INFLUENCE_CALLS + ["meta_train", "newton_refine"]


def call(name, problem=PROBLEM, meta_params=META, tasks=TASKS):
    return CALLS[name](problem, meta_params, tasks)


def call_with_adapt(name, problem=PROBLEM, meta_params=META, tasks=TASKS):
    """The (problem, meta_params, tasks) functions plus `adapt` on the first task's support set."""
    if name == "adapt":
        support = jax.tree.map(lambda leaf: leaf[0], tasks.support) if isinstance(tasks, metaif.TaskSet) else SUPPORT0
        return metaif.adapt(problem, meta_params, support)
    return call(name, problem, meta_params, tasks)


# ----------------------------------------------------------------------------- task sets


@pytest.mark.parametrize("name", list(CALLS))
def test_support_and_query_with_different_task_counts(name):
    query = jax.tree.map(lambda leaf: leaf[:3], TASKS.query)
    tasks = metaif.TaskSet(TASKS.support, query)
    with pytest.raises(ValueError, match=r"tasks\.support and tasks\.query") as error:
        call(name, tasks=tasks)
    assert "4 support tasks and 3 query tasks" in str(error.value)


@pytest.mark.parametrize("name", ["influence", "meta_objective"])
def test_leaves_that_disagree_on_leading_axes(name):
    support = dict(TASKS.support, y=TASKS.support["y"][:, :2])
    with pytest.raises(ValueError, match=r"tasks\.support leaves disagree") as error:
        call(name, tasks=metaif.TaskSet(support, TASKS.query))
    assert "(4, 2)" in str(error.value) and "(4, 3)" in str(error.value)


@pytest.mark.parametrize("name", ["influence", "meta_objective"])
def test_leaf_without_example_axis(name):
    query = dict(TASKS.query, y=TASKS.query["y"][:, 0])
    with pytest.raises(ValueError, match=r"tasks\.query leaf \['y'\] has shape \(4,\)"):
        call(name, tasks=metaif.TaskSet(TASKS.support, query))


@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize(
    "bad", [(TASKS.support, TASKS.query), {"support": TASKS.support, "query": TASKS.query}], ids=["tuple", "dict"]
)
def test_tasks_not_a_taskset(name, bad):
    with pytest.raises(TypeError, match=r"tasks must be a metaif\.TaskSet") as error:
        call(name, tasks=bad)
    assert f"received {type(bad).__name__}" in str(error.value)


# ----------------------------------------------------------------------------- losses


def vector_loss(params, meta_params, example):
    """A per-example loss that forgot to reduce: shape [DIM]."""
    return 0.5 * (example["x"] * params["w"] - example["y"]) ** 2


@pytest.mark.parametrize("name", list(CALLS) + ["adapt"])
def test_inner_loss_not_scalar(name):
    problem = metaif.BilevelProblem(vector_loss, problems.squared_loss, ADAPT)
    with pytest.raises(ValueError, match=r"inner_loss must return a scalar") as error:
        call_with_adapt(name, problem=problem)
    assert f"shape ({DIM},)" in str(error.value)


@pytest.mark.parametrize("name", list(CALLS))
def test_outer_loss_not_scalar(name):
    problem = metaif.BilevelProblem(problems.squared_loss, vector_loss, ADAPT)
    with pytest.raises(ValueError, match=r"outer_loss must return a scalar") as error:
        call(name, problem=problem)
    assert f"shape ({DIM},)" in str(error.value)


def test_loss_that_fails_on_one_example():
    def wrong_key(params, meta_params, example):
        return jnp.sum(example["features"] @ params["w"])

    problem = metaif.BilevelProblem(wrong_key, problems.squared_loss, ADAPT)
    with pytest.raises(ValueError, match=r"problem\.inner_loss failed on") as error:
        metaif.influence(problem, META, TASKS)
    assert "features" in str(error.value)


@pytest.mark.parametrize("which", ["inner_loss", "outer_loss"])
@pytest.mark.parametrize("bad", [3.0, "squared"], ids=["float", "str"])
def test_non_callable_loss(which, bad):
    losses = {"inner_loss": problems.squared_loss, "outer_loss": problems.squared_loss, which: bad}
    with pytest.raises(TypeError, match=rf"BilevelProblem\.{which} must be a function") as error:
        metaif.BilevelProblem(adapt=ADAPT, **losses)
    assert repr(bad) in str(error.value)


def _flagged_tasks():
    """TaskSet whose examples carry a flag z: 1 everywhere except every example of task 2."""
    z = np.ones((N, M))
    z[2] = 0.0
    support = dict(TASKS.support, z=jnp.asarray(z))
    query = dict(TASKS.query, z=jnp.asarray(z))
    return metaif.TaskSet(support, query)


def log_flag_loss(params, meta_params, example):
    """Squared loss plus log(z): -inf on task 2's examples."""
    return problems.squared_loss(params, meta_params, example) + jnp.log(example["z"])


def divide_by_flag_loss(params, meta_params, example):
    """Squared loss divided by z: inf (and NaN gradients, so NaN adapted params) on task 2."""
    return problems.squared_loss(params, meta_params, example) / example["z"]


@pytest.mark.parametrize("name", CHECKED_CALLS)
@pytest.mark.parametrize("level", ["outer", "inner"])
def test_non_finite_losses_name_the_tasks(name, level):
    # One unrolled step: the same failure as any adaptation, at a fraction of the compile time.
    adapt = metaif.Unrolled(steps=1, lr=0.1)
    if level == "outer":
        problem = metaif.BilevelProblem(problems.squared_loss, log_flag_loss, adapt)
    else:
        problem = metaif.BilevelProblem(divide_by_flag_loss, problems.squared_loss, adapt)
    with pytest.raises(ValueError, match=r"task") as error:
        call(name, problem=problem, tasks=_flagged_tasks())
    message = str(error.value)
    assert re.search(r"tasks? \[2\]", message), message


def test_nan_loss_everywhere_names_all_tasks():
    def nan_loss(params, meta_params, example):
        return problems.squared_loss(params, meta_params, example) * jnp.log(0.0 * example["y"])

    problem = metaif.BilevelProblem(problems.squared_loss, nan_loss, ADAPT)
    with pytest.raises(ValueError, match=r"tasks \[0, 1, 2, 3\]") as error:
        metaif.task_influence(problem, META, TASKS, target=scalar_target)
    assert "not finite" in str(error.value)


# ----------------------------------------------------------------------------- meta_params


@pytest.mark.parametrize("name", CHECKED_CALLS)
@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_non_finite_meta_params(name, value):
    bad = {"w": jnp.array([0.0, value])}
    with pytest.raises(ValueError, match=r"meta_params must be finite") as error:
        call(name, meta_params=bad)
    assert "['w']" in str(error.value) and "1 NaN or inf" in str(error.value)


@pytest.mark.parametrize("name", list(CALLS) + ["adapt"])
def test_integer_meta_params(name):
    bad = {"w": jnp.zeros((DIM,), jnp.int32)}
    with pytest.raises(TypeError, match=r"meta_params must have floating-point array leaves") as error:
        call_with_adapt(name, meta_params=bad)
    assert "['w']" in str(error.value) and "int32" in str(error.value)


@pytest.mark.parametrize("name", ["influence", "meta_objective", "adapt"])
def test_empty_meta_params(name):
    with pytest.raises(ValueError, match=r"meta_params must be a pytree with at least one array leaf") as error:
        call_with_adapt(name, meta_params={})
    assert "dict {}" in str(error.value)


# ----------------------------------------------------------------------------- weights


@pytest.mark.parametrize(
    "argument, shape, expected",
    [
        ("task_weights", (3,), (N,)),
        ("task_weights", (N, 1), (N,)),
        ("support_weights", (N, 2), (N, M)),
        ("support_weights", (M,), (N, M)),
        ("query_weights", (3, Q), (N, Q)),
        ("query_weights", (N, Q, 1), (N, Q)),
    ],
)
@pytest.mark.parametrize("fn", ["meta_objective", "meta_train", "newton_refine"])
def test_weights_of_the_wrong_shape(fn, argument, shape, expected):
    kwargs = {argument: jnp.ones(shape)}
    if fn == "meta_train":
        kwargs["steps"] = 2
    with pytest.raises(ValueError, match=rf"{argument} must have shape {re.escape(str(expected))}") as error:
        getattr(metaif, fn)(PROBLEM, META, TASKS, **kwargs)
    assert f"received array of shape {shape}" in str(error.value)


@pytest.mark.parametrize("argument, shape", [("support_weights", (N, M + 1)), ("query_weights", (Q,))])
def test_task_losses_weights_of_the_wrong_shape(argument, shape):
    with pytest.raises(ValueError, match=rf"{argument} must have shape") as error:
        metaif.task_losses(PROBLEM, META, TASKS, **{argument: jnp.ones(shape)})
    assert f"received array of shape {shape}" in str(error.value)


@pytest.mark.parametrize("shape", [(M + 1,), (1, M), (N, M)])
def test_adapt_weights_of_the_wrong_shape(shape):
    with pytest.raises(ValueError, match=rf"weights must have shape \({M},\)") as error:
        metaif.adapt(PROBLEM, META, SUPPORT0, weights=jnp.ones(shape))
    assert f"received array of shape {shape}" in str(error.value)


def test_adapt_support_without_example_axis():
    support = dict(SUPPORT0, y=SUPPORT0["y"][0])
    with pytest.raises(ValueError, match=r"support") as error:
        metaif.adapt(PROBLEM, META, support)
    assert "['y']" in str(error.value)


# ----------------------------------------------------------------------------- solvers


@pytest.mark.parametrize("cls", [metaif.solvers.Dense, metaif.solvers.CG])
@pytest.mark.parametrize("damping", [-0.5, float("nan"), float("inf")])
def test_bad_damping(cls, damping):
    with pytest.raises(
        ValueError, match=rf"{cls.__name__}\.damping must be None \(default: .*\) or a finite number >= 0"
    ) as error:
        cls(damping=damping)
    assert f"received float {damping}" in str(error.value)


@pytest.mark.parametrize("maxiter", [0, -3, 2.5, True])
def test_bad_cg_maxiter(maxiter):
    with pytest.raises(ValueError, match=r"CG\.maxiter must be an int >= 1") as error:
        metaif.solvers.CG(maxiter=maxiter)
    assert f"received {type(maxiter).__name__} {maxiter!r}" in str(error.value)


@pytest.mark.parametrize("tol", [0.0, -1e-3, float("nan"), "1e-6"])
def test_bad_cg_tol(tol):
    with pytest.raises(ValueError, match=r"CG\.tol must be a finite number > 0") as error:
        metaif.solvers.CG(tol=tol)
    assert f"received {type(tol).__name__} {tol!r}" in str(error.value)


@pytest.mark.parametrize("name", INFLUENCE_CALLS)
@pytest.mark.parametrize("solver", ["dense", metaif.solvers.Dense, {"damping": 0.1}], ids=["str", "class", "dict"])
def test_solver_of_the_wrong_type(name, solver):
    calls = {
        "task_influence": lambda: metaif.task_influence(PROBLEM, META, TASKS, solver=solver),
        "instance_influence": lambda: metaif.instance_influence(PROBLEM, META, TASKS, solver=solver),
        "influence": lambda: metaif.influence(PROBLEM, META, TASKS, solver=solver),
        "influence_target": lambda: metaif.influence(PROBLEM, META, TASKS, target=scalar_target, solver=solver),
        "adapted_influence": lambda: metaif.adapted_influence(PROBLEM, META, TASKS, 0, solver=solver),
    }
    with pytest.raises(TypeError, match=r"solver must be a metaif\.solvers\.Solver") as error:
        calls[name]()
    assert f"received {type(solver).__name__}" in str(error.value)


# ----------------------------------------------------------------------------- adaptation and problem


@pytest.mark.parametrize(
    "adapt",
    ["proximal", {"reg": 1.0, "steps": 5, "lr": 0.1}, None, metaif.Proximal],
    ids=["str", "dict", "none", "class"],
)
def test_adapt_of_the_wrong_type(adapt):
    with pytest.raises(TypeError, match=r"BilevelProblem\.adapt must be an adaptation strategy") as error:
        metaif.BilevelProblem(problems.squared_loss, problems.squared_loss, adapt)
    assert f"received {type(adapt).__name__}" in str(error.value)


@pytest.mark.parametrize(
    "make, argument, shown",
    [
        (lambda: metaif.Proximal(reg=0.0, steps=5, lr=0.1), "Proximal.reg", "float 0.0"),
        (lambda: metaif.Proximal(reg=-1.0, steps=5, lr=0.1), "Proximal.reg", "float -1.0"),
        (lambda: metaif.Proximal(reg=float("nan"), steps=5, lr=0.1), "Proximal.reg", "float nan"),
        (lambda: metaif.Proximal(reg=1.0, steps=0, lr=0.1), "Proximal.steps", "int 0"),
        (lambda: metaif.Proximal(reg=1.0, steps=5.0, lr=0.1), "Proximal.steps", "float 5.0"),
        (lambda: metaif.Proximal(reg=1.0, steps=5, lr=0.0), "Proximal.lr", "float 0.0"),
        (lambda: metaif.Proximal(reg=1.0, steps=5, lr=-0.1), "Proximal.lr", "float -0.1"),
        (lambda: metaif.Proximal(reg=1.0, steps=5, lr=0.1, inner_solve="lu"), "Proximal.inner_solve", "'lu'"),
        (lambda: metaif.Proximal(reg=1.0, steps=5, lr=0.1, inner_tol=0.0), "Proximal.inner_tol", "float 0.0"),
        (lambda: metaif.Proximal(reg=1.0, steps=5, lr=0.1, inner_maxiter=0), "Proximal.inner_maxiter", "int 0"),
        (lambda: metaif.Proximal(reg=1.0, steps=5, lr=0.1, line_search=1), "Proximal.line_search", "int 1"),
        (lambda: metaif.Unrolled(steps=0, lr=0.1), "Unrolled.steps", "int 0"),
        (lambda: metaif.Unrolled(steps=2.5, lr=0.1), "Unrolled.steps", "float 2.5"),
        (lambda: metaif.Unrolled(steps=3, lr=-0.1), "Unrolled.lr", "float -0.1"),
        (lambda: metaif.Unrolled(steps=3, lr=float("inf")), "Unrolled.lr", "float inf"),
        (lambda: metaif.Unrolled(steps=3, lr="0.1"), "Unrolled.lr", "str '0.1'"),
    ],
)
def test_bad_adaptation_hyperparameters(make, argument, shown):
    with pytest.raises(ValueError, match=re.escape(argument) + " must be") as error:
        make()
    assert f"received {shown}" in str(error.value)


@pytest.mark.parametrize("meta_reg", [-0.1, float("nan")])
def test_bad_meta_reg(meta_reg):
    with pytest.raises(ValueError, match=r"BilevelProblem\.meta_reg must be a finite number >= 0") as error:
        metaif.BilevelProblem(problems.squared_loss, problems.squared_loss, ADAPT, meta_reg=meta_reg)
    assert f"received float {meta_reg}" in str(error.value)


@pytest.mark.parametrize("name", ["influence", "meta_objective", "adapt"])
def test_problem_of_the_wrong_type(name):
    bad = (problems.squared_loss, problems.squared_loss, ADAPT)
    with pytest.raises(TypeError, match=r"problem must be a metaif\.BilevelProblem") as error:
        call_with_adapt(name, problem=bad)
    assert "received tuple" in str(error.value)


# ----------------------------------------------------------------------------- targets


def vector_target(meta_params):
    return meta_params["w"] * 2.0


@pytest.mark.parametrize("name", ["influence", "task_influence", "instance_influence"])
def test_target_returning_a_vector(name):
    with pytest.raises(ValueError, match=r"target must return a scalar") as error:
        getattr(metaif, name)(PROBLEM, META, TASKS, target=vector_target)
    assert f"({DIM},)" in str(error.value)


def test_adapted_target_returning_a_vector():
    with pytest.raises(ValueError, match=r"target must return a scalar") as error:
        metaif.adapted_influence(PROBLEM, META, TASKS, 1, target=lambda params: params["w"])
    assert f"({DIM},)" in str(error.value)


@pytest.mark.parametrize("name", ["influence", "task_influence", "instance_influence"])
def test_target_not_callable(name):
    with pytest.raises(TypeError, match=r"target must be a function meta_params -> scalar") as error:
        getattr(metaif, name)(PROBLEM, META, TASKS, target=jnp.ones(()))
    assert "received array of shape ()" in str(error.value)


def test_target_that_fails():
    with pytest.raises(ValueError, match=r"target failed when called on meta_params") as error:
        metaif.influence(PROBLEM, META, TASKS, target=lambda lam: lam["b"].sum())
    assert "'b'" in str(error.value)


def test_target_with_non_finite_gradient():
    with pytest.raises(ValueError, match=r"the gradient of target at meta_params must be finite"):
        metaif.influence(PROBLEM, META, TASKS, target=lambda lam: jnp.sqrt(lam["w"][0]))


# ----------------------------------------------------------------------------- adapted_influence


@pytest.mark.parametrize("task", [N, N + 3, -N - 1, np.int64(N)], ids=["n", "n+3", "-n-1", "np.int64"])
def test_adapted_influence_task_index_out_of_range(task):
    with pytest.raises(ValueError, match=rf"task must be a training-task index in \[0, {N}\)") as error:
        metaif.adapted_influence(PROBLEM, META, TASKS, task)
    assert f"received {int(task)}" in str(error.value)


def test_adapted_influence_new_task_with_the_wrong_structure():
    with pytest.raises(ValueError, match=r"task must be an int or a support set with the structure") as error:
        metaif.adapted_influence(PROBLEM, META, TASKS, {"x": SUPPORT0["x"]})
    assert "received dict" in str(error.value)


# ----------------------------------------------------------------------------- training arguments


@pytest.mark.parametrize("batch_size", [0, N + 1, 2.0])
def test_meta_train_bad_minibatch(batch_size):
    with pytest.raises(ValueError, match=rf"minibatch must be None or an int in \[1, n_tasks={N}\]") as error:
        metaif.meta_train(PROBLEM, META, TASKS, steps=2, minibatch=batch_size)
    assert f"received {type(batch_size).__name__} {batch_size!r}" in str(error.value)


def test_meta_train_bad_optimizer():
    with pytest.raises(TypeError, match=r"optimizer must be an optax\.GradientTransformation") as error:
        metaif.meta_train(PROBLEM, META, TASKS, optimizer=optax.adam, steps=2)
    assert "received function" in str(error.value)


@pytest.mark.parametrize("fn", ["meta_train", "newton_refine"])
def test_bad_steps(fn):
    with pytest.raises(ValueError, match=r"steps must be an int >= 1") as error:
        getattr(metaif, fn)(PROBLEM, META, TASKS, steps=0)
    assert "received int 0" in str(error.value)


def test_newton_refine_negative_shift():
    with pytest.raises(ValueError, match=r"shift must be a finite number >= 0") as error:
        metaif.newton_refine(PROBLEM, META, TASKS, shift=-1.0)
    assert "received float -1.0" in str(error.value)
