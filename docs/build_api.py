"""Generate docs/api.md, the API reference, from the docstrings and signatures of the public API.

    .venv/bin/python docs/build_api.py            # rewrite docs/api.md
    .venv/bin/python docs/build_api.py --check    # exit 1 if docs/api.md is out of date

The public API is every name in `metaif.__all__` and in the `__all__` of the public submodules
listed in MODULES. tests/test_docs.py fails when the committed docs/api.md differs from the
output, so a changed docstring needs `docs/build_api.py` rerun.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import importlib
import inspect
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "api.md"

MODULES = [
    ("metaif", "Core: problems, adaptation, influence, training"),
    ("metaif.solvers", "Inverse-Hessian solvers"),
    ("metaif.curvature", "Curvature options"),
    ("metaif.evaluation", "Ground truth, editing"),
    ("metaif.evaluation.metrics", "Metrics"),
    ("metaif.evaluation.baselines", "Baselines"),
    ("metaif.explain", "Explanations"),
    ("metaif.data", "Datasets and task samplers"),
    ("metaif.models", "Models"),
    ("metaif.parallel", "Several devices and hosts"),
    ("metaif.problems", "Generated problems (tests, demo, examples)"),
]

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _clean(text: str) -> str:
    return _ADDRESS.sub("", text)


def _signature(obj) -> str:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return ""
    return _clean(str(sig))


def _doc(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    return _clean(doc).strip()


def _block(doc: str) -> list[str]:
    """A docstring as a fenced block: its own indentation and symbols shown verbatim."""
    if not doc:
        return ["*(no docstring)*", ""]
    return ["```text", doc, "```", ""]


def _own_members(cls) -> list[tuple[str, object]]:
    """Public methods and properties defined by cls itself (not inherited from tuple/object)."""
    out = []
    for name, value in vars(cls).items():
        if name.startswith("_") or name in getattr(cls, "_fields", ()):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if inspect.isfunction(value) or isinstance(value, property):
            out.append((name, value))
    return sorted(out)


def _kind(obj) -> str:
    if inspect.ismodule(obj):
        return "module"
    if inspect.isclass(obj):
        if issubclass(obj, BaseException):
            return "exception"
        if issubclass(obj, enum.Enum):
            return "enum"
        if issubclass(obj, tuple) and hasattr(obj, "_fields"):
            return "NamedTuple"
        if dataclasses.is_dataclass(obj):
            return "dataclass"
        return "class"
    if callable(obj):
        return "function"
    return "constant"


def _entry(module_name: str, name: str, obj) -> list[str]:
    kind = _kind(obj)
    lines = [f"### `{module_name}.{name}`", ""]
    if kind == "module":
        lines += [f"Submodule, documented in its own section (`{obj.__name__}`).", ""]
        return lines
    if kind == "constant":
        lines += [f"*constant* `{name} = {_clean(repr(obj))}`", ""]
        return lines
    signature = _signature(obj) if kind != "enum" else ""
    lines += [f"*{kind}* `{name}{signature}`", ""]
    if kind == "NamedTuple":
        lines += [f"Fields: {', '.join(f'`{f}`' for f in obj._fields)}.", ""]
    lines += _block(_doc(obj))
    if inspect.isclass(obj):
        for member, value in _own_members(obj):
            target = value.fget if isinstance(value, property) else value
            suffix = "" if isinstance(value, property) else _signature(target)
            label = "property" if isinstance(value, property) else "method"
            lines += [f"* {label} `{name}.{member}{suffix}`", ""]
            doc = _doc(target)
            if doc:
                lines += ["  " + line if line else "" for line in _block(doc)]
    return lines


def _defined_here(module) -> list[str]:
    """Public functions and classes defined in a module without `__all__`."""
    return [name for name, value in vars(module).items()
            if not name.startswith("_") and (inspect.isfunction(value) or inspect.isclass(value))
            and getattr(value, "__module__", None) == module.__name__]


def build() -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings by `.venv/bin/python docs/build_api.py` (do not edit by hand;",
        "`tests/test_docs.py` checks that this file is current).",
        "",
        "Conventions used throughout (binding; see [conventions.md](conventions.md)): n training tasks,",
        "m support and q query examples per task; weights t [n], a [n, m], b [n, q], 1 by default; the",
        "influence of a weight ω is its derivative at ω = 1, I_λ(ω) = dλ*/dω = −(H + δI)⁻¹ ∂_ω ∇_λ F(λ*);",
        "removing a datum changes a quantity by about **−influence**; a positive influence on a loss",
        "means the datum raises it (harmful). Shapes are written [n], [n, m], [n, q]; pytrees \"like",
        "meta_params\" with a leading axis carry that axis on every leaf.",
        "",
        "## Contents",
        "",
    ]
    sections = []
    for module_name, title in MODULES:
        module = importlib.import_module(module_name)
        anchor = module_name.replace(".", "")
        lines.append(f"* [`{module_name}`: {title}](#{anchor})")
        names = list(getattr(module, "__all__", None) or _defined_here(module))
        section = [f"## `{module_name}`", "", *(_block(_doc(module)) if _doc(module) else []), ]
        for name in sorted(names, key=lambda s: (s.lower(), s)):
            section += _entry(module_name, name, getattr(module, name))
        sections += section
    lines.append("")
    return "\n".join(lines + sections).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/api.md differs from the generated text")
    args = parser.parse_args()
    text = build()
    if args.check:
        current = OUT.read_text() if OUT.exists() else ""
        if current != text:
            sys.exit("docs/api.md is out of date: run .venv/bin/python docs/build_api.py")
        print("docs/api.md is current")
        return
    OUT.write_text(text)
    print(f"wrote {OUT} ({len(text.splitlines())} lines)")


if __name__ == "__main__":
    main()
