"""The `metaif` command: help, config validation, errors and exit codes, the outputs of a run, and
resumability (a real kill -9 of a running subprocess, then a restart that reuses finished work and
gives the same scores as an uninterrupted run). Runs use a tiny digits config (seconds)."""

import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metaif
from metaif import cli
from metaif._run import config as run_config
from metaif._run import memory, pipeline, report
from metaif._run.store import Store, fingerprint

from _paths import DATA, ROOT  # noqa: E402  ($METAIF_DATA, else ../shared/data)

# Checkpoints are keyed by metaif's code digest; pin it so concurrent edits of the source tree
# (several people share one checkout) cannot invalidate a test's checkpoints mid-test.
os.environ["METAIF_CODE_VERSION"] = "tests"

TINY = """\
[tasks]
train = 8
target = 4
test = 6
shots = 1
queries = 1
[model]
features = 4
hidden = [2]
meta_reg = 0.01
[train]
adam_steps = 150
adam_lr = 0.03
newton_steps = 6
checkpoint_every = 50
[influence]
chunk = 4
[check]
tasks = 3
support = 3
query = 3
chunk = 3
batch_size = 3
retrain_steps = 4
[edit]
tasks = 0.25
support = 0.05
[report]
top_k = 3
"""


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def run_main(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- help and usage


@pytest.mark.parametrize("command", [[], ["demo"], ["run"], ["bench"]])
def test_help_is_complete_with_examples(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "metaif" in out
    if command == ["run"]:
        for section in (
            "[data]",
            "[tasks]",
            "[model]",
            "[train]",
            "[influence]",
            "[check]",
            "[edit]",
            "[report]",
            "[run]",
        ):
            assert section in out
    if command in ([], ["demo"], ["run"]):
        assert "resum" in out


def test_no_command_prints_help_and_fails(capsys):
    code, out, _ = run_main(capsys)
    assert code == cli.EXIT_USAGE and "usage: metaif" in out


def test_console_script_and_module_alias():
    version = subprocess.run(
        [str(Path(sys.executable).parent / "metaif"), "--version"], capture_output=True, text=True, timeout=120
    )
    assert version.returncode == 0 and metaif.__version__ in version.stdout
    alias = subprocess.run([sys.executable, "-m", "metaif.demo", "--help"], capture_output=True, text=True, timeout=120)
    assert alias.returncode == 0 and "metaif demo" in alias.stdout


def test_bench_list(capsys):
    code, out, _ = run_main(capsys, "bench", "--list")
    assert code == 0 and all(name in out for name in cli.BENCHMARKS)
    lines = out.splitlines()
    assert len(lines) == len(cli.BENCHMARKS)
    for name, line in zip(cli.BENCHMARKS, lines):  # each with the first sentence of its script's docstring
        assert line.split()[0] == name and len(line) > 50 and "issue" not in line, line
    assert "time to compute every task, support and query score" in lines[0]


def test_help_and_bench_list_do_not_import_jax():
    """The command's help and listings answer without loading JAX (seconds saved per call)."""
    script = (
        "import sys\nfrom metaif import cli\n"
        "for argv in (['--help'], ['run', '--help'], ['demo', '--help'], ['bench', '--list'], ['--version']):\n"
        "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\n"
        "print('LOADED', sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'optax')))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "LOADED []", done.stdout[-500:]


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "[model]\nhiden = [8]\n",
            ["unknown key 'hiden' in section [model]", "Did you mean 'hidden'", "Valid keys of [model]", "features"],
        ),
        ("[modle]\nhidden = [8]\n", ["unknown section [modle]", "Did you mean 'model'", "[influence]"]),
        ('[tasks]\nways = "five"\n', ["[tasks] ways must be an integer", "'five'"]),
        (
            '[influence]\nsolver = "dense2"\n',
            ["[influence] solver must be one of 'dense', 'cg'", "Did you mean 'dense'"],
        ),
        ("[tasks]\ncorrupt_tasks = 1.5\n", ["corrupt_tasks is a fraction"]),
        ("[tasks\n", ["is not valid TOML"]),
        (
            '[model]\nkind = "conv4"\nfeatures = 16\n',
            ['[model] kind = "conv4" reads the raw images', "received features = 16", "Remove the features line"],
        ),
        (
            '[model]\nkind = "conv4"\nfilters = 6\n',
            ['norm = "group"', "filters must be a multiple of 4", "received filters = 6", 'norm = "layer"'],
        ),
        ('[model]\nnorm = "batch"\n', ["[model] norm must be one of 'group', 'layer', 'none'"]),
        ("[model]\nfilters = 0\n", ["[model] filters must be >= 1; received 0"]),
        ("[train]\nminibatch = 60\n", ["[train] minibatch = 60 tasks per Adam step", "[tasks] train = 50"]),
        ("[train]\nchunk = -1\n", ["[train] chunk must be >= 0; received -1"]),
        ('[influence]\ndamping = "big"\n', ['[influence] damping must be a number or "auto"', "'big'"]),
        ("[influence]\ndamping = -0.5\n", ["[influence] damping must be >= 0; received -0.5"]),
    ],
)
def test_bad_config_is_one_paragraph_and_exit_2(capsys, tmp_path, text, expected):
    code, _, err = run_main(capsys, "run", str(write(tmp_path / "bad.toml", text)), "--out", str(tmp_path / "out"))
    assert code == cli.EXIT_USAGE
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    for part in expected:
        assert part in err, err
    assert not (tmp_path / "out").exists()


def test_conv4_defaults_depend_on_the_kind_and_survive_the_run_folder(tmp_path):
    """conv4 reads raw images and takes tasks one at a time unless the file says otherwise; the
    resolved values are what the run folder's config.toml records."""
    conv = run_config.from_dict({"model": {"kind": "conv4"}, "influence": {"damping": "auto"}})
    assert (conv.model.features, conv.train.chunk, conv.influence.batch_size) == (0, 1, 1)
    assert (conv.model.filters, conv.model.norm, conv.influence.damping) == (32, "group", "auto")
    explicit = run_config.from_dict({"model": {"kind": "conv4", "features": 0}, "train": {"chunk": 0}})
    assert (explicit.train.chunk, explicit.influence.batch_size) == (0, 1)  # an explicit 0: all tasks at once
    mlp = run_config.from_dict({"model": {"kind": "mlp"}})
    assert (mlp.model.features, mlp.train.chunk, mlp.influence.batch_size) == (12, 0, 0)
    saved = write(tmp_path / "saved.toml", run_config.to_toml(conv))
    assert run_config.load(saved) == dataclasses.replace(conv, run=dataclasses.replace(conv.run, name="demo"))
    assert pipeline._solver(conv).damping is None  # "auto": the solvers' default δ = 1e-4·λ_max(H)


def test_missing_config_file(capsys, tmp_path):
    code, _, err = run_main(capsys, "run", str(tmp_path / "nope.toml"))
    assert code == cli.EXIT_USAGE and "does not exist" in err


@pytest.mark.parametrize(
    "tasks, expected",
    [
        ("ways = 11", ["[tasks] ways = 11", "meta-training pool", "has 10 classes", "Set ways <= 10"]),
        (
            "shots = 90\nqueries = 10",
            ["shots + queries = 90 + 10 = 100", "meta-training pool", "has 97 images", "Set shots + queries <= 97"],
        ),
        (
            "shots = 50\nqueries = 10",
            [
                "= 60 images per class",
                "held-out pool (the [tasks] target and test tasks)",
                "has 57 images",
                "Set shots + queries <= 57",
            ],
        ),
        ("ways = 5000\nshots = 25", ["[tasks] ways = 5000", "has 10 classes"]),  # a data limit, not a memory problem
    ],
)
def test_check_compares_tasks_with_what_the_data_holds(capsys, tmp_path, tasks, expected):
    """digits: 10 classes in both pools; per class 97-123 meta-training and 57-84 held-out images."""
    config = write(tmp_path / "c.toml", f"[tasks]\n{tasks}\n")
    for argv in (["--check"], ["--out", str(tmp_path / "out")]):  # --check, and a real run before any work
        code, out, err = run_main(capsys, "run", str(config), *argv)
        assert code == cli.EXIT_USAGE and err.startswith("error: ") and err.count("\n") == 1, err
        for part in expected:
            assert part in err, err
        assert "memory" not in err and "classes=" not in err and "valid" not in out
    assert not (tmp_path / "out" / "checkpoints" / "data.npz").exists()


def test_check_reports_what_the_data_holds(capsys):
    code, out, _ = run_main(capsys, "run", str(ROOT / "configs" / "digits.toml"), "--check")
    assert (
        code == 0
        and "valid" in out
        and "images of 10 classes" in out
        and "(tasks need 5 classes of 2 + 3 images)" in out
    )


@pytest.mark.skipif(not (DATA / "omniglot").is_dir(), reason=f"Omniglot archives not found in {DATA}/omniglot")
def test_check_names_omniglot_limits(capsys, monkeypatch):
    """The limits of the standard split: 20 images per class, 1,200 meta-training and 423 held-out classes."""
    monkeypatch.setenv("METAIF_DATA", str(DATA))
    base = run_config.load(ROOT / "configs" / "omniglot.toml")
    pools = pipeline.load_pools(base)
    for changes, expected in (
        ({"shots": 18, "queries": 3}, ["= 21 images per class", "every class has 20 images"]),
        ({"ways": 1300}, ["[tasks] ways = 1300", "meta-training pool", "has 1,200 classes"]),
        ({"ways": 500}, ["[tasks] ways = 500", "held-out pool", "has 423 classes"]),
    ):
        config = dataclasses.replace(base, tasks=dataclasses.replace(base.tasks, **changes))
        with pytest.raises(run_config.ConfigError) as error:
            pipeline.check_pools(config, pools)
        for part in expected:
            assert part in str(error.value), str(error.value)
    code, out, _ = run_main(capsys, "run", str(ROOT / "configs" / "omniglot.toml"), "--check")
    assert code == 0 and "of 1,200 classes" in out and "of 423 classes" in out


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            name,
            marks=pytest.mark.skipif(not (DATA / folder).is_dir(), reason=f"{folder} data not found in {DATA}"),
        )
        for name, folder in (("omniglot-conv4", "omniglot"), ("mnist-conv4", "mnist"))
    ],
)
def test_check_validates_the_conv4_configs(capsys, monkeypatch, name):
    monkeypatch.setenv("METAIF_DATA", str(DATA))
    code, out, err = run_main(capsys, "run", str(ROOT / "configs" / f"{name}.toml"), "--check")
    assert code == 0, err
    assert "valid" in out and "d = 7333 meta-parameters; n = 256, m = 5, q = 10" in out
    assert "estimated peak memory: adam" in out and "GiB available" in out


@pytest.mark.skipif(not (DATA / "omniglot").is_dir(), reason=f"Omniglot archives not found in {DATA}/omniglot")
def test_the_gpu_conv4_config_fits_one_h200(monkeypatch):
    """The GPU size as `--check` sees it on a machine with the memory (this one may have less)."""
    monkeypatch.setenv("METAIF_DATA", str(DATA))
    config = run_config.load(ROOT / "configs" / "omniglot-conv4-gpu.toml")
    prepared = pipeline.setup(config, pipeline.build_data(config), memory_limit_bytes=float("inf"))
    train, model = prepared.train, prepared.model
    assert (train.n_tasks, train.n_support, train.n_query, model.dtype) == (2000, 20, 20, np.float32)
    assert train.support["x"].shape == (2000, 20, 28, 28) and train.support["x"].dtype == jnp.float32
    assert 110_000 < model.n_params < 130_000  # the standard Conv4 at 64 filters (about 112k, 20-way head)
    assert prepared.estimate["peak"] < 100 * memory.GiB  # one H200 has 139 GiB


def test_every_example_config_is_valid():
    names = sorted(p.name for p in (ROOT / "configs").glob("*.toml"))
    assert {"digits.toml", "omniglot.toml", "mnist.toml", "omniglot-conv4.toml", "omniglot-conv4-gpu.toml"} <= set(
        names
    )
    for path in (ROOT / "configs").glob("*.toml"):
        run_config.load(path)
    assert run_config.load(ROOT / "configs" / "digits.toml").to_dict() == {
        **run_config.DEMO.to_dict(),
        "run": {**run_config.DEMO.to_dict()["run"], "name": "digits"},
    }


# ----------------------------------------------------------------------------- runtime errors


def test_missing_data_path(capsys, tmp_path):
    config = write(tmp_path / "c.toml", f'[data]\ndataset = "mnist"\nroot = "{tmp_path / "no-such-folder"}"\n')
    code, _, err = run_main(capsys, "run", str(config), "--out", str(tmp_path / "out"))
    assert code == cli.EXIT_USAGE and "no-such-folder" in err and "Traceback" not in err and err.count("\n") == 1
    assert '[data] root = "/path/to/data"' in err and "root=" not in err and not (tmp_path / "out").exists()


def _npz(tmp_path):
    digits = metaif.data.load_digits()
    path = tmp_path / "mine.npz"
    np.savez(path, images=digits.images[:600], labels=digits.labels[:600])
    return path


def test_checksum_failure(capsys, tmp_path):
    path = _npz(tmp_path)
    config = write(tmp_path / "c.toml", f'[data]\ndataset = "npz"\npath = "{path}"\nsha256 = "{"0" * 64}"\n')
    code, _, err = run_main(capsys, "run", str(config), "--out", str(tmp_path / "out"))
    assert code == cli.EXIT_FAILED and "checksum mismatch" in err and "download it again" in err


def test_dataset_file_that_fails_its_checksum(capsys, tmp_path):
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + bytes(64))
    config = write(tmp_path / "c.toml", f'[data]\ndataset = "mnist"\nroot = "{tmp_path}"\n')
    code, _, err = run_main(capsys, "run", str(config), "--out", str(tmp_path / "out"))
    assert code == cli.EXIT_FAILED and "checksum mismatch" in err and "train-images-idx3-ubyte" in err
    assert "[data] verify = false" in err and "Traceback" not in err and err.count("\n") == 1


def test_loss_that_is_not_scalar(capsys, tmp_path):
    module = write(
        tmp_path / "model.py",
        """\
        import jax, jax.numpy as jnp

        def init(key, n_inputs, ways):
            return {"w": 0.1 * jax.random.normal(key, (n_inputs, ways), jnp.float64)}

        def loss(params, meta_params, example):
            return (example["x"] @ params["w"]) ** 2      # a vector: forgot to reduce
        """,
    )
    config = write(tmp_path / "c.toml", TINY.replace("[model]\n", f'[model]\nkind = "python"\nmodule = "{module}"\n'))
    code, _, err = run_main(capsys, "run", str(config), "--out", str(tmp_path / "out"))
    assert code == cli.EXIT_FAILED and "not a scalar" in err and "ONE example" in err and "Traceback" not in err


def test_run_that_would_not_fit_in_memory(capsys, tmp_path):
    config = write(tmp_path / "c.toml", TINY + "[run]\nmemory_limit_gb = 0.00001\n")
    code, _, err = run_main(capsys, "run", str(config), "--out", str(tmp_path / "out"))
    assert code == cli.EXIT_USAGE and "would not fit in memory" in err and "GiB" in err and "batch_size" in err
    assert not (tmp_path / "out" / "checkpoints" / "train_adam.npz").exists()  # stopped before training


def test_memory_estimate_and_batch_size_suggestion():
    raw = {
        "tasks": {"train": 400},
        "model": {"features": 64, "hidden": [64]},
        "train": {"newton_steps": 0},
        "check": {"tasks": 0, "support": 0, "query": 0},
    }
    config = run_config.from_dict(raw)
    chunked_config = run_config.from_dict({**raw, "influence": {"batch_size": 8}})
    full, chunked = (memory.estimate(c, 64, 5000, 400, 10, 15) for c in (config, chunked_config))
    assert chunked["solve"] < full["solve"] and full["peak"] == max(v for k, v in full.items() if k != "peak")
    limit = chunked["peak"] * 1.01
    assert full["peak"] > limit
    with pytest.raises(run_config.ConfigError, match=r"would not fit in memory.*set \[influence\] batch_size = \d+"):
        memory.check(config, 64, 5000, 400, 10, 15, limit=limit)
    assert memory.check(chunked_config, 64, 5000, 400, 10, 15, limit=limit) == chunked


def test_memory_estimate_of_conv4_counts_feature_maps_in_float32_and_its_chunks():
    conv = run_config.from_dict(
        {
            "model": {"kind": "conv4", "filters": 16},
            "train": {"newton_steps": 0, "minibatch": 16},
            "check": {"tasks": 0, "support": 0, "query": 0},
            "edit": {"tasks": 0.0, "support": 0.0},
        }
    )
    replace = lambda section, **changes: dataclasses.replace(
        conv, **{section: dataclasses.replace(getattr(conv, section), **changes)}
    )
    shape, d = (28, 28), 7333
    stages = memory.estimate(conv, shape, d, 50, 5, 10)
    data = (50 + 50 + 100) * 15 * 28 * 28 * 4  # the float32 images of the train, target and test tasks
    assert stages["newton"] == stages["check"] == stages["edit"] == data  # no dense-Hessian stage runs
    assert memory.estimate(replace("model", filters=64), shape, d, 50, 5, 10)["scores"] > 3.5 * stages["scores"]
    # one task at a time (the conv4 default) against the whole minibatch of 16 at once
    assert memory.estimate(replace("train", chunk=0), shape, d, 50, 5, 10)["adam"] > 10 * stages["adam"]
    with pytest.raises(run_config.ConfigError, match=r"activations \(float32\)"):
        memory.check(conv, shape, d, 50, 5, 10, limit=1.0)


def test_fit_pca_whitens_and_maps_any_leading_axes():
    images = metaif.data.load_digits().images[:500]
    pca = metaif.data.fit_pca(images, 6)
    features = pca(images)
    assert features.shape == (500, 6)
    np.testing.assert_allclose(features.mean(0), 0.0, atol=1e-10)
    np.testing.assert_allclose(features.std(0), 1.0, rtol=1e-10)
    np.testing.assert_allclose(np.cov(features.T, bias=True), np.eye(6), atol=1e-10)  # decorrelated
    np.testing.assert_allclose(pca(images.reshape(50, 10, 8, 8)), features.reshape(50, 10, 6))
    with pytest.raises(ValueError, match="fit_pca\\(k\\) = 100 exceeds"):
        metaif.data.fit_pca(images, 100)


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(run_config.ConfigError):
        cli.main(["--debug", "run", str(write(tmp_path / "bad.toml", "[model]\nhiden = 1\n"))])
    with pytest.raises(run_config.ConfigError):
        cli.main(["run", str(write(tmp_path / "bad2.toml", "[model]\nhiden = 1\n")), "--debug"])


# ----------------------------------------------------------------------------- a whole run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    config = write(folder / "tiny.toml", TINY)
    code = cli.main(["run", str(config), "--out", str(folder / "out"), "--quiet"])
    assert code == 0
    shutil.copy(folder / "out" / "summary.json", folder / "first-summary.json")  # before any rerun
    return folder, config, folder / "out"


def test_run_writes_scores_plots_and_reports(tiny_run):
    _, _, out = tiny_run
    for name in (
        "scores_tasks.csv",
        "scores_support.csv",
        "scores_query.csv",
        "scores.json",
        "summary.json",
        "report.md",
        "report.html",
        "config.toml",
        "log.jsonl",
        "training.png",
        "scores.png",
        "predicted_vs_actual.png",
        "detection.png",
        "examples.png",
        "editing.png",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "examples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    for key in ("stationarity", "fidelity", "detection", "edit", "timings_s", "device", "memory"):
        assert key in summary
    assert summary["stationarity"]["grad_norm"] < 1e-6
    assert 0.0 <= summary["detection"]["tasks_if"] <= 1.0
    assert summary["device"].startswith("backend cpu") and "float64" in summary["device"]
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 6 and "predicted vs actual" in html
    lines = (out / "scores_support.csv").read_text().splitlines()
    assert lines[0].startswith("level,task,example,influence") and len(lines) == 1 + 8 * 5
    assert "![detection.png](detection.png)" in (out / "report.md").read_text()


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_score_csvs_share_one_documented_schema(tiny_run):
    _, _, out = tiny_run
    header = ",".join(name for name, _ in report.COLUMNS)
    tables = {level: _csv(out / f"scores_{level}.csv") for level in ("tasks", "support", "query")}
    for level in tables:
        assert (out / f"scores_{level}.csv").read_text().splitlines()[0] == header
    assert [len(t) for t in tables.values()] == [8, 8 * 5, 8 * 5]  # TINY: 8 tasks, 5-way 1-shot, 1 query per class
    markdown = (out / "report.md").read_text()
    assert all(f"| `{name}` |" in markdown for name, _ in report.COLUMNS)  # every column documented in the report
    scores = json.loads((out / "scores.json").read_text())
    for level, rows in tables.items():
        assert all(row["level"] == level for row in rows)
        assert [float(r["influence"]) for r in rows] == np.ravel(scores[level]).tolist()
        assert all(float(r["predicted_change_if_removed"]) == -float(r["influence"]) for r in rows)
        retrained = [r for r in rows if r["actual_change_if_removed"]]
        assert len(retrained) == 3  # TINY's leave-one-out sample per level
    examples = tables["support"] + tables["query"]
    classes = np.asarray(scores["classes"])
    for r in examples:
        task, label, true = int(r["task"]), int(r["label"]), int(r["true_label"])
        assert r["label_wrong"] == str(int(label != true))
        assert int(r["class"]) == classes[task, true] and int(r["labelled_class"]) == classes[task, label]
        if r["flipped"] == "1" and r["task_corrupted"] == "0":
            assert r["label_wrong"] == "1"
    assert all(r["flipped"] == "0" for r in tables["query"])
    # inside corrupted tasks labels are random, not flipped: wrong labels with flipped = 0 (the report says so)
    assert any(r["task_corrupted"] == "1" and r["label_wrong"] == "1" and r["flipped"] == "0" for r in examples)
    assert "label_wrong can be 1 with flipped = 0" in markdown
    removed = {r["task"] for r in tables["tasks"] if r["removed_by_edit"] == "1"}
    assert len(removed) == 2  # TINY: [edit] tasks = 0.25 of 8
    assert all((r["removed_by_edit"] == "1") == (r["task"] in removed) for r in tables["query"])
    assert all(r["removed_by_edit"] == "1" for r in tables["support"] if r["task"] in removed)


def test_class_column_is_the_digit_of_the_image(tiny_run):
    """`class` names the dataset class (the digit), not the within-task label: checked on the pixels."""
    _, _, out = tiny_run
    digits = metaif.data.load_digits()
    pixels = np.round(np.clip(digits.images, 0, 1) * 255).astype(np.uint8)
    digit_of = {}
    for image, label in zip(pixels, digits.labels):
        digit_of.setdefault(image.tobytes(), set()).add(int(label))
    images = np.load(out / "checkpoints" / "data.npz")["support_images"]
    rows = _csv(out / "scores_support.csv")
    for r in rows:
        assert digit_of[images[int(r["task"]), int(r["example"])].tobytes()] == {int(r["class"])}


def test_figures_show_classes_full_bars_and_newton_on_its_own_axis(tiny_run, tmp_path, monkeypatch):
    _, config_path, out = tiny_run
    results = pipeline.run(run_config.load(config_path), out, pipeline.UI(quiet=True))  # every stage reused
    summary = report.summarize(results)
    figures = {}
    monkeypatch.setattr(report, "_finish", lambda fig, path, caption: figures.setdefault(path.name, fig))
    report.figures(tmp_path, results, summary, top_k=3)
    try:
        loss_axis, accuracy_axis = figures["editing.png"].axes[:2]
        assert loss_axis.get_ylim()[0] == 0 and accuracy_axis.get_ylim() == (0, 1)  # bars are not truncated
        assert not loss_axis.get_legend()  # no undamped "predicted" line
        adam_norms, newton_norms = figures["training.png"].axes[1], figures["training.png"].axes[2]
        steps = len(results["refined"]["grad_norms"])
        assert len(adam_norms.lines[0].get_xdata()) == 150 and len(newton_norms.lines[0].get_xdata()) == steps + 1
        assert newton_norms.get_xlim()[1] < steps + 1  # Newton has its own axis
        titles = [ax.get_title() for ax in figures["examples.png"].axes if ax.get_title()]
        assert len(titles) == 6 and all(": class " in t for t in titles)
    finally:
        for figure in figures.values():
            report._plt().close(figure)


def test_summary_says_what_each_stage_cost(tiny_run):
    folder, _, _ = tiny_run
    first = json.loads((folder / "first-summary.json").read_text())
    stages = first["stages"]
    assert list(stages) == [
        "data",
        "train_adam",
        "train_newton",
        "evaluate",
        "solve",
        "scores",
        "baseline",
        "loo",
        "edit",
    ]
    assert abs(sum(s["share"] for s in stages.values()) - 1) < 1e-9 and first["compute_s"] > 0
    assert all(s["seconds"] > 0 and s["peak_rss_gib"] > 0.05 and not s["reused"] for s in stages.values())
    assert not first["resumed"] and first["wall_s"] >= first["compute_s"] * 0.9
    table = report.rows(first)
    for name in stages:
        assert any(row and row[0].strip() == report.STAGES[name] and row[1].endswith("%)") for row in table), name


def test_resume_keeps_the_original_measurements_and_marks_reuse(tiny_run):
    """A rerun of a finished run reuses every stage and reports the measurements made when the
    stages were computed (time, peak memory), not its own."""
    folder, config, out = tiny_run
    first = json.loads((folder / "first-summary.json").read_text())
    assert cli.main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["resumed"] and set(again["reused_stages"]) == set(first["stages"])
    assert again["compute_s"] == first["compute_s"]
    assert again["memory"]["measured_peak_gib"] == first["memory"]["measured_peak_gib"]
    for name, stage in first["stages"].items():
        assert again["stages"][name] == {**stage, "reused": True, "checkpoints_reused": stage["checkpoints"]}, name
    markdown = (out / "report.md").read_text()
    assert markdown.count("saved by an earlier command, reused") == len(first["stages"])
    assert f"| time: all stages | {first['compute_s']:.1f} s |" in markdown
    assert f"/ {first['memory']['measured_peak_gib']:.2f} GiB |" in markdown


def test_report_explains_the_edit_row(tiny_run):
    _, _, out = tiny_run
    summary = json.loads((out / "summary.json").read_text())
    assert "target_predicted" not in summary["edit"]  # the undamped first-order sum is not reported
    markdown = (out / "report.md").read_text()
    assert "held-out loss: before / predicted" not in markdown
    row = next(line for line in markdown.splitlines() if line.startswith("| held-out loss: before / edit / retrain |"))
    assert "damping δ = 0.100 ([edit] damping)" in row and "overshoots along the Hessian's flat directions" in row


def test_demo_quick_is_the_demo_without_the_retraining_stages(monkeypatch):
    seen = []
    monkeypatch.setattr(
        cli, "_execute", lambda config, out, label, fresh, quiet, command: seen.append((config, out, command)) or 0
    )
    assert cli.main(["demo", "--quick"]) == 0 and cli.main(["demo"]) == 0
    (quick, quick_out, quick_command), (demo, demo_out, _) = seen
    assert (
        quick is run_config.QUICK
        and quick_out == Path("demo-out-quick")
        and quick_command.startswith("metaif demo --quick")
    )
    assert demo is run_config.DEMO and demo_out == Path("demo-out")
    for section in ("data", "tasks", "model", "train", "influence", "report"):  # the same problem and scores
        assert getattr(quick, section) == getattr(demo, section)
    assert (quick.check.tasks, quick.check.support, quick.check.query, quick.edit.tasks, quick.edit.support) == (
        0,
        0,
        0,
        0,
        0,
    )


def test_run_without_check_and_edit(tmp_path):
    """What `metaif demo --quick` runs: no leave-one-out sample, no edit; the report says so."""
    text = TINY.replace("tasks = 3\nsupport = 3\nquery = 3", "tasks = 0\nsupport = 0\nquery = 0")
    config = write(tmp_path / "t.toml", text.replace("tasks = 0.25\nsupport = 0.05", "tasks = 0.0\nsupport = 0.0"))
    assert cli.main(["run", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "loo" not in summary["stages"] and "edit" not in summary["stages"]
    assert summary["fidelity"]["tasks"]["n"] == 0
    assert (
        not (tmp_path / "out" / "editing.png").exists() and not (tmp_path / "out" / "predicted_vs_actual.png").exists()
    )
    table = report.rows(summary)
    assert (
        "predicted vs actual",
        "not checked",
        "[check] tasks, support, query = 0 (e.g. metaif demo --quick)",
    ) in table
    assert ("edit", "not run", "[edit] tasks, support = 0 (e.g. metaif demo --quick)") in table
    assert not any(row and "n/a" in row[1] for row in table)


TINY_CONV4 = """\
[tasks]
train = 4
target = 4
test = 4
shots = 1
queries = 1
[model]
kind = "conv4"
filters = 4
inner_lr = 0.4
meta_reg = 0.0001
[train]
adam_steps = 4
adam_lr = 0.01
minibatch = 2
newton_steps = 0
checkpoint_every = 2
[influence]
solver = "cg"
damping = "auto"
chunk = 2
[check]
tasks = 0
support = 0
query = 0
[edit]
tasks = 0.0
support = 0.0
[report]
top_k = 2
"""


def test_conv4_reads_raw_images_in_float32_and_evaluates_tasks_in_chunks(tmp_path):
    """digits (8×8) through conv4: images kept as images, float32 throughout; the target loss and
    the accuracy one task at a time equal metaif's all-at-once values."""
    config = run_config.load(write(tmp_path / "c.toml", TINY_CONV4))
    data = pipeline.build_data(config)
    assert data["train_sx"].shape == (4, 5, 8, 8) and data["train_sx"].dtype == np.float32
    prepared = pipeline.setup(config, data)
    model, target_tasks = prepared.model, prepared.target
    lam = model.init(0)
    assert model.dtype == np.float32 and {x.dtype for x in jax.tree.leaves(lam)} == {jnp.dtype(jnp.float32)}
    assert model.n_params == 541  # 4 filters, 8×8 pooled by rounding up to 1×1, a 5-way head
    assert target_tasks.support["x"].dtype == jnp.float32
    whole = metaif.task_losses(model.problem, lam, target_tasks)
    np.testing.assert_allclose(float(pipeline._target_fn(model.problem, target_tasks, 1)(lam)), whole.mean(), rtol=1e-5)
    direct = metaif.task_accuracies(model.problem, lam, target_tasks, model.predict).mean()
    assert pipeline.accuracy(model, lam, target_tasks, 1) == pytest.approx(float(direct))


@pytest.mark.slow
def test_conv4_run_end_to_end(tmp_path):
    """A whole `metaif run` of kind = "conv4" (float32, Adam on task minibatches one task at a time,
    CG with the default damping): the run folder's outputs, finite scores for every level."""
    config = write(tmp_path / "conv4.toml", TINY_CONV4)
    out = tmp_path / "out"
    assert cli.main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    for name in ("scores_tasks.csv", "scores.json", "summary.json", "report.html", "config.toml", "training.png"):
        assert (out / name).is_file(), name
    scores = json.loads((out / "scores.json").read_text())
    for level, shape in (("tasks", (4,)), ("support", (4, 5)), ("query", (4, 5))):
        assert np.shape(scores[level]) == shape and np.isfinite(scores[level]).all(), level
    summary = json.loads((out / "summary.json").read_text())
    assert summary["d"] == 541 and summary["device"].endswith("float32")
    saved = tomllib.loads((out / "config.toml").read_text())
    assert (
        saved["model"]["kind"] == "conv4" and saved["train"]["chunk"] == 1 and saved["influence"]["damping"] == "auto"
    )


def test_chunked_scores_equal_one_influence_call(tiny_run):
    """Ground truth for the chunked computation: metaif.influence on all tasks at once."""
    _, config_path, out = tiny_run
    config = run_config.load(config_path)
    store = Store(out)
    data = np.load(store.path("data"))
    train, target_tasks = pipeline.task_set(data, "train"), pipeline.task_set(data, "target")
    model = pipeline.build_model(config.model, data["train_sx"].shape[-1], config.tasks.ways)
    newton = np.load(store.path("train_newton"))
    lam = jax.tree.unflatten(
        jax.tree.structure(model.init(0)),
        [jnp.asarray(newton[f"p{i}"]) for i in range(len(jax.tree.leaves(model.init(0))))],
    )
    target = lambda p: jnp.mean(metaif.task_losses(model.problem, p, target_tasks))
    result = metaif.influence(model.problem, lam, train, target=target, solver=metaif.solvers.Dense())
    scores = json.loads((out / "scores.json").read_text())
    for level in ("tasks", "support", "query"):
        np.testing.assert_allclose(np.asarray(scores[level]), np.asarray(getattr(result, level)), rtol=1e-9, atol=1e-13)


def test_rerun_reuses_everything_and_a_changed_config_recomputes_only_its_stages(tiny_run, capsys):
    folder, config, out = tiny_run
    before = (out / "log.jsonl").read_text().splitlines()
    assert cli.main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    new = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()[len(before) :]]
    assert new and all(r["event"] == "reused" for r in new), new
    changed = write(folder / "tiny2.toml", TINY.replace("[report]\ntop_k = 3", "[report]\ntop_k = 2\nplots = false"))
    assert cli.main(["run", str(changed), "--out", str(out), "--quiet"]) == 0  # report options: no stage recomputed
    new = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()[len(before) + len(new) :]]
    assert all(r["event"] == "reused" for r in new)


def test_store_rejects_stale_and_unreadable_checkpoints(tmp_path):
    store = Store(tmp_path)
    store.save("x", fingerprint("a", 1), {"v": np.arange(3.0)})
    assert np.array_equal(store.load("x", fingerprint("a", 1))["v"], np.arange(3.0))
    assert store.load("x", fingerprint("a", 2)) is None  # config or code changed
    store.path("x").write_bytes(b"truncated")
    assert store.load("x", fingerprint("a", 1)) is None  # a torn file is recomputed
    assert not list(tmp_path.glob("checkpoints/.*.tmp"))  # atomic writes leave no temporaries


def test_adam_resumes_mid_training_exactly(tmp_path):
    """Interrupted between two Adam checkpoints, training continues from the last one and ends
    bitwise where an uninterrupted run ends."""
    config = run_config.from_dict(tomllib.loads(TINY))
    data = pipeline.build_data(config)
    train = pipeline.task_set(data, "train")
    model = pipeline.build_model(config.model, data["train_sx"].shape[-1], config.tasks.ways)

    class Stop(Exception):
        pass

    class StopAfterFirstChunk(pipeline.UI):
        def progress(self, description, total=None, done=0):
            import contextlib

            @contextlib.contextmanager
            def bar():
                def advance(k=1):
                    raise Stop

                yield advance

            return bar()

    def context(folder, ui):
        return pipeline.Context(config, Store(folder), ui, "code")

    whole = pipeline._adam(context(tmp_path / "a", pipeline.UI(quiet=True)), model, train, "fp")
    with pytest.raises(Stop):
        pipeline._adam(context(tmp_path / "b", StopAfterFirstChunk(quiet=True)), model, train, "fp")
    assert int(np.load(tmp_path / "b" / "checkpoints" / "train_adam.npz")["done"]) == 50
    resumed = pipeline._adam(context(tmp_path / "b", pipeline.UI(quiet=True)), model, train, "fp")
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert {"event": "resumed", "step": 50}.items() <= next(r for r in log if r["event"] == "resumed").items()
    for key in ("p0", "p1", "p2", "p3", "losses"):
        np.testing.assert_array_equal(whole[key], resumed[key])


@pytest.mark.slow
def test_kill_9_then_restart_loses_nothing(tiny_run, tmp_path):
    """A subprocess killed with SIGKILL mid-run, restarted with the same command: finished stages
    are not recomputed, and the scores equal the uninterrupted run's."""
    _, _, reference = tiny_run
    # No editing (no other stage depends on it, so the scores still compare with the reference run;
    # the test stays short).
    config = write(tmp_path / "tiny.toml", TINY.replace("tasks = 0.25\nsupport = 0.05", "tasks = 0.0\nsupport = 0.0"))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "metaif", "run", str(config), "--out", str(out), "--quiet"]
    # A kill mid-write would leave a truncated entry in the suite's compilation cache: its own cache.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache")}
    errors = open(tmp_path / "stderr.txt", "wb")
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=errors)
    log = out / "log.jsonl"
    deadline = time.time() + 240
    while (
        not (log.exists() and '"stage": "scores_0000"' in log.read_text())
        and process.poll() is None
        and time.time() < deadline
    ):
        time.sleep(0.05)
    alive = process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait()
    errors.close()
    assert alive, f"finished or failed before it could be killed: {(tmp_path / 'stderr.txt').read_text()[-2000:]}"
    assert not (out / "scores.json").exists()
    before = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    finished = {r["stage"] for r in before if r["event"] == "computed"}
    assert {"data", "train_adam", "train_newton", "solve", "scores_0000"} <= finished

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    after = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()[len(before) :]]
    recomputed = {r["stage"] for r in after if r["event"] == "computed"}
    assert not finished & recomputed, finished & recomputed
    assert finished <= {r["stage"] for r in after if r["event"] == "reused"}
    ours, theirs = json.loads((out / "scores.json").read_text()), json.loads((reference / "scores.json").read_text())
    for level in ("tasks", "support", "query"):
        np.testing.assert_allclose(ours[level], theirs[level], rtol=1e-10, atol=1e-15)
        np.testing.assert_allclose(
            ours["leave_one_out"][level]["actual_change"],
            theirs["leave_one_out"][level]["actual_change"],
            rtol=1e-8,
            atol=1e-13,
        )
