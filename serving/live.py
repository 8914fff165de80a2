"""Live comparison of the versions a server runs, and each model's drift window: the numbers behind GET /v2/live.

Per model and version: requests, errors, latency, confidence, predicted classes, and for a challenger in shadow
mode how often it agreed with the champion (and what was dropped). Per model: a sliding window of the features
core/drift.py computes for each row the champion answered, scored against the champion's training profile.

Everything here is a count, a fixed-bucket histogram or a list of window rows, so the states of several workers
(serve.workers > 1) merge into the server's: `state()` is one worker's as JSON, `merge()` adds several, and
`summary()` turns the sum into the /v2/live contract. Latency percentiles come from log-spaced buckets 5% wide
(a percentile is its bucket's upper edge: at most 5% high).
"""

from __future__ import annotations

import base64
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from tuneline.core.drift import DriftProfile

LATENCY_MIN_S, LATENCY_RATIO, LATENCY_BUCKETS = 1e-5, 1.05, 400  # 10 µs .. ~3 h, 5% steps


def latency_bucket(seconds: float) -> int:
    if seconds <= LATENCY_MIN_S:
        return 0
    return min(LATENCY_BUCKETS - 1, int(math.ceil(math.log(seconds / LATENCY_MIN_S, LATENCY_RATIO))))


def latency_percentile_ms(counts: list[int], q: float) -> float | None:
    """The q-quantile (0..1) of a latency histogram, in ms (its bucket's upper edge); None when empty."""
    total = sum(counts)
    if total == 0:
        return None
    rank, seen = q * total, 0
    for index, count in enumerate(counts):
        seen += count
        if seen >= rank and count:
            return round(LATENCY_MIN_S * LATENCY_RATIO ** index * 1e3, 4)
    return None


@dataclass
class VersionStats:
    """One model version's live numbers in this process (cumulative since the process started)."""

    requests: int = 0
    errors: int = 0
    rows: int = 0
    confidence_sum: float = 0.0
    latency: dict[int, int] = field(default_factory=lambda: defaultdict(int))  # bucket -> requests
    classes: dict[int, int] = field(default_factory=lambda: defaultdict(int))  # predicted class -> rows
    compared: int = 0  # shadow: rows compared with the champion's answer
    agreed: int = 0
    dropped: int = 0  # shadow: sampled requests dropped because the queue was full
    labelled: int = 0  # feedback labels for rows this version answered (captured by this process)
    correct: int = 0

    def to_dict(self) -> dict:
        return {"requests": self.requests, "errors": self.errors, "rows": self.rows,
                "confidence_sum": self.confidence_sum, "latency": dict(self.latency), "classes": dict(self.classes),
                "compared": self.compared, "agreed": self.agreed, "dropped": self.dropped,
                "labelled": self.labelled, "correct": self.correct}

    def add(self, other: dict) -> None:
        for key in ("requests", "errors", "rows", "confidence_sum", "compared", "agreed", "dropped", "labelled",
                    "correct"):
            setattr(self, key, getattr(self, key) + other.get(key, 0))
        for key in ("latency", "classes"):
            mine = getattr(self, key)
            for bucket, count in other.get(key, {}).items():
                mine[int(bucket)] += int(count)


class DriftWindow:
    """The last `size` rows' drift features for one model (and the champion version they were scored with).

    The features come with each request's answer (LoadedModel.run computes them for the whole batch in the inference
    thread). Requests hand them over as they are (`add_features`), and they enter the ring buffer together when
    PENDING_ROWS have gathered or when the window is read: a ring write per request was numpy calls on the event loop
    for every request.
    """

    PENDING_ROWS = 256

    def __init__(self, size: int):
        self.size = size
        self.version: str | None = None
        self.features: np.ndarray | None = None  # [size, F] ring buffer
        self.times = np.zeros(size)
        self.count = 0  # rows ever added (the ring's write position is count % size)
        self._pending: list[tuple[np.ndarray, float]] = []  # (features [rows, F], arrival time)
        self._pending_version: str | None = None  # the version that answered the pending rows
        self._pending_rows = 0

    def add_features(self, version: str, features: np.ndarray) -> None:
        """The drift features [rows, F] of rows that champion `version` answered (core.drift.row_features)."""
        if self._pending_version is not None and self._pending_version != version:
            self.flush()
        self._pending_version = version
        self._pending.append((features, time.time()))
        self._pending_rows += len(features)
        if self._pending_rows >= self.PENDING_ROWS:
            self.flush()

    def flush(self) -> None:
        """Move the pending rows into the window."""
        if not self._pending:
            return
        version, pending = self._pending_version, self._pending
        self._pending, self._pending_version, self._pending_rows = [], None, 0
        features = np.concatenate([f for f, _ in pending])
        times = np.concatenate([np.full(len(f), t) for f, t in pending])
        self.add(version, features, times)

    def add(self, version: str, features: np.ndarray, times: np.ndarray | None = None) -> None:
        if version != self.version or self.features is None or self.features.shape[1] != features.shape[1]:
            self.version, self.count = version, 0  # a new champion: its outputs, its profile
            self.features = np.zeros((self.size, features.shape[1]))
        times = np.full(len(features), time.time()) if times is None else times
        features, times = features[-self.size:], times[-self.size:]
        positions = (self.count + np.arange(len(features))) % self.size
        self.features[positions] = features
        self.times[positions] = times
        self.count += len(features)

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(times, features) of the rows in the window."""
        self.flush()
        if self.features is None:
            return np.zeros(0), np.zeros((0, 0))
        n = min(self.count, self.size)
        return self.times[:n].copy(), self.features[:n].copy()


class LiveStats:
    """This process's live numbers for every model it serves."""

    def __init__(self, window: int):
        self.window = window
        self.versions: dict[tuple[str, str], VersionStats] = defaultdict(VersionStats)
        self.drift: dict[str, DriftWindow] = {}

    def observe(self, model: str, version: str, rows: int, seconds: float, classes: list[int] | None,
                confidences: list[float] | None) -> None:
        """One request's numbers: its rows, latency, and each row's class and confidence (both None: it failed)."""
        stats = self.versions[(model, version)]
        stats.requests += 1
        stats.latency[latency_bucket(seconds)] += 1
        if classes is None:
            stats.errors += 1
            return
        stats.rows += rows
        stats.confidence_sum += sum(confidences)
        for cls in classes:
            stats.classes[cls] += 1

    def compare(self, model: str, version: str, champion: np.ndarray, challenger: np.ndarray) -> int:
        """Count a shadow comparison of per-row classes; returns the rows that agreed."""
        stats = self.versions[(model, version)]
        agreed = int((champion == challenger).sum())
        stats.compared += len(champion)
        stats.agreed += agreed
        return agreed

    def drop(self, model: str, version: str) -> None:
        self.versions[(model, version)].dropped += 1

    def label(self, model: str, version: str, correct: bool) -> None:
        stats = self.versions[(model, version)]
        stats.labelled += 1
        stats.correct += int(correct)

    def add_drift(self, model: str, version: str, features: np.ndarray) -> None:
        """The drift features of rows that `model`'s champion `version` answered, for its drift window."""
        window = self.drift.get(model)
        if window is None:
            window = self.drift[model] = DriftWindow(self.window)
        window.add_features(version, features)

    def state(self) -> dict:
        """This process's numbers as JSON (what a sibling worker sends; merge() adds them up)."""
        drift = {}
        for model, window in self.drift.items():
            times, features = window.rows()
            drift[model] = {"version": window.version, "shape": list(features.shape),
                            "times": _b64(times), "features": _b64(features)}
        versions = defaultdict(dict)
        for (model, version), stats in self.versions.items():
            versions[model][version] = stats.to_dict()
        return {"versions": versions, "drift": drift}


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=np.float64).tobytes()).decode()


def _unb64(text: str, shape) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=np.float64).reshape(shape)


@dataclass
class Merged:
    """Several processes' states added up: stats per (model, version) and each model's newest window rows."""

    versions: dict[tuple[str, str], VersionStats]
    drift: dict[str, tuple[str | None, np.ndarray]]  # model -> (champion version, features [n, F])


def merge(states: list[dict], window: int) -> Merged:
    versions: dict[tuple[str, str], VersionStats] = defaultdict(VersionStats)
    parts: dict[str, list[tuple[str, np.ndarray, np.ndarray]]] = defaultdict(list)
    for state in states:
        for model, per_version in state.get("versions", {}).items():
            for version, stats in per_version.items():
                versions[(model, version)].add(stats)
        for model, block in state.get("drift", {}).items():
            shape = block["shape"]
            parts[model].append((block["version"], _unb64(block["times"], shape[:1]), _unb64(block["features"], shape)))
    drift = {}
    for model, blocks in parts.items():
        # The newest champion version any worker scored with; the server's window is the newest `window` rows of it.
        latest = max(blocks, key=lambda b: b[1].max() if len(b[1]) else 0.0)[0]
        blocks = [b for b in blocks if b[0] == latest and len(b[1])]
        if not blocks:
            drift[model] = (latest, np.zeros((0, 0)))
            continue
        times = np.concatenate([b[1] for b in blocks])
        features = np.concatenate([b[2] for b in blocks])
        newest = np.argsort(times, kind="stable")[-window:]
        drift[model] = (latest, features[newest])
    return Merged(dict(versions), drift)


def version_block(version: str | None, stats: VersionStats | None, labels: list[str]) -> dict | None:
    """One version's entry of /v2/live (the contract `tuneline models promote --live` reads)."""
    if version is None:
        return None
    stats = stats or VersionStats()
    block = {"version": version, "requests": stats.requests, "errors": stats.errors,
             "error_rate": round(stats.errors / stats.requests, 6) if stats.requests else 0.0,
             "latency_ms": {"p50": latency_percentile_ms(_dense(stats.latency), 0.50),
                            "p99": latency_percentile_ms(_dense(stats.latency), 0.99)},
             "mean_confidence": round(stats.confidence_sum / stats.rows, 6) if stats.rows else None,
             "class_counts": {(labels[c] if 0 <= c < len(labels) else str(c)): n
                              for c, n in sorted(stats.classes.items())}}
    if stats.labelled:
        block["labelled"] = stats.labelled
        block["labelled_accuracy"] = round(stats.correct / stats.labelled, 6)
    return block


def _dense(latency: dict[int, int]) -> list[int]:
    counts = [0] * LATENCY_BUCKETS
    for bucket, count in latency.items():
        counts[int(bucket)] += count
    return counts


def model_summary(name: str, mode: str, champion: str | None, challenger: str | None, labels: list[str],
                  merged: Merged, profile: DriftProfile | None, threshold: float, window: int) -> dict:
    """GET /v2/live/{name}: champion, challenger (with agreement), drift, mode."""
    stats = merged.versions
    champion_block = version_block(champion, stats.get((name, champion)), labels)
    challenger_block = version_block(challenger, stats.get((name, challenger)), labels)
    if challenger_block is not None:
        own = stats.get((name, challenger)) or VersionStats()
        challenger_block.update({"agreement": round(own.agreed / own.compared, 6) if own.compared else None,
                                 "compared": own.compared, "dropped": own.dropped})
    version, features = merged.drift.get(name, (None, np.zeros((0, 0))))
    score, per_feature = (None, {})
    if profile is not None and version == champion and len(features):
        score, per_feature = profile.score(features)
        score = round(score, 6)
    rows = len(features) if version == champion else 0
    drift = {"score": score, "threshold": threshold, "window": rows, "size": window,
             "drifted": bool(score is not None and rows >= window and score > threshold),
             "features": per_feature, "profile": profile is not None}
    return {"model": name, "mode": mode, "champion": champion_block, "challenger": challenger_block, "drift": drift}
