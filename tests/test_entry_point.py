"""`python -m tuneline` is the `tuneline` command, and importing the package starts nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest


pytestmark = pytest.mark.fast


def test_python_dash_m_tuneline_is_the_tuneline_command(tmp_path):
    # From an unrelated folder: the installed package answers, not a checkout on sys.path.
    done = subprocess.run([sys.executable, "-m", "tuneline", "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage: tuneline" in done.stdout and "serve" in done.stdout and "run" in done.stdout


def test_importing_the_package_imports_none_of_its_parts(tmp_path):
    probe = ("import sys, tuneline; "
             "print(sorted(m for m in sys.modules if m.startswith('tuneline.')), tuneline.__version__)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("[] ") and done.stdout.split()[-1] != "0+unknown"
