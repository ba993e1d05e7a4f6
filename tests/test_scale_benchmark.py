"""benchmarks/scale.py at its tiny size on real Omniglot (slow lane): training, the default
influence, the converged reference, the smaller budgets, the scaling and accuracy points write their
numbers, the default solve agrees with the reference, and a rerun resumes instead of recomputing.
The ground-truth stage (proximal leave-one-out by Newton–CG, then every baseline) takes longer
than the suite allows; it runs as `benchmarks/scale.py --size truth`."""

import json
import subprocess
import sys

import pytest

from _paths import DATA, ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (DATA / "omniglot").exists(), reason="needs Omniglot under ../shared/data"),
]


def run(out, *extra):
    stages = [] if "--stages" in extra else ["--stages", "train,influence,reference,budget"]
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "scale.py"),
            "--size",
            "tiny",
            "--out",
            str(out),
            "--data",
            str(DATA),
            *stages,
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=1500,
    )


def test_every_stage_writes_its_numbers_and_a_rerun_resumes(tmp_path):
    done = run(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "scale.json").read_text())
    train, influence, reference = (result[k] for k in ("train", "influence", "reference"))
    low, high = train["test_accuracy_ci95"]
    assert 0 <= low <= train["test_accuracy"] <= high <= 1 and train["test_tasks"] == 20
    assert influence["warm_ratio"] > 1 and influence["compile_ratio"] > 0
    assert influence["influence"]["working_memory_bytes"] > influence["meta_gradient"]["working_memory_bytes"] > 0
    # the curvature-aware default: H + δI positive definite where CG looked, converged on this tiny net
    assert influence["damping"] > max(0.0, -influence["min_curvature_seen"]) and not influence["indefinite"]
    assert reference["damping"] == influence["damping"]
    assert min(reference["spearman"].values()) > 0.9
    # fewer products: δ is raised until the budgeted solve meets relative residual 1e-2 (the last
    # product checks it)
    assert set(result["budget"]) == {"8", "12"}
    for row in result["budget"].values():
        assert row["relative_residual"] <= 1.01e-2 and row["damping"] > 0 and row["warm_ratio"] > 1
        assert set(row["spearman_vs_default"]) == {"tasks", "support", "query"}
    # a second run finds every stage done and its checkpoint: nothing is retrained
    again = run(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "train: step" not in again.stdout and json.loads((tmp_path / "scale.json").read_text())["train"] == train
    bad = run(tmp_path, "--stages", "train,bogus")
    assert bad.returncode != 0 and "unknown ['bogus']" in bad.stderr
    # the scaling stage: one row per (n, filters) point, each a measured ratio; d grows with width
    scaled = run(tmp_path, "--stages", "scaling")
    assert scaled.returncode == 0, scaled.stderr[-3000:]
    rows = json.loads((tmp_path / "scale.json").read_text())["scaling"]
    assert set(rows) == {"n=8,filters=4", "n=16,filters=4", "n=8,filters=8"}
    assert rows["n=8,filters=8"]["d"] > rows["n=8,filters=4"]["d"] == rows["n=16,filters=4"]["d"] == result["d"]
    for row in rows.values():
        assert row["warm_ratio"] > 1 and row["compile_ratio"] > 0 and row["memory_ratio"] > 0
    again = run(tmp_path, "--stages", "scaling")
    assert again.returncode == 0 and "scaling: n=" not in again.stdout
    # the accuracy stage: the train stage at each (n, queries) point, with its interval
    trained = run(tmp_path, "--stages", "accuracy")
    assert trained.returncode == 0, trained.stderr[-3000:]
    rows = json.loads((tmp_path / "scale.json").read_text())["accuracy"]
    assert set(rows) == {"n=16,queries=1", "n=8,queries=2"}
    for row in rows.values():
        low, high = row["test_accuracy_ci95"]
        assert 0 <= low <= row["test_accuracy"] <= high <= 1 and row["steps"] == train["steps"]
    assert (tmp_path / "accuracy" / "n=16,queries=1" / "meta_params.npz").exists()
    assert not {"scaling_partial", "accuracy_partial"} & set(json.loads((tmp_path / "scale.json").read_text()))
    # the chunk stage: the auto chunk's estimate bounds XLA's one-task working memory from above;
    # a Conv4 on CPU runs one task at a time
    chunked = run(tmp_path, "--stages", "chunk")
    assert chunked.returncode == 0, chunked.stderr[-3000:]
    row = json.loads((tmp_path / "scale.json").read_text())["chunk"]
    assert row["convolves"] and row["auto_chunk_size"] == 1
    assert row["xla_bytes_8_tasks"] > row["xla_bytes_1_task"] > 0 and 1 <= row["estimate_over_xla"] <= 8
