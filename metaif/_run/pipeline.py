"""The main job of `metaif demo` / `metaif run`, as resumable stages.

data → meta-training (Adam, checkpointed every `checkpoint_every` steps, then exact Newton) →
stationarity (‖∇F‖; the Hessian's extreme eigenvalues, exact from the dense factorisation or by
Lanczos for CG) with the inverse-Hessian solve v = H⁻¹∇f for the held-out loss f → task and instance influence in chunks of tasks → raw-loss baseline →
leave-one-out retraining of a random sample, in chunks → editing (remove the highest-influence
tasks and support examples by λ* − Σ I_λ) against retraining.

Every stage and chunk is a checkpoint (`store.Store`) whose fingerprint covers the settings that
change its result, the content (sha256) of what it reads (the loaded images and labels, a Python
model file, the upstream checkpoints) and metaif's code, so a restarted run reuses finished work,
and a changed config, data file or model file recomputes what depends on the change. Settings that
do not change results (`checkpoint_every`, file locations, report options) are left out. All stages
are deterministic, so a resumed run gives the same scores as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import resource
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import metaif
from metaif import _batching, core, evaluation, problems
from metaif.data import _args as data_args
from metaif.data import _source as data_source

from . import memory
from .config import CONV4_GROUPS, Config, ConfigError
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
    if train.size == 0 or held.size == 0:
        unit, count = (
            ("images", np.size) if mode == "images" else ("classes", lambda side: np.unique(labels[side]).size)
        )
        raise ConfigError(
            f'[data] held_fraction = {fraction} with held_out = "{mode}" leaves {count(train)} meta-training and '
            f"{count(held)} held-out {unit} of {source}; both need some. Set [data] held_fraction strictly between "
            "0 and 1 (e.g. 0.4)."
        )
    return Pools(images[train], labels[train], images[held], labels[held], source)


NPZ_LAYOUT = (
    "two numeric arrays, 'images' [N, H, W] or [N, H, W, C] and integer 'labels' [N]: save them with "
    "np.savez(path, images=np.asarray(images, np.float32), labels=np.asarray(labels, np.int64))"
)


def _npz_path(data) -> Path:
    path = Path(data.path).expanduser()
    if not path.is_file():
        raise ConfigError(
            f'[data] path = "{data.path}" does not exist{" as a file" if path.exists() else ""}. '
            f"Point it at an .npz file holding {NPZ_LAYOUT}."
        )
    return path


def _data_root(data) -> Path:
    """[data] root, else $METAIF_DATA, as an existing folder; a ConfigError in the config's words otherwise."""
    try:
        return data_source.data_root(
            f'[data] dataset = "{data.dataset}"',
            data.root or None,
            name="[data] root",
            unset="[data] root is not set",
            how='set [data] root = "/path/to/data" in the config',
        )
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from None


def check_paths(config: Config) -> None:
    """The data folder, data file and model module that the config names exist (ConfigError otherwise)."""
    if config.data.dataset == "npz":
        _npz_path(config.data)
    elif config.data.dataset != "digits":
        _data_root(config.data)
    _model_source(config.model)  # the model file exists (b"" for the built-in MLP)


def _npz(data) -> tuple[np.ndarray, np.ndarray]:
    path = _npz_path(data)
    if data.sha256:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != data.sha256.lower():
            raise ValueError(
                f"checksum mismatch for {str(path)!r}: [data] sha256 expects {data.sha256}, the file has {digest}. "
                "The file is corrupt, truncated or a different version: download it again, or update sha256 if "
                "you changed the file on purpose."
            )
    try:
        with open(path, "rb") as handle:  # closed here even when numpy fails half-way
            entry = np.load(handle, allow_pickle=False)
            if not isinstance(entry, np.lib.npyio.NpzFile):
                raise ValueError(
                    f"{str(path)!r} is a single .npy array, not an .npz archive. metaif reads {NPZ_LAYOUT}."
                )
            with entry:
                missing = {"images", "labels"} - set(entry.files)
                if missing:
                    raise ValueError(
                        f"{str(path)!r} lacks array(s) {sorted(missing)}; it holds {entry.files}. "
                        f"metaif reads {NPZ_LAYOUT}."
                    )
                images, labels = entry["images"], entry["labels"]
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError) as error:
        raise ValueError(
            f"{str(path)!r} is not a readable .npz file ({error}): it is damaged, truncated or not an .npz "
            f"archive. metaif reads {NPZ_LAYOUT}."
        ) from None
    except ValueError as error:  # numpy's refusal to unpickle: an object array, or a file that is no .npz at all
        if "allow_pickle" not in str(error):
            raise
        what = (
            "stores an array as Python objects (a pickled object array)"
            if "Object arrays" in str(error)
            else "is not an .npz archive (numpy would read it as a pickle)"
        )
        raise ValueError(
            f"{str(path)!r} {what}. metaif never loads pickles, since loading one can run arbitrary code; "
            f"it reads {NPZ_LAYOUT}."
        ) from None
    if (
        images.ndim not in (3, 4)
        or labels.shape != images.shape[:1]
        or not np.issubdtype(labels.dtype, np.integer)
        or not (np.issubdtype(images.dtype, np.floating) or np.issubdtype(images.dtype, np.integer))
    ):
        count = data_args.non_finite(labels)[0] if labels.ndim == 1 and labels.size else 0
        raise ValueError(
            f"{str(path)!r}: images must be real [N, H, W] or [N, H, W, C] and labels integer [N]; received images "
            f"{images.shape} {images.dtype} and labels {labels.shape} {labels.dtype}"
            + (f" ({count} of them NaN or inf)" if count else "")
            + ". Convert them with "
            "np.asarray(images, np.float32) and np.asarray(labels, np.int64)."
        )
    data_args.check_finite(
        f"{str(path)!r} (array 'images')",
        images,
        "images",
        "Drop or repair those images in the file (np.isfinite(images).all(axis=(1, 2)) marks the good ones).",
    )
    images = images.astype(np.float32)
    if images.max() > 1.0:
        images = images / np.float32(images.max())
    return images, labels.astype(np.int32)


def _size(data) -> dict[str, Any]:
    """The loaders' `size` keyword when the config sets an image size (their default otherwise)."""
    return {"size": data.image_size} if data.image_size else {}


def load_pools(config: Config) -> Pools:
    """The two image pools of the configured dataset (official class splits where they exist)."""
    data = config.data
    root = None if data.dataset in ("digits", "npz") else _data_root(data)
    mode = data.held_out
    seed = 12345 + config.tasks.seed
    if data.dataset == "digits":
        d = metaif.data.load_digits()
        return _split(
            d.images,
            d.labels,
            "images" if mode == "auto" else mode,
            data.held_fraction,
            seed,
            "scikit-learn digits (8×8)",
        )
    if data.dataset == "mnist":
        d = metaif.data.load_mnist(root, verify=data.verify)
        if mode in ("auto", "images"):
            return Pools(
                d.images[d.train],
                d.labels[d.train],
                d.images[~d.train],
                d.labels[~d.train],
                "MNIST (official train / test images)",
            )
        return _split(d.images, d.labels, mode, data.held_fraction, seed, "MNIST")
    if data.dataset == "omniglot":
        d = metaif.data.load_omniglot(root, verify=data.verify, **_size(data))
        if mode == "auto":
            split = metaif.data.omniglot_split()
            train = np.isin(d.labels, split.train)
            return Pools(
                d.images[train],
                d.labels[train],
                d.images[~train],
                d.labels[~train],
                "Omniglot (1,200 meta-train / 423 meta-test classes)",
            )
        return _split(d.images, d.labels, mode, data.held_fraction, seed, "Omniglot")
    if data.dataset == "mini-imagenet":
        d = metaif.data.load_mini_imagenet(root, splits=("train", "test"), verify=data.verify, **_size(data))
        train = d.split == "train"
        return Pools(
            d.images[train], d.labels[train], d.images[~train], d.labels[~train], "Mini-ImageNet (train / test classes)"
        )
    if data.dataset == "fc100":
        d = metaif.data.load_fc100(root, splits=("train", "test"), verify=data.verify)
        train = d.split == "train"
        return Pools(
            d.images[train], d.labels[train], d.images[~train], d.labels[~train], "FC100 (train / test superclasses)"
        )
    images, labels = _npz(data)
    return _split(
        images, labels, "images" if mode == "auto" else mode, data.held_fraction, seed, f"npz file {data.path}"
    )


def pools_sha256(pools: Pools) -> str:
    """A digest of the pools' content (what the tasks are drawn from, whatever file it came from)."""
    return metaif.data._source.arrays_sha256(pools._asdict(), skip=("source",))


def check_pools(config: Config, pools: Pools, where: str = "config") -> None:
    """ConfigError naming the limit when a pool cannot supply `ways` classes of `shots + queries`
    images each (training tasks from the meta-training pool; target and test tasks from the
    held-out pool)."""
    t = config.tasks
    need = t.shots + t.queries
    for labels, role in (
        (pools.train_labels, "meta-training pool (the [tasks] train tasks)"),
        (pools.held_labels, "held-out pool (the [tasks] target and test tasks)"),
    ):
        classes, counts = np.unique(labels, return_counts=True)
        if counts.size == 0:
            raise ConfigError(
                f"{where}: the {role} of {pools.source} is empty. Lower [data] held_fraction "
                'or use held_out = "images".'
            )
        if need > counts.min():
            fewest = int(classes[np.argmin(counts)])
            limit = (
                "every class has " if counts.min() == counts.max() else f"its smallest class ({fewest}) has "
            ) + f"{counts.min()} images"
            raise ConfigError(
                f"{where}: [tasks] shots + queries = {t.shots} + {t.queries} = {need} images per class, but "
                f"in the {role} of {pools.source} {limit}. Set shots + queries <= {counts.min()}."
            )
        if t.ways > classes.size:
            raise ConfigError(
                f"{where}: [tasks] ways = {t.ways}, but the {role} of {pools.source} has {classes.size:,} "
                f"classes. Set ways <= {classes.size}."
            )


def dtype(model_config) -> np.dtype:
    """The float dtype of a run's model and data: float32 for conv4 (real networks), float64 otherwise."""
    return np.dtype(np.float32 if model_config.kind == "conv4" else np.float64)


def build_data(config: Config, pools: Pools | None = None) -> dict[str, np.ndarray]:
    """Tasks in feature space (conv4: the images themselves), corruption masks, the raw support
    images (for plots) and the PCA."""
    pools = load_pools(config) if pools is None else pools
    check_pools(config, pools)
    t = config.tasks
    features = None
    if config.model.features:
        try:
            features = metaif.data.fit_pca(pools.train_images, config.model.features)
        except ValueError as error:  # too many components for the images, or images without variation
            raise ConfigError(
                f"[model] features = {config.model.features} (PCA components of {pools.source}): {error} "
                "Set [model] features lower, or to 0 to use the raw pixels."
            ) from None
    if features is not None:
        embed = lambda x: np.asarray(features(x), np.float64)
    elif config.model.kind == "conv4":
        embed = lambda x: np.asarray(x, np.float32)  # [n, k, H, W(, C)]
    else:
        embed = lambda x: np.asarray(x, np.float64).reshape(*x.shape[:2], -1)
    sample = lambda images, labels, n, seed: metaif.data.few_shot_tasks(
        images, labels, n, t.ways, t.shots, t.queries, seed
    )
    train = sample(pools.train_images, pools.train_labels, t.train, 1000 * t.seed + 1)
    # the dataset class of each task label (e.g. the digit), for the CSVs and plots
    classes = metaif.data.few_shot_indices(
        pools.train_labels, t.train, t.ways, t.shots, t.queries, 1000 * t.seed + 1
    ).classes
    clean_support, clean_query = (np.asarray(part["y"]).copy() for part in (train.support, train.query))
    train, task_mask = metaif.data.corrupt(train, t.corrupt_tasks, "task", seed=1000 * t.seed + 7, n_classes=t.ways)
    train, flip_mask = metaif.data.corrupt(train, t.flip_support, "support", seed=1000 * t.seed + 8, n_classes=t.ways)
    target = sample(pools.held_images, pools.held_labels, t.target, 1000 * t.seed + 2)
    test = sample(pools.held_images, pools.held_labels, t.test, 1000 * t.seed + 3)
    support_images = np.asarray(train.support["x"])
    out = {
        "train_sx": embed(train.support["x"]),
        "train_sy": np.asarray(train.support["y"], np.int32),
        "train_qx": embed(train.query["x"]),
        "train_qy": np.asarray(train.query["y"], np.int32),
        "target_sx": embed(target.support["x"]),
        "target_sy": np.asarray(target.support["y"], np.int32),
        "target_qx": embed(target.query["x"]),
        "target_qy": np.asarray(target.query["y"], np.int32),
        "test_sx": embed(test.support["x"]),
        "test_sy": np.asarray(test.support["y"], np.int32),
        "test_qx": embed(test.query["x"]),
        "test_qy": np.asarray(test.query["y"], np.int32),
        "clean_support_y": clean_support.astype(np.int32),
        "clean_query_y": clean_query.astype(np.int32),
        "train_classes": classes.astype(np.int64),
        "task_mask": task_mask,
        "flip_mask": flip_mask,
        "support_images": np.round(np.clip(support_images, 0, 1) * 255).astype(np.uint8),
        "source": np.asarray(pools.source),
        "n_pool_images": np.asarray([pools.train_labels.size, pools.held_labels.size]),
    }
    return out


def task_set(data: dict, name: str, dtype=jnp.float64) -> metaif.TaskSet:
    part = lambda p: {
        "x": jnp.asarray(data[f"{name}_{p}x"], dtype),
        "y": jnp.asarray(data[f"{name}_{p}y"], jnp.int32),
    }
    return metaif.TaskSet(part("s"), part("q"))


# ----------------------------------------------------------------------------- model


class Model(NamedTuple):
    problem: metaif.BilevelProblem
    init: Callable[[int], Any]  # seed -> meta_params
    logits: Callable | None  # (params, x [k, D]) -> [k, ways]
    n_params: int
    source_sha256: str  # of the Python model file ("" for the built-in models)
    predict: Callable | None  # (params, meta_params, example) -> logits, for metaif.task_accuracies
    dtype: np.dtype  # of the meta-parameters and the inputs


def _logits_of_example(logits, params, meta_params, example):
    return logits(params, example["x"])


def _model_source(model_config) -> bytes:
    """The bytes of a kind = "python" model file (b"" for the built-in MLP)."""
    if model_config.kind != "python":
        return b""
    file = Path(model_config.module).expanduser()
    if not file.is_file():
        raise ConfigError(
            f'[model] module = "{model_config.module}" does not exist as a file. Give the path of a .py file '
            "defining init(key, n_inputs, ways) -> params, loss(params, meta_params, example) -> scalar and "
            "optionally logits(params, x) -> [ways]."
        )
    return file.read_bytes()


def _python_model(path: str, source: bytes):
    """Execute the model file's `source` (the bytes its fingerprint was taken of) as a module."""
    file = Path(path).expanduser()
    spec = importlib.util.spec_from_loader(
        f"metaif_user_model_{hashlib.sha256(source).hexdigest()[:8]}", loader=None, origin=str(file)
    )
    assert spec is not None  # a spec without a loader is always made
    module = importlib.util.module_from_spec(spec)
    module.__file__ = str(file)
    exec(compile(source, str(file), "exec"), module.__dict__)
    for name in ("init", "loss"):
        if not callable(getattr(module, name, None)):
            raise ValueError(
                f"[model] module {str(file)!r} must define a function {name}(...); it defines "
                f"{sorted(n for n in vars(module) if not n.startswith('_'))}."
            )
    return module


def build_model(model_config, input_shape: int | tuple[int, ...], ways: int) -> Model:
    """The bilevel problem of the [model] section on examples of `input_shape` (an int: flat
    vectors); a Python model file is read (and executed) anew, so an edited file is never served
    from the cache of an earlier call."""
    shape = (input_shape,) if isinstance(input_shape, int) else tuple(int(k) for k in input_shape)
    return _build_model(model_config, shape, ways, _model_source(model_config))


def _conv4(model_config, image_shape: tuple[int, ...], ways: int, seed: int):
    """The conv4 model as a `metaif.models.PureModel`; 2×2 pooling rounds down (the standard) when
    the images are large enough for four poolings, else up (small images such as 8×8 digits)."""
    from flax import nnx

    m = model_config
    options = dict(filters=m.filters, norm=None if m.norm == "none" else m.norm, groups=CONV4_GROUPS)
    large = min(image_shape[:2]) >= 16
    try:
        module = metaif.models.Conv4(
            image_shape, ways, **options, pool_padding="VALID" if large else "SAME", rngs=nnx.Rngs(seed)
        )
    except ValueError as error:
        raise ConfigError(f'[model] kind = "conv4" on images of shape {image_shape}: {error}') from None
    return metaif.models.from_nnx(module)


@functools.lru_cache(maxsize=None)
def _build_model(model_config, input_shape: tuple[int, ...], ways: int, source: bytes) -> Model:
    m = model_config
    n_inputs = int(np.prod(input_shape))
    if m.adapt == "maml":
        adapt = metaif.Unrolled(steps=m.inner_steps, lr=m.inner_lr)
    else:  # conv4 is too large for dense inner solves: conjugate gradients, matrix-free
        adapt = metaif.Proximal(
            reg=m.prox_reg, steps=m.inner_steps, lr=m.inner_lr, inner_solve="cg" if m.kind == "conv4" else "dense"
        )
    if m.kind == "mlp":
        sizes = (n_inputs, *m.hidden, ways)
        loss, logits = problems.mlp_cross_entropy, problems.mlp_logits
        init = lambda seed: problems.mlp_init(jax.random.key(seed), sizes)
    elif m.kind == "conv4":
        pure = _conv4(m, input_shape, ways, 0)
        loss, logits = pure.cross_entropy, pure.apply
        init = lambda seed: pure.params if seed == 0 else _conv4(m, input_shape, ways, seed).params
    else:
        module = _python_model(m.module, source)
        loss, logits = module.loss, getattr(module, "logits", None)
        init = lambda seed: jax.tree.map(
            lambda x: jnp.asarray(x, jnp.float64), module.init(jax.random.key(seed), n_inputs, ways)
        )
    problem = metaif.BilevelProblem(loss, loss, adapt, meta_reg=m.meta_reg)
    size = sum(int(np.size(x)) for x in jax.tree.leaves(jax.eval_shape(lambda: init(0))))
    predict = None if logits is None else functools.partial(_logits_of_example, logits)
    digest = hashlib.sha256(source).hexdigest() if source else ""
    return Model(problem, init, logits, size, digest, predict, dtype(m))


def _per_task(fn: Callable, tasks, chunk_size: int | None):
    """[n, ...] values of fn(one-task TaskSet) -> [1, ...], `chunk_size` tasks at a time (lax.map;
    None: all at once). Traceable."""
    one = lambda task: jax.tree.map(lambda x: x[0], fn(jax.tree.map(lambda x: x[None], task)))
    return _batching.map_tasks(one, tasks, chunk_size)


@functools.partial(jax.jit, static_argnames=("problem", "predict", "chunk_size"))
def _accuracies(problem, predict, meta_params, tasks, chunk_size):
    return _per_task(lambda t: metaif.task_accuracies(problem, meta_params, t, predict), tasks, chunk_size)


def accuracy(model: Model, meta_params, tasks, chunk_size: int | None = None) -> float:
    """Mean query accuracy after adaptation, `chunk_size` tasks at a time (nan without logits)."""
    if model.predict is None:
        return float("nan")
    return float(_accuracies(model.problem, model.predict, meta_params, tasks, chunk_size).mean())


_train_steps = jax.jit(core.train_steps, static_argnames=("optimizer", "steps", "minibatch", "chunk_size"))


_value_and_grad = jax.jit(core.value_and_grad, static_argnames=("chunk_size",))
# Scores of a chunk of tasks given v = H⁻¹∇f, as in metaif.influence (n_tasks: the whole set's n).
_chunk_scores = jax.jit(core.target_scores, static_argnames=("chunk_size", "n_tasks"))


# ----------------------------------------------------------------------------- the run


def max_rss_bytes() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def with_rss(arrays: dict) -> dict:
    """arrays plus the process's peak memory so far, saved with a checkpoint so that a resumed run
    reports the memory measured when the stage was computed."""
    return {**arrays, "max_rss": np.asarray(max_rss_bytes())}


@dataclasses.dataclass
class Cost:
    """What a stage cost when it was computed (kept in its checkpoints), and whether this command reused it."""

    label: str
    seconds: float
    max_rss: float  # bytes; nan for checkpoints written before it was recorded
    reused: int  # checkpoints (chunks) reused by this command
    parts: int = 1  # checkpoints (chunks) of the stage


@dataclasses.dataclass
class Context:
    config: Config
    store: Store
    ui: UI
    code: str
    costs: dict = dataclasses.field(default_factory=dict)

    def record(self, name: str, label: str, parts: list[dict], reused: int) -> None:
        if not parts:  # a stage with nothing to do (e.g. no leave-one-out sample)
            return
        rss = [float(p["max_rss"]) for p in parts if "max_rss" in p]
        self.costs[name] = Cost(
            label,
            float(sum(float(p.get("seconds", np.nan)) for p in parts)),
            max(rss) if rss else float("nan"),
            reused,
            len(parts),
        )


def _stage(ctx: Context, name: str, label: str, fp: str, compute, total: int | None = None) -> dict[str, np.ndarray]:
    """A checkpointed stage with a progress display; compute(advance) -> dict of arrays."""
    cached = ctx.store.load(name, fp)
    if cached is not None:
        ctx.store.log("reused", name)
        ctx.ui.reused(label)
        ctx.record(name, label, [cached], 1)
        return cached
    with ctx.ui.progress(label, total) as advance:
        start = time.perf_counter()
        arrays = {k: np.asarray(v) for k, v in compute(advance).items()}
        arrays["seconds"] = np.asarray(time.perf_counter() - start)
    arrays = with_rss(arrays)
    ctx.store.save(name, fp, arrays)
    ctx.store.log("computed", name, seconds=round(float(arrays["seconds"]), 3))
    ctx.record(name, label, [arrays], 0)
    return arrays


def _chunk_progress(ui: UI, label: str, total: int, done: int):
    """The progress bar of a chunked stage; the "reused" line when every chunk is saved; nothing when empty."""
    if total and done == total:
        ui.reused(label)
    if done == total:
        return contextlib.nullcontext(lambda k=1: None)
    return ui.progress(label, total, done)


def _chunks(total: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, total)) for start in range(0, total, size)]


def _adam(ctx: Context, model: Model, tasks, fp: str) -> dict[str, np.ndarray]:
    """Adam (full-batch, or on task minibatches), checkpointed every `checkpoint_every` steps
    (resumes mid-training)."""
    cfg = ctx.config.train
    name = "train_adam"
    optimizer = _optimizer(cfg.adam_lr)
    init = model.init(cfg.seed)
    with jax.numpy_dtype_promotion("standard"):
        state_like = optimizer.init(init)
    saved = ctx.store.load(name, fp)
    label = f"Meta-training: Adam, {cfg.adam_steps} steps"
    if saved is not None and int(saved["done"]) == cfg.adam_steps:
        ctx.store.log("reused", name)
        ctx.ui.reused(label)
        ctx.record(name, label, [saved], 1)
        return saved
    if saved is not None:
        params, opt_state = load_tree("p", saved, init), load_tree("s", saved, state_like)
        key = jax.random.wrap_key_data(jnp.asarray(saved["key"]))
        done, losses, norms, seconds = (
            int(saved["done"]),
            list(saved["losses"]),
            list(saved["grad_norms"]),
            float(saved["seconds"]),
        )
        ctx.store.log("resumed", name, step=done)
    else:
        params, opt_state, key, done, losses, norms, seconds = (
            init,
            state_like,
            jax.random.key(cfg.seed),
            0,
            [],
            [],
            0.0,
        )
    weights = metaif.Weights.ones(tasks.n_tasks, tasks.n_support, tasks.n_query, model.dtype)
    earlier_rss = float(saved.get("max_rss", np.nan)) if saved is not None else np.nan
    with ctx.ui.progress(label, cfg.adam_steps, done) as advance:
        while done < cfg.adam_steps:
            start = time.perf_counter()
            length = min(cfg.checkpoint_every, cfg.adam_steps - done)
            key, sub = jax.random.split(key)
            params, opt_state, v, g = _train_steps(
                model.problem,
                optimizer,
                params,
                opt_state,
                tasks,
                weights,
                steps=length,
                key=sub,
                minibatch=cfg.minibatch or None,
                chunk_size=cfg.chunk or None,
            )
            losses += np.asarray(v).tolist()
            norms += np.asarray(g).tolist()
            done += length
            seconds += time.perf_counter() - start
            arrays = {
                **save_tree("p", params),
                **save_tree("s", opt_state),
                "key": np.asarray(jax.random.key_data(key)),
                "done": np.asarray(done),
                "losses": np.asarray(losses),
                "grad_norms": np.asarray(norms),
                "seconds": np.asarray(seconds),
                "max_rss": np.asarray(np.fmax(earlier_rss, max_rss_bytes())),
            }
            ctx.store.save(name, fp, arrays)
            ctx.store.log("checkpoint", name, step=done)
            advance(length)
    if not np.isfinite(losses[-1]):
        raise ValueError(f"meta-training diverged (F = {losses[-1]}): lower [train] adam_lr or [model] inner_lr.")
    ctx.store.log("computed", name, seconds=round(seconds, 3))
    ctx.record(name, label, [arrays], 0)
    return {k: np.asarray(v) for k, v in arrays.items()}


@functools.lru_cache(maxsize=None)
def _optimizer(lr: float):
    return optax.adam(lr)


class Setup(NamedTuple):
    """The model and task sets of a run, checked before any heavy work."""

    model: Model
    train: metaif.TaskSet
    target: metaif.TaskSet
    test: metaif.TaskSet
    estimate: dict


def setup(config: Config, data: dict, memory_limit_bytes: float | None = None) -> Setup:
    """The model on the built tasks, checked as the run checks it before training (`metaif run
    --check` runs the same): the model file loads, its loss is a scalar on a real task, and the
    memory estimate fits."""
    train, target, test = (task_set(data, k, dtype(config.model)) for k in ("train", "target", "test"))
    input_shape = tuple(int(k) for k in data["train_sx"].shape[2:])
    model = build_model(config.model, input_shape, config.tasks.ways)
    problem = model.problem
    jax.eval_shape(
        lambda lam: metaif.meta_objective(problem, lam, train), model.init(0)
    )  # e.g. a non-scalar loss fails here
    estimate = memory.check(
        config, input_shape, model.n_params, train.n_tasks, train.n_support, train.n_query, memory_limit_bytes
    )
    return Setup(model, train, target, test, estimate)


def _settings(config: Config) -> dict:
    """The config sections as they enter fingerprints: without what cannot change a result (file
    locations, whose content is fingerprinted instead; checkpoint_every; keys of a method not used)."""
    sec = config.to_dict()
    drop = {
        "model": {"module"}
        | ({"prox_reg"} if config.model.adapt != "imaml" else set())
        | ({"hidden"} if config.model.kind != "mlp" else set())
        | ({"filters", "norm"} if config.model.kind != "conv4" else set()),
        "train": {"checkpoint_every"},
        "influence": {"cg_maxiter"} if config.influence.solver != "cg" else set(),
    }
    return {name: {k: v for k, v in values.items() if k not in drop.get(name, ())} for name, values in sec.items()}


def run(config: Config, out: Path, ui: UI, memory_limit_bytes: float | None = None) -> dict:
    """Run (or resume) every stage; returns the results dict the report is made from."""
    out = Path(out)
    store = Store(out)
    code = code_version()
    ctx = Context(config, store, ui, code)
    sec = _settings(config)
    after = store.sha256  # the content of a finished upstream checkpoint

    # ---- data: keyed on the content of the loaded images and labels, not on where they came from
    pools = load_pools(config)
    fp_data = fingerprint(
        "data", pools_sha256(pools), sec["tasks"], sec["model"]["features"], str(dtype(config.model)), code
    )
    build = functools.partial(build_data, config, pools)
    data = _stage(ctx, "data", f"Data: {config.data.dataset} tasks", fp_data, lambda advance, build=build: build())
    data = {**data, "source": np.asarray(pools.source)}
    del pools, build  # the raw images are not needed past this point
    prepared = setup(config, data, memory_limit_bytes)
    model, train, target_tasks, test, estimate = (
        prepared.model,
        prepared.train,
        prepared.target,
        prepared.test,
        prepared.estimate,
    )
    problem = model.problem
    n, m, q = train.n_tasks, train.n_support, train.n_query
    chunk_size = config.influence.batch_size or None  # tasks at a time inside influence and evaluation

    # ---- meta-training
    t = sec["train"]
    fp_adam = fingerprint(
        "adam",
        after("data"),
        sec["model"],
        model.source_sha256,
        [t[k] for k in ("adam_steps", "adam_lr", "seed", "minibatch", "chunk")],
        code,
    )
    adam = _adam(ctx, model, train, fp_adam)
    adam_params = load_tree("p", adam, model.init(0))

    def newton(advance):
        if config.train.newton_steps == 0:
            value, grad = _value_and_grad(problem, adam_params, train, chunk_size=config.train.chunk or None)
            result = metaif.TrainResult(
                adam_params, jnp.zeros(0), jnp.zeros(0), value, optax.tree_utils.tree_norm(grad)
            )
        else:
            result = metaif.newton_refine(problem, adam_params, train, steps=config.train.newton_steps)
        return {
            **save_tree("p", result.meta_params),
            "objective": result.objective,
            "grad_norm": result.grad_norm,
            "grad_norms": result.grad_norms,
        }

    fp_newton = fingerprint("newton", after("train_adam"), t["newton_steps"], code)
    refined = _stage(
        ctx, "train_newton", f"Meta-training: exact Newton, {config.train.newton_steps} steps", fp_newton, newton
    )
    lam = load_tree("p", refined, model.init(0))
    target = _target_fn(problem, target_tasks, chunk_size)

    def evaluate(advance):
        return {
            "train_accuracy": accuracy(model, lam, train, chunk_size),
            "test_accuracy": accuracy(model, lam, test, chunk_size),
            "target_loss": float(target(lam)),
            "adam_target_loss": float(target(adam_params)),
            "adam_test_accuracy": accuracy(model, adam_params, test, chunk_size),
        }

    evaluated = _stage(
        ctx,
        "evaluate",
        "Evaluate: held-out loss and test accuracy",
        fingerprint("evaluate", after("train_newton"), code),
        evaluate,
    )

    # ---- influence: one solve v = H⁻¹∇f (and the Hessian's extreme eigenvalues), then scores by chunk
    solver = _solver(config)

    def solve(advance):
        op = metaif.hessian_operator(problem, lam, train, chunk_size=chunk_size)
        if model.n_params <= DENSE_SPECTRUM:  # exact: eigenvalues of the materialised Hessian
            values = np.linalg.eigvalsh(np.asarray(op.to_dense()))
            spectrum = {
                "smallest": values[:3],
                "smallest_residuals": np.zeros(min(3, values.size)),
                "largest": values[-1:],
                "spectrum_method": "dense eigh",
            }
        else:
            low = metaif.solvers.lanczos_eigenvalues(op, k=min(3, model.n_params), which="smallest")
            high = metaif.solvers.lanczos_eigenvalues(op, k=1, which="largest")
            spectrum = {
                "smallest": low.values,
                "smallest_residuals": low.residuals,
                "largest": high.values,
                "spectrum_method": "Lanczos",
            }
        v, info = solver.solve(solver.prepare(op), jax.grad(target)(lam))
        return {**save_tree("v", v), **spectrum, **{f"info_{k}": np.asarray(x) for k, x in info._asdict().items()}}

    fp_solve = fingerprint(
        "solve", after("train_newton"), {k: v for k, v in sec["influence"].items() if k != "chunk"}, code
    )
    solved = _stage(
        ctx,
        "solve",
        f"Influence: Hessian and inverse-Hessian solve ({config.influence.solver}, d = {model.n_params})",
        fp_solve,
        solve,
    )
    spectrum = {**solved, **evaluated}
    v = load_tree("v", solved, lam)

    chunks = _chunks(n, config.influence.chunk)
    fp_scores = fingerprint("scores", after("solve"), sec["influence"]["chunk"], code)
    parts = []
    todo = {i for i in range(len(chunks)) if store.load(f"scores_{i:04d}", fingerprint(fp_scores, i)) is None}
    label = f"Influence: task and instance scores, {len(chunks)} chunk(s) of tasks"
    with _chunk_progress(ui, label, len(chunks), len(chunks) - len(todo)) as advance:
        for i, (lo, hi) in enumerate(chunks):

            def compute(lo=lo, hi=hi):
                sub = jax.tree.map(lambda x: x[lo:hi], train)
                t_, a_, b_ = _chunk_scores(problem, lam, sub, v, chunk_size=chunk_size, n_tasks=n)
                return with_rss({"tasks": t_, "support": a_, "query": b_})

            parts.append(store.cached(f"scores_{i:04d}", fingerprint(fp_scores, i), compute))
            if i in todo:
                advance()
    ctx.record("scores", label, parts, len(chunks) - len(todo))
    scores = {level: np.concatenate([p[level] for p in parts]) for level in LEVELS}

    # ---- baseline
    fp_base = fingerprint("baseline", after("train_newton"), code)
    base = _stage(
        ctx,
        "baseline",
        "Baseline: raw loss after adaptation",
        fp_base,
        lambda advance: _raw_loss(problem, lam, train, chunk_size),
    )
    baseline = {level: base[level] for level in LEVELS}

    # ---- leave-one-out check of a random sample
    c = config.check
    rng = np.random.default_rng(1000 * config.tasks.seed + 11)
    samples = {"tasks": np.sort(rng.choice(n, min(c.tasks, n), replace=False))}
    for level, size in (("support", m), ("query", q)):
        count = min(getattr(c, level), n * size)
        flat = np.sort(rng.choice(n * size, count, replace=False))
        samples[level] = np.stack(np.divmod(flat, size), axis=1)
    fp_loo = fingerprint("loo", after("train_newton"), sec["check"], code)
    loo: dict[str, list] = {}
    jobs = [(level, i, lo, hi) for level in LEVELS for i, (lo, hi) in enumerate(_chunks(len(samples[level]), c.chunk))]
    fresh = {(lv, i): store.load(f"loo_{lv}_{i:04d}", fingerprint(fp_loo, lv, i)) is None for lv, i, _, _ in jobs}
    label = f"Check: leave-one-out retraining of {sum(len(s) for s in samples.values())} sampled data"
    with _chunk_progress(
        ui, label, sum(hi - lo for _, _, lo, hi in jobs), sum(hi - lo for lv, i, lo, hi in jobs if not fresh[lv, i])
    ) as advance:
        for level, i, lo, hi in jobs:

            def compute_loo(level=level, lo=lo, hi=hi):
                change, norm = evaluation.leave_one_out(
                    problem,
                    lam,
                    train,
                    level,
                    samples[level][lo:hi],
                    target,
                    steps=c.retrain_steps,
                    chunk_size=c.batch_size,
                )
                return with_rss({"change": change, "grad_norm": norm})

            loo.setdefault(level, []).append(
                store.cached(f"loo_{level}_{i:04d}", fingerprint(fp_loo, level, i), compute_loo)
            )
            if fresh[level, i]:
                advance(hi - lo)
    ctx.record("loo", label, [p for parts_ in loo.values() for p in parts_], sum(not f for f in fresh.values()))
    actual = {
        level: np.concatenate([p["change"] for p in loo[level]]) if loo.get(level) else np.zeros(0) for level in LEVELS
    }
    loo_norms = {
        level: np.concatenate([p["grad_norm"] for p in loo[level]]) if loo.get(level) else np.zeros(0)
        for level in LEVELS
    }
    predicted = {
        level: -(
            scores[level][samples[level]]
            if level == "tasks"
            else scores[level][samples[level][:, 0], samples[level][:, 1]]
        )
        for level in LEVELS
    }

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
        infl = metaif.influence(problem, lam, train, solver=edit_solver, chunk_size=chunk_size)
        removed = {"tasks": remove_tasks, "support": remove_support}
        edited = evaluation.edit(lam, infl, removed, problem=problem, tasks=train)
        weights = [
            evaluation.remaining_weights(train, r) for r in (removed, {"tasks": base_tasks, "support": base_support})
        ]
        # padded to the leave-one-out chunk size, with its steps, so the compiled retraining is reused
        weights += weights[-1:] * max(0, c.chunk - len(weights))
        batch = metaif.Weights(*(jnp.stack(w) for w in zip(*weights)))
        retrained = evaluation.retrain(problem, lam, train, batch, steps=c.retrain_steps, chunk_size=c.batch_size)
        pick = lambda i: jax.tree.map(lambda x: x[i], retrained.meta_params)
        out = {
            **save_tree("edit", edited.meta_params),
            **save_tree("retrain", pick(0)),
            **save_tree("retrain_base", pick(1)),
            "edit_grad_norm": edited.grad_norm,
            "retrain_grad_norm": retrained.grad_norm[:2],
        }
        for key, params in (
            ("before", lam),
            ("edit", edited.meta_params),
            ("retrain", pick(0)),
            ("retrain_base", pick(1)),
        ):
            out[f"target_{key}"] = float(target(params))
            out[f"test_accuracy_{key}"] = accuracy(model, params, test, chunk_size)
        return out

    fp_edit = fingerprint(
        "edit",
        [after(f"scores_{i:04d}") for i in range(len(chunks))],
        after("baseline"),
        sec["edit"],
        sec["check"]["retrain_steps"],
        code,
    )
    edited = None
    if k_tasks + k_support:
        edited = _stage(
            ctx, "edit", f"Edit: remove {k_tasks} tasks + {k_support} support examples, vs retraining", fp_edit, edit
        )

    return dict(
        config=config,
        model=model,
        data=data,
        n=n,
        m=m,
        q=q,
        d=model.n_params,
        adam=adam,
        refined=refined,
        spectrum=spectrum,
        solved=solved,
        scores=scores,
        baseline=baseline,
        samples=samples,
        actual=actual,
        loo_norms=loo_norms,
        predicted=predicted,
        edited=edited,
        remove_tasks=remove_tasks,
        remove_support=remove_support,
        base_tasks=base_tasks,
        base_support=base_support,
        costs=ctx.costs,
        estimate=estimate,
        code=code,
    )


def _solver(config: Config):
    i = config.influence
    damping = None if isinstance(i.damping, str) else i.damping  # "auto": the solvers' default, curvature-aware δ
    if i.solver == "dense":
        return metaif.solvers.Dense(damping=damping)
    return metaif.solvers.CG(damping=damping, maxiter=i.cg_maxiter)


def _target_fn(problem, tasks, chunk_size: int | None = None) -> Callable:
    """λ ↦ mean query loss over the held-out target tasks, `chunk_size` tasks at a time (jitted,
    one object per task set)."""

    @jax.jit
    def target(meta_params):
        return jnp.mean(_per_task(lambda t: metaif.task_losses(problem, meta_params, t), tasks, chunk_size))

    return target


def _raw_loss(problem, meta_params, tasks, chunk_size: int | None) -> dict[str, np.ndarray]:
    """The raw-loss baseline's task, support and query scores, `chunk_size` tasks per call."""
    parts = [
        evaluation.baselines.raw_loss(problem, meta_params, jax.tree.map(lambda x: x[lo:hi], tasks))[:3]
        for lo, hi in _chunks(tasks.n_tasks, chunk_size or tasks.n_tasks)
    ]
    return {level: np.concatenate([np.asarray(p[i]) for p in parts]) for i, level in enumerate(LEVELS)}
