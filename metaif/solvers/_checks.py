"""Argument checks for solver options (in the style of `metaif._validate`): each error names the
argument, shows what was received and says what is expected."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from .. import _validate


def non_negative_int(name: str, value: Any) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_)) or value < 0:
        raise ValueError(f"{name} must be an int >= 0; received {_validate.describe(value)}.")
    return int(value)


def optional_positive(name: str, value: Any) -> float | None:
    """None (choose automatically) or a finite number > 0."""
    if value is None:
        return None
    if not _validate._real(value) or value <= 0:
        raise ValueError(
            f"{name} must be None (choose automatically) or a finite number > 0; received {_validate.describe(value)}."
        )
    return float(value)


def optional_positive_int(name: str, value: Any) -> int | None:
    """None (choose automatically) or an int >= 1."""
    if value is None:
        return None
    if not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_)) or value < 1:
        raise ValueError(
            f"{name} must be None (choose automatically) or an int >= 1; received {_validate.describe(value)}."
        )
    return int(value)


def choice(name: str, value: Any, options: tuple) -> Any:
    if not any(value is option or (isinstance(value, str) and value == option) for option in options):
        expected = ", ".join(repr(o) for o in options)
        raise ValueError(f"{name} must be one of {expected}; received {_validate.describe(value)}.")
    return value


def at_most_dimension(name: str, value: int, dimension: int) -> None:
    """Raised from `prepare`, when the number d of meta-parameters is known."""
    if value > dimension:
        raise ValueError(
            f"{name} must be at most the number of meta-parameters d = {dimension}; received {value}. Lower it."
        )
