"""The pure core of metaif: every building block of influence as a function you can call inside
your own `jax.jit`, `jax.vmap` and `jax.grad`.

Nothing here validates arguments, copies to the host or warns: the checked functions at the top
level (`metaif.influence` and the others) validate once, call one jitted function built from
these pieces and check its result once. Options (`BilevelProblem`, adaptations, solvers,
curvature) are pytrees, so they can be traced arguments of your own jitted functions.

Conventions (README "Conventions"): weights t [n], a [n, m], b [n, q] multiply fixed-denominator
means; influence is the derivative at weight 1; removal changes a quantity by about −influence.

Typical composition (a slice of tasks scored against a solved vector, all inside one jit):

    value, grad, op = core.operator(problem, lam, tasks, chunk_size=8)
    solver = metaif.solvers.CG(damping=1e-2)
    v, info = solver.solve_one(op, jax.grad(target)(lam))  # v = (H + δI)⁻¹ ∇f
    rows = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, 16), tasks)
    scores = core.target_scores(problem, lam, rows, v, n_tasks=tasks.n_tasks)  # 16 tasks' rows
"""

from ._diagnostics import Diagnostics as Diagnostics
from ._diagnostics import compute as diagnostics
from ._hessian import operator as operator
from ._hessian import value_and_grad as value_and_grad
from ._influence import influence_from_gradient as influence_from_gradient
from ._influence import influence_on_params as influence_on_params
from ._influence import influence_on_target as influence_on_target
from ._memory import auto_chunk_size as auto_chunk_size
from ._memory import task_bytes as task_bytes
from ._objective import Weights as Weights
from ._objective import adapt_one as adapt
from ._objective import adaptation_gradient as adaptation_gradient
from ._objective import losses_per_task as task_losses
from ._objective import objective as objective
from ._objective import task_loss as task_loss
from ._objective import unit_weights as unit_weights
from ._scores import LEVELS as LEVELS
from ._scores import bilevel_task_loss as bilevel_task_loss
from ._scores import mixed_gradients as mixed_gradients
from ._scores import target_scores as target_scores
from ._scores import weight_scores as weight_scores
from .training import train_steps as train_steps

__all__ = [
    "LEVELS",
    "Diagnostics",
    "Weights",
    "adapt",
    "adaptation_gradient",
    "auto_chunk_size",
    "bilevel_task_loss",
    "diagnostics",
    "influence_from_gradient",
    "influence_on_params",
    "influence_on_target",
    "mixed_gradients",
    "objective",
    "operator",
    "target_scores",
    "task_bytes",
    "task_loss",
    "task_losses",
    "train_steps",
    "unit_weights",
    "value_and_grad",
    "weight_scores",
]
