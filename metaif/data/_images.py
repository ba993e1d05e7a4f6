"""Decoding a list of image files into one uint8 array (PIL), shared by the folder-based loaders."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import _source


def decode_rgb(loader: str, paths: list[Path], size: int) -> np.ndarray:
    """[N, size, size, 3] uint8 RGB images, each resized (Lanczos) to size×size when needed."""
    image_module = _source.require("PIL.Image", "pillow", loader)
    out = np.empty((len(paths), size, size, 3), np.uint8)
    for i, path in enumerate(paths):
        try:
            with image_module.open(path) as image:
                image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when much larger
                image = image.convert("RGB")
                if image.size != (size, size):
                    image = image.resize((size, size), image_module.Resampling.LANCZOS)
                out[i] = np.asarray(image)
        except OSError as error:
            raise ValueError(f"{loader}: cannot decode the image {str(path)!r}: {error}") from None
    return out
