"""Shared setup of every experiment: data → tasks → model → meta-training to a stationary point →
stationarity checks, plus result saving (JSON, markdown table, PNG figures).

One configuration (`Config`) names everything an experiment needs; `CONFIGS` holds the CPU-sized
defaults per dataset, the GPU-sized ones (`--config gpu`) and a seconds-long smoke config.

Model: images → fixed whitened PCA features (fitted on meta-training images only) → tanh MLP
(metaif.problems). The feature map keeps the number of meta-parameters d small (a few hundred)
so that the ground truth can use exact Newton on the dense d×d total Hessian, which matters more
here than model size (see experiments/README.md).

Conventions (binding, README): influence = derivative at weight 1; removal changes a quantity by
about −influence; positive influence on a loss is harmful.
"""

from __future__ import annotations

import os

import metaif  # noqa: E402

metaif.configure_cpu()  # before the first JAX computation: single-threaded Eigen kernels on CPU

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, NamedTuple  # noqa: E402

import jax  # noqa: E402
import jax.flatten_util  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import metaif  # noqa: E402
from metaif import problems  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
DATA = os.environ.get("METAIF_DATA") or str(ROOT.parent / "shared" / "data")


# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines one experimental setting (all hashable)."""

    dataset: str = "omniglot"  # omniglot | mnist | digits
    adapt: str = "maml"  # maml (Unrolled) | imaml (Proximal)
    ways: int = 5
    shots: int = 1
    queries: int = 3  # query examples per class
    n_train: int = 256
    n_val: int = 100
    n_test: int = 200
    features: int = 16  # whitened PCA components
    hidden: int = 8  # tanh MLP width (0: linear softmax)
    inner_steps: int = 1  # MAML steps / iMAML gradient steps to the inner argmin
    inner_lr: float = 0.5
    prox_reg: float = 2.0  # iMAML proximal strength γ
    meta_reg: float = 1e-3  # (meta_reg/2)‖λ‖² in F
    adam_steps: int = 1500
    adam_lr: float = 1e-2
    newton_steps: int = 30
    seed: int = 0

    def problem(self) -> metaif.BilevelProblem:
        loss = problems.mlp_cross_entropy
        if self.adapt == "maml":
            adapt = metaif.Unrolled(steps=self.inner_steps, lr=self.inner_lr)
        elif self.adapt == "imaml":
            adapt = metaif.Proximal(
                reg=self.prox_reg, steps=self.inner_steps, lr=self.inner_lr, inner_solve="dense", line_search=True
            )
        else:
            raise ValueError(f"Config.adapt must be 'maml' or 'imaml'; received {self.adapt!r}.")
        return metaif.BilevelProblem(loss, loss, adapt, meta_reg=self.meta_reg)

    def sizes(self) -> tuple[int, ...]:
        return (self.features, self.hidden, self.ways) if self.hidden else (self.features, self.ways)


# CPU-sized defaults (each experiment finishes within ~30 minutes on an idle 2-core CPU) and the
# paper-scale GPU configs; experiments override fields with command-line flags. "cpu" meta-trains on
# n = 256 tasks; "cpu-n32" is the former n = 32 setting, kept for comparison: with 32 tasks the
# meta-learner overfits (Omniglot test loss 2.94 > ln 5, train accuracy 0.74 against test 0.33).
CONFIGS: dict[str, Config] = {
    "cpu": Config(n_train=256),
    "cpu-n32": Config(n_train=32),
    # iMAML's exact total Hessian (dense implicit solves) costs ~20× MAML's on this CPU, so its CPU
    # config uses n = 64. Its inner descent backtracks (Proximal(line_search=True), lr a cap): during
    # meta-training the inner curvature grows to 20–50, past 2/lr of any fixed step that also
    # converges in reasonable time (experiments/README.md, section 1).
    "cpu-imaml": Config(n_train=64, adapt="imaml", inner_steps=150, inner_lr=0.1, prox_reg=10.0),
    "gpu": Config(
        n_train=1000, n_val=500, n_test=1000, features=64, hidden=32, queries=15, adam_steps=20000, newton_steps=40
    ),
    "smoke": Config(
        dataset="digits",
        n_train=12,
        n_val=10,
        n_test=20,
        features=8,
        hidden=4,
        queries=2,
        adam_steps=200,
        newton_steps=12,
    ),
}


def parse(
    description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None, argv: list[str] | None = None
) -> tuple[argparse.Namespace, Config]:
    """Common flags: --config NAME plus any Config field as --field VALUE (from `argv`, default sys.argv)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default="cpu", choices=sorted(CONFIGS))
    parser.add_argument("--out", default=None, help="results folder (default results/<experiment>)")
    for field in dataclasses.fields(Config):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}", dest=field.name, type=type(field.default), default=None
        )
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name) is not None}
    return args, dataclasses.replace(CONFIGS[args.config], **overrides)


# ----------------------------------------------------------------------------- data


class Split(NamedTuple):
    """Images and labels of the meta-training pool and of the held-out pool."""

    train_images: np.ndarray
    train_labels: np.ndarray
    held_images: np.ndarray
    held_labels: np.ndarray


@functools.lru_cache(maxsize=None)
def load_split(dataset: str) -> Split:
    """Omniglot: the standard class split (1,200 meta-train classes, 423 meta-test classes).
    MNIST: all 10 classes; meta-train images from the official training set, held-out tasks from
    the official test set. digits: all 10 classes, images split 60/40 at random (seed 0)."""
    if dataset == "omniglot":
        data = metaif.data.load_omniglot(DATA)
        split = metaif.data.omniglot_split()
        train = np.isin(data.labels, split.train)
        return Split(data.images[train], data.labels[train], data.images[~train], data.labels[~train])
    if dataset == "mnist":
        data = metaif.data.load_mnist(DATA)
        return Split(data.images[:60000], data.labels[:60000], data.images[60000:], data.labels[60000:])
    if dataset == "digits":
        data = metaif.data.load_digits()
        order = np.random.default_rng(0).permutation(data.labels.shape[0])
        cut = int(0.6 * order.size)
        return Split(
            data.images[order[:cut]], data.labels[order[:cut]], data.images[order[cut:]], data.labels[order[cut:]]
        )
    raise ValueError(f"dataset must be 'omniglot', 'mnist' or 'digits'; received {dataset!r}.")


# Whitened PCA features: metaif's own (the one the `metaif run` pipeline uses).
from metaif.data import PCA as Features  # noqa: E402
from metaif.data import fit_pca as pca  # noqa: E402


def _task_set(tasks: metaif.TaskSet, features: Features) -> metaif.TaskSet:
    part = lambda d: {"x": jnp.asarray(features(d["x"]), jnp.float64), "y": jnp.asarray(d["y"], jnp.int32)}
    return metaif.TaskSet(part(tasks.support), part(tasks.query))


class Setup(NamedTuple):
    config: Config
    problem: metaif.BilevelProblem
    train: metaif.TaskSet  # meta-training tasks (their influence is measured)
    val: metaif.TaskSet  # held-out tasks: the influence target (meta-validation loss)
    test: metaif.TaskSet  # separate held-out tasks: reported accuracy
    features: Features


def build(config: Config) -> Setup:
    """Tasks from the dataset's meta-train pool (training tasks) and held-out pool (val and test,
    drawn with different seeds), in PCA feature space."""
    split = load_split(config.dataset)
    features = pca(split.train_images, config.features)
    sample = lambda images, labels, n, seed: _task_set(
        metaif.data.few_shot_tasks(images, labels, n, config.ways, config.shots, config.queries, seed), features
    )
    train = sample(split.train_images, split.train_labels, config.n_train, 1000 * config.seed + 1)
    val = sample(split.held_images, split.held_labels, config.n_val, 1000 * config.seed + 2)
    test = sample(split.held_images, split.held_labels, config.n_test, 1000 * config.seed + 3)
    return Setup(config, config.problem(), train, val, test, features)


# ----------------------------------------------------------------------------- targets


def _mlp_predict(params, meta_params, example):
    return problems.mlp_logits(params, example["x"])


def accuracy(setup: Setup, meta_params, tasks: metaif.TaskSet | None = None) -> float:
    """Mean query accuracy after adaptation (default: on the test tasks)."""
    return float(
        metaif.task_accuracies(setup.problem, meta_params, setup.test if tasks is None else tasks, _mlp_predict).mean()
    )


def mean_loss(setup: Setup, tasks: metaif.TaskSet) -> Callable:
    """λ ↦ mean query loss after adaptation over `tasks` (one function object per task set, so
    compiled code is reused)."""
    problem = setup.problem

    def loss(meta_params):
        return jnp.mean(metaif.task_losses(problem, meta_params, tasks))

    return loss


class Targets(NamedTuple):
    val_loss: Callable
    test_loss: Callable


def targets(setup: Setup) -> Targets:
    return Targets(mean_loss(setup, setup.val), mean_loss(setup, setup.test))


# ----------------------------------------------------------------------------- training


class Trained(NamedTuple):
    meta_params: Any
    grad_norm_adam: float
    grad_norm: float
    objective: float
    eigenvalues: np.ndarray  # the smallest eigenvalues of the total Hessian (dense eigh)
    max_eigenvalue: float
    seconds: float
    history: dict


@jax.jit
def total_hessian(problem, meta_params, tasks):
    """The dense d×d total Hessian of F at meta_params (third-order terms included)."""
    flat, unravel = jax.flatten_util.ravel_pytree(meta_params)
    grad = lambda x: jax.flatten_util.ravel_pytree(
        jax.grad(metaif.meta_objective, argnums=1)(problem, unravel(x), tasks)
    )[0]
    return jax.jacfwd(grad)(flat)


def init_params(config: Config):
    return problems.mlp_init(jax.random.key(config.seed), config.sizes())


def meta_train(setup: Setup, log=print) -> Trained:
    """Adam (full batch) then safeguarded exact Newton (`metaif.newton_refine`) to a stationary
    point; reports ‖∇F‖ after each phase and the smallest total-Hessian eigenvalues."""
    config, problem = setup.config, setup.problem
    start = time.perf_counter()
    adam = metaif.meta_train(
        problem, init_params(config), setup.train, optax.adam(config.adam_lr), steps=config.adam_steps
    )
    log(f"  adam: {adam.summary()}")
    newton = metaif.newton_refine(problem, adam.meta_params, setup.train, steps=config.newton_steps, tol=1e-13)
    seconds = time.perf_counter() - start
    log(f"  newton: {newton.summary()}")
    eig = np.linalg.eigvalsh(np.asarray(total_hessian(problem, newton.meta_params, setup.train)))
    log(f"  Hessian eigenvalues: min {eig[:3]}, max {eig[-1]:.3g}, negative {int(np.sum(eig < 0))} of {eig.size}")
    history = {
        "adam_loss": np.asarray(adam.losses)[:: max(1, config.adam_steps // 100)].tolist(),
        "adam_grad_norm": np.asarray(adam.grad_norms)[:: max(1, config.adam_steps // 100)].tolist(),
        "newton_grad_norm": np.asarray(newton.grad_norms).tolist(),
    }
    return Trained(
        newton.meta_params,
        float(adam.grad_norm),
        float(newton.grad_norm),
        float(newton.objective),
        eig[:5],
        float(eig[-1]),
        seconds,
        history,
    )


def flat(tree) -> np.ndarray:
    """A pytree (e.g. meta-parameters) as one flat numpy vector."""
    return np.asarray(jax.flatten_util.ravel_pytree(tree)[0])


def n_params(meta_params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(meta_params)))


# ----------------------------------------------------------------------------- timing


def timed(fn: Callable, *args, repeats: int = 1, **kwargs):
    """(result, compile+first-run seconds, best steady-state seconds over `repeats` further runs)."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    first = time.perf_counter() - start
    best = first
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args, **kwargs))
        best = min(best, time.perf_counter() - start)
    return out, first, best


# ----------------------------------------------------------------------------- output


def run_datasets(args, base: Config, run: Callable, save: Callable, folder: Path, experiment: str, log=print) -> dict:
    """Run `run(config, args, log)` for every dataset in `args.datasets`, saving
    `folder/<experiment>.json` and calling `save(results, folder)` after each one (finished datasets
    survive an interruption)."""
    results = {}
    for dataset in args.datasets.split(","):
        config = dataclasses.replace(base, dataset=dataset)
        log(f"== {dataset}: {config}")
        results[dataset] = run(config, args, log)
        save_json(folder / f"{experiment}.json", results)
        save(results, folder)
    return results


def converged_count(norms, tol: float) -> str:
    """ "k of K" retrainings whose final ‖∇F(λ; w)‖ <= tol (None, as JSON writes NaN, counts as not converged)."""
    norms = np.asarray([np.nan if x is None else x for x in np.ravel(np.asarray(norms, dtype=object))], float)
    return f"{int(np.sum(norms <= tol))} of {norms.size}"


def relative_error(predicted, actual) -> float | None:
    """‖predicted − actual‖ / ‖actual‖ (None for no data)."""
    predicted, actual = np.asarray(predicted), np.asarray(actual)
    return float(np.linalg.norm(predicted - actual) / np.linalg.norm(actual)) if actual.size else None


def device_caption(dtype: str = "float64") -> str:
    devices = jax.devices()
    return f"backend {jax.default_backend()}, device {devices[0].device_kind} ×{len(devices)}, {dtype}"


def out_dir(args, experiment: str) -> Path:
    path = Path(args.out) if args.out else RESULTS / experiment
    path.mkdir(parents=True, exist_ok=True)
    return path


def to_json(x):
    if isinstance(x, dict):
        return {str(k): to_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_json(v) for v in x]
    if isinstance(x, (np.ndarray, jax.Array)):
        return to_json(np.asarray(x).tolist())
    if isinstance(x, (np.floating, float)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    return x


def save_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(to_json(data), indent=1) + "\n")


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    x = float(x)
    if not np.isfinite(x):
        return "nan"
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.2e}"
    return f"{x:.{digits}f}"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def config_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def describe_setup(setup: Setup, trained: Trained) -> dict:
    return {
        "config": config_dict(setup.config),
        "d": n_params(trained.meta_params),
        "grad_norm_adam": trained.grad_norm_adam,
        "grad_norm": trained.grad_norm,
        "objective": trained.objective,
        "hessian_min_eigenvalues": trained.eigenvalues,
        "hessian_max_eigenvalue": trained.max_eigenvalue,
        "train_seconds": trained.seconds,
        "test_accuracy": accuracy(setup, trained.meta_params),
        "val_accuracy": accuracy(setup, trained.meta_params, setup.val),
        "train_accuracy": accuracy(setup, trained.meta_params, setup.train),
        "device": device_caption(),
        "history": trained.history,
    }
