"""A trial's serving cost: its trained model exported to ONNX and measured as the export gate measures it.

The same pieces as the export stage, reused rather than repeated: tasks/ship/export.py's exporter (FP32, one
self-contained file) and tasks/ship/latency.py's measure_serving, whose sessions come from the server's own factory
(core/onnx_session.py open_session) on serve.device and serve.provider. The measurement runs in the trial's
own process after its training has finished, so the trial's own training never competes with it (other workers of
`--workers N` on the same machine may: docs/tuning.md), with a fixed number of intra-op threads
(tune.latency_threads).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import copy
import tempfile
from pathlib import Path

import torch

from tuneline.tasks.ship.export import export_onnx_file
from tuneline.tasks.ship.latency import measure_serving
from tuneline.tasks.model.architectures import as_model_input

if TYPE_CHECKING:  # the root schema: not a code dep of this stage (core/config/params.py)
    from tuneline.core.config.params import Params

COST_OBJECTIVES = ("latency_p99_ms", "size_mb")


def measure_trial_cost(model: torch.nn.Module, images: torch.Tensor, params: Params, threads: int) -> dict[str, float]:
    """{objective: value} for the cost objectives in tune.objectives, of `model` exported to a temporary ONNX file.

    `images` are real uint8 images [N, C, H, W] (the trial's validation split): the export's example batch and the
    latency runs' inputs.
    """
    wanted = [name for name in params.tune.objectives if name in COST_OBJECTIVES]
    if not wanted:
        return {}
    # A CPU float copy in eval mode: the trial's module may sit on a GPU, in channels_last, in train mode.
    exported = copy.deepcopy(model).to("cpu", torch.float32, memory_format=torch.contiguous_format).eval()
    images = images.cpu()
    with tempfile.TemporaryDirectory(prefix="tune-cost-") as tmp:
        path = Path(tmp) / "trial.onnx"
        # Two rows: an example batch of one would let the exporter fix the batch axis at 1 (as run_export does).
        export_onnx_file(exported, as_model_input(images[:1]).repeat(2, *[1] * (images.dim() - 1)), path,
                         params.export.opset)
        cost = {"size_mb": path.stat().st_size / 1e6}
        if "latency_p99_ms" in wanted:
            serving = measure_serving(path, images, params.serve.device, params.tune.latency_runs, threads,
                                      params.serve.provider)
            cost["latency_p99_ms"] = serving["latency_p99_ms"]
    return {name: round(cost[name], 6) for name in wanted}
