"""A deleted or edited output is never taken as cached: the flow's skip decision before each stage
(tuneline.flows.pipeline.skip_stage) looks at the stage's outputs, not only at what it depends on.

Fast: DVC only, on a project whose stages are recorded with placeholder outputs (no training). The mutant is the
decision Prefect's cache key alone would make (deps and params: tuneline.tasks.versioning.stage_fingerprint).
"""

from __future__ import annotations

import json
from pathlib import Path

from tuneline.flows.pipeline import skip_stage
from tuneline.tasks.versioning import stage_fingerprint
from tests.flows.test_code_deps import recorded_project  # noqa: F401 (a fixture)

EXPECTED = [  # (what was done to the recorded project, {stage: skipped?}) after each step, in order
    ("nothing", {"export": True, "evaluate": True}),
    ("models/model.onnx deleted", {"export": False, "evaluate": True}),
    ("metrics/eval.json edited", {"export": False, "evaluate": False}),
]


def decisions(deciders: dict, project: Path) -> dict[str, list[tuple[str, dict[str, bool]]]]:
    """Each `decide(root, stage)` -> skip? on the recorded project, after each step of EXPECTED (applied here)."""
    steps = {"nothing": lambda: None,
             "models/model.onnx deleted": (project / "models" / "model.onnx").unlink,
             "metrics/eval.json edited": lambda: (project / "metrics" / "eval.json").write_text(
                 json.dumps({"accuracy": 0.99}) + "\n")}
    seen = {name: [] for name in deciders}
    for step, expected in EXPECTED:
        steps[step]()
        for name, decide in deciders.items():
            seen[name].append((step, {stage: decide(project, stage) for stage in expected}))
    return seen


def test_a_deleted_or_edited_output_is_not_skipped_and_a_deps_only_decision_is_caught(recorded_project):  # noqa: F811
    # The mutant: skip when the deps' and params' fingerprint is the recorded one (all the cache key sees).
    recorded = {stage: stage_fingerprint(recorded_project, stage) for stage in ("export", "evaluate")}
    seen = decisions({"skip_stage": lambda root, stage: skip_stage(root, stage, force=False),
                      "deps only": lambda root, stage: stage_fingerprint(root, stage) == recorded[stage]},
                     recorded_project)
    assert seen["skip_stage"] == EXPECTED
    assert not skip_stage(recorded_project, "fetch", force=True)  # force: nothing is skipped
    assert seen["deps only"] != EXPECTED  # the same check fails on the mutant:
    assert seen["deps only"][1] == ("models/model.onnx deleted", {"export": True, "evaluate": True})
