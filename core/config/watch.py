"""watch: the live loop around the server: which server promote --live and the drift watch ask, and when the drift
watch may start a retraining run (flows/drift_watch.py). No stage imports this module: editing it reruns nothing."""

from __future__ import annotations

from pydantic import Field

from tuneline.core.config.base import Section


class WatchConfig(Section):
    """The live loop: the server it watches, and the drift watch's retraining trigger and its cool-down."""

    server: str | None = Field(None, description="the inference server `tuneline models promote --live` and the drift watch read /v2/live/<model> from; null: http://serve.host:serve.port")
    deployment: str = Field("tuneline/adhoc", description="drift watch: the deployment (flow/deployment) it starts to retrain on the captured data")
    cooldown_s: float = Field(21600.0, ge=0.0, description="drift watch: after starting a retraining run, start none for this model again for this long, s (6 h); a run that would loop on its own drift waits it out")
    min_labelled: int = Field(100, ge=0, description="drift watch: captured requests with a feedback label (in data.capture_dir) the model needs before a retraining run is worth starting")
