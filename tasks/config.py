"""Typed configuration: params.yaml + `section.key=value` overrides -> one validated `Params`.

Built once at the entry point (CLI or flow) and handed to the stages; stage code never reads YAML or
the environment itself.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.errors import InputError


class ConfigError(InputError, ValueError):
    """A params file or an override is invalid; the message is one line that says what to fix."""


class _Section(BaseModel):
    # Unknown keys are errors, and values are not silently coerced across types (e.g. "abc" -> lr).
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class ProjectPaths:
    """Every path of a project, absolute. Most are one run's stage outputs; a few belong to the project.

    Project-scoped paths (`PROJECT_SCOPED`) accumulate across runs and must be shared by every run of the
    project, wherever a run's outputs are written: the model registry (and its lock), the Optuna study
    storage (continued by every rerun) and the training checkpoints (a crashed run resumes from them).
    """

    raw: Path
    prepared: Path
    model: Path
    history: Path
    metrics: Path
    confusion: Path
    onnx: Path
    summary: Path
    confusion_png: Path
    variants: Path
    export_metrics: Path
    tuning: Path
    registry: Path
    checkpoints: Path    # epoch checkpoints of the train stage (resume); next to the model by default
    study_db: Path       # the default SQLite study storage (tune.storage / TUNELINE_TUNE_STORAGE win)

    PROJECT_SCOPED: ClassVar[frozenset[str]] = frozenset({"registry", "checkpoints", "study_db"})

    def run_outputs(self) -> dict[str, Path]:
        """The paths one run writes as its stage outputs (everything not project-scoped)."""
        return {k: v for k, v in vars(self).items() if k not in self.PROJECT_SCOPED}

    def project_scoped(self) -> dict[str, Path]:
        return {k: v for k, v in vars(self).items() if k in self.PROJECT_SCOPED}


MODEL_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"  # a registry folder and a URL path segment: no "/", no ".."
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")


class ProjectConfig(_Section):
    """What this project's models are called in the registry and the server (one champion per name)."""

    name: str | None = Field(None, pattern=f"^{MODEL_NAME_PATTERN}$", description="the registry/server model name; null = the data set's: mnist, the image folder's (or archive's) stem, the user loader's module")

    def resolve_name(self, data: Any) -> str:
        """The model name: project.name, else derived from the data source (the one place this rule lives)."""
        if self.name:
            return self.name
        source = str(data.source)
        folder = getattr(data, "image_folder", None) or getattr(data, "path", None)
        if source == "imagefolder" and folder:
            derived = Path(str(folder).rstrip("/\\")).name
            for suffix in ARCHIVE_SUFFIXES:
                if derived.lower().endswith(suffix):
                    derived = derived[: -len(suffix)]
                    break
        elif ":" in source:  # a user loader, mypkg.data:load -> mypkg.data
            derived = source.split(":", 1)[0]
        else:
            derived = source
        return safe_model_name(derived)


def safe_model_name(text: str) -> str:
    """`text` made a valid model name: characters outside [A-Za-z0-9._-] become "-" ("model" if nothing is left)."""
    import re

    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", text).lstrip("._-")[:64]
    return cleaned or "model"


class PathsConfig(_Section):
    """Where each stage writes, relative to the project folder (dvc.yaml templates its paths from these)."""

    raw: str = Field("data/raw", description="fetched source data (IDX files or class folders), a DVC output")
    prepared: str = Field("data/prepared", description="validated, split uint8 tensors + manifest.json")
    model: str = Field("models/model.pt", description="self-describing checkpoint (model args, config, lineage)")
    history: str = Field("metrics/train_history.csv", description="per-epoch training curve (DVC plot)")
    metrics: str = Field("metrics/eval.json", description="test metrics + gate verdicts (DVC metrics)")
    confusion: str = Field("metrics/confusion.csv", description="actual/predicted pairs (DVC confusion plot)")
    onnx: str = Field("models/model.onnx", description="one self-contained ONNX file with metadata")
    summary: str = Field("reports/run_summary.md", description="the run summary (markdown), also a Prefect artifact")
    confusion_png: str = Field("metrics/confusion.png", description="the confusion matrix as a picture (DVC image plot)")
    variants: str = Field("models/variants", description="kept FP16/INT8 variants + variants.json (each one's accuracy drop, kept or not)")
    export_metrics: str = Field("metrics/export.json", description="parity, latency, throughput, size, variants, serving gates (DVC metrics)")
    tuning: str = Field("tuning", description="tune stage: best_params.json, trials.csv, plots; study.db (the default RDB)")
    registry: str = Field("registry", description="model registry: versions/<id>/ + aliases/ (the server reads it)")

    def resolve(self, root: Path, project: Path | None = None) -> ProjectPaths:
        """Absolute paths (the one place they are joined): a run's outputs under `root`, the project-scoped
        ones under `project` (default `root`): a run in a workspace of its own shares them with the checkout."""
        root, project = Path(root), Path(project if project is not None else root)
        absolute = {name: (root / value).resolve() for name, value in self.model_dump().items()}
        absolute["registry"] = (project / self.registry).resolve()
        return ProjectPaths(**absolute, checkpoints=(project / self.model).resolve().parent / "checkpoints",
                            study_db=(project / self.tuning).resolve() / "study.db")


class DataConfig(_Section):
    """Where the data comes from and how prepare splits it (fetch and prepare stages)."""

    source: str = Field("mnist", description="mnist | imagefolder | module:function (your own loader, docs/data.md)")
    mirror: str | None = Field(None, description="folder or URL holding the four MNIST .gz files; env TUNELINE_DATA_MIRROR wins")
    image_folder: str | None = Field(None, description="for source=imagefolder: a folder (or .tar/.tar.gz/.zip of one) of class sub-folders of PNG/JPEG images, optionally under train/ val/ test/")
    channels: Literal["auto", 1, 3] = Field("auto", description="imagefolder: auto (3 if any image is colour, else 1) | 1 (gray) | 3 (RGB)")
    image_size: int | tuple[int, int] | None = Field(None, description="imagefolder: null = keep (all images must share one size) | side | [height, width]: resize to it")
    options: dict[str, Any] = Field(default_factory=dict, description="source=module:function: keyword arguments passed to your loader")
    val_fraction: float = Field(0.083333, gt=0.0, lt=1.0, description="share of the training set held out for validation (stratified; 5000 of 60000)")
    seed: int = Field(0, description="split seed")
    limit_train: int | None = Field(None, gt=0, description="keep only this many training images (stratified), for quick runs and tests")
    limit_test: int | None = Field(None, gt=0, description="keep only this many test images (stratified)")

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        if value in ("mnist", "imagefolder") or re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", value):
            return value
        raise ValueError(f"{value!r}: expected mnist, imagefolder or module:function (e.g. mypkg.data:load)")

    @field_validator("image_size")
    @classmethod
    def _image_size(cls, value):
        sides = (value,) * 2 if isinstance(value, int) else value
        if sides is not None and min(sides) < 1:
            raise ValueError(f"{value!r}: sides must be positive")
        return value

    @model_validator(mode="after")
    def _source_keys(self) -> "DataConfig":
        # Keys that only one source reads are refused elsewhere, so a setting never silently does nothing.
        if self.source != "imagefolder" and (self.channels != "auto" or self.image_size is not None):
            raise ValueError("data.channels / data.image_size apply to source=imagefolder only "
                             "(a loader returns its arrays as they are)")
        if ":" not in self.source and self.options:
            raise ValueError("data.options are passed to a module:function loader; this source takes none")
        return self

    @property
    def loader(self) -> str | None:
        """`module:function` when the source is the user's own loader, else None."""
        return self.source if ":" in self.source else None


class ModelConfig(_Section):
    """The network the train stage builds (docs/models.md)."""

    arch: str = Field("seed_cnn", description="seed_cnn | seed_mlp (the article's) | bn_cnn (small CNN with batch norm) | fast_cnn (airbench-style CIFAR net) | torchvision:NAME | module:function (your factory)")
    dropout: float = Field(0.5, ge=0.0, lt=1.0, description="dropout rate before the classifier (0 = off)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to the architecture's builder, e.g. {width: 16} for fast_cnn; tunable as model.kwargs.KEY")
    weights: str | None = Field(None, description="start from this local state dict (fine-tuning): matching tensors are kept, the rest initialised afresh")
    freeze_backbone: bool = Field(False, description="train only the classifier head (with model.weights: fine-tune the head)")

    @field_validator("arch")
    @classmethod
    def _arch(cls, value: str) -> str:
        from tasks.model.architectures import arch_kind  # the model package knows its names (and torchvision's)

        arch_kind(value)
        return value


class TrainConfig(_Section):
    """How the train stage (and every tuning trial) trains: optimizer, schedule, regularisation, device."""

    # Flat keys on purpose: every knob is one `-S train.key=value` away, as DVC spells overrides.
    epochs: int = Field(3, ge=1, description="passes over the training split", json_schema_extra={"packing": "per_model"})
    batch_size: int = Field(128, ge=1, description="images per optimizer step (the global batch under DDP)", json_schema_extra={"packing": "shared"})
    optimizer: Literal["sgd", "adam", "adamw", "rmsprop"] = Field("adam", description="sgd | adam | adamw | rmsprop", json_schema_extra={"packing": "per_model"})
    lr: float = Field(1e-3, gt=0.0, description="peak learning rate", json_schema_extra={"packing": "per_model"})
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="sgd and rmsprop: momentum factor", json_schema_extra={"packing": "per_model"})
    nesterov: bool = Field(False, description="sgd: Nesterov momentum", json_schema_extra={"packing": "per_model"})
    beta1: float = Field(0.9, ge=0.0, lt=1.0, description="adam / adamw: first-moment decay", json_schema_extra={"packing": "per_model"})
    beta2: float = Field(0.999, ge=0.0, lt=1.0, description="adam / adamw: second-moment decay", json_schema_extra={"packing": "per_model"})
    eps: float = Field(1e-8, gt=0.0, description="adam / adamw: added to the update's denominator for numerical stability", json_schema_extra={"packing": "per_model"})
    weight_decay: float = Field(0.0, ge=0.0, description="L2 (decoupled for adamw)", json_schema_extra={"packing": "per_model"})
    l1: float = Field(0.0, ge=0.0, description="L1 penalty on weights (not biases / norm layers)", json_schema_extra={"packing": "per_model"})
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="cross-entropy label smoothing (0 = off)", json_schema_extra={"packing": "per_model"})
    grad_clip: float = Field(0.0, ge=0.0, description="max global grad norm; 0 = off", json_schema_extra={"packing": "per_model"})
    scheduler: Literal["none", "step", "exponential", "cosine", "onecycle", "plateau"] = Field("step", description="none | step | exponential | cosine | onecycle | plateau", json_schema_extra={"packing": "per_model"})
    step_size: int = Field(1, ge=1, description="step: epochs between decays", json_schema_extra={"packing": "per_model"})
    gamma: float = Field(0.5, gt=0.0, le=1.0, description="step / exponential: lr multiplier per decay (per epoch)", json_schema_extra={"packing": "per_model"})
    warmup_epochs: float = Field(0.0, ge=0.0, description="linear warm-up from ~0 to lr; fractions of an epoch allowed", json_schema_extra={"packing": "per_model"})
    onecycle_pct_start: float = Field(0.25, gt=0.0, lt=1.0, description="onecycle: share of the steps spent warming up", json_schema_extra={"packing": "per_model"})
    plateau_patience: int = Field(1, ge=0, description="plateau: epochs without val improvement before decaying", json_schema_extra={"packing": "per_model"})
    plateau_factor: float = Field(0.5, gt=0.0, lt=1.0, description="plateau: lr multiplier per decay", json_schema_extra={"packing": "per_model"})
    augment_rotate_deg: float = Field(0.0, ge=0.0, le=180.0, description="random rotation in ±degrees, per image, on device", json_schema_extra={"packing": "shared"})
    augment_translate: float = Field(0.0, ge=0.0, le=0.5, description="random shift in ± fraction of the image side", json_schema_extra={"packing": "shared"})
    augment_scale: float = Field(0.0, ge=0.0, lt=1.0, description="random zoom in 1 ± scale", json_schema_extra={"packing": "shared"})
    augment_flip: bool = Field(False, description="random horizontal flip, per image, on device (off for digits and text: they are not mirror-symmetric)", json_schema_extra={"packing": "shared"})
    early_stopping_patience: int = Field(0, ge=0, description="epochs without improvement before stopping; 0 = off", json_schema_extra={"packing": "per_model"})
    early_stopping_metric: Literal["val_accuracy", "val_loss"] = Field("val_accuracy", description="val_accuracy | val_loss", json_schema_extra={"packing": "per_model"})
    early_stopping_min_delta: float = Field(0.0, ge=0.0, description="smallest change that counts as an improvement", json_schema_extra={"packing": "per_model"})
    divergence_factor: float = Field(100.0, gt=1.0, description="loss above this × ln(classes) (100× a uniform guess) = diverged", json_schema_extra={"packing": "per_model"})
    restore_best: bool = Field(True, description="keep the best epoch's weights, not the last", json_schema_extra={"packing": "per_model"})
    seed: int = Field(0, description="weight init, data order and augmentation seed", json_schema_extra={"packing": "per_model"})
    deterministic: bool = Field(False, description="deterministic kernels: bit-identical reruns, a little slower", json_schema_extra={"packing": "shared"})
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto | cpu | cuda", json_schema_extra={"packing": "shared"})
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 on CPU", json_schema_extra={"packing": "shared"})
    channels_last: bool = Field(True, description="NHWC memory layout for convolutions (faster on GPUs)", json_schema_extra={"packing": "shared"})
    compile: bool = Field(False, description="torch.compile the model (pays a one-off compile time)", json_schema_extra={"packing": "shared"})
    resume: bool = Field(True, description="continue from the last epoch checkpoint of the same config", json_schema_extra={"packing": "shared"})
    eval_batch_size: int = Field(1000, ge=1, description="images per forward pass when validating and evaluating", json_schema_extra={"packing": "shared"})


class SpaceDim(_Section):
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
        "train.lr": SpaceDim(type="float", low=3e-4, high=3e-3, log=True),
        "train.optimizer": SpaceDim(type="categorical", choices=["adam", "adamw"]),
        "train.batch_size": SpaceDim(type="categorical", choices=[64, 128, 256]),
        "model.dropout": SpaceDim(type="float", low=0.2, high=0.6),
    }


class TuneConfig(_Section):
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


class GateConfig(_Section):
    """Bars a model must clear: quality (evaluate), serving cost (export), the champion (promote)."""

    min_accuracy: float = Field(0.99, ge=0.0, le=1.0, description="test accuracy a model must reach to be exported")
    min_class_recall: float = Field(0.97, ge=0.0, le=1.0, description="every class's recall (the weakest class) must reach this")
    max_ece: float = Field(0.03, ge=0.0, le=1.0, description="expected calibration error (15 bins) at most this")
    max_latency_p99_ms: float = Field(50.0, gt=0.0, description="batch 1, ONNX Runtime, on serve.device with serve.threads")
    max_size_mb: float = Field(20.0, gt=0.0, description="the FP32 model.onnx, 1 MB = 10^6 bytes")
    max_regression: float = Field(0.005, ge=0.0, le=1.0, description="accuracy the challenger may lose vs the champion")
    min_improvement: float = Field(0.001, ge=0.0, le=1.0, description="accuracy it must gain to be promoted")


class ExportConfig(_Section):
    """ONNX export, its parity check against PyTorch, and the FP16/INT8 variants."""

    opset: int = Field(18, ge=17, description="ONNX opset version")
    parity_atol: float = Field(1e-4, gt=0.0, description="max |ONNX - PyTorch| logit difference accepted")
    fp16: bool = Field(False, description="also write model.fp16.onnx (gated on its accuracy drop)")
    int8: bool = Field(True, description="also write model.int8.onnx (static, calibrated on train images)")
    max_quant_drop: float = Field(0.005, ge=0.0, le=1.0, description="test accuracy a variant may lose vs the FP32 ONNX")
    calibration_images: int = Field(512, ge=1, description="training images that calibrate INT8 activation ranges")
    latency_runs: int = Field(200, ge=10, description="timed batch-1 runs behind p50/p99 (on serve.device)")


class ServeConfig(_Section):
    """The inference server (serving/); env TUNELINE_SERVE_<KEY> and `tuneline serve` flags override these."""

    host: str = Field("127.0.0.1", description="loopback unless told otherwise")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 = any free port)")
    grpc_port: int | None = Field(None, ge=0, le=65535, description="also serve the Open Inference Protocol over gRPC on this port (8001 is Triton's and KServe's); 0 = any free port, null = REST only")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto | cpu | cuda (cuda: refuse to start unless CUDA is really active)")
    provider: Literal["auto", "cuda", "tensorrt"] = Field("auto", description="GPU execution provider under serve.device auto/cuda: auto = cuda (CUDA kernels) | tensorrt (TensorRT, CUDA then CPU behind it for what it cannot take); with serve.device=cuda one that does not load refuses the start; ignored on CPU")
    precision: Literal["auto", "fp32", "fp16"] = Field("auto", description="auto: model.fp16.onnx only on a GPU provider when the export measured it there at least as fast and within export.max_quant_drop, else serve.model_file | fp32: serve.model_file | fp16: model.fp16.onnx")
    trt_cache_dir: str = Field(".tuneline/tensorrt", description="TensorRT engine cache (serve.provider=tensorrt), one folder per model version and precision; relative to the project")
    model: str | None = Field(None, pattern=f"^{MODEL_NAME_PATTERN}$", description="serve only this model name (default: the champion of every model in the registry)")
    model_file: str = Field("model.onnx", description="which file of a registry version to serve")
    threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads; 0 = one per core")
    workers: int = Field(1, ge=1, le=64, description="server processes sharing serve.port (SO_REUSEPORT), each with its own event loop, models, batcher and serve.threads ONNX Runtime threads; 1 = one process")
    batching: bool = Field(True, description="merge concurrent requests into one session run")
    max_batch_size: int = Field(64, ge=1, description="rows per session run")
    max_queue_delay_us: int = Field(2000, ge=0, description="longest a request waits for others to join its batch")
    reload_poll_s: float = Field(2.0, ge=0.0, description="how often aliases/champion.json is checked; 0 = never")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="larger requests get 413")
    max_concurrency: int = Field(256, ge=1, description="inference requests in flight before 429")
    shutdown_timeout_s: float = Field(10.0, gt=0.0, description="drain time for in-flight requests on SIGTERM")
    access_log: bool = Field(True, description="one JSON log line per request")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="debug | info | warning | error")
    notify_url: str | None = Field(None, description="pipeline: after a promotion, POST this server's load endpoint")

    @model_validator(mode="after")
    def _precision_or_file(self) -> "ServeConfig":
        # Two settings must not disagree on which file is served: a variant named in model_file is the choice.
        if self.precision != "auto" and self.model_file != "model.onnx":
            raise ValueError(f"serve.precision={self.precision} and serve.model_file={self.model_file} both choose "
                             "the file: leave serve.precision at auto, or serve.model_file at model.onnx")
        return self


class Params(_Section):
    project: ProjectConfig = ProjectConfig()
    paths: PathsConfig = PathsConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    tune: TuneConfig = TuneConfig()
    gate: GateConfig = GateConfig()
    export: ExportConfig = ExportConfig()
    serve: ServeConfig = ServeConfig()

    def params_hash(self) -> str:
        """Short sha256 of everything that shapes the model (its name, paths and serving settings change nothing in it)."""
        payload = self.model_dump(mode="json", exclude={"project", "paths", "serve"})
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


KWARGS_PREFIX = "model.kwargs."  # model.kwargs.KEY sets one key of the free-form model.kwargs (tunable in tune.space)


def valid_keys(model: type[BaseModel] = Params, prefix: str = "") -> list[str]:
    """Every dotted key a params file or an override may set, e.g. ['data.mirror', …, 'train.lr']."""
    keys: list[str] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(valid_keys(annotation, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=0.01` -> ('train.lr', 0.01); the value is read as YAML, as DVC's `-S` does."""
    key, sep, raw_value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. train.lr=0.01")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc.problem})") from None
    return key.strip(), value


def parse_overrides(texts: list[str]) -> dict[str, Any]:
    """Every `-S key=value` of a command line, in order (a later one wins), as {key: value}."""
    return dict(parse_override(text) for text in texts)


def add_override_option(parser, example: str = "train.lr=0.01") -> None:
    """The `-S/--set KEY=VALUE` option, the same on every command (tuneline run/stage/tune/models/serve)."""
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a params.yaml key, e.g. -S {example} (repeatable; the value is YAML)")


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of `raw` with each dotted key set; an unknown key is a ConfigError naming the valid ones."""
    merged = json.loads(json.dumps(raw))  # deep copy of plain YAML data
    known = valid_keys()
    for key, value in overrides.items():
        if key.startswith(KWARGS_PREFIX) and len(key) > len(KWARGS_PREFIX):  # model.kwargs.width: one builder kwarg
            node = merged.setdefault("model", {})
            kwargs = node.get("kwargs") if isinstance(node, dict) else None
            if not isinstance(node, dict) or not isinstance(kwargs, (dict, type(None))):
                raise ConfigError(f"params: model.kwargs must be a mapping to set {key!r}")
            node["kwargs"] = {**(kwargs or {}), key[len(KWARGS_PREFIX):]: value}
            continue
        if key not in known:
            section = key.split(".")[0]
            same_section = [k for k in known if k.startswith(section + ".")]
            choices = same_section or sorted({k.split(".")[0] for k in known})
            raise ConfigError(f"unknown key {key!r}: valid keys are {', '.join(choices)}")
        section, name = key.split(".", 1)
        node = merged.setdefault(section, {})
        if not isinstance(node, dict):
            raise ConfigError(f"params: section {section!r} must be a mapping, got {type(node).__name__}")
        node[name] = value
    return merged


def _first_error(exc: ValidationError, source: str) -> ConfigError:
    err = exc.errors()[0]
    key = ".".join(str(part) for part in err["loc"])
    if err["type"] == "extra_forbidden":
        section = ".".join(str(part) for part in err["loc"][:-1])
        choices = [k for k in valid_keys() if k.startswith(section + ".")] if section else valid_keys()
        return ConfigError(f"{source}: unknown key {key!r}: valid keys are {', '.join(choices)}")
    return ConfigError(f"{source}: {key}: {err['msg']} (got {err.get('input')!r})")


def build_params(raw: dict[str, Any] | None, overrides: dict[str, Any] | None = None, source: str = "params") -> Params:
    """Validate plain params data plus overrides into a frozen `Params`."""
    merged = apply_overrides(raw or {}, overrides or {})
    try:
        return Params.model_validate(merged)
    except ValidationError as exc:
        key = ".".join(str(part) for part in exc.errors()[0]["loc"])
        raise _first_error(exc, "override" if key in (overrides or {}) else source) from None


def read_params_file(path: Path) -> dict[str, Any]:
    """The params file as plain data; a missing or malformed file is a ConfigError."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found; run from the project folder or pass --params") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def load_params(path: Path, overrides: dict[str, Any] | None = None) -> Params:
    """params.yaml + overrides -> Params, with errors naming the file or the override."""
    return build_params(read_params_file(path), overrides, source=str(path))
