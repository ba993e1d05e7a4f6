"""A fixed feature map for images: whitened PCA fitted on meta-training images only, which keeps
the input (and so the number of meta-parameters d) small enough for exact Hessians."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import _validate


class PCA(NamedTuple):
    """Whitened PCA x ↦ ((x − mean) @ components) / scale of flattened images.

    Attributes:
      mean: [D] pixel means; components: [D, k] principal directions; scale: [k] their standard
      deviations (so features have unit variance on the fitting images).
    """

    mean: np.ndarray
    components: np.ndarray
    scale: np.ndarray

    def __call__(self, images) -> np.ndarray:
        """Features [..., k] float64 of images [..., H, W] or [..., H, W, C] (trailing dims flattened)."""
        images = np.asarray(images)
        rank = _image_rank(images, self.mean.size)
        flat = images.reshape(*images.shape[: images.ndim - rank], -1)
        return (flat.astype(np.float64) - self.mean) @ self.components / self.scale


def _image_rank(images: np.ndarray, size: int) -> int:
    """How many trailing axes of `images` form one image of `size` values."""
    count = 1
    for rank in range(1, images.ndim + 1):
        count *= images.shape[-rank]
        if count == size:
            return rank
    raise ValueError(f"PCA: images of shape {images.shape} do not end with an image of {size} values.")


def fit_pca(images, k: int, limit: int = 20000, seed: int = 0) -> PCA:
    """Fit a whitened k-component PCA on images [N, H, W(, C)] (at most `limit` random images)."""
    images = np.asarray(images)
    if images.ndim < 2 or images.shape[0] < 2:
        raise ValueError(f"fit_pca(images) must be an array [N, ...] of N >= 2 images; received {_validate.describe(images)}.")
    flat = images.reshape(images.shape[0], -1).astype(np.float64)
    k = _validate.positive_int("fit_pca(k)", k)
    if k > min(flat.shape):
        raise ValueError(f"fit_pca(k) = {k} exceeds min(number of images, pixels per image) = {min(flat.shape)}.")
    if flat.shape[0] > limit:
        flat = flat[np.random.default_rng(seed).choice(flat.shape[0], limit, replace=False)]
    mean = flat.mean(0)
    _, s, vt = np.linalg.svd(flat - mean, full_matrices=False)
    scale = np.maximum(s[:k] / np.sqrt(flat.shape[0]), 1e-12)
    return PCA(mean, vt[:k].T, scale)
