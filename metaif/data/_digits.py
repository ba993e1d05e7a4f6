"""scikit-learn's bundled 8×8 handwritten digits (UCI): no download needed."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import _source


class Digits(NamedTuple):
    """Attributes:
    images: [1797, 8, 8] float32 in [0, 1], ink = 1 (the source counts 0..16 per pixel).
    labels: [1797] int32 digits 0..9.
    """

    images: np.ndarray
    labels: np.ndarray


def load_digits() -> Digits:
    """The 1,797 digits of `sklearn.datasets.load_digits`, scaled to [0, 1] (needs scikit-learn)."""
    datasets = _source.require("sklearn.datasets", "scikit-learn", "load_digits")
    bunch = datasets.load_digits()
    return Digits(
        images=(np.asarray(bunch.images) / 16.0).astype(np.float32), labels=np.asarray(bunch.target, np.int32)
    )
