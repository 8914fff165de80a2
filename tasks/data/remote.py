"""`data.image_folder` as a URL (http(s)://, s3://, gs://, … : any fsspec protocol), read where it lies.

Nothing is copied to local disk first: an archive is opened as one fsspec file and streamed (over plain
HTTP as one GET, which any server answers; a .zip needs a server that answers range requests), and a
folder is listed with `fs.find` (over HTTP fsspec follows the links of directory index pages, such as
`python -m http.server` serves) and each file is read when it is decoded, by the worker decoding it.
fsspec is imported on first use only: a local fetch, and every other stage, never loads it.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any
from urllib.parse import quote, unquote, urlsplit

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
READ_BATCH = 32  # files fetched at once by one worker (concurrently on async filesystems such as http, s3, gcs)


def is_url(source: str) -> bool:
    """`scheme://…` (a Windows path such as C:\\data has no `//`, so it is never taken for one)."""
    return bool(_URL.match(source))


def url_path(url: str) -> str:
    """The path part of a URL (no query or fragment): what says whether it names an archive."""
    return urlsplit(url).path


def access_errors() -> tuple[type[BaseException], ...]:
    """What reading a URL raises besides OSError: aiohttp's errors (fsspec's http) are not OSErrors."""
    errors: list[type[BaseException]] = [OSError, ValueError, TimeoutError]
    try:
        import aiohttp

        errors.append(aiohttp.ClientError)
    except ImportError:  # no http support installed: nothing of it can be raised either
        pass
    return tuple(errors)


@cache
def filesystem(url: str) -> tuple[Any, str, bool]:
    """(fsspec filesystem, its path for `url`, whether names are URL-quoted as on HTTP); one per URL and process."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return fs, path.rstrip("/"), bool({"http", "https"} & set(protocols))


def _path_of(url: str, name: str) -> str:
    fs, root, quoted = filesystem(url)
    return f"{root}/{quote(name) if quoted else name}"


def open_file(url: str, seekable: bool):
    """A binary file object for `url`: a plain stream where random access is not needed (one GET over HTTP;
    fsspec's default HTTP file insists on range requests, which simple servers refuse)."""
    fs, root, quoted = filesystem(url)
    if quoted and not seekable:
        return fs.open(root, "rb", block_size=0)
    return fs.open(root, "rb")


def list_folder(url: str) -> tuple[list[str], list[str]] | None:
    """(files, folders) below `url`, as '/'-joined names relative to it, in any order; None when `url` is not a
    folder (nothing below it). Raises FileNotFoundError where it does not exist."""
    fs, root, quoted = filesystem(url)
    found = fs.find(root, withdirs=True, detail=True)
    files, dirs = [], []
    for name, info in found.items():
        name = name.rstrip("/")
        if not name.startswith(root + "/"):
            continue  # the folder itself (HTTP lists its index page)
        relative = name[len(root) + 1:]
        relative = unquote(relative) if quoted else relative
        (dirs if info.get("type") == "directory" else files).append(relative)
    if not files and not dirs:
        if not fs.exists(root):
            raise FileNotFoundError(url)
        return None
    return files, dirs


def read_files(url: str, names: list[str], prefix: int | None = None) -> list[bytes | BaseException]:
    """The bytes of each named file below `url` (its first `prefix` bytes, or more where the server ignores the
    range asked for), or the exception reading it raised; READ_BATCH files at a time."""
    fs, root, quoted = filesystem(url)
    out: list[bytes | BaseException] = []
    for start in range(0, len(names), READ_BATCH):
        paths = [_path_of(url, name) for name in names[start:start + READ_BATCH]]
        ends = [prefix] * len(paths)
        out += fs.cat_ranges(paths, [0 if prefix else None] * len(paths), ends, on_error="return")
    return out
