"""Every environment variable Tuneline reads, in one table, read once at the entry points.

Stage code never reads the environment: `tuneline` (flows/cli.py), the Prefect flow and the server's
settings (serving/settings.py, `TUNELINE_SERVE_<KEY>`) read it here and pass values down as arguments.
Variables of the tools Tuneline drives (PREFECT_*, DVC_*, torchrun's RANK/WORLD_SIZE) are theirs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class EnvVar:
    name: str
    meaning: str


VARIABLES: tuple[EnvVar, ...] = (
    EnvVar("TUNELINE_DATA_MIRROR", "folder or URL with MNIST's four .gz files; wins over data.mirror"),
    EnvVar("TUNELINE_TUNE_STORAGE", "the Optuna study's RDB URL (e.g. postgresql://…); wins over tune.storage and keeps "
                                    "a password out of params.yaml and dvc.lock"),
    EnvVar("TUNELINE_NPROC_PER_NODE", "train stage: N DistributedDataParallel processes via torchrun, or `auto` (one "
                                      "per visible GPU); default 1"),
    EnvVar("TUNELINE_SERVE_TOKEN", "bearer token the inference server requires; the flow sends it when it asks the "
                                   "server to load a new champion"),
    EnvVar("TUNELINE_SERVE_ADMIN_TOKEN", "bearer token for the server's repository load/unload routes (without it they "
                                         "answer loopback clients only); the flow's post-promotion notification sends it"),
    EnvVar("TUNELINE_SERVE_<KEY>", "any serve.<key> setting of the inference server (e.g. TUNELINE_SERVE_PORT)"),
)


@dataclass(frozen=True)
class Environment:
    """The values of the variables above that the pipeline uses (None where unset or empty)."""

    data_mirror: str | None = None
    tune_storage: str | None = None
    nproc_per_node: str | None = None
    serve_token: str | None = None
    serve_admin_token: str | None = None

    @classmethod
    def read(cls, environ: Mapping[str, str] | None = None) -> "Environment":
        environ = os.environ if environ is None else environ
        value = lambda name: environ.get(name) or None  # noqa: E731 (an empty variable counts as unset)
        return cls(data_mirror=value("TUNELINE_DATA_MIRROR"), tune_storage=value("TUNELINE_TUNE_STORAGE"),
                   nproc_per_node=value("TUNELINE_NPROC_PER_NODE"), serve_token=value("TUNELINE_SERVE_TOKEN"),
                   serve_admin_token=value("TUNELINE_SERVE_ADMIN_TOKEN"))
