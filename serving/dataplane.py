"""The data plane: what the server does, whichever protocol asks. REST V2, gRPC V2, /classify and the
repository routes are adapters over it (serving/rest_v2.py, grpc_v2.py, classify.py, rest_repository.py).

It owns the models (the holder: load, warm, swap; a batcher per model), the one ONNX Runtime thread, the
in-flight count, the metrics, the drain state and the champion watcher; and the loop around them: which version
answers (route: champion, or the challenger for a canary share), the challenger's shadow runs, the live numbers and
drift window per version (serving/live.py, GET /v2/live), and the capture of requests (serving/capture.py). Its methods take and return plain
Python and numpy values and raise ServingError subclasses (each carries its HTTP status; the gRPC adapter maps
that to a gRPC code): no HTTP or gRPC type enters here. As in KServe's protocol/dataplane.py, an adapter
decodes its wire format, calls a method, and encodes the answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import orjson

from tuneline.serving import inputs, live, protocol
from tuneline.serving.background import cancel_and_wait
from tuneline.serving.capture import Capture
from tuneline.serving.challenger import Shadow, routes_to_challenger
from tuneline.serving.drain import Drain
from tuneline.serving.errors import BadRequest, NotFound, NotReady
from tuneline.serving.images import decode_image
from tuneline.serving.metrics import ServingMetrics
from tuneline.serving.middleware import InFlight
from tuneline.serving.model_holder import CHALLENGER, CHAMPION, CONFIDENCE, DRIFT_FEATURES, LoadedModel, ModelHolder
from tuneline.serving.settings import ServeSettings
from tuneline.serving.watcher import watch_champion

if TYPE_CHECKING:
    from tuneline.serving.siblings import Siblings

log = logging.getLogger("tuneline.serving.dataplane")

Outputs = dict[str, np.ndarray]  # logits, probabilities, class: what LoadedModel.run returns


@dataclass(frozen=True)
class Route:
    """The model version that answers a request, and what it is to its model: champion, challenger or loaded."""

    model: LoadedModel
    role: str


@dataclass(frozen=True)
class Served:
    outputs: Outputs
    version: str      # the version that answered
    ids: list[str]    # the captured rows' ids (serve.capture), one per row; empty when not captured


class DataPlane:
    def __init__(self, settings: ServeSettings, providers: list[str]):
        """`providers` come from core.onnx_session.resolve_providers (checked once at start-up)."""
        self.settings, self.providers = settings, providers
        self.metrics = ServingMetrics()
        self.in_flight = InFlight()  # inference requests in progress, over every protocol (the batcher reads it)
        # One thread runs every session.run: ONNX Runtime already spreads one run over the cores, and a second
        # concurrent run would only fight it for them.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxruntime")
        self.holder = ModelHolder(settings, providers, self.metrics, self.executor, self.in_flight)
        self.drain = Drain(lambda: [m.batcher.flush() for m in self.holder.loaded() if m.batcher is not None],
                           settings.drain_delay_s)
        self._watcher: asyncio.Task | None = None
        self.live = live.LiveStats(settings.drift_window)
        self.shadow = Shadow(settings.shadow_queue, settings.shadow_percent, self._shadow_result, self._shadow_dropped,
                             max_batch_rows=settings.max_batch_size)
        self.capture = (Capture(settings.capture_dir, settings.capture_percent, settings.capture_max_mb)
                        if settings.capture else None)
        self.siblings: Siblings | None = None  # serve.workers > 1: the other workers (serving/workers.py sets it)
        self._children: dict[tuple, tuple] = {}  # (model, version, role) -> its labelled metrics
        self.metrics.drift_threshold.set(settings.drift_threshold)

    # ----- lifecycle (the app's lifespan) -----------------------------------------------------------------
    def start(self) -> None:
        """Load every champion in the background and follow the registry: live at once, ready once warm."""
        self._watcher = asyncio.create_task(watch_champion(self.holder, self.settings.reload_poll_s))
        if self.settings.challenger == "shadow":
            self.shadow.start()
        if self.capture is not None:
            self.capture.start()

    async def stop(self) -> None:
        """Finish the drain (flush the batchers, run the protocols' drain hooks), stop watching, end the thread."""
        await self.drain.finish()
        await self.shadow.stop()
        if self.capture is not None:
            await self.capture.stop()  # what is buffered is written
        await cancel_and_wait(self._watcher)
        self.executor.shutdown(wait=True)

    # ----- health and metadata ----------------------------------------------------------------------------
    def ready(self) -> bool:
        """A champion is loaded and warm (with serve.model: that model's), and the server is not stopping."""
        return self.holder.ready and not self.drain.announced

    def not_ready_reason(self) -> str:
        if self.drain.announced:  # it still answers inference requests until the delay ends (serving/drain.py)
            return "shutting down: send new requests elsewhere"
        return self.holder.last_error or "loading the champion"

    def server_metadata(self) -> dict:
        return protocol.server_metadata()

    def model(self, name: str, version: str | None = None) -> LoadedModel:
        """The loaded model that serves `name` (`version`, else its champion); NotFound / NotReady."""
        return self.holder.get(name, version)

    def model_ready(self, name: str, version: str | None = None) -> bool:
        """Whether `name` (`version`) can answer now; False for an unknown or unloaded one, or while the server is
        stopping (a probe's answer)."""
        try:
            self.probe_model(name, version)
        except (NotFound, NotReady):
            return False
        return True

    def probe_model(self, name: str, version: str | None = None) -> LoadedModel:
        """model(), for a readiness probe: also NotReady once the server is stopping (it still serves inference)."""
        model = self.model(name, version)
        if self.drain.announced:
            raise NotReady(f"model {name!r}: server {self.not_ready_reason()}")
        return model

    def model_metadata(self, name: str, version: str | None = None) -> dict:
        model = self.model(name, version)
        versions = sorted({m.version for m in self.holder.slot(name).loaded()}, key=lambda v: int(v[1:]))
        return protocol.model_metadata(model, versions)

    # ----- inference --------------------------------------------------------------------------------------
    def route(self, name: str, version: str | None = None, key: str | None = None) -> Route:
        """Who answers a request for `name`: `version` when it names one; else the champion, or with serve.challenger
        canary the challenger for serve.canary_percent of requests (by a hash of the client `key` when there is one).
        NotFound / NotReady as model()."""
        model = self.holder.get(name, version)
        slot = self.holder.slots[name]
        if version is not None:
            return Route(model, slot.role(model.version))
        challenger = slot.challenger
        if (self.settings.challenger == "canary" and challenger is not None
                and routes_to_challenger(self.settings.canary_percent, key)):
            return Route(challenger, CHALLENGER)
        return Route(model, CHAMPION)

    async def infer(self, model: LoadedModel, rows: np.ndarray) -> Outputs:
        """Run checked rows on `model` (float32 pixels or samples, int64 token ids: what its graph takes), batched
        with every other request for it.

        Adapters pass the model they checked the request against (from model()), so a champion swapped in
        between cannot run a tensor validated for another version's input.
        """
        return (await self.serve(Route(model, self.holder.slots[model.name].role(model.version)), rows)).outputs

    async def serve(self, route: Route, rows: np.ndarray, texts: list[str] | None = None) -> Served:
        """infer() for a routed request, and the loop around it: the live numbers, the drift window (champion),
        the shadow run (serve.challenger shadow) and the capture (serve.capture; `texts`: a text model's strings)."""
        model, role = route.model, route.role
        started = time.perf_counter()
        try:
            results = await model.batcher.submit(rows)
        except Exception:
            self._observe(model, role, len(rows), time.perf_counter() - started, None)
            raise
        self._observe(model, role, len(rows), time.perf_counter() - started, results)
        if role == CHAMPION:
            if DRIFT_FEATURES in results:
                self.live.add_drift(model.name, model.version, results[DRIFT_FEATURES])
            challenger = self.holder.slots[model.name].challenger
            if challenger is not None and self.settings.challenger == "shadow" and self.shadow.sampled():
                self.shadow.offer(challenger, rows, results["class"])
        ids: list[str] = []
        if self.capture is not None and self.capture.sampled():
            ids = self.capture.record(model, rows, texts, results["probabilities"])
            self.metrics.captured.labels(model.name).inc(len(ids))
        return Served(results, model.version, ids)

    def _metric_children(self, model: str, version: str, role: str) -> tuple:
        key = (model, version, role)
        children = self._children.get(key)
        if children is None:
            m = self.metrics
            children = self._children[key] = (m.live_requests.labels(*key), m.live_errors.labels(*key),
                                               m.live_latency.labels(*key), m.confidence.labels(*key), {})
        return children

    def _observe(self, model: LoadedModel, role: str, rows: int, seconds: float, results: Outputs | None) -> None:
        """A request's (or shadow run's) live numbers and metrics; `results` are LoadedModel.run's outputs for its
        rows, None when it failed."""
        requests, errors, latency, confidence, classes = self._metric_children(model.name, model.version, role)
        requests.inc()
        latency.observe(seconds)
        if results is None:
            self.live.observe(model.name, model.version, rows, seconds, None, None)
            errors.inc()
            return
        best_classes, confidences = results["class"].tolist(), results[CONFIDENCE].tolist()
        self.live.observe(model.name, model.version, rows, seconds, best_classes, confidences)
        for best, p in zip(best_classes, confidences):
            confidence.observe(p)
            child = classes.get(best)
            if child is None:
                child = classes[best] = self.metrics.predicted.labels(model.name, model.version, role, str(best))
            child.inc()

    def _shadow_result(self, challenger: LoadedModel, rows: np.ndarray, results: Outputs | None,
                       seconds: float, champion_classes: np.ndarray) -> None:
        self._observe(challenger, CHALLENGER, len(rows), seconds, results)
        if results is not None:
            agreed = self.live.compare(challenger.name, challenger.version, champion_classes, results["class"])
            self.metrics.shadow_compared.labels(challenger.name, challenger.version).inc(len(rows))
            self.metrics.shadow_agreed.labels(challenger.name, challenger.version).inc(agreed)

    def _shadow_dropped(self, challenger: LoadedModel) -> None:
        self.live.drop(challenger.name, challenger.version)
        self.metrics.shadow_dropped.labels(challenger.name, challenger.version).inc()

    def classify_model(self, name: str | None, version: str | None, key: str | None = None) -> Route:
        """Who answers /classify: `name`, or the one model served when the request names none (routed as route())."""
        return self.route(self.holder.default_name(name), version, key)

    async def classify(self, route: Route | LoadedModel, upload: bytes, top_k=1) -> tuple[dict, Served]:
        """One upload -> class, label, probability, the top k and every class's probability. The upload is what the
        model's modality takes: a PNG/JPEG image, a WAV/FLAC/OGG clip (any rate and channel count), UTF-8 text."""
        if isinstance(route, LoadedModel):
            route = Route(route, self.holder.slots[route.name].role(route.version))
        model = route.model
        k = protocol.parse_top_k(top_k, model)
        texts = None
        if model.modality == "image":
            rows = decode_image(upload, model.spec).astype("float32")
        elif model.modality == "audio":  # decoding and resampling a clip of up to serve.max_audio_s: off the loop
            rows = await asyncio.to_thread(inputs.upload_rows, upload, model)
        else:
            rows = inputs.upload_rows(upload, model)
            texts = [upload.decode("utf-8", "replace").removeprefix(inputs.BOM)]
        served = await self.serve(route, rows, texts)
        return protocol.classification(model, served.outputs["probabilities"][0], k), served

    # ----- the loop: live numbers, drift, feedback ----------------------------------------------------------
    def live_state(self) -> dict:
        """This process's live numbers (what a sibling worker asks for)."""
        return self.live.state()

    async def live_summary(self, name: str | None = None) -> list[dict]:
        """GET /v2/live: per served model (or `name`), the champion's and challenger's live numbers and the drift
        score, over every worker of the server. Sets the drift gauge."""
        names = [self.holder.slot(name).name] if name is not None else self.holder.names
        states = [self.live_state()]
        if self.siblings is not None:
            states += await self.siblings.collect("live")
        merged = live.merge(states, self.settings.drift_window)
        summaries = []
        for model_name in names:
            slot = self.holder.slots[model_name]
            champion, challenger = slot.champion, slot.challenger
            shown = champion or challenger
            summary = live.model_summary(
                model_name, self.settings.challenger, champion.version if champion else None,
                challenger.version if challenger else None, shown.labels if shown else [], merged,
                champion.drift_profile if champion else None, self.settings.drift_threshold,
                self.settings.drift_window)
            if summary["drift"]["score"] is not None:
                self.metrics.drift_score.labels(model_name).set(summary["drift"]["score"])
            summaries.append(summary)
        return summaries

    def feedback(self, raw: bytes) -> dict:
        """POST /v2/feedback: {"id": a captured row's id, "label": its true class}; recorded beside the capture."""
        if self.capture is None:
            raise NotFound("feedback needs the capture on (serve.capture: true): this server captures nothing, so no "
                           "id can be labelled")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"feedback body is not valid JSON ({exc})") from None
        if not isinstance(body, dict) or set(body) - {"id", "label"}:
            raise BadRequest('feedback body must be the JSON object {"id": "<x-tuneline-request-id>", "label": '
                             '<class index>}')
        row_id, label = body.get("id"), body.get("label")
        if not isinstance(row_id, str) or not (0 < len(row_id) <= 64) or not (row_id.isascii() and row_id.isalnum()):
            raise BadRequest(f"feedback id must be a captured row's id (the x-tuneline-request-id header: 32 hex "
                             f"digits), got {row_id!r}"[:300])
        if not isinstance(label, int) or isinstance(label, bool) or label < 0:
            raise BadRequest(f"feedback label must be a class index (an integer ≥ 0), got {label!r}"[:300])
        known = self.capture.feedback(row_id, label)
        self.metrics.feedback.inc()
        if known is not None:
            model, version, predicted = known
            self.live.label(model, version, predicted == label)
        return {"id": row_id, "label": label}

    # ----- model repository -------------------------------------------------------------------------------
    def index(self) -> list[dict]:
        """Every registry version of every served model, and whether it is loaded."""
        self.holder.refresh()
        entries = []
        for name in self.holder.names:
            slot = self.holder.slots[name]
            loaded = {m.version for m in slot.loaded()}
            entries += [{"name": name, "version": v, "state": "READY" if v in loaded else "UNAVAILABLE",
                         "reason": slot.role(v) if v in loaded else "not loaded"}
                        for v in slot.registry.versions()]
        return entries

    def check_model(self, name: str) -> None:
        """NotFound for a name the registry does not hold (or serve.model excludes)."""
        self.holder.slot(name)

    async def load(self, name: str, version: str | None) -> dict:
        """Reload `name`'s champion alias (version None) or load `version` beside it; the old one serves until
        the new one is warm."""
        slot = self.holder.slot(name)
        previous = slot.champion.version if slot.champion else None
        if version is None:
            model = await self.holder.reload_champion(name, force=True, source="api")
            if model is None:
                raise NotReady(slot.last_error or f"model {name!r} has no champion alias in the registry")
            role = "champion"
        else:
            champion = slot.champion is not None and version == slot.champion.version
            model = await self.holder.load(name, version, champion=champion, source="api")
            role = "champion" if champion else "loaded"
        return {**model.describe(), "role": role, "previous_champion": previous}

    def unload(self, name: str, version: str) -> None:
        """Unload a version loaded beside the champion; Conflict for the champion, NotFound if not loaded."""
        self.holder.unload(name, version)
