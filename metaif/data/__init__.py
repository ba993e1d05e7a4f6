"""metaif.data: real few-shot datasets and task samplers (numpy; images float32 in [0, 1]).

Loaders find their files under `root`, else the METAIF_DATA environment variable, check them
against known checksums or structure, and say what is missing and where to get it. Samplers
return `metaif.TaskSet`s with support/query {"x", "y"}.
"""

from ._corrupt import corrupt as corrupt
from ._digits import Digits as Digits
from ._digits import load_digits as load_digits
from ._fc100 import FC100 as FC100
from ._features import PCA as PCA
from ._features import fit_pca as fit_pca
from ._fc100 import load_fc100 as load_fc100
from ._few_shot import FewShotIndices as FewShotIndices
from ._few_shot import few_shot_indices as few_shot_indices
from ._few_shot import few_shot_tasks as few_shot_tasks
from ._mini_imagenet import MiniImageNet as MiniImageNet
from ._mini_imagenet import load_mini_imagenet as load_mini_imagenet
from ._mnist import MNIST as MNIST
from ._mnist import load_mnist as load_mnist
from ._omniglot import ClassSplit as ClassSplit
from ._omniglot import Omniglot as Omniglot
from ._omniglot import load_omniglot as load_omniglot
from ._omniglot import omniglot_split as omniglot_split
from ._sinusoid import SinusoidParameters as SinusoidParameters
from ._sinusoid import sinusoid_parameters as sinusoid_parameters
from ._sinusoid import sinusoid_tasks as sinusoid_tasks

__all__ = [
    "ClassSplit",
    "Digits",
    "FC100",
    "FewShotIndices",
    "MNIST",
    "MiniImageNet",
    "Omniglot",
    "PCA",
    "SinusoidParameters",
    "corrupt",
    "few_shot_indices",
    "fit_pca",
    "few_shot_tasks",
    "load_digits",
    "load_fc100",
    "load_mini_imagenet",
    "load_mnist",
    "load_omniglot",
    "omniglot_split",
    "sinusoid_parameters",
    "sinusoid_tasks",
]
