"""Label noise for detection experiments: corrupt a known fraction of tasks or examples."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .. import _validate
from .._problem import TaskSet, check_tasks
from . import _args

LEVELS = ("task", "support", "query")


def _labels(tasks: TaskSet, part: str, key: str) -> np.ndarray:
    data = getattr(tasks, part)
    if not isinstance(data, Mapping) or key not in data:
        raise TypeError(
            f"corrupt(tasks).{part} must be a mapping with integer labels under key={key!r}; received {_validate.describe(data)}."
        )
    labels = np.asarray(data[key])
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(
            f"corrupt(tasks).{part}[{key!r}] must be an integer array [n_tasks, n_{part}]; received {_validate.describe(labels)}."
        )
    return labels


def corrupt(
    tasks: TaskSet, fraction: float, level: str, seed: int, *, n_classes: int | None = None, key: str = "y"
) -> tuple[TaskSet, np.ndarray]:
    """Corrupt the labels of round(fraction · count) tasks or examples, chosen uniformly.

    Args:
      tasks: a classification TaskSet whose support and query are mappings with labels under `key`.
      fraction: in [0, 1]; exactly round(fraction · n) tasks (or n·m support / n·q query examples).
      level: "task": every support AND query label of a chosen task is replaced by an independent
        uniform random label, which breaks the link between its support and query sets (a
        consistent relabelling would not be noise for N-way learning); "support" / "query": each
        chosen example's label moves to a different class, uniform over the other n_classes − 1.
      seed: int seed.
      n_classes: the label range 0..n_classes-1; default 1 + the largest label in `tasks`. Pass the
        tasks' number of ways: a label >= the model's number of outputs gives NaN with metaif's
        cross-entropy losses, and is clamped silently by a loss that indexes logits[y].
      key: the label field of support and query.

    Returns:
      (corrupted TaskSet, mask): mask is [n] bool for level="task", [n, m] or [n, q] bool for
      "support" or "query" (True = corrupted). Inputs other than the labels are shared, not copied.
    """
    n, _, _ = check_tasks(tasks, "corrupt(tasks)")
    fraction = _args.fraction("corrupt(fraction)", fraction)
    if level not in LEVELS:
        raise ValueError(f"corrupt(level) must be one of {LEVELS}; received {_validate.describe(level)}.")
    rng = np.random.default_rng(_args.seed("corrupt(seed)", seed))
    labels = {part: _labels(tasks, part, key) for part in ("support", "query")}
    low, top = min(int(y.min()) for y in labels.values()), max(int(y.max()) for y in labels.values()) + 1
    if low < 0:
        raise ValueError(f"corrupt(tasks) labels must be class ids >= 0; found {low}.")
    n_classes = _validate.positive_int("corrupt(n_classes)", top if n_classes is None else n_classes)
    if n_classes < 2 or n_classes < top:
        raise ValueError(
            f"corrupt(n_classes) must be >= 2 and cover the labels 0..{top - 1} in tasks; received n_classes={n_classes}."
        )
    new = {part: getattr(tasks, part)[key] for part in labels}
    new.update({part: labels[part].copy() for part in (("support", "query") if level == "task" else (level,))})
    if level == "task":
        mask = np.zeros(n, bool)
        mask[rng.choice(n, int(np.floor(fraction * n + 0.5)), replace=False)] = True
        for y in new.values():
            y[mask] = rng.integers(0, n_classes, (int(mask.sum()), y.shape[1]), dtype=y.dtype)
    else:
        y = new[level]
        mask = np.zeros(y.shape, bool)
        mask.flat[rng.choice(y.size, int(np.floor(fraction * y.size + 0.5)), replace=False)] = True
        y[mask] = (y[mask] + rng.integers(1, n_classes, int(mask.sum()), dtype=y.dtype)) % n_classes
    return TaskSet(
        support={**tasks.support, key: new["support"]},
        query={**tasks.query, key: new["query"]},
    ), mask
