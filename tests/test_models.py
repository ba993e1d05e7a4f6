"""metaif.models: Flax NNX reference models (MLP, Conv4) made pure by `from_nnx`.

Truth: the NNX module called directly, a hand-written MLP and cross-entropy, central finite
differences, and an independent dense oracle of the target scores −∂_ω[vᵀ∇_λF] built from
jax.hessian/jax.grad on a hand-written unrolled meta-objective. Sizes are tiny (Conv4 with 4-8
filters, 2-3 tasks of 2 examples) because compiling third derivatives through four conv blocks
dominates the time.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import metaif
from metaif import models

F64 = jnp.float64
WAYS = 3


def few_shot_tasks(n, m, q, image, seed):
    """Random few-shot-shaped tasks: {"x": [n, k, *image] in [0, 1), "y": [n, k] int32}."""
    rng = np.random.default_rng(seed)
    sample = lambda k: {
        "x": jnp.asarray(rng.uniform(size=(n, k, *image))),
        "y": jnp.asarray(rng.integers(0, WAYS, (n, k)), jnp.int32),
    }
    return metaif.TaskSet(sample(m), sample(q))


def example(x, y):
    return {"x": x, "y": jnp.asarray(y, jnp.int32)}


# Shared models (built once: PureModels hash by identity, so reuse keeps the jit caches warm).
MLP = models.MLP((28, 28), (2,), WAYS, activation=jnp.tanh, param_dtype=F64, rngs=nnx.Rngs(0))  # 1,579 parameters
PURE_MLP = models.from_nnx(MLP)
CONV = models.Conv4((28, 28), WAYS, filters=8, param_dtype=F64, rngs=nnx.Rngs(1))
PURE_CONV = models.from_nnx(CONV)
CONV_GROUP = models.Conv4(
    (14, 14, 1), WAYS, filters=8, blocks=2, norm="group", groups=2, param_dtype=F64, rngs=nnx.Rngs(2)
)
PURE_CONV_GROUP = models.from_nnx(CONV_GROUP)
X28 = jnp.asarray(np.random.default_rng(0).uniform(size=(3, 28, 28)))
X14 = jnp.asarray(np.random.default_rng(1).uniform(size=(3, 14, 14, 1)))

TASKS = few_shot_tasks(3, 2, 2, (28, 28), seed=0)
TEST = few_shot_tasks(2, 2, 2, (28, 28), seed=1)


# One unrolled step; damping above the total Hessian's negative curvature (min eigenvalue ≈ −6.3
# at this random λ) so that CG converges and the oracle's dense solve is well conditioned.
LR, DAMPING = 0.1, 8.0


def _hand_mlp_loss(params, x, y):
    """Cross-entropy of the tanh MLP written by hand (not through NNX)."""
    layers = params["layers"]
    logits = jnp.tanh(x.reshape(-1) @ layers[0]["kernel"] + layers[0]["bias"]) @ layers[1]["kernel"] + layers[1]["bias"]
    return jax.nn.logsumexp(logits) - logits[y]


def _oracle_objective(lam, tasks, t, a, b):
    """F(λ; t, a, b) with one unrolled step, written without metaif."""

    def one(sx, sy, qx, qy, a_i, b_i):
        inner = lambda th: jnp.mean(a_i * jax.vmap(_hand_mlp_loss, in_axes=(None, 0, 0))(th, sx, sy))
        theta = jax.tree.map(lambda p, g: p - LR * g, lam, jax.grad(inner)(lam))
        return jnp.mean(b_i * jax.vmap(_hand_mlp_loss, in_axes=(None, 0, 0))(theta, qx, qy))

    losses = jax.vmap(one)(tasks.support["x"], tasks.support["y"], tasks.query["x"], tasks.query["y"], a, b)
    return jnp.mean(t * losses)


def _ones(tasks):
    return jnp.ones(tasks.n_tasks), jnp.ones((tasks.n_tasks, tasks.n_support)), jnp.ones((tasks.n_tasks, tasks.n_query))


def assert_close(a, b, rtol=1e-12, atol=1e-12):
    chex.assert_trees_all_close(a, b, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- apply and params


@pytest.mark.parametrize("norm", [None, "layer", "group"])
def test_apply_equals_calling_the_module(norm):
    conv = models.Conv4(
        (14, 14, 1),
        WAYS,
        filters=8,
        blocks=2,
        norm=norm,
        groups=2,
        pool_padding="SAME" if norm is None else "VALID",
        param_dtype=F64,
        rngs=nnx.Rngs(3),
    )
    for module, x in ((MLP, X28), (conv, X14)):
        pure = models.from_nnx(module)
        out = pure.apply(pure.params, x)
        assert out.shape == (3, WAYS) and out.dtype == F64
        assert_close(out, module(x), rtol=0, atol=0)
        assert_close(pure.apply(pure.params, x[0]), module(x)[0], rtol=1e-13)  # one example: logits [ways]
    # [28, 28] and [28, 28, 1] are both one example; extra leading axes are batch axes.
    assert_close(PURE_MLP.apply(PURE_MLP.params, X28[0][..., None]), MLP(X28)[0], rtol=1e-13)
    assert_close(PURE_CONV.apply(PURE_CONV.params, X28[:2, None, ..., None]), CONV(X28[:2])[:, None], rtol=1e-12)


def test_params_round_trip_through_nnx_merge():
    params = PURE_CONV.params
    assert jax.tree.structure(params) == jax.tree.structure(nnx.to_pure_dict(nnx.state(CONV, nnx.Param)))
    assert all(isinstance(leaf, jax.Array) and leaf.dtype == F64 for leaf in jax.tree.leaves(params))
    # Changed parameters: the pure apply equals an NNX module updated in place with them.
    doubled = jax.tree.map(lambda p: 2.0 * p, params)
    reference = nnx.clone(CONV)
    state = nnx.state(reference, nnx.Param)
    nnx.replace_by_pure_dict(state, doubled)
    nnx.update(reference, state)
    assert_close(PURE_CONV.apply(doubled, X28), reference(X28), rtol=0, atol=0)
    rebuilt = PURE_CONV.to_module(doubled)
    assert_close(nnx.to_pure_dict(nnx.state(rebuilt, nnx.Param)), doubled, rtol=0, atol=0)
    graphdef, param_state, rest = nnx.split(rebuilt, nnx.Param, ...)
    assert_close(nnx.to_pure_dict(param_state), doubled, rtol=0, atol=0)
    assert_close(nnx.merge(graphdef, param_state, rest)(X28), reference(X28), rtol=0, atol=0)
    # The source module and the PureModel's own params are untouched; an nnx.State is accepted too.
    assert_close(nnx.to_pure_dict(nnx.state(CONV, nnx.Param)), params, rtol=0, atol=0)
    assert_close(PURE_CONV.apply(nnx.state(CONV, nnx.Param), X28), CONV(X28), rtol=0, atol=0)


def test_losses_match_hand_written_and_compose_for_gauss_newton():
    """Cross-entropy against a hand-written MLP and log-sum-exp; squared error by hand; the
    GaussNewton split (predict, output_loss) composes to the loss; losses hash stably."""
    p = PURE_MLP.params
    hidden = jnp.tanh(X28.reshape(3, -1) @ p["layers"][0]["kernel"] + p["layers"][0]["bias"][None])
    logits = hidden @ p["layers"][1]["kernel"] + p["layers"][1]["bias"][None]
    labels = np.array([2, 0, 1])
    loss = PURE_MLP.cross_entropy
    for i, y in enumerate(labels):
        z = example(X28[i], y)
        by_hand = np.log(np.sum(np.exp(np.asarray(logits[i])))) - float(logits[i, y])
        np.testing.assert_allclose(loss(p, p, z), by_hand, rtol=1e-13)
        assert_close(loss.predict(p, p, z), logits[i], rtol=1e-13)
        assert loss.output_loss(loss.predict(p, p, z), z) == loss(p, p, z)
        target = {"x": X28[i], "y": jnp.arange(WAYS, dtype=F64)}
        np.testing.assert_allclose(
            PURE_MLP.squared_error(p, p, target),
            0.5 * np.sum((np.asarray(logits[i]) - np.arange(WAYS)) ** 2),
            rtol=1e-13,
        )
    gn = loss.gauss_newton()
    assert (
        isinstance(gn, metaif.curvature.GaussNewton)
        and gn.predict == PURE_MLP.predict
        and gn.output_loss is models.softmax_cross_entropy
    )
    gn.check(
        metaif.BilevelProblem(loss, loss, metaif.Unrolled(steps=1, lr=LR)), p, TASKS
    )  # metaif's own split check passes
    # Static-friendly: fresh accesses are equal and hash equally, so problems rebuilt from them hit the jit cache.
    assert PURE_MLP.cross_entropy == loss and hash(PURE_MLP.cross_entropy) == hash(loss)
    assert PURE_MLP.cross_entropy != PURE_CONV.cross_entropy and PURE_MLP.cross_entropy != PURE_MLP.squared_error
    make = lambda: metaif.BilevelProblem(
        PURE_MLP.cross_entropy, PURE_MLP.cross_entropy, metaif.Unrolled(steps=1, lr=0.1)
    )
    assert make() == make() and hash(make()) == hash(make())
    # add_batch_axis: a module that only takes batches gets [1, ...] and its outputs lose the axis.
    batched = models.from_nnx(MLP, add_batch_axis=True)
    assert_close(batched.cross_entropy(p, p, example(X28[1], 0)), loss(p, p, example(X28[1], 0)), rtol=1e-14)


# ----------------------------------------------------------------------------- transforms


def test_grad_and_hvp_under_jit_and_vmap():
    """Per-example gradients and Hessian-vector products of a Conv4 (group norm) loss under
    jit(vmap): gradients match central differences of the loss, HVPs central differences of the
    gradient (one compiled function, evaluated at λ and λ ± h·u)."""
    pure, params = PURE_CONV_GROUP, PURE_CONV_GROUP.params
    batch = example(X14, jnp.array([0, 2, 1]))
    u = jax.tree.map(lambda p: jnp.asarray(np.random.default_rng(p.size).normal(size=p.shape)), params)

    @jax.jit
    def loss_grad_hvp(lam):
        def one(z):
            loss = lambda q: pure.cross_entropy(q, lam, z)
            value, grad = jax.value_and_grad(loss)(lam)
            return value, grad, jax.jvp(jax.grad(loss), (lam,), (u,))[1]

        return jax.vmap(one)(batch)

    shift = lambda s: jax.tree.map(lambda p, d: p + s * d, params, u)
    h = 1e-5
    (value, grad, hvp), (up, grad_up, _), (down, grad_down, _) = (loss_grad_hvp(shift(s)) for s in (0.0, h, -h))
    assert value.shape == (3,) and all(leaf.shape[0] == 3 for leaf in jax.tree.leaves(grad))
    directional = jax.vmap(lambda g: sum(jnp.sum(a * b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(u))))(grad)
    np.testing.assert_allclose(directional, (up - down) / (2 * h), rtol=1e-7)
    fd_hvp = jax.tree.map(lambda a, b: (a - b) / (2 * h), grad_up, grad_down)
    chex.assert_trees_all_close(hvp, fd_hvp, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(value, jax.vmap(lambda z: pure.cross_entropy(params, params, z))(batch), rtol=1e-13)


def test_problem_rebuilt_from_the_same_model_does_not_retrace():
    """BilevelProblem is a static jit argument: fresh problems and loss objects from one PureModel
    are equal, so a jitted function is traced once."""
    run = jax.jit(chex.assert_max_traces(n=1)(metaif.meta_objective), static_argnums=0)
    values = []
    for _ in range(2):  # a fresh BilevelProblem and fresh loss objects each time: same cache entry
        problem = metaif.BilevelProblem(PURE_MLP.cross_entropy, PURE_MLP.cross_entropy, metaif.Unrolled(steps=1, lr=LR))
        values.append(run(problem, PURE_MLP.params, TASKS))
    assert np.isfinite(values[0]) and values[0] == values[1]


def test_float32_parameters_under_strict_promotion():
    """float32 modules compute in float32 (inputs of either precision cast explicitly) and agree
    with the float64 ones on the same parameters; gradients stay float32 under jit."""
    mlp32 = models.from_nnx(models.MLP((28, 28), (2,), WAYS, activation=jnp.tanh, rngs=nnx.Rngs(0)))
    conv32 = models.from_nnx(
        models.Conv4((14, 14, 1), WAYS, filters=8, blocks=2, norm="group", groups=2, rngs=nnx.Rngs(2))
    )
    for pure32, pure64, x in ((mlp32, PURE_MLP, X28), (conv32, PURE_CONV_GROUP, X14)):
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(pure32.params))
        params32 = jax.tree.map(lambda p: p.astype(jnp.float32), pure64.params)
        logits64 = pure64.apply(pure64.params, x)
        for inputs in (x, x.astype(jnp.float32)):
            out = pure32.apply(params32, inputs)
            assert out.dtype == jnp.float32
            np.testing.assert_allclose(out, logits64, rtol=1e-4, atol=1e-5)
    z = example(X28[0].astype(jnp.float32), 1)
    value, grads = jax.jit(jax.value_and_grad(mlp32.cross_entropy))(mlp32.params, mlp32.params, z)
    assert value.dtype == jnp.float32 and all(
        leaf.dtype == jnp.float32 and np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(grads)
    )
    logits = mlp32.apply(mlp32.params, z["x"])
    np.testing.assert_allclose(value, jax.nn.logsumexp(logits) - logits[1], rtol=1e-6)


# ----------------------------------------------------------------------------- end to end


def test_end_to_end_conv4_with_cg():
    """Conv4 (4 blocks, 8 filters) on 28×28 tasks: F is finite and CG influence gives finite,
    non-zero scores. The target is ‖W_head‖², which costs no extra compilation (compiling the
    scores' third derivatives through four conv blocks already takes ~20 s of CPU here)."""
    problem = metaif.BilevelProblem(PURE_CONV.cross_entropy, PURE_CONV.cross_entropy, metaif.Unrolled(steps=1, lr=0.05))
    value = metaif.meta_objective(problem, PURE_CONV.params, TASKS)
    assert np.isfinite(value) and value > 0
    target = lambda lam: jnp.sum(jnp.square(lam["head"]["kernel"]))
    with pytest.warns(metaif.NonStationaryWarning, match="not a stationary point"):  # λ is at initialisation
        result = metaif.influence(
            problem, PURE_CONV.params, TASKS, target=target, solver=metaif.solvers.CG(damping=10.0, maxiter=8)
        )
    assert result.tasks.shape == (3,) and result.support.shape == (3, 2) and result.query.shape == (3, 2)
    for scores in (result.tasks, result.support, result.query):
        assert np.all(np.isfinite(scores)) and np.any(scores != 0)
    assert int(result.solve.iterations) >= 1 and np.isfinite(result.grad_norm)
    np.testing.assert_allclose(result.objective, value, rtol=1e-12)


def test_end_to_end_mlp_scores_equal_dense_oracle_and_finite_differences():
    """MLP on 28×28 tasks, meta-test loss target, CG: every task, support and query score equals
    −∂_ω[vᵀ∇_λF] with v = (H + δI)⁻¹∇f, where F, f and H = jax.hessian(F) come from the
    hand-written unrolled objective (no metaif, no NNX); one task and one support score also
    equal central differences of vᵀ∇_λF."""
    problem = metaif.BilevelProblem(PURE_MLP.cross_entropy, PURE_MLP.cross_entropy, metaif.Unrolled(steps=1, lr=LR))
    value = metaif.meta_objective(problem, PURE_MLP.params, TASKS)
    target = lambda lam: metaif.task_losses(problem, lam, TEST).mean()
    result = metaif.influence(
        problem,
        PURE_MLP.params,
        TASKS,
        target=target,
        solver=metaif.solvers.CG(damping=DAMPING, maxiter=100, tol=1e-12),
    )
    assert bool(result.solve.converged) and not bool(result.solve.indefinite)

    flat, unravel = ravel_pytree(PURE_MLP.params)
    ones = _ones(TASKS)
    F = lambda x, t, a, b: _oracle_objective(unravel(x), TASKS, t, a, b)
    oracle_value, H, grad_f = jax.jit(
        lambda x: (
            F(x, *ones),
            jax.hessian(F)(x, *ones),
            jax.grad(lambda y: _oracle_objective(unravel(y), TEST, *_ones(TEST)))(x),
        )
    )(flat)
    np.testing.assert_allclose([value, result.objective], oracle_value, rtol=1e-13)
    factor = jax.jit(jnp.linalg.cholesky)(H + DAMPING * jnp.eye(flat.size))
    assert np.all(np.isfinite(factor))  # H + δI is positive definite
    v = jax.scipy.linalg.cho_solve((factor, True), grad_f)
    directional = jax.jit(jax.value_and_grad(lambda t, a, b: -v @ jax.grad(F)(flat, t, a, b), argnums=(0, 1, 2)))
    _, oracle = directional(*ones)
    for got, want in zip((result.tasks, result.support, result.query), oracle):
        assert np.all(np.isfinite(got)) and np.any(got != 0)
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10 * float(np.max(np.abs(want))))

    h = 1e-4
    t, a, b = ones
    fd_task = (directional(t.at[0].add(h), a, b)[0] - directional(t.at[0].add(-h), a, b)[0]) / (2 * h)
    fd_support = (directional(t, a.at[0, 1].add(h), b)[0] - directional(t, a.at[0, 1].add(-h), b)[0]) / (2 * h)
    np.testing.assert_allclose(result.tasks[0], fd_task, rtol=1e-8)
    np.testing.assert_allclose(result.support[0, 1], fd_support, rtol=1e-6)


# ----------------------------------------------------------------------------- bad input


def _raises(error, *fragments):
    return pytest.raises(error, match="(?s)" + "".join(f"(?=.*{f})" for f in fragments))


class _NoParams(nnx.Module):
    def __call__(self, x):
        return x


class _WithBatchNorm(nnx.Module):
    def __init__(self, rngs):
        self.norm = nnx.BatchNorm(3, rngs=rngs)


def test_bad_modules_are_refused():
    with _raises(TypeError, "module must be a flax.nnx.Module", "function"):
        models.from_nnx(lambda x: x)
    with _raises(TypeError, "module", "flax.linen"):
        models.from_nnx(_LinenLike())
    with _raises(TypeError, "module", "dict"):
        models.from_nnx(PURE_MLP.params)
    with _raises(ValueError, "module must hold at least one nnx.Param", "_NoParams"):
        models.from_nnx(_NoParams())
    with _raises(ValueError, "batch", r"Conv4\(norm="):
        models.from_nnx(_WithBatchNorm(nnx.Rngs(0)))
    with _raises(TypeError, "add_batch_axis", "True or False"):
        models.from_nnx(MLP, add_batch_axis="yes")


@dataclasses.dataclass
class _LinenLike:
    def init(self, *args): ...

    def apply(self, *args): ...


def test_bad_model_arguments_are_refused():
    with _raises(ValueError, r"Conv4.image_shape", r"\(14, 14, 1\)", "SAME"):
        models.Conv4((14, 14), WAYS, filters=2, rngs=nnx.Rngs(0))
    with _raises(ValueError, r"Conv4.image_shape", r"\(H, W\)"):
        models.Conv4((2, 14, 14, 1), WAYS, rngs=nnx.Rngs(0))
    with _raises(ValueError, r"Conv4.norm", "batch"):
        models.Conv4((28, 28), WAYS, norm="batch", rngs=nnx.Rngs(0))
    with _raises(ValueError, r"Conv4.groups", "divide", "filters=8", "groups=3"):
        models.Conv4((28, 28), WAYS, filters=8, norm="group", groups=3, rngs=nnx.Rngs(0))
    with _raises(ValueError, r"MLP.hidden", "-4"):
        models.MLP(16, (-4,), WAYS, rngs=nnx.Rngs(0))
    with _raises(ValueError, r"MLP.in_shape", "0"):
        models.MLP((28, 0), (4,), WAYS, rngs=nnx.Rngs(0))


def test_bad_inputs_are_refused_with_clear_errors():
    p = PURE_CONV.params
    with _raises(ValueError, "Conv4 input x", r"\[\.\.\., 28, 28\]", r"\(3, 27, 28\)"):
        PURE_CONV.apply(p, jnp.zeros((3, 27, 28)))
    with _raises(ValueError, "MLP input x", r"\[\.\.\., 28, 28, 1\]", r"\(784,\)"):
        PURE_MLP.apply(PURE_MLP.params, jnp.zeros((784,)))
    with _raises(ValueError, "example", "'x'", "'y'", "image"):
        PURE_CONV.cross_entropy(p, p, {"image": X28[0], "y": 1})
    with _raises(TypeError, r"example\['y'\]", "integer", "float64"):
        PURE_CONV.cross_entropy(p, p, {"x": X28[0], "y": jnp.asarray(1.0)})
    with _raises(ValueError, "add_batch_axis"):
        PURE_CONV.cross_entropy(p, p, {"x": X28[:2], "y": jnp.asarray(1)})
    with _raises(ValueError, r"example\['y'\]", "outputs", r"\(3,\)"):
        PURE_CONV.squared_error(p, p, {"x": X28[0], "y": jnp.zeros(4)})
    with _raises(ValueError, "params must have the structure", "head"):
        PURE_CONV.apply({"head": p["head"]}, X28)
    with _raises(ValueError, r"params\['head'\]\['kernel'\]", r"\(8, 3\)", r"\(8, 4\)"):
        PURE_CONV.apply(dict(p, head={"bias": p["head"]["bias"], "kernel": jnp.zeros((8, 4))}), X28)
    # Through metaif: tasks whose images do not fit the model are refused before any compilation.
    problem = metaif.BilevelProblem(PURE_CONV.cross_entropy, PURE_CONV.cross_entropy, metaif.Unrolled(steps=1, lr=0.1))
    with _raises(ValueError, "problem.inner_loss failed", "Conv4 input x", r"\(14, 14\)"):
        metaif.meta_objective(problem, p, few_shot_tasks(2, 2, 2, (14, 14), seed=0))


@pytest.mark.parametrize("activation,pool,smooth", [(jax.nn.softplus, "avg", True), (jax.nn.relu, "max", False)])
def test_meta_gradient_is_smooth_only_with_a_smooth_activation_and_average_pooling(activation, pool, smooth):
    """Taylor test of the MAML meta-gradient along a random unit direction u:
    r(ε) = ‖∇F(λ + εu) − ∇F(λ) − ε H u‖ is O(ε²) for a C² network; with ReLU and max-pooling the
    inner step differentiates through switches, so ∇F jumps and r does not shrink like ε²."""
    module = models.Conv4(
        (14, 14, 1), WAYS, filters=4, blocks=2, norm="group", groups=2, activation=activation, pool=pool,
        param_dtype=F64, rngs=nnx.Rngs(3),
    )  # fmt: skip
    model = models.from_nnx(module)
    problem = metaif.BilevelProblem(model.cross_entropy, model.cross_entropy, metaif.Unrolled(1, 0.4))
    tasks = few_shot_tasks(4, 3, 3, (14, 14, 1), seed=5)
    flat, unravel = ravel_pytree(model.params)
    grad = jax.jit(lambda x: ravel_pytree(jax.grad(lambda y: metaif.meta_objective(problem, unravel(y), tasks))(x))[0])
    u = jax.random.normal(jax.random.key(0), flat.shape, F64)
    u = u / jnp.linalg.norm(u)
    hu = jax.jvp(grad, (flat,), (u,))[1]
    # r(ε)/ε² at three scales: about constant (the third derivative) for a C² network
    per_square = [
        float(jnp.linalg.norm(grad(flat + eps * u) - grad(flat) - eps * hu)) / eps**2 for eps in (1e-2, 1e-3, 1e-4)
    ]
    spread = max(per_square) / min(per_square)
    if smooth:
        assert spread < 3, per_square
    else:
        assert spread > 100, per_square
