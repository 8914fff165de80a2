"""tune: the Optuna study over the training knobs, and its search space."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tuneline.core.config.base import Section


class SpaceDim(Section):
    """One dimension of the search space: a float/int range (optionally log-uniform) or a list of choices."""

    type: Literal["float", "int", "categorical"] = Field(description="float | int | categorical")
    low: float | None = Field(None, description="float/int: lower bound")
    high: float | None = Field(None, description="float/int: upper bound")
    log: bool = Field(False, description="float/int: sample log-uniformly")
    step: float | None = Field(None, description="float/int: grid step")
    choices: list[Any] | None = Field(None, description="categorical: the values to choose from")

    @model_validator(mode="after")
    def _check(self) -> "SpaceDim":
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical dimension needs a non-empty `choices` list")
            if self.low is not None or self.high is not None:
                raise ValueError("a categorical dimension takes `choices`, not low/high")
            return self
        if self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"a {self.type} dimension needs low < high (got low={self.low}, high={self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-uniform dimension needs low > 0 (got {self.low})")
        if self.log and self.step:
            raise ValueError("`log` and `step` cannot be combined")
        if self.choices is not None:
            raise ValueError(f"a {self.type} dimension takes low/high, not `choices`")
        return self


def _default_space() -> dict[str, SpaceDim]:
    return {
        # Around the default recipe (AdamW one-cycle, batch 256): batch size stays out, it sets the speed.
        "train.lr": SpaceDim(type="float", low=2e-3, high=8e-3, log=True),
        "train.weight_decay": SpaceDim(type="float", low=1e-4, high=2e-3, log=True),
        "model.dropout": SpaceDim(type="float", low=0.02, high=0.3),
    }


class TuneConfig(Section):
    """The Optuna study over the training knobs (the tune stage); train then uses its best params.

    The default space leaves out label smoothing: it lowers confidence on purpose, which gate.max_ece rejects.
    """

    enabled: bool = Field(True, description="false: train with params.yaml as given")
    n_trials: int = Field(6, ge=1, description="finished trials (complete or pruned) the study holds; failed ones are rerun")
    max_failures: int | None = Field(None, ge=1, description="failed trials (raised, diverged, out of memory, worker lost) one tune call tolerates before it stops with an error; null: n_trials")
    patience: int | None = Field(None, ge=1, description="stop the study when its best has not improved for this many finished trials (null: never)")
    timeout_s: float | None = Field(None, gt=0, description="wall-clock budget per `tune` call, on top of n_trials")
    epochs: int = Field(2, ge=1, description="epochs per trial (the pruner's max resource)")
    limit_train: int | None = Field(6000, gt=0, description="trial data: a stratified slice of the train split (null: all)")
    limit_val: int | None = Field(2000, gt=0, description="trial data: a stratified slice of the val split (null: all)")
    sampler_seed: int = Field(0, description="TPE seed")
    pruner: Literal["asha", "hyperband", "median", "none"] = Field("asha", description="asha (successive halving) | hyperband | median | none")
    # "auto" derives the rungs from the epoch budget (tasks/tune/study.py, rung_epochs): a fixed min_resource of 1
    # with tune.epochs=30 would judge every trial after one noisy epoch and leave most of the budget to few trials.
    min_resource: int | Literal["auto"] = Field("auto", description="epochs a trial runs before it can be pruned; auto: tune.epochs // reduction_factor**2 (at least 1), so 3 rungs fit (2 when epochs < reduction_factor**2)")
    reduction_factor: int = Field(3, ge=2, description="ASHA/Hyperband: keep 1 in this many trials per rung")
    storage: str | None = Field(None, description="RDB URL; default sqlite:///<paths.tuning>/study.db")
    study_name: str | None = Field(None, description="default: tuneline-<source>-<limit_train>-<arch>-<hash of everything a trial sees> (docs/tuning.md)")
    space: dict[str, SpaceDim] = Field(default_factory=_default_space, description="key: {type: float|int (low, high, log, step) | categorical (choices)}")
    # Trials trained together in one process and one set of kernels (tasks/train/packed.py): "auto" = up to 16 on
    # CUDA, off on CPU; K >= 2 = packs of up to K (capped by device memory); null or 1 = one trial at a time.
    packing: int | Literal["auto"] | None = Field("auto", description="trials trained together in one process: auto (16 on CUDA, off on CPU) | K | null")
    # More than one objective makes the study multi-objective (tasks/tune/pareto.py): a Pareto front of accuracy
    # against serving cost, unpruned and unpacked, and tune.pick chooses the trial train uses.
    objectives: list[Literal["accuracy", "latency_p99_ms", "size_mb"]] = Field(default_factory=lambda: ["accuracy"], description="what trials are judged on: accuracy (val, maximised) first, then optionally latency_p99_ms (the trial's ONNX model, batch 1, on serve.device) and/or size_mb (its FP32 ONNX file), minimised")
    latency_runs: int = Field(50, ge=10, description="objective latency_p99_ms: timed batch-1 runs per trial, after its training")
    latency_threads: int | None = Field(1, ge=1, description="objective latency_p99_ms: ONNX Runtime intra-op threads, fixed so trials compare alike; null: serve.threads, as the export gate")
    pick: Literal["most_accurate_within_gates", "most_accurate"] = Field("most_accurate_within_gates", description="multi-objective: which Pareto trial train uses: the most accurate within gate.max_latency_p99_ms / gate.max_size_mb (an error if none is), or the most accurate")

    @field_validator("min_resource")
    @classmethod
    def _min_resource(cls, value: Any) -> Any:
        if value != "auto" and value < 1:
            raise ValueError("tune.min_resource takes an integer >= 1 (epochs) or 'auto' (from tune.epochs)")
        return value

    @field_validator("packing", mode="before")
    @classmethod
    def _packing(cls, value: Any) -> Any:
        integral = isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()
        if not (value is None or value == "auto" or (integral and value >= 1)):
            raise ValueError("tune.packing takes an integer K >= 2 (trials per pack), 'auto' (packs on CUDA, off on "
                             "CPU), or null / 1 (off)")
        return int(value) if integral else value

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, value: list[str]) -> list[str]:
        if not value or value[0] != "accuracy" or len(set(value)) != len(value):
            raise ValueError("tune.objectives starts with accuracy, then latency_p99_ms and/or size_mb, each once, "
                             "e.g. [accuracy, size_mb]")
        return value

