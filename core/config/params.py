"""The whole params file: every section in one frozen `Params`, built once at an entry point.

params.yaml + `section.key=value` overrides -> one validated `Params`, handed to the stages; stage code never
reads YAML or the environment itself. Only entry points import this module (the CLI, the flow, the
server's settings): stage code names `Params` under TYPE_CHECKING and derives new params with
`overrides.with_overrides`, so each stage's code deps hold the sections it reads, not all of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tuneline.core.config.base import ConfigError, Section, params_hash
from tuneline.core.config.data import DataConfig
from tuneline.core.config.export import ExportConfig
from tuneline.core.config.gate import GateConfig
from tuneline.core.config.model import ModelConfig
from tuneline.core.config.overrides import validate_params
from tuneline.core.config.paths import PathsConfig
from tuneline.core.config.project import ProjectConfig
from tuneline.core.config.serve import ServeConfig
from tuneline.core.config.train import TrainConfig
from tuneline.core.config.tune import TuneConfig
from tuneline.core.config.watch import WatchConfig


class Params(Section):
    project: ProjectConfig = ProjectConfig()
    paths: PathsConfig = PathsConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    tune: TuneConfig = TuneConfig()
    gate: GateConfig = GateConfig()
    export: ExportConfig = ExportConfig()
    serve: ServeConfig = ServeConfig()
    watch: WatchConfig = WatchConfig()

    def params_hash(self) -> str:
        """Short sha256 of everything that shapes the model (core/config/base.py: params_hash)."""
        return params_hash(self)


def build_params(raw: dict[str, Any] | None, overrides: dict[str, Any] | None = None, source: str = "params") -> Params:
    """Validate plain params data plus overrides into a frozen `Params`."""
    return validate_params(Params, raw, overrides, source)


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
