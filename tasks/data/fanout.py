"""Prepare's shard tasks fanned out by Prefect (`data.prepare_tasks: prefect`): task mapping on a task runner.

Each shard task (tasks/data/prepare.py: ShardTask) reads its rows of the raw files and writes its own files, so
Prefect can run them on any task runner: its thread pool by default, or a Dask or Ray cluster through
`data.prepare_task_runner: prefect_dask:DaskTaskRunner` (or `prefect_ray:RayTaskRunner`), installed separately.
The runner must share the staging folder's file system with this process (a local cluster, or workers that mount
the project). Results (a shard's checksums and pixel moments) come back to the flow; no pixels do.
"""

from __future__ import annotations

import importlib

from tuneline.tasks.data.idx import DataError
from tuneline.tasks.data.prepare import ShardDone, ShardTask, write_shard_task


def task_runner(spec: str | None):
    """A Prefect task runner from `module:Class` (None: Prefect's ThreadPoolTaskRunner)."""
    if spec is None:
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner()
    module_name, _, class_name = spec.partition(":")
    try:
        runner = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise DataError(f"data.prepare_task_runner: cannot load {spec!r} ({exc}): install it (e.g. "
                        "`pip install prefect-dask`) or set data.prepare_task_runner: null") from None
    return runner()


def map_shard_tasks(tasks: list[ShardTask], runner_spec: str | None) -> list[ShardDone]:
    """Run every shard task as a mapped Prefect task inside a `prepare-shards` flow; their results in order."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    # No cache: a shard task's output lives in this run's staging folder, so a cached result would point at
    # files that are gone. No retries: a failing shard fails prepare, which leaves nothing half-written.
    write = task(write_shard_task, name="write-shard", cache_policy=NO_CACHE,
                 task_run_name="write-shard-{task.split}-{task.index}")

    @flow(name="prepare-shards", task_runner=task_runner(runner_spec), log_prints=False)
    def prepare_shards(tasks: list[ShardTask]) -> list[ShardDone]:
        futures = write.map(tasks)
        return [future.result() for future in futures]

    return prepare_shards(tasks)
