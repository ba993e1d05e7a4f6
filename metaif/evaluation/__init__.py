"""Evaluating influence: ground truth by retraining, metrics, baselines and editing.

* Ground truth (`_retrain`, `_lds`): warm-started Newton retraining (`retrain`, optionally
  proximal; dense Newton for small models, matrix-free Newton–CG with `solver=CG(...)` for
  networks), cold-started retraining over seeds (`retrain_cold`), leave-one-out at every level
  (`leave_one_out`), random-subset retraining for the linear datamodeling score (`subset_weights`,
  `lds`), and `noise_ceiling`, the agreement of repeated retrainings.
* `metrics`: pearson, spearman, roc_auc, detection curve and area, top-k overlap.
* `baselines`: grad_dot (TracIn-style), trak, single_level, direct_if, raw_loss, random_scores,
  all with influence's sign (higher = more harmful) and shapes ([n], [n, m], [n, q]).
* Editing (`_editing`): `edit` (λ* − Σ removed I_λ, optionally refined), `removal_reach` (how
  much of a removal stays on λ*'s branch of minimisers, where edits can follow retraining) and
  `unlearn` (gradient-ascent baseline).

Sign convention (binding): removing a datum changes a quantity by about −influence.
"""

from . import baselines as baselines
from . import metrics as metrics
from ._editing import Edited as Edited
from ._editing import Reach as Reach
from ._editing import edit as edit
from ._editing import remaining_weights as remaining_weights
from ._editing import removal_reach as removal_reach
from ._editing import unlearn as unlearn
from ._lds import lds as lds
from ._lds import subset_masks as subset_masks
from ._lds import subset_predictions as subset_predictions
from ._lds import subset_weights as subset_weights
from ._retrain import Retrained as Retrained
from ._retrain import leave_one_out as leave_one_out
from ._retrain import removal_weights as removal_weights
from ._retrain import retrain as retrain
from ._retrain import retrain_cold as retrain_cold
from ._retrain import target_values as target_values
from .baselines import Scores as Scores
from .metrics import Agreement as Agreement
from .metrics import noise_ceiling as noise_ceiling

__all__ = [
    "Agreement",
    "Edited",
    "Reach",
    "Retrained",
    "Scores",
    "baselines",
    "edit",
    "lds",
    "leave_one_out",
    "metrics",
    "noise_ceiling",
    "remaining_weights",
    "removal_reach",
    "removal_weights",
    "retrain",
    "retrain_cold",
    "subset_masks",
    "subset_predictions",
    "subset_weights",
    "target_values",
    "unlearn",
]
