"""metaif: exact task and instance influence for bilevel meta-learning, in JAX.

Conventions (binding, see README): every task and example has a weight multiplying a
fixed-denominator mean; influence is the derivative at weight 1; removing a datum changes a
quantity by about −influence; a positive influence on a loss target is harmful.

`import metaif` loads nothing heavy (no JAX): every public name and submodule below is imported on
first use (PEP 562), so `metaif.influence`, `metaif.evaluation.retrain` or
`from metaif import problems` work without further imports, and the `metaif` command starts fast.
"""

from __future__ import annotations

import importlib
from importlib import metadata as _metadata
from typing import TYPE_CHECKING

try:  # the single source is pyproject.toml's version, read from the installed package's metadata
    __version__: str = _metadata.version("metaif")
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

# Public submodules: reachable as attributes after `import metaif`.
_SUBMODULES = (
    "core",
    "curvature",
    "data",
    "evaluation",
    "explain",
    "models",
    "parallel",
    "problems",
    "solvers",
    "training",
)

# Public name -> the module (relative to metaif) that defines it.
_EXPORTS = {
    "Adaptation": "_adapt",
    "FirstOrder": "_adapt",
    "Proximal": "_adapt",
    "Unrolled": "_adapt",
    "ConstantTargetWarning": "_boundary",
    "NonStationaryWarning": "_boundary",
    "Diagnostics": "_diagnostics",
    "hessian_operator": "_hessian",
    "AdaptedInfluence": "_influence",
    "Influence": "_influence",
    "adapted_influence": "_influence",
    "influence": "_influence",
    "instance_influence": "_influence",
    "task_influence": "_influence",
    "Scores": "_influence",
    "Weights": "_objective",
    "adapt": "_objective",
    "adapt_tasks": "_objective",
    "adaptation_residual": "_objective",
    "meta_objective": "_objective",
    "task_accuracies": "_objective",
    "task_losses": "_objective",
    "NewTaskInfluence": "_pairwise",
    "new_task_influence": "_pairwise",
    "pairwise_influence": "_pairwise",
    "self_influence": "_pairwise",
    "BilevelProblem": "_problem",
    "TaskSet": "_problem",
    "TaskRemoval": "_removal",
    "task_removal": "_removal",
    "configure_cpu": "_runtime",
    "enable_compilation_cache": "_runtime",
    "TrainResult": "training",
    "meta_train": "training",
    "newton_refine": "training",
}

__all__ = sorted([*_EXPORTS, *_SUBMODULES])

if TYPE_CHECKING:  # the same names, for type checkers, IDEs and the API reference (static analysis)
    from ._adapt import Adaptation, FirstOrder, Proximal, Unrolled
    from ._boundary import ConstantTargetWarning, NonStationaryWarning
    from ._diagnostics import Diagnostics
    from ._hessian import hessian_operator
    from ._influence import (
        AdaptedInfluence,
        Influence,
        Scores,
        adapted_influence,
        influence,
        instance_influence,
        task_influence,
    )
    from ._objective import (
        Weights,
        adapt,
        adapt_tasks,
        adaptation_residual,
        meta_objective,
        task_accuracies,
        task_losses,
    )
    from ._pairwise import NewTaskInfluence, new_task_influence, pairwise_influence, self_influence
    from ._problem import BilevelProblem, TaskSet
    from ._removal import TaskRemoval, task_removal
    from ._runtime import configure_cpu, enable_compilation_cache
    from .training import TrainResult, meta_train, newton_refine
    from . import core, curvature, data, evaluation, explain, models, parallel, problems, solvers, training


def __getattr__(name: str):
    """Import a public submodule or name on first use."""
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")  # the import also sets the attribute
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(
        f"module 'metaif' has no attribute {name!r}. Public names: see metaif.__all__ "
        f"and the submodules {', '.join(_SUBMODULES)}."
    )


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES})
