"""What produced a model: the DVC hash of its data, the hash of its params and the git commit of its code."""

from __future__ import annotations

import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Lineage:
    data_version: str  # DVC md5 of paths.raw (a ".dir" hash), as recorded by `dvc commit` / `dvc repro`
    params_hash: str   # Params.params_hash(): sha256 of every value that shapes the model
    git_commit: str    # HEAD of the project, suffixed "-dirty" when tracked files differ from it

    def to_dict(self) -> dict:
        return asdict(self)


def git_commit(project_dir: Path) -> str:
    """HEAD's sha (+ '-dirty' with uncommitted changes to tracked files), or 'unknown' outside a git repo."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=project_dir, capture_output=True, text=True, check=True).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"
    # dvc.lock, params.yaml, metrics and *.dvc (the registry's pointer) change with every run by design; not "code".
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!dvc.lock", ":!params.yaml", ":!metrics",
                ":!*.dvc")
    return f"{sha}-dirty" if dirty else sha
