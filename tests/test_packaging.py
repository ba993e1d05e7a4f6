"""Packaging: one version (pyproject.toml's, reported as `metaif.__version__`), and (slow lane) a
wheel and an sdist built by `python -m build`, the wheel installed into a fresh virtual
environment outside the source tree, where the demo runs and `metaif bench` says plainly that it
needs a source checkout."""

import os
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

import metaif

CORE_ONLY = """
import importlib.util, jax, jax.numpy as jnp, metaif
assert importlib.util.find_spec("sklearn") is None and importlib.util.find_spec("matplotlib") is None
loss = lambda params, meta_params, example: (example["x"] @ params["w"] - example["y"]) ** 2
key = jax.random.key(0)
x = jax.random.normal(key, (4, 6, 3))
tasks = metaif.TaskSet(support={"x": x[:, :3], "y": x[:, :3, 0]}, query={"x": x[:, 3:], "y": x[:, 3:, 1]})
problem = metaif.BilevelProblem(loss, loss, metaif.Unrolled(steps=2, lr=0.1), meta_reg=1.0)
lam = metaif.newton_refine(problem, {"w": jnp.zeros(3)}, tasks, steps=3).meta_params
scores = metaif.influence(problem, lam, tasks, target=lambda l: jnp.sum(l["w"] ** 2))
assert scores.tasks.shape == (4,) and bool(jnp.all(jnp.isfinite(scores.tasks)))
print("influence ok")
"""
ROOT = Path(__file__).resolve().parents[1]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_version_is_the_single_source():
    assert metaif.__version__ == VERSION
    assert (ROOT / "metaif" / "py.typed").is_file()
    assert f"## {VERSION}" in (ROOT / "CHANGELOG.md").read_text()


def _run(command, cwd, timeout=900, **kwargs):
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, **kwargs)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.timeout(2400)  # build, a full install from the package index, the demo (about 5 min idle)
def test_wheel_installs_and_runs_outside_the_source_tree(tmp_path):
    dist = tmp_path / "dist"
    code, out = _run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)], cwd=tmp_path)
    assert code == 0, out[-4000:]
    wheel = next(dist.glob(f"metaif-{VERSION}-py3-none-any.whl"))
    sdist = next(dist.glob(f"metaif-{VERSION}.tar.gz"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "metaif/py.typed" in names and "metaif/cli.py" in names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "experiments/"))]
    with tarfile.open(sdist) as archive:
        assert f"metaif-{VERSION}/pyproject.toml" in archive.getnames()

    venv, work = tmp_path / "venv", tmp_path / "work"
    work.mkdir()
    code, out = _run([sys.executable, "-m", "venv", str(venv)], cwd=work)
    assert code == 0, out
    python, command = venv / "bin" / "python", venv / "bin" / "metaif"
    code, out = _run([str(python), "-m", "pip", "install", "--quiet", str(wheel)], cwd=work)
    assert code == 0, out[-4000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    # the core dependencies alone (jax, jaxlib, optax, flax, numpy) import metaif and compute influence
    code, out = _run([str(python), "-c", CORE_ONLY], cwd=work, env=env)
    assert code == 0 and "influence ok" in out, out[-4000:]
    code, out = _run([str(command), "demo", "--out", "bare", "--quiet"], cwd=work, env=env)
    assert code != 0 and "pip install scikit-learn" in out, out[-2000:]  # the demo's data extra, named
    code, out = _run([str(python), "-m", "pip", "install", "--quiet", f"{wheel}[cli]"], cwd=work)
    assert code == 0, out[-4000:]

    code, out = _run(
        [str(python), "-c", "import metaif; print(metaif.__file__); print(metaif.__version__)"], cwd=work, env=env
    )
    where, version = out.split()[-2:]
    assert code == 0 and Path(where).is_relative_to(venv) and version == VERSION, out
    code, out = _run([str(command), "--version"], cwd=work, env=env)
    assert code == 0 and VERSION in out, out

    code, out = _run([str(command), "demo", "--out", "demo-out", "--quiet"], cwd=work, env=env)
    assert code == 0, out[-4000:]
    for name in ("report.html", "report.md", "summary.json"):
        assert (work / "demo-out" / name).stat().st_size > 0

    code, out = _run([str(command), "bench", "--quick"], cwd=work, env=env)
    assert code == 1 and "source checkout" in out and "pip install -e ." in out, out[-2000:]
