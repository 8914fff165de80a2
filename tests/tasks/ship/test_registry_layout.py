"""One registry layout: the writer (tasks/ship/registry.py) and the server's read-only reader
(serving/repository.py) list, look up and follow aliases to exactly the same version ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneline.serving.errors import LoadError, NotFound
from tuneline.serving.repository import RegistryReader
from tuneline.tasks.ship.registry import Registry, RegistryError
from tuneline.core.registry_layout import RegistryLayout, format_version, is_version_id

# (folder name in versions/, is it a version)
VERSION_IDS = [
    ("v0001", True), ("v0042", True), ("v9999", True), ("v12345", True),
    ("v1", False), ("v001", False), ("v00001", False), ("v012345", False),  # not as format_version writes them
    ("V0001", False), ("vabc", False), ("v", False), ("0001", False), ("v-001", False), ("v+0001", False),
    ("v 001", False), ("v0001 ", False), ("v0001\n", False),
    ("v١٢٣٤", False),  # Arabic-Indic digits: a regex's \d and int() both accept them
    (".staging-v0001", False), ("v0001.staging", False),
]
# Asked for by name only (a request's version parameter, an alias record): never a folder to list.
PATH_TRICKS = ["", "..", "../versions/v0001", "v0001/..", "v0001/../v0002", "/v0001"]


def _card(folder: Path, version: str) -> None:
    folder.mkdir(parents=True)
    (folder / "card.json").write_text(json.dumps({"name": "tiny", "version": version, "files": {}}))


@pytest.fixture
def registry_root(tmp_path) -> Path:
    """A registry whose versions/ holds a folder (with a card) for every name in VERSION_IDS."""
    root = tmp_path / "registry"
    for name, _ in VERSION_IDS:
        _card(root / "versions" / name, name)
    return root


def _accepts(lookup, error: type[Exception], version: str) -> bool:
    try:
        lookup(version)
    except error:
        return False
    return True


def test_writer_and_reader_list_the_same_versions(registry_root):
    expected = [name for name, valid in VERSION_IDS if valid]
    assert Registry(registry_root).versions() == expected
    assert RegistryReader(registry_root).versions() == expected


@pytest.mark.parametrize("version, valid", VERSION_IDS + [(p, False) for p in PATH_TRICKS], ids=repr)
def test_writer_and_reader_accept_and_reject_the_same_ids(registry_root, version, valid):
    writer, reader = Registry(registry_root), RegistryReader(registry_root)
    assert is_version_id(version) is valid
    assert _accepts(writer.card, RegistryError, version) is valid
    assert _accepts(reader.card, NotFound, version) is valid
    # The same id in an alias record: followed by both, or refused by both as a corrupt alias.
    alias = registry_root / "aliases" / "champion.json"
    alias.parent.mkdir(exist_ok=True)
    alias.write_text(json.dumps({"version": version, "previous": [], "updated": "2025-01-01T00:00:00+00:00"}))
    assert _accepts(lambda _: writer.alias("champion"), RegistryError, version) is valid
    assert _accepts(lambda _: reader.alias_version("champion"), LoadError, version) is valid


def test_the_writer_numbers_past_v9999_with_ids_the_reader_accepts(tmp_path):
    root = tmp_path / "registry"
    _card(root / "versions" / "v9999", "v9999")
    layout = RegistryLayout(root)
    assert layout.next_version() == format_version(10000) == "v10000"
    _card(root / "versions" / "v10000", "v10000")
    assert Registry(root).versions() == RegistryReader(root).versions() == ["v9999", "v10000"]  # by number
