"""Omniglot (Lake et al., 2015): 1,623 handwritten characters from 50 alphabets, 20 drawings each.

Reads the official archives `images_background.zip` and `images_evaluation.zip` (or the folders
they unzip to) and returns images resized to size×size with ink = 1. Class ids follow a fixed
order: the background set first (alphabets sorted by name, characters by folder name), then the
evaluation set, so classes 0..963 are the official background split.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .. import _validate
from . import _args, _cache, _source

_SOURCE = (
    "Download images_background.zip and images_evaluation.zip from "
    "https://github.com/brendenlake/omniglot (folder python/) into <root>/omniglot."
)
_PARTS = ("images_background", "images_evaluation")
# (alphabets, characters, images) of each part of the official release.
_COUNTS = {"images_background": (30, 964, 19280), "images_evaluation": (20, 659, 13180)}
# sha256 over the decoded 105×105 ink masks and their paths (see `_decode`), computed once from the
# release copies in the project's shared data. It depends on pixels and paths only, not on how the
# zip or the PNGs are compressed, so byte-wise different copies of the same release agree.
_CONTENT_SHA256 = {
    "images_background": "f2c5e341c0c91e04816b41bfb37ace3bf71eb5ead876889fb1ba0971fad56ad4",
    "images_evaluation": "afef37ece44e0f352bffd5c3d717cb4addf5c7bb77a729e3764d7c37711c1359",
}
# md5 of the official zips of github.com/brendenlake/omniglot (as published with torchvision's Omniglot).
_RELEASE_MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
_CACHE_VERSION = 1
N_CLASSES = 1623
N_BACKGROUND = 964


class Omniglot(NamedTuple):
    """Omniglot in a fixed class order.

    Attributes:
      images: [32460, size, size] float32 in [0, 1], ink = 1 (the files store ink as 0).
      labels: [32460] int32 class ids 0..1622 (background classes 0..963 first).
      alphabets: [32460] int32 alphabet ids 0..49 (background alphabets 0..29 first).
      background: [32460] bool, True for the official background (meta-training) set.
      alphabet_names: the 50 alphabet folder names, indexed by alphabet id.
    """

    images: np.ndarray
    labels: np.ndarray
    alphabets: np.ndarray
    background: np.ndarray
    alphabet_names: tuple[str, ...]


class ClassSplit(NamedTuple):
    """Class ids for meta-training, meta-validation and meta-testing (1-D int64 arrays)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def _damaged(loader: str, source: Path, part: str, error: Exception) -> ValueError:
    """The error for an archive that zipfile cannot read: which file, that it is damaged, the checksum to compare."""
    return ValueError(
        f"{loader}: the Omniglot archive {str(source)!r} is damaged or incomplete (zipfile: {error}). Delete it and download "
        f"{part}.zip again. To check a copy, compare its md5 (this file: {_source.file_digest(source, 'md5')}) with the "
        f"official release's {_RELEASE_MD5[part]} (a re-zipped copy of the same images differs byte-wise; metaif "
        f"then checks the decoded images instead). {_SOURCE}"
    )


def _members(loader: str, source: Path, part: str) -> list[tuple[str, bytes]]:
    """(relative path 'part/alphabet/character/file.png', PNG bytes), sorted by path components
    (the same order for a zip and for its unzipped folder)."""
    if source.is_file():
        try:
            with zipfile.ZipFile(source) as archive:
                names = sorted(n for n in archive.namelist() if n.endswith(".png") and not n.startswith("__MACOSX"))
                members = [(n, archive.read(n)) for n in names]
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as error:
            raise _damaged(loader, source, part, error) from None
    else:
        members = [(p.relative_to(source.parent).as_posix(), p.read_bytes()) for p in sorted(source.rglob("*.png"))]
    good = sorted(
        ((n, b) for n, b in members if len(n.split("/")) == 4 and n.split("/")[0] == part),
        key=lambda m: m[0].split("/"),
    )
    if not good:
        raise ValueError(
            f"{loader}: {str(source)!r} holds no images laid out as {part}/<alphabet>/<character>/<image>.png. {_SOURCE}"
        )
    return good


def _decode(loader: str, source: Path, members: list[tuple[str, bytes]], size: int) -> tuple[np.ndarray, str]:
    """Decode PNGs: [N, size, size] uint8 ink images (Lanczos resize, as in MAML) and a content digest."""
    image_module = _source.require("PIL.Image", "pillow", "load_omniglot")
    digest = hashlib.sha256()
    out = np.empty((len(members), size, size), np.uint8)
    for i, (name, data) in enumerate(members):
        try:
            with image_module.open(io.BytesIO(data)) as image:
                ink = 255 - np.asarray(image.convert("L"))
        except OSError as error:  # PIL.UnidentifiedImageError included
            raise ValueError(
                f"{loader}: cannot decode the image {name!r} of {str(source)!r} ({error}); it is damaged. {_SOURCE}"
            ) from None
        digest.update(name.encode() + b"\0" + np.asarray(ink.shape, ">u4").tobytes() + np.packbits(ink > 127).tobytes())
        small = (
            image_module.fromarray(ink)
            if ink.shape == (size, size)
            else image_module.fromarray(ink).resize((size, size), image_module.Resampling.LANCZOS)
        )
        out[i] = np.asarray(small)
    return out, digest.hexdigest()


def _read_part(loader: str, source: Path, part: str, size: int, verify: bool) -> dict[str, np.ndarray]:
    members = _members(loader, source, part)
    paths = [name.split("/") for name, _ in members]
    alphabet_names = sorted({p[1] for p in paths})
    characters = sorted({(p[1], p[2]) for p in paths})
    if verify and (len(alphabet_names), len(characters), len(members)) != _COUNTS[part]:
        raise ValueError(
            f"{loader}: {str(source)!r} holds {len(alphabet_names)} alphabets, {len(characters)} characters and "
            f"{len(members)} images; the official {part} set has {_COUNTS[part][0]}, {_COUNTS[part][1]} and "
            f"{_COUNTS[part][2]}. {_SOURCE} (Pass verify=False to load a modified copy.)"
        )
    images, content = _decode(loader, source, members, size)
    alphabet_of = {name: i for i, name in enumerate(alphabet_names)}
    class_of = {key: i for i, key in enumerate(characters)}
    return {
        "images": images,
        "labels": np.asarray([class_of[(p[1], p[2])] for p in paths], np.int32),
        "alphabets": np.asarray([alphabet_of[p[1]] for p in paths], np.int32),
        "alphabet_names": np.asarray(alphabet_names, dtype=np.str_),
        "content_sha256": np.asarray(content, dtype=np.str_),
    }


def _part(loader: str, root: Path, part: str, size: int, verify: bool, cache: bool) -> dict[str, np.ndarray]:
    folders = _source.candidates(root, ("omniglot", "Omniglot", "omniglot-py"))
    source = _source.find(loader, folders, (f"{part}.zip", f"{part}/"), f"the Omniglot {part} set", _SOURCE)
    name = f"omniglot-{part}-{size}px-v{_CACHE_VERSION}-{_source.fingerprint(source)[:24]}.npz"
    arrays = _cache.load(name) if cache else None
    if arrays is None:
        arrays = _read_part(loader, source, part, size, verify)
        if cache:
            _cache.save(name, arrays)
    if verify:
        _source.check_digest(
            loader,
            source,
            _CONTENT_SHA256[part],
            str(arrays["content_sha256"]),
            "sha256 of the decoded images",
            _SOURCE,
        )
    return arrays


def load_omniglot(
    root: str | os.PathLike | None = None, *, size: int = 28, verify: bool = True, cache: bool = True
) -> Omniglot:
    """All 32,460 Omniglot images with class, alphabet and background/evaluation labels.

    Args:
      root: folder holding `images_background.zip` and `images_evaluation.zip` (or their unzipped
        folders), directly or in `root/omniglot`; default $METAIF_DATA.
      size: output side in pixels (Lanczos resize from 105×105, as in MAML; 28 is standard).
      verify: check the official counts and the sha256 of the decoded pixels.
      cache: keep the decoded arrays in an .npz cache ($METAIF_CACHE or ~/.cache/metaif) keyed by
        the source's sha256; later calls read it instead of decoding 32,460 PNGs.
    """
    loader = "load_omniglot"
    size = _validate.positive_int("load_omniglot(size)", size)
    base = _source.data_root(loader, root)
    arrays = [_part(loader, base, part, size, verify, cache) for part in _PARTS]
    n_classes = int(arrays[0]["labels"].max()) + 1
    n_alphabets = len(arrays[0]["alphabet_names"])
    return Omniglot(
        images=np.concatenate([a["images"] for a in arrays]).astype(np.float32) / np.float32(255),
        labels=np.concatenate([arrays[0]["labels"], arrays[1]["labels"] + n_classes]),
        alphabets=np.concatenate([arrays[0]["alphabets"], arrays[1]["alphabets"] + n_alphabets]),
        background=np.concatenate([np.ones(len(arrays[0]["labels"]), bool), np.zeros(len(arrays[1]["labels"]), bool)]),
        alphabet_names=tuple(str(n) for a in arrays for n in a["alphabet_names"]),
    )


def omniglot_split(n_train: int = 1200, n_val: int = 0, *, seed: int | None = None) -> ClassSplit:
    """The standard Omniglot class split over `load_omniglot` class ids.

    Convention: the 1,623 classes in `load_omniglot` order (964 background classes, then 659
    evaluation classes); meta-train = the first `n_train`, meta-val = the next `n_val`, meta-test =
    the rest. The default gives the usual counts (Santoro et al. 2016; Finn et al. 2017): 1,200
    meta-train classes (all 964 background classes and the first 236 evaluation classes) and 423
    meta-test classes, all from evaluation alphabets. MAML's counts are `omniglot_split(1100, 100)`.
    With `seed`, the classes are shuffled first, a random class split as in MAML's own code (not
    its exact permutation). Rotation classes (`few_shot_tasks(..., rotate=True)`) follow the
    split of their base class.
    """
    n_train = _validate.positive_int("omniglot_split(n_train)", n_train)
    n_val = _args.non_negative_int("omniglot_split(n_val)", n_val)
    if n_train + n_val >= N_CLASSES:
        raise ValueError(
            f"omniglot_split: n_train + n_val must leave test classes out of {N_CLASSES}; received n_train={n_train}, n_val={n_val}."
        )
    order = np.arange(N_CLASSES, dtype=np.int64)
    if seed is not None:
        order = np.random.default_rng(_args.seed("omniglot_split(seed)", seed)).permutation(order)
    return ClassSplit(order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :])
