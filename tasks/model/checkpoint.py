"""Self-describing checkpoints: weights + model args + the config and lineage that produced them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tuneline.core.atomic import staged_file
from tuneline.tasks.model.architectures import Classifier, ModelArgs, build_model

FORMAT = "tuneline.checkpoint/1"


def save_checkpoint(path: Path, model: Classifier, **extra: Any) -> None:
    """Write weights, model args and `extra` (config, lineage, history, …) atomically."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "model_args": model.args.to_dict(), "state_dict": state, **extra}
    with staged_file(Path(path)) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> tuple[Classifier, dict[str, Any]]:
    """Rebuild the model from the checkpoint alone; returns (model in eval mode, the whole checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint: run `tuneline stage train` (or `dvc repro`) first")
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    if checkpoint.get("format") != FORMAT:
        raise ValueError(f"{path}: not a Tuneline checkpoint (format {checkpoint.get('format')!r}, expected {FORMAT!r})")
    model = build_model(ModelArgs.from_dict(checkpoint["model_args"]))
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval(), checkpoint
