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

# The README's API example (metaif, problems, training, influence, leave-one-out retraining).
QUICKSTART = "docs/examples/quickstart.py"
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

    # the core dependencies alone (jax, jaxlib, optax, flax, numpy) run the README's API example
    code, out = _run(
        [str(python), "-c", "import importlib.util as u; print(u.find_spec('sklearn'))"], cwd=work, env=env
    )
    assert code == 0 and out.strip() == "None", out  # no extras installed
    code, out = _run([str(python), str(ROOT / QUICKSTART)], cwd=work, env=env)
    assert code == 0 and "most harmful task" in out, out[-4000:]
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
