"""The Tuneline pipeline as a Prefect flow: fetch → prepare → train → evaluate/gate → export → dvc push.

Each stage is one task around the same function `tuneline stage NAME` (and so dvc.yaml) runs. After a
stage runs, the flow `dvc commit`s it, so dvc.lock always describes the workspace; a stage DVC reports
unchanged is skipped, so a re-run with nothing changed trains nothing (pass `force=True` to rerun all).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows import stages
from flows.params_file import write_overrides
from tasks.atomic import write_bytes_atomic
from tasks.config import Params, load_params
from tasks.gate import GateVerdict
from tasks.lineage import git_commit
from tasks.summary import render_summary
from tasks.versioning import commit_stage, data_version, push, stage_changed

# Tasks are thin: no logic beyond calling the stage. Stage results are not cached by Prefect here;
# DVC decides what is unchanged (see module docstring).
_task_options = {"cache_policy": NO_CACHE, "persist_result": False}


@task(name="dvc-stage", **_task_options)
def dvc_stage(name: str, params: Params, root: Path, force: bool) -> str:
    """Run one stage unless DVC says nothing it depends on changed; then record it in dvc.lock."""
    logger = get_run_logger()
    if not force and not stage_changed(root, name):
        logger.info("%s: unchanged since dvc.lock (deps, params and outs match): skipped", name)
        return "skipped"
    result = stages.run_stage(name, params, root)
    commit_stage(root, name)
    logger.info("%s: done, recorded in dvc.lock: %s", name, _describe(result))
    return "ran"


@task(name="dvc-push", retries=2, retry_delay_seconds=[2, 10], **_task_options)
def dvc_push(root: Path) -> str:
    return push(root)


def _describe(result: Any) -> str:
    fields = getattr(result, "__dataclass_fields__", {})
    shown = {k: getattr(result, k) for k in fields if k in ("counts", "best_val_accuracy", "device", "max_abs_diff")}
    return ", ".join(f"{k}={v}" for k, v in shown.items()) or type(result).__name__


def _run_name() -> str:
    overrides = flow_run.parameters.get("overrides") or {}
    shown = ",".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(overrides.items())) or "defaults"
    return f"tuneline[{shown}]"


@flow(name="tuneline", flow_run_name=_run_name, log_prints=True, validate_parameters=True)
def pipeline(overrides: dict[str, Any] | None = None, project_dir: str = ".", force: bool = False,
             push_data: bool = True) -> dict:
    """Run the whole pipeline. `overrides` are params.yaml keys, e.g. {"train.lr": 0.01}; they are
    validated before any work and written to params.yaml (as `dvc exp run -S` does) so dvc.lock is true."""
    logger = get_run_logger()
    root = Path(project_dir).resolve()
    params_path = root / "params.yaml"
    params = load_params(params_path, overrides)  # fails fast on an unknown key or a bad value
    if overrides:
        write_overrides(params_path, overrides)
        logger.info("params.yaml updated with %s", overrides)
    ran = {}
    for name in stages.STAGES:
        ran[name] = dvc_stage(name, params, root, force)
    pushed = dvc_push(root) if push_data else "dvc push: skipped (push_data=False)"
    logger.info(pushed)
    summary = _summarise(params, root, ran, pushed)
    return summary


def _summarise(params: Params, root: Path, ran: dict[str, str], pushed: str) -> dict:
    p = params.paths
    metrics = json.loads((root / p.metrics).read_text())
    verdicts = [GateVerdict(**{k: v for k, v in g.items() if k != "margin"}) for g in metrics["gates"]]
    summary = {
        "data_version": data_version(root, p.raw),
        "params_hash": params.params_hash(),
        "git_commit": git_commit(root),
        "accuracy": metrics["accuracy"],
        "gates_passed": metrics["gates_passed"],
        "onnx_path": str(root / p.onnx),
        "summary_path": str(root / p.summary),
        "stages": ran,
    }
    markdown = render_summary(params, summary, verdicts, history_path=root / p.history, pushed=pushed)
    write_bytes_atomic(root / p.summary, markdown.encode())
    create_markdown_artifact(markdown=markdown, key="tuneline-run-summary", description="Tuneline run summary")
    return summary
