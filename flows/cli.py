"""`tuneline`: the command line.

    tuneline init DIR [--example NAME] [--data PATH]      a new project of your own (git, DVC, Prefect set up)
    tuneline upgrade                                      bring a project init'd by an earlier release up to this one
    tuneline run [-S key=value …] [--force] [--no-push]   the whole pipeline as a Prefect flow run
    tuneline stage NAME [-S key=value …]                  one stage (what dvc.yaml calls)
    tuneline stage train --nproc-per-node N               train with N DistributedDataParallel processes (torchrun)
    tuneline models list|show|promote|rollback|register   the model registry (flows/models_cli.py)
    tuneline dvc-yaml [--check]                           write (or check) dvc.yaml from the stage table
    tuneline config-docs [--check]                        params.yaml comments + docs knob table from core/config/
    tuneline dashboard [--host H] [--port P] [-S …]        optuna-dashboard over the live study storage
                                                           (tuneline tune --dashboard [PORT]: beside the study)
    tuneline serve [--host H] [--port P] [--device D] [-S serve.key=value …]   the inference server (serving/)
    tuneline predict [FILE…] [--text TEXT]… [--url URL]  classify images, audio clips or text with a running server

Run from the project folder (the one holding params.yaml), or pass --project. A command that fails prints
one line (`tuneline: <command> failed: <reason>`), then the details (a gate table); --debug adds tracebacks.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from tuneline.flows.dvc_yaml import STAGE_NAMES


def _default_environment(root: Path) -> None:
    """Keep Prefect and DVC local and quiet unless the user configured otherwise (set before importing them)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # telemetry would try the internet
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tuneline")  # stage logs reach the Prefect UI too
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("DVC_SITE_CACHE_DIR", str(root / ".dvc" / "tmp" / "site-cache"))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneline", description="Tune, train, gate and ship a model.")
    parser.add_argument("--project", type=Path, default=Path("."), help="project folder holding params.yaml")
    parser.add_argument("--debug", action="store_true",
                        help="on a failure, show tracebacks (Prefect's task and flow failure lines included)")
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="create a project of your own: params.yaml, dvc.yaml, prefect.yaml, git + DVC")
    init.add_argument("dir", type=Path, help="the project folder (new, or one holding only your own code and data)")
    init.add_argument("--example", default=None,
                      help="starting params: mnist | cifar10 | speech | sst2 (default: what --data holds decides; "
                           "mnist without --data)")
    init.add_argument("--data", default=None, metavar="PATH",
                      help="the data: MNIST's folder of .gz files; a folder (or .tar / .tar.gz / .zip) of class "
                           "folders of images, or of audio clips; a TSV/CSV/JSONL file or a folder of train.* and "
                           "dev.*/test.* ones; a path, or for images a URL (https://, s3://, …)")
    init.add_argument("--remote", type=Path, default=None, metavar="DIR",
                      help="the local DVC remote (default: DIR-dvc-remote beside the project)")
    sub.add_parser("upgrade", help="rewrite what an earlier release's `tuneline init` wrote (flow file, prefect.yaml, "
                                   "dvc.yaml) for this one; commits nothing")
    run = sub.add_parser("run", help="run the whole pipeline as a Prefect flow")
    stage = sub.add_parser("stage", help="run one stage (what dvc.yaml calls)")
    stage.add_argument("name", choices=STAGE_NAMES)
    stage.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                       help="train: N DistributedDataParallel processes on this node via torchrun, one per GPU "
                            "(default $TUNELINE_NPROC_PER_NODE or 1)")
    stage.add_argument("--params-file", type=Path, default=None, help=argparse.SUPPRESS)  # torchrun's children
    stage.add_argument("--shared-project", type=Path, default=None, help=argparse.SUPPRESS)  # ... in a run workspace
    tune = sub.add_parser("tune", help="run or continue the hyperparameter study (tune stage) with N workers")
    tune.add_argument("--workers", type=int, default=1, help="worker processes sharing one study (default 1)")
    tune.add_argument("--dashboard", nargs="?", type=int, const=8080, default=None, metavar="PORT",
                      help="serve optuna-dashboard on 127.0.0.1:PORT (default 8080) while the study runs")
    dashboard = sub.add_parser("dashboard", help="optuna-dashboard over the live study storage (tasks/tune/dashboard.py)")
    dashboard.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback)")
    dashboard.add_argument("--port", type=int, default=8080, help="TCP port (default 8080)")
    from tuneline.core.config.overrides import add_override_option

    for p in (run, stage, tune, dashboard):
        add_override_option(p)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # as global
    run.add_argument("--force", action="store_true", help="rerun every stage even if DVC reports it unchanged")
    dvc_yaml = sub.add_parser("dvc-yaml", help="write dvc.yaml from the stage table (code deps derived from imports)")
    dvc_yaml.add_argument("--check", action="store_true", help="only compare: exit 1 with a diff when it is stale")
    sub.add_parser("code-fingerprint", help="refresh .tuneline/code/<stage>.json (dvc.yaml's `code` stage, when "
                                            "Tuneline's code lives outside the project)")
    docs = sub.add_parser("config-docs", help="write params.yaml's comments and docs/configuration.md's knob table "
                                              "from core/config/")
    docs.add_argument("--check", action="store_true", help="only compare: exit 1 when either is stale")
    run.add_argument("--no-push", action="store_true", help="skip the final `dvc push`")
    from tuneline.flows.models_cli import add_models_parser

    add_models_parser(sub)
    from tuneline.serving.cli import add_commands

    add_commands(sub)  # serve, predict
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    root = args.project.resolve()
    _default_environment(root)
    if args.command == "run":  # before Prefect is imported: the temporary server it starts reads the same setting
        from tuneline.flows.prefect_logging import quiet_server_pool_logs

        quiet_server_pool_logs(Path(os.environ["PREFECT_HOME"]))
    if args.command in ("serve", "predict"):  # their own settings (env + flags) and logging (JSON lines)
        from tuneline.serving.cli import run_command

        return run_command(args, root)
    if args.command in ("dvc-yaml", "code-fingerprint", "config-docs"):
        return _run_generator(args.command, root, getattr(args, "check", False))
    from tuneline.core.config.overrides import parse_overrides
    from tuneline.core.config.params import load_params
    from tuneline.core.errors import TunelineError

    if args.command == "init":
        return _run_init(args)
    if args.command == "upgrade":
        return _run_upgrade(root, args.debug)
    if args.command in ("stage", "tune"):  # under `run`, Prefect's own logging set-up prints and ships the logs
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("tuneline.tasks").setLevel(logging.INFO)  # stage progress lines, under Prefect's handlers too
    for chatty in ("onnxscript", "onnx_ir", "httpx"):  # per-pass exporter notes and per-request lines
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        if args.command == "run":
            from tuneline.flows.upgrade import check_upgraded

            check_upgraded(root)  # an earlier release's project: one line naming `tuneline upgrade`, not an ImportError
        overrides = parse_overrides(args.overrides)
        params = load_params(root / "params.yaml", overrides)  # validate before importing heavy machinery
        if args.command == "stage":
            from tuneline.flows.stages import run_stage, train

            if args.params_file:  # a torchrun child: exactly the launcher's params
                from tuneline.core.config.params import Params

                params = Params.model_validate_json(args.params_file.read_text())
            if args.nproc_per_node is not None:
                if args.name != "train":
                    print("tuneline: error: --nproc-per-node applies to the train stage only", file=sys.stderr)
                    return 2
                if args.nproc_per_node < 1:
                    print("tuneline: error: --nproc-per-node must be at least 1", file=sys.stderr)
                    return 2
                train(params, root, args.shared_project, nproc_per_node=args.nproc_per_node)
                return 0
            run_stage(args.name, params, root, args.shared_project)
            return 0
        if args.command == "tune":
            return _run_tune(params, root, args.workers, args.dashboard)
        if args.command == "dashboard":
            from tuneline.flows.environment import Environment
            from tuneline.tasks.tune.dashboard import serve_dashboard
            from tuneline.tasks.tune.storage import storage_url

            study_dir = params.paths.resolve(root).study_db.parent
            return serve_dashboard(storage_url(params.tune, study_dir, Environment.read().tune_storage), args.host, args.port)
        if args.command == "models":
            from tuneline.flows.models_cli import run_models

            return run_models(args, params, root)
        return _run_pipeline(root, overrides, force=args.force, push_data=not args.no_push, debug=args.debug)
    except TunelineError as exc:  # one line and one exit-code rule for every command (core/errors.py)
        return _report_failure(args.command, exc, args.debug)
    except Exception as exc:  # a stage's own error that predates TunelineError: one line, exit 1
        if type(exc).__module__.startswith("tuneline.tasks."):
            return _report_failure(args.command, exc, args.debug)
        raise


def _report_failure(command: str, exc: BaseException, debug: bool) -> int:
    """`tuneline: <command> failed: <one line>`, then the error's details (a gate table) once; the exit code."""
    if debug:
        traceback.print_exception(exc)
    print(f"tuneline: {command} failed: {exc}", file=sys.stderr)
    if details := getattr(exc, "details", ""):
        print(f"\n{details}", file=sys.stderr)
    return getattr(exc, "exit_code", 1)


class _ExpectedFailureFilter(logging.Filter):
    """Terminal only: drop Prefect's task/flow failure records that carry a TunelineError and its traceback.

    The CLI reports such an error itself, once (`_report_failure`); the API handler, which Prefect's run loggers
    call before the root logger's console handler, has already sent the records to the run's logs (the UI).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        from tuneline.core.errors import TunelineError

        return not (record.exc_info and isinstance(record.exc_info[1], TunelineError))


def _run_generator(command: str, root: Path, check: bool) -> int:
    """dvc.yaml, the code fingerprints and the config docs: files derived from the code, written or checked."""
    from tuneline.flows import config_docs, dvc_yaml

    if command == "code-fingerprint":
        for path in dvc_yaml.write_fingerprints(root):
            print(f"code fingerprint: {path}")
        return 0
    if command == "dvc-yaml":
        diff = dvc_yaml.stale_diff(root)
        if check:
            print(diff or "dvc.yaml: up to date", file=sys.stderr if diff else sys.stdout)
            return 1 if diff else 0
        print(f"written: {dvc_yaml.write(root)}" if diff else "dvc.yaml: up to date")
        return 0
    stale = config_docs.stale_files(root)
    if check:
        for path in stale:
            print(f"{path}: stale: run `tuneline config-docs`", file=sys.stderr)
        return 1 if stale else 0
    for path in config_docs.write(root):
        print(f"written: {path}")
    return 0


def _run_init(args) -> int:
    from tuneline.flows.init import init_project
    from tuneline.core.errors import TunelineError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        target = init_project(args.dir, args.example, args.data, args.remote)
    except TunelineError as exc:
        return _report_failure("init", exc, args.debug)
    started = args.example or ("chosen from --data" if args.data else "mnist")
    print(f"Tuneline project ready: {target} (example {started})\n  cd {target} && tuneline run")
    return 0


def _run_upgrade(root: Path, debug: bool) -> int:
    from tuneline import __version__
    from tuneline.core.errors import TunelineError
    from tuneline.flows.upgrade import upgrade_project

    try:
        changes, notes = upgrade_project(root)
    except TunelineError as exc:
        return _report_failure("upgrade", exc, debug)
    for note in notes:
        print(f"note: {note}")
    if not changes:
        print(f"nothing to upgrade: {root} is up to date for Tuneline {__version__}")
        return 0
    print(f"upgraded {root} for Tuneline {__version__}:")
    for change in changes:
        print(f"  {change.path.relative_to(root)}: {change.why}")
    if tracked := [str(change.path.relative_to(root)) for change in changes if change.commit]:
        print(f"commit them: git add {' '.join(tracked)} && git commit -m 'tuneline upgrade'")
    return 0


def _run_tune(params, root: Path, workers: int, dashboard_port: int | None = None) -> int:
    from contextlib import nullcontext

    from tuneline.flows.environment import Environment
    from tuneline.flows.stages import tune
    from tuneline.tasks.tune.live_dashboard import dashboard_beside
    from tuneline.tasks.tune.storage import storage_url

    if workers < 1:
        print("tuneline: error: --workers must be at least 1", file=sys.stderr)
        return 2
    url = storage_url(params.tune, params.paths.resolve(root).study_db.parent, Environment.read().tune_storage)
    with dashboard_beside(url, port=dashboard_port) if dashboard_port is not None else nullcontext():
        result = tune(params, root, workers=workers)
    if not params.tune.enabled:
        print("tune: disabled (tune.enabled=false)")
        return 0
    print(f"study {result.study_name}: trials {result.states}; best val_accuracy {result.best_value:.4f}")
    print(f"  best params: {result.best_params}")
    print(f"  written: {result.best_params_path}, {result.trials_csv}")
    return 0


def _run_pipeline(root: Path, overrides: dict, force: bool, push_data: bool, debug: bool = False) -> int:
    from tuneline.flows.pipeline import pipeline  # imports Prefect, which sets up its logging

    if not debug:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_ExpectedFailureFilter())
    state = pipeline(overrides=overrides, project_dir=str(root), force=force, push_data=push_data,
                     return_state=True)
    if not state.is_completed():
        from tuneline.core.errors import TunelineError

        error = state.result(raise_on_failure=False)
        if isinstance(error, TunelineError):  # with --debug, Prefect's failure lines above carry the tracebacks
            return _report_failure("run", error, debug=False)
        print(f"tuneline: run {state.name}: {state.message}", file=sys.stderr)
        return 1
    summary = state.result()
    print(f"\nTuneline run completed: test accuracy {summary['accuracy']:.4f}")
    print(f"  ONNX model:   {summary['onnx_path']}")
    print(f"  registry:     {summary['registry_path']}: {summary['promotion']}")
    if summary.get("experiment"):  # a run with overrides: its own workspace, recorded as a DVC experiment
        print(f"  experiment:   {summary['experiment']} (dvc exp show; `dvc exp apply {summary['experiment']}` "
              "applies its params to the checkout)")
    else:
        print(f"  run summary:  {summary['summary_path']}")
    print(f"  data version: {summary['data_version']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
