"""Atomic writes: staged outputs appear whole, with the permissions a plain open()/mkdir would give them."""

import os
import stat

import pytest

from tuneline.core.atomic import current_umask, staged_dir, staged_file, write_bytes_atomic


@pytest.fixture
def umask():
    """Set the process umask for one test, then put the old one back."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                        (0o002, 0o664, 0o775)])
def test_staged_outputs_get_the_umask_mode_not_tempfiles(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    assert current_umask() == mask
    write_bytes_atomic(tmp_path / "metrics" / "eval.json", b"{}")
    with staged_file(tmp_path / "history.csv") as tmp:
        tmp.write_text("epoch\n")
    with staged_dir(tmp_path / "prepared") as staging:
        (staging / "manifest.json").write_text("{}")
    assert mode(tmp_path / "metrics" / "eval.json") == file_mode == mode(tmp_path / "history.csv")
    assert mode(tmp_path / "prepared") == dir_mode and mode(tmp_path / "prepared" / "manifest.json") == file_mode
    assert (tmp_path / "prepared" / "manifest.json").read_text() == "{}"


def test_rewriting_a_file_keeps_its_mode_as_open_would(tmp_path, umask):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"old")
    os.chmod(path, 0o640)
    write_bytes_atomic(path, b"new")
    assert path.read_bytes() == b"new" and mode(path) == 0o640


def test_a_failed_write_leaves_the_old_output_and_no_temp_file(tmp_path):
    path = tmp_path / "best_params.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), staged_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["best_params.json"]
