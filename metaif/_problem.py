"""The data and the problem: `TaskSet` (a pytree) and `BilevelProblem` (static)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import _validate
from ._adapt import Adaptation
from ._module import options, static

PyTree = Any
Loss = Callable[[PyTree, PyTree, PyTree], Any]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TaskSet:
    """n tasks, each with a support set (adaptation) and a query set (scoring).

    `support` and `query` are pytrees whose leaves have leading axes [n_tasks, n_support, ...] and
    [n_tasks, n_query, ...]; the two may hold different numbers of examples per task but the same
    number of tasks. A registered pytree: `jax.device_put`, `jax.tree.map` and slicing by
    `jax.tree.map(lambda x: x[idx], tasks)` work on it.
    """

    support: PyTree
    query: PyTree

    @property
    def n_tasks(self) -> int:
        return jax.tree.leaves(self.support)[0].shape[0]

    @property
    def n_support(self) -> int:
        return jax.tree.leaves(self.support)[0].shape[1]

    @property
    def n_query(self) -> int:
        return jax.tree.leaves(self.query)[0].shape[1]

    def __getitem__(self, index) -> "TaskSet":
        """Tasks selected by an int, slice or index array along the task axis."""
        return jax.tree.map(lambda leaf: leaf[index], self)


@options
class BilevelProblem:
    """A meta-learning problem: per-example losses and how tasks adapt.

    Args:
      inner_loss: `(params, meta_params, example) -> scalar`, the loss of one support example.
      outer_loss: `(params, meta_params, example) -> scalar`, the loss of one query example.
        `params` (adapted, θ) and `meta_params` (λ) are pytrees of the same structure; `example` is
        one example's slice of the support or query pytree.
      adapt: `Proximal(...)` (implicit, iMAML) or `Unrolled(...)` (MAML).
      meta_reg: adds (meta_reg / 2)·‖λ‖² to the meta-objective F.

    A pytree: the losses are static (define them once, not as fresh lambdas per call, to reuse
    compiled code), `meta_reg` and the adaptation's numeric settings are leaves, so changing them
    does not recompile. It can be passed to, closed over by, or returned from jitted functions.
    """

    inner_loss: Loss = static()
    outer_loss: Loss = static()
    adapt: Adaptation
    meta_reg: float = 0.0

    def __post_init__(self):
        _validate.callable_("BilevelProblem.inner_loss", self.inner_loss, "(params, meta_params, example) -> scalar")
        _validate.callable_("BilevelProblem.outer_loss", self.outer_loss, "(params, meta_params, example) -> scalar")
        if not isinstance(self.adapt, Adaptation):
            raise TypeError(
                "BilevelProblem.adapt must be an adaptation strategy, metaif.Proximal(reg, steps, lr) "
                f"or metaif.Unrolled(steps, lr); received {_validate.describe(self.adapt)}."
            )
        _validate.set_fields(self, meta_reg=_validate.non_negative("BilevelProblem.meta_reg", self.meta_reg))


def leading_axes(name: str, tree: PyTree, axes: tuple[str, ...]) -> tuple[int, ...]:
    """The common leading sizes of a pytree's leaves, named `axes` in error messages."""
    layout = f"[{', '.join(axes)}, ...]"
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    if not leaves:
        raise ValueError(
            f"{name} must be a pytree of arrays with leading axes {layout}; received {_validate.describe(tree)}."
        )
    shapes = {}
    for path, leaf in leaves:
        shape = np.shape(leaf)
        if len(shape) < len(axes):
            raise ValueError(
                f"{name} leaf {jax.tree_util.keystr(path) or '(root)'} has shape {shape}; expected "
                f"leading axes {layout} (at least {len(axes)} dimension(s))."
            )
        shapes[jax.tree_util.keystr(path) or "(root)"] = tuple(shape[: len(axes)])
    if len(set(shapes.values())) > 1:
        raise ValueError(f"{name} leaves disagree on their leading axes {layout}: {shapes}.")
    return next(iter(shapes.values()))


def check_tasks(tasks: Any, name: str = "tasks") -> tuple[int, int, int]:
    """Validate a TaskSet; returns (n_tasks, n_support, n_query)."""
    if not isinstance(tasks, TaskSet):
        raise TypeError(f"{name} must be a metaif.TaskSet(support, query); received {_validate.describe(tasks)}.")
    n_s, m = leading_axes(f"{name}.support", tasks.support, ("n_tasks", "n_support"))
    n_q, q = leading_axes(f"{name}.query", tasks.query, ("n_tasks", "n_query"))
    if n_s != n_q:
        raise ValueError(
            f"{name}.support and {name}.query must hold the same number of tasks (leading axis); "
            f"received {n_s} support tasks and {n_q} query tasks."
        )
    if n_s < 1 or m < 1 or q < 1:
        raise ValueError(
            f"{name} must hold at least one task with one support and one query example; received shapes [{n_s}, {m}] and [{n_q}, {q}]."
        )
    return n_s, m, q


def check_problem(problem: Any) -> None:
    if not isinstance(problem, BilevelProblem):
        raise TypeError(
            f"problem must be a metaif.BilevelProblem(inner_loss, outer_loss, adapt); received {_validate.describe(problem)}."
        )


def check_losses(
    problem: BilevelProblem, meta_params: PyTree, tasks: TaskSet, which: tuple[str, ...] = ("inner_loss", "outer_loss")
) -> None:
    """Trace each loss on one example (no FLOPs) and require a scalar output."""
    data_of = {"inner_loss": tasks.support, "outer_loss": tasks.query}
    for name in which:
        data = data_of[name]
        example = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(np.shape(leaf)[2:], leaf.dtype), data)
        loss = getattr(problem, name)
        try:
            out = jax.eval_shape(loss, meta_params, meta_params, example)
        except Exception as error:  # re-raised with the argument named
            raise ValueError(f"problem.{name} failed on (meta_params, meta_params, one example): {error}") from error
        leaves = jax.tree.leaves(out)
        if len(leaves) != 1 or leaves[0].shape != ():
            shown = jax.tree.map(lambda s: f"shape {s.shape}", out)
            raise ValueError(
                f"problem.{name} must return a scalar loss for one example; it returned {shown}. "
                "Reduce it with .sum() or .mean(), or check that it indexes one example and not a batch."
            )


def check_weights(name: str, weights: Any, shape: tuple[int, ...]) -> None:
    if weights is None:
        return
    got = np.shape(weights)
    if got != shape:
        raise ValueError(f"{name} must have shape {shape}; received {_validate.describe(weights)}.")
    dtype = weights.dtype if hasattr(weights, "dtype") else np.asarray(weights).dtype
    if not (
        jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_)
    ):
        shown = (
            _validate.describe(weights) if hasattr(weights, "dtype") else f"{type(weights).__name__} of dtype {dtype}"
        )
        raise TypeError(f"{name} must hold real numbers (float, int or bool); received {shown}.")
