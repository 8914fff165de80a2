"""`tuneline tune --dashboard`: optuna-dashboard served beside a study, from before its storage exists to its end."""

import json
import socket
import time
import urllib.request

import optuna

from tuneline.tasks.tune.live_dashboard import dashboard_beside


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str, wait_s: float = 60.0):
    """GET a JSON page of the dashboard, waiting while its process starts."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
                return json.load(answer)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def test_the_dashboard_waits_for_the_new_study_file_then_lists_its_trials(tmp_path):
    url, port = f"sqlite:///{tmp_path / 'study.db'}", free_port()
    with dashboard_beside(url, port=port) as page:
        assert page == f"http://127.0.0.1:{port}/dashboard/"
        study = optuna.create_study(study_name="live", storage=url, direction="maximize")  # after the dashboard
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
        listed = get(port, "/api/studies")["study_summaries"]
        assert [s["study_name"] for s in listed] == ["live"]
        trials = get(port, f"/api/studies/{listed[0]['study_id']}")["trials"]
        assert [t["number"] for t in trials] == [0, 1]
    with socket.socket() as s:  # stopped with the block
        assert s.connect_ex(("127.0.0.1", port)) != 0
