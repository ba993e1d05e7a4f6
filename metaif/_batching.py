"""Memory-bounded maps and sums over the task axis: `batch_size` tasks at a time.

With `batch_size=None` these are a plain `vmap` and a plain call; with an int, peak memory grows
with the chunk size, not with the number of tasks, and the answers are the same.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

PyTree = Any


def leading_size(data: PyTree) -> int:
    return jax.tree.leaves(data)[0].shape[0]


def map_tasks(fn: Callable, data: PyTree, batch_size: int | None) -> PyTree:
    """fn applied to every task of `data` (leaves with a leading task axis): outputs stacked."""
    if batch_size is None or batch_size >= leading_size(data):
        return jax.vmap(fn)(data)
    return jax.lax.map(fn, data, batch_size=batch_size)


def sum_chunks(fn: Callable, data: PyTree, batch_size: int | None) -> PyTree:
    """Σ over chunks of fn(chunk), where fn maps a chunk of tasks (leading axis) to a pytree that
    adds across chunks. Full chunks run in a `lax.scan`; the remainder in one extra call."""
    n = leading_size(data)
    if batch_size is None or batch_size >= n:
        return fn(data)
    count, remainder = divmod(n, batch_size)
    head = jax.tree.map(lambda x: x[: count * batch_size].reshape((count, batch_size) + x.shape[1:]), data)
    total = fn(jax.tree.map(lambda x: x[0], head))
    if count > 1:
        def body(acc, chunk):
            return jax.tree.map(jax.numpy.add, acc, fn(chunk)), None

        total, _ = jax.lax.scan(body, total, jax.tree.map(lambda x: x[1:], head))
    if remainder:
        total = jax.tree.map(jax.numpy.add, total, fn(jax.tree.map(lambda x: x[count * batch_size:], data)))
    return total
