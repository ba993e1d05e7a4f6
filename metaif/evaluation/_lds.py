"""The linear datamodeling score (LDS): influence's additive predictions against retraining on
random subsets of the training data.

For each of `count` random subsets that keep a `fraction` of one level's data (tasks, support
examples or query examples), retrain on the subset (`retrain` with `subset_weights`) and record the
target. The first-order prediction for a subset is

    f(λ*) − Σ_{ω removed} I_f(ω)        (removal changes a quantity by about −I),

and the LDS is the Spearman correlation across subsets between predicted and actual values.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from .. import _validate
from .._objective import Weights
from . import metrics
from ._retrain import Level, level_shape


def subset_masks(shape: tuple[int, ...], fraction: float = 0.5, count: int = 32, seed: int = 0) -> np.ndarray:
    """Boolean masks [count, *shape], True = kept: each keeps round(fraction · size) data drawn
    uniformly without replacement (at least 1 kept and 1 removed)."""
    count = _validate.positive_int("count", count)
    size = int(np.prod(shape))
    fraction = _validate.positive("fraction", fraction)
    kept = int(round(fraction * size))
    if not 1 <= kept <= size - 1:
        raise ValueError(
            f"fraction must keep between 1 and {size - 1} of the {size} data; received {fraction!r} (keeps {kept})."
        )
    rng = np.random.default_rng(seed)
    keys = rng.random((count, size))
    order = np.argsort(keys, axis=1)
    masks = np.zeros((count, size), bool)
    np.put_along_axis(masks, order[:, :kept], True, axis=1)
    return masks.reshape((count, *shape))


def subset_weights(
    n: int, m: int, q: int, level: Level, fraction: float = 0.5, count: int = 32, seed: int = 0, dtype=jnp.float64
) -> tuple[Weights, np.ndarray]:
    """Random-subset weights for LDS at one level.

    Returns (`Weights` with leaves [count, n], [count, n, m], [count, n, q] where the level's
    weights are the 0/1 masks and the others 1; masks [count, *level shape] bool, True = kept).
    """
    shape = level_shape(level, n, m, q)
    masks = subset_masks(shape, fraction, count, seed)
    ones = Weights.ones(n, m, q, dtype)
    tiled = Weights(*(jnp.broadcast_to(w, (count, *w.shape)) for w in ones))
    return tiled._replace(**{level: jnp.asarray(masks, dtype)}), masks


def subset_predictions(scores: Any, masks: Any, value: float = 0.0) -> np.ndarray:
    """First-order predictions [count]: value − Σ_{removed} scores for each mask (True = kept),
    with `value` the target at λ* (0 gives predicted changes)."""
    s = np.asarray(scores, dtype=np.float64)
    kept = np.asarray(masks)
    if kept.dtype != np.bool_ or kept.shape[1:] != s.shape or kept.ndim != s.ndim + 1:
        raise ValueError(
            f"masks must be boolean [count, *scores.shape] = [count, {', '.join(map(str, s.shape))}]; "
            f"received {_validate.describe(kept)}."
        )
    removed = (~kept).reshape(kept.shape[0], -1)
    return value - removed.astype(np.float64) @ s.ravel()


def lds(predicted_scores: Any, masks: Any, retrained_values: Any) -> float:
    """Linear datamodeling score: Spearman correlation across subsets between the first-order
    predictions (`subset_predictions`: target at λ* minus the sum of the removed data's
    influences) and the target values after retraining on each subset ([count])."""
    predicted = subset_predictions(predicted_scores, masks)
    actual = np.asarray(retrained_values, dtype=np.float64)
    if actual.shape != predicted.shape:
        raise ValueError(
            f"retrained_values must have shape [count] = {predicted.shape}, one per mask; received {_validate.describe(actual)}."
        )
    return metrics.spearman(predicted, actual)
