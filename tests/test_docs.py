"""docs/ cannot drift: the API reference pages cover every public module and every public name
has a docstring; the site builds with `mkdocs build --strict` (slow lane); the worked example of
docs/conventions.md prints (and asserts) exactly the numbers shown there."""

import importlib
import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import metaif

ROOT = Path(__file__).resolve().parents[1]
# Public modules without their own `__all__` entry in metaif (reached as metaif.evaluation.*, metaif.problems).
EXTRA_MODULES = ["metaif.evaluation", "metaif.evaluation.metrics", "metaif.evaluation.baselines", "metaif.problems"]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _public_modules() -> list[str]:
    submodules = [f"metaif.{name}" for name in metaif.__all__ if inspect.ismodule(getattr(metaif, name))]
    return ["metaif", *submodules, *EXTRA_MODULES]


def _documented_modules() -> set[str]:
    pages = (ROOT / "docs" / "reference").glob("*.md")
    return {m for page in pages for m in re.findall(r"^::: (\S+)$", page.read_text(), flags=re.M)}


def test_reference_pages_cover_every_public_module():
    missing = sorted(set(_public_modules()) - _documented_modules())
    assert not missing, f"add a docs/reference page with '::: MODULE' for {missing}"
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md"))
    assert [p for p in pages if p not in nav] == [], "every page under docs/ is in mkdocs.yml's nav"


def test_top_level_reference_lists_every_exported_name():
    page = (ROOT / "docs" / "reference" / "index.md").read_text()
    listed = set(re.findall(r"^::: metaif\.(\w+)$", page, flags=re.M))
    assert listed == set(metaif._EXPORTS), sorted(listed ^ set(metaif._EXPORTS))


def test_every_public_name_has_a_docstring():
    undocumented = []
    for name in _public_modules():
        module = importlib.import_module(name)
        for member in getattr(module, "__all__", []):
            if not (inspect.getdoc(getattr(module, member)) or "").strip():
                undocumented.append(f"{name}.{member}")
    assert not undocumented, f"public names without a docstring: {undocumented}"


@pytest.mark.slow
def test_site_builds_strict(tmp_path):
    """The docs site (API pages from the docstrings, guides, notebooks, generated results pages)
    builds with no warning: no broken link, no missing reference."""
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or "mkdocs"
    done = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    core = (tmp_path / "site" / "reference" / "index.html").read_text()
    names = [name for name in metaif.__all__ if not inspect.ismodule(getattr(metaif, name))]  # modules: own pages
    missing = [name for name in names if f'id="metaif.{name}"' not in core]
    assert not missing, missing
    measured = (tmp_path / "site" / "measured" / "index.html").read_text()
    assert "CG()" in measured and "results/fidelity" in measured


def test_conventions_worked_example():
    output = _load(ROOT / "docs" / "examples" / "conventions.py", "conventions_example").main()  # asserts closed forms
    doc = (ROOT / "docs" / "conventions.md").read_text()
    assert f"```text\n{output}\n```" in doc, (
        "docs/conventions.md's example block differs from docs/examples/conventions.py"
    )
