"""The loaded model versions and the champion pointer: load, verify, warm up, then swap atomically.

A load happens off the event loop (checksum, session creation, warm-up), so the old champion keeps
answering; the swap is one reference assignment on the event loop. Requests that already hold the old
version (queued in its batcher) finish on it. A failed load leaves everything as it was and is reported
in the return value / exception, the log and the metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from serving.batcher import Batcher
from serving.errors import LoadError, NotFound, NotReady, ServingError
from serving.metrics import ServingMetrics
from serving.repository import RegistryReader, VerifiedModel
from serving.settings import ServeSettings
from tasks.ship.onnx_session import DeviceError, open_session

log = logging.getLogger("serving.model")

CHAMPION = "champion"


@dataclass
class LoadedModel:
    name: str
    version: str
    provider: str
    session: object  # onnxruntime.InferenceSession
    input_name: str
    output_name: str
    image_shape: tuple[int, ...]  # per-row shape the graph takes, e.g. (1, 28, 28)
    value_range: tuple[float, float]  # raw pixel range the graph expects (normalisation is inside it)
    labels: list[str]
    metadata: dict[str, str]  # the ONNX file's metadata_props
    card: dict
    loaded_at: float = field(default_factory=time.time)
    batcher: Batcher | None = None

    def run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """logits, probabilities and class for float32 pixels [rows, *image_shape] (runs in a worker thread)."""
        (logits,) = self.session.run([self.output_name], {self.input_name: pixels})
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))  # stable softmax
        return {"logits": logits, "probabilities": shifted / shifted.sum(axis=1, keepdims=True),
                "class": logits.argmax(axis=1).astype(np.int64)}

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version, "provider": self.provider}


def _metadata_json(metadata: dict[str, str], key: str, version: str):
    try:
        return json.loads(metadata[key])
    except (KeyError, ValueError):
        raise LoadError(f"{version}: the ONNX file lacks valid metadata {key!r}: export it with `tuneline stage "
                        "export`, which writes labels, input spec and normalisation", "metadata") from None


def build_model(registry: RegistryReader, version: str, settings: ServeSettings, providers: list[str]) -> LoadedModel:
    """Verify, load and warm one version (blocking: call it in a thread). Raises LoadError / NotFound."""
    verified = registry.read_verified(version, settings.model_file)
    try:
        return _session_model(verified, settings, providers)
    except ServingError:
        raise
    except DeviceError as exc:
        raise LoadError(f"{version}: {exc}", reason="device") from None
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for a corrupt or unsupported graph
        message = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise LoadError(f"{version}/{settings.model_file}: ONNX Runtime cannot load or run it ({message})",
                        reason="corrupt") from None


def _session_model(verified: VerifiedModel, settings: ServeSettings, providers: list[str]) -> LoadedModel:
    version = verified.version
    # The factory the export gate measured with: the latency it gated is the latency served here.
    session = open_session(verified.data, settings.device, settings.threads, providers)
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    spec = _metadata_json(metadata, "input", version)
    labels = [str(label) for label in _metadata_json(metadata, "labels", version)]
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or inputs[0].name != spec.get("name"):
        raise LoadError(f"{version}: metadata input {spec.get('name')!r} does not match the graph's inputs "
                        f"{[i.name for i in inputs]}", reason="metadata")
    model = LoadedModel(
        name=str(verified.card.get("name", "mnist")), version=version, provider=session.get_providers()[0],
        session=session, input_name=inputs[0].name, output_name=outputs[0].name,
        image_shape=tuple(int(d) for d in spec["shape"][1:]), value_range=tuple(spec.get("range", (0, 255))),
        labels=labels, metadata=metadata, card=verified.card)
    # Warm-up before the model may answer: the first runs allocate arenas and pick kernels per batch size.
    for rows in sorted({1, settings.max_batch_size}):
        model.run(np.zeros((rows, *model.image_shape), dtype=np.float32))
    return model


class ModelHolder:
    """Which versions are loaded, which one is champion; loads one at a time."""

    def __init__(self, settings: ServeSettings, providers: list[str], metrics: ServingMetrics, executor: Executor,
                 in_flight: Callable[[], int] | None = None):
        self.settings, self.providers, self.metrics = settings, providers, metrics
        self.executor, self.in_flight = executor, in_flight
        self.registry = RegistryReader(settings.registry)
        self.champion: LoadedModel | None = None
        self.others: dict[str, LoadedModel] = {}  # versions loaded by id, beside the champion
        self.last_error: str | None = None
        self._lock = asyncio.Lock()

    @property
    def ready(self) -> bool:
        return self.champion is not None

    @property
    def name(self) -> str | None:
        return self.champion.name if self.champion else None

    def get(self, name: str, version: str | None = None) -> LoadedModel:
        """The model to serve `name` (and `version`, else the champion); NotFound / NotReady."""
        champion = self.champion
        if champion is None:
            why = f": {self.last_error}" if self.last_error else " (loading, or no champion alias in the registry yet)"
            raise NotReady(f"no model is ready{why}")
        if name != champion.name:
            raise NotFound(f"unknown model {name!r}: this server serves {champion.name!r}")
        if version is None or version == champion.version:
            return champion
        if version in self.others:
            return self.others[version]
        self.registry.card(version)  # NotFound when the version does not exist at all
        load = json.dumps({"parameters": {"version": version}})
        raise NotReady(f"model {name!r} version {version!r} is in the registry but not loaded: "
                       f"POST /v2/repository/models/{name}/load with {load}")

    def loaded(self) -> list[LoadedModel]:
        return [m for m in [self.champion, *self.others.values()] if m is not None]

    async def reload_champion(self, force: bool = False, source: str = "watch") -> LoadedModel | None:
        """Load the version the champion alias names and swap it in; None if there is no alias (yet)."""
        try:
            version = self.registry.alias_version(CHAMPION)
        except LoadError as exc:
            self._failed(exc, version="?", source=source)
            raise
        if version is None:
            self.last_error = f"no champion alias at {self.registry.alias_path(CHAMPION)}"
            return None
        if not force and self.champion is not None and self.champion.version == version:
            return self.champion
        return await self.load(version, champion=True, source=source)

    async def load(self, version: str, champion: bool, source: str = "api") -> LoadedModel:
        """Load + warm `version`; make it the champion or an extra version. Raises LoadError / NotFound."""
        async with self._lock:
            started = time.perf_counter()
            try:
                model = await asyncio.to_thread(build_model, self.registry, version, self.settings, self.providers)
            except (LoadError, NotFound) as exc:
                self._failed(exc, version, source)
                raise
            if self.champion is not None and model.name != self.champion.name:
                exc = LoadError(f"{version}: card name {model.name!r} differs from the served model "
                                f"{self.champion.name!r}; one server serves one model", reason="card")
                self._failed(exc, version, source)
                raise exc
            model.batcher = self._batcher(model)
            previous = self.champion
            if champion:
                self.champion = model  # the swap: later requests see the new version, queued ones finish on the old
                self.others.pop(version, None)
            else:
                self.others[version] = model
            self.last_error = None
            self._report_loaded(model, previous if champion else None, champion)
            log.info("model loaded", extra={"event": "model_loaded", "model": model.name, "version": version,
                                            "role": CHAMPION if champion else "loaded", "provider": model.provider,
                                            "previous": previous.version if champion and previous else None,
                                            "source": source,
                                            "load_ms": round((time.perf_counter() - started) * 1e3, 1)})
            return model

    def unload(self, version: str) -> None:
        if self.champion is not None and version == self.champion.version:
            raise LoadError(f"{version} is the champion; promote another version instead of unloading it", "champion")
        model = self.others.pop(version, None)
        if model is None:
            raise NotFound(f"version {version!r} is not loaded")
        self.metrics.model_info.remove(model.name, model.version, model.provider, "loaded")

    def _batcher(self, model: LoadedModel) -> Batcher:
        s = self.settings

        def on_batch(rows: int, waits: list[float], run_s: float) -> None:
            self.metrics.observe_batch(model.version, model.provider, rows, waits, run_s)

        return Batcher(model.run, self.executor, max_batch_size=s.max_batch_size,
                       max_delay_s=s.max_queue_delay_us / 1e6, enabled=s.batching, in_flight=self.in_flight,
                       on_batch=on_batch)

    def _report_loaded(self, model: LoadedModel, replaced: LoadedModel | None, champion: bool) -> None:
        info = self.metrics.model_info
        if replaced is not None:
            try:
                info.remove(replaced.name, replaced.version, replaced.provider, CHAMPION)
            except KeyError:
                pass
        info.labels(model.name, model.version, model.provider, CHAMPION if champion else "loaded").set(1)
        self.metrics.loads.labels("success").inc()
        self.metrics.ready.set(1 if self.ready else 0)

    def _failed(self, exc: ServingError, version: str, source: str) -> None:
        reason = getattr(exc, "reason", "missing")
        serving = self.champion.version if self.champion else None
        self.last_error = f"load of {version} failed: {exc}"
        self.metrics.loads.labels("failure").inc()
        self.metrics.load_failures.labels(reason).inc()
        log.error("model load failed", extra={"event": "model_load_failed", "version": version, "reason": reason,
                                              "error": str(exc), "still_serving": serving, "source": source})
