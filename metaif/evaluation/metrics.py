"""Agreement and detection metrics for influence scores (pure numpy; inputs of any shape are
flattened, so [n, m] example scores work as they are).

* `pearson`, `spearman` (average ranks for ties): agreement of predicted and actual changes.
* `roc_auc`: probability that a random flagged datum scores above a random clean one (ties
  count ½), for harm detection with scores where higher = more harmful.
* `detection_curve`, `detection_area`: fraction of flagged data found against fraction inspected,
  inspecting in order of decreasing score (ties: the expectation over random tie order).
* `top_k_overlap`: shared fraction of the k highest scores of two rankings.
* `noise_ceiling`: the agreement between repeated retrainings, the ceiling for any fidelity number.

Undefined correlations (a constant input) are NaN.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .. import _validate


def _vector(name: str, x: Any) -> np.ndarray:
    try:
        array = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be an array of real numbers; received {_validate.describe(x)}.") from error
    if array.size < 2:
        raise ValueError(f"{name} must hold at least 2 values; received {_validate.describe(array)}.")
    if not np.all(np.isfinite(array)):
        raise ValueError(
            f"{name} must be finite; received {_validate.describe(array)} with "
            f"{int(array.size - np.count_nonzero(np.isfinite(array)))} NaN or inf value(s)."
        )
    return array.ravel()


def _pair(x: Any, y: Any, names=("x", "y")) -> tuple[np.ndarray, np.ndarray]:
    a, b = _vector(names[0], x), _vector(names[1], y)
    if a.shape != b.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must hold the same number of values; received {np.shape(x)} and {np.shape(y)}."
        )
    return a, b


def _mask(name: str, mask: Any, size: int) -> np.ndarray:
    array = np.asarray(mask)
    if array.dtype != np.bool_ or array.size != size:
        raise ValueError(
            f"{name} must be a boolean array with one entry per score ({size}); received {_validate.describe(array)}."
        )
    return array.ravel()


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt(np.dot(a, a) * np.dot(b, b))
    return float(np.dot(a, b) / denominator) if denominator > 0 else float("nan")


def ranks(x: Any) -> np.ndarray:
    """Ranks 1..N of the flattened values, ties given their average rank."""
    a = _vector("x", x)
    order = np.argsort(a, kind="stable")
    sorted_a = a[order]
    starts = np.flatnonzero(np.r_[True, sorted_a[1:] != sorted_a[:-1]])
    ends = np.r_[starts[1:], a.size]
    group = np.repeat(np.arange(starts.size), ends - starts)
    out = np.empty(a.size)
    out[order] = ((starts + ends + 1) / 2)[group]
    return out


def pearson(x: Any, y: Any) -> float:
    """Pearson correlation of two equally sized arrays (flattened)."""
    return _correlation(*_pair(x, y))


def spearman(x: Any, y: Any) -> float:
    """Spearman rank correlation: Pearson of average ranks (ties handled)."""
    a, b = _pair(x, y)
    return _correlation(ranks(a), ranks(b))


def roc_auc(scores: Any, mask: Any) -> float:
    """Area under the ROC curve of `scores` (higher = flagged) for the boolean `mask` of truly
    flagged data: P(score of a flagged datum > score of a clean one), ties counting ½."""
    s = _vector("scores", scores)
    flagged = _mask("mask", mask, s.size)
    positives = int(flagged.sum())
    negatives = s.size - positives
    if positives == 0 or negatives == 0:
        raise ValueError(
            f"mask must flag at least one datum and leave at least one unflagged; received {positives} of {s.size} flagged."
        )
    rank_sum = ranks(s)[flagged].sum()
    return float((rank_sum - positives * (positives + 1) / 2) / (positives * negatives))


def detection_curve(scores: Any, mask: Any) -> tuple[np.ndarray, np.ndarray]:
    """(fraction inspected [N + 1], fraction of flagged data found [N + 1]) when data are
    inspected in order of decreasing score; within tied scores the found fraction is the
    expectation over random order (linear across the tie)."""
    s = _vector("scores", scores)
    flagged = _mask("mask", mask, s.size)
    if not flagged.any():
        raise ValueError("mask must flag at least one datum; received none flagged.")
    order = np.argsort(-s, kind="stable")
    sorted_s, hits = s[order], flagged[order]
    ends = np.r_[np.flatnonzero(sorted_s[1:] != sorted_s[:-1]) + 1, s.size]  # end of each tie group
    found_at_ends = np.cumsum(hits)[ends - 1]
    counts = np.arange(s.size + 1)
    found = np.interp(counts, np.r_[0, ends], np.r_[0, found_at_ends])
    return counts / s.size, found / flagged.sum()


def detection_area(scores: Any, mask: Any) -> float:
    """Area under `detection_curve` (trapezoidal): 0.5 for uninformative scores, 1 − p/2 for a
    perfect ranking with a fraction p flagged; equals p/2 + (1 − p)·roc_auc."""
    inspected, found = detection_curve(scores, mask)
    return float(np.trapezoid(found, inspected))


def top_k_overlap(x: Any, y: Any, k: int) -> float:
    """|top-k(x) ∩ top-k(y)| / k for the k largest values of each (ties broken by position)."""
    a, b = _pair(x, y)
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or not 1 <= k <= a.size:
        raise ValueError(f"k must be an int in [1, {a.size}]; received {_validate.describe(k)}.")
    top = lambda v: set(np.argsort(-v, kind="stable")[:k].tolist())
    return len(top(a) & top(b)) / k


class Agreement(NamedTuple):
    """Pearson and Spearman correlation between two sets of values."""

    pearson: float
    spearman: float


def noise_ceiling(values: Any) -> Agreement:
    """Agreement between S >= 2 retrainings of the same B weight settings that differ only in
    seed, data order or stopping point: `values` [S, B] (target values or changes per retraining).

    Returns the mean over the S(S−1)/2 pairs of Pearson and Spearman correlations: the ceiling
    for the agreement of any influence prediction with one retraining.
    """
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] < 2 or array.shape[1] < 2:
        raise ValueError(
            f"values must have shape [S, B] with S >= 2 retrainings of B >= 2 settings; received {_validate.describe(array)}."
        )
    _vector("values", array)
    pairs = [(i, j) for i in range(array.shape[0]) for j in range(i + 1, array.shape[0])]
    return Agreement(
        float(np.mean([pearson(array[i], array[j]) for i, j in pairs])),
        float(np.mean([spearman(array[i], array[j]) for i, j in pairs])),
    )
