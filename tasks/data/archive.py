"""A folder of files, or an archive of one (.tar, .tar.gz/.tgz, .zip), local or at a URL, listed by name.

A listing holds names only (a '/'-joined relative path per file, about 100 bytes each), never contents, so
a million files list in about 100 MB; contents are read when decoded (tasks/data/imagefolder.py).
Archives are never extracted: a member's name is only ever a key, so a hostile name (`../x`, `/etc/x`)
cannot write anywhere; such names are refused, and links and special files skipped. Members are read
in one sequential pass per use, in archive order (random access into gzip costs a re-decompression per
member), keeping no per-member object (tarfile keeps every TarInfo it has read unless told otherwise).
Hidden entries (a part starting with `.`, and macOS's `__MACOSX/`) are not data and are dropped.
An archive (or folder) that wraps everything in one top folder (`cifar10/train/airplane/…`) is unwrapped.
"""

from __future__ import annotations

import os
import tarfile
import zipfile
import zlib
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from tuneline.tasks.data import remote
from tuneline.tasks.data.idx import DataError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
SPLIT_NAMES = ("train", "val", "test")
_FORMAT_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error)


@dataclass
class Listing:
    """A tree's files and folders, in sorted path order (path parts compared in turn, as sorted Paths are)."""

    where: str                        # the folder or archive as given: messages name files below it
    kind: Literal["folder", "tar", "zip"]
    files: list[str]                  # '/'-joined paths below the root, as found (before unwrapping)
    dirs: list[str]                   # the same for folders: an empty class folder is only seen here
    ordinals: np.ndarray | None = None  # archives: each file's position among the members (what a pass reads)
    strip: int = 0                    # leading parts that only wrap the tree (unwrap())

    @property
    def remote(self) -> bool:
        return remote.is_url(self.where)

    def parts(self, name: str) -> list[str]:
        """A listed name's path parts below the tree's root, wrapping folders left out."""
        return name.split("/")[self.strip:]

    def shown(self, index: int) -> str:
        """How messages name file `index`: its path or URL, or `archive:member/path`."""
        name = self.files[index]
        if self.kind != "folder":
            return f"{self.where}:{name}"
        if self.remote:
            return f"{self.where.rstrip('/')}/{name}"
        return os.path.join(self.where, *name.split("/"))


def is_archive(source: str) -> bool:
    path = remote.url_path(source) if remote.is_url(source) else source
    return path.lower().endswith(ARCHIVE_SUFFIXES)


def _hidden(parts) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in parts)


def _sort_key(name: str) -> str:
    # Sorted by parts, as Path sorts: `a/x` before `a-b/x` ('/' sorts after '-', NUL before everything).
    return name.replace("/", "\0")


def _member_parts(archive: str, name: str) -> tuple[str, ...]:
    """A member name's parts, as PurePosixPath gives them (`a//b/./c` is a, b, c); an unsafe name is refused."""
    name = name.replace("\\", "/")
    # str.split, not PurePosixPath: a pass over a million members calls this a million times (5x faster).
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if name.startswith("/") or ".." in parts:
        raise DataError(f"{archive}: member {name!r} points outside the archive: refusing an unsafe archive; "
                        "re-create it with relative member names")
    return parts


# --- folders -------------------------------------------------------------------------------------------------------


def _data_name(archive: str, member_name: str) -> str | None:
    """A member's path below the archive's root ("a/b.png"), or None for the root itself and hidden entries."""
    parts = _member_parts(archive, member_name)
    return "/".join(parts) if parts and not _hidden(parts) else None


def _walk_folder(folder: str) -> tuple[list[str], list[str]]:
    """Files and folders below `folder`, depth first with names sorted (which is sorted path order), hidden
    ones pruned; linked folders are neither listed nor walked (as Path.rglob), linked files are files."""
    files: list[str] = []
    dirs: list[str] = []
    stack: list[Iterator[os.DirEntry]] = []
    prefixes: list[str] = []

    def enter(path: str, prefix: str) -> None:
        try:
            with os.scandir(path) as scan:
                entries = sorted(scan, key=lambda e: e.name)
        except PermissionError:  # Path.rglob skips an unreadable folder too
            entries = []
        stack.append(iter(entries))
        prefixes.append(prefix)

    enter(folder, "")
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            prefixes.pop()
            continue
        if _hidden((entry.name,)):
            continue
        name = prefixes[-1] + entry.name
        if entry.is_dir(follow_symlinks=False):
            dirs.append(name)
            enter(entry.path, name + "/")
        elif entry.is_symlink() and entry.is_dir():
            continue
        elif entry.is_file():
            files.append(name)
    return files, dirs


def _list_remote_folder(url: str) -> Listing:
    try:
        found = remote.list_folder(url)
    except FileNotFoundError:
        raise DataError(f"{url}: image folder not found: set data.image_folder to a folder of class sub-folders "
                        "(or an archive of one)") from None
    except remote.access_errors() as exc:
        raise DataError(f"{url}: cannot list the folder ({exc}): check the URL, the network and your "
                        "credentials") from None
    if found is None:
        raise DataError(f"{url}: not a folder or an archive ({', '.join(ARCHIVE_SUFFIXES)}): set data.image_folder "
                        "to a folder of class sub-folders or an archive of one")
    files, dirs = ([name for name in names if not _hidden(name.split("/"))] for names in found)
    return Listing(url, "folder", sorted(files, key=_sort_key), sorted(dirs, key=_sort_key))


# --- archives ------------------------------------------------------------------------------------------------------

Member = tuple[int, str, bool, "bytes | None"]  # ordinal, '/'-joined name, is a folder, the bytes asked for


def is_zip(source: str) -> bool:
    path = remote.url_path(source) if remote.is_url(source) else source
    return path.lower().endswith(".zip")


def _open(source: str, seekable: bool):
    return remote.open_file(source, seekable) if remote.is_url(source) else open(source, "rb")


def _tar_members(source: str, want: Callable[[int, str], bool]) -> Iterator[Member]:
    with _open(source, seekable=False) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
        ordinal = -1
        while (member := tar.next()) is not None:
            ordinal += 1
            tar.members.clear()  # a stream is read once: keep no TarInfo (a million would hold ~0.5 GB)
            name = _data_name(source, member.name)
            if name is None:
                continue
            if member.isdir():
                yield ordinal, name, True, None
            elif member.isfile():  # links and special files are never data
                yield ordinal, name, False, tar.extractfile(member).read() if want(ordinal, name) else None


def _zip_members(source: str, want: Callable[[int, str], bool]) -> Iterator[Member]:
    with _open(source, seekable=True) as raw, zipfile.ZipFile(raw) as zf:
        for ordinal, info in enumerate(zf.infolist()):
            name = _data_name(source, info.filename)
            if name is None:
                continue
            if info.is_dir():
                yield ordinal, name, True, None
            else:
                yield ordinal, name, False, zf.read(info) if want(ordinal, name) else None


def members(source: str, want: Callable[[int, str], bool]) -> Iterator[Member]:
    """One pass over an archive's kept members, in archive order, with the bytes of the files `want` picks
    (read here, in the pass, so that a broken archive is one DataError naming it)."""
    is_url = remote.is_url(source)
    try:
        yield from (_zip_members if is_zip(source) else _tar_members)(source, want)
    except DataError:  # an unsafe member name (DataError is a ValueError, which a URL's errors include)
        raise
    except FileNotFoundError:
        raise DataError(f"{source}: image folder not found: set data.image_folder to a folder of class sub-folders "
                        "(or an archive of one)") from None
    except _FORMAT_ERRORS as exc:
        raise DataError(f"{source}: unreadable archive ({exc}): re-create or re-download it") from None
    except (remote.access_errors() if is_url else OSError) as exc:
        if not is_url:
            raise DataError(f"{source}: unreadable archive ({exc}): re-create or re-download it") from None
        raise DataError(f"{source}: cannot read the archive ({exc}): check the URL, the network and your "
                        "credentials (a .zip needs a server that answers range requests)") from None


class Picked:
    """`want` for members(): the members at the given ordinals (ascending, as a pass meets them)."""

    def __init__(self, ordinals: np.ndarray):
        self.ordinals, self.next = ordinals, 0

    def __call__(self, ordinal: int, name: str) -> bool:
        while self.next < len(self.ordinals) and self.ordinals[self.next] < ordinal:
            self.next += 1
        return self.next < len(self.ordinals) and self.ordinals[self.next] == ordinal


def scan_archive(source: str, want: Callable[[int, str], bool]) -> Iterator[Member]:
    """members(), yielding those with bytes, and the listing they make: `yield from` returns it, unwrapped, once
    the pass is over."""
    files: list[str] = []
    dirs: list[str] = []
    ordinals = array("q")
    for member in members(source, want):
        ordinal, name, is_dir, data = member
        if is_dir:
            dirs.append(name)
        else:
            files.append(name)
            ordinals.append(ordinal)
        if data is not None:
            yield member
    order = sorted(range(len(files)), key=lambda i: _sort_key(files[i]))  # stable: duplicate names keep their order
    by_name = np.frombuffer(ordinals, dtype=np.int64)[order] if files else np.empty(0, np.int64)
    return unwrap(Listing(source, "zip" if is_zip(source) else "tar", [files[i] for i in order],
                          sorted(dirs, key=_sort_key), by_name))


# --- the tree ------------------------------------------------------------------------------------------------------


def unwrap(listing: Listing) -> Listing:
    """Drop one wrapping top folder at a time while everything lies below it and it is not a split folder."""
    strip = 0
    while listing.files:
        dirs = [d for d in listing.dirs if d.count("/") >= strip]  # the wrapping folders themselves are gone
        tops = {name.split("/", strip + 1)[strip] for name in (*listing.files, *dirs)}
        files_deep = all(name.count("/") >= strip + 2 for name in listing.files)
        if len(tops) != 1 or next(iter(tops)) in SPLIT_NAMES or not files_deep:
            break
        strip += 1
    listing.strip = strip
    return listing


def source_kind(source: str) -> Literal["folder", "tar", "zip"]:
    """What `source` is, or a DataError saying it is neither a folder nor an archive, or not there."""
    if remote.is_url(source):
        return ("zip" if is_zip(source) else "tar") if is_archive(source) else "folder"
    path = Path(source)
    if path.is_dir():
        return "folder"
    if path.is_file() and is_archive(source):
        return "zip" if is_zip(source) else "tar"
    if path.exists():
        raise DataError(f"{source}: not a folder or an archive ({', '.join(ARCHIVE_SUFFIXES)}): set data.image_folder "
                        "to a folder of class sub-folders or an archive of one")
    raise DataError(f"{source}: image folder not found: set data.image_folder to a folder of class sub-folders "
                    "(or an archive of one)")


def list_folder(source: str) -> Listing:
    """A folder's listing (local, or a URL), unwrapped. Archives are listed by scan_archive(), in a pass that
    can read contents too."""
    if remote.is_url(source):
        return unwrap(_list_remote_folder(source))
    files, dirs = _walk_folder(source)
    return unwrap(Listing(source, "folder", files, dirs))
