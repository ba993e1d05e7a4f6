"""Explanations: the training tasks and examples that most lower or most raise a target.

Sign convention (the same on every result): a score is the influence I_f(ω) = df/dω at weight 1.
Removing the datum changes f by about −score. For a target f (a loss, a margin, a prediction):
* proponents: the most negative scores: the data that most lower f (removing them raises f);
* opponents: the most positive scores: the data that most raise f (for a loss: the most harmful).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from . import _validate

SIGN_CONVENTION = (
    "score = df/dω at weight 1; removing the datum changes f by about −score; proponents (most negative) "
    "lower f, opponents (most positive) raise f."
)


class Ranked(NamedTuple):
    """k data ranked by score. `index` [k, ndim]: (task,) or (task, example) positions;
    `score` [k]."""

    index: np.ndarray
    score: np.ndarray


class Explanation(NamedTuple):
    """Top-k proponents and opponents of one target at one level ("tasks", "support", "query")."""

    level: str
    proponents: Ranked
    opponents: Ranked
    convention: str = SIGN_CONVENTION


def _level_name(scores) -> str:
    return {1: "tasks"}.get(np.ndim(scores), "examples")


def top_k(scores: Any, k: int, level: str | None = None) -> Explanation:
    """The k most negative (proponents) and k most positive (opponents) scores of one target.

    Args:
      scores: one target's scores, an array [n] (tasks) or [n, m] / [n, q] (examples); for
        pairwise results pass one row, e.g. `result.support[t]`.
      k: how many of each (capped at the number of scores).
      level: a label stored on the result (default "tasks" for 1-D, "examples" for 2-D).

    Returns:
      `Explanation` whose `proponents` are sorted from the most negative score upward and
      `opponents` from the most positive downward; ties keep the lower flat index first.
    """
    array = np.asarray(scores)
    if array.ndim not in (1, 2) or array.size == 0 or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(
            "scores must be a non-empty float array [n] or [n, m] of one target's influences; "
            f"received {_validate.describe(scores)}."
        )
    if not np.all(np.isfinite(array)):
        raise ValueError(
            f"scores contain {int(np.sum(~np.isfinite(array)))} non-finite values; check the influence run's `solve` diagnostics."
        )
    k = min(_validate.positive_int("k", k), array.size)
    flat = array.ravel()
    order = np.argsort(flat, kind="stable")
    descending = np.argsort(-flat, kind="stable")

    def ranked(positions):
        return Ranked(np.stack(np.unravel_index(positions, array.shape), axis=-1), flat[positions])

    return Explanation(level or _level_name(array), ranked(order[:k]), ranked(descending[:k]))


def plot_examples(explanation: Explanation, images: Any, k: int | None = None, title: str | None = None):
    """Show the proponents (top row) and opponents (bottom row) as images with their scores.

    Args:
      explanation: from `top_k` on example scores [n, m] or [n, q].
      images: the matching images, an array [n, m, H, W] or [n, m, H, W, C] (for example
        `tasks.support["x"]`).
      k: how many of each to show (default all in the explanation).
    Returns:
      the matplotlib Figure.
    """
    import matplotlib.pyplot as plt  # optional dependency, imported on use

    images = np.asarray(images)
    if explanation.proponents.index.shape[1] != 2 or images.ndim not in (4, 5):
        raise ValueError(
            "plot_examples needs an example-level explanation (index (task, example)) and images [n, m, H, W(, C)]; "
            f"received index width {explanation.proponents.index.shape[1]} and images {_validate.describe(images)}."
        )
    k = len(explanation.proponents.score) if k is None else min(k, len(explanation.proponents.score))
    fig, axes = plt.subplots(2, k, figsize=(1.6 * k, 3.6), squeeze=False)
    for row, (name, ranked) in enumerate((("proponent", explanation.proponents), ("opponent", explanation.opponents))):
        for col in range(k):
            ax = axes[row, col]
            task, example = ranked.index[col]
            ax.imshow(images[task, example], cmap="gray_r" if images.ndim == 4 else None)
            ax.set_title(f"{name}\n({task},{example}) {ranked.score[col]:+.2e}", fontsize=7)
            ax.axis("off")
    fig.suptitle(title or f"{explanation.level}: proponents lower the target, opponents raise it", fontsize=9)
    fig.tight_layout()
    return fig


def task_table(explanation: Explanation) -> str:
    """A plain-text table of an explanation (rank, position, score) for logs and terminals."""
    lines = [
        f"{explanation.level}  ({explanation.convention})",
        f"{'rank':>4}  {'proponent':>12} {'score':>11}   {'opponent':>12} {'score':>11}",
    ]
    for rank, (pi, ps, oi, os) in enumerate(zip(*explanation.proponents, *explanation.opponents), start=1):
        lines.append(
            f"{rank:>4}  {str(tuple(int(x) for x in pi)):>12} {ps:>+11.3e}   {str(tuple(int(x) for x in oi)):>12} {os:>+11.3e}"
        )
    return "\n".join(lines)


__all__ = ["Explanation", "Ranked", "SIGN_CONVENTION", "plot_examples", "task_table", "top_k"]
