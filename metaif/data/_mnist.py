"""MNIST (LeCun, Cortes & Burges): the four official IDX files, gzipped or not."""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import _source

_SOURCE = (
    "Download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
    "t10k-labels-idx1-ubyte.gz from https://yann.lecun.com/exdb/mnist/ (or a mirror) into <root>/mnist."
)
# sha256 of the decompressed IDX files: the same for the official .gz downloads, their
# re-compressions and the uncompressed files.
_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}


class MNIST(NamedTuple):
    """MNIST train (first 60,000) and test (last 10,000) images.

    Attributes:
      images: [70000, 28, 28] float32 in [0, 1], ink = 1.
      labels: [70000] int32 digits 0..9.
      train: [70000] bool, True for the official training set.
    """

    images: np.ndarray
    labels: np.ndarray
    train: np.ndarray


def parse_idx(data: bytes, name: str = "IDX data") -> np.ndarray:
    """An IDX file's uint8 array: magic 0x0000 08 <ndim>, big-endian uint32 sizes, then the data."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or data[3] < 1:
        raise ValueError(
            f"{name} is not an IDX file of unsigned bytes: its magic number is {data[:4].hex() or 'missing'}, expected 0000080N."
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(s) for s in np.frombuffer(data[4:header], ">u4"))
    if len(shape) != ndim or len(data) != header + int(np.prod(shape)):
        raise ValueError(
            f"{name}: the IDX header announces shape {shape} but the file holds {len(data) - header} data bytes."
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def _read(loader: str, folders: list[Path], base: str, verify: bool) -> np.ndarray:
    path = _source.find(loader, folders, (f"{base}.gz", base), base, _SOURCE)
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise ValueError(f"{loader}: {str(path)!r} is not a valid gzip file ({error}). {_SOURCE}") from None
    if verify:
        _source.check_digest(
            loader, path, _SHA256[base], _source.sha256_bytes(raw), "sha256 of the decompressed IDX data", _SOURCE
        )
    return parse_idx(raw, repr(str(path)))


def load_mnist(root: str | os.PathLike | None = None, *, verify: bool = True) -> MNIST:
    """MNIST train + test from the official IDX files.

    Args:
      root: folder holding the four files (`*-ubyte.gz` or uncompressed `*-ubyte`), directly or in
        `root/mnist` or `root/MNIST/raw`; default $METAIF_DATA.
      verify: check the sha256 of each file's decompressed contents.
    """
    loader = "load_mnist"
    folders = _source.candidates(_source.data_root(loader, root), ("mnist", "MNIST/raw", "MNIST"))
    parts = {base: _read(loader, folders, base, verify) for base in _SHA256}
    images = np.concatenate([parts["train-images-idx3-ubyte"], parts["t10k-images-idx3-ubyte"]])
    labels = np.concatenate([parts["train-labels-idx1-ubyte"], parts["t10k-labels-idx1-ubyte"]])
    if images.ndim != 3 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{loader}: images {images.shape} and labels {labels.shape} do not match. {_SOURCE}")
    n_train = parts["train-images-idx3-ubyte"].shape[0]
    return MNIST(
        images=images.astype(np.float32) / np.float32(255),
        labels=labels.astype(np.int32),
        train=np.arange(images.shape[0]) < n_train,
    )
