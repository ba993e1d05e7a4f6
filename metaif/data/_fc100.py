"""FC100 (Oreshkin et al. 2018, TADAM): CIFAR-100 split by superclass into 12 meta-train, 4
meta-val and 4 meta-test superclasses (60/20/20 classes of 600 images: CIFAR's train and test
images together).

Reads the official CIFAR-100 python-version files (`cifar-100-python/{train,test,meta}`). They are
Python pickles; they are read with an unpickler that only admits plain containers and numpy
arrays, so a tampered file cannot run code.
"""

from __future__ import annotations

import codecs
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import _source

_SOURCE = (
    "Download cifar-100-python.tar.gz (python version) from https://www.cs.toronto.edu/~kriz/cifar.html "
    "and extract it into <root> (giving <root>/cifar-100-python/{train,test,meta})."
)
# md5 of the official files (as published with torchvision's CIFAR100).
_MD5 = {
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}
# The FC100 superclass split (Oreshkin et al. 2018), by CIFAR-100 coarse label name.
SUPERCLASSES = {
    "train": (
        "fish",
        "flowers",
        "food_containers",
        "fruit_and_vegetables",
        "household_electrical_devices",
        "household_furniture",
        "large_man-made_outdoor_things",
        "large_natural_outdoor_scenes",
        "reptiles",
        "trees",
        "vehicles_1",
        "vehicles_2",
    ),
    "val": ("large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates", "small_mammals"),
    "test": ("aquatic_mammals", "insects", "medium_mammals", "people"),
}
SPLITS = ("train", "val", "test")
try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]
# What pickled numpy arrays need, under numpy 1.x and 2.x module names, and nothing else.
_ALLOWED = {
    **{
        (module, name): getattr(_multiarray, name)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("_reconstruct", "scalar")
    },
    **{(module, "_frombuffer"): _numeric._frombuffer for module in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # bytes in protocol-2 pickles written by Python 3
}


class FC100(NamedTuple):
    """Attributes:
    images: [N, 32, 32, 3] float32 RGB in [0, 1] (N = 60,000 for all splits).
    labels: [N] int32 CIFAR-100 fine class ids 0..99 (select a split's classes with `split`).
    superclasses: [N] int32 CIFAR-100 coarse class ids 0..19.
    split: [N] str, "train", "val" or "test" (the FC100 superclass split).
    class_names: the 100 fine class names; superclass_names: the 20 coarse names.
    """

    images: np.ndarray
    labels: np.ndarray
    superclasses: np.ndarray
    split: np.ndarray
    class_names: tuple[str, ...]
    superclass_names: tuple[str, ...]


class _Unpickler(pickle.Unpickler):
    """Admits only numpy's array/dtype reconstruction (under its old `numpy.core` or new
    `numpy._core` module names); everything else in the files is built-in containers."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a CIFAR-100 file holds only lists, dicts and numpy arrays"
        )


def _unpickle(loader: str, path: Path) -> dict[str, object]:
    try:
        with open(path, "rb") as handle:
            content = _Unpickler(handle, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise ValueError(
            f"{loader}: {str(path)!r} is not a CIFAR-100 python-version file ({error}). {_SOURCE}"
        ) from None
    if not isinstance(content, dict):
        raise ValueError(f"{loader}: {str(path)!r} holds a {type(content).__name__}, expected a dict. {_SOURCE}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in content.items()}


def _field(loader: str, path: Path, content: dict, key: str):
    if key not in content:
        raise ValueError(f"{loader}: {str(path)!r} lacks the field {key!r} (has {sorted(content)}). {_SOURCE}")
    return content[key]


def _names(values) -> tuple[str, ...]:
    return tuple(v.decode() if isinstance(v, bytes) else str(v) for v in values)


def load_fc100(root: str | os.PathLike | None = None, *, splits: Sequence[str] = SPLITS, verify: bool = True) -> FC100:
    """FC100 from the CIFAR-100 python-version files.

    Args:
      root: folder holding `cifar-100-python/` (or its files `train`, `test`, `meta` directly);
        default $METAIF_DATA.
      splits: which of "train", "val", "test" to keep.
      verify: check the md5 of the three files against the official release.
    """
    loader = "load_fc100"
    if isinstance(splits, str) or not splits or any(s not in SPLITS for s in splits) or len(set(splits)) != len(splits):
        raise ValueError(
            f"load_fc100(splits) must be a non-empty sequence of distinct names from {SPLITS}; received {splits!r}."
        )
    folders = _source.candidates(
        _source.data_root(loader, root), ("cifar-100-python", "fc100/cifar-100-python", "fc100", "cifar100")
    )
    paths = {
        name: _source.find(loader, folders, (name,), f"the CIFAR-100 file {name!r}", _SOURCE)
        for name in ("train", "test", "meta")
    }
    if verify:
        for name, path in paths.items():
            _source.check_digest(loader, path, _MD5[name], _source.file_digest(path, "md5"), "md5", _SOURCE)
    meta = _unpickle(loader, paths["meta"])
    class_names = _names(_field(loader, paths["meta"], meta, "fine_label_names"))
    superclass_names = _names(_field(loader, paths["meta"], meta, "coarse_label_names"))
    missing = [n for names in SUPERCLASSES.values() for n in names if n not in superclass_names]
    if missing:
        raise ValueError(f"{loader}: {str(paths['meta'])!r} lacks the CIFAR-100 superclasses {missing}. {_SOURCE}")
    images, labels, coarse = [], [], []
    for name in ("train", "test"):
        content = _unpickle(loader, paths[name])
        data = np.asarray(_field(loader, paths[name], content, "data"), np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(
                f"{loader}: {str(paths[name])!r} field 'data' has shape {data.shape}, expected [N, 3072]. {_SOURCE}"
            )
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(_field(loader, paths[name], content, "fine_labels"), np.int32))
        coarse.append(np.asarray(_field(loader, paths[name], content, "coarse_labels"), np.int32))
    images, labels, coarse = np.concatenate(images), np.concatenate(labels), np.concatenate(coarse)
    if not images.shape[0] == labels.shape[0] == coarse.shape[0]:
        raise ValueError(
            f"{loader}: {images.shape[0]} images but {labels.shape[0]} fine and {coarse.shape[0]} coarse labels. {_SOURCE}"
        )
    split_of = np.empty(len(superclass_names), dtype="<U5")
    for split, names in SUPERCLASSES.items():
        split_of[[superclass_names.index(n) for n in names]] = split
    split = split_of[coarse]
    keep = np.isin(split, splits)
    return FC100(
        images=images[keep].astype(np.float32) / np.float32(255),
        labels=labels[keep],
        superclasses=coarse[keep],
        split=split[keep],
        class_names=class_names,
        superclass_names=superclass_names,
    )
