"""What a newcomer meets first: `import metaif` (fast, every documented submodule reachable), the
README's API example (runs as a script and prints what the README shows), the Makefile's two
environments, and the tests' data folder ($METAIF_DATA)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import metaif

from _paths import ROOT  # noqa: E402

DOCUMENTED = ("curvature", "data", "evaluation", "explain", "models", "parallel", "problems", "solvers", "training")


def _python(code: str, **env) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
        cwd=ROOT / "tests",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_import_is_light_and_every_documented_submodule_is_reachable():
    out = _python(
        "import sys, metaif\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'scipy', 'matplotlib', 'sklearn')))\n"
        f"print([type(getattr(metaif, name)).__name__ for name in {DOCUMENTED!r}])\n"
        "print(metaif.evaluation.retrain.__module__, metaif.influence.__module__)"
    )
    loaded, kinds, modules = out.splitlines()
    assert loaded == "[]"  # nothing heavy until first use
    assert kinds == str(["module"] * len(DOCUMENTED))
    assert modules == "metaif.evaluation._retrain metaif._influence"


def test_public_names_resolve_and_unknown_names_fail_clearly():
    for name in metaif.__all__:
        assert getattr(metaif, name) is not None, name
    assert set(metaif.__all__) | set(DOCUMENTED) <= set(dir(metaif))
    from metaif import Proximal, problems  # noqa: F401  (from-imports go through the same lazy path)

    with pytest.raises(AttributeError, match=r"no attribute 'influense'.*metaif.__all__"):
        metaif.influense  # noqa: B018


def test_type_checking_imports_restate_the_lazy_exports():
    """The `if TYPE_CHECKING:` block (read by type checkers and the API reference) names exactly
    the lazily exported names and submodules, each from the module that defines it."""
    import ast

    tree = ast.parse((ROOT / "metaif" / "__init__.py").read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    stated = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom) and node.level == 1, ast.dump(node)
        for alias in node.names:
            stated[alias.name] = node.module or alias.name
    expected = {**metaif._EXPORTS, **{name: name for name in metaif._SUBMODULES}}
    assert stated == expected


README = (ROOT / "README.md").read_text()
QUICKSTART = ROOT / "docs" / "examples" / "quickstart.py"


def test_readme_api_example_is_the_script_and_shows_its_output():
    """The README's example is docs/examples/quickstart.py verbatim, and the output block under it
    is what the script prints when run."""
    source = QUICKSTART.read_text()
    code = source[source.index("import jax") :]
    assert f"```python\n{code}```" in README, "README's API example differs from docs/examples/quickstart.py"
    done = subprocess.run([sys.executable, str(QUICKSTART)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout.strip()
    assert len(printed.splitlines()) == 3 and "most harmful task" in printed
    assert f"```text\n{printed}\n```" in README, (
        f"README's output block differs from what the script prints:\n{printed}"
    )


def test_make_demo_installs_no_test_extras(tmp_path):
    """`make demo` builds an environment without the test extras; `make test` adds them."""
    dry = lambda target: (
        subprocess.run(
            ["make", "-n", target, f"VENV={tmp_path / 'venv'}"], capture_output=True, text=True, cwd=ROOT, timeout=60
        ).stdout
    )
    demo, test = dry("demo"), dry("test")
    assert "pip install --quiet -e '.[cli]'" in demo and "metaif demo" in demo
    assert "[dev]" not in demo and "[test]" not in demo
    assert "pip install --quiet -e '.[dev]'" in test


def test_tests_find_real_data_through_METAIF_DATA(tmp_path):
    assert _python("import _paths; print(_paths.DATA)", METAIF_DATA=str(tmp_path)).strip() == str(tmp_path)
    hard_coded = [
        p.name
        for p in (ROOT / "tests").glob("*.py")
        if p.name not in ("_paths.py", Path(__file__).name) and '"shared"' in p.read_text()
    ]
    assert not hard_coded, f"{hard_coded} build the data path themselves; import DATA from tests/_paths.py"
