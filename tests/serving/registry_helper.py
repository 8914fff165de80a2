"""Write a registry in the layout of core/registry_layout.py (the server only reads it), for tests that
need what the writer refuses to produce: wrong checksums, corrupt cards and aliases.

versions/<vNNNN>/{model.onnx, card.json} appear whole (staged folder, then rename); aliases are replaced
with os.replace of a temp file, as the contract says.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

from tuneline.core.registry_layout import CARD_FILE, MODEL_FILE, STAGING_PREFIX, RegistryLayout


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_other_weights(onnx_path: Path, dest: Path, seed: int = 1) -> Path:
    """A copy of the model with other weights: every weight tensor (2+ dims: linear and conv kernels) multiplied
    element-wise by a seeded factor in [0.5, 1.5). Graph, input spec and metadata are unchanged, so the server
    takes it for the same model; only its logits tell the two apart (tests compare them with ONNX Runtime run
    directly on each file)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    rng = np.random.default_rng(seed)
    changed = 0
    for tensor in model.graph.initializer:
        weights = numpy_helper.to_array(tensor)
        if weights.dtype == np.float32 and weights.ndim >= 2:
            scaled = weights * rng.uniform(0.5, 1.5, weights.shape).astype(np.float32)
            tensor.CopyFrom(numpy_helper.from_array(scaled, tensor.name))
            changed += 1
    assert changed, f"{onnx_path}: no float32 weight tensor among the initializers to change"
    onnx.save(model, str(dest))
    return dest


def register_version(registry: Path, onnx_path: Path, name: str = "mnist", model_bytes: bytes | None = None,
                     card_sha256: str | None = None) -> str:
    """Add the next version holding `onnx_path` (or `model_bytes`); `card_sha256` forces a wrong checksum."""
    layout = RegistryLayout(registry)
    layout.versions_dir.mkdir(parents=True, exist_ok=True)
    version = layout.next_version()
    data = Path(onnx_path).read_bytes() if model_bytes is None else model_bytes
    staging = layout.versions_dir / f"{STAGING_PREFIX}{version}"
    staging.mkdir()
    (staging / MODEL_FILE).write_bytes(data)
    card = {"name": name, "version": version, "created": _now(),
            "files": {MODEL_FILE: {"sha256": card_sha256 or hashlib.sha256(data).hexdigest(), "bytes": len(data)}},
            "metrics": {"accuracy": 0.9}, "gates": [], "lineage": {"data_version": "test"}, "run_id": "test"}
    (staging / CARD_FILE).write_text(json.dumps(card, indent=2))
    os.replace(staging, layout.version_dir(version))
    return version


def set_alias(registry: Path, version: str, alias: str = "champion", text: str | None = None) -> None:
    """Point `alias` at `version` atomically (or write `text` verbatim, e.g. to corrupt it)."""
    path = RegistryLayout(registry).alias_path(alias)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    previous: list[str] = []
    if path.exists():
        try:
            old = json.loads(path.read_text())
            previous = [old["version"], *old.get("previous", [])]
        except (ValueError, KeyError):
            pass
    tmp = folder / f".{alias}.json.tmp"
    alias_json = json.dumps({"version": version, "previous": previous, "updated": _now()})
    tmp.write_text(text if text is not None else alias_json)
    os.replace(tmp, path)


def make_registry(root: Path, onnx_path: Path, versions: int = 1) -> Path:
    """A registry with `versions` copies of the model, the last one champion."""
    registry = root / "registry"
    shutil.rmtree(registry, ignore_errors=True)
    for _ in range(versions):
        version = register_version(registry, onnx_path)
    set_alias(registry, version)
    return registry
