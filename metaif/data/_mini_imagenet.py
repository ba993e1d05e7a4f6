"""Mini-ImageNet (Vinyals et al. 2016; split of Ravi & Larochelle 2017): 100 ImageNet classes,
600 images each; 64 meta-train, 16 meta-val and 20 meta-test classes.

Two layouts are read (detected automatically):
  * csv (the Ravi & Larochelle release, the most common): `train.csv`, `val.csv`, `test.csv` with
    rows `filename,label` (e.g. `n0153282900000005.jpg,n01532829`) and all images in `images/`;
  * folders: `train/<wnid>/*.jpg`, `val/<wnid>/*.jpg`, `test/<wnid>/*.jpg`.
Class ids: the train classes sorted by wnid (0..63), then val (64..79), then test (80..99).
No checksum exists for this dataset (copies differ in image encoding); `verify` checks the
standard structure instead.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .. import _validate
from . import _cache, _images, _source

_SOURCE = (
    "Mini-ImageNet is not redistributable: get the split files train.csv/val.csv/test.csv of "
    "Ravi & Larochelle (github.com/twitter/meta-learning-lstm, data/miniImagenet) and the images from "
    "ImageNet (image-net.org), laid out as <root>/mini-imagenet/{train,val,test}.csv + images/, or as "
    "<root>/mini-imagenet/{train,val,test}/<wnid>/*.jpg."
)
SPLITS = ("train", "val", "test")
_STANDARD = {"train": 64, "val": 16, "test": 20}
_PER_CLASS = 600
_SUBDIRS = ("mini-imagenet", "miniimagenet", "mini_imagenet", "miniImagenet", "miniImageNet")
_CACHE_VERSION = 1


class MiniImageNet(NamedTuple):
    """Attributes:
    images: [N, size, size, 3] float32 RGB in [0, 1] (N = 60,000 for all splits: 5 GB at 84×84).
    labels: [N] int32 class ids (train classes first, then val, then test; see the module doc);
      examples are ordered by class id, then file name.
    split: [N] str, "train", "val" or "test".
    class_names: the wnids, indexed by class id.
    """

    images: np.ndarray
    labels: np.ndarray
    split: np.ndarray
    class_names: tuple[str, ...]


def _listing(loader: str, base: Path, splits: tuple[str, ...]) -> list[tuple[str, str, Path]]:
    """(split, wnid, image path) for every image of the requested splits."""
    if all((base / f"{s}.csv").is_file() for s in splits):
        images = _source.find(loader, [base], ("images/",), "the images/ folder of the csv layout", _SOURCE)
        rows = []
        for split in splits:
            with open(base / f"{split}.csv", newline="") as handle:
                reader = csv.reader(handle)
                header = next(reader, None)
                if header is None or [h.strip() for h in header[:2]] != ["filename", "label"]:
                    raise ValueError(
                        f"{loader}: {str(base / f'{split}.csv')!r} must start with the header 'filename,label'; found {header!r}."
                    )
                rows += [(split, row[1].strip(), images / row[0].strip()) for row in reader if len(row) >= 2]
        missing = [str(p) for _, _, p in rows if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{loader}: {len(missing)} image(s) listed in the csv files are missing from {str(images)!r}, "
                f"e.g. {missing[0]!r}. {_SOURCE}"
            )
        return rows
    rows = []
    for split in splits:
        folder = base / split
        for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            rows += [
                (split, class_dir.name, p)
                for p in sorted(class_dir.iterdir())
                if p.suffix.lower() in (".jpg", ".jpeg", ".png")
            ]
    return rows


def _base(loader: str, root: Path, splits: tuple[str, ...]) -> Path:
    for base in _source.candidates(root, _SUBDIRS):
        if all((base / f"{s}.csv").is_file() for s in splits) or all((base / s).is_dir() for s in splits):
            return base
    looked = ", ".join(repr(str(b)) for b in _source.candidates(root, _SUBDIRS))
    wanted = (
        " and ".join(f"{s}.csv" for s in splits) + " (+ images/), or the folders " + ", ".join(f"{s}/" for s in splits)
    )
    raise FileNotFoundError(f"{loader}: Mini-ImageNet not found; looked for {wanted} in {looked}. {_SOURCE}")


def _check_structure(loader: str, base: Path, rows: list[tuple[str, str, Path]], splits: tuple[str, ...]) -> None:
    for split in splits:
        wnids, counts = np.unique([w for s, w, _ in rows if s == split], return_counts=True)
        if len(wnids) != _STANDARD[split] or np.any(counts != _PER_CLASS):
            raise ValueError(
                f"{loader}: the {split} split in {str(base)!r} has {len(wnids)} classes with "
                f"{sorted(set(counts.tolist()))} images each; standard Mini-ImageNet has {_STANDARD[split]} classes of "
                f"{_PER_CLASS} images. {_SOURCE} (Pass verify=False to load another variant.)"
            )


def load_mini_imagenet(
    root: str | os.PathLike | None = None,
    *,
    splits: Sequence[str] = SPLITS,
    size: int = 84,
    verify: bool = True,
    cache: bool = True,
) -> MiniImageNet:
    """Mini-ImageNet images resized to size×size (Lanczos, as in MAML), from either standard layout.

    Args:
      root: the dataset folder, or a folder holding it as `mini-imagenet/` (or `miniImagenet/`...);
        default $METAIF_DATA.
      splits: which of "train", "val", "test" to load (all 60,000 images take 5 GB as float32).
      size: output side in pixels (84 is standard).
      verify: require 64/16/20 classes of 600 images in train/val/test.
      cache: keep decoded uint8 arrays in an .npz cache keyed by the listing (paths, sizes, mtimes).
    """
    loader = "load_mini_imagenet"
    size = _validate.positive_int("load_mini_imagenet(size)", size)
    if isinstance(splits, str) or not splits or any(s not in SPLITS for s in splits) or len(set(splits)) != len(splits):
        raise ValueError(
            f"load_mini_imagenet(splits) must be a non-empty sequence of distinct names from {SPLITS}; received {splits!r}."
        )
    splits = tuple(s for s in SPLITS if s in splits)
    base = _base(loader, _source.data_root(loader, root), splits)
    rows = sorted(_listing(loader, base, splits), key=lambda r: (SPLITS.index(r[0]), r[1], r[2].name))
    if not rows:
        raise FileNotFoundError(f"{loader}: no images found under {str(base)!r} for splits {splits}. {_SOURCE}")
    if verify:
        _check_structure(loader, base, rows, splits)
    wnids = [w for split in splits for w in sorted({w for s, w, _ in rows if s == split})]
    class_of = {w: i for i, w in enumerate(wnids)}
    name = ""
    if cache:
        listing = "\n".join(f"{s}\0{w}\0{p}\0{p.stat().st_size}\0{p.stat().st_mtime_ns}" for s, w, p in rows)
        name = f"mini-imagenet-{size}px-v{_CACHE_VERSION}-{_source.sha256_bytes(listing.encode())[:24]}.npz"
    arrays = _cache.load(name) if cache else None
    if arrays is None:
        arrays = {"images": _images.decode_rgb(loader, [p for _, _, p in rows], size)}
        if cache:
            _cache.save(name, arrays)
    return MiniImageNet(
        images=arrays["images"].astype(np.float32) / np.float32(255),
        labels=np.asarray([class_of[w] for _, w, _ in rows], np.int32),
        split=np.asarray([s for s, _, _ in rows], dtype=np.str_),
        class_names=tuple(wnids),
    )
