"""The search space: which keys may be tuned, checking every dimension up front, and a trial's sampled params."""

from __future__ import annotations

from typing import Any, TYPE_CHECKING

from tuneline.core.config.base import ConfigError
from tuneline.core.config.tune import SpaceDim, TuneConfig
from tuneline.core.config.overrides import with_overrides

if TYPE_CHECKING:  # the root schema: not a code dep of this stage (core/config/params.py)
    from tuneline.core.config.params import Params

TUNABLE_SECTIONS = ("model", "train")


def validate_space(base: Params, space: dict[str, SpaceDim]) -> None:
    """Every dimension names a tunable key and every value it can take is valid there — before any trial."""
    for key, dim in space.items():
        if key.split(".")[0] not in TUNABLE_SECTIONS:
            raise ConfigError(f"tune.space: {key!r} is not tunable: search over model.* or train.* keys")
        probes = dim.choices if dim.type == "categorical" else [dim.low, dim.high]
        for value in probes:
            try:
                with_overrides(base, {key: value}, source="tune.space")
            except ConfigError as exc:
                raise ConfigError(f"tune.space.{key}: value {value!r} is not valid: {exc}") from None


def suggest(trial, key: str, dim: SpaceDim) -> Any:
    """The trial's value for one dimension, asked of Optuna's sampler."""
    if dim.type == "float":
        return trial.suggest_float(key, dim.low, dim.high, log=dim.log, step=dim.step)
    if dim.type == "int":
        return trial.suggest_int(key, int(dim.low), int(dim.high), log=dim.log, step=int(dim.step or 1))
    return trial.suggest_categorical(key, dim.choices)


def trial_params(base: Params, cfg: TuneConfig, trial) -> Params:
    """`base` with the trial's sampled values and tune.epochs on top."""
    sampled = {key: suggest(trial, key, dim) for key, dim in cfg.space.items()}
    return with_overrides(base, {**sampled, "train.epochs": cfg.epochs}, source="trial")
