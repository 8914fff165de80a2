"""The data plane: what the server does, whichever protocol asks. REST V2, gRPC V2, /classify and the
repository routes are adapters over it (serving/rest_v2.py, grpc_v2.py, classify.py, rest_repository.py).

It owns the models (the holder: load, warm, swap; a batcher per model), the one ONNX Runtime thread, the
in-flight count, the metrics, the drain state and the champion watcher. Its methods take and return plain
Python and numpy values and raise ServingError subclasses (each carries its HTTP status; the gRPC adapter maps
that to a gRPC code): no HTTP or gRPC type enters here. As in KServe's protocol/dataplane.py, an adapter
decodes its wire format, calls a method, and encodes the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tuneline.serving import inputs, protocol
from tuneline.serving.drain import Drain
from tuneline.serving.errors import NotFound, NotReady
from tuneline.serving.images import decode_image
from tuneline.serving.metrics import ServingMetrics
from tuneline.serving.middleware import InFlight
from tuneline.serving.model_holder import LoadedModel, ModelHolder
from tuneline.serving.settings import ServeSettings
from tuneline.serving.watcher import watch_champion

log = logging.getLogger("tuneline.serving.dataplane")

Outputs = dict[str, np.ndarray]  # logits, probabilities, class: what LoadedModel.run returns


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

    # ----- lifecycle (the app's lifespan) -----------------------------------------------------------------
    def start(self) -> None:
        """Load every champion in the background and follow the registry: live at once, ready once warm."""
        self._watcher = asyncio.create_task(watch_champion(self.holder, self.settings.reload_poll_s))

    async def stop(self) -> None:
        """Finish the drain (flush the batchers, run the protocols' drain hooks), stop watching, end the thread."""
        await self.drain.finish()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
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
    async def infer(self, model: LoadedModel, rows: np.ndarray) -> Outputs:
        """Run checked rows on `model` (float32 pixels or samples, int64 token ids: what its graph takes), batched
        with every other request for it.

        Adapters pass the model they checked the request against (from model()), so a champion swapped in
        between cannot run a tensor validated for another version's input.
        """
        return await model.batcher.submit(rows)

    def classify_model(self, name: str | None, version: str | None) -> LoadedModel:
        """The model /classify runs: `name`, or the one model served when the request names none."""
        return self.model(self.holder.default_name(name), version)

    async def classify(self, model: LoadedModel, upload: bytes, top_k=1) -> dict:
        """One upload -> class, label, probability, the top k and every class's probability. The upload is what the
        model's modality takes: a PNG/JPEG image, a WAV/FLAC/OGG clip (any rate and channel count), UTF-8 text."""
        k = protocol.parse_top_k(top_k, model)
        if model.modality == "image":
            rows = decode_image(upload, model.spec).astype("float32")
        elif model.modality == "audio":  # decoding and resampling a clip of up to serve.max_audio_s: off the loop
            rows = await asyncio.to_thread(inputs.upload_rows, upload, model)
        else:
            rows = inputs.upload_rows(upload, model)
        results = await self.infer(model, rows)
        return protocol.classification(model, results["probabilities"][0], k)

    # ----- model repository -------------------------------------------------------------------------------
    def index(self) -> list[dict]:
        """Every registry version of every served model, and whether it is loaded."""
        self.holder.refresh()
        entries = []
        for name in self.holder.names:
            slot = self.holder.slots[name]
            loaded = {m.version for m in slot.loaded()}
            champion = slot.champion.version if slot.champion else None
            entries += [{"name": name, "version": v, "state": "READY" if v in loaded else "UNAVAILABLE",
                         "reason": "champion" if v == champion else ("loaded" if v in loaded else "not loaded")}
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
