"""The registry's append-only event log: every alias move is one JSON line (a run's promotion, `tuneline models
promote|rollback`), appended whole under the registry lock; a reader skips a line cut short; `models history`
prints it."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from pathlib import Path

import pytest

from tuneline.core.registry_layout import EVENTS_FILE, RegistryEvent, read_events
from tuneline.core.registry_reader import registry_events
from tuneline.flows.cli import main
from tuneline.tasks.ship.registry import Registry
from tests.tasks.registry_worker import tiny_model

pytestmark = pytest.mark.fast

REPO = Path(__file__).resolve().parents[3]


def registry_with(tmp_path: Path, n: int, name: str = "mnist") -> Registry:
    registry = Registry(tmp_path / "registry", name)
    for i in range(n):
        registry.register({"model.onnx": tiny_model(tmp_path / f"{name}{i}.onnx", float(i))},
                          metrics={"accuracy": 0.9}, gates=[], lineage={}, run_id=None)
    return registry


def test_every_alias_move_is_one_line_with_from_to_who_why_and_numbers(tmp_path):
    registry = registry_with(tmp_path, 3)
    registry.promote("v0001", by="pipeline", reason="v0001 promoted to champion: the first model",
                     numbers={"challenger_accuracy": 0.98})
    registry.promote("v0001", by="cli")  # no move: no event
    registry.promote("v0002", "challenger", by="pipeline", reason="kept as challenger")
    registry.promote("v0003", by="cli", reason="by hand")
    registry.rollback(by="cli")
    lines = (tmp_path / "registry" / EVENTS_FILE).read_text().splitlines()
    assert len(lines) == 4
    first = json.loads(lines[0])
    assert set(first) == {"time", "model", "alias", "from", "to", "by", "reason", "numbers"}
    assert first["time"].endswith("+00:00") and first["model"] == "mnist"
    assert (first["alias"], first["from"], first["to"], first["by"]) == ("champion", None, "v0001", "pipeline")
    assert first["numbers"] == {"challenger_accuracy": 0.98}
    moves = [(e.alias, e.from_version, e.to_version, e.by) for e in registry_events(tmp_path / "registry").events]
    assert moves == [("champion", None, "v0001", "pipeline"), ("challenger", None, "v0002", "pipeline"),
                     ("champion", "v0001", "v0003", "cli"), ("champion", "v0003", "v0001", "cli")]
    assert "rolled back from v0003 to v0001" in registry_events(tmp_path / "registry").events[-1].reason


def test_a_line_cut_short_is_skipped_and_the_next_event_still_reads(tmp_path):
    registry = registry_with(tmp_path, 2)
    registry.promote("v0001")
    path = tmp_path / "registry" / EVENTS_FILE
    with open(path, "ab") as handle:  # a crash in the middle of a write: half a line, no newline
        handle.write(b'{"time": "2026-01-01T00:00:00+00:00", "model": "mnist", "ali')
    log = read_events(path)
    assert [e.to_version for e in log.events] == ["v0001"] and log.skipped == 1
    registry.promote("v0002")  # starts on a line of its own: the fragment stays one unreadable line
    log = read_events(path)
    assert [e.to_version for e in log.events] == ["v0001", "v0002"] and log.skipped == 1


def _append_many(path: str, worker: int, barrier) -> None:
    from tuneline.tasks.ship.registry import append_line

    barrier.wait(timeout=60)
    for i in range(200):  # no lock: each line must still land whole (O_APPEND, one write)
        event = RegistryEvent(time="2026-05-01T10:00:00+00:00", model="mnist", alias="champion", from_version=None,
                              to_version="v0001", by="cli", reason=f"worker {worker} line {i} " + "x" * 8000)
        append_line(Path(path), event.to_line())


def test_concurrent_appends_never_tear_a_line(tmp_path):
    """Four processes append 8 kB lines at once, without the registry lock: every line reads back whole."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(4)
    path = tmp_path / EVENTS_FILE
    workers = [context.Process(target=_append_many, args=(str(path), w, barrier)) for w in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
        assert w.exitcode == 0
    log = read_events(path)
    assert log.skipped == 0 and len(log.events) == 800
    assert sorted(e.reason.split()[1] for e in log.events) == sorted(str(w) for w in range(4) for _ in range(200))


def test_a_run_records_its_promotion_by_pipeline_with_the_comparison(tmp_path, tiny_onnx_model, tiny_prepared_dir):
    from tuneline.core.config.gate import GateConfig
    from tuneline.tasks.ship.promote import run_promote

    folder = tiny_onnx_model.onnx_path.parent
    result = run_promote(GateConfig(), tmp_path / "registry", tiny_onnx_model.onnx_path, tiny_prepared_dir,
                         folder / "eval.json", folder / "export.json", name="tiny")
    (event,) = registry_events(tmp_path / "registry", "tiny").events
    assert (event.by, event.alias, event.from_version, event.to_version) == ("pipeline", "champion", None, "v0001")
    assert event.reason == result.reason and event.numbers["n_test"] == 300


@pytest.fixture
def project(tmp_path):
    saved = dict(os.environ)  # the CLI sets PREFECT_/DVC_ defaults for its process
    shutil.copyfile(REPO / "params.yaml", tmp_path / "params.yaml")
    registry_with(tmp_path, 2)
    other = registry_with(tmp_path, 1, name="digits")
    other.promote("v0001", by="pipeline", reason="first digits model")
    yield tmp_path
    os.environ.clear()
    os.environ.update(saved)


def test_models_promote_rollback_and_history(project, capsys):
    cli = lambda *args: main(["--project", str(project), "models", *args])  # noqa: E731
    assert cli("promote", "v0001") == 0
    assert cli("promote", "v0002", "--reason", "better on the new scans") == 0
    assert cli("rollback") == 0
    capsys.readouterr()
    assert cli("history", "--name", "mnist") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:8] == ["time", "(UTC)", "model", "alias", "from", "to", "by", "reason"]
    assert [line.split()[2:7] for line in out[1:]] == [["mnist", "champion", "-", "v0001", "cli"],
                                                      ["mnist", "champion", "v0001", "v0002", "cli"],
                                                      ["mnist", "champion", "v0002", "v0001", "cli"]]
    assert out[1].endswith("by hand: tuneline models promote v0001") and out[2].endswith("better on the new scans")
    assert cli("history", "--json") == 0  # every model, as JSON lines
    events = [RegistryEvent.from_dict(json.loads(line)) for line in capsys.readouterr().out.splitlines()]
    assert [e.model for e in events] == ["digits", "mnist", "mnist", "mnist"]
