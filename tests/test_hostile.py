"""Hostile inputs a new user meets (issue 16), each with the error class (or exit code) and the
fragments of its message that say what is wrong with which file or argument and what to do.

Three tables: the API, the dataset loaders and the `metaif` command (exit 2 and config wording for
config and usage problems, exit 1 for damaged data). tests/test_validation.py holds the per-argument
table of the core API (shapes, pytrees, losses, solvers, adaptation hyperparameters); it is not
repeated here. The last tests are property-based (hypothesis): shapes, dtypes and values of the
core API's weights and meta-parameters give finite results or a ValueError/TypeError that names
the argument.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from PIL import Image

import metaif
from metaif import cli, problems
from metaif._run import pipeline
from metaif._run import config as run_config


@dataclasses.dataclass(frozen=True)
class Case:
    call: Callable[[Path], Any]  # gets a fresh tmp_path for the files it needs
    error: type[BaseException] | int  # exception class (API, loaders) or exit code (command)
    fragments: tuple[str, ...]  # each must appear in the message


# ----------------------------------------------------------------------------- hostile files


def _digits(n=600):
    d = metaif.data.load_digits()
    return d.images[:n].astype(np.float64), d.labels[:n]


def nan_images() -> np.ndarray:
    images, _ = _digits()
    images[3, 2, 2], images[5, 1, 1] = np.nan, np.inf
    return images


def npz(tmp: Path, name: str = "data.npz", **arrays) -> Path:
    path = tmp / name
    images, labels = _digits()
    np.savez(path, **{"images": images, "labels": labels, **arrays})
    return path


def no_labels(tmp: Path) -> Path:
    path = tmp / "x.npz"
    np.savez(path, images=_digits()[0])
    return path


def truncated_npz(tmp: Path) -> Path:
    path = npz(tmp)
    path.write_bytes(path.read_bytes()[:5000])
    return path


def garbage(tmp: Path) -> Path:
    path = tmp / "data.npz"
    path.write_text("images,labels\n0,1\n")
    return path


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).random((105, 105)) > 0.5).convert("1").save(buffer, format="PNG")
    return buffer.getvalue()


def omniglot_zip(tmp: Path, damage: str) -> Path:
    """root/omniglot/images_background.zip, damaged: "not-zip", "crc" (a stored member's byte flipped),
    "deflate" (a compressed member's stream broken) or "not-png" (a valid archive of a non-image)."""
    folder = tmp / "omniglot"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "images_background.zip"
    if damage == "not-zip":
        path.write_bytes(b"<html>404: Not Found</html>")
        return tmp
    method = zipfile.ZIP_DEFLATED if damage == "deflate" else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", method) as archive:
        for i in range(3):
            data = b"not a png" if damage == "not-png" else png(i)
            archive.writestr(f"images_background/Alpha/character01/0001_{i:02d}.png", data)
    if damage in ("crc", "deflate"):
        raw = bytearray(path.read_bytes())
        with zipfile.ZipFile(path) as archive:
            info = archive.infolist()[1]
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        raw[start + info.compress_size // 2 : start + info.compress_size // 2 + 8] = bytes(8)  # zero 8 bytes
        path.write_bytes(bytes(raw))
    return tmp


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- API


def _label_tasks(label: int):
    tasks = problems.classification_tasks(4, 4, 4, 3, 2, seed=0)
    y = np.array(tasks.query["y"])
    y[2, 1] = label
    return metaif.TaskSet(tasks.support, dict(tasks.query, y=jnp.asarray(y)))


CLASSIFIER = metaif.BilevelProblem(
    problems.linear_cross_entropy, problems.linear_cross_entropy, metaif.Unrolled(steps=1, lr=0.1)
)
LINEAR = problems.linear_init(jax.random.key(0), 3, 2)
REGRESSION, _ = problems.regression_tasks(4, 3, 3, 2, seed=0)
SQUARED = metaif.BilevelProblem(problems.squared_loss, problems.squared_loss, metaif.Unrolled(steps=1, lr=0.1))
W = {"w": jnp.zeros(2)}
rank_one = np.random.default_rng(0).random((20, 1, 1)) * np.ones((20, 3, 8))  # 20 images along one direction

API = {
    "few_shot_tasks: NaN and inf pixels": Case(
        lambda tmp: metaif.data.few_shot_tasks(nan_images(), _digits()[1], 50, 5, 2, 2, seed=0),
        ValueError,
        ("few_shot_tasks(images) holds", "NaN or inf", "images drawn into the tasks", "indices [", "np.isfinite"),
    ),
    "fit_pca: NaN pixels (was: SVD did not converge)": Case(
        lambda tmp: metaif.data.fit_pca(nan_images(), 12),
        ValueError,
        ("fit_pca(images) holds 2 NaN or inf value(s) in 2 of 600 images (indices [3, 5])",),
    ),
    "fit_pca: values that overflow (was: SVD did not converge)": Case(
        lambda tmp: metaif.data.fit_pca(np.random.default_rng(0).random((40, 8, 8)) * 1e307, 4),
        ValueError,
        ("fit_pca(images): the PCA of the images failed", "Rescale the images to [0, 1]"),
    ),
    "fit_pca: identical images": Case(
        lambda tmp: metaif.data.fit_pca(np.ones((30, 8, 8)), 4), ValueError, ("all 30 images are identical",)
    ),
    "fit_pca: fewer directions than components (was: new images' features of ~1e12)": Case(
        lambda tmp: metaif.data.fit_pca(rank_one, 5),
        ValueError,
        ("vary along only 1 direction(s)", "fewer than the 5 components asked for", "Ask for at most 1 component(s)"),
    ),
    "cross_entropy: label 7 with 2 logits": Case(
        lambda tmp: problems.cross_entropy(jnp.zeros(2), 7), ValueError, ("label 7 is outside [0, 2)",)
    ),
    "cross_entropy: label -1": Case(
        lambda tmp: problems.cross_entropy(jnp.zeros(2), -1), ValueError, ("label -1 is outside [0, 2)",)
    ),
    "corrupt_labels: a label outside [0, ways)": Case(
        lambda tmp: problems.corrupt_labels(_label_tasks(7), 2, 0.5, 0.5),
        ValueError,
        ("corrupt_labels(tasks): 1 query label(s) lie outside [0, ways=2), e.g. 7 in task 2",),
    ),
    "meta_train: label 7 of a 2-way task (was: clamped to 1)": Case(
        lambda tmp: metaif.meta_train(CLASSIFIER, LINEAR, _label_tasks(7), steps=1),
        ValueError,
        ("losses of tasks [2]", "class label outside [0, ways)"),
    ),
    "task_influence: label -1 (was: wrapped to the last class)": Case(
        lambda tmp: metaif.task_influence(CLASSIFIER, LINEAR, _label_tasks(-1), target=lambda lam: jnp.sum(lam["w"])),
        ValueError,
        ("losses of tasks [2]", "class label outside [0, ways)"),
    ),
    "meta_objective: complex task_weights (was: imaginary part dropped)": Case(
        lambda tmp: metaif.meta_objective(SQUARED, W, REGRESSION, task_weights=jnp.ones(4, jnp.complex128)),
        TypeError,
        ("task_weights must hold real numbers", "complex128"),
    ),
    "task_losses: string support_weights (was: '1' read as 1.0)": Case(
        lambda tmp: metaif.task_losses(SQUARED, W, REGRESSION, support_weights=np.full((4, 3), "1")),
        TypeError,
        ("support_weights must hold real numbers", "<U1"),
    ),
    "adapt: object weights (was: None is not a valid value for jnp.array)": Case(
        lambda tmp: metaif.adapt(
            SQUARED, W, jax.tree.map(lambda x: x[0], REGRESSION.support), weights=[1.0, None, 1.0]
        ),
        TypeError,
        ("weights must hold real numbers", "list of dtype object"),
    ),
    "Proximal: negative lr": Case(
        lambda tmp: metaif.Proximal(reg=1.0, steps=5, lr=-0.03),
        ValueError,
        ("Proximal.lr must be a finite number > 0", "-0.03"),
    ),
    "Unrolled: zero steps": Case(
        lambda tmp: metaif.Unrolled(steps=0, lr=0.1), ValueError, ("Unrolled.steps must be an int >= 1",)
    ),
    "meta_train: zero steps": Case(
        lambda tmp: metaif.meta_train(SQUARED, W, REGRESSION, steps=0),
        ValueError,
        ("steps must be an int >= 1", "received int 0"),
    ),
    "meta_objective: a NaN task weight (was: NaN returned)": Case(
        lambda tmp: metaif.meta_objective(SQUARED, W, REGRESSION, task_weights=np.array([1.0, np.nan, 1.0, 1.0])),
        ValueError,
        ("task_weights must be finite", "1 NaN or inf value(s) (first at index (1,))"),
    ),
    "task_losses: NaN in a task's data (was: NaN returned)": Case(
        lambda tmp: metaif.task_losses(
            SQUARED,
            W,
            metaif.TaskSet(REGRESSION.support, dict(REGRESSION.query, x=REGRESSION.query["x"].at[2].set(jnp.nan))),
        ),
        ValueError,
        ("task_losses is not finite", "losses of tasks [2]", "NaN or inf inputs"),
    ),
    "meta_objective: NaN meta_params (was: NaN returned)": Case(
        lambda tmp: metaif.meta_objective(SQUARED, {"w": jnp.array([0.0, jnp.nan])}, REGRESSION),
        ValueError,
        ("meta_params must be finite", "leaf ['w']", "1 NaN or inf"),
    ),
    "influence: losses overflow, inputs × 1e200 (was: NaN scores)": Case(
        lambda tmp: metaif.influence(
            CLASSIFIER,
            LINEAR,
            metaif.TaskSet(
                dict(_label_tasks(0).support, x=_label_tasks(0).support["x"] * 1e200),
                dict(_label_tasks(0).query, x=_label_tasks(0).query["x"] * 1e200),
            ),
            target=lambda lam: jnp.sum(lam["w"] ** 2),
        ),
        ValueError,
        ("The meta-objective at meta_params is nan", "losses of tasks", "overflow"),
    ),
    "influence: NaN target (was: all-zero scores)": Case(
        lambda tmp: metaif.influence(SQUARED, W, REGRESSION, target=lambda lam: jnp.nan * jnp.sum(lam["w"])),
        ValueError,
        ("target(meta_params) is nan", "must be finite at meta_params"),
    ),
    "influence: target with a NaN gradient at meta_params": Case(
        lambda tmp: metaif.influence(SQUARED, W, REGRESSION, target=lambda lam: jnp.sum(jnp.sqrt(lam["w"] ** 2))),
        ValueError,
        ("the gradient of target at meta_params must be finite", "NaN or inf values"),
    ),
    "influence: Dense at a singular H (was: NaN scores)": Case(
        lambda tmp: metaif.influence(
            SQUARED,
            {"w": jnp.zeros(2), "unused": jnp.zeros(1)},
            REGRESSION,
            target=lambda lam: jnp.sum(lam["w"]) + jnp.sum(lam["unused"]),
        ),
        ValueError,
        ("influence scores are not finite", "singular", "damping"),
    ),
}

# ----------------------------------------------------------------------------- loaders


LOADERS = {
    "omniglot: not a zip file (was: File is not a zip file)": Case(
        lambda tmp: metaif.data.load_omniglot(omniglot_zip(tmp, "not-zip"), cache=False),
        ValueError,
        (
            "images_background.zip' is damaged or incomplete",
            "File is not a zip file",
            "download images_background.zip again",
            "68d2efa1b9178cc56df9314c21c6e718",
            "github.com/brendenlake/omniglot",
        ),
    ),
    "omniglot: bad CRC-32 (was: Bad CRC-32 for file ...)": Case(
        lambda tmp: metaif.data.load_omniglot(omniglot_zip(tmp, "crc"), cache=False),
        ValueError,
        (
            "images_background.zip' is damaged or incomplete",
            "Bad CRC-32 for file 'images_background/Alpha/character01/0001_01.png'",
            "compare its md5 (this file: ",
        ),
    ),
    "omniglot: damaged compressed member (was: Bad CRC-32 for file ...)": Case(
        lambda tmp: metaif.data.load_omniglot(omniglot_zip(tmp, "deflate"), cache=False),
        ValueError,
        ("images_background.zip' is damaged or incomplete", "official release's 68d2efa1b9178cc56df9314c21c6e718"),
    ),
    "omniglot: a member that is not a PNG (was: cannot identify image file <_io.BytesIO ...>)": Case(
        lambda tmp: metaif.data.load_omniglot(omniglot_zip(tmp, "not-png"), cache=False, verify=False),
        ValueError,
        (
            "cannot decode the image 'images_background/Alpha/character01/0001_00.png'",
            "images_background.zip",
            "damaged",
        ),
    ),
    "data root: unset, API wording": Case(
        lambda tmp: metaif.data.load_mnist(),
        ValueError,
        ("root is None", "pass root='/path/to/data' or set METAIF_DATA"),
    ),
    "data root: not a folder, API wording": Case(
        lambda tmp: metaif.data.load_mnist(tmp / "nowhere"),
        FileNotFoundError,
        ("(from root) is not an existing folder; pass root='/path/to/data'",),
    ),
}


def _assert_own_md5(name: str, tmp: Path, message: str) -> None:
    """The damaged-archive message shows the file's own md5."""
    if "omniglot" in name and "zip" in message and "this file: " in message:
        assert f"this file: {md5(tmp / 'omniglot' / 'images_background.zip')})" in message, message


@pytest.mark.parametrize("name", list(API) + list(LOADERS))
def test_api_and_loaders(name, tmp_path, monkeypatch):
    monkeypatch.delenv("METAIF_DATA", raising=False)
    monkeypatch.setenv("METAIF_CACHE", str(tmp_path / "cache"))
    case = {**API, **LOADERS}[name]
    with pytest.raises(case.error) as error:
        case.call(tmp_path)
    message = str(error.value)
    for fragment in case.fragments:
        assert fragment in message, message
    _assert_own_md5(name, tmp_path, message)


def test_few_shot_tasks_numbers_labels_within_the_task():
    images, labels = _digits()
    tasks = metaif.data.few_shot_tasks(images, labels + 1000, 20, 3, 2, 2, seed=0)  # class ids far above ways
    for part in (tasks.support, tasks.query):
        assert part["y"].min() == 0 and part["y"].max() == 2


def test_cross_entropy_inside_the_range_is_unchanged():
    logits = jnp.array([0.3, -1.2, 2.0])
    for label in range(3):
        assert problems.cross_entropy(logits, label) == -jax.nn.log_softmax(logits)[label]
    traced = jax.vmap(problems.cross_entropy)(jnp.stack([logits] * 5), jnp.array([0, 1, 2, 3, -1]))
    assert np.all(np.isfinite(traced[:3])) and np.all(np.isnan(traced[3:]))
    grad = jax.grad(lambda z: jnp.sum(jax.vmap(problems.cross_entropy)(z, jnp.array([0, 3]))))(jnp.stack([logits] * 2))
    assert np.all(np.isfinite(grad)) and np.all(grad[1] == 0)  # the NaN stays in the loss, not in the gradient


# ----------------------------------------------------------------------------- the command


def toml(tmp: Path, text: str) -> str:
    path = tmp / "c.toml"
    path.write_text(text)
    return str(path)


def npz_config(tmp: Path, path: Path | str) -> str:
    return toml(tmp, f'[data]\ndataset = "npz"\npath = "{path}"\n')


def check(config: Callable[[Path], str]) -> Callable[[Path], list[str]]:
    return lambda tmp: ["run", config(tmp), "--check"]


def run_out(config: Callable[[Path], str], out: Callable[[Path], Path]) -> Callable[[Path], list[str]]:
    return lambda tmp: ["run", config(tmp), "--out", str(out(tmp)), "--quiet"]


def a_file(tmp: Path) -> Path:
    (tmp / "outfile").write_text("")
    return tmp / "outfile"


DIGITS = lambda tmp: toml(tmp, "[tasks]\ntrain = 8\n")
FAILED, USAGE = cli.EXIT_FAILED, cli.EXIT_USAGE

COMMAND = {
    "npz with NaN and inf pixels (was: exit 0, or SVD did not converge)": Case(
        check(lambda tmp: npz_config(tmp, npz(tmp, images=nan_images()))),
        FAILED,
        ("data.npz' (array 'images') holds 2 NaN or inf value(s) in 2 of 600 images (indices [3, 5])",),
    ),
    "npz with NaN labels": Case(
        check(lambda tmp: npz_config(tmp, npz(tmp, labels=np.where(np.arange(600) == 4, np.nan, 1.0)))),
        FAILED,
        ("labels integer [N]", "(1 of them NaN or inf)", "np.asarray(labels, np.int64)"),
    ),
    "npz with an object array (was: Object arrays cannot be loaded when allow_pickle=False)": Case(
        check(lambda tmp: npz_config(tmp, npz(tmp, images=np.array([np.zeros((8, 8)), "x"], dtype=object)))),
        FAILED,
        (
            "stores an array as Python objects",
            "metaif never loads pickles",
            "'images' [N, H, W] or [N, H, W, C]",
            "integer 'labels' [N]",
        ),
    ),
    "npz that is not an npz (was: Cannot load file containing pickled data)": Case(
        check(lambda tmp: npz_config(tmp, garbage(tmp))),
        FAILED,
        ("is not an .npz archive", "metaif never loads pickles"),
    ),
    "npz truncated (was: File is not a zip file)": Case(
        check(lambda tmp: npz_config(tmp, truncated_npz(tmp))),
        FAILED,
        ("is not a readable .npz file", "damaged, truncated or not an .npz archive"),
    ),
    "npz without labels": Case(
        check(lambda tmp: npz_config(tmp, no_labels(tmp))), FAILED, ("lacks array(s) ['labels']", "it holds ['images']")
    ),
    "npz path missing": Case(
        check(lambda tmp: npz_config(tmp, tmp / "none.npz")), USAGE, ('[data] path = "', 'none.npz" does not exist')
    ),
    "data root missing (was: exit 1, pass root=...)": Case(
        check(lambda tmp: toml(tmp, f'[data]\ndataset = "mnist"\nroot = "{tmp / "no-such-folder"}"\n')),
        USAGE,
        (
            '[data] dataset = "mnist": the data root',
            "no-such-folder' (from [data] root) is not an existing folder",
            'set [data] root = "/path/to/data" in the config',
        ),
    ),
    "data root unset (was: exit 1, pass root=...)": Case(
        check(lambda tmp: toml(tmp, '[data]\ndataset = "omniglot"\n')),
        USAGE,
        ("[data] root is not set and the METAIF_DATA environment variable is not set",),
    ),
    "omniglot archive damaged": Case(
        check(lambda tmp: toml(tmp, f'[data]\ndataset = "omniglot"\nroot = "{omniglot_zip(tmp, "crc")}"\n')),
        FAILED,
        ("is damaged or incomplete", "Bad CRC-32"),
    ),
    "--out is a file (was: [Errno 17] File exists, exit 1)": Case(
        run_out(DIGITS, a_file), USAGE, ("--out '", "outfile' is an existing file, not a folder")
    ),
    "--out inside a file": Case(
        run_out(DIGITS, lambda tmp: a_file(tmp) / "run"), USAGE, ("cannot create the output folder", "Not a directory")
    ),
    "--check with held_fraction = 1 (was: index 0 is out of bounds for axis 0 with size 0)": Case(
        check(lambda tmp: toml(tmp, "[data]\nheld_fraction = 1.0\n")),
        USAGE,
        ('[data] held_fraction = 1.0 with held_out = "images" leaves 0 meta-training', "strictly between 0 and 1"),
    ),
    "held-out classes rounded to none": Case(
        check(lambda tmp: toml(tmp, '[data]\nheld_out = "classes"\nheld_fraction = 0.01\n')),
        USAGE,
        ("leaves 10 meta-training and 0 held-out classes",),
    ),
    "[train] adam_lr = -0.03 (was: accepted, gradient ascent)": Case(
        check(lambda tmp: toml(tmp, "[train]\nadam_lr = -0.03\n")),
        USAGE,
        ("[train] adam_lr must be > 0; received -0.03",),
    ),
    "[model] inner_lr = 0": Case(
        check(lambda tmp: toml(tmp, "[model]\ninner_lr = 0.0\n")), USAGE, ("[model] inner_lr must be > 0",)
    ),
    "[model] prox_reg = -1": Case(
        check(lambda tmp: toml(tmp, '[model]\nadapt = "imaml"\nprox_reg = -1.0\n')),
        USAGE,
        ("[model] prox_reg must be > 0",),
    ),
    "[influence] damping = nan": Case(
        check(lambda tmp: toml(tmp, "[influence]\ndamping = nan\n")),
        USAGE,
        ("[influence] damping must be a finite number; received nan",),
    ),
    "[edit] damping = inf": Case(
        check(lambda tmp: toml(tmp, "[edit]\ndamping = inf\n")),
        USAGE,
        ("[edit] damping must be a finite number; received inf",),
    ),
    "[train] adam_steps = 0": Case(
        check(lambda tmp: toml(tmp, "[train]\nadam_steps = 0\n")), USAGE, ("[train] adam_steps must be >= 1",)
    ),
    "[model] module missing": Case(
        check(lambda tmp: toml(tmp, f'[model]\nkind = "python"\nmodule = "{tmp / "model.py"}"\n')),
        USAGE,
        ('[model] module = "', 'model.py" does not exist as a file'),
    ),
    "[model] features beyond the images' variation (was: accepted, 4 components scaled by 1/1e-12)": Case(
        run_out(lambda tmp: toml(tmp, "[tasks]\ntrain = 8\n[model]\nfeatures = 64\n"), lambda tmp: tmp / "out"),
        USAGE,
        ("[model] features = 64", "vary along only 60 direction(s)", "Set [model] features lower"),
    ),
}


@pytest.mark.parametrize("name", list(COMMAND))
def test_command(name, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("METAIF_DATA", raising=False)
    monkeypatch.setenv("METAIF_CACHE", str(tmp_path / "cache"))
    case = COMMAND[name]
    code = cli.main(case.call(tmp_path))
    err = capsys.readouterr().err
    assert code == case.error, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in case.fragments:
        assert fragment in err, err
    if case.error == USAGE:
        assert "root=" not in err and "fit_pca(k)" not in err  # config wording, not the API's
    assert not (tmp_path / "out").exists() or name.startswith("[model] features")  # nothing written before the check


def test_every_float_key_rejects_nan_and_inf():
    for section, values in run_config.DEMO.to_dict().items():
        for key, value in values.items():
            if isinstance(value, float):
                for bad in (float("nan"), float("inf")):
                    with pytest.raises(run_config.ConfigError, match=re.escape(f"[{section}] {key} must be")):
                        run_config.from_dict({section: {key: bad}})


def test_check_paths_names_each_path():
    for raw, fragment in [
        ({"data": {"dataset": "npz", "path": "/nonexistent/x.npz"}}, "[data] path"),
        ({"data": {"dataset": "mnist", "root": "/nonexistent"}}, "[data] root"),
        ({"model": {"kind": "python", "module": "/nonexistent/m.py"}}, "[model] module"),
    ]:
        with pytest.raises(run_config.ConfigError, match=re.escape(fragment)):
            pipeline.check_paths(run_config.from_dict(raw))
    pipeline.check_paths(run_config.DEMO)  # digits: nothing to find


# ----------------------------------------------------------------------------- properties (hypothesis)

N, M, Q, D = 3, 2, 2, 2
TASKS, _ = problems.regression_tasks(N, M, Q, D, seed=0)
SHAPES = {"task_weights": (N,), "support_weights": (N, M), "query_weights": (N, Q)}
REAL = ("float64", "float32", "float16", "int32", "int64", "bool")
NOT_REAL = ("complex128", "str", "object")
FAST = settings(max_examples=30, deadline=None, derandomize=True, database=None)


def weight_array(dtype: str, shape: tuple[int, ...], values: np.ndarray):
    if dtype == "str":
        return np.full(shape, "1")
    if dtype == "object":
        return np.full(shape, None, dtype=object)
    if dtype == "bool":
        return np.reshape(values, shape) > 0
    return np.reshape(values, shape).astype(dtype)


@settings(FAST, max_examples=60)
@given(
    which=st.sampled_from(sorted(SHAPES)),
    dtype=st.sampled_from(REAL * 2 + NOT_REAL),
    wrong_shape=st.sampled_from([None] * 5 + [(N + 1,), (N, M + 1), (1,), (), (N, Q, 1)]),
    values=st.lists(st.floats(-1e3, 1e3), min_size=N * max(M, Q), max_size=N * max(M, Q)),
    lam=st.lists(st.floats(-10, 10), min_size=D, max_size=D),
    fn=st.sampled_from(["meta_objective", "task_losses"]),
)
def test_weights_give_finite_values_or_name_the_argument(which, dtype, wrong_shape, values, lam, fn):
    if fn == "task_losses" and which == "task_weights":
        which = "query_weights"  # task_losses takes no task weights
    shape = SHAPES[which] if wrong_shape is None else wrong_shape
    flat = np.resize(np.asarray(values), int(np.prod(shape)))
    weights = weight_array(dtype, shape, flat)
    meta = {"w": jnp.asarray(lam, jnp.float64)}
    try:
        out = getattr(metaif, fn)(SQUARED, meta, TASKS, **{which: weights})
    except (ValueError, TypeError) as error:
        assert which in str(error), str(error)
        assert shape != SHAPES[which] or dtype in NOT_REAL, str(error)  # a valid argument is never refused
        return
    assert shape == SHAPES[which] and dtype in REAL
    assert np.all(np.isfinite(np.asarray(out))), (which, dtype, out)


@FAST
@given(
    dtype=st.sampled_from(["float64", "float32", "int32", "complex128", "bfloat16"]),
    shape=st.sampled_from([(D,), (D + 1,), (1, D)]),
    lam=st.lists(st.floats(-10, 10), min_size=D, max_size=D),
    support=st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]), min_size=M, max_size=M),
)
def test_meta_params_give_finite_values_or_a_named_error(dtype, shape, lam, support):
    meta = {"w": jnp.resize(jnp.asarray(lam, jnp.float64), shape).astype(dtype)}
    first = jax.tree.map(lambda x: x[0], TASKS.support)
    try:
        values = [
            metaif.meta_objective(SQUARED, meta, TASKS),
            metaif.adapt(SQUARED, meta, first, weights=jnp.asarray(support))["w"],
        ]
    except (ValueError, TypeError) as error:
        message = str(error)
        assert "meta_params" in message or "problem.inner_loss" in message, message
        assert dtype in message or str(shape) in message or "shape" in message, message
        assert dtype != "float64" or shape != (D,), message  # the valid case is never refused
        return
    assert dtype == "float64" and shape == (D,)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in values)


# ----------------------------------------------------------------------------- warnings of the influence result


def test_constant_target_warns_that_every_score_is_zero():
    with pytest.warns(metaif.ConstantTargetWarning, match="every influence score is zero"):
        result = metaif.influence(
            SQUARED, W, REGRESSION, target=lambda lam: jnp.asarray(3.0), solver=metaif.solvers.Dense(damping=1.0)
        )
    assert np.all(np.asarray(result.tasks) == 0)


def test_dense_at_an_untrained_point_warns_like_cg():
    """Far from stationary (the initialisation): Dense() warns as CG() does (was: silent with Dense)."""
    problem = metaif.BilevelProblem(
        problems.linear_cross_entropy, problems.linear_cross_entropy, metaif.Unrolled(steps=1, lr=0.5), meta_reg=0.01
    )
    tasks = problems.classification_tasks(30, 4, 4, 3, 2, seed=0)
    test = problems.classification_tasks(4, 4, 4, 3, 2, seed=1)
    target = lambda lam: metaif.task_losses(problem, lam, test).mean()
    init = LINEAR
    for solver in (metaif.solvers.Dense(), metaif.solvers.CG(damping=0.1)):
        with pytest.warns(metaif.NonStationaryWarning, match="not a stationary point") as record:
            result = metaif.influence(problem, init, tasks, target=target, solver=solver)
        assert "newton_refine" in str(record[0].message) and record[0].filename == __file__
        assert abs(float(result.diagnostics.nonstationary_change)) > float(np.max(np.abs(result.tasks)))
    trained = metaif.newton_refine(problem, metaif.meta_train(problem, init, tasks, steps=300).meta_params, tasks)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metaif.influence(
            problem, trained.meta_params, tasks, target=target, solver=metaif.solvers.Dense()
        )  # stationary: silent
