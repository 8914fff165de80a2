"""The Tuneline pipeline as a Prefect flow: fetch → prepare → train → evaluate/gate → export → promote → dvc push.

Each stage is one task around the same function `tuneline stage NAME` (and so dvc.yaml) runs. After a
stage runs, the flow `dvc commit`s it, so dvc.lock always describes the workspace; a stage DVC reports
unchanged is skipped, so a re-run with nothing changed trains nothing (pass `force=True` to rerun all).
Then `promote` registers the exported model in the registry and moves the champion alias only if it beats
the champion on this run's test set; the registry folder is `dvc add`-ed and pushed with the rest.
A failed gate (quality, serving cost or champion regression) fails the run with a one-line reason as its
state message and the gate table in the run's markdown artifact; nothing is promoted. Stage code logs under
`tasks`; `route_stage_logs` sends those lines to the flow run's logs (a worker's runs included).
"""

from __future__ import annotations

import csv
import json
import logging
import urllib.request
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler
from prefect.runtime import flow_run

from tuneline.flows import stages
from tuneline.flows.environment import Environment
from tuneline.flows.dvc_yaml import stale_diff as dvc_yaml_diff
from tuneline.flows.dvc_yaml import write as write_dvc_yaml
from tuneline.flows.dvc_yaml import write_fingerprints as refresh_code_fingerprints
from tuneline.flows.workspace import Workspace, open_workspace, save_experiment
from tuneline.core.atomic import write_bytes_atomic
from tuneline.core.config.params import Params, load_params
from tuneline.tasks.evaluate.gate import GateFailed
from tuneline.tasks.evaluate.report import EvalReport
from tuneline.tasks.ship.export_report import ExportReport
from tuneline.tasks.lineage import git_commit
from tuneline.tasks.ship.promote import PromoteResult
from tuneline.tasks.ship.registry import Registry
from tuneline.tasks.summary import render_summary, tuning_links
from tuneline.tasks.tune.pareto import pareto_markdown
from tuneline.tasks.tune.results import apply_best_params, tuning_summary
from tuneline.tasks.versioning import (commit_stage, data_version, push, restore_stage, stage_changed, stage_fingerprint,
                              track_folder)

# Tasks are thin: no logic beyond calling the stage.
_task_options = {"cache_policy": NO_CACHE, "persist_result": False}
STAGE_LOGGER = "tuneline.tasks"  # every stage module logs under it (tuneline.tasks.train.epochs, tuneline.tasks.evaluate.evaluate, ...)


def route_stage_logs(*_hook_args) -> None:
    """Send the stage code's INFO lines (epochs, metrics, gates) to this flow run's logs, however it was started.

    Prefect gives the loggers named in PREFECT_LOGGING_EXTRA_LOGGERS its API handler but not a level, so in a
    worker's flow-run process `tasks` stayed at the root logger's WARNING and not one stage line reached the
    run's logs (the CLI happened to set INFO itself). The flow's on_running hook: CLI, worker, a plain call.
    """
    stage_logger = logging.getLogger(STAGE_LOGGER)
    if stage_logger.getEffectiveLevel() > logging.INFO:
        stage_logger.setLevel(logging.INFO)
    if not any(isinstance(h, APILogHandler) for h in stage_logger.handlers):  # PREFECT_LOGGING_EXTRA_LOGGERS unset
        handler = APILogHandler()
        handler.addFilter(lambda _record: bool(FlowRunContext.get() or TaskRunContext.get()))  # no run: nowhere to send
        stage_logger.addHandler(handler)


def skip_stage(root: Path, name: str, force: bool) -> bool:
    """The skip decision before each stage: True only when `dvc status` reports nothing for it (deps, params *and*
    outs), so a deleted or edited output is never taken as cached. False also makes the flow refresh the stage's
    Prefect cache, whose key (below) sees deps and params only."""
    return not force and not stage_changed(root, name)


def _stage_cache_key(context, arguments: dict) -> str | None:
    """A stage's Prefect cache key is DVC's view of its inputs: dep hashes (data and code) + params values.

    The flow only lets a cached result stand when `dvc status` agrees the stage is unchanged (outs
    included); otherwise it refreshes the cache, so a deleted or edited output is never "cached".
    """
    if arguments.get("force"):
        return None
    return f"tuneline-{arguments['name']}-{stage_fingerprint(arguments['root'], arguments['name'])}"


# No retries on stages: a training failure should be loud, and the I/O inside (DVC) is local.
@task(name="dvc-stage", task_run_name="{name}", cache_key_fn=_stage_cache_key, persist_result=True)
def dvc_stage(name: str, params: Params, root: Path, project: Path, force: bool, unchanged: bool) -> str:
    """Run one stage unless DVC says nothing it depends on changed; then record it in dvc.lock."""
    logger = get_run_logger()
    if unchanged:
        logger.info("%s: unchanged since dvc.lock (deps, params and outs match): skipped", name)
        return "skipped"
    if not force and restore_stage(root, name):
        logger.info("%s: restored from DVC's run-cache (an earlier run had the same deps and params)", name)
        return "restored"
    result = stages.run_stage(name, params, root, project)
    commit_stage(root, name)
    logger.info("%s: done, recorded in dvc.lock: %s", name, _describe(result))
    return "ran"


@task(name="promote", **_task_options)
def promote_model(params: Params, root: Path, project: Path) -> PromoteResult:
    """Register the exported model in the project's registry; promote it if it beats the champion."""
    result = stages.promote(params, root, project, run_id=str(flow_run.id) if flow_run.id else None)
    get_run_logger().info("promote: %s", result.reason)
    return result


@task(name="dvc-track-registry", **_task_options)
def track_registry(params: Params, project: Path) -> str:
    """`dvc add` the project's registry, holding its lock so the recorded state is one a reader could have seen."""
    registry = Registry(params.paths.resolve(project).registry)
    with registry.locked():
        return track_folder(project, params.paths.registry)


@task(name="notify-server", retries=3, retry_delay_seconds=[1, 5, 15], **_task_options)
def notify_server(params: Params, promotion: PromoteResult) -> str:
    """Ask the configured inference server to load the new champion (its repository load endpoint)."""
    url = params.serve.notify_url
    if not url:
        return "no inference server configured (serve.notify_url): not notified"
    name = stages.model_name(params)
    request = urllib.request.Request(f"{url.rstrip('/')}/v2/repository/models/{name}/load", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    environment = Environment.read()
    if token := environment.serve_admin_token or environment.serve_token:  # admin token: serving/admin.py
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.loads(response.read() or b"{}")
    return f"inference server {url}: loaded {answer.get('name', name)} version {answer.get('version')} as {answer.get('role')}"


def _notify(params: Params, promotion: PromoteResult, logger) -> str:
    """Notify the server, after the promotion is recorded: a server that cannot be reached is a warning, not a failed
    run (the champion is promoted and tracked either way, and the server's registry watch picks it up)."""
    state = notify_server(params, promotion, return_state=True)
    if state.is_completed():
        return state.result()
    reason = state.message or state.name
    try:
        state.result()
    except Exception as exc:  # the last retry's error
        reason = str(getattr(exc, "reason", None) or exc)
    logger.warning(f"inference server {params.serve.notify_url}: not notified of {promotion.version} ({reason}); "
                   "it loads the champion at its next registry poll (serve.reload_poll_s), or POST its load route")
    return "inference server not notified (see the warning above)"


@task(name="dvc-push", retries=2, retry_delay_seconds=[2, 10], **_task_options)
def dvc_push(root: Path) -> str:
    return push(root)


def _describe(result: Any) -> str:
    fields = getattr(result, "__dataclass_fields__", {})
    shown = {k: getattr(result, k) for k in fields if k in ("counts", "best_val_accuracy", "device", "max_abs_diff",
                                                                  "resumed_from_epoch")}
    return ", ".join(f"{k}={v}" for k, v in shown.items()) or type(result).__name__


def _run_name() -> str:
    overrides = flow_run.parameters.get("overrides") or {}
    shown = ",".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(overrides.items())) or "defaults"
    return f"tuneline[{shown}]"


@flow(name="tuneline", flow_run_name=_run_name, log_prints=True, validate_parameters=True,
      on_running=[route_stage_logs])
def pipeline(overrides: dict[str, Any] | None = None, project_dir: str = ".", force: bool = False,
             push_data: bool = True) -> dict:
    """Run the whole pipeline. `overrides` are params.yaml keys, e.g. {"train.lr": 0.01}, validated before any
    work. Without overrides the run is the checkout's own; with them it runs in a workspace of its own and is
    saved as a DVC experiment: the checkout's params.yaml, dvc.lock and outputs are never modified."""
    logger = get_run_logger()
    project = Path(project_dir).resolve()
    params = load_params(project / "params.yaml", overrides)  # fails fast on an unknown key or a bad value
    with open_workspace(project, overrides, logger) as workspace:
        return _run(params, workspace, force, push_data, logger)


def _run(params: Params, workspace: Workspace, force: bool, push_data: bool, logger) -> dict:
    ran = {}
    root, project = workspace.root, workspace.project
    # dvc.yaml follows params.yaml where the user's files are concerned (an image folder, a loader's or a
    # network factory's module): regenerated here when the run's params name other ones than it lists.
    if dvc_yaml_diff(root):
        logger.info("dvc.yaml: regenerated for this run's params (%s)", write_dvc_yaml(root))
    refresh_code_fingerprints(root)  # code outside the project: its hashes are deps too (flows/dvc_yaml.py)
    try:
        for name in stages.STAGES:
            unchanged = skip_stage(root, name, force)
            state = dvc_stage.with_options(refresh_cache=not unchanged)(name, params, root, project, force,
                                                                       unchanged, return_state=True)
            ran[name] = "cached" if state.name == "Cached" else state.result()
        promotion = promote_model(params, root, project)
    except GateFailed as exc:
        # The run's state message is the one-line reason; the table goes to the UI as an artifact.
        create_markdown_artifact(markdown=f"# Tuneline run FAILED at a gate\n\n{exc}\n\n{exc.details}\n",
                                 key="tuneline-run-summary",
                                 description="Tuneline run: failed gate")
        raise
    logger.info(track_registry(params, project))
    if promotion.promoted:
        logger.info(_notify(params, promotion, logger))
    else:
        logger.info("not promoted: no server to notify")
    pushed = dvc_push(root) if push_data else "dvc push: skipped (push_data=False)"
    logger.info(pushed)
    summary = _summarise(params, workspace, ran, pushed, promotion)
    if workspace.isolated:
        p = params.paths
        logger.info(save_experiment(workspace, [p.export_metrics, p.confusion_png, p.train_curves_png,
                                                f"{p.tuning}/best_params.json", f"{p.tuning}/trials.csv"]))
    return summary


def _summarise(params: Params, workspace: Workspace, ran: dict[str, str], pushed: str,
               promotion: PromoteResult) -> dict:
    p = params.paths
    root, paths = workspace.root, params.paths.resolve(workspace.root, workspace.project)
    evaluation = EvalReport.read(root / p.metrics)
    exported = ExportReport.read(root / p.export_metrics)
    verdicts = [*evaluation.gates, *exported.gates, *promotion.verdicts]
    tuning = tuning_summary(root / p.tuning)
    params = apply_best_params(params, root / p.tuning / "best_params.json")  # what the model was trained with
    # A path that outlives the run's workspace: the registered file when there is one.
    registered = promotion.registered_path
    shipped = registered if workspace.isolated and registered is not None and registered.is_file() else root / p.onnx
    summary = {
        "data_version": data_version(root, p.raw),
        "params_hash": params.params_hash(),
        "git_commit": git_commit(root),
        "accuracy": evaluation.accuracy,
        "macro_f1": evaluation.macro_f1,
        "ece": evaluation.ece,
        "serving": exported.serving,
        "variants": exported.variants,
        "gates_passed": evaluation.gates_passed and exported.gates_passed,
        "onnx_path": str(shipped),
        "summary_path": str(root / p.summary),
        "experiment": workspace.experiment,
        "stages": ran,
        "version": promotion.version,
        "promoted": promotion.promoted,
        "champion": promotion.champion,
        "promotion": promotion.reason,
        "registry_path": str(paths.registry),
        "model_name": promotion.name,
        "tuning": tuning,
    }
    write_bytes_atomic(paths.summary, render_summary(params, summary, verdicts, paths, pushed).encode())
    create_markdown_artifact(markdown=render_summary(params, summary, verdicts, paths, pushed, inline_images=True),
                             key="tuneline-run-summary", description="Tuneline run summary")
    if (root / p.history).is_file():
        create_table_artifact(table=list(csv.DictReader(open(root / p.history))), key="tuneline-train-history",
                              description="Per-epoch training metrics of the model this run shipped")
    create_link_artifact(link=Path(summary["onnx_path"]).as_uri(), link_text=f"ONNX model ({summary['onnx_path']})",
                         key="tuneline-onnx-model")
    _tune_artifacts(tuning)
    return summary


def _tune_artifacts(tuning: dict) -> None:
    """The study's top trials, its Pareto front (multi-objective), and links to its plots and live dashboard."""
    if tuning.get("top_trials"):
        create_table_artifact(table=tuning["top_trials"], key="tuneline-top-trials",
                              description=f"Top trials of study {tuning['study']} (val accuracy)")
    if tuning.get("pareto"):
        create_markdown_artifact(markdown="\n".join([f"# Pareto front of study {tuning['study']}", "",
                                                     *tuning_links(tuning), *pareto_markdown(tuning)]),
                                 key="tuneline-pareto-front", description="Accuracy against serving cost; the pick")
    for name, path in (tuning.get("plots") or {}).items():
        create_link_artifact(link=Path(path).resolve().as_uri(), link_text=f"{name} plot ({path})",
                             key=f"tuneline-tune-{name}-plot")
    if tuning.get("dashboard"):
        create_link_artifact(link=tuning["dashboard"]["url"], key="tuneline-tune-dashboard",
                             link_text=f"optuna-dashboard of study {tuning['study']} (run `{tuning['dashboard']['command']}`)")
