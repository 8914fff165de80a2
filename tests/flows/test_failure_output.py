"""What a failed command prints: the one-line reason, then the details (a gate table) once, no traceback
unless --debug; the exit code follows tasks/errors.py either way."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import _ExpectedFailureFilter
from tasks.evaluate.gate import GateFailed, gate_min
from tests.flows.test_pipeline import story, story_folder  # noqa: F401  (the shared end-to-end story, run once)

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ROW = "| `gate.min_accuracy` | test accuracy |"


@pytest.mark.slow
def test_a_failed_gate_prints_the_reason_then_the_table_once_and_no_traceback(story):  # noqa: F811
    failed = story["gate_fails"]  # `tuneline run` with gate.min_accuracy=0.999 on a slice of MNIST
    assert failed.returncode == 1, failed.output
    assert "Traceback" not in failed.output
    assert failed.output.count(ROW) == 1, failed.stderr
    lines = failed.stderr.splitlines()
    (reason,) = [i for i, line in enumerate(lines) if line.startswith("tuneline: run failed: ")]
    assert re.fullmatch(r"tuneline: run failed: gate gate\.min_accuracy FAILED: test accuracy 0\.\d{4} vs threshold "
                        r"0\.9990 \(margin -0\.\d{4}\): the model is not exported", lines[reason])
    assert lines[reason + 2].startswith("| gate | metric |") and ROW in lines[reason + 4]
    # Prefect's own lines about the failure are one line each (the state messages carry the reason, not the table)
    finished = [line for line in lines if "Finished in state Failed" in line]
    assert len(finished) == 2 and all("gate gate.min_accuracy FAILED" in line for line in finished)


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
