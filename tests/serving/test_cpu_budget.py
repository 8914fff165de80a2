"""serve.workers `auto` and the threads each worker gets: the CPUs a process may use, from its affinity and the
cgroup files a container runtime writes (here real files in tmp_path, laid out as /sys/fs/cgroup is)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneline.serving.cpu_budget import cgroup_cpu_limit, plan_workers, usable_cpus

pytestmark = pytest.mark.fast


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _cgroup(tmp_path: Path, line: str = "0::/") -> tuple[Path, Path]:
    """A cgroup mount folder and a /proc/self/cgroup placing this process at `line`."""
    root = tmp_path / "sys-fs-cgroup"
    root.mkdir(exist_ok=True)
    return root, _write(tmp_path / "proc-self-cgroup", line + "\n")


@pytest.mark.parametrize(("cpu_max", "affinity", "expected"), [
    ("max 100000", 8, 8),        # no quota: the affinity
    ("200000 100000", 8, 2),     # Kubernetes limits.cpu: 2
    ("150000 100000", 8, 1),     # 1.5 CPUs: rounded down
    ("50000 100000", 8, 1),      # half a CPU: still one
    ("800000 100000", 4, 4),     # a quota above the affinity: the affinity
])
def test_cgroup_v2_quota_caps_the_affinity(tmp_path, cpu_max, affinity, expected):
    root, self_cgroup = _cgroup(tmp_path)
    _write(root / "cpu.max", cpu_max + "\n")
    assert usable_cpus(affinity, root, self_cgroup) == expected


def test_cgroup_v2_the_tightest_quota_along_the_process_path_counts(tmp_path):
    # No cgroup namespace: the process sits below the root, and a parent's quota bounds its children.
    root, self_cgroup = _cgroup(tmp_path, "0::/kubepods/pod1/server")
    _write(root / "kubepods" / "cpu.max", "max 100000")
    _write(root / "kubepods" / "pod1" / "cpu.max", "300000 100000")
    _write(root / "kubepods" / "pod1" / "server" / "cpu.max", "max 100000")
    _write(root / "elsewhere" / "cpu.max", "100000 100000")  # another cgroup's quota is not ours
    assert cgroup_cpu_limit(root, self_cgroup) == 3
    assert usable_cpus(16, root, self_cgroup) == 3


@pytest.mark.parametrize("folder", ["cpu", "cpu,cpuacct"])
def test_cgroup_v1_cfs_quota(tmp_path, folder):
    root, self_cgroup = _cgroup(tmp_path, "4:cpu,cpuacct:/docker/abc\n0::/")
    _write(root / folder / "docker" / "abc" / "cpu.cfs_quota_us", "250000\n")
    _write(root / folder / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    assert usable_cpus(8, root, self_cgroup) == 2


def test_cgroup_v1_unlimited_and_no_cgroup_files_leave_the_affinity(tmp_path):
    root, self_cgroup = _cgroup(tmp_path, "4:cpu,cpuacct:/\n0::/")
    _write(root / "cpu" / "cpu.cfs_quota_us", "-1\n")
    _write(root / "cpu" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_limit(root, self_cgroup) is None
    assert usable_cpus(6, root, self_cgroup) == 6
    assert usable_cpus(6, tmp_path / "nothing", tmp_path / "no-proc") == 6  # not Linux, or no cgroup mounted
    assert usable_cpus(0, root, self_cgroup) == 1  # never below one


def test_this_process_has_at_least_one_cpu_and_no_more_than_its_affinity():
    import os

    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize(("workers", "threads", "cpus", "expected"), [
    (1, 0, 8, (1, 0)),          # one process: ONNX Runtime's one thread per core, as before
    ("auto", 0, 8, (8, 1)),     # a worker per CPU, a thread each
    ("auto", 0, 1, (1, 0)),     # one CPU: one process
    ("auto", 0, 200, (64, 3)),  # at most 64 workers (serve.workers' bound)
    (2, 0, 8, (2, 4)),          # threads 0 with several workers: the CPUs shared out, not a thread per core each
    (3, 0, 8, (3, 2)),          # rounded down
    (4, 0, 2, (4, 1)),          # more workers than CPUs: still one thread each
    (2, 3, 8, (2, 3)),          # serve.threads set: kept
])
def test_plan_workers(workers, threads, cpus, expected):
    assert plan_workers(workers, threads, cpus) == expected


def test_auto_is_one_process_when_the_models_run_on_a_gpu():
    assert plan_workers("auto", 0, 16, gpu=True) == (1, 0)
    assert plan_workers(4, 0, 16, gpu=True) == (4, 4)  # a count you set is kept


def test_the_default_is_a_worker_per_usable_cpu_on_the_cpu(tmp_path):
    from tuneline.core.config.params import build_params
    from tuneline.serving.settings import build_settings

    params = build_params({}, {})
    assert params.serve.workers == "auto"
    cpu = build_settings(build_params({}, {"serve.device": "cpu"}), tmp_path, {}, registry=tmp_path)
    assert cpu.workers == min(usable_cpus(), 64)
    cuda = build_settings(build_params({}, {"serve.device": "cuda"}), tmp_path, {}, registry=tmp_path)
    assert cuda.workers == 1  # a GPU: one process (a missing CUDA is refused when that process starts)


def test_auto_workers_in_the_settings(tmp_path):
    from tuneline.core.config.params import build_params
    from tuneline.serving.settings import build_settings

    params = build_params({}, {"serve.workers": "auto", "serve.threads": 0})
    assert params.serve.workers == "auto"  # params keep the word; the server resolves it where it runs
    settings = build_settings(params, tmp_path, {}, registry=tmp_path)
    assert settings.workers == min(usable_cpus(), 64)
    assert settings.threads == (max(1, usable_cpus() // settings.workers) if settings.workers > 1 else 0)
