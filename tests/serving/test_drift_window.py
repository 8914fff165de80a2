"""The drift window scores requests' rows in batches, off the per-request path, and reads as if scored one by one."""

import numpy as np
import pytest

from tuneline.core.drift import build_profile, row_features
from tuneline.serving.live import DriftWindow

pytestmark = pytest.mark.fast


def requests(rng: np.random.Generator, n: int, rows: int = 3):
    """n requests of `rows` 1x4x4 images each (raw pixels) with their answers (probabilities over 3 classes)."""
    for _ in range(n):
        pixels = rng.integers(0, 256, (rows, 1, 4, 4)).astype(np.float32)
        logits = rng.normal(size=(rows, 3))
        yield pixels, np.exp(logits) / np.exp(logits).sum(1, keepdims=True)


def test_rows_are_scored_together_when_enough_gather_or_the_window_is_read():
    rng = np.random.default_rng(0)
    sample = list(requests(rng, 50))
    profile = build_profile("image", np.concatenate([r for r, _ in sample]), np.concatenate([p for _, p in sample]), 3)
    window = DriftWindow(size=1000)
    sent = []
    for pixels, probabilities in requests(rng, 10):
        sent.append((pixels, probabilities.copy()))
        window.add_rows("v1", profile, pixels, probabilities)
        probabilities[:] = 0  # the caller's buffer is reused (a batch's outputs): the window kept its own copy
    assert window.count == 0  # 30 rows pending: nothing scored on the request path yet
    times, features = window.rows()
    expected = np.concatenate([row_features("image", r, p) for r, p in sent])
    assert features.shape == (30, expected.shape[1]) and len(times) == 30
    assert np.allclose(features, expected)  # one pass over all rows equals each request's own pass

    for pixels, probabilities in requests(rng, DriftWindow.PENDING_ROWS // 3 + 1):
        window.add_rows("v1", profile, pixels, probabilities)
    assert window.count >= 30 + DriftWindow.PENDING_ROWS - 3  # enough gathered: scored without a read


def test_a_new_champion_starts_a_new_window_and_the_old_rows_stay_with_the_old_version():
    rng = np.random.default_rng(1)
    sample = list(requests(rng, 20))
    profile = build_profile("image", np.concatenate([r for r, _ in sample]), np.concatenate([p for _, p in sample]), 3)
    window = DriftWindow(size=100)
    for pixels, probabilities in requests(rng, 4):
        window.add_rows("v1", profile, pixels, probabilities)
    for pixels, probabilities in requests(rng, 2):
        window.add_rows("v2", profile, pixels, probabilities)
    times, features = window.rows()
    assert window.version == "v2" and len(features) == 6  # v1's 12 rows were scored, then v2's window began
