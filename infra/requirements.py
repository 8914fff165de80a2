"""Print pyproject.toml's dependencies, one per line, for `pip install -r` in the images.

    python infra/requirements.py pyproject.toml             everything (the training/worker image)
    python infra/requirements.py --serving pyproject.toml   what `tuneline serve` needs (the inference image)

Installing the dependencies in their own layer, before the code is copied, keeps that layer (gigabytes of
CUDA wheels) cached across code edits. The serving set leaves out the training stack: the server never
imports it, and PyTorch alone would add gigabytes to every replica. tests/infra checks that claim against
the server's real imports.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

# Distributions only the pipeline (train, tune, export, orchestration) uses; import names are the same.
# psycopg: the driver of a PostgreSQL Optuna study (TUNELINE_TUNE_STORAGE), a tuning concern only.
# optuna-dashboard (`tuneline dashboard`) requires optuna itself, so keeping it would bring the study stack along.
TRAINING_ONLY = frozenset({"torch", "torchvision", "onnxscript", "prefect", "dvc", "optuna", "optuna-dashboard",
                           "plotly", "psycopg", "sqlalchemy", "psutil", "aiohttp"})


def name_of(requirement: str) -> str:
    """'onnxruntime-gpu>=1.20,<2; sys_platform == "linux"' -> 'onnxruntime-gpu' (normalised)."""
    return re.split(r"[\s<>=!~;\[(@]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def requirements(pyproject: Path, serving: bool = False) -> list[str]:
    deps = tomllib.loads(Path(pyproject).read_text())["project"]["dependencies"]
    return [dep for dep in deps if not (serving and name_of(dep) in TRAINING_ONLY)]


def main(argv: list[str]) -> int:
    serving = "--serving" in argv
    paths = [arg for arg in argv if arg != "--serving"]
    if len(paths) != 1:
        print("usage: requirements.py [--serving] PYPROJECT", file=sys.stderr)
        return 2
    print("\n".join(requirements(Path(paths[0]), serving)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
