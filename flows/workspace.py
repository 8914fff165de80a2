"""Where a pipeline run executes: the checkout itself, or (with overrides) a workspace of its own.

A run without overrides runs in the checkout under the checkout's lock, as `make run` does. A run with
overrides never touches the checkout's params.yaml, dvc.lock, metrics/ or reports/: it runs in a git
worktree of the checkout under `.tuneline/runs/<experiment>/`, set up as follows.

- **What it starts from:** the checkout's params.yaml and dvc.yaml (as they are on disk) plus the
  overrides, and the checkout's version of every code file the stages run (so DVC hashes the code
  that runs). A code file git does not track cannot be in a worktree: the run stops and names it.
- **No data is copied:** the workspace uses the checkout's DVC cache (`cache.dir`), restores the outputs
  the checkout's dvc.lock records from it, and DVC then skips every stage the overrides do not touch.
- **What stays with the project** (PathsConfig's project-scoped paths): the registry and its lock, the
  Optuna study storage and the training checkpoints, so a promotion lands in the project's registry,
  studies continue across runs and a crashed run resumes from its checkpoint.
- **The record:** a run that completes is saved with `dvc exp save` as experiment `<experiment>`:
  `dvc exp show` lists its params and metrics, `dvc exp apply <experiment>` applies it to the checkout
  (an explicit act, never done by a run).
- **Clean-up:** the worktree is removed when the run ends, whatever the outcome; a workspace left by a
  run that was killed is removed by the next run (its lock is free).

Two runs with overrides run side by side, each in its own workspace and judged by its own gates; the
registry's champion comparison stays under the registry's lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock, Timeout

from tuneline.flows.params_file import write_overrides
from tuneline.core.config.base import ConfigError

RUNS_DIR = ".tuneline/runs"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Workspace:
    project: Path            # the checkout: registry, study storage and checkpoints live here
    root: Path               # where this run's stage outputs are written
    experiment: str | None   # the DVC experiment it is saved as; None when the run is the checkout's own

    @property
    def isolated(self) -> bool:
        return self.root != self.project


def experiment_name(overrides: dict[str, Any]) -> str:
    """`run-20261202-031502-3f9a1c`: when it started, and a hash of its overrides (sortable, readable)."""
    digest = hashlib.sha256(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:6]
    return f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid() % 1000:03d}{digest}"


def _git(project: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=project, capture_output=True, text=True)
    if result.returncode != 0:
        raise ConfigError(f"git {' '.join(args)} in {project}: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def _dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    # The DVC of this interpreter (whatever PATH holds), in a subprocess: its CLI commands open their own repo.
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "DVC_NO_ANALYTICS": "1"})


def _code_deps(project: Path) -> list[str]:
    """The files dvc.yaml lists as deps that are not stage outputs (code, for Tuneline's own stages).

    In a `tuneline init` project the stages depend on the `code` stage's fingerprints of the installed Tuneline
    (.tuneline/code/*.json): outputs, which the workspace's own `code` stage writes, so git need not track them.
    """
    stages = (yaml.safe_load((project / "dvc.yaml").read_text()) or {}).get("stages", {})
    outs = {next(iter(out)) if isinstance(out, dict) else str(out)
            for stage in stages.values() for out in stage.get("outs", [])}
    deps = {str(dep) for stage in stages.values() for dep in stage.get("deps", []) if "${" not in str(dep)}
    return sorted(deps - outs)


def _tracked(project: Path, paths: list[str]) -> set[str]:
    return set(_git(project, "ls-files", "--", *paths).split()) if paths else set()


def clean_stale(project: Path) -> list[Path]:
    """Remove the workspaces of runs that ended without cleaning up (killed): their lock is free."""
    runs = project / RUNS_DIR
    removed = []
    for lock_path in sorted(runs.glob("*.lock")) if runs.is_dir() else []:
        lock = FileLock(str(lock_path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue  # a run is still using it
        try:
            workspace = lock_path.with_suffix("")
            _remove(project, workspace)
            removed.append(workspace)
        finally:
            lock.release()
            lock_path.unlink(missing_ok=True)
    if runs.is_dir():
        _git(project, "worktree", "prune")
    return removed


def _remove(project: Path, workspace: Path) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", str(workspace)], cwd=project, capture_output=True)
    shutil.rmtree(workspace, ignore_errors=True)


def _set_up(project: Path, workspace: Path, overrides: dict[str, Any]) -> None:
    _git(project, "worktree", "add", "--detach", "--quiet", str(workspace), "HEAD")
    deps = _code_deps(project)
    tracked = _tracked(project, deps)  # one `git ls-files` for all of them
    untracked = [dep for dep in deps if (project / dep).is_file() and dep not in tracked]
    if untracked:
        raise ConfigError(f"{untracked[0]}: git does not track it, so a run with overrides (which runs in a git "
                          f"worktree of {project}) cannot see it: `git add` and commit it, or run without overrides")
    # The checkout as it is on disk, not as last committed: params, the pipeline, its record and its code.
    for name in ["params.yaml", "dvc.yaml", "dvc.lock", *deps]:
        if (project / name).is_file():
            (workspace / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(project / name, workspace / name)
    if (project / ".dvc" / "config.local").is_file():
        shutil.copy2(project / ".dvc" / "config.local", workspace / ".dvc" / "config.local")
    _share_dvc_cache_and_remotes(project, workspace)
    write_overrides(workspace / "params.yaml", overrides)
    restored = _dvc(workspace, "checkout", "--quiet")  # unchanged stages' outputs, from the shared cache
    if restored.returncode != 0:
        log.info("workspace: some outputs are not in the DVC cache; their stages will run (%s)",
                 restored.stderr.strip().splitlines()[-1] if restored.stderr.strip() else "dvc checkout failed")


def _share_dvc_cache_and_remotes(project: Path, workspace: Path) -> None:
    """The workspace uses the checkout's cache; remotes named by a relative path keep pointing where they did."""
    from tuneline.tasks.versioning import open_repo

    with open_repo(project) as repo:
        cache_dir = repo.cache.local_cache_dir
        remotes = {name: conf.get("url", "") for name, conf in repo.config.get("remote", {}).items()}
    _dvc(workspace, "cache", "dir", "--local", str(cache_dir))
    for name, url in remotes.items():
        if url and "://" not in url and Path(url).is_absolute():
            _dvc(workspace, "remote", "modify", "--local", name, "url", url)


@contextlib.contextmanager
def open_workspace(project: Path, overrides: dict[str, Any] | None, logger: logging.Logger) -> Iterator[Workspace]:
    """The run's workspace: the checkout (under its lock) without overrides, else a worktree of its own."""
    project = Path(project).resolve()
    if not overrides:
        with checkout_lock(project, logger):
            yield Workspace(project, project, None)
        return
    for stale in clean_stale(project):
        logger.info("removed the workspace of a run that did not finish: %s", stale)
    name = experiment_name(overrides)
    workspace = project / RUNS_DIR / name
    workspace.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(workspace.with_suffix(".lock")))
    lock.acquire(timeout=0)
    try:
        _set_up(project, workspace, overrides)
        logger.info("run %s: in its own workspace %s (the checkout is not modified)", name, workspace)
        yield Workspace(project, workspace, name)
    finally:
        _remove(project, workspace)
        lock.release()
        workspace.with_suffix(".lock").unlink(missing_ok=True)


def save_experiment(workspace: Workspace, untracked_outputs: list[str]) -> str:
    """`dvc exp save` the workspace as its experiment; returns a one-line account."""
    include = [arg for path in untracked_outputs if (workspace.root / path).exists() for arg in ("-I", path)]
    result = _dvc(workspace.root, "exp", "save", "--force", "-n", str(workspace.experiment), *include)
    if result.returncode != 0:
        raise ConfigError(f"dvc exp save {workspace.experiment}: {result.stderr.strip() or result.stdout.strip()}")
    return (f"experiment {workspace.experiment}: saved (`dvc exp show` lists it; `dvc exp apply "
            f"{workspace.experiment}` applies its params to the checkout)")


@contextlib.contextmanager
def checkout_lock(project: Path, logger: logging.Logger) -> Iterator[None]:
    """One run at a time in the checkout: two would race on params.yaml, dvc.lock and the outputs."""
    lock = FileLock(str(project / ".tuneline-run.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("another pipeline run holds %s: waiting for it to finish", lock.lock_file)
        lock.acquire()
        logger.info("checkout lock acquired")
    try:
        yield
    finally:
        lock.release()
