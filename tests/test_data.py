"""metaif.data: loaders on the real files ($METAIF_DATA, else ../shared/data) and on generated
fixtures of the same layouts, few-shot sampling invariants, label corruption, sinusoid ground truth."""

import gzip
import io
import itertools
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import metaif
from metaif import data
from metaif.data import _mnist, _omniglot

from _paths import DATA  # $METAIF_DATA, else ../shared/data

needs_omniglot = pytest.mark.skipif(
    not (DATA / "omniglot").is_dir(), reason=f"Omniglot archives not found in {DATA}/omniglot"
)
needs_mnist = pytest.mark.skipif(not (DATA / "mnist").is_dir(), reason=f"MNIST IDX files not found in {DATA}/mnist")


@pytest.fixture(scope="module")
def omniglot():
    # The first call decodes 32,460 PNGs (~15-20 s here) and caches them in ~/.cache/metaif (or
    # $METAIF_CACHE); later runs read the cache.
    return data.load_omniglot(DATA)


@pytest.fixture(scope="module")
def mnist():
    return data.load_mnist(DATA)


def toy_images(n_classes=6, per_class=7, side=5):
    """Distinct images: image i is filled with i (so x identifies its example), labels class-major."""
    n = n_classes * per_class
    rng = np.random.default_rng(0)
    images = np.arange(n, dtype=np.float32)[:, None, None] + rng.random((n, side, side), dtype=np.float32) * 0.1
    labels = np.repeat(np.arange(n_classes) * 10 + 3, per_class)  # non-contiguous class ids
    perm = rng.permutation(n)
    return images[perm], labels[perm]


# --------------------------------------------------------------------------------------------- Omniglot


@needs_omniglot
def test_omniglot_real_files(omniglot):
    o = omniglot
    assert o.images.shape == (32460, 28, 28) and o.images.dtype == np.float32
    assert o.images.min() == 0.0 and o.images.max() == 1.0
    assert 0.02 < o.images.mean() < 0.3  # ink = 1 is the minority: strokes on a blank page
    assert o.images[:, 0, :].mean() < 0.05  # borders are blank (0)
    assert o.labels.dtype == np.int32 and np.array_equal(np.unique(o.labels), np.arange(1623))
    assert np.all(np.bincount(o.labels) == 20)
    assert np.array_equal(np.unique(o.alphabets), np.arange(50)) and len(o.alphabet_names) == 50
    assert o.background.dtype == bool and o.background.sum() == 19280
    assert np.array_equal(np.unique(o.labels[o.background]), np.arange(964))
    assert np.array_equal(np.unique(o.alphabets[o.background]), np.arange(30))
    assert o.alphabet_names[0] == "Alphabet_of_the_Magi"
    # each class lies in one alphabet
    assert all(len(set(o.alphabets[o.labels == c])) == 1 for c in (0, 500, 963, 964, 1622))


@needs_omniglot
def test_omniglot_split_and_rotated_tasks(omniglot):
    split = data.omniglot_split()
    assert [len(s) for s in split] == [1200, 0, 423]
    assert np.array_equal(split.train, np.arange(1200)) and np.array_equal(split.test, np.arange(1200, 1623))
    assert not np.any(omniglot.background[np.isin(omniglot.labels, split.test)])  # test = evaluation alphabets
    assert np.all(omniglot.background[np.isin(omniglot.labels, np.arange(964))])
    maml = data.omniglot_split(1100, 100)
    assert [len(s) for s in maml] == [1100, 100, 423] and np.array_equal(maml.val, np.arange(1100, 1200))
    shuffled = data.omniglot_split(1100, 100, seed=3)
    assert np.array_equal(np.sort(np.concatenate(shuffled)), np.arange(1623))
    assert not np.array_equal(shuffled.train, maml.train)

    tasks = data.few_shot_tasks(
        omniglot.images, omniglot.labels, 40, 20, 1, 5, seed=0, classes=split.train, rotate=True
    )
    index = data.few_shot_indices(omniglot.labels, 40, 20, 1, 5, seed=0, classes=split.train, rotate=True)
    assert tasks.support["x"].shape == (40, 20, 28, 28) and tasks.query["x"].shape == (40, 100, 28, 28)
    assert np.all(np.isin(index.classes, split.train)) and set(np.unique(index.rotations)) == {0, 1, 2, 3}
    rotated = np.rot90(omniglot.images[index.query[3, 7]], index.rotations[3, 1], axes=(0, 1))
    np.testing.assert_array_equal(tasks.query["x"][3, 7], rotated)


def _png(ink: np.ndarray) -> bytes:
    """A 1-bit PNG as in the Omniglot release: 1 = background, 0 = ink."""
    buffer = io.BytesIO()
    Image.fromarray(~ink).convert("1").save(buffer, format="PNG")
    return buffer.getvalue()


def _fake_omniglot(folder: Path, shift: int = 0) -> dict[str, np.ndarray]:
    """A tiny Omniglot in the official zip layout: background 2 alphabets × 2 characters,
    evaluation 1 × 2, 3 drawings each; returns the ink masks in load order."""
    folder.mkdir(parents=True, exist_ok=True)
    layout = {"images_background": {"Beta": 2, "Alpha": 2}, "images_evaluation": {"Gamma": 2}}
    masks = []
    for part, alphabets in layout.items():
        with zipfile.ZipFile(folder / f"{part}.zip", "w") as archive:
            for alphabet in sorted(alphabets):
                for c in range(1, alphabets[alphabet] + 1):
                    for d in range(1, 4):
                        ink = np.zeros((105, 105), bool)
                        k = len(masks) + shift
                        ink[10 + k : 30 + k, 5 + 2 * d : 60] = True
                        masks.append(ink)
                        archive.writestr(f"{part}/{alphabet}/character{c:02d}/0{c}{d}_{d:02d}.png", _png(ink))
    return np.stack(masks)


def test_omniglot_layout_cache_and_invalidation(tmp_path, monkeypatch):
    monkeypatch.setenv("METAIF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("METAIF_DATA", str(tmp_path / "data"))
    masks = _fake_omniglot(tmp_path / "data" / "omniglot")
    first = data.load_omniglot(size=105, verify=False)  # root from $METAIF_DATA; 105 px: no resize
    np.testing.assert_array_equal(first.images, masks.astype(np.float32))  # ink = 1
    np.testing.assert_array_equal(first.labels, np.repeat(np.arange(6), 3))
    np.testing.assert_array_equal(first.alphabets, np.repeat([0, 0, 1, 1, 2, 2], 3))
    assert first.alphabet_names == ("Alpha", "Beta", "Gamma")
    np.testing.assert_array_equal(first.background, np.arange(18) < 12)
    assert len(list((tmp_path / "cache").glob("omniglot-*.npz"))) == 2
    assert not list((tmp_path / "cache").glob("*.tmp"))  # atomic write left no temporary file

    def fail(*args):
        raise AssertionError("decoded again despite a valid cache")

    with monkeypatch.context() as patch:
        patch.setattr(_omniglot, "_decode", fail)
        again = data.load_omniglot(size=105, verify=False)
    np.testing.assert_array_equal(again.images, first.images)

    changed = _fake_omniglot(tmp_path / "data" / "omniglot", shift=1)  # the source changes
    np.testing.assert_array_equal(data.load_omniglot(size=105, verify=False).images, changed.astype(np.float32))
    small = data.load_omniglot(size=28, verify=False)
    assert small.images.shape == (18, 28, 28) and small.images.dtype == np.float32
    assert 0.0 <= small.images.min() and small.images.max() <= 1.0

    # unzipped folders work too and decode to the same arrays
    unzipped = tmp_path / "unzipped"
    for part in ("images_background", "images_evaluation"):
        zipfile.ZipFile(tmp_path / "data" / "omniglot" / f"{part}.zip").extractall(unzipped)
    np.testing.assert_array_equal(
        data.load_omniglot(unzipped, size=105, verify=False, cache=False).images, changed.astype(np.float32)
    )


def test_omniglot_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("METAIF_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("METAIF_DATA", raising=False)
    with pytest.raises(ValueError, match="METAIF_DATA"):
        data.load_omniglot()
    with pytest.raises(FileNotFoundError, match=r"images_background\.zip.*github\.com/brendenlake/omniglot"):
        data.load_omniglot(tmp_path)
    with pytest.raises(FileNotFoundError, match="not an existing folder"):
        data.load_omniglot(tmp_path / "nowhere")
    with pytest.raises(TypeError, match="root must be a path"):
        data.load_omniglot(3)
    _fake_omniglot(tmp_path / "omniglot")
    with pytest.raises(ValueError, match="official images_background set has 30, 964 and 19280"):
        data.load_omniglot(tmp_path)
    # Counts right, pixels not the release: the content checksum catches it (also on a cache hit).
    monkeypatch.setattr(_omniglot, "_COUNTS", {"images_background": (2, 4, 12), "images_evaluation": (1, 2, 6)})
    for _ in range(2):
        with pytest.raises(ValueError, match="checksum mismatch.*images_background.zip"):
            data.load_omniglot(tmp_path)
    with pytest.raises(ValueError, match=r"load_omniglot\(size\)"):
        data.load_omniglot(tmp_path, size=0)


# --------------------------------------------------------------------------------------------- MNIST and digits


@needs_mnist
def test_mnist_real_files(mnist):
    m = mnist
    assert m.images.shape == (70000, 28, 28) and m.images.dtype == np.float32
    assert m.images.min() == 0.0 and m.images.max() == 1.0
    assert 0.1 < m.images.mean() < 0.15 and m.images[:, 0, :].mean() < 1e-3  # ink = 1, blank border
    assert m.labels.dtype == np.int32 and m.train.sum() == 60000 and np.all(m.train[:60000])
    np.testing.assert_array_equal(np.bincount(m.labels), [6903, 7877, 6990, 7141, 6824, 6313, 6876, 7293, 6825, 6958])
    np.testing.assert_array_equal(m.labels[:5], [5, 0, 4, 1, 9])  # the familiar first training digits


@needs_mnist
def test_mnist_uncompressed_corrupt_and_missing(tmp_path):
    source = DATA / "mnist"
    for name in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        (tmp_path / name).symlink_to((source / name).resolve())
    # uncompressed files are accepted (the checksum is on the decompressed bytes)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(
        gzip.decompress((source / "train-labels-idx1-ubyte.gz").read_bytes())
    )
    labels = bytearray(gzip.decompress((source / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(labels)
    loaded = data.load_mnist(tmp_path)
    assert loaded.images.shape == (70000, 28, 28)

    labels[8 + 100] = (labels[8 + 100] + 1) % 10  # flip test label 100 (after the 8-byte header)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(labels)
    with pytest.raises(ValueError, match=r"checksum mismatch for .*t10k-labels-idx1-ubyte.*ff7bcfd4"):
        data.load_mnist(tmp_path)
    assert data.load_mnist(tmp_path, verify=False).labels[60100] != loaded.labels[60100]

    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte.*yann\.lecun\.com"):
        data.load_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="not a valid gzip file"):
        data.load_mnist(tmp_path)


def test_idx_parser():
    raw = bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + bytes(range(6))
    np.testing.assert_array_equal(_mnist.parse_idx(raw), np.arange(6, dtype=np.uint8).reshape(2, 3))
    with pytest.raises(ValueError, match="magic number"):
        _mnist.parse_idx(bytes([0, 0, 9, 2]) + raw[4:])
    with pytest.raises(ValueError, match="announces shape"):
        _mnist.parse_idx(raw[:-1])


def test_digits():
    d = data.load_digits()
    assert d.images.shape == (1797, 8, 8) and d.images.dtype == np.float32
    assert d.images.min() == 0.0 and d.images.max() == 1.0 and d.images[:, :, 0].mean() < 0.05  # ink = 1
    assert d.labels.dtype == np.int32 and np.array_equal(np.unique(d.labels), np.arange(10))


# --------------------------------------------------------------------------------------------- Mini-ImageNet


def _fake_mini_imagenet(root: Path, layout: str) -> dict[str, list[str]]:
    """3 splits × 2 classes × 3 solid-colour images (10×12) in the csv or the folder layout."""
    wnids = {"train": ["n02", "n01"], "val": ["n05", "n04"], "test": ["n09", "n08"]}
    rows = {s: [] for s in wnids}
    for s, classes in wnids.items():
        for wnid in classes:
            for j in range(3):
                colour = (int(wnid[1:]) * 20, 40 * j, 200)
                image = Image.fromarray(np.full((10, 12, 3), colour, np.uint8))
                if layout == "csv":
                    name = f"{wnid}{j:08d}.jpg"
                    (root / "images").mkdir(parents=True, exist_ok=True)
                    image.save(root / "images" / name, quality=95)
                    rows[s].append(f"{name},{wnid}")
                else:
                    (root / s / wnid).mkdir(parents=True, exist_ok=True)
                    image.save(root / s / wnid / f"{wnid}_{j}.png")
        if layout == "csv":
            (root / f"{s}.csv").write_text("filename,label\n" + "\n".join(rows[s]) + "\n")
    return wnids


@pytest.mark.parametrize("layout", ["csv", "folders"])
def test_mini_imagenet_fixture(tmp_path, monkeypatch, layout):
    monkeypatch.setenv("METAIF_CACHE", str(tmp_path / "cache"))
    _fake_mini_imagenet(tmp_path / "mini-imagenet", layout)
    d = data.load_mini_imagenet(tmp_path, size=8, verify=False)
    assert d.images.shape == (18, 8, 8, 3) and d.images.dtype == np.float32
    assert d.class_names == ("n01", "n02", "n04", "n05", "n08", "n09")  # train, val, test; sorted within
    np.testing.assert_array_equal(d.labels, np.repeat(np.arange(6), 3))
    np.testing.assert_array_equal(d.split, np.repeat(["train", "val", "test"], 6))
    wnid_number = np.array([int(n[1:]) for n in d.class_names])[d.labels]
    expected = np.stack([wnid_number * 20, np.tile(np.arange(3) * 40, 6), np.full(18, 200)], axis=1) / 255
    np.testing.assert_allclose(
        d.images.mean(axis=(1, 2)), expected, atol=4 / 255 if layout == "csv" else 1e-6
    )  # JPEG is lossy
    assert len(list((tmp_path / "cache").glob("mini-imagenet-*.npz"))) == 1
    np.testing.assert_array_equal(
        data.load_mini_imagenet(tmp_path, size=8, verify=False).images, d.images
    )  # from cache
    only_test = data.load_mini_imagenet(tmp_path / "mini-imagenet", splits=("test",), size=8, verify=False)
    assert only_test.class_names == ("n08", "n09") and only_test.images.shape == (6, 8, 8, 3)
    with pytest.raises(ValueError, match="64 classes of 600 images"):
        data.load_mini_imagenet(tmp_path, size=8)
    with pytest.raises(ValueError, match=r"load_mini_imagenet\(splits\)"):
        data.load_mini_imagenet(tmp_path, splits="train")


def test_mini_imagenet_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train\.csv.*image-net\.org"):
        data.load_mini_imagenet(tmp_path)
    _fake_mini_imagenet(tmp_path, "csv")
    (tmp_path / "images" / "n0800000001.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) listed in the csv files are missing.*n0800000001\.jpg"):
        data.load_mini_imagenet(tmp_path, verify=False, cache=False)


# --------------------------------------------------------------------------------------------- FC100

COARSE = [
    "aquatic_mammals",
    "fish",
    "flowers",
    "food_containers",
    "fruit_and_vegetables",
    "household_electrical_devices",
    "household_furniture",
    "insects",
    "large_carnivores",
    "large_man-made_outdoor_things",
    "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores",
    "medium_mammals",
    "non-insect_invertebrates",
    "people",
    "reptiles",
    "small_mammals",
    "trees",
    "vehicles_1",
    "vehicles_2",
]


def _py2_style_pickle(content) -> bytes:
    """Protocol 2 with numpy's pre-2.0 module names, as in the official (Python 2) CIFAR files."""
    return pickle.dumps(content, protocol=2).replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def _fake_cifar100(folder: Path, per_class: tuple[int, int] = (2, 1)) -> dict[str, np.ndarray]:
    """cifar-100-python/{train,test,meta}; fine class f belongs to superclass f // 5."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    out = {}
    for name, k in zip(("train", "test"), per_class):
        fine = np.tile(np.arange(100), k)
        pixels = rng.integers(0, 256, (fine.size, 3072), dtype=np.uint8)
        content = {
            b"batch_label": name.encode(),
            b"filenames": [b"x.png"] * fine.size,
            b"fine_labels": fine.tolist(),
            b"coarse_labels": (fine // 5).tolist(),
            b"data": pixels,
        }
        (folder / name).write_bytes(_py2_style_pickle(content))
        out[name] = (pixels, fine)
    meta = {
        b"fine_label_names": [f"class{i:02d}".encode() for i in range(100)],
        b"coarse_label_names": [c.encode() for c in COARSE],
    }
    (folder / "meta").write_bytes(_py2_style_pickle(meta))
    return out


def test_fc100_fixture(tmp_path):
    raw = _fake_cifar100(tmp_path / "cifar-100-python")
    d = data.load_fc100(tmp_path, verify=False)
    assert d.images.shape == (300, 32, 32, 3) and d.images.dtype == np.float32
    pixels = np.concatenate([raw["train"][0], raw["test"][0]])
    np.testing.assert_array_equal(d.images[:, :, :, 0].reshape(300, -1) * 255, pixels[:, :1024])  # R plane first
    np.testing.assert_array_equal(
        d.images[7, 2, 5], pixels[7, [2 * 32 + 5, 1024 + 2 * 32 + 5, 2048 + 2 * 32 + 5]] / np.float32(255)
    )
    np.testing.assert_array_equal(d.labels, np.concatenate([raw["train"][1], raw["test"][1]]))
    np.testing.assert_array_equal(d.superclasses, d.labels // 5)
    assert d.superclass_names == tuple(COARSE) and d.class_names[3] == "class03"
    counts = {s: np.unique(d.labels[d.split == s]).size for s in ("train", "val", "test")}
    assert counts == {"train": 60, "val": 20, "test": 20}
    assert {d.superclass_names[c] for c in np.unique(d.superclasses[d.split == "test"])} == {
        "aquatic_mammals",
        "insects",
        "medium_mammals",
        "people",
    }
    assert {d.superclass_names[c] for c in np.unique(d.superclasses[d.split == "val"])} == {
        "large_carnivores",
        "large_omnivores_and_herbivores",
        "non-insect_invertebrates",
        "small_mammals",
    }
    test_only = data.load_fc100(tmp_path, splits=("test",), verify=False)
    np.testing.assert_array_equal(test_only.images, d.images[d.split == "test"])
    with pytest.raises(ValueError, match=r"checksum mismatch for .*cifar-100-python/train'.*16019d7e"):
        data.load_fc100(tmp_path)


def test_fc100_rejects_code_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'train'.*cs\.toronto\.edu"):
        data.load_fc100(tmp_path)
    _fake_cifar100(tmp_path / "cifar-100-python")
    (tmp_path / "cifar-100-python" / "meta").write_bytes(pickle.dumps({b"x": os.getcwd}, protocol=2))
    with pytest.raises(ValueError, match="refusing to load posix.getcwd"):
        data.load_fc100(tmp_path, verify=False)


# --------------------------------------------------------------------------------------------- few-shot tasks


def test_few_shot_tasks_invariants():
    images, labels = toy_images()
    n, ways, shots, queries = 300, 4, 2, 3
    tasks = data.few_shot_tasks(images, labels, n, ways, shots, queries, seed=5)
    index = data.few_shot_indices(labels, n, ways, shots, queries, seed=5)
    assert isinstance(tasks, metaif.TaskSet) and (tasks.n_tasks, tasks.n_support, tasks.n_query) == (n, 8, 12)
    assert tasks.support["x"].dtype == np.float32 and tasks.support["y"].dtype == np.int32
    np.testing.assert_array_equal(tasks.support["x"], images[index.support])
    np.testing.assert_array_equal(tasks.query["x"], images[index.query])
    np.testing.assert_array_equal(tasks.support["y"], np.broadcast_to(np.repeat(np.arange(ways), shots), (n, 8)))
    np.testing.assert_array_equal(tasks.query["y"], np.broadcast_to(np.repeat(np.arange(ways), queries), (n, 12)))
    # ways distinct classes; each label's examples come from its class; support and query disjoint
    assert all(len(set(row)) == ways for row in index.classes)
    np.testing.assert_array_equal(labels[index.support], np.take_along_axis(index.classes, tasks.support["y"], 1))
    np.testing.assert_array_equal(labels[index.query], np.take_along_axis(index.classes, tasks.query["y"], 1))
    both = np.concatenate([index.support, index.query], axis=1)
    assert all(len(set(row)) == both.shape[1] for row in both)
    assert np.all(index.rotations == 0)
    # reproducible by seed, different across seeds; labels assigned to classes in random order
    again = data.few_shot_tasks(images, labels, n, ways, shots, queries, seed=5)
    np.testing.assert_array_equal(again.query["x"], tasks.query["x"])
    assert not np.array_equal(data.few_shot_indices(labels, n, ways, shots, queries, seed=6).support, index.support)
    assert not np.all(np.diff(index.classes, axis=1) > 0)
    # class subsets and integer images (gathered as float32)
    sub = data.few_shot_tasks((images * 2).astype(np.int64), labels, 50, 2, 1, 1, seed=0, classes=[13, 43])
    assert sub.support["x"].dtype == np.float32
    assert set(np.unique(data.few_shot_indices(labels, 50, 2, 1, 1, seed=0, classes=[13, 43]).classes)) == {13, 43}


def test_distinct_sampler_is_uniform():
    """Floyd's sampler: every ordered k-subset of range(count) equally likely (chi-square-style bound)."""
    rng = np.random.default_rng(0)
    draws = data._few_shot.distinct(rng, np.full(60000, 5), 3)
    assert np.all(draws < 5) and np.all(draws >= 0)
    assert all(len(set(row)) == 3 for row in draws[:1000])
    keys, counts = np.unique(draws @ np.array([25, 5, 1]), return_counts=True)
    assert keys.size == 60  # 5·4·3 ordered triples
    expected = 60000 / 60
    assert np.max(np.abs(counts - expected)) < 5 * np.sqrt(expected)
    mixed = data._few_shot.distinct(rng, np.array([3, 7, 4, 10]), 3)  # per-row counts
    assert np.all(mixed < np.array([3, 7, 4, 10])[:, None])


def test_rotation_classes():
    images, labels = toy_images(n_classes=3, per_class=6)
    n = 400
    tasks = data.few_shot_tasks(images, labels, n, 5, 1, 2, seed=1, rotate=True)
    index = data.few_shot_indices(labels, n, 5, 1, 2, seed=1, rotate=True)
    pairs = index.classes * 4 + index.rotations
    assert all(len(set(row)) == 5 for row in pairs)  # 5 distinct (class, rotation) classes of 12
    assert np.unique(pairs).size == 12
    for t, j in itertools.product((0, 17, 399), range(10)):
        k = index.rotations[t, tasks.query["y"][t, j]]
        np.testing.assert_array_equal(tasks.query["x"][t, j], np.rot90(images[index.query[t, j]], k))
    colour = np.random.default_rng(0).random((12, 4, 4, 3), dtype=np.float32)
    rgb = data.few_shot_tasks(colour, np.repeat([0, 1, 2], 4), 30, 2, 1, 1, seed=0, rotate=True)
    index = data.few_shot_indices(np.repeat([0, 1, 2], 4), 30, 2, 1, 1, seed=0, rotate=True)
    np.testing.assert_array_equal(rgb.support["x"][4, 1], np.rot90(colour[index.support[4, 1]], index.rotations[4, 1]))


def test_few_shot_errors():
    images, labels = toy_images()
    cases = [
        (dict(ways=7), ValueError, r"ways\) = 7 exceeds the 6 available classes"),
        (dict(shots=5, queries=3), ValueError, "shots \\+ queries = 8 examples per class"),
        (dict(classes=[3, 4]), ValueError, "ids absent from labels \\[4\\]"),
        (dict(classes=[3, 3]), ValueError, "1 duplicate"),
        (dict(classes=[]), ValueError, r"received 0 id\(s\)\."),
        (dict(seed=-1), ValueError, r"seed\) must be an int >= 0"),
        (dict(seed=1.5), ValueError, r"seed\) must be an int >= 0"),
        (dict(shots=0), ValueError, r"shots\) must be an int >= 1"),
        (dict(labels=labels[:-1]), ValueError, r"labels\) must have shape \(42,\)"),
        (dict(labels=labels.astype(float)), TypeError, r"labels\) must be a 1-D array of integers"),
        (dict(images=images[:, :, :4], rotate=True), ValueError, "needs square images"),
        (dict(images=images[:, 0]), TypeError, r"images\) must be a real \[N, H, W\]"),
    ]
    base = dict(images=images, labels=labels, n_tasks=3, ways=2, shots=2, queries=2, seed=0)
    for change, error, message in cases:
        with pytest.raises(error, match=message):
            data.few_shot_tasks(**{**base, **change})


# --------------------------------------------------------------------------------------------- corruption


@pytest.fixture(scope="module")
def clean_tasks():
    images, labels = toy_images()
    return data.few_shot_tasks(images, labels, 200, 5, 2, 3, seed=2)


def test_corrupt_tasks(clean_tasks):
    noisy, mask = data.corrupt(clean_tasks, 0.25, "task", seed=0)
    assert mask.shape == (200,) and mask.dtype == bool and mask.sum() == 50
    assert noisy.support["x"] is clean_tasks.support["x"] and noisy.query["x"] is clean_tasks.query["x"]  # images kept
    for part in ("support", "query"):
        new, old = getattr(noisy, part)["y"], getattr(clean_tasks, part)["y"]
        np.testing.assert_array_equal(new[~mask], old[~mask])
        assert new.dtype == old.dtype and new.min() >= 0 and new.max() <= 4
        assert np.mean(new[mask] != old[mask]) > 0.6  # random labels: about 4/5 differ
    # the link between support and query is broken: per task, label patterns are independent draws
    assert not all(np.array_equal(noisy.support["y"][t], clean_tasks.support["y"][t]) for t in np.flatnonzero(mask))
    assert np.array_equal(clean_tasks.support["y"][0], np.repeat(np.arange(5), 2))  # input untouched
    again, mask_again = data.corrupt(clean_tasks, 0.25, "task", seed=0)
    np.testing.assert_array_equal(again.query["y"], noisy.query["y"])
    np.testing.assert_array_equal(mask_again, mask)


@pytest.mark.parametrize("level", ["support", "query"])
def test_corrupt_examples(clean_tasks, level):
    noisy, mask = data.corrupt(clean_tasks, 0.3, level, seed=1)
    old, new = getattr(clean_tasks, level)["y"], getattr(noisy, level)["y"]
    assert mask.shape == old.shape and mask.sum() == round(0.3 * old.size)
    assert np.all(new[mask] != old[mask]) and np.array_equal(new[~mask], old[~mask])  # flipped to ANOTHER class
    assert new.min() >= 0 and new.max() <= 4
    other = "query" if level == "support" else "support"
    assert getattr(noisy, other)["y"] is getattr(clean_tasks, other)["y"]
    shift = (new[mask] - old[mask]) % 5  # uniform over the 4 other classes
    assert set(np.unique(shift)) == {1, 2, 3, 4} and np.max(np.bincount(shift)[1:]) < 0.4 * shift.size
    none, empty = data.corrupt(clean_tasks, 0.0, level, seed=1)
    assert not empty.any() and np.array_equal(getattr(none, level)["y"], old)
    _, full = data.corrupt(clean_tasks, 1.0, level, seed=1)
    assert full.all()


def test_corrupt_errors(clean_tasks):
    with pytest.raises(ValueError, match=r"corrupt\(level\) must be one of"):
        data.corrupt(clean_tasks, 0.1, "example", seed=0)
    with pytest.raises(ValueError, match=r"corrupt\(fraction\) must be a fraction in \[0, 1\]; received 1.5"):
        data.corrupt(clean_tasks, 1.5, "task", seed=0)
    with pytest.raises(ValueError, match=r"corrupt\(n_classes\) must be >= 2 and cover the labels 0..4"):
        data.corrupt(clean_tasks, 0.1, "task", seed=0, n_classes=3)
    negative = metaif.TaskSet(clean_tasks.support, {**clean_tasks.query, "y": clean_tasks.query["y"] - 1})
    with pytest.raises(ValueError, match=r"labels must be class ids >= 0; found -1"):
        data.corrupt(negative, 0.1, "query", seed=0)
    with pytest.raises(TypeError, match=r"support\['y'\] must be an integer array"):
        data.corrupt(data.sinusoid_tasks(3, 2, 2, seed=0), 0.1, "support", seed=0)
    with pytest.raises(TypeError, match="metaif.TaskSet"):
        data.corrupt({"x": 1}, 0.1, "task", seed=0)


# --------------------------------------------------------------------------------------------- sinusoid


def test_sinusoid_ground_truth():
    tasks = data.sinusoid_tasks(500, 5, 7, seed=3, dtype=np.float64)
    params = data.sinusoid_parameters(500, seed=3)
    assert tasks.support["x"].shape == (500, 5, 1) and tasks.query["y"].shape == (500, 7, 1)
    for part in (tasks.support, tasks.query):
        np.testing.assert_allclose(
            part["y"],
            params.amplitude[:, None, None] * np.sin(part["x"] - params.phase[:, None, None]),
            rtol=0,
            atol=1e-12,
        )
        assert part["x"].min() >= -5.0 and part["x"].max() <= 5.0
    assert (
        0.1 <= params.amplitude.min()
        and params.amplitude.max() <= 5.0
        and 0.0 <= params.phase.min()
        and params.phase.max() <= np.pi
    )
    assert params.amplitude.max() > 4.5 and params.amplitude.min() < 0.6  # the whole range is used
    assert np.abs(tasks.support["y"]).max() <= 5.0
    default = data.sinusoid_tasks(4, 2, 3, seed=3)
    assert default.support["x"].dtype == np.float32
    np.testing.assert_allclose(
        default.query["y"], data.sinusoid_tasks(4, 2, 3, seed=3, dtype=np.float64).query["y"], rtol=1e-6
    )
    other = data.sinusoid_tasks(
        10, 3, 3, seed=0, amplitude=(1.0, 1.0), phase=(0.0, 0.0), x_range=(0.0, 1.0), dtype=np.float64
    )
    np.testing.assert_allclose(other.query["y"], np.sin(other.query["x"]), atol=1e-12)
    with pytest.raises(ValueError, match=r"sinusoid_tasks\(amplitude\) must be a pair"):
        data.sinusoid_tasks(3, 2, 2, seed=0, amplitude=(5.0, 1.0))
    with pytest.raises(TypeError, match=r"sinusoid_tasks\(dtype\)"):
        data.sinusoid_tasks(3, 2, 2, seed=0, dtype=np.int32)


# --------------------------------------------------------------------------------------------- into the core


def _flat_cross_entropy(params, meta_params, example):
    from metaif import problems

    return problems.linear_cross_entropy(params, meta_params, {"x": example["x"].reshape(-1), "y": example["y"]})


def test_sampled_tasks_feed_the_core():
    """Sampled digits tasks (numpy leaves) and their corrupted copy run through metaif's jitted objective."""
    import jax.numpy as jnp

    digits = data.load_digits()
    tasks = data.few_shot_tasks(digits.images, digits.labels, 6, 3, 2, 4, seed=0)
    noisy, _ = data.corrupt(tasks, 0.5, "task", seed=0)
    problem = metaif.BilevelProblem(_flat_cross_entropy, _flat_cross_entropy, metaif.Unrolled(steps=2, lr=0.5))
    params = {"w": jnp.zeros((64, 3), jnp.float32), "b": jnp.zeros((3,), jnp.float32)}
    for task_set in (tasks, noisy):
        losses = metaif.task_losses(problem, params, task_set)
        assert losses.shape == (6,) and losses.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(losses)))
    # an adapted zero model on clean tasks beats chance (log 3) on its own task's query set
    assert float(metaif.task_losses(problem, params, tasks).mean()) < np.log(3)
