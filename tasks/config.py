"""Typed configuration: params.yaml + `section.key=value` overrides -> one validated `Params`.

Built once at the entry point (CLI or flow) and handed to the stages; stage code never reads YAML or
the environment itself.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    """A params file or an override is invalid; the message is one line that says what to fix."""


class _Section(BaseModel):
    # Unknown keys are errors, and values are not silently coerced across types (e.g. "abc" -> lr).
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsConfig(_Section):
    raw: str = "data/raw"
    prepared: str = "data/prepared"
    model: str = "models/model.pt"
    history: str = "metrics/train_history.csv"
    metrics: str = "metrics/eval.json"
    confusion: str = "metrics/confusion.csv"
    onnx: str = "models/model.onnx"
    summary: str = "reports/run_summary.md"


class DataConfig(_Section):
    source: Literal["mnist", "imagefolder"] = "mnist"
    mirror: str | None = None
    image_folder: str | None = None
    val_fraction: float = Field(0.083333, gt=0.0, lt=1.0)
    seed: int = 0
    limit_train: int | None = Field(None, gt=0)
    limit_test: int | None = Field(None, gt=0)


class ModelConfig(_Section):
    arch: Literal["seed_cnn", "seed_mlp"] = "seed_cnn"
    dropout: float = Field(0.5, ge=0.0, lt=1.0)


class TrainConfig(_Section):
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    scheduler: Literal["step", "exponential", "none"] = "step"
    step_size: int = Field(1, ge=1)
    gamma: float = Field(0.5, gt=0.0, le=1.0)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_batch_size: int = Field(1000, ge=1)


class GateConfig(_Section):
    min_accuracy: float = Field(0.99, ge=0.0, le=1.0)


class ExportConfig(_Section):
    opset: int = Field(18, ge=17)
    parity_atol: float = Field(1e-4, gt=0.0)


class Params(_Section):
    paths: PathsConfig = PathsConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    gate: GateConfig = GateConfig()
    export: ExportConfig = ExportConfig()

    def params_hash(self) -> str:
        """Short sha256 of everything that shapes the model (paths excluded: moving files changes nothing)."""
        payload = self.model_dump(mode="json", exclude={"paths"})
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


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


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of `raw` with each dotted key set; an unknown key is a ConfigError naming the valid ones."""
    merged = json.loads(json.dumps(raw))  # deep copy of plain YAML data
    known = valid_keys()
    for key, value in overrides.items():
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
