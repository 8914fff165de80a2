"""The live loop as Prefect flows: retrain on drift, promote on live evidence.

`drift_watch` (deployment tuneline/drift-watch, on an interval schedule) reads the server's live window of a model
(`GET /v2/live/<model>`, tasks/ship/live.py) and, when its drift block says `drifted` (the score over its
threshold), starts the retraining deployment (watch.deployment, default tuneline/adhoc) on the captured data:
overrides `data.source=capture`, `data.capture_model=<model>`. Then it waits out a cool-down (watch.cooldown_s):
the time of each trigger is recorded in `.tuneline/watch/<model>.json` in the project, under a file lock, so two
watches never both start a run and a run that is still training (its model not yet served, the drift still there)
is not started again and again. It does not start one either while the capture holds fewer than watch.min_labelled
labelled requests of the model (a run on them would have nothing to learn from); that does not start the cool-down.

`promote_live` (deployment tuneline/promote-live, on demand) is `tuneline models promote --live` as a flow run.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filelock import FileLock
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tuneline.core.config.params import Params, load_params
from tuneline.flows.environment import Environment
from tuneline.flows.models_cli import live_server
from tuneline.tasks.ship.live import LiveWindow, read_live

WATCH_DIR = ".tuneline/watch"  # per-model trigger records, with the project (untracked, like the capture folder)
_task_options = {"cache_policy": NO_CACHE, "persist_result": False}


@dataclass(frozen=True)
class DriftDecision:
    trigger: bool
    reason: str    # one line, with the score, threshold and cool-down


def decide_drift(window: LiveWindow, last_trigger: float | None, now: float, cooldown_s: float, labelled: int,
                 min_labelled: int) -> DriftDecision:
    """Start a retraining run? Only when the server reports drift, the cool-down since the last trigger is over, and
    the capture holds enough labelled requests (times in seconds since the epoch)."""
    drift = window.drift
    if drift is None:
        return DriftDecision(False, f"{window.model}: the server reports no drift statistic (no reference profile in "
                                    "the model, or drift off)")
    numbers = f"drift score {drift.score:.4g} vs threshold {drift.threshold:.4g} over {drift.window} requests"
    if not drift.drifted:
        return DriftDecision(False, f"{window.model}: no drift: {numbers}")
    if last_trigger is not None and now - last_trigger < cooldown_s:
        wait = cooldown_s - (now - last_trigger)
        return DriftDecision(False, f"{window.model}: drifted ({numbers}), but a retraining run was started "
                                    f"{now - last_trigger:.0f} s ago: cool-down (watch.cooldown_s {cooldown_s:.0f} s) "
                                    f"has {wait:.0f} s left")
    if labelled < min_labelled:
        return DriftDecision(False, f"{window.model}: drifted ({numbers}), but the capture holds {labelled} labelled "
                                    f"requests of it, fewer than watch.min_labelled {min_labelled}: send feedback "
                                    "labels to the server")
    return DriftDecision(True, f"{window.model}: drifted ({numbers}): retraining on {labelled} labelled captured "
                               "requests")


def capture_overrides(params: Params, model: str) -> dict[str, Any]:
    """The retraining run's overrides: the model's captured traffic as the data (keys only another source reads
    are reset, so the params validate)."""
    overrides: dict[str, Any] = {"data.source": "capture", "data.capture_model": model}
    if params.data.channels != "auto":
        overrides["data.channels"] = "auto"
    if params.data.image_size is not None:
        overrides["data.image_size"] = None
    # The audio and text sources' keys (the speech and sst2 examples set some): the captured model's spec fixes
    # its classes, clip length and tokenizer.
    for key in ("audio_folder", "label_pattern", "test_rule", "labels_file", "clip_seconds", "text_files",
                "text_column", "max_length", "class_names"):
        if getattr(params.data, key) is not None:
            overrides[f"data.{key}"] = None
    if params.data.tokenizer != "word":
        overrides["data.tokenizer"] = "word"
    return overrides


def labelled_count(params: Params, project: Path, model: str) -> int:
    from tuneline.tasks.data.capture import scan_capture
    from tuneline.tasks.data.idx import DataError

    try:
        report, _ = scan_capture(project / params.data.capture_dir, model)
    except DataError:  # no capture folder yet
        return 0
    return report.labelled


@task(name="read-live-window", retries=2, retry_delay_seconds=[2, 10], **_task_options)
def read_live_window(server: str, model: str) -> LiveWindow:
    """GET the server's live window of `model` (I/O: retried)."""
    return read_live(server, model, token=Environment.read().serve_token)


@task(name="start-retraining", **_task_options)
def start_retraining(deployment: str, overrides: dict[str, Any], model: str) -> str:
    """Create a flow run of the retraining deployment and return its id (without waiting for it)."""
    from prefect.deployments import run_deployment

    run = run_deployment(name=deployment, parameters={"overrides": overrides}, timeout=0, tags=["drift", model])
    return str(run.id)


@flow(name="tuneline-drift-watch", log_prints=True, validate_parameters=True)
def drift_watch(project_dir: str = ".", server: str | None = None, model: str | None = None) -> dict:
    """Check the server's drift score of `model` (default: the project's); start one retraining run on the captured
    data when it drifted, unless one was started within watch.cooldown_s."""
    logger = get_run_logger()
    project = Path(project_dir).resolve()
    params = load_params(project / "params.yaml")
    name = model or params.project.resolve_name(params.data)
    window = read_live_window(live_server(params, server), name)
    record_path = project / WATCH_DIR / f"{name}.json"
    record_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(record_path.with_suffix(".lock")), timeout=60):  # check and trigger as one step
        last = json.loads(record_path.read_text()) if record_path.is_file() else None
        labelled = labelled_count(params, project, name) if window.drift and window.drift.drifted else 0
        now = time.time()
        decision = decide_drift(window, last["unix_time"] if last else None, now, params.watch.cooldown_s, labelled,
                                params.watch.min_labelled)
        logger.info("drift watch: %s", decision.reason)
        result = {**asdict(decision), "model": name, "flow_run_id": None}
        if decision.trigger:
            overrides = capture_overrides(params, name)
            run_id = start_retraining(params.watch.deployment, overrides, name)
            record = {"unix_time": now, "time": datetime.fromtimestamp(now, timezone.utc).isoformat(),
                      "flow_run_id": run_id, "deployment": params.watch.deployment, "score": window.drift.score,
                      "threshold": window.drift.threshold}
            tmp = record_path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(record, indent=2) + "\n")
            tmp.replace(record_path)
            logger.info("drift watch: started %s run %s with %s", params.watch.deployment, run_id, overrides)
            result["flow_run_id"] = run_id
    return result


@task(name="promote-live", **_task_options)
def promote_on_live_evidence(params: Params, project: Path, name: str, window: LiveWindow) -> dict:
    """Promote the challenger if the live window meets gate.live_* and its offline gates held; `dvc add` the
    registry after a promotion."""
    from tuneline.tasks.ship.live import run_live_promote
    from tuneline.tasks.ship.registry import Registry
    from tuneline.tasks.versioning import VersioningError, track_folder

    registry_dir = params.paths.resolve(project).registry
    result = run_live_promote(params.gate, registry_dir, name, window)
    recorded = None
    if result.promoted:
        try:
            with Registry(registry_dir).locked():
                recorded = track_folder(project, params.paths.registry)
        except VersioningError as exc:
            recorded = f"not recorded in DVC: {exc}"
    return {"promoted": result.promoted, "reason": result.reason, "champion": result.champion,
            "numbers": result.numbers, "dvc": recorded}


@flow(name="tuneline-promote-live", log_prints=True, validate_parameters=True)
def promote_live(project_dir: str = ".", server: str | None = None, model: str | None = None) -> dict:
    """`tuneline models promote --live` as a flow run: the challenger becomes champion only on live evidence."""
    logger = get_run_logger()
    project = Path(project_dir).resolve()
    params = load_params(project / "params.yaml")
    name = model or params.project.resolve_name(params.data)
    window = read_live_window(live_server(params, server), name)
    result = promote_on_live_evidence(params, project, name, window)
    logger.info("promote --live: %s", result["reason"])
    return result
