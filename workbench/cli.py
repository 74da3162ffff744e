"""Command line: ``workbench train`` (one run), ``run`` (a study), ``status`` and ``list``.

Exit status: 0 done; 1 ``run``: some runs failed (the others finished; run it again to
retry them); 2 bad input (a message, no traceback); 3 ``train``: the run diverged (marked
in ``status.json``, files kept); 4 the results folder cannot be written (a full disk, a
read-only folder, no permission: one line naming the path; the runs in flight are
released, run again once it is fixed); 130 interrupted (``run`` again to resume).

The results folder is ``--results``, else ``$WORKBENCH_RESULTS``, else ``./results``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shlex
import shutil
import signal
import sqlite3
import sys
import tempfile
from pathlib import Path

import torch

from .config import ConfigError, parse_value, resolve


def _parse_sets(items: list[str]) -> dict:
    out = {}
    for it in items:
        if "=" not in it:
            raise ConfigError(f"--set expects key=value, got {it!r}")
        k, v = it.split("=", 1)
        out[k.strip()] = parse_value(v)
    return out


def load_plugins(plugins: list[str]) -> None:
    """Import each plugin (a ``.py`` file or a module name): it registers algorithms or tasks on import.

    ``workbench.registry.register(SPEC)`` in a file of one's own adds an algorithm without
    touching the package; ``--plugin that_file.py`` makes the CLI see it.
    """

    for plugin in plugins:
        try:
            if plugin.endswith(".py"):
                path = Path(plugin)
                if not path.is_file():
                    raise OptionError(f"--plugin {plugin}: no such file")
                spec = importlib.util.spec_from_file_location(f"workbench_plugin_{path.stem}", path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[spec.name] = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module(plugin)
        except (ImportError, SyntaxError) as e:
            raise OptionError(f"--plugin {plugin}: cannot import it: {e}") from None


def cmd_train(args) -> int:
    load_plugins(args.plugin or [])
    overrides = _parse_sets(args.set or [])
    raw = {"task": {"name": args.task}, "algo": {"name": args.algo}, "seed": args.seed}
    if args.steps is not None:
        raw["steps"] = args.steps
    if args.device:
        raw["device"] = args.device
    res = resolve(raw, overrides)
    if res.run.report_to:  # a missing tracker package is said before training, not after
        from .results.export import require  # per command: importing every layer doubles start-up

        require(res.run.report_to)
    _prepare_out(Path(args.out), args.overwrite)
    from .training import train  # per command: importing every layer doubles start-up

    result = train(res, args.out, progress=not args.quiet)
    if res.run.report_to and result["status"] in ("done", "diverged"):  # from the finished run's files
        from .results.export import export_runs, folder_run  # per command: importing every layer doubles start-up

        for tracker in res.run.report_to:
            export_runs([folder_run(args.out)], tracker, Path(args.out) / "trackers" / tracker)
    final = {k: v for k, v in result["final"].items() if k.split("/")[0] in ("reward", "kl", "objective", "entropy")}
    summary = {"status": result["status"], "step": result["step"], "out": args.out, **final}
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0 if result["status"] == "done" else 3


class OptionError(ConfigError):
    """A bad command-line option (not a configuration): one line, exit status 2."""


RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    "status.json",
    "metrics.parquet",
    "samples.jsonl",
    "checkpoint",
    "error.txt",
)


def _prepare_out(out: Path, overwrite: bool) -> None:
    """``--out`` must be a new or empty folder (or, with ``--overwrite``, a run folder: emptied first) we can write."""
    if out.exists() and not out.is_dir():
        raise OptionError(f"--out {out}: exists and is not a folder; choose a new folder for the run")
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if names:
        if not overwrite:
            raise OptionError(
                f"--out {out}: already holds files ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''});"
                " choose a new folder, or pass --overwrite to delete them and train again"
            )
        if not any((out / f).exists() for f in RUN_FILES):
            raise OptionError(
                f"--out {out}: not a run folder (none of {', '.join(RUN_FILES[:3])}); "
                "--overwrite only empties run folders"
            )
    try:
        if out.is_dir() and overwrite:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise OptionError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def cmd_run(args) -> int:
    from .results import StoreFault, results_dir, storage_fault  # per command: importing every layer doubles start-up
    from .studies import (
        WORKER_PRELOAD,
        format_summary,
        load_study,
        run_study,
        summarize,
    )  # per command: importing every layer doubles start-up
    from .studies.executors import LocalProcessExecutor  # per command: importing every layer doubles start-up

    study = load_study(args.study, size=args.size)  # a size other than the default: named <study>@<size>
    for w in study.warnings:  # allowed but likely wrong: a verdict metric no run logs
        print(f"workbench run: warning: {study.path}: {w}", file=sys.stderr)
    if args.device == "cuda" and args.executor == "process" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here (use --device auto or cpu)")
    if args.address and args.executor != "ray":
        raise OptionError("--address is the Ray cluster's: use it with --executor ray")
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    if args.stack is not None and args.stack < 1:
        raise ConfigError(f"--stack must be at least 1, got {args.stack}")
    stack = args.stack or default_stack(args.device)
    results = results_dir(args.results)
    if args.executor == "ray":
        from .studies.ray_executor import RayExecutor, ray_available  # the optional `ray` extra, per command

        if (why := ray_available()) is not None:
            raise OptionError(f"--executor ray: {why}")
        try:
            executor = RayExecutor(args.workers, args.address)
        except (ConnectionError, RuntimeError, ValueError) as e:  # no cluster at --address, a bad address
            raise OptionError(f"--executor ray: cannot start or reach Ray: {e}") from None
    else:
        executor = LocalProcessExecutor(args.workers, preload=WORKER_PRELOAD)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM as Ctrl-C: release the runs in flight, then exit
    try:
        out = run_study(
            study,
            results,
            executor,
            device=args.device,
            progress=not args.quiet,
            quiet=args.quiet,
            seeds=args.seeds,
            stack=1 if args.no_stack else stack,
        )
    except KeyboardInterrupt:
        print(
            f"\nworkbench run: interrupted; unfinished runs were released. Run again to resume: "
            f"{_rerun_command(args, results)}",
            file=sys.stderr,
        )
        return 130
    except (StoreFault, OSError, sqlite3.Error) as e:  # a full disk, a read-only folder: stopped, nothing lost
        e = storage_fault(e, results / "index.sqlite")
        if e is None:
            raise
        released, left = getattr(e, "released", 0), getattr(e, "unreleased", [])
        held = (f"{released} run(s) in flight released" if released else "no run was in flight") + (
            f", {len(left)} left 'running' for the next run to take back" if left else ""
        )
        print(
            f"workbench run: {e}; stopped ({held}). Free space or restore write permission, then run again to resume: "
            f"{_rerun_command(args, results)}",
            file=sys.stderr,
        )
        return 4
    finally:
        executor.shutdown(wait=True)
        signal.signal(signal.SIGTERM, previous)
    counts = ", ".join(f"{out.count(s)} {s}" for s in ("done", "diverged", "failed"))
    print(
        f"study {study.name}: {out.n_runs} runs ({counts}); trained now: {len(out.executed)}, "
        f"finished before: {len(out.already)}; results in {results}"
    )
    summary = summarize(results, study.name)
    print(format_summary(summary))
    _print_issues(summary.attrs.get("issues", []))
    if not out.ok:
        print(
            f"workbench run: {out.count('failed')} run(s) failed; their error.txt is in {results}/runs/<run_id>/;"
            " run again to retry them",
            file=sys.stderr,
        )
    return 0 if out.ok else 1


def default_stack(device: str) -> int:
    """``--stack``'s default: wider stacks where the runs go to a GPU."""
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return DEFAULT_STACK_CUDA if cuda else DEFAULT_STACK


def _rerun_command(args, results: Path) -> str:
    """The ``workbench run`` command that resumes this one: the study, the results folder and every option the
    user gave a value other than its default (the executor and its address, the device, which is part of each
    run's config, the size, the seeds, the workers and the stacking), so the hint is the command to run."""
    parts = ["workbench run", shlex.quote(args.study)]
    if args.size not in (None, "default"):
        parts.append(f"--size {shlex.quote(args.size)}")
    parts.append(f"--results {shlex.quote(str(results))}")
    if args.executor != "process":
        parts.append(f"--executor {args.executor}")
    if args.address:
        parts.append(f"--address {shlex.quote(args.address)}")
    if args.device != "auto":
        parts.append(f"--device {args.device}")
    if args.seeds != "all":
        parts.append(f"--seeds {args.seeds}")
    if args.workers != DEFAULT_WORKERS:
        parts.append(f"--workers {args.workers}")
    if args.no_stack:
        parts.append("--no-stack")
    elif args.stack is not None:
        parts.append(f"--stack {args.stack}")
    return " ".join(parts)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _print_issues(issues: list[dict]) -> None:
    for i in issues:
        print(f"warning: skipped run {i['run_id']}: {i['path']}: {i['problem']}", file=sys.stderr)


def _study_name(arg: str) -> str:
    """A study given by name or by its file (``*.toml``): the name, as in the file's ``name`` (else its stem).

    Raises ``ConfigError`` for a name no study can have (``..``, a path, 300 characters).
    """
    from .studies import load_study, study_name_problem  # per command: importing every layer doubles start-up

    if arg.endswith(".toml") or os.sep in arg or (os.altsep and os.altsep in arg):
        return load_study(arg).name
    why = study_name_problem(arg)
    if why:
        raise ConfigError(f"{arg[:60]!r}{'...' if len(arg) > 60 else ''} is not a study name: {why}")
    return arg


def cmd_status(args) -> int:
    from .results import load_runs, load_studies, results_dir  # per command: importing every layer doubles start-up
    from .studies import format_summary, summarize, text_table  # per command: importing every layer doubles start-up

    results = results_dir(args.results)
    try:
        studies = load_studies(results)
    except FileNotFoundError:
        print(f"no results in {results} (set --results or WORKBENCH_RESULTS)")
        return 0
    if not args.study:
        rows = [
            [r["name"], r["n_runs"], *(r[s] for s in ("queued", "running", "done", "diverged", "failed"))]
            for _, r in studies.iterrows()
        ]
        print(
            text_table(["study", "runs", "queued", "running", "done", "diverged", "failed"], rows)
            if rows
            else "(no studies)"
        )
        return 0
    name = _study_name(args.study)
    if name not in set(studies["name"]):
        known = ", ".join(studies["name"]) or "none"
        raise ConfigError(f"no study {name!r} in {results}; studies there: {known}")
    runs = load_runs(results, name)
    rows = []
    for _, r in runs.iterrows():
        status = r["status"] + (" (stale: owner gone)" if r["stale"] else "")
        step = (
            f"{int(r['step'])}/{r['steps']}" if r["step"] == r["step"] and r["step"] is not None else f"-/{r['steps']}"
        )
        samples = (
            f"{int(r['samples'])} {r['unit']}" if r["samples"] == r["samples"] and r["samples"] is not None else "-"
        )
        grid = ",".join(f"{k}={v}" for k, v in r["grid"].items())
        rows.append(
            [
                r["algo_label"] + (f"[{grid}]" if grid else ""),
                r["task_label"],
                r["seed"],
                status,
                step,
                samples,
                r["attempts"],
                r["run_id"],
                r["reason"][:60] if isinstance(r["reason"], str) else "",
            ]
        )
    print(f"study {name}: {len(runs)} runs")
    print(text_table(["algorithm", "task", "seed", "status", "step", "consumed", "attempts", "run_id", "reason"], rows))
    if (runs["status"].isin(["done", "diverged"])).any():
        summary = summarize(results, name)
        print()
        print(format_summary(summary))
        _print_issues(summary.attrs.get("issues", []))
    return 0


def cmd_list(args) -> int:
    from .results import load_runs, load_studies, results_dir  # per command: importing every layer doubles start-up
    from .studies import text_table  # per command: importing every layer doubles start-up

    results = results_dir(args.results)
    try:
        studies = load_studies(results)
    except FileNotFoundError:
        studies = None
    known = set() if studies is None else set(studies["name"])
    rows = []
    if studies is not None:
        for _, r in studies.iterrows():
            rows.append([r["name"], ",".join(r["claims"]), f"{r['done'] + r['diverged']}/{r['n_runs']}", r["path"]])
    for f in sorted(Path(args.studies).glob("*.toml")):
        if f.stem not in known:
            rows.append([f.stem, "", "not run", str(f)])
    print(f"studies ({results}):")
    print(text_table(["study", "claims", "finished", "file"], rows) if rows else "(none)")
    if args.runs and studies is not None:
        runs = load_runs(results)
        grouped = runs.groupby("run_id", sort=False).agg(
            algo=("algo", "first"),
            task=("task", "first"),
            seed=("seed", "first"),
            status=("status", "first"),
            studies=("study", lambda s: ",".join(sorted(x for x in s if isinstance(x, str)))),
        )
        print(f"\nruns ({len(grouped)}):")
        print(
            text_table(
                ["run_id", "algo", "task", "seed", "status", "studies"],
                [[i, *r.tolist()] for i, r in grouped.iterrows()],
            )
        )
    return 0


def cmd_probe(args) -> int:
    from .analysis.probe import probe  # per command: importing every layer doubles start-up
    from .training.pretrain import start_phases  # per command: importing every layer doubles start-up

    result = probe(
        args.target,
        args.what,
        sft_phase=start_phases,
        batch_sizes=args.batch_sizes,
        minibatches=args.minibatches,
        objectives=args.objectives,
        seed=args.seed,
        device=args.device,
        results=args.results,
    )
    print(result.summary)
    return 0


DASHBOARD_CONFIG = Path(__file__).resolve().parent.parent / ".streamlit" / "config.toml"


def dashboard_command(app: Path, port: int) -> list[str]:
    """``streamlit run APP`` with every setting of the repository's ``.streamlit/config.toml`` as a flag (Streamlit
    reads that file only when started from the repository root) and the port."""
    import tomllib

    flags = []
    for section, settings in tomllib.loads(DASHBOARD_CONFIG.read_text()).items():
        for key, value in settings.items():
            flags += [f"--{section}.{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return [sys.executable, "-m", "streamlit", "run", str(app), *flags, "--server.port", str(port)]


def cmd_dashboard(args) -> int:
    """``streamlit run dashboard/app.py`` on 127.0.0.1 only, usage statistics off, no file watching
    (``.streamlit/config.toml``); this process becomes the server."""
    from .results import results_dir  # per command: importing every layer doubles start-up

    app = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"
    if not app.exists():
        raise ConfigError(f"no dashboard at {app}: it lives in the repository (dashboard/), run from a checkout")
    results = results_dir(args.results).resolve()
    cmd = dashboard_command(app, args.port)
    print(f"workbench dashboard: http://127.0.0.1:{args.port} (results: {results})", flush=True)
    os.execve(sys.executable, cmd, {**os.environ, "WORKBENCH_RESULTS": str(results)})


DEFAULT_WORKERS = min(os.cpu_count() or 1, 8)  # workbench run --workers
DEFAULT_STACK = 16  # workbench run --stack, on CPU
DEFAULT_STACK_CUDA = (
    64  # on CUDA: a GPU pays for wider stacks (issue 13's H100 figures: 64 seeds gave 82% of 256's rate)
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="workbench", description="RL vs supervised objectives on toy LM tasks with exact truth"
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train one run and write its folder")
    from .registry import ALGORITHMS, TASKS  # the built-in names (a plugin's are added by --plugin)

    t.add_argument("--task", required=True, help=f"task name ({', '.join(TASKS)})")
    t.add_argument("--algo", required=True, help=f"algorithm name ({', '.join(ALGORITHMS)})")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, default=None, help="override the default step budget")
    t.add_argument("--out", required=True, help="run folder to write")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    t.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="dotted override, e.g. algo.clip_eps=0.1, task.n_arms=4, lr=3e-4",
    )
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--overwrite", action="store_true", help="--out may be an existing run folder: it is emptied first")
    t.add_argument(
        "--plugin",
        action="append",
        metavar="FILE_OR_MODULE",
        help="import it first: a file that registers an algorithm or task (workbench.registry.register); repeatable",
    )
    t.set_defaults(func=cmd_train)

    results_help = "results folder (default: $WORKBENCH_RESULTS, else ./results)"
    r = sub.add_parser("run", help="run a study file: every run not finished yet, resumably")
    r.add_argument("study", help="study file, e.g. studies/quickstart.toml")
    r.add_argument(
        "--workers",
        type=int,
        default=DEFAULT_WORKERS,
        help="runs at once, one process each (default: CPU count, at most 8)",
    )
    r.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="device of every run (part of each run's config)",
    )
    r.add_argument("--results", default=None, help=results_help)
    r.add_argument(
        "--size",
        default=None,
        metavar="SIZE",
        help="run the study at a size its file declares ([sizes.SIZE], e.g. gpu), under the name STUDY@SIZE; "
        "default: the file as written",
    )
    r.add_argument("--quiet", action="store_true", help="no progress bars, no per-run lines")
    r.add_argument(
        "--seeds",
        choices=("all", "explore", "confirm"),
        default="all",
        help="run only the exploration seeds (while designing the study) or the confirmation seeds "
        "(to decide its verdicts); default: all",
    )
    r.add_argument(
        "--stack",
        type=int,
        default=None,
        metavar="N",
        help="runs that differ only in seed, lr, beta and other per-run scalars train as one stacked computation "
        f"of at most N runs (docs/studies.md, 'Runs'); default {DEFAULT_STACK} on CPU, {DEFAULT_STACK_CUDA} on CUDA",
    )
    r.add_argument("--no-stack", action="store_true", help="train every run alone (the same as --stack 1)")
    r.add_argument(
        "--executor",
        choices=("process", "ray"),
        default="process",
        help="process: a pool of local processes (default); ray: each work unit a Ray task, the run folders sent "
        "back to this process, which alone writes the results (the `ray` extra; docs/studies.md)",
    )
    r.add_argument(
        "--address",
        default=None,
        metavar="ADDR",
        help="with --executor ray: a running Ray cluster (HOST:PORT or auto); default: a local instance "
        "on 127.0.0.1 with --workers CPUs",
    )
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("status", help="the state of every study, or of one study's runs")
    s.add_argument("study", nargs="?", help="study name or file")
    s.add_argument("--results", default=None, help=results_help)
    s.set_defaults(func=cmd_status)

    ls = sub.add_parser("list", help="the studies in the results folder and the study files not run yet")
    ls.add_argument("--results", default=None, help=results_help)
    ls.add_argument("--studies", default="studies", help="folder of study files (default: ./studies)")
    ls.add_argument("--runs", action="store_true", help="also list every run")
    ls.set_defaults(func=cmd_list)

    pr = sub.add_parser("probe", help="gradient, credit-assignment or KL measurements on a saved run's checkpoint")
    pr.add_argument("target", help="run folder, its checkpoint folder, or a run id in the results folder")
    pr.add_argument("--what", required=True, choices=["gradients", "credit", "kl"], help="which measurement")
    pr.add_argument(
        "--batch-sizes", type=int, nargs="+", default=None, help="batch sizes to measure at (default: 8 32 128)"
    )
    pr.add_argument(
        "--minibatches", type=int, default=16, help="K, independent minibatches per batch size (default 16)"
    )
    pr.add_argument(
        "--objectives",
        nargs="+",
        default=None,
        help="gradients/credit: which objectives (default: all; see workbench.analysis.probe)",
    )
    pr.add_argument("--seed", type=int, default=0, help="seed of the probe's sampling")
    pr.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    pr.add_argument(
        "--results", default=None, help="results folder, to find a run id (default: $WORKBENCH_RESULTS, else ./results)"
    )
    pr.set_defaults(func=cmd_probe)

    d = sub.add_parser("dashboard", help="explore the results in a Streamlit dashboard (127.0.0.1 only)")
    d.add_argument("--results", default=None, help=results_help)
    d.add_argument("--port", type=int, default=8501, help="port on 127.0.0.1 (default 8501)")
    d.set_defaults(func=cmd_dashboard)

    rp = sub.add_parser("report", help="write a finished study's report: md, html, pdf, figures, tables, verdicts, bib")
    rp.add_argument("study", help="study name (as in `workbench list`) or its study file")
    rp.add_argument("--results", default=None, help=results_help)
    rp.add_argument("--out", default=None, help="output folder (default: <results>/reports/<study>)")
    rp.add_argument("--no-pdf", action="store_true", help="skip report.pdf (the slowest part: WeasyPrint)")
    rp.set_defaults(func=cmd_report)

    ex = sub.add_parser(
        "export", help="export a study's finished runs to TensorBoard, W&B, MLflow or trackio (offline, local files)"
    )
    ex.add_argument("study", help="study name (as in `workbench list`) or its study file")
    ex.add_argument("dest", metavar="DIR", help="folder the tracker's files are written to (created)")
    ex.add_argument("--to", required=True, choices=TRACKERS, help="the tracker (needs: pip install 'workbench[TO]')")
    ex.add_argument("--results", default=None, help=results_help)
    ex.set_defaults(func=cmd_export)
    return p


TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")  # workbench.results.export.TRACKERS (not imported here)


def cmd_export(args) -> int:
    from .results import results_dir  # per command: importing every layer doubles start-up
    from .results.export import MissingExtra, export_study  # per command: importing every layer doubles start-up

    study = _study_name(args.study)  # a study file: its `name`, not its file name
    root = results_dir(args.results)
    if not (root / "index.sqlite").exists():
        print(f"workbench export: no results at {root}; run the study first (workbench run)", file=sys.stderr)
        return 2
    try:
        out = export_study(root, study, args.to, Path(args.dest))
    except (MissingExtra, ValueError) as e:
        print(f"workbench export: {e}", file=sys.stderr)
        return 2
    before = f" ({len(out['skipped'])} exported there before, skipped)" if out["skipped"] else ""
    print(f"study {study}: {len(out['exported'])} run(s) exported to {args.to} in {out['dest']}{before}")
    return 0


def cmd_report(args) -> int:
    from .reporting.report import build_report  # per command: importing every layer doubles start-up
    from .results import results_dir  # per command: importing every layer doubles start-up

    study = _study_name(args.study)  # a study file: its `name`, not its file name
    root = results_dir(args.results)
    if not (root / "index.sqlite").exists():
        print(
            f"workbench report: no results at {root}; run the study first: workbench run studies/{study}.toml",
            file=sys.stderr,
        )
        return 2
    try:
        out = build_report(study, root, args.out, command=["workbench", *sys.argv[1:]], pdf=not args.no_pdf)
    except ValueError as e:
        print(f"workbench report: {e}", file=sys.stderr)
        return 2
    verdicts = json.loads((out / "verdicts.json").read_text())["verdicts"]
    pdf = "" if args.no_pdf else " report.pdf,"
    print(f"report written to {out}/ (report.md, report.html,{pdf} report.bib, figures/, tables/)")
    for claim, v in verdicts.items():
        print(f"  {claim}: {v}")
    return 0


INDEX_COMMANDS = ("run", "status", "list", "report", "export")  # commands that read or write the results index


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = _dispatch(args)
        sys.stdout.flush()  # here, where a closed pipe can still be handled
        return code
    except BrokenPipeError:  # `workbench status | head`: the reader left; say nothing more
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        except (OSError, ValueError):
            pass
        return 1


def _dispatch(args, retried: bool = False) -> int:
    from .results import (
        StoreFault,
        ensure_index,
        repair_index,
        results_dir,
        storage_fault,
    )  # per command: importing every layer doubles start-up
    from .results.index import _is_corrupt  # per command: importing every layer doubles start-up

    try:
        if args.cmd in INDEX_COMMANDS:  # a damaged index is set aside and rebuilt before anything reads it
            from .studies import legacy_plan, unit_of  # (results from before plan manifests)

            notice = ensure_index(results_dir(args.results), legacy=legacy_plan, unit_of=unit_of)
            if notice:
                print(f"workbench {args.cmd}: {notice}", file=sys.stderr)
        return args.func(args)
    except OptionError as e:
        print(f"workbench {args.cmd}: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        what = "invalid study" if args.cmd in ("run", "status", "report") else "invalid configuration"
        print(f"workbench {args.cmd}: {what}\n{e}", file=sys.stderr)
        return 2
    except (OSError, sqlite3.Error, RuntimeError, StoreFault) as e:
        if args.cmd in INDEX_COMMANDS and _is_corrupt(e) and not retried:  # damaged where the check did not look
            try:
                from .studies import legacy_plan, unit_of  # per command: importing every layer doubles start-up

                notice = repair_index(results_dir(args.results), str(e), legacy=legacy_plan, unit_of=unit_of)
            except Exception as repair_error:  # noqa: BLE001  (a read-only folder: said below)
                e = repair_error
            else:
                print(
                    f"workbench {args.cmd}: {notice or 'the results index was rebuilt by another process'}; "
                    "running again",
                    file=sys.stderr,
                )
                return _dispatch(args, retried=True)
        fault = storage_fault(e, getattr(args, "out", None))
        if fault is None and isinstance(e, sqlite3.Error):
            where = results_dir(getattr(args, "results", None)) / "index.sqlite"
            print(f"workbench {args.cmd}: the results index {where}: {e}", file=sys.stderr)
            return 4
        if fault is None:
            raise
        print(f"workbench {args.cmd}: {fault}", file=sys.stderr)
        return 4


if __name__ == "__main__":
    sys.exit(main())
