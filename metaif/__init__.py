"""metaif: exact task and instance influence for bilevel meta-learning, in JAX.

Conventions (binding, see README): every task and example has a weight multiplying a
fixed-denominator mean; influence is the derivative at weight 1; removing a datum changes a
quantity by about −influence; a positive influence on a loss target is harmful.
"""

from importlib import metadata as _metadata

from . import curvature as curvature
from . import data as data
from . import explain as explain
from . import models as models
from . import parallel as parallel
from . import solvers as solvers
from ._adapt import Adaptation as Adaptation
from ._adapt import FirstOrder as FirstOrder
from ._adapt import Proximal as Proximal
from ._adapt import Unrolled as Unrolled
from ._hessian import hessian_operator as hessian_operator
from ._influence import AdaptedInfluence as AdaptedInfluence
from ._influence import Influence as Influence
from ._influence import adapted_influence as adapted_influence
from ._influence import influence as influence
from ._influence import instance_influence as instance_influence
from ._influence import task_influence as task_influence
from ._objective import Weights as Weights
from ._pairwise import NewTaskInfluence as NewTaskInfluence
from ._pairwise import new_task_influence as new_task_influence
from ._pairwise import pairwise_influence as pairwise_influence
from ._pairwise import self_influence as self_influence
from ._objective import adapt as adapt
from ._objective import adapt_tasks as adapt_tasks
from ._objective import adaptation_residual as adaptation_residual
from ._objective import meta_objective as meta_objective
from ._objective import task_losses as task_losses
from ._problem import BilevelProblem as BilevelProblem
from ._problem import TaskSet as TaskSet
from ._removal import TaskRemoval as TaskRemoval
from ._removal import task_removal as task_removal
from .training import TrainResult as TrainResult
from .training import newton_refine as newton_refine
from .training import meta_train as meta_train

try:  # the single source is pyproject.toml's version, read from the installed package's metadata
    __version__: str = _metadata.version("metaif")
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "Adaptation", "AdaptedInfluence", "BilevelProblem", "FirstOrder", "Influence", "NewTaskInfluence", "Proximal", "TaskRemoval", "TaskSet", "TrainResult",
    "Unrolled", "Weights", "adapt", "adapt_tasks", "adaptation_residual", "adapted_influence", "curvature", "data", "explain", "hessian_operator", "influence", "instance_influence",
    "meta_objective", "meta_train", "models", "new_task_influence", "newton_refine", "pairwise_influence", "parallel", "self_influence", "solvers", "task_influence", "task_losses", "task_removal",
]
