"""The run configuration of `metaif demo` / `metaif run CONFIG.toml`: sections of typed keys with
defaults (the defaults are the built-in demo), loaded from TOML and validated with errors that say
what is wrong and list the valid keys."""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from pathlib import Path
from typing import Any

DATASETS = ("digits", "mnist", "omniglot", "mini-imagenet", "fc100", "npz")


class ConfigError(ValueError):
    """A configuration file or value a person has to fix (shown without a traceback)."""


@dataclasses.dataclass(frozen=True)
class Data:
    dataset: str = "digits"  # digits | mnist | omniglot | mini-imagenet | fc100 | npz
    root: str = ""  # data folder (default $METAIF_DATA); not needed for digits
    path: str = ""  # npz: file with images [N, H, W(, C)] and labels [N]
    sha256: str = ""  # npz: expected sha256 of the file (checked when given)
    image_size: int = 0  # omniglot / mini-imagenet resize (0: the loader's default)
    verify: bool = True  # check the dataset files' checksums
    held_out: str = "auto"  # auto | classes | images: how held-out tasks are kept apart
    held_fraction: float = 0.4  # fraction of classes or images held out (when not official)


@dataclasses.dataclass(frozen=True)
class Tasks:
    ways: int = 5
    shots: int = 2  # support examples per class
    queries: int = 3  # query examples per class
    train: int = 50  # meta-training tasks (their influence is computed)
    target: int = 50  # held-out tasks whose mean query loss is the influence target
    test: int = 100  # separate held-out tasks for reported accuracy
    corrupt_tasks: float = 0.2  # fraction of training tasks whose labels are randomised
    flip_support: float = 0.1  # fraction of support labels flipped to another class
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Model:
    kind: str = "mlp"  # mlp | conv4 | python
    features: int = 12  # whitened PCA components of the pixels (0: raw pixels; conv4: always 0)
    hidden: tuple = (6,)  # tanh MLP hidden widths ([] : linear softmax)
    filters: int = 32  # conv4: channels of every conv layer (64 in the standard network)
    norm: str = "group"  # conv4: group (4 channel groups) | layer | none, per example
    module: str = (
        ""  # python: a .py file with init(key, n_inputs, ways), loss(params, meta_params, example), logits(params, x)
    )
    adapt: str = "maml"  # maml (Unrolled) | imaml (Proximal)
    inner_steps: int = 1
    inner_lr: float = 0.5
    prox_reg: float = 2.0  # imaml proximal strength
    meta_reg: float = 1e-2  # (meta_reg/2)·‖λ‖² in the meta-objective


@dataclasses.dataclass(frozen=True)
class Train:
    adam_steps: int = 1000
    adam_lr: float = 1e-2
    newton_steps: int = 20  # exact Newton polish to a stationary point (0: skip)
    checkpoint_every: int = 250  # Adam steps between checkpoints
    minibatch: int = 0  # tasks per Adam step, drawn without replacement (0: all tasks)
    chunk: int = 0  # tasks per chunk of each meta-gradient (lax.map; 0: all at once; conv4 default 1)
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Influence:
    solver: str = "dense"  # dense | cg
    damping: float | str = 0.0  # δ >= 0, or "auto": the solvers' default (curvature-aware) δ
    batch_size: int = 0  # tasks per vmapped batch inside a computation (0: all at once; conv4 default 1)
    chunk: int = 25  # tasks per saved chunk of scores
    cg_maxiter: int = 200


@dataclasses.dataclass(frozen=True)
class Check:
    tasks: int = 12  # leave-one-out retrainings per level (random sample)
    support: int = 12
    query: int = 12
    retrain_steps: int = 40  # most warm-started trust-region Newton steps per retraining (stops at ‖∇F‖ ≤ 1e-10)
    chunk: int = 12  # retrainings per saved chunk
    batch_size: int = 12  # retrainings vmapped at a time


@dataclasses.dataclass(frozen=True)
class Edit:
    tasks: float = 0.1  # fraction of training tasks removed (the highest task-IF)
    support: float = 0.02  # fraction of support examples removed (highest instance-IF)
    damping: float = 0.1  # solver damping δ of the edit's I_λ (undamped edits overshoot along flat directions)


@dataclasses.dataclass(frozen=True)
class Report:
    top_k: int = 8
    plots: bool = True


@dataclasses.dataclass(frozen=True)
class Run:
    memory_limit_gb: float = 0.0  # 0: the memory available now
    name: str = "demo"  # the run folder runs/<name> when there is no --out (one folder name)


@dataclasses.dataclass(frozen=True)
class Config:
    data: Data = Data()
    tasks: Tasks = Tasks()
    model: Model = Model()
    train: Train = Train()
    influence: Influence = Influence()
    check: Check = Check()
    edit: Edit = Edit()
    report: Report = Report()
    run: Run = Run()

    def section(self, name: str) -> dict:
        return dataclasses.asdict(getattr(self, name))

    def to_dict(self) -> dict:
        return {f.name: self.section(f.name) for f in dataclasses.fields(self)}


DEMO = Config()
# `metaif demo --quick`: the demo without the two stages that retrain (the leave-one-out check and the
# edit), which take most of its time; the scores are the demo's.
QUICK = dataclasses.replace(
    DEMO,
    check=dataclasses.replace(DEMO.check, tasks=0, support=0, query=0),
    edit=dataclasses.replace(DEMO.edit, tasks=0.0, support=0.0),
    run=dataclasses.replace(DEMO.run, name="demo-quick"),
)
SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
_CLASSES = {f.name: type(getattr(DEMO, f.name)) for f in dataclasses.fields(Config)}
CHOICES = {
    ("data", "dataset"): DATASETS,
    ("data", "held_out"): ("auto", "classes", "images"),
    ("model", "kind"): ("mlp", "conv4", "python"),
    ("model", "norm"): ("group", "layer", "none"),
    ("model", "adapt"): ("maml", "imaml"),
    ("influence", "solver"): ("dense", "cg"),
}
# Step sizes and strengths that must be > 0, with what a value <= 0 would do.
POSITIVE = {
    ("train", "adam_lr"): "A learning rate <= 0 trains by gradient ascent or not at all.",
    ("model", "inner_lr"): "The inner step size must be > 0 for adaptation to descend the support loss.",
    ("model", "prox_reg"): "The proximal strength must be > 0 for the imaml inner problem to have a unique minimiser.",
}
# Keys that also take the string "auto" (see the key's comment).
AUTO = {("influence", "damping")}
# Defaults that depend on [model] kind, for keys the file leaves out: conv4 reads raw images (no PCA),
# and takes its tasks one at a time (vmapping per-task conv weights over tasks makes grouped
# convolutions, several times slower on CPU than a lax.map over tasks).
KIND_DEFAULTS = {"conv4": {("model", "features"): 0, ("train", "chunk"): 1, ("influence", "batch_size"): 1}}
CONV4_GROUPS = 4  # channel groups of [model] norm = "group"
FRACTIONS = {
    ("tasks", "corrupt_tasks"),
    ("tasks", "flip_support"),
    ("data", "held_fraction"),
    ("edit", "tasks"),
    ("edit", "support"),
}


def _valid_keys(section: str) -> str:
    cls = _CLASSES[section]
    parts = []
    for f in dataclasses.fields(cls):
        default = getattr(cls(), f.name)
        shown = list(default) if isinstance(default, tuple) else default
        parts.append(f"{f.name} (default {shown!r})")
    return ", ".join(parts)


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _coerce(where: str, key: str, value: Any, default: Any) -> Any:
    """value converted to the type of `default`, or a ConfigError naming the key."""
    auto = tuple(key.split(".")) in AUTO
    if auto and value == "auto":
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, tuple):
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
        value = tuple(value) if ok else value
    else:  # pragma: no cover
        ok = True
    if not ok:
        expected = {
            bool: "true or false",
            int: "an integer",
            float: "a number",
            str: "a string",
            tuple: "a list of positive integers, e.g. [16, 8]",
        }[type(default)] + (' or "auto"' if auto else "")
        raise ConfigError(
            f"{where}: [{key.split('.')[0]}] {key.split('.')[1]} must be {expected}; "
            f"received {value!r} ({type(value).__name__})."
        )
    return value


def _check_values(where: str, config: Config) -> None:
    for section in _CLASSES:  # TOML has nan and inf; no key takes them
        for key, value in config.section(section).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{where}: [{section}] {key} must be a finite number; received {value!r}.")
    for (section, key), options in CHOICES.items():
        value = getattr(getattr(config, section), key)
        if value not in options:
            raise ConfigError(
                f"{where}: [{section}] {key} must be one of {', '.join(map(repr, options))}; "
                f"received {value!r}.{_suggest(str(value), options)}"
            )
    for section, key in FRACTIONS:
        value = getattr(getattr(config, section), key)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{where}: [{section}] {key} is a fraction and must lie in [0, 1]; received {value!r}.")
    positive = [("tasks", k) for k in ("ways", "shots", "queries", "train", "target", "test")] + [
        ("train", "checkpoint_every"),
        ("influence", "chunk"),
        ("influence", "cg_maxiter"),
        ("check", "chunk"),
        ("check", "batch_size"),
        ("check", "retrain_steps"),
        ("report", "top_k"),
        ("model", "inner_steps"),
        ("model", "filters"),
        ("train", "adam_steps"),
    ]
    for section, key in positive:
        value = getattr(getattr(config, section), key)
        if value < 1:
            raise ConfigError(f"{where}: [{section}] {key} must be >= 1; received {value!r}.")
    for section, key in POSITIVE:
        value = getattr(getattr(config, section), key)
        if value <= 0:
            raise ConfigError(f"{where}: [{section}] {key} must be > 0; received {value!r}. {POSITIVE[section, key]}")
    non_negative = [
        ("model", "features"),
        ("train", "newton_steps"),
        ("train", "minibatch"),
        ("train", "chunk"),
        ("influence", "batch_size"),
        ("influence", "damping"),
        ("check", "tasks"),
        ("check", "support"),
        ("check", "query"),
        ("model", "meta_reg"),
        ("edit", "damping"),
        ("run", "memory_limit_gb"),
        ("data", "image_size"),
        ("tasks", "seed"),
        ("train", "seed"),
    ]
    for section, key in non_negative:
        value = getattr(getattr(config, section), key)
        if not isinstance(value, str) and value < 0:
            raise ConfigError(f"{where}: [{section}] {key} must be >= 0; received {value!r}.")
    if config.tasks.ways < 2:
        raise ConfigError(f"{where}: [tasks] ways must be >= 2 for classification; received {config.tasks.ways}.")
    if config.tasks.train < 4:
        raise ConfigError(
            f"{where}: [tasks] train must be >= 4 (influence ranks training tasks); received {config.tasks.train}."
        )
    if config.data.dataset == "npz" and not config.data.path:
        raise ConfigError(
            f'{where}: [data] dataset = "npz" needs path = "/path/to/file.npz" (a file with arrays '
            "images [N, H, W] or [N, H, W, C] and integer labels [N])."
        )
    name = config.run.name
    if name in ("", ".", "..") or any(c in name for c in "/\\") or not name.isprintable():
        raise ConfigError(
            f"{where}: [run] name must be a single folder name: it names the run folder runs/<name> when "
            f"there is no --out; received {name!r}. Use a name without '/', '\\' or control characters "
            "that is not '.' or '..'; to write anywhere else, pass --out PATH."
        )
    if config.train.minibatch > config.tasks.train:
        raise ConfigError(
            f"{where}: [train] minibatch = {config.train.minibatch} tasks per Adam step, but [tasks] train = "
            f"{config.tasks.train}. Set minibatch <= {config.tasks.train}, or 0 for all tasks at every step."
        )
    if config.model.kind == "conv4" and config.model.features:
        raise ConfigError(
            f'{where}: [model] kind = "conv4" reads the raw images, so features (PCA components) must be 0; '
            f'received features = {config.model.features}. Remove the features line, or use kind = "mlp" on '
            "PCA features."
        )
    if config.model.kind == "conv4" and config.model.norm == "group" and config.model.filters % CONV4_GROUPS:
        raise ConfigError(
            f'{where}: [model] norm = "group" normalises {CONV4_GROUPS} groups of channels, so filters must be a '
            f"multiple of {CONV4_GROUPS}; received filters = {config.model.filters}. Set filters to a multiple "
            f'of {CONV4_GROUPS}, or norm = "layer" or "none".'
        )
    if config.model.kind == "python" and not config.model.module:
        raise ConfigError(
            f'{where}: [model] kind = "python" needs module = "/path/to/model.py" defining '
            "init(key, n_inputs, ways), loss(params, meta_params, example) and optionally logits(params, x)."
        )


def from_dict(raw: dict, where: str = "config") -> Config:
    """A validated Config from a nested dict (e.g. parsed TOML); missing keys take the defaults."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table of sections; received {type(raw).__name__}.")
    sections = {}
    for name, values in raw.items():
        if name not in _CLASSES:
            raise ConfigError(
                f"{where}: unknown section [{name}].{_suggest(name, _CLASSES)} Valid sections: "
                f"{', '.join('[' + s + ']' for s in _CLASSES)}. Remove or rename it (see configs/ for examples)."
            )
        if not isinstance(values, dict):
            raise ConfigError(
                f"{where}: [{name}] must be a table of keys (a [{name}] header followed by key = value lines); "
                f"received {values!r}."
            )
        cls = _CLASSES[name]
        defaults = cls()
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in values if k not in fields]
        if unknown:
            raise ConfigError(
                f"{where}: unknown key{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(repr(k) for k in unknown)} in section [{name}].{_suggest(unknown[0], fields)} "
                f"Valid keys of [{name}]: {_valid_keys(name)}. Fix or remove the key and run the command again."
            )
        sections[name] = cls(**{k: _coerce(where, f"{name}.{k}", v, getattr(defaults, k)) for k, v in values.items()})
    kind = sections["model"].kind if "model" in sections else DEMO.model.kind
    for (name, key), value in KIND_DEFAULTS.get(kind, {}).items():
        if key not in raw.get(name, {}):
            sections[name] = dataclasses.replace(sections.get(name, getattr(DEMO, name)), **{key: value})
    config = dataclasses.replace(DEMO, **sections)
    _check_values(where, config)
    return config


def load(path: str | Path) -> Config:
    """Read and validate a TOML run configuration."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {str(path)!r} does not exist. Pass the path of a TOML file such as "
            "configs/digits.toml (run `metaif run --help` for the format)."
        )
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(
            f"{str(path)!r} is not valid TOML: {error}. Check the line it names "
            "(strings need quotes, lists use [a, b])."
        ) from None
    if isinstance(raw.get("run", {}), dict) and "name" not in raw.get("run", {}):
        raw = {**raw, "run": {**raw.get("run", {}), "name": path.stem}}  # the default name: the file's
    return from_dict(raw, str(path))


def to_toml(config: Config) -> str:
    """The config as TOML text (every key, for the run folder)."""
    lines = []
    for section, values in config.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, str):
                text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
            elif isinstance(value, (tuple, list)):
                text = "[" + ", ".join(str(v) for v in value) + "]"
            else:
                text = repr(value)
            lines.append(f"{key} = {text}")
        lines.append("")
    return "\n".join(lines)
