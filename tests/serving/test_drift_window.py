"""Drift features are computed per batch in the inference thread, equal each request's own, and the window takes
them in bulk (off the per-request path) and reads as if it had taken them one by one."""

import numpy as np
import pytest

from tuneline.core.drift import build_profile, row_features
from tuneline.core.spec import InputSpec
from tuneline.serving.live import DriftWindow
from tuneline.serving.model_holder import CONFIDENCE, DRIFT_FEATURES, LoadedModel

pytestmark = pytest.mark.fast


def requests(rng: np.random.Generator, n: int, rows: int = 3):
    """n requests of `rows` 1x4x4 images each (raw pixels) with their answers (probabilities over 3 classes)."""
    for _ in range(n):
        pixels = rng.integers(0, 256, (rows, 1, 4, 4)).astype(np.float32)
        logits = rng.normal(size=(rows, 3))
        yield pixels, np.exp(logits) / np.exp(logits).sum(1, keepdims=True)


def profile_of(sample) -> object:
    return build_profile("image", np.concatenate([r for r, _ in sample]), np.concatenate([p for _, p in sample]), 3)


def model_with(profile, weights: np.ndarray) -> LoadedModel:
    """A LoadedModel whose 'session' is a linear map of the pixels (the run's arithmetic around it is the server's)."""
    spec = InputSpec(channels=1, height=4, width=4, class_names=("a", "b", "c"), mean=(0.5,), std=(0.25,))
    return LoadedModel(name="m", version="v1", provider="CPUExecutionProvider", session=None, graph_input="pixels",
                       output_name="logits", spec=spec, metadata={}, card={}, choice=None,
                       runner=lambda rows: (rows.reshape(len(rows), -1) @ weights).astype(np.float32),
                       drift_profile=profile)


def test_a_batch_run_gives_each_row_its_own_drift_features_and_confidence():
    rng = np.random.default_rng(0)
    model = model_with(profile_of(list(requests(rng, 50))), rng.normal(size=(16, 3)) / 100)
    batch = [pixels for pixels, _ in requests(rng, 7)]
    outputs = model.run(np.concatenate(batch))
    assert np.allclose(outputs[CONFIDENCE], outputs["probabilities"].max(axis=1))
    offset = 0
    for pixels in batch:  # what the batcher hands each request: its rows' slice
        mine = slice(offset, offset + len(pixels))
        alone = model.run(pixels)
        assert np.allclose(outputs[DRIFT_FEATURES][mine], row_features("image", pixels, alone["probabilities"]))
        assert np.allclose(outputs[DRIFT_FEATURES][mine], alone[DRIFT_FEATURES])
        offset += len(pixels)
    model.drift_profile = None  # no profile (a model exported before drift profiles): no features, nothing to score
    assert DRIFT_FEATURES not in model.run(batch[0])


def test_features_enter_the_window_together_when_enough_gather_or_the_window_is_read():
    rng = np.random.default_rng(1)
    window = DriftWindow(size=1000)
    sent = [row_features("image", pixels, probabilities) for pixels, probabilities in requests(rng, 10)]
    for features in sent:
        window.add_features("v1", features)
    assert window.count == 0  # 30 rows pending: no ring write on the request path yet
    times, features = window.rows()
    assert features.shape == (30, sent[0].shape[1]) and len(times) == 30
    assert np.array_equal(features, np.concatenate(sent))  # in the order the requests came

    for pixels, probabilities in requests(rng, DriftWindow.PENDING_ROWS // 3 + 1):
        window.add_features("v1", row_features("image", pixels, probabilities))
    assert window.count >= 30 + DriftWindow.PENDING_ROWS - 3  # enough gathered: written without a read


def test_a_new_champion_starts_a_new_window_and_the_old_rows_stay_with_the_old_version():
    rng = np.random.default_rng(2)
    window = DriftWindow(size=100)
    for pixels, probabilities in requests(rng, 4):
        window.add_features("v1", row_features("image", pixels, probabilities))
    for pixels, probabilities in requests(rng, 2):
        window.add_features("v2", row_features("image", pixels, probabilities))
    times, features = window.rows()
    assert window.version == "v2" and len(features) == 6  # v1's 12 rows were written, then v2's window began
