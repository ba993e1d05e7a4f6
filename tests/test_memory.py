"""chunk_size="auto" (metaif/_memory.py): the working-memory estimate read from the traced program
against XLA's own buffer assignment, the chunk it picks against the memory it is given, and the
default influence call against the unchunked one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import metaif
from metaif import _boundary, _memory, models, problems
from metaif._scores import target_scores

# λ is the initialisation (these tests compare chunked against unchunked calls, not against truth).
pytestmark = [
    pytest.mark.filterwarnings("ignore::metaif.NonStationaryWarning"),
    pytest.mark.filterwarnings("ignore::metaif.solvers.IndefiniteCurvatureWarning"),
]
N = 12
TASKS = problems.classification_tasks(N, 8, 8, 16, 4, seed=0)
LAM = problems.mlp_init(jax.random.key(0), (16, 64, 64, 4))
PROBLEM = metaif.BilevelProblem(problems.mlp_cross_entropy, problems.mlp_cross_entropy, metaif.Unrolled(2, 0.1))


def xla_bytes(problem, lam, tasks, k):
    """Temporaries + outputs XLA assigns to the score pass over k tasks."""
    some = jax.tree.map(lambda x: x[:k], tasks)
    compiled = jax.jit(lambda lam, t: target_scores(problem, lam, t, lam)).lower(lam, some).compile()
    analysis = compiled.memory_analysis()
    return analysis.temp_size_in_bytes + analysis.output_size_in_bytes


def test_estimate_bounds_xla_buffers_from_above_within_a_small_factor():
    """The liveness estimate of one task is an upper bound on what XLA assigns to one task (its
    buffers are fused and reused), but not a loose one; and XLA's grows linearly with the chunk,
    which is what dividing free memory by one task's estimate assumes."""
    estimate, convolves = _memory.task_bytes(PROBLEM, LAM, TASKS)
    one, four = xla_bytes(PROBLEM, LAM, TASKS, 1), xla_bytes(PROBLEM, LAM, TASKS, 4)
    assert not convolves
    assert one <= estimate <= 8 * one, (estimate, one)
    assert 4 * estimate >= four, (estimate, four)


def test_chunk_fits_the_memory_it_is_given():
    per_task, _ = _memory.task_bytes(PROBLEM, LAM, TASKS)
    assert _memory.auto_chunk_size(PROBLEM, LAM, TASKS, free_bytes=1e15) is None  # all tasks fit: vmap
    for k in (1, 3, 5):
        free = k * per_task / _memory.MEMORY_FRACTION
        chunk = _memory.auto_chunk_size(PROBLEM, LAM, TASKS, free_bytes=free * 1.001)
        assert chunk == k
    assert _memory.auto_chunk_size(PROBLEM, LAM, TASKS, free_bytes=1.0) == 1  # never below one task


def test_default_influence_resolves_auto_and_matches_the_unchunked_call(monkeypatch):
    """The default resolves at the boundary: with little free memory it chunks, and the scores are
    those of the unchunked call."""
    per_task, _ = _memory.task_bytes(PROBLEM, LAM, TASKS)
    monkeypatch.setattr(_memory, "free_device_memory", lambda device: 5 * per_task / _memory.MEMORY_FRACTION)
    options, _ = _boundary.check_options(PROBLEM, LAM, TASKS, None, None, "auto")
    assert options.chunk_size == 5
    target = lambda lam: jnp.sum(lam[-1]["b"] ** 2) + jnp.sum(lam[0]["w"][:2] ** 2)
    auto = metaif.influence(PROBLEM, LAM, TASKS, target)
    whole = metaif.influence(PROBLEM, LAM, TASKS, target, chunk_size=None)
    for a, b in zip((auto.tasks, auto.support, auto.query), (whole.tasks, whole.support, whole.query)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_auto_works_inside_a_users_jit():
    """Only shapes are read, so tracers resolve too (and the estimate is remembered)."""
    target = lambda lam: jnp.sum(lam[-1]["w"] ** 2)
    inside = jax.jit(lambda lam: metaif.task_influence(PROBLEM, lam, TASKS, target))(LAM)
    outside = metaif.task_influence(PROBLEM, LAM, TASKS, target, chunk_size=None)
    np.testing.assert_allclose(inside, outside, rtol=1e-9, atol=1e-12)


def test_convolutions_on_cpu_run_one_task_at_a_time():
    model = models.from_nnx(models.Conv4((8, 8), 3, filters=2, blocks=1, rngs=nnx.Rngs(0)))
    problem = metaif.BilevelProblem(model.cross_entropy, model.cross_entropy, metaif.Unrolled(1, 0.1))
    x = jnp.zeros((4, 3, 8, 8), jnp.float32)
    tasks = metaif.TaskSet({"x": x, "y": jnp.zeros((4, 3), jnp.int32)}, {"x": x, "y": jnp.zeros((4, 3), jnp.int32)})
    assert _memory.task_bytes(problem, model.params, tasks)[1]
    assert jax.devices()[0].platform == "cpu"
    assert _memory.auto_chunk_size(problem, model.params, tasks) == 1


@pytest.mark.parametrize("bad", ["big", 0, 2.5])
def test_bad_chunk_size_names_the_argument(bad):
    with pytest.raises(ValueError, match=r"chunk_size must be an int >= 1") as error:
        metaif.task_influence(PROBLEM, LAM, TASKS, chunk_size=bad)
    assert repr(bad) in str(error.value)
