"""docs/ cannot drift: the API reference is the generated one, and the worked example of
docs/conventions.md prints (and asserts) exactly the numbers shown there."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_reference_is_current():
    generated = _load(ROOT / "docs" / "build_api.py", "build_api").build()
    committed = (ROOT / "docs" / "api.md").read_text()
    assert committed == generated, "docs/api.md is out of date: run .venv/bin/python docs/build_api.py"


def test_api_reference_covers_public_api():
    import metaif

    text = (ROOT / "docs" / "api.md").read_text()
    missing = [name for name in metaif.__all__ if f"### `metaif.{name}`" not in text]
    assert not missing, missing
    assert "*(no docstring)*" not in text, "a public function or class has no docstring"


def test_conventions_worked_example():
    output = _load(ROOT / "docs" / "examples" / "conventions.py", "conventions_example").main()  # asserts closed forms
    doc = (ROOT / "docs" / "conventions.md").read_text()
    assert f"```text\n{output}\n```" in doc, "docs/conventions.md's example block differs from docs/examples/conventions.py"
