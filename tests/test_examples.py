"""The runs the docs show (README.md, docs/operations.md, prefect.yaml) complete on the defaults they show.

Training full MNIST cannot happen here, so the check is the one the committed run allows: the committed
`make run` (dvc.lock, metrics/eval.json) passed every default gate, and an example may only train at least
as much as it did. More epochs qualifies: the epochs it shares with the committed run are the same ones
(same seed, per-epoch schedule) and train.restore_best keeps the best. Any other knob, or a gate, would need
a measured run before it goes into the docs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tuneline.core.config.overrides import parse_overrides
from tuneline.core.config.params import load_params

pytestmark = pytest.mark.fast
REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", "docs/operations.md", "prefect.yaml")


def documented_runs() -> list[tuple[str, dict]]:
    """(where, overrides) of each adhoc deployment run, `tuneline run -S …` and `make run ARGS=…` in the docs."""
    runs = []
    for name in DOCUMENTS:
        text = (REPO / name).read_text()
        for found in re.finditer(r"deployment run 'tuneline/adhoc' --params '([^']+)'", text):
            runs.append((f"{name}: {found.group(0)}", json.loads(found.group(1)).get("overrides", {})))
        for found in re.finditer(r"(?:tuneline run|make run ARGS=')((?: ?-S [^\s'`]+)+)", text):
            runs.append((f"{name}: {found.group(0)}", parse_overrides(found.group(1).split()[1::2])))
    return runs


def test_the_docs_show_an_adhoc_deployment_run_in_each_place():
    places = {where.split(":")[0] for where, _ in documented_runs() if "tuneline/adhoc" in where}
    assert places == {"docs/operations.md", "prefect.yaml"}


@pytest.mark.parametrize(("where", "overrides"), documented_runs(), ids=lambda value: str(value)[:60])
def test_a_documented_run_trains_at_least_as_much_as_the_committed_run_that_passed(where, overrides):
    load_params(REPO / "params.yaml", overrides)  # the example's keys and values are valid
    committed = json.loads((REPO / "metrics" / "eval.json").read_text())
    assert committed["gates_passed"] is True
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())
    trained = lock["stages"]["train"]["params"]["params.yaml"]["train"]
    assert set(overrides) <= {"train.epochs"}, f"{where}: only more epochs is known to keep the default gates"
    assert overrides.get("train.epochs", trained["epochs"]) >= trained["epochs"], (
        f"{where}: fewer epochs than the committed run ({trained['epochs']}, test accuracy "
        f"{committed['accuracy']}) may fail the default gate.min_accuracy")
