"""The loaded models: for each model name the registry holds (or the one serve.model names), its champion and
any versions loaded beside it. Load, verify, warm up, then swap atomically.

Which file of a version is loaded follows serve.precision and the export's measurements (serving/precision.py);
on a GPU provider the model runs through I/O binding with reused page-locked buffers (core/io_binding.py).
A model's input follows its input spec's modality (core/spec.py): images (float32 pixels), audio (float32 samples)
or text (int64 token ids, from the tokenizer its ONNX metadata carries, checked against the spec's sha256 and loaded
here once); serving/inputs.py turns each protocol's input into those rows.

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
from pathlib import Path

import numpy as np

from tuneline.serving.batcher import Batcher
from tuneline.serving.errors import BadRequest, Conflict, LoadError, NotFound, NotReady, ServingError
from tuneline.serving.inputs import v2_input_name
from tuneline.serving.metrics import ServingMetrics
from tuneline.serving.precision import FileChoice, choose_file
from tuneline.serving.repository import RegistryReader, VerifiedModel, model_names
from tuneline.serving.settings import ServeSettings
from tuneline.core.spec import InputSpec, SpecError
from tuneline.core.io_binding import BoundRunner, Runner, make_runner, plain_runner
from tuneline.core.onnx_metadata import GRAPH_INPUTS, input_name, read_input_spec, read_tokenizer_json
from tuneline.core.text import TextError, Tokenizer
from tuneline.core.drift import DriftProfile, ProfileError, read_profile
from tuneline.core.onnx_session import TENSORRT, DeviceError, open_session, tensorrt_options

log = logging.getLogger("tuneline.serving.model")

CHAMPION, CHALLENGER = "champion", "challenger"
CONFIDENCE, DRIFT_FEATURES = "confidence", "drift_features"  # LoadedModel.run's outputs for the live numbers only
ORT_TYPES = {"float32": "tensor(float)", "int64": "tensor(int64)"}  # core.onnx_metadata.GRAPH_INPUTS' dtypes


@dataclass
class LoadedModel:
    name: str
    version: str
    provider: str
    session: object  # onnxruntime.InferenceSession
    graph_input: str  # the graph's input: pixels, samples or tokens (core.onnx_metadata.GRAPH_INPUTS)
    output_name: str
    spec: InputSpec   # what the ONNX file declares: input shape, value range, class names
    metadata: dict[str, str]  # the ONNX file's metadata_props
    card: dict
    runner: Runner     # the session's run path: plain on CPU, I/O binding on a GPU (core/io_binding.py)
    choice: FileChoice  # which file of the version is served, and why (serve.precision)
    tokenizer: Tokenizer | None = None  # a text model's, from its ONNX metadata
    max_samples: int = 0  # an audio model's longest clip a request may send (serve.max_audio_s at its rate)
    drift_profile: DriftProfile | None = None  # the training data's reference profile (core/drift.py), if exported
    loaded_at: float = field(default_factory=time.time)
    batcher: Batcher | None = None

    @property
    def modality(self) -> str:
        return self.spec.modality

    @property
    def input_name(self) -> str:
        """The V2 input's name: the graph's for images and audio (pixels, samples), `text` for a text model, whose
        clients send strings (serving/inputs.py) that the server turns into the graph's `tokens`."""
        return v2_input_name(self)

    @property
    def input_dtype(self) -> np.dtype:
        """What the graph's input holds: float32 pixels or samples, int64 token ids."""
        return np.dtype(GRAPH_INPUTS[self.spec.modality][1])

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Per-row shape the graph takes: (channels, height, width), (samples,) or (max_length,)."""
        return self.spec.shape

    @property
    def value_range(self) -> tuple[float, float]:
        """Raw pixel range the graph expects (normalisation is inside it)."""
        return self.spec.value_range

    @property
    def labels(self) -> list[str]:
        return list(self.spec.class_names)

    def run(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """logits, probabilities and class for checked rows [rows, *image_shape] of input_dtype (runs in a worker
        thread); also what the live numbers read of each row: its confidence (highest probability) and, when the
        model has a drift profile, its drift features (DRIFT_FEATURES).

        The last two are computed here, once per batch in the inference thread, rather than per request on the event
        loop: at 64 connections they were a tenth of the loop's CPU per request (docs/benchmarks.md, inference
        server), and the loop is what limits one process."""
        logits = self.runner(rows)
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))  # stable softmax
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        outputs = {"logits": logits, "probabilities": probabilities, "class": logits.argmax(axis=1).astype(np.int64),
                   CONFIDENCE: probabilities.max(axis=1)}
        if self.drift_profile is not None:
            outputs[DRIFT_FEATURES] = self.drift_profile.row_features(rows, probabilities)
        return outputs

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version, "provider": self.provider}

    @property
    def run_path(self) -> dict:
        """How the model runs, for the load log: file, precision and why, I/O binding and page-locked buffers."""
        bound = isinstance(self.runner, BoundRunner)
        return {"file": self.choice.file, "precision": self.choice.precision, "precision_reason": self.choice.reason,
                "io_binding": bound, "pinned": self.runner.pinned if bound else None}


def build_model(registry: RegistryReader, version: str, settings: ServeSettings, providers: list[str]) -> LoadedModel:
    """Verify, load and warm one version (blocking: call it in a thread). Raises LoadError / NotFound."""
    choice = choose_file(registry.card(version), settings.precision, settings.model_file, providers[0])
    verified = registry.read_verified(version, choice.file)
    try:
        return _session_model(registry.name, verified, settings, providers, choice)
    except ServingError:
        raise
    except (SpecError, TextError) as exc:
        raise LoadError(f"{registry.name} {version}: {exc}", reason="metadata") from None
    except DeviceError as exc:
        raise LoadError(f"{version}: {exc}", reason="device") from None
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for a corrupt or unsupported graph
        message = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise LoadError(f"{version}/{choice.file}: ONNX Runtime cannot load or run it ({message})",
                        reason="corrupt") from None


def _provider_options(name: str, version: str, settings: ServeSettings, providers: list[str],
                      choice: FileChoice) -> dict[str, dict[str, str]]:
    """TensorRT's options when it leads: an engine cache folder per model version and precision, FP16 kernels
    for the FP16 file."""
    if providers[0] != TENSORRT:
        return {}
    cache = Path(settings.trt_cache_dir) / name / version / choice.precision
    cache.mkdir(parents=True, exist_ok=True)
    return {TENSORRT: tensorrt_options(cache, fp16=choice.precision == "fp16")}


def _session_model(name: str, verified: VerifiedModel, settings: ServeSettings, providers: list[str],
                   choice: FileChoice) -> LoadedModel:
    version = verified.version
    # The factory the export gate measured with: the latency it gated is the latency served here. With
    # serve.device=cuda it refuses (DeviceError) a session that fell back from the provider asked for.
    session = open_session(verified.data, settings.device, settings.threads, providers,
                           provider_options=_provider_options(name, version, settings, providers, choice))
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    where = f"{name} {version}"
    spec = read_input_spec(metadata, where)  # SpecError: the file does not say what it takes
    declared = input_name(metadata, where)
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or inputs[0].name != declared:
        raise LoadError(f"{version}: metadata input {declared!r} does not match the graph's inputs "
                        f"{[i.name for i in inputs]}", reason="metadata")
    wanted = ORT_TYPES[GRAPH_INPUTS[spec.modality][1]]
    if inputs[0].type != wanted or outputs[0].type != "tensor(float)":
        # Clients send and receive what the V2 metadata says whichever file is served.
        raise LoadError(f"{version}/{choice.file}: the graph takes {inputs[0].type} and returns {outputs[0].type}, "
                        f"but a {spec.modality} model must take {wanted} and return tensor(float): export it so",
                        reason="metadata")
    tokenizer = None
    if spec.modality == "text":  # the tokenizer training used, carried by the file and named by the spec's sha256
        tokenizer = Tokenizer.from_json(read_tokenizer_json(metadata, spec, where))
        if tokenizer.max_length != spec.text.max_length:
            raise LoadError(f"{version}: the tokenizer pads to {tokenizer.max_length} tokens but the input spec says "
                            f"{spec.text.max_length}: re-export it", reason="metadata")
    max_samples = 0
    if spec.audio is not None:  # the model's own clip is always accepted, whatever serve.max_audio_s says
        max_samples = max(spec.audio.samples, int(settings.max_audio_s * spec.audio.sample_rate))
    # I/O binding (core/io_binding.py) binds float32 buffers: a graph taking int64 token ids runs through session.run.
    if wanted == "tensor(float)":
        runner = make_runner(session, inputs[0].name, outputs[0].name, settings.max_batch_size)
    else:
        runner = plain_runner(session, inputs[0].name, outputs[0].name)
    try:
        profile = read_profile(metadata)
    except ProfileError as exc:  # served all the same, without a drift score
        log.warning("no drift score", extra={"event": "drift_profile_unreadable", "model": name, "version": version,
                                             "error": str(exc)})
        profile = None
    model = LoadedModel(name=name, version=version, provider=session.get_providers()[0], session=session,
                        graph_input=inputs[0].name, output_name=outputs[0].name, spec=spec, metadata=metadata,
                        card=verified.card, choice=choice, runner=runner, tokenizer=tokenizer,
                        max_samples=max_samples, drift_profile=profile)
    # Warm-up before the model may answer: the first runs allocate arenas and pick kernels per batch size, so the
    # largest batch runs first (the arena is sized once, then reused), then every power of two down to 1. Every size
    # up to 64 would be 2,080 rows: seconds for a speech model, during which its requests get 503. Under TensorRT a
    # new shape within the engine's profile needs no new engine: 1 and the largest cover it.
    fill = spec.text.pad_id if spec.text is not None else 0
    for rows in warm_batch_sizes(settings.max_batch_size, providers[0]):
        model.run(np.full((rows, *model.image_shape), fill, dtype=model.input_dtype))
    return model


def warm_batch_sizes(max_batch_size: int, provider: str) -> list[int]:
    """The batch sizes a load runs before the model answers: the largest, then the powers of two below it, down to 1
    (only the largest and 1 under TensorRT)."""
    if provider == TENSORRT:
        return sorted({1, max_batch_size}, reverse=True)
    return sorted({max_batch_size} | {2 ** k for k in range(max_batch_size.bit_length()) if 2 ** k < max_batch_size},
                  reverse=True)


class ModelSlot:
    """One model name: its champion and the versions loaded beside it; loads one at a time."""

    def __init__(self, registry: RegistryReader):
        self.registry = registry
        self.name = registry.name
        self.champion: LoadedModel | None = None
        self.challenger: LoadedModel | None = None  # the challenger alias's version (serve.challenger shadow/canary)
        self.others: dict[str, LoadedModel] = {}  # versions loaded by id, beside the champion
        self.last_error: str | None = None
        self.lock = asyncio.Lock()

    def loaded(self) -> list[LoadedModel]:
        return [m for m in [self.champion, self.challenger, *self.others.values()] if m is not None]

    def role(self, version: str) -> str:
        """champion, challenger or loaded: what `version` is to this model now."""
        if self.champion is not None and version == self.champion.version:
            return CHAMPION
        if self.challenger is not None and version == self.challenger.version:
            return CHALLENGER
        return "loaded"


class ModelHolder:
    """Every served model name's slot; the registry's names are rediscovered by refresh() (the watcher's poll)."""

    def __init__(self, settings: ServeSettings, providers: list[str], metrics: ServingMetrics, executor: Executor,
                 in_flight: Callable[[], int] | None = None):
        self.settings, self.providers, self.metrics = settings, providers, metrics
        self.executor, self.in_flight = executor, in_flight
        self.only = settings.model  # serve.model: serve this one name only
        self.slots: dict[str, ModelSlot] = {}
        self.refresh()

    # ----- which models -------------------------------------------------------------------------------------
    def refresh(self) -> list[str]:
        """Add a slot for each model name now in the registry (or serve.model's, whether or not it is there yet)."""
        names = [self.only] if self.only else model_names(self.settings.registry)
        for name in names:
            if name not in self.slots:
                self.slots[name] = ModelSlot(RegistryReader(self.settings.registry, name))
        return names

    @property
    def ready(self) -> bool:
        """At least one champion is loaded and warm (with serve.model: that model's)."""
        return any(slot.champion is not None for slot in self.slots.values())

    @property
    def last_error(self) -> str | None:
        errors = [f"{name}: {slot.last_error}" for name, slot in self.slots.items() if slot.last_error]
        if not self.slots:
            return f"no model in the registry {self.settings.registry} yet"
        return "; ".join(errors) or None

    @property
    def names(self) -> list[str]:
        return sorted(self.slots)

    def slot(self, name: str) -> ModelSlot:
        """The slot of a served model name; NotFound names the ones served."""
        slot = self.slots.get(name)
        if slot is None and not self.only:
            self.refresh()  # a model registered since the last poll
            slot = self.slots.get(name)
        if slot is None:
            served = ", ".join(repr(n) for n in self.names) or "none yet"
            limited = f" (limited to it by serve.model)" if self.only else ""
            raise NotFound(f"unknown model {name!r}: this server serves {served}{limited}")
        return slot

    def default_name(self, name: str | None) -> str:
        """`name`, or the one model served when a request (e.g. /classify) names none."""
        if name:
            return name
        names = [n for n in self.names if self.slots[n].champion is not None] or self.names
        if len(names) == 1:
            return names[0]
        if not names:
            raise NotReady(f"no model is ready: {self.last_error or 'loading'}")
        raise BadRequest(f"this server serves several models ({', '.join(names)}): name one (?model=NAME)")

    def get(self, name: str, version: str | None = None) -> LoadedModel:
        """The model to serve `name` (and `version`, else its champion); NotFound / NotReady."""
        slot = self.slot(name)
        champion = slot.champion
        if champion is None:
            why = f": {slot.last_error}" if slot.last_error else " (loading, or no champion alias in the registry yet)"
            raise NotReady(f"model {name!r} is not ready{why}")
        if version is None or version == champion.version:
            return champion
        if version in slot.others:
            return slot.others[version]
        if slot.challenger is not None and version == slot.challenger.version:
            return slot.challenger
        slot.registry.card(version)  # NotFound when the version does not exist at all
        load = json.dumps({"parameters": {"version": version}})
        raise NotReady(f"model {name!r} version {version!r} is in the registry but not loaded: "
                       f"POST /v2/repository/models/{name}/load with {load}")

    def loaded(self) -> list[LoadedModel]:
        return [m for name in self.names for m in self.slots[name].loaded()]

    # ----- loading ----------------------------------------------------------------------------------------
    async def reload_champion(self, name: str, force: bool = False, source: str = "watch") -> LoadedModel | None:
        """Load the version `name`'s champion alias names and swap it in; None if there is no alias (yet)."""
        slot = self.slot(name)
        try:
            version = slot.registry.alias_version(CHAMPION)
        except LoadError as exc:
            self._failed(slot, exc, version="?", source=source)
            raise
        if version is None:
            slot.last_error = f"no champion alias at {slot.registry.alias_path(CHAMPION)}"
            return None
        if not force and slot.champion is not None and slot.champion.version == version:
            return slot.champion
        return await self.load(name, version, champion=True, source=source)

    async def reload_challenger(self, name: str, source: str = "watch") -> LoadedModel | None:
        """Follow `name`'s challenger alias (serve.challenger shadow or canary): load the version it names beside the
        champion; None (and nothing loaded) when it is unset or names the champion's version."""
        slot = self.slot(name)
        try:
            version = slot.registry.alias_version(CHALLENGER)
        except LoadError as exc:
            self._failed(slot, exc, version="?", source=source)
            raise
        if version is None or (slot.champion is not None and version == slot.champion.version):
            if slot.challenger is not None:
                old, slot.challenger = slot.challenger, None
                self.metrics.drop_model_info(old.name, old.version, old.provider, CHALLENGER)
            return None
        if slot.challenger is not None and slot.challenger.version == version:
            return slot.challenger
        return await self.load(name, version, champion=False, source=source, challenger=True)

    async def load(self, name: str, version: str, champion: bool, source: str = "api",
                   challenger: bool = False) -> LoadedModel:
        """Load + warm `name` `version`; make it the champion, the challenger or an extra version. Raises LoadError /
        NotFound."""
        slot = self.slot(name)
        async with slot.lock:
            started = time.perf_counter()
            try:
                model = await asyncio.to_thread(build_model, slot.registry, version, self.settings, self.providers)
            except (LoadError, NotFound) as exc:
                self._failed(slot, exc, version, source)
                raise
            model.batcher = self._batcher(model)
            previous = slot.champion if champion else (slot.challenger if challenger else None)
            if champion:
                slot.champion = model  # the swap: later requests see the new version, queued ones finish on the old
                slot.others.pop(version, None)
            elif challenger:
                slot.challenger = model
            else:
                slot.others[version] = model
            slot.last_error = None
            role = CHAMPION if champion else (CHALLENGER if challenger else "loaded")
            self._report_loaded(model, previous, role)
            log.info("model loaded", extra={"event": "model_loaded", "model": model.name, "version": version,
                                            "role": role, "provider": model.provider,
                                            **model.run_path,
                                            "input": model.spec.describe(),
                                            "previous": previous.version if previous else None,
                                            "source": source,
                                            "load_ms": round((time.perf_counter() - started) * 1e3, 1)})
            return model

    def unload(self, name: str, version: str) -> None:
        slot = self.slot(name)
        if slot.champion is not None and version == slot.champion.version:
            raise Conflict(f"{name} {version} is the champion; promote another version instead of unloading it")
        if slot.challenger is not None and version == slot.challenger.version and version not in slot.others:
            raise Conflict(f"{name} {version} is the challenger (serve.challenger {self.settings.challenger}); move or "
                           "clear the challenger alias instead of unloading it")
        model = slot.others.pop(version, None)
        if model is None:
            raise NotFound(f"model {name!r} version {version!r} is not loaded")
        self.metrics.drop_model_info(model.name, model.version, model.provider, "loaded")

    def _batcher(self, model: LoadedModel) -> Batcher:
        s = self.settings

        def on_batch(rows: int, waits: list[float], run_s: float) -> None:
            self.metrics.observe_batch(model.name, model.version, model.provider, rows, waits, run_s)

        return Batcher(model.run, self.executor, max_batch_size=s.max_batch_size,
                       max_delay_s=s.max_queue_delay_us / 1e6, enabled=s.batching, in_flight=self.in_flight,
                       one_client=self.in_flight.one_client, on_batch=on_batch)

    def _report_loaded(self, model: LoadedModel, replaced: LoadedModel | None, role: str) -> None:
        info = self.metrics.model_info
        if replaced is not None:
            self.metrics.drop_model_info(replaced.name, replaced.version, replaced.provider, role)
        info.labels(model.name, model.version, model.provider, role).set(1)
        self.metrics.loads.labels("success").inc()
        self.metrics.ready.set(1 if self.ready else 0)

    def _failed(self, slot: ModelSlot, exc: ServingError, version: str, source: str) -> None:
        reason = getattr(exc, "reason", "missing")
        serving = slot.champion.version if slot.champion else None
        slot.last_error = f"load of {version} failed: {exc}"
        self.metrics.loads.labels("failure").inc()
        self.metrics.load_failures.labels(reason).inc()
        log.error("model load failed", extra={"event": "model_load_failed", "model": slot.name, "version": version,
                                              "reason": reason, "error": str(exc), "still_serving": serving,
                                              "source": source})
