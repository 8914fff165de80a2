"""DVC as the record of what ran: stage status, committing stages the flow ran, the data version, push.

The Prefect flow runs stages in-process (one task each) and then `dvc commit`s them, so dvc.lock always
describes the outputs in the workspace and a later `dvc repro` has nothing to redo. Before a stage runs,
the flow asks DVC whether it changed at all; an unchanged stage is skipped, exactly as `dvc repro` would.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import yaml

from tuneline.core.errors import StageFailed

log = logging.getLogger(__name__)


class VersioningError(StageFailed, RuntimeError):
    """DVC refused an operation; the message says which and why."""


@contextlib.contextmanager
def open_repo(root: Path) -> Iterator["dvc.repo.Repo"]:  # noqa: F821 (imported lazily: DVC is slow to import)
    """The project's DVC repo, its log lines printed once and its `git add` hints collected (`git_hint`), not printed."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    _route_dvc_logs()
    try:
        repo = Repo(str(root))
    except NotDvcRepoError:
        raise VersioningError(f"{root}: not a DVC project: run `dvc init` there (or run from the project folder)") from None
    _collect_git_files(repo)
    try:
        # DVC resolves some output paths against the working directory, not the repo root: a run in a
        # workspace of its own (flows/workspace.py) opens both its workspace and the project's repo.
        with contextlib.chdir(root):
            yield repo
    finally:
        repo.close()


def _route_dvc_logs() -> None:
    """Send DVC's log records through the application's handlers only.

    DVC gives its loggers their own stdout/stderr handlers when it is imported, and the records still
    propagate to the root logger: under Prefect (or any logging set-up) every DVC line, its hints included,
    was printed twice. With no handler on the root logger DVC's own ones stay, so a bare script still sees them.
    """
    from dvc.logger import LoggerHandler

    if not logging.getLogger().handlers:
        return
    for name in ("dvc", "dvc_objects", "dvc_data"):
        dvc_logger = logging.getLogger(name)
        for handler in [h for h in dvc_logger.handlers if isinstance(h, LoggerHandler)]:
            dvc_logger.removeHandler(handler)


def _collect_git_files(repo) -> None:
    """Keep the files DVC asks the user to `git add` in `repo.git_files` instead of printing its hint.

    After every `dvc add` DVC prints a multi-line "To track the changes with git, run: git add …" and "To
    enable auto staging …"; callers put the one-line `git_hint` into the result they report once per run.
    """
    context = repo.scm_context
    context.quiet = True
    repo.git_files = set()
    track_file = context.track_file

    def track_and_remember(paths=None):
        repo.git_files.update([paths] if isinstance(paths, str) else paths or [])
        return track_file(paths)

    context.track_file = track_and_remember


def git_hint(repo) -> str:
    """'; to record it in git: git add a.dvc .gitignore' for the files DVC changed, or '' (none, or core.autostage)."""
    if not repo.git_files or repo.scm_context.autostage:
        return ""
    return "; to record it in git: git add " + " ".join(sorted(repo.git_files))


def stage_changed(root: Path, stage: str) -> bool:
    """True when `dvc status` reports anything for the stage (never ran, deps/params/outs differ)."""
    with open_repo(root) as repo:
        return bool(repo.status(targets=[stage]))


def stage_fingerprint(root: Path, stage: str) -> str:
    """sha256 of what determines a stage's result, as DVC sees it: each dep's hash (data, code) and each
    params dep's values. Equal fingerprints, equal results: the Prefect cache key of the stage's task."""
    import hashlib
    import json

    with open_repo(root) as repo:
        (found,) = repo.stage.collect(stage)
        entries = []
        for dep in found.deps:
            if dep.exists:
                dep.save()  # computes the hash (DVC's state DB makes unchanged files cheap)
                entries.append([str(dep.def_path), dep.hash_info.to_dict()])
            else:
                entries.append([str(dep.def_path), None])
    return hashlib.sha256(json.dumps(entries, sort_keys=True, default=str).encode()).hexdigest()


def commit_stage(root: Path, stage: str) -> None:
    """Record the stage's current deps, params and outs in dvc.lock and its outs in the DVC cache, and the run
    in DVC's run-cache, so that any later run with the same deps and params (another workspace included)
    restores these outputs instead of recomputing them."""
    with open_repo(root) as repo:
        repo.commit(stage, force=True)
        (found,) = repo.stage.collect(stage)
        repo.stage_cache.save(found)


def restore_stage(root: Path, stage: str) -> bool:
    """Check out the stage's outputs from DVC's run-cache and record them in dvc.lock, when an earlier run with
    exactly these deps and params made them (as `dvc repro` does); False when no such run is cached.

    The lookup is by the deps' and params' current values only (DVC's run-cache key), never by the outputs
    dvc.lock records: a changed param (a gate, say) can only match a run made with that value.
    """
    with open_repo(root) as repo:
        (found,) = repo.stage.collect(stage)
        with repo.lock:  # hashing deps and checking out outputs write DVC's state: it wants its lock held
            found.save_deps()
            cache = repo.stage_cache._load(found)  # noqa: SLF001 (DVC's run-cache lookup; dvc pinned < 4)
            if not cache:
                return False
            cached = repo.stage_cache._create_stage(cache, wdir=found.wdir)  # noqa: SLF001
            if not cached.outs_cached():
                return False
            found.remove_outs(ignore_remove=False, force=True)  # the stage's old outputs, as `dvc repro` does
            cached.checkout()
        repo.commit(stage, force=True)
    return True


def data_version(root: Path, raw_path: str) -> str:
    """The DVC md5 of the raw data: the hash dvc.lock records for the fetch stage's output.

    Outside a DVC run (no lock entry yet) the hash is computed the way DVC computes it, so a model
    trained by hand still names its data.
    """
    lock = Path(root) / "dvc.lock"
    if lock.is_file():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for out in stages.get("fetch", {}).get("outs", []):
            if Path(out["path"]) == Path(raw_path) and out.get("md5"):
                return out["md5"]
    with open_repo(root) as repo:
        (stage,) = repo.stage.collect("fetch")
        return stage.outs[0].get_hash().value


def track_folder(root: Path, relative: str) -> str:
    """`dvc add` a folder the pipeline accumulates (the model registry); returns a one-line account.

    A registry is not a DVC stage output: its content is the history of every run and promotion, not a
    function of one stage's deps, so it is tracked as data (`<folder>.dvc`) and pushed with everything else.
    A folder outside the project cannot be tracked by this project's DVC and is reported, not an error.
    """
    root = Path(root).resolve()
    folder = (root / relative).resolve()
    if not folder.is_relative_to(root):
        return f"{folder}: outside the project: not DVC-tracked here"
    with open_repo(root) as repo:
        repo.add(str(folder.relative_to(root)))
        hint = git_hint(repo)
    return f"{folder.relative_to(root)}: recorded in {folder.relative_to(root)}.dvc{hint}"


def push(root: Path) -> str:
    """`dvc push` to the default remote; returns a one-line account of it."""
    from dvc.exceptions import DvcException

    with open_repo(root) as repo:
        try:
            pushed = repo.push()
        except DvcException as exc:
            raise VersioningError(f"dvc push failed: {exc}: check `dvc remote list` and that the remote is reachable") from None
        remote = repo.config["core"].get("remote", "(none)")
    return f"dvc push: {pushed} file(s) to remote '{remote}'"
