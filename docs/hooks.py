"""mkdocs hook: pages generated at build time from files outside docs/ (nothing is written to disk).

* `experiments.md`: experiments/README.md.
* `measured.md`: the measured numbers, from the saved results: the solver benchmarks
  (benchmarks/results/solvers_defaults.json) and every experiment's table and figures (results/*/).
  Docstrings point here instead of quoting numbers that go stale.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
LEVELS = ("tasks", "support", "query")


def _triple(values: dict) -> str:
    return " / ".join(f"{values[level]:.3f}" for level in LEVELS)


def solver_tables(path: Path) -> str:
    """The solver configurations of one benchmarks/solvers.py --defaults result, per problem."""
    saved = json.loads(path.read_text())
    command = saved.get("environment", {}).get("command", "")
    lines = [
        f"Saved in `{path.relative_to(ROOT)}` (command: `{command}`). Spearman correlations are of the "
        "task / support / query scores against the dense solve at the same damping (`Dense(damping=None)`); "
        "`hvps` counts Hessian-vector products.",
        "",
    ]
    for name, problem in saved["problems"].items():
        lines += [
            f"### {name} (d = {problem['d']}, n = {problem['n_tasks']} tasks)",
            "",
            "| solver | Spearman vs exact (tasks / support / query) | relative error of the scores | hvps |",
            "|---|---|---|---|",
        ]
        for row in problem["configurations"]:
            lines.append(
                f"| `{row['name']}` | {_triple(row['spearman_vs_twin'])} | "
                f"{_triple(row['rel_error_vs_twin'])} | {row['hvps']:.0f} |"
            )
        sweep = problem.get("relative_damping_sweep")
        if sweep:
            lines += [
                "",
                f"Relative damping δ = ρ·λ_max(H) (λ_max = {problem['max_eigenvalue']:.4g}): the exact solve "
                f"against the δ = {problem['reference_study']['damping']:g} reference, and CG with 16 and 24 "
                "iterations against the exact solve at the same δ (Spearman, tasks / support / query).",
                "",
                "| ρ | exact vs reference | CG, 16 iterations | CG, 24 iterations |",
                "|---|---|---|---|",
            ]
            lines += [
                f"| {row['rho']:g} | {_triple(row['exact_vs_study'])} | {_triple(row['cg16_vs_exact'])} | "
                f"{_triple(row['cg24_vs_exact'])} |"
                for row in sweep
            ]
        lines.append("")
    return "\n".join(lines)


def experiment_sections(results: Path) -> tuple[str, dict[str, bytes]]:
    """Every results/<run>/*.md table (headings moved down two levels) with its figures."""
    parts, images = [], {}
    for folder in sorted(p for p in results.iterdir() if p.is_dir()):
        parts.append(f"### results/{folder.name}\n")
        for table in sorted(folder.glob("*.md")):
            parts.append(re.sub(r"^(#+)", r"\1##", table.read_text(), flags=re.M).strip() + "\n")
        for figure in sorted(folder.glob("*.png")):
            uri = f"measured/{folder.name}/{figure.name}"
            images[uri] = figure.read_bytes()
            parts.append(f"![{folder.name}/{figure.name}]({uri})\n")
    return "\n".join(parts), images


def measured_page() -> tuple[str, dict[str, bytes]]:
    experiments, images = experiment_sections(ROOT / "results")
    text = f"""# Measured results

Generated when the site is built from the saved results in the repository; nothing on this page is
typed by hand. Timings were taken on a shared 2-core CPU and carry its noise; accuracies and counts
of Hessian-vector products do not.

## Solver defaults

{solver_tables(ROOT / "benchmarks" / "results" / "solvers_defaults.json")}

## Experiments

The commands that made each table are in its heading; experiments/README.md (the
[Experiments](experiments.md) page) explains them.

{experiments}"""
    return text, images


def on_files(files: Files, config) -> Files:
    files.append(File.generated(config, "experiments.md", content=(ROOT / "experiments" / "README.md").read_text()))
    text, images = measured_page()
    files.append(File.generated(config, "measured.md", content=text))
    for uri, data in images.items():
        files.append(File.generated(config, uri, content=data))
    return files
