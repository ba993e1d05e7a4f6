"""What a run leaves in its folder: scores (CSV, JSON), summary (JSON), PNG figures, a markdown
report and a self-contained HTML report (figures embedded as base64), and the terminal table.

Every figure carries the backend, device kind, device count and dtype it was computed with."""

from __future__ import annotations

import base64
import csv
import html
import io
import platform
from pathlib import Path

import jax
import numpy as np

import metaif
from metaif.evaluation import metrics

from .config import to_toml
from .pipeline import max_rss_bytes
from .store import atomic_write, write_json
from .ui import UI

LEVELS = ("tasks", "support", "query")
GiB = 1024**3
# Short names of the stages in the summary table (pipeline.run's checkpoint names).
STAGES = {
    "data": "data",
    "train_adam": "meta-training: Adam",
    "train_newton": "meta-training: exact Newton",
    "evaluate": "evaluate λ*",
    "solve": "influence: Hessian + solve",
    "scores": "influence: all scores",
    "baseline": "raw-loss baseline",
    "loo": "check: leave-one-out retraining",
    "edit": "edit + retraining",
}


def device_caption(dtype: str = "float64") -> str:
    devices = jax.devices()
    return f"backend {jax.default_backend()}, device {devices[0].device_kind} ×{len(devices)}, {dtype}"


def _safe(fn, *args) -> float:
    try:
        return float(fn(*args))
    except ValueError:
        return float("nan")


def summarize(r: dict) -> dict:
    """The numbers that matter, as a flat JSON-able dict."""
    config, data = r["config"], r["data"]
    task_mask, flip_mask = data["task_mask"].astype(bool), data["flip_mask"].astype(bool)
    clean = ~task_mask
    scores, base = r["scores"], r["baseline"]
    fidelity = {}
    for level in LEVELS:
        p, a = r["predicted"][level], r["actual"][level]
        fidelity[level] = {
            "n": int(p.size),
            "pearson": _safe(metrics.pearson, p, a) if p.size > 1 else float("nan"),
            "spearman": _safe(metrics.spearman, p, a) if p.size > 1 else float("nan"),
            "max_retrain_grad_norm": float(np.max(r["loo_norms"][level])) if p.size else float("nan"),
        }
    detection = {
        "tasks_if": _safe(metrics.roc_auc, scores["tasks"], task_mask),
        "tasks_raw_loss": _safe(metrics.roc_auc, base["tasks"], task_mask),
        "support_if": _safe(metrics.roc_auc, scores["support"][clean], flip_mask[clean]),
        "support_raw_loss": _safe(metrics.roc_auc, base["support"][clean], flip_mask[clean]),
        "n_corrupted_tasks": int(task_mask.sum()),
        "n_flipped_support_clean_tasks": int(flip_mask[clean].sum()),
    }
    e = r["edited"] or {
        k: np.nan
        for k in (
            "target_before",
            "target_edit",
            "target_retrain",
            "target_retrain_base",
            "test_accuracy_before",
            "test_accuracy_edit",
            "test_accuracy_retrain",
            "test_accuracy_retrain_base",
            "edit_grad_norm",
            "retrain_grad_norm",
        )
    }
    removed_t, removed_s = r["remove_tasks"], r["remove_support"]
    edit = {
        "removed_tasks": int(removed_t.sum()),
        "removed_tasks_corrupted": int((removed_t & task_mask).sum()),
        "removed_support": int(removed_s.sum()),
        "removed_support_flipped": int((removed_s & flip_mask).sum()),
        "baseline_removed_tasks_corrupted": int((r["base_tasks"] & task_mask).sum()),
        "baseline_removed_support_flipped": int((r["base_support"] & flip_mask).sum()),
        "target_before": float(e["target_before"]),
        "target_edit": float(e["target_edit"]),
        "target_retrain": float(e["target_retrain"]),
        "target_retrain_baseline": float(e["target_retrain_base"]),
        "test_accuracy_before": float(e["test_accuracy_before"]),
        "test_accuracy_edit": float(e["test_accuracy_edit"]),
        "test_accuracy_retrain": float(e["test_accuracy_retrain"]),
        "test_accuracy_retrain_baseline": float(e["test_accuracy_retrain_base"]),
        "damping": float(config.edit.damping),
        "edit_grad_norm": float(e["edit_grad_norm"]),
        "retrain_grad_norm": np.asarray(e["retrain_grad_norm"]).tolist(),
    }
    spectrum, refined, adam = r["spectrum"], r["refined"], r["adam"]
    explanation = metaif.explain.top_k(scores["tasks"], min(config.report.top_k, r["n"]), level="tasks")
    loo_task = dict(zip(r["samples"]["tasks"].tolist(), r["actual"]["tasks"].tolist()))
    ranked = lambda side: [
        {
            "task": int(i),
            "influence": float(v),
            "raw_loss": float(base["tasks"][i]),
            "corrupted": bool(task_mask[i]),
            "actual_change_if_removed": loo_task.get(int(i)),
        }
        for (i,), v in zip(side.index, side.score)
    ]
    return {
        "command": r.get("command", ""),
        "dataset": str(data["source"]),
        "n_tasks": r["n"],
        "n_support": r["m"],
        "n_query": r["q"],
        "ways": config.tasks.ways,
        "d": r["d"],
        "device": device_caption(str(r["model"].dtype)),
        "stationarity": {
            "adam_grad_norm": float(adam["grad_norms"][-1]),
            "grad_norm": float(refined["grad_norm"]),
            "objective": float(refined["objective"]),
            "hessian_smallest": np.asarray(spectrum["smallest"]).tolist(),
            "hessian_smallest_residuals": np.asarray(spectrum["smallest_residuals"]).tolist(),
            "hessian_largest": float(np.asarray(spectrum["largest"])[0]),
            "spectrum_method": str(spectrum["spectrum_method"]),
            "solve_min_eigenvalue": float(r["solved"]["info_min_eigenvalue"]),
            "solve_relative_residual": float(r["solved"]["info_relative_residual"]),
        },
        "accuracy": {
            "train": float(spectrum["train_accuracy"]),
            "test": float(spectrum["test_accuracy"]),
            "test_adam_only": float(spectrum["adam_test_accuracy"]),
            "target_loss": float(spectrum["target_loss"]),
        },
        "fidelity": fidelity,
        "detection": detection,
        "edit": edit,
        "most_harmful_tasks": ranked(explanation.opponents),
        "most_helpful_tasks": ranked(explanation.proponents),
        **costs(r["costs"]),
        "memory": {
            "estimated_peak_gib": r["estimate"]["peak"] / GiB,
            "measured_peak_gib": _nanmax([c.max_rss for c in r["costs"].values()]) / GiB,
            "this_command_max_rss_gib": max_rss_bytes() / GiB,
        },
        "versions": {
            "metaif": metaif.__version__,
            "code": r["code"],
            "jax": jax.__version__,
            "python": platform.python_version(),
        },
    }


def _nanmax(values) -> float:
    values = [v for v in values if np.isfinite(v)]
    return max(values) if values else float("nan")


def costs(stage_costs: dict) -> dict:
    """Per-stage seconds and peak memory as measured when each stage was computed (kept in its
    checkpoints, so a resumed run reports the original measurements), and what this command reused."""
    total = sum(c.seconds for c in stage_costs.values())
    stages = {
        name: {
            "label": c.label,
            "seconds": round(c.seconds, 3),
            "share": c.seconds / total if total else float("nan"),
            "peak_rss_gib": c.max_rss / GiB,
            "reused": c.reused == c.parts and c.parts > 0,
            "checkpoints": c.parts,
            "checkpoints_reused": c.reused,
        }
        for name, c in stage_costs.items()
    }
    return {
        "stages": stages,
        "compute_s": round(total, 2),
        "timings_s": {k: v["seconds"] for k, v in stages.items()},
        "reused_stages": sorted(name for name, c in stage_costs.items() if c.reused),
        "resumed": any(c.reused for c in stage_costs.values()),
    }


def _f(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    x = float(x)
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.2e}"
    return f"{x:.{digits}f}"


EDIT_NOTE = (
    "edit: λ* − Σ I_λ, no retraining, damping δ = {damping} ([edit] damping): the undamped step overshoots along "
    "the Hessian's flat directions; retrain: exact Newton without the removed data"
)
EDIT_NOTE_UNDAMPED = (
    "edit: λ* − Σ I_λ, no retraining, undamped ([edit] damping = 0; it can overshoot along the Hessian's "
    "flat directions); retrain: exact Newton without the removed data"
)


def rows(s: dict) -> list:
    """(quantity, value, note) rows of the summary table; None separates sections."""
    st, fi, de, ed = s["stationarity"], s["fidelity"], s["detection"], s["edit"]
    out = [
        (
            "data",
            f"{s['n_tasks']} tasks",
            f"{s['dataset']}; {s['ways']}-way, m = {s['n_support']}, q = {s['n_query']}; d = {s['d']}",
        ),
        None,
        (
            "‖∇F‖ after Adam → Newton",
            f"{_f(st['adam_grad_norm'])} → {_f(st['grad_norm'])}",
            "stationarity influence assumes",
        ),
        (
            "smallest Hessian eigenvalues",
            ", ".join(_f(x) for x in st["hessian_smallest"]),
            f"largest {_f(st['hessian_largest'])} ({st['spectrum_method']})",
        ),
        (
            "test accuracy at λ*",
            _f(s["accuracy"]["test"]),
            f"train {_f(s['accuracy']['train'])}; held-out loss {_f(s['accuracy']['target_loss'])}",
        ),
        None,
    ]
    for level in LEVELS:
        f = fi[level]
        if f["n"]:
            out.append(
                (
                    f"predicted vs actual, {level}",
                    f"r = {_f(f['pearson'])}, ρ = {_f(f['spearman'])}",
                    f"{f['n']} leave-one-out retrainings (max ‖∇F‖ {_f(f['max_retrain_grad_norm'])})",
                )
            )
    if not any(fi[level]["n"] for level in LEVELS):
        out.append(
            ("predicted vs actual", "not checked", "[check] tasks, support, query = 0 (e.g. metaif demo --quick)")
        )
    out += [
        None,
        (
            "AUC corrupted tasks: IF / loss",
            f"{_f(de['tasks_if'])} / {_f(de['tasks_raw_loss'])}",
            f"{de['n_corrupted_tasks']} corrupted of {s['n_tasks']}",
        ),
        (
            "AUC flipped labels: IF / loss",
            f"{_f(de['support_if'])} / {_f(de['support_raw_loss'])}",
            f"{de['n_flipped_support_clean_tasks']} flipped, in clean tasks",
        ),
        None,
    ]
    edited = np.isfinite(ed["target_edit"])
    if not edited:
        out += [("edit", "not run", "[edit] tasks, support = 0 (e.g. metaif demo --quick)"), None]
    out += (
        []
        if not edited
        else [
            (
                "removed by IF",
                f"{ed['removed_tasks']} tasks, {ed['removed_support']} ex.",
                f"the highest task and support influence; {ed['removed_tasks_corrupted']} corrupted, {ed['removed_support_flipped']} "
                f"flipped (raw-loss baseline's picks: {ed['baseline_removed_tasks_corrupted']}, {ed['baseline_removed_support_flipped']})",
            ),
            (
                "held-out loss: before / edit / retrain",
                f"{_f(ed['target_before'], 4)} / {_f(ed['target_edit'], 4)} / {_f(ed['target_retrain'], 4)}",
                EDIT_NOTE.format(damping=_f(ed["damping"])) if ed["damping"] else EDIT_NOTE_UNDAMPED,
            ),
            (
                "held-out loss, baseline's picks retrained",
                _f(ed["target_retrain_baseline"], 4),
                "as many tasks and examples with the highest raw loss removed instead, then retrained",
            ),
            (
                "test accuracy: before / edit / retrain",
                f"{_f(ed['test_accuracy_before'])} / {_f(ed['test_accuracy_edit'])} / "
                f"{_f(ed['test_accuracy_retrain'])}",
                f"baseline's picks retrained: {_f(ed['test_accuracy_retrain_baseline'])}",
            ),
            None,
        ]
    )
    out += [
        (
            "peak memory: estimated / measured",
            f"{s['memory']['estimated_peak_gib']:.2f} / {s['memory']['measured_peak_gib']:.2f} GiB",
            "estimate made before the run (metaif._run.memory); measured = max RSS of the process, when the stages were computed",
        ),
    ]
    reused = [v["label"] for v in s["stages"].values() if v["reused"]]
    out.append(
        (
            "time: all stages",
            f"{_f(s['compute_s'], 1)} s",
            "as measured when each stage was computed"
            + (f"; this command: {_f(s['wall_s'], 1)} s" if "wall_s" in s else "")
            + (f", reusing {len(reused)} saved stage(s)" if s["resumed"] else ""),
        )
    )
    for name, stage in s["stages"].items():
        note = (
            "saved by an earlier command, reused"
            if stage["reused"]
            else f"{stage['checkpoints_reused']} of {stage['checkpoints']} chunks reused"
            if stage["checkpoints_reused"]
            else ""
        )
        out.append((f"  {STAGES.get(name, name)}", f"{_f(stage['seconds'], 1)} s ({100 * stage['share']:.0f}%)", note))
    return out


# ----------------------------------------------------------------------------- files


# The columns of scores_tasks.csv, scores_support.csv and scores_query.csv (one schema; a cell that
# does not apply to the level is empty).
COLUMNS = [
    ("level", "tasks, support or query"),
    ("task", "training task index (0-based)"),
    ("example", "example index within the task's support or query set (empty for tasks)"),
    ("influence", "derivative of the held-out loss with respect to this datum's weight at 1; > 0: harmful"),
    ("predicted_change_if_removed", "−influence: the held-out loss change influence predicts if the datum is removed"),
    (
        "actual_change_if_removed",
        "the change measured by leave-one-out retraining (only for the random sample that was retrained)",
    ),
    ("raw_loss", "the datum's own loss after adaptation (the raw-loss baseline; for tasks, the task's query loss)"),
    ("label", "the label used in training, 0 … ways−1 within the task (possibly corrupted)"),
    ("true_label", "the label before corruption"),
    ("class", "the dataset's class of the image (for digits: the digit)"),
    ("labelled_class", "the dataset class the training label names (differs from class when the label is wrong)"),
    ("label_wrong", "1 when label ≠ true_label, for any reason"),
    (
        "flipped",
        "1 when [tasks] flip_support moved this support label to another class; examples of corrupted tasks "
        "have random labels instead, so there label_wrong can be 1 with flipped = 0",
    ),
    (
        "task_corrupted",
        "1 when the task's support and query labels were all replaced by random labels ([tasks] corrupt_tasks)",
    ),
    ("removed_by_edit", "1 when the edit (and its retraining) removed the datum, or its whole task"),
]


def score_rows(r: dict) -> dict[str, list[list]]:
    """The rows of the three score CSVs, in the COLUMNS schema."""
    data, scores, base = r["data"], r["scores"], r["baseline"]
    classes = data["train_classes"]
    labels = {
        "support": (data["train_sy"], data["clean_support_y"]),
        "query": (data["train_qy"], data["clean_query_y"]),
    }
    removed_tasks = r["remove_tasks"]
    removed = {
        "support": r["remove_support"] | removed_tasks[:, None],
        "query": np.broadcast_to(removed_tasks[:, None], data["train_qy"].shape),
    }
    number = lambda x: repr(float(x))
    out = {}
    for level in LEVELS:
        actual = {tuple(np.atleast_1d(i).tolist()): a for i, a in zip(r["samples"][level], r["actual"][level])}
        table = []
        for index in np.ndindex(scores[level].shape):
            i = index[0]
            row = [
                level,
                i,
                index[1] if level != "tasks" else "",
                number(scores[level][index]),
                number(-scores[level][index]),
                number(actual[index]) if index in actual else "",
                number(base[level][index]),
            ]
            if level == "tasks":
                row += ["", "", "", "", "", "", int(data["task_mask"][i]), int(removed_tasks[i])]
            else:
                given, true = (int(y[index]) for y in labels[level])
                flipped = int(data["flip_mask"][index]) if level == "support" else 0
                row += [
                    given,
                    true,
                    int(classes[i, true]),
                    int(classes[i, given]),
                    int(given != true),
                    flipped,
                    int(data["task_mask"][i]),
                    int(removed[level][index]),
                ]
            table.append(row)
        out[level] = table
    return out


def write_csvs(out: Path, r: dict) -> None:
    for level, table in score_rows(r).items():
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow([name for name, _ in COLUMNS])
        writer.writerows(table)
        atomic_write(out / f"scores_{level}.csv", buffer.getvalue().encode())


def write_json_scores(out: Path, r: dict, summary: dict) -> None:
    write_json(
        out / "scores.json",
        {
            "convention": metaif.explain.SIGN_CONVENTION,
            "target": "mean query loss over the held-out target tasks after adaptation",
            "tasks": r["scores"]["tasks"],
            "support": r["scores"]["support"],
            "query": r["scores"]["query"],
            "raw_loss": {level: r["baseline"][level] for level in LEVELS},
            "task_corrupted": r["data"]["task_mask"],
            "support_flipped": r["data"]["flip_mask"],
            "classes": r["data"]["train_classes"],  # [n, ways]: the dataset class of each task label
            "leave_one_out": {
                level: {
                    "index": r["samples"][level],
                    "predicted_change": r["predicted"][level],
                    "actual_change": r["actual"][level],
                    "retrain_grad_norm": r["loo_norms"][level],
                }
                for level in LEVELS
            },
        },
    )
    write_json(out / "summary.json", summary)


# ----------------------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, path: Path, caption: str) -> None:
    """Save the figure with `caption` (the summary's device line) in its corner."""
    fig.text(
        0.995,
        0.005,
        f"{caption} · metaif {metaif.__version__}",
        ha="right",
        va="bottom",
        fontsize=6,
        color="0.4",
    )
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    _plt().close(fig)
    atomic_write(path, buffer.getvalue())


def figures(out: Path, r: dict, summary: dict, top_k: int) -> list[tuple[str, str]]:
    """Write the PNGs; returns (file name, caption) pairs."""
    plt = _plt()
    data, scores, base = r["data"], r["scores"], r["baseline"]
    task_mask, flip_mask = data["task_mask"].astype(bool), data["flip_mask"].astype(bool)
    made = []

    # training
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), gridspec_kw={"width_ratios": [3, 3, 2]})
    axes[0].plot(r["adam"]["losses"], lw=1)
    axes[0].set(xlabel="Adam step", ylabel="meta-objective F", title="meta-training: Adam")
    axes[1].semilogy(r["adam"]["grad_norms"], lw=1)
    axes[1].set(xlabel="Adam step", ylabel="‖∇F‖", title="stationarity: Adam")
    # Newton's own axis: its few steps would be a sliver at the end of Adam's (step 0 = Adam's end point)
    newton = np.concatenate([r["refined"]["grad_norms"], [float(r["refined"]["grad_norm"])]])
    axes[2].semilogy(np.arange(newton.size), newton, "o-", lw=1, ms=3, color="C2")
    axes[2].set(xlabel="exact Newton step", ylabel="‖∇F‖", title="then exact Newton")
    axes[2].xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    _finish(fig, out / "training.png", summary["device"])
    made.append(
        (
            "training.png",
            "Meta-training: the objective and ‖∇F‖ under Adam, then ‖∇F‖ through the exact Newton polish "
            "(its own axis, starting from Adam's end point).",
        )
    )

    # score distributions
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    clean = ~task_mask
    for ax, values, mask, names, title in (
        (axes[0], scores["tasks"], task_mask, ("clean", "corrupted"), "task influence"),
        (
            axes[1],
            scores["support"][clean],
            flip_mask[clean],
            ("clean", "flipped label"),
            "support-example influence (clean tasks)",
        ),
    ):
        bins = np.linspace(values.min(), values.max(), 30) if values.max() > values.min() else 10
        ax.hist(values[~mask], bins=bins, alpha=0.6, label=names[0])
        if mask.any():
            ax.hist(values[mask], bins=bins, alpha=0.6, label=names[1], color="C3")
        ax.set(xlabel="influence on the held-out loss (> 0: harmful)", ylabel="count", title=title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _finish(fig, out / "scores.png", summary["device"])
    made.append(
        (
            "scores.png",
            "Score distributions: positive influence raises the held-out loss (harmful); corrupted data in red.",
        )
    )

    # predicted vs actual (when a leave-one-out sample was retrained)
    if any(r["predicted"][level].size for level in LEVELS):
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
        for ax, level in zip(axes, LEVELS):
            p, a = r["predicted"][level], r["actual"][level]
            f = summary["fidelity"][level]
            if p.size:
                ax.scatter(p, a, s=12)
                lim = [min(p.min(), a.min()), max(p.max(), a.max())]
                ax.plot(lim, lim, color="0.5", lw=0.8, ls="--")
            ax.set(
                xlabel="predicted change (−influence)",
                ylabel="actual change (retrained)",
                title=f"{level}: r = {_f(f['pearson'])}, ρ = {_f(f['spearman'])} (n = {f['n']})",
            )
            ax.title.set_fontsize(9)
        fig.tight_layout()
        _finish(fig, out / "predicted_vs_actual.png", summary["device"])
        made.append(
            (
                "predicted_vs_actual.png",
                "Held-out loss change when one datum is removed: influence's prediction against "
                "leave-one-out retraining (exact Newton, warm-started), random sample.",
            )
        )

    # detection curves
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, (title, s_if, s_loss, mask) in zip(
        axes,
        (
            ("corrupted tasks", scores["tasks"], base["tasks"], task_mask),
            (
                "flipped support labels (clean tasks)",
                scores["support"][clean],
                base["support"][clean],
                flip_mask[clean],
            ),
        ),
    ):
        if mask.any() and not mask.all():
            for values, label in ((s_if, "influence"), (s_loss, "raw loss")):
                x, y = metrics.detection_curve(values, mask)
                ax.plot(x, y, label=f"{label} (AUC {metrics.roc_auc(values, mask):.3f})")
        ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=0.8, label="random")
        ax.set(xlabel="fraction inspected (highest score first)", ylabel="fraction of corrupted found", title=title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _finish(fig, out / "detection.png", summary["device"])
    made.append(("detection.png", "Detection: inspecting data in order of decreasing score; ROC-AUC in the legend."))

    # examples
    images = data["support_images"].astype(np.float32) / 255.0
    explanation = metaif.explain.top_k(scores["support"], top_k, level="support")
    fig = metaif.explain.plot_examples(
        explanation,
        images,
        title="support examples: most helpful (top) and most harmful (bottom) for the held-out loss",
    )
    for row, ranked in enumerate((explanation.proponents, explanation.opponents)):
        for col, ((i, j), value) in enumerate(zip(ranked.index, ranked.score)):
            ax = fig.axes[row * len(ranked.score) + col]
            given, true = int(data["train_sy"][i, j]), int(data["clean_support_y"][i, j])
            shown, named = int(data["train_classes"][i, true]), int(data["train_classes"][i, given])
            mark = ("\ncorrupted task" if task_mask[i] else "") + (f"\nlabelled {named}" if given != true else "")
            ax.set_title(
                f"{'helpful' if row == 0 else 'harmful'} {value:+.1e}\ntask {i} ex {j}: class {shown}{mark}",
                fontsize=6,
                color="C3" if mark else "black",
            )
    fig.set_size_inches(max(8, 1.5 * top_k), 4.4)
    fig.tight_layout()
    _finish(fig, out / "examples.png", summary["device"])
    made.append(
        (
            "examples.png",
            "The most helpful and most harmful support examples with the dataset class of each image "
            "(red: a wrong training label, 'labelled' names the class it was given, or a corrupted task).",
        )
    )

    # editing
    e = summary["edit"]
    if not np.isfinite(e["target_edit"]):
        return made
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    labels = ["before", "edit\n(no retraining)", "retrained", "retrained,\nloss baseline"]
    colors = ["0.6", "C0", "C2", "C1"]
    losses = [e["target_before"], e["target_edit"], e["target_retrain"], e["target_retrain_baseline"]]
    accs = [
        e["test_accuracy_before"],
        e["test_accuracy_edit"],
        e["test_accuracy_retrain"],
        e["test_accuracy_retrain_baseline"],
    ]
    # Bars start at 0 (a truncated axis would make 1-point differences look large); values are printed on them.
    for ax, values, digits, name, title, top in (
        (axes[0], losses, 4, "held-out loss", "removing the most harmful data", None),
        (axes[1], accs, 3, "test accuracy", "separate test tasks", 1.0),
    ):
        bars = ax.bar(labels, values, color=colors)
        ax.bar_label(bars, [f"{v:.{digits}f}" for v in values], fontsize=7)
        ax.set(ylabel=name, title=title, ylim=(0, top or 1.15 * max(values)))
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    _finish(fig, out / "editing.png", summary["device"])
    made.append(
        (
            "editing.png",
            "Editing without retraining (λ* − Σ I_λ over the removed data, damped as the summary says) "
            "against retraining, and retraining after removing the loss baseline's picks instead. "
            "The axes start at 0.",
        )
    )
    return made


# ----------------------------------------------------------------------------- reports


def _markdown_table(table_rows) -> str:
    lines = ["| quantity | value | note |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in (r for r in table_rows if r is not None)]
    return "\n".join(lines) + "\n"


FILES = (
    "`scores_tasks.csv`, `scores_support.csv` and `scores_query.csv` hold every score, one row per task or example, "
    "with the columns below; `scores.json` the same scores as arrays with the leave-one-out sample; `summary.json` "
    "every number above; `config.toml` the full config; `checkpoints/` the resumable state; `log.jsonl` the stage log."
)


def write_reports(out: Path, summary: dict, made: list[tuple[str, str]], config) -> None:
    table = rows(summary)
    intro = (
        f"Command: `{summary['command']}`  \nmetaif {summary['versions']['metaif']} (code {summary['versions']['code']}), "
        f"jax {summary['versions']['jax']}, Python {summary['versions']['python']}; {summary['device']}.\n\n"
        "Influence is the derivative of the held-out loss (mean query loss of held-out tasks after adaptation) with "
        "respect to a datum's weight at 1: removing the datum changes the loss by about −influence, so a positive "
        "influence is harmful. Accuracy is measured on a separate set of held-out test tasks. Detection AUC measures "
        "how well a ranking finds the corrupted data; influence ranks data by their effect on the held-out loss, which "
        "leave-one-out retraining checks (predicted vs actual), and a corrupted datum need not hurt that loss, while "
        "random labels always raise a datum's own loss (the raw-loss baseline).\n"
    )
    md = [f"# metaif report: {config.run.name}\n", intro, "## Summary\n", _markdown_table(table)]
    task_rows = []
    for title, key in (
        ("Most harmful tasks (removal lowers the held-out loss)", "most_harmful_tasks"),
        ("Most helpful tasks (removal raises the held-out loss)", "most_helpful_tasks"),
    ):
        lines = [
            f"### {title}\n",
            "| task | influence | predicted change if removed | actual change (retrained) | raw loss | corrupted |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {t['task']} | {t['influence']:+.3e} | {-t['influence']:+.3e} | "
            f"{'' if t['actual_change_if_removed'] is None else format(t['actual_change_if_removed'], '+.3e')} | "
            f"{t['raw_loss']:.3f} | {'yes' if t['corrupted'] else 'no'} |"
            for t in summary[key]
        ]
        task_rows.append("\n".join(lines) + "\n")
    md += task_rows
    md += ["## Figures\n"] + [f"![{name}]({name})\n\n{caption}\n" for name, caption in made]
    md += [
        "## Files\n",
        FILES + "\n",
        "| column | meaning |\n|---|---|\n" + "".join(f"| `{c}` | {m} |\n" for c, m in COLUMNS),
    ]
    atomic_write(out / "report.md", "\n".join(md).encode())

    def img(name):
        path = out / name
        return base64.b64encode(path.read_bytes()).decode() if path.is_file() else ""

    cells = "".join(
        "<tr><td colspan=3 class=sep></td></tr>"
        if r is None
        else f"<tr><td>{html.escape(r[0])}</td><td class=v>{html.escape(r[1])}</td><td>{html.escape(r[2])}</td></tr>"
        for r in table
    )
    figs = "".join(
        f"<figure><img src='data:image/png;base64,{img(name)}' alt='{name}'><figcaption>{html.escape(caption)}"
        "</figcaption></figure>"
        for name, caption in made
    )
    tasks_html = "".join(
        f"<h3>{html.escape(title)}</h3><table><tr><td>task</td><td>influence</td><td>actual change if removed</td><td>raw loss</td>"
        "<td>corrupted</td></tr>"
        + "".join(
            f"<tr><td>{t['task']}</td><td class=v>{t['influence']:+.3e}</td><td class=v>"
            f"{'' if t['actual_change_if_removed'] is None else format(t['actual_change_if_removed'], '+.3e')}</td>"
            f"<td class=v>{t['raw_loss']:.3f}</td><td>{'yes' if t['corrupted'] else 'no'}</td></tr>"
            for t in summary[key]
        )
        + "</table>"
        for title, key in (("Most harmful tasks", "most_harmful_tasks"), ("Most helpful tasks", "most_helpful_tasks"))
    )
    columns_html = "".join(f"<tr><td><code>{c}</code></td><td>{html.escape(m)}</td></tr>" for c, m in COLUMNS)
    intro_html = html.escape(intro).replace("`", "").replace("  \n", "<br>")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>metaif report: {html.escape(config.run.name)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}table{{border-collapse:collapse}}
td{{padding:3px 10px;border-bottom:1px solid #eee;font-size:14px}}td.v{{text-align:right;font-family:monospace}}
td.sep{{border-bottom:2px solid #ccc;padding:0}}img{{max-width:100%}}figcaption{{font-size:13px;color:#555}}</style></head>
<body><h1>metaif report: {html.escape(config.run.name)}</h1><p>{intro_html}</p><h2>Summary</h2><table>{cells}</table>
<h2>Tasks</h2>{tasks_html}<h2>Figures</h2>{figs}<h2>Files</h2><p>{html.escape(FILES).replace("`", "")}</p>
<table>{columns_html}</table><h2>Config</h2><pre>{html.escape(to_toml(config))}</pre></body></html>"""
    atomic_write(out / "report.html", page.encode())


def write_all(out: Path, r: dict, ui: UI) -> tuple[dict, list[tuple[str, str]]]:
    config = r["config"]
    summary = summarize(r)
    atomic_write(out / "config.toml", to_toml(config).encode())
    write_csvs(out, r)
    write_json_scores(out, r, summary)
    made = []
    if config.report.plots:
        with ui.progress("Report: figures, CSV, JSON, markdown and HTML"):
            made = figures(out, r, summary, config.report.top_k)
    write_reports(out, summary, made, config)
    return summary, made


def print_summary(ui: UI, summary: dict, out: Path) -> None:
    ui.table(f"metaif summary ({summary['device']})", rows(summary))
    ui.print(
        f"Report: {out / 'report.html'} (and report.md); scores: {out / 'scores_tasks.csv'}, scores_support.csv, "
        "scores_query.csv, scores.json"
    )


__all__ = ["print_summary", "summarize", "write_all"]
