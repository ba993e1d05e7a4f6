"""Per-example input layouts: which trailing axes of an input form one example."""

from __future__ import annotations

from typing import Sequence

import jax

from .. import _validate


def example_shape(name: str, shape: int | Sequence[int]) -> tuple[int, ...]:
    """A validated example shape (an int d means vectors [d])."""
    dims = (shape,) if isinstance(shape, int) else tuple(shape) if isinstance(shape, (tuple, list)) else None
    if not dims or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims):
        raise ValueError(f"{name} must be an int >= 1 or a tuple of ints >= 1; received {_validate.describe(shape)}.")
    return dims


def leading_axes(name: str, x: jax.Array, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The batch axes in front of one example of `shape` in `x`.

    A trailing channel axis of size 1 is optional: for `shape` (28, 28) or (28, 28, 1), inputs
    [..., 28, 28, 1] and [..., 28, 28] are both accepted. The longer reading wins, so [28, 28, 1]
    is one example, not a batch of 28.
    """
    core = shape[:-1] if len(shape) > 1 and shape[-1] == 1 else shape
    got = tuple(getattr(x, "shape", ()))
    for candidate in (core + (1,), core):
        k = len(candidate)
        if len(got) >= k and got[len(got) - k :] == candidate:
            return got[: len(got) - k]
    dims = ", ".join(map(str, core))
    shown = f"[..., {dims}] or [..., {dims}, 1]"
    raise ValueError(
        f"{name} must have one example's shape {shown} after any batch axes; received {_validate.describe(x)}."
    )
