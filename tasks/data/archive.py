"""A folder of files, or an archive of one (.tar, .tar.gz/.tgz, .zip), read as one list of entries.

Archives are read in memory, never extracted: a member's name is only ever a key, so a hostile name
(`../x`, `/etc/x`) cannot write anywhere; such names, links and special files are refused or skipped.
A .tar.gz is read in one sequential pass (random access into gzip costs a re-decompression per member).
Hidden entries (a part starting with `.`, and macOS's `__MACOSX/`) are not data and are dropped.
An archive (or folder) that wraps everything in one top folder (`cifar10/train/airplane/…`) is unwrapped.
"""

from __future__ import annotations

import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tuneline.tasks.data.idx import DataError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class Entry:
    """One file or folder: its path parts below the tree's root, where to say it is, and its bytes or file."""

    parts: tuple[str, ...]
    shown: str                       # for messages: the file's path, or `archive.tar.gz:member/path`
    is_dir: bool = False
    data: bytes | Path | None = None  # archive members are read into memory; folder files are read when decoded

    def read(self) -> bytes:
        return self.data.read_bytes() if isinstance(self.data, Path) else (self.data or b"")


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _hidden(parts: tuple[str, ...]) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in parts)


def _member_parts(archive: Path, name: str) -> tuple[str, ...]:
    path = PurePosixPath(name.replace("\\", "/"))
    parts = tuple(p for p in path.parts if p not in ("", "."))
    if path.is_absolute() or ".." in parts:
        raise DataError(f"{archive}: member {name!r} points outside the archive: refusing an unsafe archive; "
                        "re-create it with relative member names")
    return parts


def _read_tar(archive: Path) -> list[Entry]:
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            # one sequential pass; links and special files are never data
            return _entries(archive, ((member.name, member.isdir(), member.isfile() and
                                       (lambda member=member: tar.extractfile(member).read())) for member in tar))
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{archive}: unreadable archive ({exc}): re-create or re-download it") from None


def _read_zip(archive: Path) -> list[Entry]:
    try:
        with zipfile.ZipFile(archive) as zf:
            return _entries(archive, ((info.filename, info.is_dir(), lambda info=info: zf.read(info))
                                      for info in zf.infolist()))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as exc:
        raise DataError(f"{archive}: unreadable archive ({exc}): re-create or re-download it") from None


def _entries(archive: Path, members) -> list[Entry]:
    """Entries from (name, is_dir, read-bytes callable or False to skip) members, hidden ones left out; a member's
    bytes are read only when it is kept."""
    entries = []
    for name, is_dir, read in members:
        parts = _member_parts(archive, name)
        if not parts or _hidden(parts):
            continue
        shown = f"{archive}:{'/'.join(parts)}"
        if is_dir:
            entries.append(Entry(parts, shown, is_dir=True))
        elif read:
            entries.append(Entry(parts, shown, data=read()))
    return entries


def _read_folder(folder: Path) -> list[Entry]:
    entries = []
    for path in sorted(folder.rglob("*")):
        parts = path.relative_to(folder).parts
        if _hidden(parts) or path.is_symlink() and path.is_dir():  # no walking through linked folders
            continue
        if path.is_dir():
            entries.append(Entry(parts, str(path), is_dir=True))
        elif path.is_file():
            entries.append(Entry(parts, str(path), data=path))
    return entries


def unwrap(entries: list[Entry]) -> list[Entry]:
    """Drop one wrapping top folder at a time while everything lies below it and it is not a split folder."""
    while entries:
        tops = {e.parts[0] for e in entries}
        files_deep = all(len(e.parts) >= 3 for e in entries if not e.is_dir)
        top = next(iter(tops))
        if len(tops) != 1 or top in SPLIT_NAMES or not files_deep or not any(not e.is_dir for e in entries):
            return entries
        entries = [Entry(e.parts[1:], e.shown, e.is_dir, e.data) for e in entries if len(e.parts) > 1]
    return entries


def read_tree(source: Path) -> list[Entry]:
    """Every non-hidden entry of a folder or archive, in sorted path order, below any wrapping top folder."""
    if source.is_dir():
        entries = _read_folder(source)
    elif source.is_file() and is_archive(source):
        entries = _read_zip(source) if source.name.lower().endswith(".zip") else _read_tar(source)
    elif source.exists():
        raise DataError(f"{source}: not a folder or an archive ({', '.join(ARCHIVE_SUFFIXES)}): set data.image_folder "
                        "to a folder of class sub-folders or an archive of one")
    else:
        raise DataError(f"{source}: image folder not found: set data.image_folder to a folder of class sub-folders "
                        "(or an archive of one)")
    return unwrap(sorted(entries, key=lambda e: e.parts))
