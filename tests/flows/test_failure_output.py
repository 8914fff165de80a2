"""What a failed command prints: the one-line reason, then the details (a gate table) once, no traceback
unless --debug; the exit code follows core/errors.py either way. (What `tuneline run` prints when a gate fails is
checked in test_pipeline.py, on its shared end-to-end story: a test here that used it kept a second xdist worker
waiting for the story for two minutes.)"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from tuneline.flows.cli import _ExpectedFailureFilter
from tuneline.tasks.evaluate.gate import GateFailed, gate_min

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.mark.fast
def test_debug_adds_the_traceback_and_keeps_the_exit_code():
    bad = ["stage", "fetch", "-S", "train.epochz=1"]  # fails validation: nothing runs
    plain = subprocess.run([str(BIN / "tuneline"), *bad], cwd=REPO, capture_output=True, text=True, timeout=120,
                           check=False)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.startswith("tuneline: stage failed: ") and "train.epochz" in plain.stderr
    for args in (["--debug", *bad], [*bad, "--debug"]):  # a global flag, accepted after the command too
        debug = subprocess.run([str(BIN / "tuneline"), *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                               check=False)
        assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr, debug.stderr
        assert plain.stderr.strip().splitlines()[0] in debug.stderr


@pytest.mark.fast
def test_the_terminal_filter_drops_only_prefects_records_of_an_expected_failure():
    def record(exc: BaseException | None) -> logging.LogRecord:
        return logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1, "Encountered exception", None,
                                 (type(exc), exc, None) if exc else None)

    expected = GateFailed([gate_min("gate.min_accuracy", "test accuracy", 0.5, 0.9)])
    keep = _ExpectedFailureFilter().filter
    assert not keep(record(expected))
    assert keep(record(ValueError("a bug keeps its traceback"))) and keep(record(None))
