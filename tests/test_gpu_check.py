"""bench/gpu_check.sh on this machine: every CUDA step it cannot run is reported as skipped, with the reason."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_reports_what_it_skipped_and_why(tmp_path):
    from bench.gpu_check import STEPS, probe

    cuda = probe()
    if cuda["torch_cuda"] or cuda["ort_cuda_loads"]:
        pytest.skip("CUDA is here: bench/gpu_check.sh runs the real steps (minutes), not this check")
    out = tmp_path / "report.json"
    done = subprocess.run([str(REPO / "bench" / "gpu_check.sh"), "--out", str(out)], capture_output=True, text=True, check=False,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert list(report["steps"]) == list(STEPS)
    assert all(step["status"] == "skipped" for step in report["steps"].values())
    for step in ("export_cuda", "serving_gpu", "serving_io_binding", "tensorrt", "fp16_serving", "provider_refusal"):
        assert report["steps"][step]["reason"].startswith("skipped: no CUDAExecutionProvider"), step
    assert "torch.cuda.is_available() is False" in report["steps"]["train_bf16_compile"]["reason"]
    assert report["total_s"] < 30 and "skipped: no CUDAExecutionProvider" in done.stdout


def test_gpu_check_covers_the_serving_gpu_paths_within_8_minutes():
    from bench.gpu_check import INNER, LIMIT_S, STEPS, TOTAL_S

    assert {"serving_io_binding", "tensorrt", "fp16_serving", "provider_refusal"} <= set(STEPS)
    assert set(LIMIT_S) == set(STEPS) and set(INNER) <= set(STEPS)
    assert sum(LIMIT_S.values()) <= 8 * 60 and TOTAL_S < 8 * 60
