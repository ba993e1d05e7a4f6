"""A fixed feature map for images: whitened PCA fitted on meta-training images only, which keeps
the input (and so the number of meta-parameters d) small enough for exact Hessians."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import _validate
from . import _args

# A component whose singular value is below this fraction of the largest is numerically absent
# (images are float32, resolution ~1e-7): whitening it would amplify rounding noise.
RANK_TOL = 1e-6


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
        raise ValueError(
            f"fit_pca(images) must be an array [N, ...] of N >= 2 images; received {_validate.describe(images)}."
        )
    flat = images.reshape(images.shape[0], -1).astype(np.float64)
    k = _validate.positive_int("fit_pca(k)", k)
    if k > min(flat.shape):
        raise ValueError(f"fit_pca(k) = {k} exceeds min(number of images, pixels per image) = {min(flat.shape)}.")
    _args.check_finite("fit_pca(images)", flat, "images", "Drop or repair those images before fitting the PCA.")
    if flat.shape[0] > limit:
        flat = flat[np.random.default_rng(seed).choice(flat.shape[0], limit, replace=False)]
    try:
        with np.errstate(over="raise", invalid="raise"):
            mean = flat.mean(0)
            _, s, vt = np.linalg.svd(flat - mean, full_matrices=False)
    except (FloatingPointError, np.linalg.LinAlgError) as error:  # finite input, but so large that sums overflow
        raise ValueError(
            f"fit_pca(images): the PCA of the images failed ({error}); their values span "
            f"[{flat.min():.3g}, {flat.max():.3g}]. Rescale the images to [0, 1]."
        ) from None
    rank = int(np.sum(s > RANK_TOL * s[0])) if s[0] > 0 else 0
    if rank == 0:
        raise ValueError(
            f"fit_pca(images): all {flat.shape[0]} images are identical, so there is no direction of variation "
            "to keep. Check that the images were loaded correctly."
        )
    if rank < k:
        raise ValueError(
            f"fit_pca(images) vary along only {rank} direction(s) ({flat.shape[0]} images of {flat.shape[1]} "
            f"values), fewer than the {k} components asked for: whitening the others would divide by ~0. "
            f"Ask for at most {rank} component(s), or use more varied images."
        )
    scale = s[:k] / np.sqrt(flat.shape[0])
    return PCA(mean, vt[:k].T, scale)
