"""One registry layout and one reader (core/registry_reader.py): the writer (tasks/ship/registry.py) and the
server (serving/repository.py) list, look up and follow aliases to exactly the same version ids, and each
turns the reader's refusals into its own errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tuneline.serving.errors import LoadError, NotFound
from tuneline.serving.repository import RegistryReader
from tuneline.tasks.ship.registry import Registry, RegistryError
from tuneline.core.registry_layout import RegistryLayout, format_version, is_version_id
from tuneline.core import registry_reader
from tuneline.core.registry_reader import RegistryReadError
from tests.tasks.registry_worker import tiny_model

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


@pytest.mark.fast
def test_one_reader_gives_each_refusal_a_reason_that_each_side_maps_to_its_own_error(tmp_path):
    root = tmp_path / "registry"
    writer = Registry(root, "tiny")
    version = writer.register({"model.onnx": tiny_model(tmp_path / "a.onnx", 1.0)}, metrics={}, gates=[],
                              lineage={}, run_id=None)
    Registry(root, "other").register({"model.onnx": tiny_model(tmp_path / "b.onnx", 2.0)}, metrics={}, gates=[],
                                     lineage={}, run_id=None)
    stored = root / "models" / "tiny" / "versions" / version / "model.onnx"
    core = registry_reader.RegistryReader(root, "tiny")
    assert core.read_verified(version, "model.onnx").data == stored.read_bytes()
    assert core.resolve(version) == version and core.alias_version("champion") is None
    stored.write_bytes(stored.read_bytes() + b"\0")  # one byte more: the size and the sha256 differ
    (root / "models" / "tiny" / "aliases").mkdir()
    (root / "models" / "tiny" / "aliases" / "challenger.json").write_text("{")
    refusals = {  # reason -> the read that gives it
        "not_found": lambda reader: reader.card("v0042"),
        "ambiguous": lambda reader: type(reader)(root).name,  # two models, none named
        "alias": lambda reader: reader.alias_version("challenger"),
        "missing": lambda reader: reader.read_verified(version, "model.int8.onnx"),
        "checksum": lambda reader: reader.read_verified(version, "model.onnx"),
    }
    served = {"not_found": NotFound, "ambiguous": NotFound, "alias": LoadError, "missing": LoadError,
              "checksum": LoadError}
    for reason, read in refusals.items():
        with pytest.raises(RegistryReadError) as core_error:
            read(core)
        assert core_error.value.reason == reason and core_error.value.exit_code == 2
        with pytest.raises(RegistryError, match=re.escape(str(core_error.value))):
            read(Registry(root, "tiny"))
        with pytest.raises(served[reason], match=re.escape(str(core_error.value))) as server_error:
            read(RegistryReader(root, "tiny"))
        assert getattr(server_error.value, "reason", reason) == reason
    size = stored.stat().st_size
    streamed = f"sha256 .* does not match its card .*; {size} bytes, card.json says {size - 1}"
    with pytest.raises(RegistryError, match=streamed):
        writer.verify(version)  # the streaming check the writer runs before promoting
