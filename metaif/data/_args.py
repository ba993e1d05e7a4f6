"""Argument checks shared by the data loaders and samplers (errors name the argument, show what
was received and say what is expected)."""

from __future__ import annotations

import numbers

import numpy as np

from .. import _validate


def seed(name: str, value) -> int:
    """A reproducible seed: an int >= 0."""
    if not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_)) or value < 0:
        raise ValueError(
            f"{name} must be an int >= 0 (a seed for numpy.random.default_rng); received {_validate.describe(value)}."
        )
    return int(value)


def non_negative_int(name: str, value) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_)) or value < 0:
        raise ValueError(f"{name} must be an int >= 0; received {_validate.describe(value)}.")
    return int(value)


def fraction(name: str, value) -> float:
    value = _validate.non_negative(name, value)
    if value > 1:
        raise ValueError(f"{name} must be a fraction in [0, 1]; received {value!r}.")
    return value


def interval(name: str, value) -> tuple[float, float]:
    """A (low, high) pair of finite floats with low <= high."""
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{name} must be a pair (low, high) of numbers; received {_validate.describe(value)}."
        ) from None
    if not (np.isfinite(low) and np.isfinite(high) and low <= high):
        raise ValueError(f"{name} must be a pair (low, high) of finite numbers with low <= high; received {value!r}.")
    return low, high


def integer_array(name: str, value, ndim: int) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim != ndim or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
        raise TypeError(f"{name} must be a {ndim}-D array of integers; received {_validate.describe(array)}.")
    return array.astype(np.int64, copy=False)


def non_finite(values: np.ndarray) -> tuple[int, np.ndarray]:
    """(number of NaN or inf entries, indices along axis 0 of the items that hold any); (0, [])
    for non-float arrays. Two reductions and no copy when every entry is finite."""
    values = np.asarray(values)
    if (
        not np.issubdtype(values.dtype, np.floating)
        or values.size == 0
        or (np.isfinite(values.min()) and np.isfinite(values.max()))
    ):
        return 0, np.zeros(0, np.int64)
    bad = ~np.isfinite(values.reshape(values.shape[0], -1))
    return int(bad.sum()), np.flatnonzero(bad.any(axis=1))


def check_finite(name: str, values: np.ndarray, items: str, fix: str, index: np.ndarray | None = None) -> None:
    """Raise a ValueError naming `name`, the count of NaN/inf values and the first items holding
    them (positions along axis 0, or `index[position]`)."""
    count, bad = non_finite(values)
    if count:
        shown = (bad if index is None else np.asarray(index)[bad])[:10].tolist()
        raise ValueError(
            f"{name} holds {count} NaN or inf value(s) in {bad.size} of {len(values)} {items} (indices "
            f"{shown}{' ...' if bad.size > 10 else ''}). {fix}"
        )
