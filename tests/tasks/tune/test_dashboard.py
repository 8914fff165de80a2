"""`tuneline dashboard`: optuna-dashboard over the project's study storage, loaded in a real headless Chromium.

The dashboard is a JavaScript app, so the page is rendered by Debian's `chromium` (--headless --dump-dom with a
virtual-time budget that lets its API calls finish); the rendered DOM must list every trial of the study.
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


from tuneline.core.config.params import build_params
from tuneline.tasks.tune.study import create_study
from tests.conftest import require_or_skip

REPO = Path(__file__).resolve().parents[3]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rendered_text(url: str) -> str:
    """The page's text after its scripts ran, in headless Chromium (no sandbox: tests may run as root)."""
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          "--virtual-time-budget=10000", url], capture_output=True, text=True, timeout=90)
    body = out.stdout[out.stdout.find("<body"):]
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", body))


def test_the_dashboard_lists_the_study_trials_in_a_headless_browser(tmp_path):
    if CHROMIUM is None:  # CI installs it (.ci/run) and sets TUNELINE_REQUIRE_CHROMIUM=1: missing there is a failure
        require_or_skip("Debian's `chromium` is not installed (`apt-get install -y chromium`; .ci/run installs it)",
                        "TUNELINE_REQUIRE_CHROMIUM")
    study_db = tmp_path / "tuning" / "study.db"
    study_db.parent.mkdir()
    (tmp_path / "params.yaml").write_text("{}\n")  # every default: the study lives in tuning/study.db
    study = create_study(build_params({}, {}).tune, "tuneline-dashboard-test", f"sqlite:///{study_db}")
    for value in (0.91, 0.95, 0.93):  # a real study in the project's storage, told as the tuner tells it
        trial = study.ask()
        trial.suggest_float("train.lr", 1e-4, 1e-2, log=True)
        study.tell(trial, value)

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tuneline.flows.cli", "--project", str(tmp_path), "dashboard",
                               "--port", str(port)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/meta", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the dashboard did not start"
                time.sleep(0.2)
        text = rendered_text(f"http://127.0.0.1:{port}/dashboard/studies/{study._study_id}/trials")
    finally:
        server.terminate()
        output = server.communicate(timeout=30)[0]
    assert f"tuneline-dashboard-test: http://127.0.0.1:{port}/dashboard/studies/{study._study_id}" in output
    assert "3 Trials" in text
    assert all(f"Trial {n} Complete" in text for n in range(3)), text[:500]
    assert "Best Trial" in text


def test_a_project_without_a_study_is_a_clear_error(tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    out = subprocess.run([sys.executable, "-m", "tuneline.flows.cli", "--project", str(tmp_path), "dashboard"], cwd=REPO,
                         capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 2
    assert out.stderr.strip() == (f"tuneline: dashboard failed: dashboard: no study storage at {tmp_path}/tuning/study.db: "
                                  "run `tuneline tune` (or `tuneline run`) first, or point tune.storage / "
                                  "$TUNELINE_TUNE_STORAGE at the study's database")
    assert not (tmp_path / "tuning").exists()  # nothing created
