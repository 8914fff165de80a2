"""Champion/challenger on the same test set: a better model promotes itself, a worse one is kept (challenger)
with the numbers that kept it back, a much worse one fails its gate, and nothing is registered twice."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.prepared_edit import keep_records
from tuneline.tasks.ship.latency import onnx_accuracy
from tuneline.core.config.gate import GateConfig
from tuneline.tasks.evaluate.gate import GateFailed
from tuneline.tasks.data.prepare import load_split
from tuneline.tasks.ship.promote import PromoteError, run_promote
from tuneline.tasks.ship.registry import Registry
from tests.tasks.ship.logit_bias import with_logit_bias


def biased(src: Path, dst: Path, shift: float) -> Path:
    """The same network with `shift` added to class 0's logit: a deliberately worse model (real ONNX, real scores)."""

    def shift_class_0(bias: np.ndarray) -> None:
        bias[0] += shift

    return with_logit_bias(src, dst, shift_class_0)


@pytest.fixture
def promote(exported_model, small_prepared_dir, tmp_path):
    folder = exported_model.onnx_path.parent

    def run(model: Path, cfg: GateConfig = GateConfig(), prepared: Path = small_prepared_dir, variants=None):
        return run_promote(cfg, tmp_path / "registry", model, prepared, folder / "eval.json", folder / "export.json",
                           variants_dir=variants, name="mnist", run_id="test-run")

    return run


def test_better_promotes_worse_is_kept_much_worse_fails(promote, exported_model, small_prepared_dir, tmp_path):
    images, labels = load_split(small_prepared_dir, "test")
    good = exported_model.onnx_path
    worse = biased(good, tmp_path / "worse.onnx", 4.0)
    slightly = biased(good, tmp_path / "slightly.onnx", 3.0)
    awful = biased(good, tmp_path / "awful.onnx", 10.0)
    acc = {p.stem: onnx_accuracy(p, images, labels) for p in (good, worse, slightly, awful)}
    assert acc["model"] - acc["slightly"] >= 0.005 and acc["slightly"] > acc["awful"] + 0.05, acc  # preconditions

    # 1. No champion yet: the first model becomes champion, with its variants.
    first = promote(worse)
    assert first.promoted and first.version == "v0001" and "the first model (no champion yet)" in first.reason

    # 2. Beats the champion by more than gate.min_improvement: promoted; the old champion is `previous`.
    better = promote(good, variants=good.parent / "variants")
    assert better.promoted and better.version == "v0002" and better.champion == "v0002"
    assert better.comparison == {"champion": "v0001", "champion_accuracy": round(acc["worse"], 6),
                                 "challenger_accuracy": round(acc["model"], 6),
                                 "change": round(acc["model"] - acc["worse"], 6), "n_test": 600}
    assert f"v0002 promoted to champion: test accuracy {acc['model']:.4f} vs champion v0001 {acc['worse']:.4f} " \
           f"on the same 600 test images (change +{acc['model'] - acc['worse']:.4f} ≥ gate.min_improvement 0.0010)" \
           == better.reason
    registry = Registry(tmp_path / "registry")
    assert registry.alias("champion")["previous"] == ["v0001"]
    card = registry.card("v0002")
    variants = json.loads((good.parent / "export.json").read_text())["variants"].values()
    assert set(card["files"]) == {"model.onnx"} | {v["file"] for v in variants if v["kept"]}
    assert card["metrics"]["vs_champion"]["champion"] == "v0001" and card["metrics"]["serving"]["latency_p99_ms"] > 0
    assert [g["name"] for g in card["gates"]][-2:] == ["gate.max_regression", "gate.min_improvement"]
    assert card["lineage"]["data_version"] == "abc123.dir" and card["lineage"]["params"] is not None
    assert card["run_id"] == "test-run" and card["name"] == "mnist"

    # 3. Worse, within gate.max_regression: kept as a version and as challenger, not promoted; the reason has numbers.
    kept = promote(slightly, GateConfig(max_regression=0.5))
    change = acc["slightly"] - acc["model"]
    assert not kept.promoted and kept.version == "v0003" and kept.champion == "v0002"
    assert kept.reason == (f"v0003 kept as challenger, not promoted: test accuracy {acc['slightly']:.4f} vs champion "
                           f"v0002 {acc['model']:.4f} on the same 600 test images (change {change:+.4f} < "
                           "gate.min_improvement 0.0010); champion v0002 stays")
    assert registry.alias("challenger")["version"] == "v0003" and registry.alias("champion")["version"] == "v0002"

    # 4. Worse beyond gate.max_regression: the run fails with the table; nothing registered or promoted.
    with pytest.raises(GateFailed, match=r"gate gate.max_regression FAILED: accuracy change vs champion -0\.\d{4} vs "
                                         r"threshold -0\.0500 .*: nothing is registered or promoted; champion v0002 "
                                         r"stays$") as failure:
        promote(awful, GateConfig(max_regression=0.05))
    assert "\n" not in str(failure.value)  # one line; the whole table is the error's details
    assert "| `gate.min_improvement` |" in failure.value.details
    assert registry.versions() == ["v0001", "v0002", "v0003"] and registry.alias("champion")["version"] == "v0002"

    # 5. The same file again (a re-run with nothing changed): recognised, nothing new.
    again = promote(good)
    assert not again.registered and again.version == "v0002"
    assert again.reason == "model.onnx is already registered as v0002 (champion): unchanged"


def test_champion_is_rescored_on_this_runs_test_set(promote, exported_model, small_prepared_dir, tmp_path):
    good = exported_model.onnx_path
    promote(biased(good, tmp_path / "worse.onnx", 2.5))
    # This run's test split is another 300 images: the champion is scored on those, not on its card's numbers.
    prepared = tmp_path / "prepared"
    shutil.copytree(small_prepared_dir, prepared)
    keep_records(prepared, "test", slice(300, None))
    images, labels = load_split(prepared, "test")
    result = promote(good, GateConfig(max_regression=1.0), prepared=prepared)
    assert result.comparison["n_test"] == 300
    assert result.comparison["champion_accuracy"] == round(onnx_accuracy(tmp_path / "worse.onnx", images, labels), 6)
    assert result.comparison["challenger_accuracy"] == round(onnx_accuracy(good, images, labels), 6)


@pytest.fixture(scope="module")
def digits8(tmp_path_factory):
    """Another data set with MNIST's ten labels: 8x8 gray digits (as scikit-learn's), a tiny model trained on it."""
    from tests.tasks.ship.synthetic_models import train_and_export, write_prepared

    base = tmp_path_factory.mktemp("digits8")
    prepared = write_prepared(base / "prepared", 1, 8, [str(d) for d in range(10)])
    return prepared, train_and_export(prepared, base / "model", "digits8", epochs=1).onnx_path


def test_another_data_set_with_the_same_labels_never_replaces_the_mnist_champion(promote, exported_model, digits8,
                                                                                  tmp_path):
    """issue 14: a model trained on another data set (same ten labels) was compared on its own test set and
    replaced the MNIST champion. Now it registers under its own name; under MNIST's name it is refused."""
    prepared, other = digits8
    folder = exported_model.onnx_path.parent
    mnist = promote(exported_model.onnx_path)
    assert mnist.promoted and mnist.name == "mnist" and mnist.version == "v0001"

    # Its own name (project.name's default: its data set): its own champion; MNIST's is untouched.
    own = run_promote(GateConfig(), tmp_path / "registry", other, prepared, folder / "eval.json",
                      folder / "export.json", name="digits8")
    assert own.promoted and own.version == "v0001" and own.registered_path.is_file()
    assert Registry(tmp_path / "registry", "mnist").alias("champion")["version"] == "v0001"
    assert Registry(tmp_path / "registry", "mnist").versions() == ["v0001"]

    # The same name as MNIST's but another input contract: refused, nothing registered, and told what to do.
    with pytest.raises(PromoteError, match=r"model 'mnist': champion v0001 takes 1x28x28 gray, 10 classes .* but "
                                           r"this model takes 1x8x8 gray, 10 classes .* set project.name"):
        run_promote(GateConfig(), tmp_path / "registry", other, prepared, folder / "eval.json",
                    folder / "export.json", name="mnist")
    assert Registry(tmp_path / "registry", "mnist").versions() == ["v0001"]
    assert (tmp_path / "registry" / "models" / "mnist" / "aliases" / "champion.json").is_file()
