"""Promotions racing: four processes run the real promote step at once on models of different accuracy.

The invariant the registry lock around compare-and-promote (tuneline.tasks.ship.promote.run_promote) keeps: each
run is judged against the champion of that moment (never a stale one), no promotion is lost, and the final
champion is the best model. Registration happens inside the lock, so the version numbers give the order in which
the runs held it; the test replays that order and checks every decision against it.

The mutant (tests/tasks/ship/promote_worker.py, mode "unlocked") is the same step with run_promote's lock made a
no-op; both runs hold the critical section open for HOLD_S, so in the mutant the runs overlap there.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pytest

from tuneline.core.config.gate import GateConfig
from tuneline.tasks.data.prepare import load_split
from tuneline.tasks.ship.latency import onnx_accuracy
from tuneline.tasks.ship.promote import run_promote
from tuneline.tasks.ship.registry import Registry
from tests.tasks.ship.logit_bias import with_logit_bias
from tests.tasks.ship.promote_worker import race_promote

HOLD_S = 0.5  # seconds each run stays between reading the champion and moving the alias
MUTED = {"seed": 5, "c0": 0, "c1": 1, "c2": 2, "c3": 3}  # classes a model never predicts: distinct accuracies


def muted(src: Path, dst: Path, n_classes: int) -> Path:
    """The same network with classes 0..n_classes-1 never predicted (their logit bias -1e4): ~n/10 less accurate."""

    def mute(bias: np.ndarray) -> None:
        bias[:n_classes] = -1e4

    return with_logit_bias(src, dst, mute)


@pytest.fixture(scope="module")
def contenders(tiny_onnx_model, tiny_prepared_dir, tmp_path_factory):
    """{stem: (path, test accuracy)}: a weak seed champion and four challengers, all of different accuracy."""
    folder = tmp_path_factory.mktemp("race-models")
    images, labels = load_split(tiny_prepared_dir, "test")
    models = {stem: muted(tiny_onnx_model.onnx_path, folder / f"{stem}.onnx", n) for stem, n in MUTED.items()}
    accuracy = {stem: onnx_accuracy(path, images, labels) for stem, path in models.items()}
    ranked = sorted(accuracy.values())
    assert accuracy["seed"] == ranked[0] and len(set(ranked)) == len(ranked), accuracy  # precondition
    assert min(b - a for a, b in zip(ranked, ranked[1:])) > GateConfig().min_improvement, accuracy
    return {stem: (path, accuracy[stem]) for stem, path in models.items()}


def run_race(mode: str, contenders, prepared: Path, eval_dir: Path, root: Path) -> list[tuple]:
    """Seed a champion, then race the four challengers in fresh processes; their (model, version, promoted,
    comparison), in version order. `eval_dir` holds the eval.json and export.json promote puts on the cards."""
    seeded = run_promote(GateConfig(max_regression=1.0), root, contenders["seed"][0], prepared,
                         eval_dir / "eval.json", eval_dir / "export.json", name="race", run_id="seed")
    assert seeded.promoted and seeded.version == "v0001"
    challengers = [stem for stem in contenders if stem != "seed"]
    # Fresh processes, nothing shared but the file system: forked from a server that imported promote once
    # (four interpreters importing torch at once would take most of the test's time on two cores).
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tests.tasks.ship.promote_worker", "tuneline.tasks.ship.promote"])
    barrier, results = context.Barrier(len(challengers)), context.Queue()
    workers = [context.Process(target=race_promote, args=(mode, str(root), str(contenders[stem][0]), str(prepared),
                                                           str(eval_dir / "eval.json"), str(eval_dir / "export.json"),
                                                           HOLD_S, barrier, results))
               for stem in challengers]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=180)
        if worker.is_alive():
            worker.terminate()
    assert [w.exitcode for w in workers] == [0] * len(workers)
    return sorted((results.get(timeout=5) for _ in workers), key=lambda done: done[1])


def check_race(done: list[tuple], accuracy: dict[str, float], registry: Registry) -> None:
    """The invariant, replayed in the order the runs held the lock (their version numbers)."""
    assert [version for _, version, _, _ in done] == ["v0002", "v0003", "v0004", "v0005"]
    model_of = {"v0001": "seed", **{version: model for model, version, _, _ in done}}
    champion, promotions = "v0001", []
    for model, version, promoted, comparison in done:
        assert comparison["champion"] == champion, (
            f"{version} ({model}) was judged against {comparison['champion']}, but the champion then was {champion}")
        assert comparison["champion_accuracy"] == round(accuracy[model_of[champion]], 6)
        should = accuracy[model] - accuracy[model_of[champion]] >= GateConfig().min_improvement
        assert promoted == should, f"{version} ({model}): promoted={promoted} against champion {champion}"
        if promoted:
            champion = version
            promotions.insert(0, version)
    record = registry.alias("champion")
    assert record["version"] == champion and record["previous"] == [*promotions[1:], "v0001"], record  # none lost
    assert model_of[champion] == max(accuracy, key=accuracy.get), f"final champion {champion} is not the best model"


@pytest.mark.parametrize("mode", ["locked", "unlocked"])
def test_racing_promotions_judge_each_run_against_the_champion_of_its_moment(mode, contenders, tiny_onnx_model,
                                                                              tiny_prepared_dir, tmp_path):
    done = run_race(mode, contenders, tiny_prepared_dir, tiny_onnx_model.onnx_path.parent, tmp_path / "registry")
    accuracy = {stem: acc for stem, (_, acc) in contenders.items()}
    registry = Registry(tmp_path / "registry", "race")
    if mode == "locked":
        check_race(done, accuracy, registry)
    else:  # the mutant: at least one run judged against a stale champion, or the best model not champion
        with pytest.raises(AssertionError):
            check_race(done, accuracy, registry)
