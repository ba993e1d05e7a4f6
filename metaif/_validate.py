"""Argument checks at the public boundary: each error names the argument, shows what was
received and says what is expected."""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import numpy as np


def describe(value: Any) -> str:
    """A short description of a received value for error messages."""
    if isinstance(value, np.generic):
        return f"numpy scalar {value!r}"
    if isinstance(value, (jax.Array, np.ndarray)) or hasattr(value, "shape"):
        return f"array of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)


def non_negative(name: str, value: Any) -> float:
    """The value as a Python float (numpy scalars accepted), or a ValueError."""
    if not _real(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0; received {describe(value)}.")
    return float(value)


def positive(name: str, value: Any) -> float:
    if not _real(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0; received {describe(value)}.")
    return float(value)


def positive_int(name: str, value: Any) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_)) or value < 1:
        raise ValueError(f"{name} must be an int >= 1; received {describe(value)}.")
    return int(value)


def set_fields(instance: Any, **values: Any) -> None:
    """Store validated (coerced) values on a frozen dataclass from its __post_init__."""
    for name, value in values.items():
        object.__setattr__(instance, name, value)


def callable_(name: str, value: Any, signature: str) -> None:
    if not callable(value):
        raise TypeError(f"{name} must be a function {signature}; received {describe(value)}.")


def is_concrete(tree: Any) -> bool:
    """True when no leaf is a tracer, so values can be checked eagerly."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def finite_tree(name: str, tree: Any) -> None:
    """Raise if any leaf of a concrete pytree holds NaN or inf (skipped under tracing)."""
    if not is_concrete(tree):
        return
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        array = np.asarray(leaf)
        if np.issubdtype(array.dtype, np.inexact) and not np.all(np.isfinite(array)):
            bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
            where = jax.tree_util.keystr(path) or "(root)"
            raise ValueError(
                f"{name} must be finite; leaf {where} ({describe(leaf)}) holds {bad} NaN or inf "
                "value(s). Check the initialisation or lower the learning rate of the training "
                "that produced it."
            )


def floating_tree(name: str, tree: Any) -> None:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError(f"{name} must be a pytree with at least one array leaf; received {describe(tree)}.")
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not np.issubdtype(np.dtype(dtype), np.floating):
            where = jax.tree_util.keystr(path) or "(root)"
            raise TypeError(
                f"{name} must have floating-point array leaves; leaf {where} is "
                f"{describe(leaf)}. Convert it with jnp.asarray(x, jnp.float32) or float64."
            )
