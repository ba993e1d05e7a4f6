"""Sharded vs single-device answers on 8 fake CPU devices (run by tests/test_sharding.py).

Runs in its own process: the device count must be set before JAX starts. Prints one JSON object
on the last line of stdout: for every case, the max absolute difference from the single-device
answer and the sharding specs of the per-task outputs.

Cases (a covering design, to keep compile time low): each mesh axis type (Explicit, Auto) runs one
case with batch_size and one without; across the two axis types Proximal and Unrolled each run
with and without a target, and batch_size with and without a target. Four single-device
references (batch_size does not change the single-device answer: tests/test_curvature.py), four
sharded runs.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8 --xla_cpu_multi_thread_eigen=false"

import json  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

import metaif  # noqa: E402
from metaif import parallel, problems  # noqa: E402

N, M, Q, DIM = 16, 2, 2, 2
BATCH = 8  # 16 tasks on 8 devices, one task per device per chunk: two chunks in every shard


def affine_loss(params, meta_params, example):
    """½(x·w + b − y)², params {"w": [DIM], "b": []}: a two-leaf pytree, quick to compile."""
    return 0.5 * (example["x"] @ params["w"] + params["b"] - example["y"]) ** 2


ADAPTS = {
    "proximal": metaif.Proximal(reg=1.0, steps=100, lr=0.15, inner_solve="dense"),
    "unrolled": metaif.Unrolled(steps=2, lr=0.2),
}
# (adaptation, with target, batch_size) per axis type; the two lists complement each other.
CASES = {
    "explicit": [("proximal", True, BATCH), ("unrolled", False, None)],
    "auto": [("unrolled", True, None), ("proximal", False, BATCH)],
}

tasks, _ = problems.regression_tasks(N, M, Q, DIM, seed=0)
test_tasks, _ = problems.regression_tasks(2, M, Q, DIM, seed=100)
meta = {"w": jnp.asarray([0.3, -0.2]), "b": jnp.asarray(0.1)}
PROBLEMS = {
    name: metaif.BilevelProblem(affine_loss, affine_loss, adapt, meta_reg=0.1) for name, adapt in ADAPTS.items()
}
TARGETS = {name: (lambda lam, p=p: metaif.task_losses(p, lam, test_tasks).mean()) for name, p in PROBLEMS.items()}


def max_diff(a, b) -> float:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for x, y in pairs)


def task_specs(tree) -> list[str]:
    """The sharding specs of the leaves with a leading task axis of size N."""
    return sorted(
        {
            str(leaf.sharding.spec[0] if leaf.sharding.spec else None)
            for leaf in jax.tree.leaves(tree)
            if leaf.ndim and leaf.shape[0] == N
        }
    )


def scores(result: metaif.Influence):
    return (result.tasks, result.support, result.query)


start = time.perf_counter()
reference = {}
for name, problem in PROBLEMS.items():
    for with_target in (True, False):
        reference[name, with_target] = metaif.influence(problem, meta, tasks, TARGETS[name] if with_target else None)
reference_losses = {name: metaif.task_losses(p, meta, tasks) for name, p in PROBLEMS.items()}
reference_objective = {name: metaif.meta_objective(p, meta, tasks) for name, p in PROBLEMS.items()}
report = {"reference_s": time.perf_counter() - start, "devices": jax.device_count(), "cases": {}}

for mode, cases in CASES.items():
    mesh = parallel.task_mesh(axis_type=AxisType.Explicit if mode == "explicit" else AxisType.Auto)
    with jax.set_mesh(mesh):
        sharded_tasks = parallel.shard_tasks(tasks, mesh)
        sharded_meta = parallel.replicate(meta, mesh)
        for name, with_target, batch_size in cases:
            problem, target = PROBLEMS[name], TARGETS[name] if with_target else None
            tic = time.perf_counter()
            result = metaif.influence(problem, sharded_meta, sharded_tasks, target, chunk_size=batch_size)
            ref = reference[name, with_target]
            case = {
                "influence": max_diff(scores(result), scores(ref)),
                "diagnostics": max_diff(
                    (result.objective, result.grad_norm, result.adaptation_residual),
                    (ref.objective, ref.grad_norm, ref.adaptation_residual),
                ),
                "specs": task_specs(scores(result)),
            }
            # The thin wrappers share the compiled core of the call above.
            if with_target:
                case["task_influence"] = max_diff(
                    metaif.task_influence(problem, sharded_meta, sharded_tasks, target, chunk_size=batch_size),
                    ref.tasks,
                )
                instance = metaif.instance_influence(
                    problem, sharded_meta, sharded_tasks, target, chunk_size=batch_size
                )
                case["instance_influence"] = max_diff((instance.support, instance.query), (ref.support, ref.query))
            else:
                losses = metaif.task_losses(problem, sharded_meta, sharded_tasks)
                case["task_losses"] = max_diff(losses, reference_losses[name])
                case["specs"] = sorted(set(case["specs"]) | set(task_specs(losses)))
                case["meta_objective"] = max_diff(
                    metaif.meta_objective(problem, sharded_meta, sharded_tasks), reference_objective[name]
                )
            case["seconds"] = time.perf_counter() - tic
            report["cases"][f"{mode}/{name}/{'target' if with_target else 'params'}/batch={batch_size}"] = case

# A clear error for an indivisible task count.
errors = {}
mesh = parallel.task_mesh(axis_type=AxisType.Explicit)
try:
    parallel.shard_tasks(tasks[:12], mesh)
except ValueError as error:
    errors["indivisible"] = str(error)
# Meta-parameters left on one device are replicated onto the mesh by the public functions (as pmap
# broadcasts unmapped arguments), with the single-device answers.
with jax.set_mesh(mesh):
    one_device = jax.device_put(meta, jax.devices()[0])
    sharded = parallel.shard_tasks(tasks, mesh)
    report["unreplicated"] = {
        "task_losses": max_diff(
            metaif.task_losses(PROBLEMS["unrolled"], one_device, sharded), reference_losses["unrolled"]
        ),
        "influence": max_diff(
            scores(metaif.influence(PROBLEMS["unrolled"], one_device, sharded, TARGETS["unrolled"])),
            scores(reference["unrolled", True]),
        ),
    }
report["errors"] = errors
report["total_s"] = time.perf_counter() - start
print(json.dumps(report))
