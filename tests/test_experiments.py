"""Smoke test of the experiments' shared pipeline on a tiny digits config (seconds, not minutes):
data → tasks → meta-training to a stationary point → retraining ground truth → influence → the
metrics each experiment reports. The full experiments are commands (experiments/README.md).

The tiny configuration is meta-trained once (the `trained` fixture); the n-sweep and the
editing-limit experiment build the same configuration and reuse that training (`train_once`).
Everything but the pure helpers is in the slow lane (`make test-slow`)."""

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import common  # noqa: E402
import detection  # noqa: E402
import edit_reach  # noqa: E402
import fidelity  # noqa: E402
import fidelity_vs_n  # noqa: E402
import methods  # noqa: E402
import removal  # noqa: E402

import jax.numpy as jnp  # noqa: E402

import metaif  # noqa: E402

TINY = dataclasses.replace(
    common.CONFIGS["smoke"],
    n_train=6,
    n_val=4,
    n_test=6,
    features=4,
    hidden=2,
    queries=1,
    adam_steps=300,
    adam_lr=3e-2,
    newton_steps=12,
)


def tiny_flags(*fields: str) -> list[str]:
    """TINY's settings as the experiments' command-line flags (`n_val` -> `--n-val 4`)."""
    return [item for name in fields for item in (f"--{name.replace('_', '-')}", str(getattr(TINY, name)))]


@pytest.fixture(scope="module")
def trained():
    setup = common.build(TINY)
    return setup, common.meta_train(setup, log=lambda *a: None)


@pytest.fixture
def train_once(trained, monkeypatch):
    """common.meta_train returns the `trained` result for the TINY configuration (the training is
    deterministic: same config, same data, same numbers) and trains any other one; yields the
    configurations it reused, so a test can check that the reuse happened."""
    reused = []
    train = common.meta_train

    def meta_train(setup, log=print):
        if setup.config == TINY:
            reused.append(setup.config)
            return trained[1]
        return train(setup, log)

    monkeypatch.setattr(common, "meta_train", meta_train)
    return reused


@pytest.mark.slow
def test_setup_shapes_and_stationarity(trained):
    setup, result = trained
    assert setup.train.support["x"].shape == (6, 5, 4)  # 5-way 1-shot, 4 PCA features
    assert setup.train.query["x"].shape == (6, 5, 4)
    assert common.n_params(result.meta_params) == 4 * 2 + 2 + 2 * 5 + 5
    assert result.grad_norm < 1e-8  # Newton reached a stationary point
    assert np.all(np.isfinite(result.eigenvalues))
    assert 0.0 <= common.accuracy(setup, result.meta_params) <= 1.0


@pytest.mark.slow
def test_retraining_ground_truth_matches_influence_derivative(trained):
    """Down-weighting each task by ε = 1e-4 and re-solving (the experiments' two-pass retraining)
    changes the target by −ε·influence up to O(ε²); both passes converge and agree."""
    setup, result = trained
    lam = result.meta_params
    target = common.mean_loss(setup, setup.val)
    n, m, q = setup.train.n_tasks, setup.train.n_support, setup.train.n_query
    eps = 1e-4
    ones = metaif.Weights.ones(n, m, q, jnp.float64)
    weights = metaif.Weights(1.0 - eps * jnp.eye(n), *(jnp.broadcast_to(w, (n, *w.shape)) for w in ones[1:]))
    res, _ = fidelity.retrain_twice(setup, lam, weights, target, steps=8, relative=1e-6)
    changes, norms = res["changes"], res["grad_norms"]
    assert changes.shape == norms.shape == res["moved"].shape == res["iterations"].shape == (2, n)
    assert np.all(norms < 1e-9)
    scores = methods.influence_methods()["IF Dense (exact)"](setup, lam, target)
    row = fidelity.agreement(-eps * scores.tasks, changes[0], np.ones(n, bool))
    assert row["pearson"] > 0.999
    np.testing.assert_allclose(changes[0], -eps * scores.tasks, rtol=1e-2, atol=1e-3 * eps * np.abs(scores.tasks).max())
    np.testing.assert_allclose(changes[1], changes[0], rtol=1e-3, atol=1e-9)


def test_ranking_and_detection_helpers():
    mask = removal.top_mask(np.array([0.1, 0.5, -1.0, 2.0, 0.0]), 0.4)
    assert mask.tolist() == [False, True, False, True, False]
    scores = {"perfect": (np.array([3.0, 2.0, 0.0, -1.0]), 0.0), "reversed": (np.array([-3.0, -2.0, 0.0, 1.0]), None)}
    out = detection.detect(scores, np.array([True, True, False, False]))
    assert out["perfect"]["roc_auc"] == 1.0 and out["reversed"]["roc_auc"] == 0.0
    assert out["perfect"]["found_at_40%"] == pytest.approx(0.8)


@pytest.mark.slow
def test_fidelity_vs_n_sweep_saves_and_resumes(tmp_path, train_once):
    """The n-sweep on the tiny config: plain and proximal leave-one-task-out with both passes
    converged, the ε-check (ε = 1e-4, nearly linear) matching −ε·IF, the table and figure written;
    a rerun skips the saved n, and other settings are refused without --fresh."""
    flags = [
        "--config",
        "smoke",
        *tiny_flags("n_val", "n_test", "features", "hidden", "queries", "adam_steps", "adam_lr"),
        "--ns",
        "6",
        "--task-sample",
        "3",
        "--gt-steps",
        "30",
        "--epsilon",
        "1e-4",
        "--out",
        str(tmp_path),
    ]
    results = fidelity_vs_n.main(flags)
    row = results["6"]
    assert train_once == [TINY]  # trained once, by the fixture
    assert row["setup"]["grad_norm"] < 1e-8
    for kind in ("plain", "proximal"):
        assert row[kind]["n_converged"] == row[kind]["n_sampled"] == 3
        assert np.asarray(row[kind]["changes"]).shape == (2, 3)
        assert row[kind]["ceiling"]["spearman"] == pytest.approx(1.0)
    assert row["proximal"]["rho"] == 1e-2
    assert row["plain"]["epsilon"]["pearson_converged"] > 0.999
    assert row["plain"]["epsilon"]["relative_error"] < 0.05
    for name in ("fidelity_vs_n.json", "fidelity_vs_n.md", "fidelity_vs_n.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| 6 | proximal (ρ = 0.01) | 3/3 |" in (tmp_path / "fidelity_vs_n.md").read_text()
    assert fidelity_vs_n.main(flags)["6"] == results["6"]  # resumed: nothing recomputed
    with pytest.raises(SystemExit, match="--fresh"):
        fidelity_vs_n.main([*flags[:-2], "--task-sample", "2", "--out", str(tmp_path)])


@pytest.mark.slow
def test_edit_reach_rows_path_and_files(tmp_path, train_once):
    """The editing-limit experiment on the tiny config: every retraining converged, removal_reach's
    t* agrees with the sign of the reduced Hessian's smallest eigenvalue (t* >= 1 exactly when the
    full removal leaves H(λ*; 1 − removed) positive definite), the path starts at λ* and the table
    and figure are written."""
    flags = [
        "--config",
        "smoke",
        "--datasets",
        "digits",
        *tiny_flags("n_train", "n_val", "n_test", "features", "hidden", "queries", "adam_steps", "adam_lr"),
        "--fractions",
        "0.2,0.5",
        "--path-points",
        "4",
        "--out",
        str(tmp_path),
    ]
    res = edit_reach.main(flags)["digits"]
    assert train_once == [TINY]  # trained once, by the fixture
    rows = res["fractions"]
    assert [r["removed"] for r in rows] == [1, 3]
    for r in rows:
        assert r["retrain_grad_norm"] < 1e-10
        assert (r["reach"] >= 1.0) == (r["reduced_min_eigenvalue"] > 0)
        assert np.isfinite(r["edit_relative_error"])
    points = res["path"]["points"]
    assert [p["t"] for p in points] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert points[0]["moved"] < 1e-6 and all(p["grad_norm"] < 1e-10 for p in points)
    assert all(p["min_eigenvalue"] > 0 for p in points)  # converged points of the path are minima
    assert res["path"]["end_to_direct"] >= 0 and np.isfinite(res["path"]["end_minus_direct_test_loss"])
    for name in ("edit_reach.json", "edit_reach.md", "edit_reach.png"):
        assert (tmp_path / name).stat().st_size > 0
