"""tests/conftest.py's require_or_skip: a test whose data or tool is missing skips on a workstation and fails in CI
(CI=true, as .ci/run exports; or its TUNELINE_REQUIRE_* variable set to 1)."""

from __future__ import annotations

import pytest

from tests.conftest import require_or_skip

pytestmark = pytest.mark.fast


def outcome(require, environment: dict[str, str], monkeypatch) -> str:
    for key in ("CI", "TUNELINE_REQUIRE_X"):
        monkeypatch.delenv(key, raising=False)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    try:
        require("data/x.tar.gz not present", "TUNELINE_REQUIRE_X")
    except pytest.fail.Exception as failure:
        return f"failed: {failure}"
    except pytest.skip.Exception as skip:
        return f"skipped: {skip}"
    return "went on"


def check_require(require, monkeypatch) -> None:
    assert outcome(require, {}, monkeypatch) == "skipped: data/x.tar.gz not present"
    assert outcome(require, {"CI": "false"}, monkeypatch).startswith("skipped:")
    failed = outcome(require, {"CI": "true"}, monkeypatch)
    assert failed.startswith("failed: data/x.tar.gz not present") and "CI=true" in failed, failed
    assert outcome(require, {"TUNELINE_REQUIRE_X": "1"}, monkeypatch).startswith("failed: data/x.tar.gz not present")


def always_skip(reason: str, variable: str | None = None) -> None:  # a mutant: the silent skip issue 22 found
    pytest.skip(reason)


def test_a_missing_input_skips_here_and_fails_in_ci(monkeypatch):
    check_require(require_or_skip, monkeypatch)
    with pytest.raises(AssertionError):
        check_require(always_skip, monkeypatch)
