"""The file-based registry: layout, verification at registration and load, aliases, rollback, and ten
processes registering and promoting at once."""

from __future__ import annotations

import json
import os
import multiprocessing
import time

import pytest

from tuneline.tasks.ship.registry import Registry, RegistryError, sha256_file
from tests.tasks.registry_worker import register_then_promote, tiny_model


def register(registry: Registry, model, **extra) -> str:
    return registry.register({"model.onnx": model, **extra}, name="tiny", metrics={"accuracy": 0.9}, gates=[],
                             lineage={"data_version": "d.dir", "params_hash": "p", "git_commit": "c"}, run_id="run-1")


@pytest.mark.fast
def test_layout_card_and_verified_load(tmp_path):
    registry = Registry(tmp_path / "registry")
    model = tiny_model(tmp_path / "a.onnx", 1.0)
    int8 = tiny_model(tmp_path / "b.onnx", 2.0)
    assert register(registry, model, **{"model.int8.onnx": int8}) == "v0001"
    assert register(registry, tiny_model(tmp_path / "c.onnx", 3.0)) == "v0002"
    folder = tmp_path / "registry" / "models" / "tiny" / "versions" / "v0001"
    assert sorted(p.name for p in folder.iterdir()) == ["card.json", "model.int8.onnx", "model.onnx"]
    card = json.loads((folder / "card.json").read_text())
    assert card["name"] == "tiny" and card["version"] == "v0001" and card["run_id"] == "run-1"
    assert card["files"]["model.onnx"] == {"sha256": sha256_file(model), "bytes": model.stat().st_size}
    assert card["lineage"]["data_version"] == "d.dir" and "T" in card["created"]
    assert registry.versions() == ["v0001", "v0002"] and registry.find(sha256_file(model)) == "v0001"
    assert registry.model_path("v0001", "model.int8.onnx") == folder / "model.int8.onnx"
    assert [p.name for p in (tmp_path / "registry" / "models" / "tiny" / "versions").iterdir() if p.name.startswith(".")] == []


@pytest.mark.fast
def test_a_version_folder_gets_the_mode_mkdir_gives(tmp_path):
    old = os.umask(0o022)
    try:
        register(Registry(tmp_path / "registry"), tiny_model(tmp_path / "a.onnx", 1.0))
    finally:
        os.umask(old)
    folder = tmp_path / "registry" / "models" / "tiny" / "versions" / "v0001"
    assert folder.stat().st_mode & 0o777 == 0o755  # readable by the serving user, as a plain mkdir would be


@pytest.mark.fast
def test_invalid_onnx_is_refused_at_registration(tmp_path):
    registry = Registry(tmp_path / "registry")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(RegistryError, match=r"bad.onnx: not a valid ONNX model \(.*\): re-export it"):
        register(registry, bad)
    assert registry.versions() == []
    with pytest.raises(RegistryError, match="unexpected file name"):
        register(registry, tiny_model(tmp_path / "a.onnx", 1.0), **{"weights.bin": bad})


@pytest.mark.fast
def test_altered_file_is_refused_at_load_and_promotion(tmp_path):
    registry = Registry(tmp_path / "registry")
    version = register(registry, tiny_model(tmp_path / "a.onnx", 1.0))
    registry.promote(version)
    stored = tmp_path / "registry" / "models" / "tiny" / "versions" / version / "model.onnx"
    tiny_model(stored, 9.0)  # still valid ONNX, but not the bytes the card vouches for
    with pytest.raises(RegistryError, match=r"model.onnx: sha256 \w+… does not match its card"):
        registry.model_path("champion")
    other = register(registry, tiny_model(tmp_path / "b.onnx", 2.0))
    registry.promote(other)
    with pytest.raises(RegistryError, match="does not match its card"):
        registry.rollback()  # never points an alias at a file that fails verification
    assert registry.alias("champion")["version"] == other
    stored.write_bytes(b"garbage")  # and a file that is no longer ONNX
    with pytest.raises(RegistryError, match="does not match its card"):
        registry.model_path(version)


@pytest.mark.fast
def test_promote_and_rollback_restore_the_previous_champion(tmp_path):
    registry = Registry(tmp_path / "registry")
    v1, v2, v3 = (register(registry, tiny_model(tmp_path / f"{i}.onnx", float(i))) for i in range(3))
    assert registry.alias("champion") is None
    registry.promote(v1)
    registry.promote(v2)
    record = registry.promote(v3)
    assert record["version"] == v3 and record["previous"] == [v2, v1]
    assert registry.promote(v3) == record  # promoting the current champion changes nothing
    saved = json.loads((tmp_path / "registry" / "models" / "tiny" / "aliases" / "champion.json").read_text())
    assert saved == record and set(saved) == {"version", "previous", "updated"}
    assert registry.rollback()["version"] == v2
    assert registry.alias("champion")["version"] == v2 and registry.alias("champion")["previous"] == [v1]
    assert registry.rollback()["version"] == v1
    with pytest.raises(RegistryError, match=r"alias 'champion' has no previous version to roll back to \(now: v0001\)"):
        registry.rollback()
    registry.promote(v3, alias="challenger")
    assert registry.aliases_of(v3) == ["challenger"] and registry.aliases_of(v1) == ["champion"]
    with pytest.raises(RegistryError, match=r"no version 'v0042' \(versions: v0001, v0002, v0003\)"):
        registry.promote("v0042")
    assert sorted(p.name for p in (tmp_path / "registry" / "models" / "tiny" / "aliases").iterdir()) == ["challenger.json", "champion.json"]


def test_ten_processes_registering_and_promoting_at_once_leave_it_consistent(tmp_path):
    root = tmp_path / "registry"
    models = [tiny_model(tmp_path / f"m{i}.onnx", float(i)) for i in range(10)]
    context = multiprocessing.get_context("spawn")  # fresh interpreters: nothing shared but the file system
    barrier, results = context.Barrier(10), context.Queue()
    workers = [context.Process(target=register_then_promote, args=(str(root), str(m), i, barrier, results))
               for i, m in enumerate(models)]
    for w in workers:
        w.start()
    reader = Registry(root)
    # While they run: whenever the alias exists it names a complete, verified version.
    deadline = time.monotonic() + 120
    while any(w.is_alive() for w in workers) and time.monotonic() < deadline:
        record = reader.alias("champion") if (root / "models" / "tiny" / "aliases" / "champion.json").exists() else None
        if record is not None:
            reader.verify(record["version"])
        time.sleep(0.01)
    for w in workers:
        w.join(timeout=max(deadline - time.monotonic(), 1))
        if w.is_alive():
            w.terminate()
    assert [w.exitcode for w in workers] == [0] * 10
    done = dict(results.get(timeout=5) for _ in workers)
    registry = Registry(root)
    assert registry.versions() == [f"v{i:04d}" for i in range(1, 11)]
    assert sorted(done.values()) == registry.versions()  # every registration got its own id
    for worker, version in done.items():  # ... holding exactly the bytes that worker registered
        card = registry.verify(version)
        assert card["run_id"] == f"worker-{worker}"
        assert card["files"]["model.onnx"]["sha256"] == sha256_file(models[worker])
    champion = registry.alias("champion")
    # Serialised promotions: each one saw the previous one's result, so no version was lost or repeated.
    assert sorted([champion["version"], *champion["previous"]]) == registry.versions()
    assert len(champion["previous"]) == 9
    leftovers = [p.name for p in (root / "models" / "tiny" / "aliases").iterdir() if p.name != "champion.json"]
    leftovers += [p.name for p in (root / "models" / "tiny" / "versions").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def _named(registry: Registry, model) -> str:
    """Register under the Registry's own name (the card takes it)."""
    return registry.register({"model.onnx": model}, metrics={}, gates=[], lineage={}, run_id=None)


def _legacy_registry(root, model) -> None:
    """A registry as written before names: versions/ and aliases/ at its top, cards named by the data set."""
    from tests.serving.registry_helper import register_version, set_alias

    register_version(root, model, name="mnist")
    register_version(root, model, name="mnist")
    set_alias(root, "v0001")
    set_alias(root, "v0002")


@pytest.mark.fast
def test_models_by_name_each_have_their_own_versions_and_champion(tmp_path):
    root = tmp_path / "registry"
    mnist, cifar = Registry(root, "mnist"), Registry(root, "cifar10")
    _named(mnist, tiny_model(tmp_path / "a.onnx", 1.0))
    _named(cifar, tiny_model(tmp_path / "b.onnx", 2.0))
    _named(cifar, tiny_model(tmp_path / "c.onnx", 3.0))
    cifar.promote("v0002")
    mnist.promote("v0001")
    assert mnist.versions() == ["v0001"] and cifar.versions() == ["v0001", "v0002"]
    assert cifar.alias("champion")["version"] == "v0002" and mnist.alias("champion")["version"] == "v0001"
    assert json.loads((root / "models" / "cifar10" / "versions" / "v0002" / "card.json").read_text())["name"] == "cifar10"
    with pytest.raises(RegistryError, match="holds several models \\(cifar10, mnist\\): name one"):
        Registry(root).versions()
    with pytest.raises(ValueError, match="not a model name: '../x'"):
        Registry(root, "../x")


@pytest.mark.fast
def test_an_old_single_model_registry_is_read_as_is_and_migrated_on_the_first_write(tmp_path):
    from tuneline.serving.repository import RegistryReader

    root = tmp_path / "registry"
    model = tiny_model(tmp_path / "a.onnx", 1.0)
    _legacy_registry(root, model)
    # Read as the model its cards name (the data set's: project.name's default), without moving anything.
    registry = Registry(root, "mnist")
    assert registry.versions() == ["v0001", "v0002"] and registry.alias("champion")["previous"] == ["v0001"]
    assert RegistryReader(root, "mnist").alias_version("champion") == "v0002" and (root / "versions").is_dir()
    assert Registry(root).name == "mnist"
    # The first write (here: another model's registration) moves it under models/mnist/ whole, under the lock.
    _named(Registry(root, "digits"), tiny_model(tmp_path / "b.onnx", 2.0))
    assert not (root / "versions").exists() and not (root / "aliases").exists()
    assert sorted(p.name for p in (root / "models").iterdir()) == ["digits", "mnist"]
    assert registry.versions() == ["v0001", "v0002"] and registry.verify("v0002")["name"] == "mnist"
    assert registry.rollback()["version"] == "v0001"  # history kept: the alias's previous versions came along
    assert RegistryReader(root, "mnist").alias_version("champion") == "v0001"
