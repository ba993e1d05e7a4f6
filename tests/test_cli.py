"""The `metaif` command: help, config validation, errors and exit codes, the outputs of a run, and
resumability (a real kill -9 of a running subprocess, then a restart that reuses finished work and
gives the same scores as an uninterrupted run). Runs use a tiny digits config (seconds)."""

import json
import os
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
from metaif._run import memory, pipeline
from metaif._run.store import Store, fingerprint

ROOT = Path(__file__).resolve().parents[1]
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
        for section in ("[data]", "[tasks]", "[model]", "[train]", "[influence]", "[check]", "[edit]", "[report]", "[run]"):
            assert section in out
    if command in ([], ["demo"], ["run"]):
        assert "resum" in out


def test_no_command_prints_help_and_fails(capsys):
    code, out, _ = run_main(capsys)
    assert code == cli.EXIT_USAGE and "usage: metaif" in out


def test_console_script_and_module_alias():
    version = subprocess.run([str(Path(sys.executable).parent / "metaif"), "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and metaif.__version__ in version.stdout
    alias = subprocess.run([sys.executable, "-m", "metaif.demo", "--help"], capture_output=True, text=True, timeout=120)
    assert alias.returncode == 0 and "metaif demo" in alias.stdout


def test_bench_list(capsys):
    code, out, _ = run_main(capsys, "bench", "--list")
    assert code == 0 and all(name in out for name in cli.BENCHMARKS)


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("text, expected", [
    ("[model]\nhiden = [8]\n", ["unknown key 'hiden' in section [model]", "Did you mean 'hidden'", "Valid keys of [model]", "features"]),
    ("[modle]\nhidden = [8]\n", ["unknown section [modle]", "Did you mean 'model'", "[influence]"]),
    ("[tasks]\nways = \"five\"\n", ["[tasks] ways must be an integer", "'five'"]),
    ("[influence]\nsolver = \"dense2\"\n", ["[influence] solver must be one of 'dense', 'cg'", "Did you mean 'dense'"]),
    ("[tasks]\ncorrupt_tasks = 1.5\n", ["corrupt_tasks is a fraction"]),
    ("[tasks\n", ["is not valid TOML"]),
])
def test_bad_config_is_one_paragraph_and_exit_2(capsys, tmp_path, text, expected):
    code, _, err = run_main(capsys, "run", str(write(tmp_path / "bad.toml", text)), "--out", str(tmp_path / "out"))
    assert code == cli.EXIT_USAGE
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    for part in expected:
        assert part in err, err
    assert not (tmp_path / "out").exists()


def test_missing_config_file(capsys, tmp_path):
    code, _, err = run_main(capsys, "run", str(tmp_path / "nope.toml"))
    assert code == cli.EXIT_USAGE and "does not exist" in err


def test_every_example_config_is_valid():
    names = sorted(p.name for p in (ROOT / "configs").glob("*.toml"))
    assert {"digits.toml", "omniglot.toml", "mnist.toml"} <= set(names)
    for path in (ROOT / "configs").glob("*.toml"):
        run_config.load(path)
    assert run_config.load(ROOT / "configs" / "digits.toml").to_dict() == {**run_config.DEMO.to_dict(), "run": {
        **run_config.DEMO.to_dict()["run"], "name": "digits"}}


# ----------------------------------------------------------------------------- runtime errors


def test_missing_data_path(capsys, tmp_path):
    config = write(tmp_path / "c.toml", f'[data]\ndataset = "mnist"\nroot = "{tmp_path / "no-such-folder"}"\n')
    code, _, err = run_main(capsys, "run", str(config), "--out", str(tmp_path / "out"))
    assert code == cli.EXIT_FAILED and "no-such-folder" in err and "Traceback" not in err and err.count("\n") == 1


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
    module = write(tmp_path / "model.py", """\
        import jax, jax.numpy as jnp

        def init(key, n_inputs, ways):
            return {"w": 0.1 * jax.random.normal(key, (n_inputs, ways), jnp.float64)}

        def loss(params, meta_params, example):
            return (example["x"] @ params["w"]) ** 2      # a vector: forgot to reduce
        """)
    config = write(tmp_path / "c.toml", TINY.replace("[model]\n", f'[model]\nkind = "python"\nmodule = "{module}"\n'))
    code, _, err = run_main(capsys, "run", str(config), "--out", str(tmp_path / "out"))
    assert code == cli.EXIT_FAILED and "not a scalar" in err and "ONE example" in err and "Traceback" not in err


def test_run_that_would_not_fit_in_memory(capsys, tmp_path):
    config = write(tmp_path / "c.toml", TINY + "[run]\nmemory_limit_gb = 0.00001\n")
    code, _, err = run_main(capsys, "run", str(config), "--out", str(tmp_path / "out"))
    assert code == cli.EXIT_USAGE and "would not fit in memory" in err and "GiB" in err and "batch_size" in err
    assert not (tmp_path / "out" / "checkpoints" / "train_adam.npz").exists()   # stopped before training


def test_memory_estimate_and_batch_size_suggestion():
    raw = {"tasks": {"train": 400}, "model": {"features": 64, "hidden": [64]}, "train": {"newton_steps": 0},
           "check": {"tasks": 0, "support": 0, "query": 0}}
    config = run_config.from_dict(raw)
    chunked_config = run_config.from_dict({**raw, "influence": {"batch_size": 8}})
    full, chunked = (memory.estimate(c, 64, 5000, 400, 10, 15) for c in (config, chunked_config))
    assert chunked["solve"] < full["solve"] and full["peak"] == max(v for k, v in full.items() if k != "peak")
    limit = chunked["peak"] * 1.01
    assert full["peak"] > limit
    with pytest.raises(run_config.ConfigError, match=r"would not fit in memory.*set \[influence\] batch_size = \d+"):
        memory.check(config, 64, 5000, 400, 10, 15, limit=limit)
    assert memory.check(chunked_config, 64, 5000, 400, 10, 15, limit=limit) == chunked


def test_fit_pca_whitens_and_maps_any_leading_axes():
    images = metaif.data.load_digits().images[:500]
    pca = metaif.data.fit_pca(images, 6)
    features = pca(images)
    assert features.shape == (500, 6)
    np.testing.assert_allclose(features.mean(0), 0.0, atol=1e-10)
    np.testing.assert_allclose(features.std(0), 1.0, rtol=1e-10)
    np.testing.assert_allclose(np.cov(features.T, bias=True), np.eye(6), atol=1e-10)   # decorrelated
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
    return folder, config, folder / "out"


def test_run_writes_scores_plots_and_reports(tiny_run):
    _, _, out = tiny_run
    for name in ("scores_tasks.csv", "scores_support.csv", "scores_query.csv", "scores.json", "summary.json", "report.md",
                 "report.html", "config.toml", "log.jsonl", "training.png", "scores.png", "predicted_vs_actual.png",
                 "detection.png", "examples.png", "editing.png"):
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
    assert lines[0].startswith("task,example,influence") and len(lines) == 1 + 8 * 5
    assert "![detection.png](detection.png)" in (out / "report.md").read_text()


def test_chunked_scores_equal_one_influence_call(tiny_run):
    """Ground truth for the chunked computation: metaif.influence on all tasks at once."""
    _, config_path, out = tiny_run
    config = run_config.load(config_path)
    store = Store(out)
    data = np.load(store.path("data"))
    train, target_tasks = pipeline.task_set(data, "train"), pipeline.task_set(data, "target")
    model = pipeline.build_model(config.model, data["train_sx"].shape[-1], config.tasks.ways)
    newton = np.load(store.path("train_newton"))
    lam = jax.tree.unflatten(jax.tree.structure(model.init(0)),
                             [jnp.asarray(newton[f"p{i}"]) for i in range(len(jax.tree.leaves(model.init(0))))])
    target = lambda p: jnp.mean(metaif.task_losses(model.problem, p, target_tasks))
    result = metaif.influence(model.problem, lam, train, target=target, solver=metaif.solvers.Dense())
    scores = json.loads((out / "scores.json").read_text())
    for level in ("tasks", "support", "query"):
        np.testing.assert_allclose(np.asarray(scores[level]), np.asarray(getattr(result, level)), rtol=1e-9, atol=1e-13)


def test_rerun_reuses_everything_and_a_changed_config_recomputes_only_its_stages(tiny_run, capsys):
    folder, config, out = tiny_run
    before = (out / "log.jsonl").read_text().splitlines()
    assert cli.main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    new = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()[len(before):]]
    assert new and all(r["event"] == "reused" for r in new), new
    changed = write(folder / "tiny2.toml", TINY.replace("[report]\ntop_k = 3", "[report]\ntop_k = 2\nplots = false"))
    assert cli.main(["run", str(changed), "--out", str(out), "--quiet"]) == 0   # report options: no stage recomputed
    new = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()[len(before) + len(new):]]
    assert all(r["event"] == "reused" for r in new)


def test_store_rejects_stale_and_unreadable_checkpoints(tmp_path):
    store = Store(tmp_path)
    store.save("x", fingerprint("a", 1), {"v": np.arange(3.0)})
    assert np.array_equal(store.load("x", fingerprint("a", 1))["v"], np.arange(3.0))
    assert store.load("x", fingerprint("a", 2)) is None                      # config or code changed
    store.path("x").write_bytes(b"truncated")
    assert store.load("x", fingerprint("a", 1)) is None                      # a torn file is recomputed
    assert not list(tmp_path.glob("checkpoints/.*.tmp"))                     # atomic writes leave no temporaries


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
    while not (log.exists() and '"stage": "scores_0000"' in log.read_text()) and process.poll() is None and time.time() < deadline:
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
    after = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()[len(before):]]
    recomputed = {r["stage"] for r in after if r["event"] == "computed"}
    assert not finished & recomputed, finished & recomputed
    assert finished <= {r["stage"] for r in after if r["event"] == "reused"}
    ours, theirs = json.loads((out / "scores.json").read_text()), json.loads((reference / "scores.json").read_text())
    for level in ("tasks", "support", "query"):
        np.testing.assert_allclose(ours[level], theirs[level], rtol=1e-10, atol=1e-15)
        np.testing.assert_allclose(ours["leave_one_out"][level]["actual_change"], theirs["leave_one_out"][level]["actual_change"],
                                   rtol=1e-8, atol=1e-13)
