"""Memory-bounded maps and sums over the task axis: `chunk_size` tasks at a time.

With `chunk_size=None` these are a plain `vmap` and a plain call; with an int, peak memory grows
with the chunk size, not with the number of tasks, and the answers are the same.

Task-sharded data (the task axis split over a mesh axis, see `metaif.parallel`) is chunked within
each device's shard: the task axis is viewed device-major as [devices, tasks per device] (a local
reshape, no data moves), each step takes ceil(chunk_size / devices) tasks from every device, and
the outputs keep the task sharding. The shard layout is read from the arrays' types for Explicit
mesh axes; for an Auto mesh, an axis named 'tasks' is taken as the task axis.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec

PyTree = Any
TASK_AXIS = "tasks"


class Layout(NamedTuple):
    """How the leading (task) axis is sharded: mesh axes `entry` of `mesh`, `shards` devices."""

    mesh: Any  # jax.sharding.Mesh for concrete arrays, AbstractMesh under tracing
    entry: Any  # a mesh axis name or a tuple of names (a PartitionSpec entry)
    shards: int
    explicit: bool


def leading_size(data: PyTree) -> int:
    return jax.tree.leaves(data)[0].shape[0]


def task_layout(data: PyTree) -> Layout | None:
    """The sharding of the leading axis of `data` (arrays or tracers), or None when unsharded.

    Explicit axes come from the first leaf's type (vmap requires every mapped leaf to agree).
    With Auto axes the type carries no spec: a mesh axis named 'tasks' is then assumed to be the
    task axis, when it divides the number of tasks.
    """
    leaf = jax.tree.leaves(data)[0]
    sharding = getattr(jax.typeof(leaf), "sharding", None)
    if not isinstance(sharding, NamedSharding) or not sharding.mesh.axis_names:
        return None
    mesh, spec = sharding.mesh, sharding.spec
    if (
        isinstance(leaf, jax.Array)
        and not isinstance(leaf, jax.core.Tracer)
        and isinstance(leaf.sharding, NamedSharding)
    ):
        mesh = leaf.sharding.mesh  # a concrete array: its concrete mesh (eager reshard needs devices)
    entry = spec[0] if len(spec) else None
    explicit = entry is not None
    if not explicit:
        types = dict(zip(mesh.axis_names, mesh.axis_types))
        if types.get(TASK_AXIS) != AxisType.Auto:
            return None
        entry = TASK_AXIS
    shards = math.prod(mesh.shape[name] for name in (entry if isinstance(entry, tuple) else (entry,)))
    n = leading_size(data)
    if not explicit and (shards == 1 or n % shards):
        return None  # Auto: plain chunking is correct, the layout would only be a hint
    if n % shards:
        raise ValueError(
            f"the task axis ({n} tasks) is sharded over mesh axis {entry!r} of {shards} devices, which does "
            "not divide it; use a number of tasks divisible by the device count (metaif.parallel.shard_tasks "
            "checks this)."
        )
    return Layout(mesh, entry, shards, explicit)


def _place(x: jax.Array, layout: Layout, spec: PartitionSpec, shape: tuple[int, ...]) -> jax.Array:
    """x reshaped to `shape` with sharding `spec` (a type for Explicit axes, a hint for Auto)."""
    sharding = NamedSharding(layout.mesh, spec)
    if layout.explicit:
        return jax.lax.reshape(x, shape, out_sharding=sharding)
    return jax.lax.with_sharding_constraint(x.reshape(shape), sharding)


def _rows(x: jax.Array, layout: Layout) -> jax.Array:
    """[n, ...] -> [n / devices, devices, ...]: row r holds task r of every device's shard."""
    k = layout.shards
    y = _place(x, layout, PartitionSpec(layout.entry), (k, x.shape[0] // k) + x.shape[1:])
    return jnp.swapaxes(y, 0, 1)


def _tasks(y: jax.Array, layout: Layout) -> jax.Array:
    """Inverse of `_rows` for any number of rows: [r, devices, ...] -> [devices·r, ...] task-sharded."""
    y = jnp.swapaxes(y, 0, 1)
    return _place(y, layout, PartitionSpec(layout.entry), (y.shape[0] * y.shape[1],) + y.shape[2:])


def _chunking(data: PyTree, chunk_size: int | None):
    """(rows, rows per chunk, rows -> tasks) or None when everything fits in one chunk."""
    n = leading_size(data)
    if chunk_size is None or chunk_size >= n:
        return None
    layout = task_layout(data)
    if layout is None:
        return data, chunk_size, None
    rows = jax.tree.map(lambda x: _rows(x, layout), data)
    per_device = -(-chunk_size // layout.shards)
    if per_device >= n // layout.shards:
        return None
    return rows, per_device, layout


def map_tasks(fn: Callable, data: PyTree, chunk_size: int | None) -> PyTree:
    """fn applied to every task of `data` (leaves with a leading task axis): outputs stacked."""
    chunking = _chunking(data, chunk_size)
    if chunking is None:
        return jax.vmap(fn)(data)
    rows, size, layout = chunking
    if layout is None:
        return jax.lax.map(fn, data, batch_size=size)
    out = jax.lax.map(jax.vmap(fn), rows, batch_size=size)
    return jax.tree.map(lambda y: _tasks(y, layout), out)


def sum_chunks(fn: Callable, data: PyTree, chunk_size: int | None) -> PyTree:
    """Σ over chunks of fn(chunk), where fn maps a chunk of tasks (leading axis) to a pytree that
    adds across chunks. Full chunks run in a `lax.scan`; the remainder in one extra call."""
    chunking = _chunking(data, chunk_size)
    if chunking is None:
        return fn(data)
    rows, size, layout = chunking
    as_tasks = (
        (lambda chunk: chunk) if layout is None else (lambda chunk: jax.tree.map(lambda y: _tasks(y, layout), chunk))
    )
    call = lambda chunk: fn(as_tasks(chunk))
    count, remainder = divmod(leading_size(rows), size)
    head = jax.tree.map(lambda x: x[: count * size].reshape((count, size) + x.shape[1:]), rows)

    def body(acc, chunk):
        return jax.tree.map(jnp.add, acc, call(chunk)), None

    # one call site for all full chunks (each call site of a costly fn is compiled again)
    zeros = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(call, jax.tree.map(lambda x: x[0], head))
    )
    total, _ = jax.lax.scan(body, zeros, head)
    if remainder:
        total = jax.tree.map(jnp.add, total, call(jax.tree.map(lambda x: x[count * size :], rows)))
    return total


def take_tasks(data: PyTree, index) -> PyTree:
    """`leaf[index]` along the task axis for every leaf (index: an int or an int array). Leaves
    sharded over Explicit mesh axes are gathered replicated: an arbitrary selection of tasks has
    no task sharding, and JAX asks for the output sharding of such a gather."""

    def take(leaf):
        layout = task_layout(leaf)
        if layout is not None and layout.explicit:
            return leaf.at[index].get(out_sharding=NamedSharding(layout.mesh, PartitionSpec()))
        return leaf[index]

    return jax.tree.map(take, data)


def add_at_task(array: jax.Array, index, value) -> jax.Array:
    """`array.at[index].add(value)` along the task axis, keeping a task sharding (Explicit axes)."""
    layout = task_layout(array)
    if layout is not None and layout.explicit:
        return array.at[index].add(value, out_sharding=jax.typeof(array).sharding)
    return array.at[index].add(value)
