"""Atomic writes: outputs appear whole or not at all (temp file or folder beside the target, then rename).

tempfile creates its files 0600 and folders 0700 (private, as a temp file should be); once staged they
become outputs, so before the rename they get the mode a plain open() or mkdir would have given them:
0666 / 0777 less the process's umask (0644 / 0755 under the usual 022), or, for a file that already
exists, the mode it has (open() keeps it too).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (os.umask can only read by setting)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _umask_lock:  # elsewhere: set and restore at once (a thread creating a file meanwhile could see 0)
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_mode(is_dir: bool) -> int:
    """The permission bits open() (0666) or mkdir (0777) would give a new file or folder under the umask."""
    return (0o777 if is_dir else 0o666) & ~current_umask()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a sibling temp file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with staged_file(path) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def staged_file(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it is renamed onto `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            mode = default_mode(is_dir=False)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def make_staging_dir(parent: Path, prefix: str) -> Path:
    """A new, uniquely named folder in `parent`, with the mode mkdir would give it (not tempfile's 0700)."""
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(staging, default_mode(is_dir=True))
    return staging


@contextlib.contextmanager
def staged_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temp folder beside `path`; on success it replaces `path` whole, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(path.parent, prefix=f".{path.name}.")
    try:
        yield staging
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)  # a folder cannot be renamed onto a non-empty one
        os.replace(staging, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
