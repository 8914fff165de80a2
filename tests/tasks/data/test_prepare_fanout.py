"""`data.prepare_tasks: prefect`: prepare's shards run as mapped Prefect tasks (tasks/data/fanout.py) on a real,
embedded Prefect API, on a Dask task runner where prefect-dask is installed, and give the very files a local
prepare gives."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from tuneline.core.config.data import DataConfig
from tuneline.tasks.data.prepare import run_prepare
from tests.conftest import REPO, TINY_CLASSES, write_raw_dir

CHILD = """
import json, sys, time
from pathlib import Path
from prefect.client.orchestration import get_client
from tuneline.core.config.data import DataConfig
from tuneline.tasks.data.prepare import run_prepare

raw, out, runner = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] or None
result = run_prepare(DataConfig(shard_mb=0.1, prepare_tasks="prefect", prepare_task_runner=runner), raw, out)
expected = sum(len(entry["shards"]) for entry in result.manifest["splits"].values())
# Task runs reach the API as events, a moment after the flow returns: wait until every one is there and named.
deadline = time.monotonic() + 30
while True:
    with get_client(sync_client=True) as client:
        names = sorted(run.name for run in client.read_task_runs())
    if (len(names) >= expected and all(n.count("-") >= 3 for n in names)) or time.monotonic() > deadline:
        break
    time.sleep(0.5)
print(json.dumps(names))
"""


def test_prepare_shards_run_as_mapped_prefect_tasks_and_write_what_a_local_prepare_writes(tmp_path):
    raw = write_raw_dir(tmp_path / "raw", TINY_CLASSES, {"train": 1000, "t10k": 300})
    local = run_prepare(DataConfig(shard_mb=0.1), raw, tmp_path / "local")
    runner = "prefect_dask:DaskTaskRunner" if importlib.util.find_spec("prefect_dask") else ""
    env = {**__import__("os").environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PYTHONPATH": str(REPO),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           # The embedded server's start waits 20 s by default: too little on two busy cores (seen in CI).
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    env.pop("PREFECT_API_URL", None)  # the embedded API, as `tuneline run` uses by default
    done = subprocess.run([sys.executable, "-c", CHILD, str(raw), str(tmp_path / "mapped"), runner], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    task_runs = json.loads(done.stdout.strip().splitlines()[-1])
    shards = sum(len(entry["shards"]) for entry in local.manifest["splits"].values())
    assert shards >= 5  # 0.1 MB shards: the work really is fanned out
    assert len(task_runs) == shards and all(name.startswith("write-shard-") for name in task_runs)
    assert {"write-shard-train-0", "write-shard-val-0", "write-shard-test-0"} <= set(task_runs)
    mapped = tmp_path / "mapped"
    assert json.loads((mapped / "manifest.json").read_text()) == local.manifest
    files = sorted(p.relative_to(mapped) for p in mapped.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(local.prepared_dir) for p in local.prepared_dir.rglob("*") if p.is_file())
    assert all((mapped / f).read_bytes() == (local.prepared_dir / f).read_bytes() for f in files)
