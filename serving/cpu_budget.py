"""How many CPUs this process may use, and how serve.workers and serve.threads share them.

os.cpu_count() is the machine's cores; what a server may use is fewer: its CPU affinity (taskset, cpusets) and a
container's CPU limit, a CFS quota (Kubernetes `resources.limits.cpu: 2` is a quota of 2 CPUs' time per period,
on a node with perhaps 64 cores). Workers or ONNX Runtime threads sized by the core count would then fight over
the quota and be throttled.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from tuneline.core.config.serve import MAX_WORKERS

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")


def usable_cpus(affinity: int | None = None, root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> int:
    """CPUs this process may use: its affinity, capped by its cgroup's CPU quota rounded down; at least 1.

    `affinity` defaults to len(os.sched_getaffinity(0)); `root` and `self_cgroup` are where the cgroup files are
    (tests pass folders of their own).
    """
    if affinity is None:
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_limit(root, self_cgroup)
    return max(1, min(affinity, quota) if quota is not None else affinity)


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> int | None:
    """Whole CPUs the CFS quota allows (quota // period), the tightest along this process's cgroup and its
    ancestors; None when no quota applies (or there are no cgroup files: not Linux, or not mounted)."""
    limits = [limit for folder in _cgroup_folders(root, self_cgroup)
              for limit in (_v2_limit(folder / "cpu.max"), _v1_limit(folder)) if limit is not None]
    return min(limits, default=None)


def _cgroup_folders(root: Path, self_cgroup: Path) -> list[Path]:
    """The cgroup folders whose quota bounds this process: its own and each ancestor's, in the v2 hierarchy and
    in v1's cpu controller. In a container (its own cgroup namespace) its cgroup is the root: just the root."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    paths = {"": ["/"], "cpu": ["/"]}  # hierarchy -> cgroup paths; the roots at least
    for line in lines:  # "0::/kubepods/pod1/c1" (v2), "4:cpu,cpuacct:/docker/abc" (v1)
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            paths[""].append(path)
        elif "cpu" in controllers.split(","):
            paths["cpu"].append(path)
    folders = []
    mounts = {"": [root], "cpu": [root / "cpu", root / "cpu,cpuacct", root / "cpuacct,cpu"]}
    for hierarchy, cgroup_paths in paths.items():
        for mount in mounts[hierarchy]:
            for path in cgroup_paths:
                folder = mount / path.strip("/")
                folders += [folder, *(p for p in folder.parents if p.is_relative_to(mount))]
    return list(dict.fromkeys(folders))


def _v2_limit(cpu_max: Path) -> int | None:
    """cgroup v2 cpu.max: "<quota> <period>" in µs, or "max <period>" for no limit."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max" or int(period) <= 0:
        return None
    return int(quota) // int(period)


def _v1_limit(folder: Path) -> int | None:
    """cgroup v1 cpu.cfs_quota_us / cpu.cfs_period_us (quota -1: no limit)."""
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    if quota <= 0 or period <= 0:
        return None
    return quota // period


def plan_workers(workers: int | Literal["auto"], threads: int, cpus: int, gpu: bool = False) -> tuple[int, int]:
    """(serve.workers, serve.threads) as the server runs them on `cpus` usable CPUs (`gpu`: its models run on a GPU).

    `auto` workers: one per usable CPU (at most MAX_WORKERS); on 2 cores, two workers answered 5.2-5.3x the naive
    server's JSON requests/s at 64 connections where one process answered 3.5-4.6x (docs/benchmarks.md). On a GPU,
    1: each worker would hold its own CUDA context and build its own TensorRT engines, and that is unmeasured.
    With several workers and serve.threads 0 ("one per core"), each worker's ONNX Runtime gets cpus // workers
    intra-op threads (at least 1): N workers with a thread per core each would run N x cores threads on the cores,
    and a busy batch would wait on the others' threads.
    """
    if workers == "auto":
        count = 1 if gpu else min(cpus, MAX_WORKERS)
    else:
        count = workers
    if count > 1 and threads == 0:
        threads = max(1, cpus // count)
    return count, threads
