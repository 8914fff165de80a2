"""Server settings: params.yaml `serve:` < env TUNELINE_SERVE_<KEY> < command line, validated once.

The bearer token only comes from the environment (TUNELINE_SERVE_TOKEN): a token on the command line
would show in `ps` and in shell history. serve.workers `auto` and serve.threads 0 under several workers are
resolved here, once, to the numbers the server runs with (serving/cpu_budget.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, SecretStr

from tuneline.core.config.base import ConfigError
from tuneline.core.config.params import Params
from tuneline.core.config.serve import MAX_WORKERS, ServeConfig
from tuneline.serving.cpu_budget import plan_workers, usable_cpus

ENV_PREFIX = "TUNELINE_SERVE_"
TOKEN_ENV = ENV_PREFIX + "TOKEN"
ADMIN_TOKEN_ENV = ENV_PREFIX + "ADMIN_TOKEN"  # opens repository load/unload (serving/admin.py)
REGISTRY_ENV = ENV_PREFIX + "REGISTRY"
# Set by the parent of serve.workers > 1 for its workers only: the server's private folder (serving/workers.py).
# Not TUNELINE_SERVE_*: it is no setting a user gives.
WORKERS_DIR_ENV = "TUNELINE_WORKERS_DIR"


class ServeSettings(ServeConfig):
    registry: Path  # the registry folder; every model name in it is served unless serve.model names one
    token: SecretStr | None = None
    admin_token: SecretStr | None = None  # env only, as the token; None: load/unload are loopback-only
    workers: int = Field(1, ge=1, le=MAX_WORKERS)  # serve.workers, `auto` resolved to a count
    workers_dir: Path | None = None  # a worker's: the folder its parent shares with the workers (WORKERS_DIR_ENV)


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
    serve = {**params.serve.model_dump(), "trt_cache_dir": str((Path(root) / params.serve.trt_cache_dir).resolve()),
             "capture_dir": str((Path(root) / params.serve.capture_dir).resolve())}
    serve["workers"], serve["threads"] = plan_workers(params.serve.workers, params.serve.threads, usable_cpus(),
                                                      gpu=params.serve.workers == "auto" and _on_a_gpu(params))
    workers_dir = environ.get(WORKERS_DIR_ENV) or None
    return ServeSettings(**serve, registry=(Path(root) / registry).resolve(),
                         token=SecretStr(token) if token else None,
                         admin_token=SecretStr(admin_token) if admin_token else None,
                         workers_dir=Path(workers_dir) if workers_dir else None)


def _on_a_gpu(params: Params) -> bool:
    """Whether the models will run on a GPU provider: serve.device cuda, or auto where core.onnx_session's probe
    (done once per process) finds one."""
    from tuneline.core.onnx_session import CPU, resolve_providers

    if params.serve.device != "auto":
        return params.serve.device == "cuda"  # asked for; one that cannot load is refused at start, in one process
    return resolve_providers("auto", params.serve.provider)[0] != CPU
