"""Python with the training stack made unimportable, as it is in the serving image (infra/requirements.py
--serving leaves it out): a sys.meta_path finder, first in line, raises ModuleNotFoundError for each of these
packages and their submodules, exactly what an interpreter without them raises. Used by
tests/serving/test_torch_free.py and tests/infra/test_infra.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TRAINING_STACK = ("torch", "torchvision", "prefect", "dvc", "optuna")

# Prepended to the script a subprocess runs: the finder is installed before anything of Tuneline is imported.
BLOCKER = f"""
import importlib.abc, sys

class BlockTrainingStack(importlib.abc.MetaPathFinder):
    blocked = frozenset({TRAINING_STACK!r})

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.blocked:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: not in the serving image)", name=name)
        return None

sys.meta_path.insert(0, BlockTrainingStack())
for _name in list(sys.modules):  # nothing may come from a copy loaded before the finder (site hooks)
    if _name.partition(".")[0] in BlockTrainingStack.blocked:
        raise SystemExit(f"{{_name}} was imported before the blocker")
"""


def run_without_training_stack(script: str, cwd: Path, timeout: float = 120,
                                args: list[str] = ()) -> subprocess.CompletedProcess:
    """Run `script` (sys.argv[1:] = `args`) in a fresh interpreter with the training stack blocked; stdout and
    stderr as text."""
    return subprocess.run([sys.executable, "-c", BLOCKER + script, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
