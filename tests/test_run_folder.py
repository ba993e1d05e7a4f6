"""The run folder of `metaif run`: checkpoints verified against their manifest (edited, damaged,
foreign, truncated files are named, moved aside and recomputed with their dependents), results keyed
on the content of the data and model files and not on settings that change nothing, run names
confined to one folder under runs/, folders metaif did not create left alone, one run per folder,
and `--check` checking what the run checks. Runs use a tiny digits config (seconds)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest

import metaif
from metaif import cli
from metaif._run import config as run_config
from metaif._run import folder, pipeline
from metaif._run.store import Store, fingerprint
from test_cli import TINY as CLI_TINY
from test_cli import write

ROOT = Path(__file__).resolve().parents[1]
# Checkpoints are keyed by metaif's code digest; pin it so concurrent edits of the source tree
# cannot invalidate a test's checkpoints mid-test.
os.environ["METAIF_CODE_VERSION"] = "tests"

# The tiny digits config of test_cli.py, with Adam long enough for an array over 4 KiB (see
# test_npz_shape_field_bit_flip_is_caught) and no plots.
TINY = (
    CLI_TINY.replace("adam_steps = 150", "adam_steps = 600")
    .replace("checkpoint_every = 50", "checkpoint_every = 200")
    .replace("top_k = 3", "top_k = 3\nplots = false")
)
assert all(part in TINY for part in ("adam_steps = 600", "checkpoint_every = 200", "plots = false", "features = 4")), (
    TINY
)
STAGES = {
    "data",
    "train_adam",
    "train_newton",
    "evaluate",
    "solve",
    "scores_0000",
    "scores_0001",
    "baseline",
    "loo_tasks_0000",
    "loo_support_0000",
    "loo_query_0000",
    "edit",
}
AFTER_NEWTON = STAGES - {"data", "train_adam"}


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def events(out: Path, since: int = 0) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()[since:]]


def n_events(out: Path) -> int:
    return len((out / "log.jsonl").read_text().splitlines())


def stages(records: list[dict], event: str) -> set[str]:
    return {r["stage"] for r in records if r["event"] == event}


def results(out: Path) -> tuple[dict, dict]:
    summary = json.loads((out / "summary.json").read_text())
    return json.loads((out / "scores.json").read_text()), summary["stationarity"]


def assert_same_results(a: Path, b: Path) -> None:
    (scores_a, stat_a), (scores_b, stat_b) = results(a), results(b)
    for level in ("tasks", "support", "query"):
        np.testing.assert_allclose(scores_a[level], scores_b[level], rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(stat_a["adam_grad_norm"], stat_b["adam_grad_norm"], rtol=1e-10)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run: (config path, run folder). Tests work on copies (`copy`)."""
    folder_ = tmp_path_factory.mktemp("finished")
    config = write(folder_ / "tiny.toml", TINY)
    assert cli.main(["run", str(config), "--out", str(folder_ / "out"), "--quiet"]) == 0
    assert stages(events(folder_ / "out"), "computed") == STAGES
    return config, folder_ / "out"


@pytest.fixture
def copy(finished, tmp_path):
    config, out = finished
    return config, Path(shutil.copytree(out, tmp_path / "out", symlinks=True))


def rerun(capsys, config, out):
    """Rerun the command on `out`; returns (stderr, the log records it added)."""
    since = n_events(out)
    code, _, err = run(capsys, "run", config, "--out", out, "--quiet")
    assert code == 0, err
    return err, events(out, since)


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def damage_zip_header(path: Path) -> bytes:
    """Set the compression method of the first member in the zip's central directory to 99."""
    data = bytearray(path.read_bytes())
    at = data.index(b"PK\x01\x02") + 10
    data[at : at + 2] = (99).to_bytes(2, "little")
    path.write_bytes(bytes(data))
    return bytes(data)


def assert_rejected(err: str, out: Path, name: str, reason: str) -> None:
    """The warning names the file and the reason; the file now lies in rejected/."""
    assert f"warning: checkpoint {out / 'checkpoints' / name}.npz {reason}" in err, err
    assert "Moved it to" in err and "recomputing it and the stages that depend on it" in err
    assert [p.name for p in (out / "rejected").iterdir() if p.name.startswith(name + ".")], list(
        (out / "rejected").iterdir()
    )


# ----------------------------------------------------------------------------- checkpoints and their manifest


def test_manifest_records_every_checkpoint_by_sha256(finished):
    _, out = finished
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["checkpoints"]) == STAGES == {p.stem for p in (out / "checkpoints").glob("*.npz")}
    for name, entry in manifest["checkpoints"].items():
        data = (out / "checkpoints" / f"{name}.npz").read_bytes()
        assert entry["sha256"] == metaif.data._source.sha256_bytes(data) and entry["bytes"] == len(data)


def test_bit_flip_is_named_moved_aside_and_recomputed_with_its_dependents(copy, finished, capsys):
    """One bit flipped inside train_adam.npz (an array's data): before, the zip still loaded and the
    report's stationarity changed silently."""
    config, out = copy
    path = out / "checkpoints" / "train_adam.npz"
    flip_bit(path, path.read_bytes().index(b"grad_norms.npy") + 200, 3)
    err, new = rerun(capsys, config, out)
    assert_rejected(err, out, "train_adam", "does not match the sha256 recorded in manifest.json")
    assert {r["stage"] for r in new if r["event"] == "rejected"} == {"train_adam"}
    assert stages(new, "computed") == STAGES - {"data"}  # the file and everything after it
    assert_same_results(out, finished[1])
    err, new = rerun(capsys, config, out)  # and the folder is sound again
    assert "warning" not in err and stages(new, "reused") == STAGES


def test_valid_but_edited_npz_is_recomputed(copy, finished, capsys):
    """The task scores of scores_0000.npz rewritten in a valid npz: before, used silently."""
    config, out = copy
    path = out / "checkpoints" / "scores_0000.npz"
    with np.load(path) as entry:
        arrays = dict(entry)
    arrays["tasks"] = arrays["tasks"] * 10
    np.savez(path, **arrays)
    err, new = rerun(capsys, config, out)
    assert_rejected(err, out, "scores_0000", "does not match the sha256")
    assert stages(new, "computed") == {"scores_0000", "edit"}  # the edit depends on every score
    assert_same_results(out, finished[1])


def test_foreign_checkpoints_are_not_used(copy, finished, capsys, tmp_path):
    """A checkpoint copied in from another run folder, with the right name and fingerprint: over a
    recorded file (other bytes than recorded) and as a file the manifest does not know."""
    config, out = copy
    other = Store(tmp_path / "other")
    with np.load(out / "checkpoints" / "loo_tasks_0000.npz") as entry:
        arrays = {k: entry[k] for k in entry.files if k != "__fingerprint__"}
        fp = str(entry["__fingerprint__"])
    other.save("loo_tasks_0000", fp, {**arrays, "change": arrays["change"] + 1.0})
    shutil.copy(other.path("loo_tasks_0000"), out / "checkpoints")
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["checkpoints"]["loo_query_0000"]  # as if this run had not got that far
    (out / "manifest.json").write_text(json.dumps(manifest))
    err, new = rerun(capsys, config, out)
    assert_rejected(err, out, "loo_tasks_0000", "does not match the sha256")
    assert_rejected(err, out, "loo_query_0000", "is not recorded in manifest.json (copied in from another run folder")
    assert stages(new, "computed") == {"loo_tasks_0000", "loo_query_0000"}
    assert_same_results(out, finished[1])
    ours, reference = (
        json.loads((o / "scores.json").read_text())["leave_one_out"]["tasks"]["actual_change"]
        for o in (out, finished[1])
    )
    np.testing.assert_allclose(ours, reference, rtol=1e-10)


def test_damaged_zip_header_and_damaged_key_do_not_stick(copy, finished, capsys):
    """Before: `error: That compression method is not supported` and `error: 'p1'` on every rerun,
    without naming the file, until someone deleted it."""
    config, out = copy
    header = out / "checkpoints" / "loo_support_0000.npz"
    damage_zip_header(header)
    with pytest.raises(NotImplementedError, match="compression method"), np.load(header) as entry:
        {key: entry[key] for key in entry.files}
    err, new = rerun(capsys, config, out)
    assert_rejected(err, out, "loo_support_0000", "does not match the sha256")
    assert stages(new, "computed") == {"loo_support_0000"}

    keyed = out / "checkpoints" / "train_newton.npz"
    keyed.write_bytes(keyed.read_bytes().replace(b"p1.npy", b"q1.npy"))  # local header and directory
    with np.load(keyed) as entry:
        assert "p1" not in entry.files
    err, new = rerun(capsys, config, out)
    assert_rejected(err, out, "train_newton", "does not match the sha256")
    assert stages(new, "computed") == AFTER_NEWTON
    assert_same_results(out, finished[1])


def test_npz_shape_field_bit_flip_is_caught(copy, finished, capsys):
    """Issue 18, item 5: one bit in the .npy header of train_adam's grad_norms turns its shape
    (600,) into (200,); numpy loads the shortened array without complaint (zipfile checks the
    CRC only on reading a member to its end), and the report showed a wrong ||grad F|| after Adam.
    Now the file fails its sha256 and is recomputed."""
    config, out = copy
    path = out / "checkpoints" / "train_adam.npz"
    data = path.read_bytes()
    at = data.index(b"'shape': (600,)", data.index(b"grad_norms.npy")) + len(b"'shape': (")
    flip_bit(path, at, 2)  # '6' (0x36) -> '2' (0x32)
    with np.load(path) as entry:
        assert entry["grad_norms"].shape == (200,)  # the silent hazard itself
    err, new = rerun(capsys, config, out)
    assert_rejected(err, out, "train_adam", "does not match the sha256")
    assert stages(new, "computed") == STAGES - {"data"}
    assert_same_results(out, finished[1])


def test_truncated_and_empty_checkpoints_are_recomputed(copy, finished, capsys):
    config, out = copy
    half = out / "checkpoints" / "baseline.npz"
    half.write_bytes(half.read_bytes()[: half.stat().st_size // 2])
    (out / "checkpoints" / "loo_query_0000.npz").write_bytes(b"")
    err, new = rerun(capsys, config, out)
    assert_rejected(err, out, "baseline", "does not match the sha256")
    assert_rejected(err, out, "loo_query_0000", "does not match the sha256")
    assert stages(new, "computed") == {"baseline", "loo_query_0000", "edit"}
    assert_same_results(out, finished[1])


def test_store_reports_a_file_that_matches_its_record_but_does_not_load(tmp_path):
    """The load check behind the sha256 check (e.g. a file numpy can no longer read), and a
    manifest that cannot be read: reported, moved aside, every checkpoint then unrecorded."""
    said = []
    store = Store(tmp_path, warn=said.append)
    fp = fingerprint("x")
    store.save("x", fp, {"v": np.arange(3.0)})
    bad = damage_zip_header(store.path("x"))
    store.manifest["checkpoints"]["x"]["sha256"] = metaif.data._source.sha256_bytes(bad)
    assert store.load("x", fp) is None
    assert "cannot be read as an .npz file (NotImplementedError: That compression method is not supported)" in said[-1]
    assert not store.path("x").exists() and "x" not in store.manifest["checkpoints"]

    store.save("y", fp, {"v": np.arange(3.0)})
    for damaged in ("{not json", '{"checkpoints": {"y": 3}}'):
        (tmp_path / "manifest.json").write_text(damaged)
        reopened = Store(tmp_path, warn=said.append)
        assert "manifest.json cannot be read" in said[-1] and "moved to rejected/" in said[-1]
    assert reopened.load("y", fp) is None and "is not recorded in manifest.json" in said[-1]
    assert sorted(p.name.split(".")[0] for p in (tmp_path / "rejected").iterdir()) == ["manifest", "manifest", "x", "y"]


# ----------------------------------------------------------------------------- run names and folders


@pytest.mark.parametrize("name", ["../escaped", "/tmp/absolute", "a/b", "..", "."])
@pytest.mark.parametrize("check", [False, True])
def test_run_name_is_one_folder_under_runs(capsys, tmp_path, monkeypatch, name, check):
    monkeypatch.chdir(tmp_path)
    config = write(tmp_path / "c.toml", TINY + f"[run]\nname = {json.dumps(name)}\n")
    code, _, err = run(capsys, "run", config, *(["--check"] if check else []))
    assert code == cli.EXIT_USAGE
    assert "[run] name must be a single folder name" in err and repr(name) in err and "--out PATH" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml"]


def test_a_folder_metaif_did_not_create_is_left_alone(capsys, tmp_path):
    """Before, a run into a user's folder overwrote its config.toml and --fresh deleted its
    checkpoints/ folder."""
    theirs = tmp_path / "theirs"
    (theirs / "checkpoints").mkdir(parents=True)
    (theirs / "config.toml").write_text("mine\n")
    (theirs / "checkpoints" / "notes.txt").write_text("mine too\n")
    config = write(tmp_path / "c.toml", TINY)
    for extra in ([], ["--fresh"], ["--check"]):
        code, _, err = run(capsys, "run", config, "--out", theirs, *extra)
        assert code == cli.EXIT_USAGE and err.count("\n") == 1
        assert (
            f"--out {str(theirs)!r} is an existing folder that metaif did not create (it has no manifest.json)" in err
        )
        assert "it holds checkpoints/, config.toml" in err and "Give another --out" in err
    assert (theirs / "config.toml").read_text() == "mine\n" and (theirs / "checkpoints" / "notes.txt").is_file()
    assert sorted(p.name for p in theirs.iterdir()) == ["checkpoints", "config.toml"]


def test_an_empty_folder_is_adopted(tmp_path):
    (tmp_path / "empty").mkdir()
    with folder.claimed(tmp_path / "empty", "--out 'empty'"):
        assert json.loads((tmp_path / "empty" / "manifest.json").read_text())["checkpoints"] == {}
    folder.check(tmp_path / "empty", "--out 'empty'")  # now a metaif run folder


def test_fresh_deletes_only_what_the_manifest_records(copy, finished, capsys):
    config, out = copy
    (out / "checkpoints" / "notes.txt").write_text("mine\n")  # not metaif's: kept
    (out / "checkpoints" / "solve.npz").write_bytes(
        b"not what metaif wrote"
    )  # a recorded name, other bytes: moved aside
    since = n_events(out)
    code, _, err = run(capsys, "run", config, "--out", out, "--quiet", "--fresh")
    assert code == 0, err
    assert stages(events(out, since), "computed") == STAGES and not stages(events(out, since), "reused")
    assert (out / "checkpoints" / "notes.txt").read_text() == "mine\n"
    assert [p.read_bytes() for p in (out / "rejected").iterdir()] == [b"not what metaif wrote"]
    assert "no longer matched what metaif wrote" in err
    assert_same_results(out, finished[1])


# ----------------------------------------------------------------------------- results keyed on content


def _npz_config(tmp_path: Path, npz: Path) -> Path:
    return write(tmp_path / "npz.toml", TINY + f'[data]\ndataset = "npz"\npath = "{npz}"\nheld_out = "images"\n')


def test_a_replaced_data_file_recomputes_and_a_moved_one_does_not(capsys, tmp_path):
    """Before, replacing the .npz reused all stages and reported the old scores."""
    digits = metaif.data.load_digits()
    npz = tmp_path / "mine.npz"
    keep = digits.labels < 6
    np.savez(npz, images=digits.images[keep], labels=digits.labels[keep])
    config, out = _npz_config(tmp_path, npz), tmp_path / "out"
    assert run(capsys, "run", config, "--out", out, "--quiet")[0] == 0
    first = json.loads((out / "scores.json").read_text())["tasks"]

    moved = tmp_path / "moved.npz"
    shutil.copy(npz, moved)
    err, new = rerun(capsys, _npz_config(tmp_path, moved), out)  # same content elsewhere: nothing to redo
    assert stages(new, "reused") == STAGES and not stages(new, "computed")
    assert "moved.npz" in json.loads((out / "summary.json").read_text())["dataset"]

    keep = digits.labels >= 4
    np.savez(npz, images=digits.images[keep], labels=digits.labels[keep] - 4)
    err, new = rerun(capsys, _npz_config(tmp_path, npz), out)
    assert stages(new, "computed") == STAGES and not stages(new, "reused")
    assert not np.allclose(json.loads((out / "scores.json").read_text())["tasks"], first)


MODEL = """\
import jax, jax.numpy as jnp

def init(key, n_inputs, ways):
    return {"w": SCALE * jax.random.normal(key, (n_inputs, ways), jnp.float64), "b": jnp.zeros(ways)}

def logits(params, x):
    return x @ params["w"] + params["b"]

def loss(params, meta_params, example):
    return -jax.nn.log_softmax(logits(params, example["x"]))[example["y"]]
"""


def test_training_is_keyed_on_the_model_file_content(tmp_path, monkeypatch):
    """Before, an edited model file reused all stages and reported the old scores. Now the
    training fingerprint (which every later stage builds on) follows the file's content, not its
    path; the data stage is reused."""

    class Stop(Exception):
        pass

    seen = []

    def adam(ctx, model, train, fp):
        seen.append(fp)
        raise Stop

    monkeypatch.setattr(pipeline, "_adam", adam)
    out = tmp_path / "out"
    for name, scale in (("model.py", "0.1"), ("model.py", "0.5"), ("copy.py", "0.5")):
        module = write(tmp_path / name, MODEL.replace("SCALE", scale))
        config = run_config.from_dict(
            tomllib.loads(TINY.replace("[model]\n", f'[model]\nkind = "python"\nmodule = "{module}"\n'))
        )
        with pytest.raises(Stop):
            pipeline.run(config, out, pipeline.UI(quiet=True))
    assert seen[0] != seen[1] == seen[2]
    assert [r["event"] for r in events(out) if r["stage"] == "data"] == ["computed", "reused", "reused"]


def test_settings_that_change_no_result_recompute_nothing(copy, finished, capsys):
    """Before, changing checkpoint_every recomputed all stages for an identical result."""
    config, out = copy
    changed = write(
        out.parent / "changed.toml",
        TINY.replace("checkpoint_every = 200", "checkpoint_every = 7")
        .replace("[influence]\n", "[influence]\ncg_maxiter = 3\n")  # unused by the dense solver
        .replace("[model]\n", "[model]\nprox_reg = 9.0\n")  # unused by MAML
        + "[run]\nmemory_limit_gb = 50.0\n",
    )
    err, new = rerun(capsys, changed, out)
    assert stages(new, "reused") == STAGES and not stages(new, "computed")


def test_checkpoint_every_does_not_change_training(tmp_path):
    """Why checkpoint_every is left out of the fingerprints: Adam in chunks of 70 or 200 steps ends
    bitwise at the same point."""
    ends = []
    for every in (70, 200):
        config = run_config.from_dict(
            tomllib.loads(TINY.replace("checkpoint_every = 200", f"checkpoint_every = {every}"))
        )
        data = pipeline.build_data(config)
        model = pipeline.build_model(config.model, data["train_sx"].shape[-1], config.tasks.ways)
        ctx = pipeline.Context(config, Store(tmp_path / str(every)), pipeline.UI(quiet=True), "code")
        ends.append(pipeline._adam(ctx, model, pipeline.task_set(data, "train"), "fp"))
    for key in ("p0", "p1", "p2", "p3", "losses", "grad_norms"):
        np.testing.assert_array_equal(ends[0][key], ends[1][key])


def _fake_omniglot(root: Path) -> None:
    """A tiny Omniglot in the official zip layout (2 + 1 alphabets, 2 characters each, 2 drawings)."""
    import io

    from PIL import Image

    (root / "omniglot").mkdir(parents=True)
    for part, alphabets in (("images_background", ("Alpha", "Beta")), ("images_evaluation", ("Gamma",))):
        with zipfile.ZipFile(root / "omniglot" / f"{part}.zip", "w") as archive:
            for a, alphabet in enumerate(alphabets):
                for c in (1, 2):
                    for d in (1, 2):
                        ink = np.zeros((105, 105), bool)
                        ink[10 + 7 * a + c : 40 + d, 5 * d : 60] = True
                        buffer = io.BytesIO()
                        Image.fromarray(~ink).convert("1").save(buffer, format="PNG")
                        archive.writestr(f"{part}/{alphabet}/character{c:02d}/0{c}{d}_{d:02d}.png", buffer.getvalue())


def test_load_omniglot_does_not_trust_an_edited_decoded_cache(tmp_path, monkeypatch):
    """Before, verify=True checked the digest stored inside the cache entry, not its pixels: an
    edited cache was returned as Omniglot."""
    from metaif.data import _omniglot

    monkeypatch.setenv("METAIF_CACHE", str(tmp_path / "cache"))
    _fake_omniglot(tmp_path / "data")
    decoded = {
        part: _omniglot._read_part("t", tmp_path / "data" / "omniglot" / f"{part}.zip", part, 105, False)
        for part in _omniglot._PARTS
    }
    monkeypatch.setattr(_omniglot, "_COUNTS", {"images_background": (2, 4, 8), "images_evaluation": (1, 2, 4)})
    monkeypatch.setattr(_omniglot, "_CONTENT_SHA256", {p: str(a["content_sha256"]) for p, a in decoded.items()})
    truth = metaif.data.load_omniglot(tmp_path / "data", size=105).images  # verified; writes the cache
    (entry,) = (tmp_path / "cache").glob("omniglot-images_background-*.npz")
    with np.load(entry) as cached:
        arrays = dict(cached)
    arrays["images"] = 255 - arrays["images"]  # edited, digest array kept
    np.savez(entry, **arrays)
    np.testing.assert_array_equal(metaif.data.load_omniglot(tmp_path / "data", size=105).images, truth)
    with np.load(entry) as rebuilt:  # and the entry was rebuilt
        np.testing.assert_array_equal(rebuilt["images"], 255 - arrays["images"])


# ----------------------------------------------------------------------------- one run per folder


def test_a_second_run_in_a_held_folder_fails_at_once(copy, capsys):
    config, out = copy
    with folder.claimed(out, f"--out {str(out)!r}"):
        for extra in ([], ["--check"]):
            code, _, err = run(capsys, "run", config, "--out", out, "--quiet", *extra)
            assert code == cli.EXIT_USAGE
            assert f"--out {str(out)!r} is in use by another metaif run (pid {os.getpid()} on host" in err
            assert "Wait for that run to finish or stop it, or give this run another --out" in err


def test_a_lock_left_by_a_killed_run_is_taken_over(copy, finished, capsys):
    config, out = copy
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from metaif._run import folder\n"
            "with folder.claimed(sys.argv[1], 'x'):\n    print('held', flush=True); time.sleep(120)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = run(capsys, "run", config, "--out", out, "--quiet")
        assert code == cli.EXIT_USAGE and f"(pid {holder.pid} on host" in err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    err, new = rerun(capsys, config, out)
    assert (
        f"{out / '.metaif-lock'} was left by a run that stopped without releasing it (pid {holder.pid} on host" in err
    )
    assert "taking it over" in err and stages(new, "reused") == STAGES
    assert (out / ".metaif-lock").read_text() == ""  # released at the end


# ----------------------------------------------------------------------------- --check


NOT_SCALAR = """\
import jax, jax.numpy as jnp

def init(key, n_inputs, ways):
    return {"w": 0.1 * jax.random.normal(key, (n_inputs, ways), jnp.float64)}

def loss(params, meta_params, example):
    return (example["x"] @ params["w"]) ** 2      # a vector: forgot to reduce
"""


@pytest.mark.parametrize(
    "case, edit, expected, code",
    [
        (
            "non-scalar loss",
            lambda text, p: text.replace("[model]\n", f'[model]\nkind = "python"\nmodule = "{p}"\n'),
            "not a scalar",
            cli.EXIT_FAILED,
        ),
        (
            "more PCA features than pixels",
            lambda text, p: text.replace("features = 4", "features = 65"),
            "fit_pca(k) = 65 exceeds",
            cli.EXIT_USAGE,
        ),  # a config problem: exit 2 (issue 16)
        (
            "more ways than classes",
            lambda text, p: text.replace("[tasks]\n", "[tasks]\nways = 11\n"),
            "ways",
            cli.EXIT_USAGE,
        ),  # a config problem the data cannot supply: exit 2 (issue 19)
    ],
)
def test_check_rejects_what_the_run_rejects(capsys, tmp_path, case, edit, expected, code):
    """Before, --check said "valid" for each of these and the run then failed."""
    module = write(tmp_path / "model.py", NOT_SCALAR)
    config = write(tmp_path / "c.toml", edit(TINY, module))
    results_ = [run(capsys, "run", config, "--out", tmp_path / "out", *extra) for extra in (["--check"], ["--quiet"])]
    for got, _, err in results_:
        assert got == code and expected in err and "valid" not in err, (case, err)
    assert results_[0][2] == results_[1][2]  # the same message, before any work
    assert not (tmp_path / "out" / "checkpoints" / "train_adam.npz").exists()


def test_check_writes_nothing_and_says_the_model_file_is_executed(capsys, tmp_path):
    config = write(tmp_path / "c.toml", TINY)
    code, out, _ = run(capsys, "run", config, "--out", tmp_path / "out", "--check")
    assert code == 0 and "valid" in out and f"Output folder: {tmp_path / 'out'}/" in out
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert 'kind = "python" EXECUTES the module file, with --check too' in help_text
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert re.search(r'kind = "python".{0,80}executed', readme)
