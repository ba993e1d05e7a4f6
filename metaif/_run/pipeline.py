"""The main job of `metaif demo` / `metaif run`, as resumable stages.

data → meta-training (Adam, checkpointed every `checkpoint_every` steps, then exact Newton) →
stationarity (‖∇F‖; the Hessian's extreme eigenvalues, exact from the dense factorisation or by
Lanczos for CG) with the inverse-Hessian solve v = H⁻¹∇f for the held-out loss f → task and instance influence in chunks of tasks → raw-loss baseline →
leave-one-out retraining of a random sample, in chunks → editing (remove the highest-influence
tasks and support examples by λ* − Σ I_λ) against retraining.

Every stage and chunk is a checkpoint (`store.Store`) whose fingerprint covers the config
sections it reads, its upstream stages and metaif's code, so a restarted run reuses finished work
and a changed config recomputes what depends on the change. All stages are deterministic, so a
resumed run gives the same scores as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import metaif
from metaif import evaluation, problems
from metaif._influence import _task_scores
from metaif._linalg import dense_matrix
from metaif._objective import unit_weights
from metaif.training import _train_chunk

from . import memory
from .config import Config
from .store import Store, code_version, fingerprint, load_tree, save_tree
from .ui import UI

LEVELS = ("tasks", "support", "query")
DENSE_SPECTRUM = 2000  # up to this d, the Hessian's spectrum is computed exactly (dense), beyond by Lanczos


# ----------------------------------------------------------------------------- data


class Pools(NamedTuple):
    """Images [N, H, W(, C)] and labels [N] of the meta-training pool and of the held-out pool."""

    train_images: np.ndarray
    train_labels: np.ndarray
    held_images: np.ndarray
    held_labels: np.ndarray
    source: str


def _split(images, labels, mode: str, fraction: float, seed: int, source: str) -> Pools:
    rng = np.random.default_rng(seed)
    if mode == "images":
        order = rng.permutation(labels.shape[0])
        cut = int(round((1 - fraction) * order.size))
        train, held = order[:cut], order[cut:]
    else:
        classes = np.unique(labels)
        held_classes = rng.choice(classes, int(round(fraction * classes.size)), replace=False)
        held_mask = np.isin(labels, held_classes)
        train, held = np.flatnonzero(~held_mask), np.flatnonzero(held_mask)
    return Pools(images[train], labels[train], images[held], labels[held], source)


def _npz(data) -> tuple[np.ndarray, np.ndarray]:
    path = Path(data.path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"[data] path {str(path)!r} does not exist. Point it at an .npz file with arrays "
                                "'images' [N, H, W] or [N, H, W, C] and integer 'labels' [N] (np.savez(path, images=..., labels=...)).")
    if data.sha256:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != data.sha256.lower():
            raise ValueError(f"checksum mismatch for {str(path)!r}: [data] sha256 expects {data.sha256}, the file has {digest}. "
                             "The file is corrupt, truncated or a different version: download it again, or update sha256 if "
                             "you changed the file on purpose.")
    try:
        with np.load(path, allow_pickle=False) as entry:
            missing = {"images", "labels"} - set(entry.files)
            if missing:
                raise ValueError(f"{str(path)!r} lacks array(s) {sorted(missing)}; it holds {entry.files}. Save it with "
                                 "np.savez(path, images=images, labels=labels).")
            images, labels = entry["images"], entry["labels"]
    except (OSError, EOFError) as error:
        raise ValueError(f"{str(path)!r} is not a readable .npz file ({error}).") from None
    if images.ndim not in (3, 4) or labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{str(path)!r}: images must be [N, H, W] or [N, H, W, C] and labels integer [N]; received images "
                         f"{images.shape} {images.dtype} and labels {labels.shape} {labels.dtype}.")
    images = images.astype(np.float32)
    if images.max() > 1.0:
        images = images / np.float32(images.max())
    return images, labels.astype(np.int32)


def load_pools(config: Config) -> Pools:
    """The two image pools of the configured dataset (official class splits where they exist)."""
    data = config.data
    root = data.root or None
    mode = data.held_out
    seed = 12345 + config.tasks.seed
    if data.dataset == "digits":
        d = metaif.data.load_digits()
        return _split(d.images, d.labels, "images" if mode == "auto" else mode, data.held_fraction, seed, "scikit-learn digits (8×8)")
    if data.dataset == "mnist":
        d = metaif.data.load_mnist(root, verify=data.verify)
        if mode in ("auto", "images"):
            return Pools(d.images[d.train], d.labels[d.train], d.images[~d.train], d.labels[~d.train], "MNIST (official train / test images)")
        return _split(d.images, d.labels, mode, data.held_fraction, seed, "MNIST")
    if data.dataset == "omniglot":
        d = metaif.data.load_omniglot(root, verify=data.verify, **({"size": data.image_size} if data.image_size else {}))  # type: ignore[arg-type]
        if mode == "auto":
            split = metaif.data.omniglot_split()
            train = np.isin(d.labels, split.train)
            return Pools(d.images[train], d.labels[train], d.images[~train], d.labels[~train],
                         "Omniglot (1,200 meta-train / 423 meta-test classes)")
        return _split(d.images, d.labels, mode, data.held_fraction, seed, "Omniglot")
    if data.dataset == "mini-imagenet":
        d = metaif.data.load_mini_imagenet(root, splits=("train", "test"), verify=data.verify,
                                           **({"size": data.image_size} if data.image_size else {}))  # type: ignore[arg-type]
        train = d.split == "train"
        return Pools(d.images[train], d.labels[train], d.images[~train], d.labels[~train], "Mini-ImageNet (train / test classes)")
    if data.dataset == "fc100":
        d = metaif.data.load_fc100(root, splits=("train", "test"), verify=data.verify)
        train = d.split == "train"
        return Pools(d.images[train], d.labels[train], d.images[~train], d.labels[~train], "FC100 (train / test superclasses)")
    images, labels = _npz(data)
    return _split(images, labels, "images" if mode == "auto" else mode, data.held_fraction, seed, f"npz file {data.path}")


def build_data(config: Config) -> dict[str, np.ndarray]:
    """Tasks in feature space, corruption masks, the raw support images (for plots) and the PCA."""
    pools = load_pools(config)
    t = config.tasks
    features = None
    if config.model.features:
        features = metaif.data.fit_pca(pools.train_images, config.model.features)
    embed = (lambda x: features(x)) if features is not None else (lambda x: np.asarray(x, np.float64).reshape(*x.shape[:2], -1))
    sample = lambda images, labels, n, seed: metaif.data.few_shot_tasks(images, labels, n, t.ways, t.shots, t.queries, seed)
    train = sample(pools.train_images, pools.train_labels, t.train, 1000 * t.seed + 1)
    clean_support = np.asarray(train.support["y"]).copy()
    train, task_mask = metaif.data.corrupt(train, t.corrupt_tasks, "task", seed=1000 * t.seed + 7, n_classes=t.ways)
    train, flip_mask = metaif.data.corrupt(train, t.flip_support, "support", seed=1000 * t.seed + 8, n_classes=t.ways)
    target = sample(pools.held_images, pools.held_labels, t.target, 1000 * t.seed + 2)
    test = sample(pools.held_images, pools.held_labels, t.test, 1000 * t.seed + 3)
    support_images = np.asarray(train.support["x"])
    out = {
        "train_sx": embed(train.support["x"]), "train_sy": np.asarray(train.support["y"], np.int32),
        "train_qx": embed(train.query["x"]), "train_qy": np.asarray(train.query["y"], np.int32),
        "target_sx": embed(target.support["x"]), "target_sy": np.asarray(target.support["y"], np.int32),
        "target_qx": embed(target.query["x"]), "target_qy": np.asarray(target.query["y"], np.int32),
        "test_sx": embed(test.support["x"]), "test_sy": np.asarray(test.support["y"], np.int32),
        "test_qx": embed(test.query["x"]), "test_qy": np.asarray(test.query["y"], np.int32),
        "clean_support_y": clean_support.astype(np.int32), "task_mask": task_mask, "flip_mask": flip_mask,
        "support_images": np.round(np.clip(support_images, 0, 1) * 255).astype(np.uint8),
        "source": np.asarray(pools.source), "n_pool_images": np.asarray([pools.train_labels.size, pools.held_labels.size]),
    }
    return out


def task_set(data: dict, name: str) -> metaif.TaskSet:
    part = lambda p: {"x": jnp.asarray(data[f"{name}_{p}x"], jnp.float64), "y": jnp.asarray(data[f"{name}_{p}y"], jnp.int32)}
    return metaif.TaskSet(part("s"), part("q"))


# ----------------------------------------------------------------------------- model


class Model(NamedTuple):
    problem: metaif.BilevelProblem
    init: Callable[[int], Any]           # seed -> meta_params
    logits: Callable | None              # (params, x [k, D]) -> [k, ways]
    n_params: int


def _python_model(path: str):
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"[model] module {str(file)!r} does not exist. Give the path of a .py file defining "
                                "init(key, n_inputs, ways) -> params, loss(params, meta_params, example) -> scalar and "
                                "optionally logits(params, x) -> [ways].")
    spec = importlib.util.spec_from_file_location(f"metaif_user_model_{hashlib.sha1(str(file).encode()).hexdigest()[:8]}", file)
    if spec is None or spec.loader is None:
        raise ImportError(f"[model] module {str(file)!r} cannot be imported as Python: give a .py file.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("init", "loss"):
        if not callable(getattr(module, name, None)):
            raise ValueError(f"[model] module {str(file)!r} must define a function {name}(...); it defines "
                             f"{sorted(n for n in vars(module) if not n.startswith('_'))}.")
    return module


@functools.lru_cache(maxsize=None)
def build_model(model_config, n_inputs: int, ways: int) -> Model:
    m = model_config
    if m.adapt == "maml":
        adapt = metaif.Unrolled(steps=m.inner_steps, lr=m.inner_lr)
    else:
        adapt = metaif.Proximal(reg=m.prox_reg, steps=m.inner_steps, lr=m.inner_lr, inner_solve="dense")
    if m.kind == "mlp":
        sizes = (n_inputs, *m.hidden, ways)
        loss, logits = problems.mlp_cross_entropy, problems.mlp_logits
        init = lambda seed: problems.mlp_init(jax.random.key(seed), sizes)
    else:
        module = _python_model(m.module)
        loss, logits = module.loss, getattr(module, "logits", None)
        init = lambda seed: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), module.init(jax.random.key(seed), n_inputs, ways))
    problem = metaif.BilevelProblem(loss, loss, adapt, meta_reg=m.meta_reg)
    size = sum(int(np.size(x)) for x in jax.tree.leaves(jax.eval_shape(lambda: init(0))))
    return Model(problem, init, logits, size)


@functools.partial(jax.jit, static_argnames=("problem", "logits"))
def _accuracy(problem, logits, meta_params, tasks):
    ones = jnp.ones(tasks.support["y"].shape, jnp.float64)
    theta = jax.vmap(metaif.adapt, in_axes=(None, None, 0, 0))(problem, meta_params, tasks.support, ones)
    predicted = jnp.argmax(jax.vmap(jax.vmap(logits, in_axes=(None, 0)))(theta, tasks.query["x"]), -1)
    return jnp.mean((predicted.astype(tasks.query["y"].dtype) == tasks.query["y"]).astype(jnp.float64))


def accuracy(model: Model, meta_params, tasks) -> float:
    return float("nan") if model.logits is None else float(_accuracy(model.problem, model.logits, meta_params, tasks))


@functools.partial(jax.jit, static_argnames=("problem", "batch_size"))
def _chunk_scores(problem, batch_size, meta_params, tasks, v, scale):
    """Scores of a chunk of tasks given v = H⁻¹∇f: as in metaif.influence, rescaled from the
    chunk's 1/n_chunk to the full 1/n."""
    scores = _task_scores(problem, batch_size, meta_params, tasks, unit_weights(meta_params, tasks), v)
    return tuple(s * scale for s in scores)


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Context:
    config: Config
    store: Store
    ui: UI
    code: str
    timings: dict = dataclasses.field(default_factory=dict)
    reused: list = dataclasses.field(default_factory=list)


def _stage(ctx: Context, name: str, label: str, fp: str, compute, total: int | None = None) -> dict[str, np.ndarray]:
    """A checkpointed stage with a progress display; compute(advance) -> dict of arrays."""
    cached = ctx.store.load(name, fp)
    if cached is not None:
        ctx.store.log("reused", name)
        ctx.ui.reused(label)
        ctx.reused.append(name)
        ctx.timings[name] = float(cached.get("seconds", np.nan))
        return cached
    with ctx.ui.progress(label, total) as advance:
        start = time.perf_counter()
        arrays = {k: np.asarray(v) for k, v in compute(advance).items()}
        arrays["seconds"] = np.asarray(time.perf_counter() - start)
    ctx.store.save(name, fp, arrays)
    ctx.store.log("computed", name, seconds=round(float(arrays["seconds"]), 3))
    ctx.timings[name] = float(arrays["seconds"])
    return arrays


def _chunks(total: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, total)) for start in range(0, total, size)]


def _adam(ctx: Context, model: Model, tasks, fp: str) -> dict[str, np.ndarray]:
    """Full-batch Adam, checkpointed every `checkpoint_every` steps (resumes mid-training)."""
    cfg = ctx.config.train
    name = "train_adam"
    optimizer = _optimizer(cfg.adam_lr)
    init = model.init(cfg.seed)
    with jax.numpy_dtype_promotion("standard"):
        state_like = optimizer.init(init)
    saved = ctx.store.load(name, fp)
    if saved is not None and int(saved["done"]) == cfg.adam_steps:
        ctx.store.log("reused", name)
        ctx.ui.reused(f"Meta-training: Adam, {cfg.adam_steps} steps")
        ctx.reused.append(name)
        ctx.timings[name] = float(saved["seconds"])
        return saved
    if saved is not None:
        params, opt_state = load_tree("p", saved, init), load_tree("s", saved, state_like)
        key = jax.random.wrap_key_data(jnp.asarray(saved["key"]))
        done, losses, norms, seconds = int(saved["done"]), list(saved["losses"]), list(saved["grad_norms"]), float(saved["seconds"])
        ctx.store.log("resumed", name, step=done)
    else:
        params, opt_state, key, done, losses, norms, seconds = init, state_like, jax.random.key(cfg.seed), 0, [], [], 0.0
    weights = metaif.Weights.ones(tasks.n_tasks, tasks.n_support, tasks.n_query, jnp.float64)
    with ctx.ui.progress(f"Meta-training: Adam, {cfg.adam_steps} steps", cfg.adam_steps, done) as advance:
        while done < cfg.adam_steps:
            start = time.perf_counter()
            length = min(cfg.checkpoint_every, cfg.adam_steps - done)
            key, sub = jax.random.split(key)
            params, opt_state, v, g = _train_chunk(model.problem, optimizer, length, None, params, opt_state, sub, tasks, weights)
            losses += np.asarray(v).tolist()
            norms += np.asarray(g).tolist()
            done += length
            seconds += time.perf_counter() - start
            arrays = {**save_tree("p", params), **save_tree("s", opt_state), "key": np.asarray(jax.random.key_data(key)),
                      "done": np.asarray(done), "losses": np.asarray(losses), "grad_norms": np.asarray(norms),
                      "seconds": np.asarray(seconds)}
            ctx.store.save(name, fp, arrays)
            ctx.store.log("checkpoint", name, step=done)
            advance(length)
    if not np.isfinite(losses[-1]):
        raise ValueError(f"meta-training diverged (F = {losses[-1]}): lower [train] adam_lr or [model] inner_lr.")
    ctx.store.log("computed", name, seconds=round(seconds, 3))
    ctx.timings[name] = seconds
    return {k: np.asarray(v) for k, v in arrays.items()}


@functools.lru_cache(maxsize=None)
def _optimizer(lr: float):
    return optax.adam(lr)


def run(config: Config, out: Path, ui: UI, memory_limit_bytes: float | None = None) -> dict:
    """Run (or resume) every stage; returns the results dict the report is made from."""
    out = Path(out)
    store = Store(out)
    code = code_version()
    ctx = Context(config, store, ui, code)
    sec = config.to_dict()
    start_all = time.perf_counter()

    # ---- data
    fp_data = fingerprint("data", sec["data"], sec["tasks"], sec["model"]["features"], code)
    data = _stage(ctx, "data", f"Data: {config.data.dataset} tasks", fp_data, lambda advance: build_data(config))
    train, target_tasks, test = (task_set(data, k) for k in ("train", "target", "test"))
    n, m, q = train.n_tasks, train.n_support, train.n_query
    n_inputs = int(data["train_sx"].shape[-1])
    model = build_model(config.model, n_inputs, config.tasks.ways)
    problem = model.problem
    metaif._objective.check_arguments(problem, model.init(0), train)  # a non-scalar loss fails here, before any work

    # ---- memory: estimate before the heavy stages
    estimate = memory.check(config, n_inputs, model.n_params, n, m, q, memory_limit_bytes)

    # ---- meta-training
    fp_adam = fingerprint("adam", fp_data, sec["model"], sec["train"], code)
    adam = _adam(ctx, model, train, fp_adam)
    adam_params = load_tree("p", adam, model.init(0))

    def newton(advance):
        if config.train.newton_steps == 0:
            result = metaif.TrainResult(adam_params, jnp.zeros(0), jnp.zeros(0), *metaif.training._full_value_and_grad(
                problem, adam_params, train, metaif.Weights.ones(n, m, q, jnp.float64)))
        else:
            result = metaif.newton_refine(problem, adam_params, train, steps=config.train.newton_steps)
        return {**save_tree("p", result.meta_params), "objective": result.objective, "grad_norm": result.grad_norm,
                "grad_norms": result.grad_norms}

    fp_newton = fingerprint("newton", fp_adam, code)
    refined = _stage(ctx, "train_newton", f"Meta-training: exact Newton, {config.train.newton_steps} steps", fp_newton, newton)
    lam = load_tree("p", refined, model.init(0))
    target = _target_fn(problem, target_tasks)

    def evaluate(advance):
        return {"train_accuracy": accuracy(model, lam, train), "test_accuracy": accuracy(model, lam, test),
                "target_loss": float(target(lam)), "adam_target_loss": float(target(adam_params)),
                "adam_test_accuracy": accuracy(model, adam_params, test)}

    evaluated = _stage(ctx, "evaluate", "Evaluate: held-out loss and test accuracy", fingerprint("evaluate", fp_newton, code), evaluate)

    # ---- influence: one solve v = H⁻¹∇f (and the Hessian's extreme eigenvalues), then scores by chunk
    solver = _solver(config)

    def solve(advance):
        op = metaif.hessian_operator(problem, lam, train, batch_size=config.influence.batch_size or None)
        if model.n_params <= DENSE_SPECTRUM:  # exact: eigenvalues of the materialised Hessian
            values = np.linalg.eigvalsh(np.asarray(dense_matrix(op.hvp, lam)))
            spectrum = {"smallest": values[:3], "smallest_residuals": np.zeros(min(3, values.size)), "largest": values[-1:],
                        "spectrum_method": "dense eigh"}
        else:
            low = metaif.solvers.lanczos_eigenvalues(op, k=min(3, model.n_params), which="smallest")
            high = metaif.solvers.lanczos_eigenvalues(op, k=1, which="largest")
            spectrum = {"smallest": low.values, "smallest_residuals": low.residuals, "largest": high.values,
                        "spectrum_method": "Lanczos"}
        v, info = solver.solve(solver.prepare(op), jax.grad(target)(lam))
        return {**save_tree("v", v), **spectrum, **{f"info_{k}": np.asarray(x) for k, x in info._asdict().items()}}

    fp_solve = fingerprint("solve", fp_newton, fp_data, sec["influence"]["solver"], sec["influence"]["damping"],
                           sec["influence"]["batch_size"], sec["influence"]["cg_maxiter"], code)
    solved = _stage(ctx, "solve", f"Influence: Hessian and inverse-Hessian solve ({config.influence.solver}, d = {model.n_params})",
                    fp_solve, solve)
    spectrum = {**solved, **evaluated}
    v = load_tree("v", solved, lam)

    chunks = _chunks(n, config.influence.chunk)
    fp_scores = fingerprint("scores", fp_solve, sec["influence"]["chunk"], code)
    parts = []
    todo = {i for i in range(len(chunks)) if store.load(f"scores_{i:04d}", fingerprint(fp_scores, i)) is None}
    with ui.progress(f"Influence: task and instance scores, {len(chunks)} chunk(s) of tasks", len(chunks), len(chunks) - len(todo)) as advance:
        for i, (lo, hi) in enumerate(chunks):
            def compute(lo=lo, hi=hi):
                sub = jax.tree.map(lambda x: x[lo:hi], train)
                t_, a_, b_ = _chunk_scores(problem, config.influence.batch_size or None, lam, sub, v, (hi - lo) / n)
                return {"tasks": t_, "support": a_, "query": b_}
            parts.append(store.cached(f"scores_{i:04d}", fingerprint(fp_scores, i), compute))
            if i in todo:
                advance()
    ctx.timings["scores"] = float(sum(float(p["seconds"]) for p in parts))
    scores = {level: np.concatenate([p[level] for p in parts]) for level in LEVELS}

    # ---- baseline
    fp_base = fingerprint("baseline", fp_newton, code)
    base = _stage(ctx, "baseline", "Baseline: raw loss after adaptation", fp_base,
                  lambda advance: dict(zip(LEVELS, evaluation.baselines.raw_loss(problem, lam, train)[:3])))
    baseline = {level: base[level] for level in LEVELS}

    # ---- leave-one-out check of a random sample
    c = config.check
    rng = np.random.default_rng(1000 * config.tasks.seed + 11)
    samples = {"tasks": np.sort(rng.choice(n, min(c.tasks, n), replace=False))}
    for level, size in (("support", m), ("query", q)):
        count = min(getattr(c, level), n * size)
        flat = np.sort(rng.choice(n * size, count, replace=False))
        samples[level] = np.stack(np.divmod(flat, size), axis=1)
    fp_loo = fingerprint("loo", fp_newton, fp_data, sec["check"], code)
    loo: dict[str, list] = {}
    jobs = [(level, i, lo, hi) for level in LEVELS for i, (lo, hi) in enumerate(_chunks(len(samples[level]), c.chunk))]
    fresh = {(lv, i): store.load(f"loo_{lv}_{i:04d}", fingerprint(fp_loo, lv, i)) is None for lv, i, _, _ in jobs}
    with ui.progress(f"Check: leave-one-out retraining of {sum(len(s) for s in samples.values())} sampled data",
                     sum(hi - lo for _, _, lo, hi in jobs), sum(hi - lo for lv, i, lo, hi in jobs if not fresh[lv, i])) as advance:
        for level, i, lo, hi in jobs:
            def compute_loo(level=level, lo=lo, hi=hi):
                change, norm = evaluation.leave_one_out(problem, lam, train, level, samples[level][lo:hi], target,
                                                        steps=c.retrain_steps, batch_size=c.batch_size)
                return {"change": change, "grad_norm": norm}
            loo.setdefault(level, []).append(store.cached(f"loo_{level}_{i:04d}", fingerprint(fp_loo, level, i), compute_loo))
            if fresh[level, i]:
                advance(hi - lo)
    ctx.timings["loo"] = float(sum(float(p["seconds"]) for parts_ in loo.values() for p in parts_))
    actual = {level: np.concatenate([p["change"] for p in loo[level]]) if loo.get(level) else np.zeros(0) for level in LEVELS}
    loo_norms = {level: np.concatenate([p["grad_norm"] for p in loo[level]]) if loo.get(level) else np.zeros(0) for level in LEVELS}
    predicted = {level: -(scores[level][samples[level]] if level == "tasks" else
                          scores[level][samples[level][:, 0], samples[level][:, 1]]) for level in LEVELS}

    # ---- edit: remove the highest-influence tasks and support examples
    e = config.edit
    k_tasks = int(round(e.tasks * n))
    remove_tasks = np.zeros(n, bool)
    remove_tasks[np.argsort(-scores["tasks"], kind="stable")[:k_tasks]] = True
    k_support = int(round(e.support * n * m))
    remove_support = np.zeros((n, m), bool)
    candidates = np.where(remove_tasks[:, None], -np.inf, scores["support"]).ravel()
    remove_support.flat[np.argsort(-candidates, kind="stable")[:k_support]] = True
    base_tasks = np.zeros(n, bool)
    base_tasks[np.argsort(-baseline["tasks"], kind="stable")[:k_tasks]] = True
    base_support = np.zeros((n, m), bool)
    base_candidates = np.where(base_tasks[:, None], -np.inf, baseline["support"]).ravel()
    base_support.flat[np.argsort(-base_candidates, kind="stable")[:k_support]] = True

    def edit(advance):
        edit_solver = dataclasses.replace(solver, damping=e.damping)
        infl = metaif.influence(problem, lam, train, solver=edit_solver, batch_size=config.influence.batch_size or None)
        removed = {"tasks": remove_tasks, "support": remove_support}
        edited = evaluation.edit(lam, infl, removed, problem=problem, tasks=train)
        weights = [evaluation.remaining_weights(train, r) for r in
                   (removed, {"tasks": base_tasks, "support": base_support})]
        # padded to the leave-one-out chunk size, with its steps, so the compiled retraining is reused
        weights += weights[-1:] * max(0, c.chunk - len(weights))
        batch = metaif.Weights(*(jnp.stack(w) for w in zip(*weights)))
        retrained = evaluation.retrain(problem, lam, train, batch, steps=c.retrain_steps, batch_size=c.batch_size)
        pick = lambda i: jax.tree.map(lambda x: x[i], retrained.meta_params)
        out = {**save_tree("edit", edited.meta_params), **save_tree("retrain", pick(0)), **save_tree("retrain_base", pick(1)),
               "edit_grad_norm": edited.grad_norm, "retrain_grad_norm": retrained.grad_norm[:2]}
        for key, params in (("before", lam), ("edit", edited.meta_params), ("retrain", pick(0)), ("retrain_base", pick(1))):
            out[f"target_{key}"] = float(target(params))
            out[f"test_accuracy_{key}"] = accuracy(model, params, test)
        return out

    fp_edit = fingerprint("edit", fp_scores, fp_base, sec["edit"], sec["check"]["retrain_steps"], code)
    edited = None
    if k_tasks + k_support:
        edited = _stage(ctx, "edit", f"Edit: remove {k_tasks} tasks + {k_support} support examples, vs retraining", fp_edit, edit)

    wall = time.perf_counter() - start_all
    return dict(config=config, model=model, data=data, n=n, m=m, q=q, d=model.n_params, adam=adam, refined=refined,
                spectrum=spectrum, solved=solved, scores=scores, baseline=baseline, samples=samples, actual=actual,
                loo_norms=loo_norms, predicted=predicted, edited=edited, remove_tasks=remove_tasks,
                remove_support=remove_support, base_tasks=base_tasks, base_support=base_support, timings=ctx.timings,
                reused=ctx.reused, wall=wall, estimate=estimate, code=code)


def _solver(config: Config):
    i = config.influence
    if i.solver == "dense":
        return metaif.solvers.Dense(damping=i.damping)
    return metaif.solvers.CG(damping=i.damping, maxiter=i.cg_maxiter)


def _target_fn(problem, tasks) -> Callable:
    """λ ↦ mean query loss over the held-out target tasks (jitted, one object per task set)."""

    @jax.jit
    def target(meta_params):
        return jnp.mean(metaif.task_losses(problem, meta_params, tasks))

    return target
