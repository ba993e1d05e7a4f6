"""`chunk_size="auto"`: the largest task chunk whose working memory fits the device, read from
the traced program (no compile, no computation).

One task's working memory is estimated from the jaxpr of its heaviest pass, the reverse-over-forward
score pass (a jvp inside a grad through the adaptation, the same order of derivative as a
Hessian-vector product): the most bytes live at once when its equations run in order and each
value is freed after its last use. XLA fuses and reuses buffers, so it needs less
(tests/test_memory.py checks the estimate against XLA's buffer assignment: above it, within 8×).
The chunk is the number of such tasks that fit in `MEMORY_FRACTION` of the device's free memory
(GPU/TPU: `memory_stats`; CPU: MemAvailable).

On the CPU backend a model with convolutions runs one task at a time: vmapping per-task adapted
parameters turns each convolution into a grouped convolution, which XLA:CPU runs several times
slower than a loop over tasks (docs/real-networks.md).
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import jax.extend as jex
import numpy as np

from . import _batching
from ._problem import BilevelProblem, TaskSet
from ._scores import target_scores

PyTree = Any
MEMORY_FRACTION = 0.5  # of the device's free memory that the chunk's estimate may take
AUTO = "auto"


def available_bytes() -> float:
    """Free host memory: MemAvailable from /proc/meminfo (Linux), else physical memory, else +inf."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return float("inf")


def free_device_memory(device: jax.Device) -> float:
    """Bytes free on `device`: bytes_limit − bytes_in_use from its memory_stats (accelerators),
    host MemAvailable on CPU, +inf where the runtime does not say."""
    if device.platform == "cpu":
        return available_bytes()
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
        return float("inf")
    return float(stats["bytes_limit"] - stats.get("bytes_in_use", 0))


def _bytes(var) -> int:
    aval = var.aval
    if not hasattr(aval, "shape") or not hasattr(aval, "dtype"):
        return 0
    return math.prod(aval.shape) * np.dtype(aval.dtype).itemsize


def _peak(jaxpr) -> tuple[int, bool]:
    """(peak bytes live at once when the equations run in order, each value freed after its last
    use, a call's own peak added while it runs; whether any equation convolves)."""
    Var = jex.core.Var
    last = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for var in eqn.invars:
            if isinstance(var, Var):
                last[var] = i
    for var in jaxpr.outvars:
        if isinstance(var, Var):
            last[var] = len(jaxpr.eqns)
    live = sum(_bytes(v) for v in (*jaxpr.invars, *jaxpr.constvars))
    peak, convolves = live, False
    for i, eqn in enumerate(jaxpr.eqns):
        convolves |= eqn.primitive.name == "conv_general_dilated"
        inner = 0
        for sub in jex.core.jaxprs_in_params(eqn.params):
            sub_peak, sub_convolves = _peak(sub)
            inner, convolves = max(inner, sub_peak), convolves or sub_convolves
        made = sum(_bytes(v) for v in eqn.outvars if v in last)
        peak = max(peak, live + inner + made)
        live += made
        live -= sum(_bytes(v) for v in {v for v in eqn.invars if isinstance(v, Var)} if last.get(v) == i)
    return peak, convolves


_TRACED: dict = {}  # (problem, λ and one task's structure and shapes) -> task_bytes; a few entries


def _signature(tree: PyTree) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(np.shape(x)), str(getattr(x, "dtype", type(x)))) for x in leaves)


def task_bytes(problem: BilevelProblem, meta_params: PyTree, tasks: TaskSet) -> tuple[int, bool]:
    """(one task's working memory in bytes, whether the model convolves), from the jaxpr of one
    task's score pass. Shapes only (works on tracers); remembered per problem and shapes."""
    one = jax.tree.map(lambda x: jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype), tasks)
    lam = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), meta_params)
    key = (_signature(problem), _signature(lam), _signature(one))
    if key not in _TRACED:
        closed = jax.make_jaxpr(lambda lam, t: target_scores(problem, lam, t, lam))(lam, one)
        if len(_TRACED) >= 32:
            _TRACED.pop(next(iter(_TRACED)))
        _TRACED[key] = _peak(closed.jaxpr)
    return _TRACED[key]


def _device(tasks: TaskSet) -> jax.Device:
    leaf = jax.tree.leaves(tasks)[0]
    if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
        return next(iter(leaf.devices()))
    return jax.devices()[0]


def auto_chunk_size(
    problem: BilevelProblem, meta_params: PyTree, tasks: TaskSet, *, free_bytes: float | None = None
) -> int | None:
    """The chunk size `chunk_size="auto"` resolves to: None (every task at once) when all fit,
    else the largest chunk whose estimate fits `MEMORY_FRACTION` of `free_bytes` (default: the
    device's free memory), at least 1. Task-sharded tasks: that many per device, times devices."""
    n = tasks.n_tasks
    per_task, convolves = task_bytes(problem, meta_params, tasks)
    device = _device(tasks)
    if convolves and device.platform == "cpu":
        return 1 if n > 1 else None
    free = free_device_memory(device) if free_bytes is None else free_bytes
    layout = _batching.task_layout(tasks.support)
    shards = 1 if layout is None else layout.shards
    fits = MEMORY_FRACTION * free / max(per_task, 1)
    chunk = max(1, int(min(fits, n))) * shards
    return None if chunk >= n else chunk
