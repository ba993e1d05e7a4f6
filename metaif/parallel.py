"""Spread tasks across devices: a 1-D device mesh over the task axis, named 'tasks'.

Every metaif computation is a `jit` of functions `vmap`ped over tasks, so data parallelism over
tasks needs no new code path: place the `TaskSet` with its task axis split over the devices,
keep the meta-parameters replicated, call the same functions under `jax.set_mesh`, and the
compiler runs each device on its own tasks. Per-task outputs (task, support and query scores,
per-task losses) come back sharded over 'tasks'; sums over tasks (F, ∇F, Hessian-vector
products) are reduced across devices by the compiler. The answers equal the single-device ones
up to rounding (differences of 1e-17 to 1e-15 measured in float64, tests/test_sharding.py).

    import jax, metaif
    from metaif import parallel

    mesh = parallel.task_mesh()                      # all devices, e.g. 8 GPUs or a TPU slice
    with jax.set_mesh(mesh):
        tasks = parallel.shard_tasks(tasks, mesh)    # n_tasks divisible by the device count
        lam = parallel.replicate(lam, mesh)
        result = metaif.influence(problem, lam, tasks, target)   # result.tasks sharded over 'tasks'

`chunk_size` still bounds memory: chunks are cut within each device's shard (each step takes
ceil(chunk_size / devices) tasks from every device), so no task data moves between devices.

Axis types. `task_mesh()` makes an Auto axis by default: the compiler propagates the shardings
of the inputs, and metaif runs on it unchanged (checked: the influence functions with every
curvature option, the Dense, CG and LiSSA solvers, `Proximal` with CG or dense inner solves,
`adapted_influence`, `meta_objective`, `task_losses`, `adapt_tasks`,
`adaptation_residual`, full-batch and minibatch `meta_train`). `AxisType.Explicit` (JAX's own
default for `jax.make_mesh`) makes shardings part of the arrays' types: metaif then makes its own
weights follow the task sharding, and two requirements follow: run under `jax.set_mesh(mesh)` and
place the meta-parameters on the mesh (`replicate`; a clear error says so otherwise). In JAX
0.10 the Explicit mode covers `influence`/`task_influence`/`instance_influence` with the default
`Exact` curvature and `Unrolled` or `Proximal(inner_solve="dense")` adaptation, `meta_objective`,
`task_losses`, `adapt_tasks`, `adaptation_residual` and full-batch `meta_train`; use Auto for the
rest (other curvature options, `Proximal(inner_solve="cg")`, `adapted_influence`, minibatch
`meta_train`, LiSSA): under Explicit axes JAX 0.10 rejects their task indexing, non-array
arguments of `vmap` and a loop constant traced inside `custom_linear_solve`.

GPUs and TPUs. On one machine with 8 GPUs (`pip install -e '.[cuda]'`), `task_mesh()` spans all
8; `task_mesh(jax.devices()[:4])` uses four. On a TPU VM the same code spans the local chips.

Several machines (multi-host GPU clusters, TPU pod slices): start one process per host and call
`jax.distributed.initialize()` first (arguments are detected on Cloud TPU and under SLURM; else
pass `coordinator_address="host0:port", num_processes=N, process_id=i`). Then `jax.devices()` lists
every device of every process and `task_mesh()` spans them all. Each process either loads the whole
TaskSet and calls `shard_tasks(tasks, mesh)` (each keeps only its own devices' tasks), or loads only
its own contiguous block of tasks and calls `shard_tasks(local_tasks, mesh, process_local=True)`.
Outputs are global arrays; `jax.experimental.multihost_utils.process_allgather(x, tiled=True)`
gathers them on every host. `benchmarks/distributed_example.py` is a runnable example (two CPU
processes on one machine stand in for two hosts).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from . import _problem, _validate
from ._batching import TASK_AXIS
from ._problem import TaskSet

PyTree = Any

__all__ = ["TASK_AXIS", "replicate", "shard_tasks", "task_mesh", "task_sharding"]


def task_mesh(devices: Sequence[jax.Device] | None = None, *, axis_type: AxisType = AxisType.Auto) -> Mesh:
    """A 1-D mesh over `devices` (default: all devices of all processes) with one axis 'tasks'.

    Args:
      devices: the devices to use, in order (for example `jax.devices()[:4]`).
      axis_type: `jax.sharding.AxisType.Auto` (default; the compiler propagates shardings) or
        `AxisType.Explicit` (shardings are part of array types; see the module docstring).
    """
    if not isinstance(axis_type, AxisType) or axis_type not in (AxisType.Explicit, AxisType.Auto):
        raise ValueError(
            "axis_type must be jax.sharding.AxisType.Explicit or AxisType.Auto; received "
            f"{_validate.describe(axis_type)}."
        )
    if devices is None:
        devices = jax.devices()
    if (
        isinstance(devices, (str, bytes))
        or not isinstance(devices, (Sequence, np.ndarray))
        or not all(isinstance(d, jax.Device) for d in devices)
        or len(devices) == 0
    ):
        raise TypeError(
            "devices must be None or a non-empty sequence of jax.Device objects such as "
            f"jax.devices()[:4]; received {_validate.describe(devices)}."
        )
    if len(set(devices)) != len(devices):
        raise ValueError(f"devices must not repeat a device; received {list(devices)}.")
    return Mesh(np.asarray(devices, dtype=object), (TASK_AXIS,), axis_types=(axis_type,))


def _describe(value: Any) -> str:
    if isinstance(value, Mesh):  # has .shape but no .dtype, which _validate.describe expects
        return f"a Mesh with axes {dict(value.shape)}"
    return _validate.describe(value)


def _check_mesh(mesh: Any) -> None:
    if not isinstance(mesh, Mesh) or TASK_AXIS not in mesh.axis_names:
        raise TypeError(
            f"mesh must be a jax.sharding.Mesh with an axis named {TASK_AXIS!r}, such as "
            f"metaif.parallel.task_mesh(); received {_describe(mesh)}."
        )


def task_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding that splits a leading task axis over the mesh's 'tasks' axis."""
    _check_mesh(mesh)
    return NamedSharding(mesh, PartitionSpec(TASK_AXIS))


def shard_tasks(tasks: TaskSet, mesh: Mesh, *, process_local: bool = False) -> TaskSet:
    """The TaskSet with its task axis split over the mesh's 'tasks' axis (device d holds the d-th
    contiguous block of n / devices tasks; the example axes stay whole).

    Args:
      tasks: the `TaskSet`; n_tasks must be divisible by the number of devices on the 'tasks'
        axis (padding with extra tasks would change F's fixed denominator n).
      mesh: a mesh with an axis 'tasks' (`task_mesh()`).
      process_local: multi-process only. False: every process passes the same whole TaskSet.
        True: each process passes only its own contiguous block of tasks (n / processes of
        them, in process order), assembled into global arrays without copying between hosts.
    """
    sharding = task_sharding(mesh)
    n, _, _ = _problem.check_tasks(tasks)
    devices = mesh.shape[TASK_AXIS]
    if not process_local:
        if n % devices:
            raise ValueError(
                f"tasks holds {n} tasks, which the {devices} devices of the mesh's {TASK_AXIS!r} axis do "
                f"not divide; use a multiple of {devices} tasks (e.g. drop {n % devices} or add "
                f"{devices - n % devices}) or a mesh over a divisor of {n} devices, "
                "task_mesh(jax.devices()[:k])."
            )
        return jax.device_put(tasks, sharding)
    processes = jax.process_count()
    global_n = n * processes
    if global_n % devices:
        raise ValueError(
            f"with process_local=True each of the {processes} processes passes its own tasks ({n} here, "
            f"{global_n} in all), which the {devices} devices of the mesh's {TASK_AXIS!r} axis do not divide."
        )

    def place(leaf):
        leaf = np.asarray(leaf)
        return jax.make_array_from_process_local_data(sharding, leaf, (global_n,) + leaf.shape[1:])

    return jax.tree.map(place, tasks)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Every leaf of `tree` (meta-parameters, a target's data) copied to every device of `mesh`.

    With an Explicit 'tasks' axis, meta-parameters must live on the mesh (not on one device) so
    that per-task values derived from them can carry the task sharding.
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"mesh must be a jax.sharding.Mesh such as metaif.parallel.task_mesh(); received {_describe(mesh)}."
        )
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))
