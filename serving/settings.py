"""Server settings: params.yaml `serve:` < env TUNELINE_SERVE_<KEY> < command line, validated once.

The bearer token only comes from the environment (TUNELINE_SERVE_TOKEN): a token on the command line
would show in `ps` and in shell history.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import SecretStr

from tuneline.core.config.base import ConfigError
from tuneline.core.config.params import Params
from tuneline.core.config.serve import ServeConfig

ENV_PREFIX = "TUNELINE_SERVE_"
TOKEN_ENV = ENV_PREFIX + "TOKEN"
ADMIN_TOKEN_ENV = ENV_PREFIX + "ADMIN_TOKEN"  # opens repository load/unload (serving/admin.py)
REGISTRY_ENV = ENV_PREFIX + "REGISTRY"


class ServeSettings(ServeConfig):
    registry: Path  # the registry folder; every model name in it is served unless serve.model names one
    token: SecretStr | None = None
    admin_token: SecretStr | None = None  # env only, as the token; None: load/unload are loopback-only


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """TUNELINE_SERVE_PORT=9000 -> {"serve.port": 9000} (values read as YAML, like -S); unknown names are errors."""
    overrides: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in (TOKEN_ENV, ADMIN_TOKEN_ENV, REGISTRY_ENV):
            continue
        key = name[len(ENV_PREFIX):].lower()
        if key not in ServeConfig.model_fields:
            valid = ", ".join(ENV_PREFIX + k.upper() for k in [*ServeConfig.model_fields, "token", "admin_token", "registry"])
            raise ConfigError(f"environment: unknown variable {name}: valid ones are {valid}")
        try:
            overrides[f"serve.{key}"] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"environment: {name}={raw!r} is not a valid value") from None
    return overrides


def build_settings(params: Params, root: Path, environ: Mapping[str, str],
                   registry: Path | None = None) -> ServeSettings:
    """Settings from validated params (whose serve section already holds env + CLI overrides) and the env."""
    if registry is None:
        registry = Path(environ.get(REGISTRY_ENV) or params.paths.registry)
    token = environ.get(TOKEN_ENV) or None
    admin_token = environ.get(ADMIN_TOKEN_ENV) or None
    serve = {**params.serve.model_dump(), "trt_cache_dir": str((Path(root) / params.serve.trt_cache_dir).resolve())}
    return ServeSettings(**serve, registry=(Path(root) / registry).resolve(),
                         token=SecretStr(token) if token else None,
                         admin_token=SecretStr(admin_token) if admin_token else None)
