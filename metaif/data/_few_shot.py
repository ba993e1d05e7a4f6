"""N-way K-shot classification tasks sampled from a labelled image set (vectorised numpy).

Each task draws `ways` distinct classes and, per class, `shots + queries` distinct examples;
the first `shots` go to the support set and the rest to the query set, so support and query never
share an example. Task labels 0..ways-1 are assigned to the task's classes in random order; within
a set, examples are grouped by label (y = 0…0, 1…1, ...). With `rotate=True` every class c gives
four classes (c, k·90°), k = 0..3 (Santoro et al. 2016): an example of class (c, k) is an image of
class c rotated by k·90° counter-clockwise (`np.rot90`). The same drawing may then appear, rotated
differently, under two labels of one task.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import _validate
from .._problem import TaskSet
from . import _args


class FewShotIndices(NamedTuple):
    """Which examples make each task (indices into the image set).

    Attributes:
      classes: [n, ways] int64 source class id of task label j (column j).
      rotations: [n, ways] int64 quarter turns k (0..3; all 0 without `rotate`) of task label j.
      support: [n, ways·shots] int64 example indices; label of column i is i // shots.
      query: [n, ways·queries] int64 example indices; label of column i is i // queries.
    """

    classes: np.ndarray
    rotations: np.ndarray
    support: np.ndarray
    query: np.ndarray


def distinct(rng: np.random.Generator, counts: np.ndarray, k: int) -> np.ndarray:
    """[r, k] distinct positions drawn uniformly from range(counts[r]) per row, in random order.

    Floyd's algorithm vectorised over rows: O(r·k²) work, independent of the counts.
    """
    counts = np.asarray(counts, np.int64)
    out = np.empty((counts.shape[0], k), np.int64)
    for i in range(k):  # k is small (ways, or shots + queries); rows are vectorised
        top = counts - k + i
        draw = rng.integers(0, top + 1)
        taken = (out[:, :i] == draw[:, None]).any(axis=1)
        out[:, i] = np.where(taken, top, draw)
    return np.take_along_axis(out, np.argsort(rng.random(out.shape), axis=1), axis=1)


def few_shot_indices(
    labels, n_tasks: int, ways: int, shots: int, queries: int, seed: int, classes=None, *, rotate: bool = False
) -> FewShotIndices:
    """Sample n_tasks N-way K-shot tasks as example indices; `few_shot_tasks` with the same
    arguments gathers exactly these tasks."""
    return _sample("few_shot_indices", labels, n_tasks, ways, shots, queries, seed, classes, rotate)


def _sample(caller, labels, n_tasks, ways, shots, queries, seed, classes, rotate) -> FewShotIndices:
    labels = _args.integer_array(f"{caller}(labels)", labels, 1)
    n_tasks = _validate.positive_int(f"{caller}(n_tasks)", n_tasks)
    ways = _validate.positive_int(f"{caller}(ways)", ways)
    shots = _validate.positive_int(f"{caller}(shots)", shots)
    queries = _validate.positive_int(f"{caller}(queries)", queries)
    rng = np.random.default_rng(_args.seed(f"{caller}(seed)", seed))
    order = np.argsort(labels, kind="stable")
    present, first, count = np.unique(labels[order], return_index=True, return_counts=True)
    if classes is None:
        pool = present
    else:
        pool = _args.integer_array(f"{caller}(classes)", classes, 1)
        absent, duplicates = np.setdiff1d(pool, present), pool.size - np.unique(pool).size
        if absent.size or duplicates or pool.size == 0:
            problems = [f"{duplicates} duplicate(s)"] * bool(duplicates) + [
                f"ids absent from labels {absent[:10].tolist()}"
            ] * bool(absent.size)
            raise ValueError(
                f"{caller}(classes) must list distinct class ids present in labels; received {pool.size} id(s)"
                + (f" with {' and '.join(problems)}." if problems else ".")
            )
    slot = np.searchsorted(present, pool)
    need = shots + queries
    if np.any(count[slot] < need):
        short = pool[count[slot] < need]
        raise ValueError(
            f"{caller}: shots + queries = {need} examples per class, but {short.size} class(es) have fewer, e.g. "
            f"class {short[0]} with {count[slot][pool == short[0]][0]}; lower shots or queries or pass classes= without them."
        )
    n_pool = pool.size * (4 if rotate else 1)
    if ways > n_pool:
        raise ValueError(
            f"{caller}(ways) = {ways} exceeds the {n_pool} available classes{' (with rotations)' if rotate else ''}."
        )
    chosen = distinct(rng, np.full(n_tasks, n_pool), ways)  # [n, ways] ids in the (rotated) pool
    slots = slot[chosen % pool.size]
    picks = distinct(rng, count[slots].ravel(), need).reshape(n_tasks, ways, need)
    examples = order[first[slots][..., None] + picks]
    return FewShotIndices(
        classes=present[slots],
        rotations=chosen // pool.size,
        support=examples[..., :shots].reshape(n_tasks, ways * shots),
        query=examples[..., shots:].reshape(n_tasks, ways * queries),
    )


def _gather(images: np.ndarray, index: np.ndarray, turns: np.ndarray) -> np.ndarray:
    x = images[index].astype(np.float32, copy=False)  # [n, m, H, W, ...]
    for k in (1, 2, 3):
        where = turns == k
        if where.any():
            x[where] = np.rot90(x[where], k, axes=(1, 2))
    return x


def few_shot_tasks(
    images, labels, n_tasks: int, ways: int, shots: int, queries: int, seed: int, classes=None, *, rotate: bool = False
) -> TaskSet:
    """Sample n_tasks N-way K-shot classification tasks.

    Args:
      images: [N, H, W] or [N, H, W, C] image array (any real dtype; gathered as float32).
      labels: [N] int class ids.
      n_tasks, ways, shots, queries: tasks; classes per task; support and query examples per class.
      seed: int seed; the same arguments and seed give the same tasks.
      classes: class ids to draw from (e.g. `omniglot_split().train`); default all classes in labels.
      rotate: count each 90° rotation of a class as a class of its own (4× the classes).

    Returns:
      TaskSet with support {"x": [n, ways·shots, H, W(, C)] float32, "y": [n, ways·shots] int32}
      and query {"x": [n, ways·queries, ...], "y": [n, ways·queries] int32}, labels 0..ways-1.
      `few_shot_indices` (same arguments) gives the example indices and source classes.
    """
    images = np.asarray(images)
    if images.ndim not in (3, 4) or not (
        np.issubdtype(images.dtype, np.floating) or np.issubdtype(images.dtype, np.integer)
    ):
        raise TypeError(
            f"few_shot_tasks(images) must be a real [N, H, W] or [N, H, W, C] array; received {_validate.describe(images)}."
        )
    labels_array = np.asarray(labels)
    if labels_array.shape != images.shape[:1]:
        raise ValueError(
            f"few_shot_tasks(labels) must have shape ({images.shape[0]},), one label per image; received {_validate.describe(labels_array)}."
        )
    if rotate and images.shape[1] != images.shape[2]:
        raise ValueError(f"few_shot_tasks(rotate=True) needs square images; received images of shape {images.shape}.")
    index = _sample("few_shot_tasks", labels_array, n_tasks, ways, shots, queries, seed, classes, rotate)
    if np.issubdtype(images.dtype, np.floating):
        used = np.unique(np.concatenate([index.support.ravel(), index.query.ravel()]))
        _args.check_finite(
            "few_shot_tasks(images)",
            images[used],
            "images drawn into the tasks",
            "Drop or repair those images first (np.isfinite(images).all(axis=(1, 2)) marks the good ones).",
            used,
        )
    label = np.arange(ways, dtype=np.int32)
    s_turns = np.repeat(index.rotations, shots, axis=1)
    q_turns = np.repeat(index.rotations, queries, axis=1)
    return TaskSet(
        support={
            "x": _gather(images, index.support, s_turns),
            "y": np.broadcast_to(np.repeat(label, shots), index.support.shape).copy(),
        },
        query={
            "x": _gather(images, index.query, q_turns),
            "y": np.broadcast_to(np.repeat(label, queries), index.query.shape).copy(),
        },
    )
