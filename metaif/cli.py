"""The `metaif` command: the main job (meta-train, influence, checks, detection, editing, report)
on the built-in demo or a TOML config, and the benchmarks.

Exit codes: 0 success; 1 the run failed (data, model, numerics); 2 a usage or config error
(including a run that would not fit in memory); 130 interrupted (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
import time
from pathlib import Path

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
BENCHMARKS = ("core", "solvers", "scaling", "pairwise")

_FORMAT = argparse.RawDescriptionHelpFormatter

MAIN_HELP = """\
Influence of every meta-training task and example on a held-out loss, checked against retraining.

commands:
  demo    the whole job on a built-in default (scikit-learn digits, 2-3 minutes on a 2-core CPU)
  run     the same job on a dataset and model described by a TOML config
  bench   run the benchmarks in benchmarks/ and print their tables

examples:
  metaif demo --out demo-out                 # writes demo-out/report.html, scores CSV/JSON, PNG plots
  metaif demo --quick                        # a first look: the same scores, without the retraining checks
  metaif run configs/omniglot.toml --out runs/omniglot
  metaif run configs/digits.toml --check     # validate the config against the data, estimate memory, run nothing
  metaif bench --quick

Runs are resumable: rerunning the same command continues from the checkpoints in --out and gives
the same scores. Exit codes: 0 ok, 1 the run failed, 2 usage/config error (or would not fit in
memory), 130 interrupted. Errors are one paragraph; --debug shows the traceback.
"""

PIPELINE_HELP = """\
What it does (each step is saved in OUT/checkpoints as it finishes; an interrupted run - Ctrl-C,
kill, crash - resumes where it stopped when the same command is run again, with the same scores):
  1. data      few-shot tasks; a fraction of training tasks get random labels and a fraction of
               support labels are flipped (the corruption masks are kept to score detection)
  2. train     full-batch Adam (checkpointed every [train] checkpoint_every steps), then exact
               Newton steps to a stationary point; reports ||grad F|| and the smallest Hessian
               eigenvalues (Lanczos)
  3. influence one solve v = H^-1 grad f for the held-out loss f, then task and instance
               influence of every training task, support and query example, in chunks of tasks
  4. check     leave-one-out retraining of a random sample at each level: predicted (-influence)
               vs actual change of f, Pearson and Spearman
  5. detect    ROC-AUC of influence and of the raw-loss baseline against the corruption masks
  6. edit      remove the highest-influence tasks and support examples by lambda* - sum I_lambda
               (no retraining) and compare with retraining (held-out loss, test accuracy)
  7. report    OUT/report.html (self-contained), report.md, scores_*.csv, scores.json,
               summary.json, PNG figures (each labelled with backend, device and dtype)

Sign convention: removing a datum changes f by about -influence; positive influence on a loss is
harmful.

The run folder OUT: metaif writes only into a new or empty folder, or one of its own run folders
(marked by OUT/manifest.json), and never overwrites other files. OUT/manifest.json records the
sha256 of every checkpoint: on a rerun, a checkpoint that was edited, damaged or copied in from
another run is named, moved to OUT/rejected/ and recomputed with what depends on it. Checkpoints
are keyed on the settings that change results and on the content of the data and model files, so
an edited data or model file recomputes what it affects, while checkpoint_every, file locations
and report options recompute nothing. One run at a time holds OUT/.metaif-lock (on POSIX systems);
a second run in the same folder stops at once, naming the first one's pid.
"""

RUN_HELP = (
    PIPELINE_HELP
    + """
CONFIG is a TOML file with any of these sections (missing keys take the demo's defaults;
unknown keys are an error that lists the valid ones):
  [data]      dataset = "digits" | "mnist" | "omniglot" | "mini-imagenet" | "fc100" | "npz",
              root = "/data" (default $METAIF_DATA), path = "my.npz" (npz: images [N,H,W(,C)], labels [N]),
              sha256 = "..." (npz, checked), verify = true (checksums of the standard datasets),
              image_size, held_out = "auto" | "classes" | "images", held_fraction
  [tasks]     ways, shots, queries, train, target, test, corrupt_tasks, flip_support, seed
  [model]     kind = "mlp" | "conv4" | "python", features (PCA, 0 = raw pixels), hidden = [8],
              filters, norm = "group" | "layer" | "none" (conv4, on raw images, float32), module = "model.py",
              adapt = "maml" | "imaml", inner_steps, inner_lr, prox_reg, meta_reg
              (kind = "python" EXECUTES the module file, with --check too: use only files you trust)
  [train]     adam_steps, adam_lr, minibatch (tasks per Adam step), chunk (tasks at once per gradient),
              newton_steps, checkpoint_every, seed
  [influence] solver = "dense" | "cg", damping (or "auto"), batch_size (tasks at once; bounds memory), chunk,
              cg_maxiter
  [check]     tasks, support, query (leave-one-out sample sizes), retrain_steps, chunk, batch_size
  [edit]      tasks, support (fractions removed, highest influence first), damping (of the edit's solves)
  [report]    top_k, plots
  [run]       memory_limit_gb (0 = available memory), name (the folder runs/<name> without --out;
              one folder name, no '/' or '..')

examples:
  metaif run configs/digits.toml --out runs/digits
  METAIF_DATA=~/data metaif run configs/omniglot.toml --out runs/omniglot
  METAIF_DATA=~/data metaif run configs/omniglot-conv4.toml --out runs/omniglot-conv4   # Conv4 on raw images
  metaif run configs/omniglot.toml --out runs/omniglot     # after Ctrl-C or a crash: resumes
  metaif run my.toml --check                               # validate + memory estimate only
  metaif run my.toml --out runs/x --fresh                  # delete the run's checkpoints, start over
"""
)

DEMO_HELP = (
    PIPELINE_HELP
    + """
The demo is `metaif run` with the built-in default config (configs/digits.toml holds the same
values): scikit-learn's 1,797 bundled 8x8 digits (no download), 5-way 2-shot tasks, 50 training
tasks of which 20% get random labels and 10% of support labels flipped, a tanh MLP on 12 PCA
features (6 hidden units, d = 113) with one MAML step. About 2-3 minutes on a 2-core CPU.

examples:
  metaif demo                       # writes demo-out/
  metaif demo --quick               # no leave-one-out check and no edit (the stages that retrain): demo-out-quick/
  metaif demo --out /tmp/demo       # elsewhere
  metaif demo --fresh               # recompute everything
"""
)

BENCH_HELP = f"""\
Runs the benchmark scripts of a source checkout (benchmarks/{{{",".join(BENCHMARKS)}}}.py), each in its
own process, streaming their tables. Without --quick the full runs take tens of minutes each on a
CPU and write benchmarks/results/*.json; with --quick each takes a few minutes (core and pairwise
only print; solvers and scaling write their *_quick results). See benchmarks/README.md.

examples:
  metaif bench --quick                  # all four, small
  metaif bench --quick --only core      # one
  metaif bench --list
"""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error"
    )


def _job_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by the commands that run the whole job (demo, run)."""
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="delete the checkpoints this folder's manifest.json records (nothing else) and start over",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress or summary on the terminal")
    _common(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metaif", description=MAIN_HELP, formatter_class=_FORMAT)
    parser.add_argument("--debug", action="store_true", default=False, help="show the traceback of an error")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="{demo,run,bench}")

    demo = sub.add_parser(
        "demo", help="the whole job on the built-in digits default", description=DEMO_HELP, formatter_class=_FORMAT
    )
    demo.add_argument("--out", default=None, help="output folder (default demo-out, or demo-out-quick with --quick)")
    demo.add_argument(
        "--quick",
        action="store_true",
        help="a first look: shorter meta-training, no leave-one-out check and no edit (the stages that retrain)",
    )
    _job_options(demo)
    demo.set_defaults(func=_cmd_demo)

    run = sub.add_parser("run", help="the whole job on a TOML config", description=RUN_HELP, formatter_class=_FORMAT)
    run.add_argument("config", help="TOML config file (see configs/)")
    run.add_argument("--out", default=None, help="output folder (default runs/<config name>)")
    run.add_argument(
        "--check",
        action="store_true",
        help="check everything the run checks before its heavy work (config, data, tasks, model file - which "
        "is executed -, memory estimate, output folder), then stop; writes nothing",
    )
    _job_options(run)
    run.set_defaults(func=_cmd_run)

    bench = sub.add_parser(
        "bench", help="run the benchmarks and print their tables", description=BENCH_HELP, formatter_class=_FORMAT
    )
    bench.add_argument("--quick", action="store_true", help="the small versions (a few minutes each)")
    bench.add_argument("--only", nargs="+", choices=BENCHMARKS, metavar="NAME", help=f"some of {', '.join(BENCHMARKS)}")
    bench.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    _common(bench)
    bench.set_defaults(func=_cmd_bench)
    return parser


# ----------------------------------------------------------------------------- commands


def _setup_jax():
    import jax

    jax.config.update("jax_enable_x64", True)


def _execute(config, out: Path, label: str, fresh: bool, quiet: bool, command: str) -> int:
    _setup_jax()
    from ._run import folder, pipeline, report
    from ._run.ui import UI

    pipeline.check_paths(config)  # before anything is written
    _output_folder(out)
    ui = UI(quiet=quiet)
    with folder.claimed(out, label, fresh):
        ui.print(f"metaif: {config.run.name} → {out}/  (rerun the same command to resume after an interruption)")
        start = time.perf_counter()
        results = pipeline.run(config, out, ui)
        results["command"] = command
        summary, made = report.write_all(out, results, ui)
        summary["wall_s"] = round(time.perf_counter() - start, 2)  # the whole command, report included
        from ._run.store import write_json

        write_json(out / "summary.json", summary)
        report.write_reports(out, summary, made, config)
    report.print_summary(ui, summary, out)
    return 0


def _output_folder(out: Path) -> None:
    """Create --out, or a ConfigError saying why it cannot be (`_run.folder.claimed` then adopts it)."""
    from ._run.config import ConfigError

    if out.exists() and not out.is_dir():
        raise ConfigError(
            f"--out {str(out)!r} is an existing file, not a folder. Pass the name of a folder (it is created "
            "if missing; a finished or interrupted run's folder is reused), or move the file away."
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a parent that is a file, no permission, read-only file system
        raise ConfigError(
            f"--out {str(out)!r}: cannot create the output folder ({error.strerror}: {error.filename!r}). "
            "Pass a folder in a place you can write to."
        ) from None


def _cmd_demo(args) -> int:
    from ._run.config import DEMO, QUICK

    out = args.out or ("demo-out-quick" if args.quick else "demo-out")
    return _execute(
        QUICK if args.quick else DEMO,
        Path(out),
        f"--out {out!r}",
        args.fresh,
        args.quiet,
        f"metaif demo{' --quick' if args.quick else ''} --out {out}",
    )


def _cmd_run(args) -> int:
    from ._run import config as config_module

    config = config_module.load(args.config)
    if args.out:
        out, label = Path(args.out), f"--out {args.out!r}"
    else:
        out = Path("runs") / config.run.name
        label = f"the run folder {str(out)!r} (runs/<[run] name>; --out chooses another)"
    if args.check:
        return _check_only(config, args.config, out, label)
    return _execute(config, out, label, args.fresh, args.quiet, f"metaif run {args.config} --out {out}")


def _check_only(config, path, out: Path, label: str) -> int:
    """Everything the run checks before its heavy work, on the config's data and model: the data
    and tasks are built, the model file is loaded (executed) and its loss evaluated on a real task,
    the memory estimate is made, and the output folder is checked; nothing is written."""
    _setup_jax()
    import numpy as np

    from ._run import folder, memory, pipeline

    folder.check(out, label)
    pools = pipeline.load_pools(config)
    pipeline.check_pools(
        config, pools
    )  # as the run does, before memory: a setting the data cannot supply is no memory problem
    prepared = pipeline.setup(config, pipeline.build_data(config, pools))
    train, stages, t = prepared.train, prepared.estimate, config.tasks
    gib = 1024**3
    print(
        f"{path}: valid. {pools.source}: {pools.train_labels.size:,} meta-training images of {np.unique(pools.train_labels).size:,} "
        f"classes and {pools.held_labels.size:,} held-out images of {np.unique(pools.held_labels).size:,} classes "
        f"(tasks need {t.ways} classes of {t.shots} + {t.queries} images); "
        f"d = {prepared.model.n_params} meta-parameters; n = {train.n_tasks}, m = {train.n_support}, q = {train.n_query}. "
        f"Output folder: {out}/."
    )
    print(
        "estimated peak memory: "
        + ", ".join(f"{k} {v / gib:.2f} GiB" for k, v in stages.items() if k != "peak")
        + f"; peak {stages['peak'] / gib:.2f} GiB of {memory.available_bytes() / gib:.1f} GiB available."
    )
    return 0


def _describe(script: Path) -> str:
    """The first paragraph of a script's docstring, on one line (read, not imported: no JAX)."""
    doc = ast.get_docstring(ast.parse(script.read_text())) or ""
    return " ".join(doc.split("\n\n")[0].split())


def _cmd_bench(args) -> int:
    import metaif

    folder = Path(metaif.__file__).resolve().parents[1] / "benchmarks"
    names = args.only or list(BENCHMARKS)
    wanted = list(BENCHMARKS) if args.list else names
    if not all((folder / f"{name}.py").is_file() for name in wanted):
        raise FileNotFoundError(
            f"the benchmark scripts benchmarks/{{{','.join(wanted)}}}.py are not in {str(folder)!r}: "
            "`metaif bench` runs the scripts of a source checkout, which an installed wheel does not "
            "include. Clone the repository and install it with `pip install -e .`."
        )
    if args.list:
        for name in BENCHMARKS:
            print(f"{name:<9} benchmarks/{name}.py: {_describe(folder / f'{name}.py')}")
        return 0
    failed = []
    for name in names:
        command = [sys.executable, str(folder / f"{name}.py")] + (["--quick"] if args.quick else [])
        print(f"\n=== {name}: {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        code = subprocess.call(command, cwd=folder.parent, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # stream tables
        print(f"=== {name}: exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
        if code:
            failed.append(name)
    if failed:
        raise RuntimeError(
            f"benchmark(s) {', '.join(failed)} failed (their output is above). Rerun one alone with "
            f"`metaif bench --only {failed[0]}{' --quick' if args.quick else ''}` to see its error."
        )
    return 0


# ----------------------------------------------------------------------------- errors


def _paragraph(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if "must return a scalar" in text:
        text = (
            "the model's loss is not a scalar: "
            + text
            + ' With [model] kind = "python", loss(params, meta_params, example) '
            "gets ONE example and must return a single number."
        )
    elif "verify=False" in text:  # a loader's checksum error: the config's spelling of the escape hatch
        text = text.replace("Pass verify=False", "Set [data] verify = false in the config")
    elif isinstance(error, MemoryError):
        text = (
            "the run ran out of memory: " + text + " Set [influence] batch_size and [check] batch_size smaller, or "
            "reduce [tasks] train or the model size."
        )
    elif isinstance(error, ImportError):
        text = text + " (install the missing package into this environment)"
    return text


def main(argv=None) -> int:
    """Entry point of the console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        import metaif

        print(f"metaif {metaif.__version__}")
        return 0
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    from ._run.config import ConfigError
    from ._run.ui import error
    from ._runtime import configure_cpu

    try:
        configure_cpu()  # before the first JAX computation: steady single-threaded Eigen kernels on CPU
    except RuntimeError:
        pass  # called from Python with JAX already running: its flags stay as they are
    try:
        return args.func(args)
    except KeyboardInterrupt:
        error("interrupted. Finished stages and chunks are saved; rerun the same command to continue where it stopped.")
        # Leave at once: every checkpoint is already on disk (fsynced), and tearing the interpreter
        # down under an interrupted XLA compilation can crash (seen as SIGSEGV with jaxlib 0.10.2).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)
    except Exception as exc:  # one paragraph for people; the traceback with --debug
        if args.debug:
            raise
        error(_paragraph(exc) + " (Run with --debug for the traceback.)")
        return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
