"""Drift of live inputs: a small reference profile of the training data, stored with the model at export, and
the score the server computes for a window of live rows against it. numpy only (the server has no PyTorch).

Features are modality-agnostic summaries of a row and of the model's answer to it:

| modality | input features | output features |
|---|---|---|
| image | mean and std of the raw pixels | confidence (max probability), predicted class |
| audio | mean, std and RMS energy of the samples, zero-crossing rate | the same |
| text | token count (non-pad ids), [UNK] share | the same |

The statistic is the population stability index (PSI) per feature: the reference's deciles are the bins of a
numeric feature (the classes those of the predicted class), and PSI = sum((live - ref) * ln(live / ref)) over the
bins' shares. The score is the largest PSI over the features. PSI is the standard monitoring statistic for this
(0.1: moderate shift, 0.25: significant), needs only the bins' reference shares (a few hundred numbers in the
ONNX metadata), and is cheap on a window. scipy's two-sample KS would need a sample of the training data stored
with the model and scipy in the serving image, which does not otherwise need it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

PROFILE_KEY = "drift_profile"  # the ONNX metadata entry (core/onnx_metadata.py's file)
PROFILE_ROWS = 2000  # training rows export profiles (a seeded sample)
BINS = 10  # deciles of each numeric feature
SMOOTHING = 0.5  # added to every bin's count: an empty bin in a small window must not be ln(0)
FEATURES = {
    "image": ("mean", "std", "confidence", "class"),
    "audio": ("mean", "std", "energy", "zero_crossings", "confidence", "class"),
    "text": ("tokens", "unk_share", "confidence", "class"),
}
CATEGORICAL = frozenset({"class"})


class ProfileError(ValueError):
    """A drift profile that cannot be read; the message names what is wrong."""


def row_features(modality: str, rows: np.ndarray, probabilities: np.ndarray, pad_id: int = 0,
                 unk_id: int | None = None) -> np.ndarray:
    """float64 [n, len(FEATURES[modality])]: each row's features (rows as the graph takes them: raw pixels, raw
    samples or token ids; probabilities [n, classes] its answer)."""
    n = len(rows)
    flat = rows.reshape(n, -1)
    if modality == "text":
        real = flat != pad_id
        tokens = real.sum(axis=1)
        unk = (flat == unk_id).sum(axis=1) if unk_id is not None else np.zeros(n)
        inputs = [tokens, unk / np.maximum(tokens, 1)]
    else:
        values = flat.astype(np.float64, copy=False)
        inputs = [values.mean(axis=1), values.std(axis=1)]
        if modality == "audio":
            signs = np.signbit(values)
            inputs += [np.sqrt((values * values).mean(axis=1)),
                       (signs[:, 1:] != signs[:, :-1]).mean(axis=1) if values.shape[1] > 1 else np.zeros(n)]
    probabilities = np.asarray(probabilities, dtype=np.float64)
    outputs = [probabilities.max(axis=1), probabilities.argmax(axis=1)]
    return np.stack([*inputs, *outputs], axis=1).astype(np.float64)


@dataclass(frozen=True)
class Feature:
    name: str
    edges: tuple[float, ...]        # numeric: inner bin edges (a value v falls in bin searchsorted(edges, v, right))
    reference: tuple[float, ...]    # the training sample's share of each bin (categorical: of each class)

    @property
    def categorical(self) -> bool:
        return self.name in CATEGORICAL

    def counts(self, values: np.ndarray) -> np.ndarray:
        bins = len(self.reference)
        if self.categorical:
            index = np.clip(values.astype(np.int64), 0, bins - 1)
        else:
            index = np.searchsorted(np.asarray(self.edges), values, side="right")
        return np.bincount(index, minlength=bins)[:bins].astype(np.float64)

    def psi(self, values: np.ndarray) -> float:
        """Population stability index of `values` against the reference shares (both smoothed)."""
        live = self.counts(values)
        live = (live + SMOOTHING) / (live.sum() + SMOOTHING * len(live))
        ref = np.asarray(self.reference)
        return float(np.sum((live - ref) * np.log(live / ref)))


@dataclass(frozen=True)
class DriftProfile:
    modality: str
    rows: int  # training rows it was computed from
    features: tuple[Feature, ...]
    pad_id: int = 0
    unk_id: int | None = None

    def score(self, features: np.ndarray) -> tuple[float, dict[str, float]]:
        """(largest PSI, PSI per feature) of a window of row_features [n, F]; (0, {}) for an empty window."""
        if len(features) == 0:
            return 0.0, {}
        per = {f.name: round(f.psi(features[:, i]), 6) for i, f in enumerate(self.features)}
        return max(per.values()), per

    def row_features(self, rows: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
        return row_features(self.modality, rows, probabilities, self.pad_id, self.unk_id)

    def to_json(self) -> str:
        return json.dumps({"statistic": "psi", "modality": self.modality, "rows": self.rows, "pad_id": self.pad_id,
                           "unk_id": self.unk_id,
                           "features": [{"name": f.name, "edges": list(f.edges), "reference": list(f.reference)}
                                        for f in self.features]})

    @classmethod
    def from_json(cls, text: str) -> "DriftProfile":
        try:
            doc = json.loads(text)
            modality = doc["modality"]
            features = tuple(Feature(str(f["name"]), tuple(float(e) for e in f["edges"]),
                                     tuple(float(r) for r in f["reference"])) for f in doc["features"])
            if modality not in FEATURES or tuple(f.name for f in features) != FEATURES[modality]:
                raise ValueError(f"features {[f.name for f in features]} are not {modality}'s")
            if any(not f.reference or min(f.reference) <= 0 for f in features):
                raise ValueError("a reference share is not positive")
            return cls(modality, int(doc["rows"]), features, int(doc.get("pad_id", 0)),
                       None if doc.get("unk_id") is None else int(doc["unk_id"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ProfileError(f"drift profile is malformed ({exc}): re-export the model") from None


def build_profile(modality: str, rows: np.ndarray, probabilities: np.ndarray, n_classes: int, pad_id: int = 0,
                  unk_id: int | None = None) -> DriftProfile:
    """The reference profile of training `rows` and the model's `probabilities` for them (export calls this)."""
    values = row_features(modality, rows, probabilities, pad_id, unk_id)
    features = []
    for i, name in enumerate(FEATURES[modality]):
        if name in CATEGORICAL:
            feature = Feature(name, (), tuple([1.0] * n_classes))
        else:
            edges = np.unique(np.quantile(values[:, i], np.linspace(0, 1, BINS + 1)[1:-1]))
            feature = Feature(name, tuple(float(e) for e in edges), tuple([1.0] * (len(edges) + 1)))
        counts = feature.counts(values[:, i])
        shares = (counts + SMOOTHING) / (counts.sum() + SMOOTHING * len(counts))
        features.append(Feature(name, feature.edges, tuple(round(float(s), 8) for s in shares)))
    return DriftProfile(modality, len(rows), tuple(features), pad_id, unk_id)


def unk_id_of(tokenizer_json: str) -> int | None:
    """The [UNK] token's id in a tokenizer's JSON (core/text.py's WordLevel and WordPiece models), None if none."""
    try:
        vocab = json.loads(tokenizer_json)["model"]["vocab"]
        return int(vocab["[UNK]"]) if isinstance(vocab, dict) and "[UNK]" in vocab else None
    except (ValueError, KeyError, TypeError):
        return None


def read_profile(metadata: dict[str, str]) -> DriftProfile | None:
    """The drift profile an ONNX file's metadata carries; None for a file exported without one."""
    text = metadata.get(PROFILE_KEY)
    return DriftProfile.from_json(text) if text else None
