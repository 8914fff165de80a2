"""The prepared-data format (tasks/data/shards.py) and its two read paths (tasks/data/stream.py): records of
every modality round-trip, corruption is one line naming the shard, old folders are read as they are, the
epoch plan gives DDP ranks disjoint shards, and streaming trains the weights the resident path trains."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tuneline.core.config.data import DataConfig
from tuneline.core.config.model import ModelConfig
from tuneline.core.config.train import TrainConfig
from tuneline.tasks.data import shards as shards_module
from tuneline.tasks.data.idx import DataError
from tuneline.tasks.data.prepare import load_manifest, load_split, open_split, run_prepare
from tuneline.tasks.data.shards import (FORMAT, OPEN_SHARDS, RecordLayout, SplitShards, gather_rows, split_entry,
                                        write_shard)
from tuneline.tasks.data.stream import DataAccess, EpochPlan, SplitReader
from tuneline.tasks.lineage import Lineage
from tuneline.tasks.train.loop import run_train
from tests.conftest import TINY_CLASSES, write_raw_dir

LINEAGE = Lineage("tiny.dir", "p" * 16, "c" * 40)


def one_split_folder(root: Path, layout: RecordLayout, shards: list[tuple]) -> SplitShards:
    """A prepared folder holding split `train` as the given shards ((x, y) each), read back through its manifest."""
    written = [write_shard(root, "train", i, x, y, layout) for i, (x, y) in enumerate(shards)]
    manifest = {"format": FORMAT, "record": layout.to_dict(), "splits": {"train": split_entry(written)}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return SplitShards(root, "train", manifest)


# --- every modality's records -----------------------------------------------------------------------------------

@pytest.mark.fast
@pytest.mark.parametrize("dtype, tail", [("int16", ()), ("float32", ()), ("int32", ()), ("float32", (2,))],
                         ids=["int16-audio", "float32-audio", "int32-tokens", "float32-stereo"])
def test_variable_length_records_round_trip_exactly(tmp_path, dtype, tail):
    rng = np.random.default_rng(0)
    records = [(rng.standard_normal((int(n), *tail)) * 1000).astype(dtype) for n in rng.integers(0, 400, size=25)]
    labels = rng.integers(0, 3, size=25)
    split = one_split_folder(tmp_path, RecordLayout(dtype, (None, *tail)), [(records[:10], labels[:10]),
                                                                          (records[10:], labels[10:])])
    assert split.count == 25 and split.layout.ragged
    x, y = split.read(0, 25)
    assert [r.dtype for r in x] == [np.dtype(dtype)] * 25
    assert all(np.array_equal(a, b) for a, b in zip(x, records)) and np.array_equal(y, labels)
    picked = np.array([24, 3, 11, 10, 0])  # across both shards, in any order
    gx, gy = gather_rows(split, picked)
    assert all(np.array_equal(a, records[i]) for a, i in zip(gx, picked)) and np.array_equal(gy, labels[picked])


@pytest.mark.fast
def test_a_record_of_the_wrong_shape_or_count_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(DataError, match=r"does not fit"):
        write_shard(tmp_path, "train", 0, [np.zeros((5, 2), np.float32)], [0], RecordLayout("float32", (None, 3)))
    with pytest.raises(DataError, match=r"3 records but 2 labels"):
        write_shard(tmp_path, "train", 0, np.zeros((3, 1, 4, 4), np.uint8), [0, 1], RecordLayout("uint8", (1, 4, 4)))
    assert not list(tmp_path.rglob("*.npy"))


# --- integrity --------------------------------------------------------------------------------------------------

@pytest.fixture
def two_shards(tmp_path) -> Path:
    layout = RecordLayout("uint8", (1, 4, 4))
    data = np.arange(20 * 16, dtype=np.uint8).reshape(20, 1, 4, 4)
    one_split_folder(tmp_path, layout, [(data[:10], np.arange(10)), (data[10:], np.arange(10))])
    return tmp_path


@pytest.mark.fast
@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_a_corrupt_shard_fails_with_one_line_naming_it(two_shards, damage):
    path = two_shards / "train" / "00001.x.npy"
    data = bytearray(path.read_bytes())
    if damage == "flipped byte":
        data[-1] ^= 0xFF
    else:
        del data[-7:]
    path.write_bytes(bytes(data))
    split = SplitShards(two_shards, "train", load_manifest(two_shards))
    split.read(0, 10)  # the first shard is sound
    with pytest.raises(DataError) as caught:
        split.read(0, 20)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: corrupt shard") and "tuneline stage prepare" in message
    with pytest.raises(DataError, match="corrupt shard"):
        SplitReader(two_shards, "train", torch.device("cpu"), DataAccess(resident_max_mb=0))  # checked on open


@pytest.mark.fast
def test_a_reader_keeps_at_most_two_shards_mapped(tmp_path):
    layout = RecordLayout("uint8", (1, 2, 2))
    split = one_split_folder(tmp_path, layout, [(np.full((3, 1, 2, 2), i, np.uint8), np.full(3, i)) for i in range(6)])
    x, y = split.read(0, 18)
    assert np.array_equal(y, np.repeat(np.arange(6), 3)) and np.array_equal(x[:, 0, 0, 0], y)
    assert len(split._open) <= OPEN_SHARDS
    assert sorted(split.batches(4).__next__()[1]) == [0, 0, 0, 1]


# --- a folder an older release prepared -------------------------------------------------------------------------

def old_release_folder(root: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """What prepare wrote before shards: whole-split `.npy` pairs and a manifest listing their sha256 (gray
    splits as [N, H, W], as the oldest releases wrote them)."""
    rng = np.random.default_rng(1)
    root.mkdir()
    arrays, files = {}, {}
    for split, n in (("train", 40), ("val", 8), ("test", 12)):
        arrays[split] = rng.integers(0, 256, size=(n, 6, 6), dtype=np.uint8)
        for kind, array in (("images", arrays[split]), ("labels", np.arange(n, dtype=np.int64) % 3)):
            np.save(root / f"{split}-{kind}.npy", array)
            files[f"{split}-{kind}.npy"] = shards_module.sha256_file(root / f"{split}-{kind}.npy")
    manifest = {"source": "mnist", "classes": ["a", "b", "c"], "image_shape": [1, 6, 6],
                "normalization": {"mean": [0.5], "std": [0.25]}, "counts": {"train": 40, "val": 8, "test": 12},
                "files": files}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root, arrays


@pytest.mark.fast
def test_a_folder_prepared_by_the_previous_release_is_read_as_it_is(tmp_path):
    root, arrays = old_release_folder(tmp_path / "prepared")
    for split, expected in arrays.items():
        images, labels = load_split(root, split)
        assert images.shape == (len(expected), 1, 6, 6)
        assert np.array_equal(images[:, 0].numpy(), expected) and np.array_equal(labels.numpy(), np.arange(len(expected)) % 3)
    streamed = SplitReader(root, "train", torch.device("cpu"), DataAccess(resident_max_mb=0))
    assert not streamed.resident and torch.equal(torch.cat([x for x, _ in streamed.batches(16)])[:, 0],
                                                 torch.from_numpy(arrays["train"]))


@pytest.mark.fast
def test_an_old_folder_with_a_changed_file_or_a_newer_format_is_refused_not_misread(tmp_path):
    root, arrays = old_release_folder(tmp_path / "prepared")
    np.save(root / "val-images.npy", arrays["val"][::-1])  # same shape, other order: only the checksum tells
    with pytest.raises(DataError, match=r"val-images\.npy: corrupt shard"):
        load_split(root, "val")
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**manifest, "format": "tuneline-shards/9"}))
    with pytest.raises(DataError, match=r"format 'tuneline-shards/9' is not 'tuneline-shards/1'"):
        open_split(root, "train")


# --- the epoch plan ---------------------------------------------------------------------------------------------

@pytest.mark.fast
def test_an_epoch_plan_visits_every_record_once_in_an_order_set_by_its_seed():
    counts = [50, 50, 50, 37]
    plan = EpochPlan.make(counts, seed=3, batch_size=16)
    assert sorted(plan.rows.tolist()) == list(range(187)) and plan.steps == -(-187 // 16)
    assert np.array_equal(plan.rows, EpochPlan.make(counts, seed=3, batch_size=16).rows)
    assert not np.array_equal(plan.rows, EpochPlan.make(counts, seed=4, batch_size=16).rows)
    assert len(EpochPlan.make(counts, seed=3, batch_size=16, limit=40).rows) == 40


@pytest.mark.fast
@pytest.mark.parametrize("counts", [[30] * 8, [30, 30, 30, 30, 30, 12], [25, 31, 17, 40, 22]])
def test_ddp_ranks_plan_disjoint_shards_that_cover_the_split(counts):
    for seed in range(5):
        plans = [EpochPlan.make(counts, seed, batch_size=8, rank=r, world=2) for r in range(2)]
        read = [p.shards_read(counts) for p in plans]
        assert not read[0] & read[1] and read[0] | read[1] == set(range(len(counts)))
        assert set(np.concatenate([p.rows for p in plans]).tolist()) == set(range(sum(counts)))
        assert plans[0].steps == plans[1].steps == EpochPlan.make(counts, 0, 8, 0, 2).steps  # any draw, any rank


def _rank_reads(rank: int, world: int, prepared: str, out: str, port: int) -> None:
    """One gloo rank: the rows and shards its streaming reader really read in two epochs, gathered on rank 0."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        reader = SplitReader(Path(prepared), "train", torch.device("cpu"), DataAccess(resident_max_mb=0, loader_workers=0))
        touched, epochs = [], []
        real_gather = reader.shards.gather
        reader.shards.gather = lambda index, rows: touched.append(index) or real_gather(index, rows)
        for epoch in range(2):
            plan = EpochPlan.make(reader.shard_counts, seed=epoch, batch_size=32, rank=rank, world=world)
            seen = torch.cat([y for _, y in reader.walk(plan)])
            epochs.append({"labels": seen.tolist(), "rows": plan.rows.tolist(), "shards": sorted(set(touched))})
            touched.clear()
        everyone = [None] * world
        torch.distributed.all_gather_object(everyone, epochs)
        if rank == 0:
            Path(out).write_text(json.dumps(everyone))
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_ranks_stream_disjoint_shards_covering_the_split_once_per_epoch(tmp_path):
    prepared = tmp_path / "prepared"
    raw = write_raw_dir(tmp_path / "raw", TINY_CLASSES, {"train": 1000, "t10k": 50})
    run_prepare(DataConfig(shard_mb=0.1), raw, prepared)  # 0.1 MB: 1000 images of 28x28 in 8 or so shards
    counts = [s.count for s in open_split(prepared, "train").shards]
    assert len(counts) >= 4
    out = tmp_path / "reads.json"
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_rank_reads, args=(2, str(prepared), str(out), port), nprocs=2, join=True)
    ranks = json.loads(out.read_text())
    train_labels = open_split(prepared, "train").labels()
    for epoch in range(2):
        shards = [set(ranks[r][epoch]["shards"]) for r in range(2)]
        assert not shards[0] & shards[1], "the ranks read a shard in common"
        assert shards[0] | shards[1] == set(range(len(counts))), "a shard was read by no rank"
        rows = [ranks[r][epoch]["rows"] for r in range(2)]
        assert set(rows[0]) | set(rows[1]) == set(range(sum(counts))), "a record was not trained on"
        for r in range(2):  # what each rank read is what its plan named
            assert ranks[r][epoch]["labels"] == train_labels[rows[r]].tolist()
    assert ranks[0][0]["rows"] != ranks[0][1]["rows"]


# --- streaming trains what resident trains ------------------------------------------------------------------------

MODEL = ModelConfig(arch="seed_mlp", dropout=0.3)  # dropout: a loader must not draw from the global RNG
CFG = TrainConfig(epochs=2, batch_size=64, device="cpu", deterministic=True, augment_rotate_deg=5)


def trained(prepared: Path, out: Path, access: DataAccess, cfg: TrainConfig = CFG) -> dict[str, torch.Tensor]:
    run_train(MODEL, cfg, prepared, out / "model.pt", out / "history.csv", LINEAGE, checkpoint_dir=out / "ckpt",
              show_progress=False, access=access)
    return torch.load(out / "model.pt", weights_only=True)["state_dict"]


def test_streaming_trains_bit_identical_weights_run_to_run_and_to_resident_with_any_worker_count(tmp_path):
    prepared = tmp_path / "prepared"
    run_prepare(DataConfig(shard_mb=0.2), write_raw_dir(tmp_path / "raw", TINY_CLASSES, {"train": 1000, "t10k": 50}),
                prepared)
    assert len(open_split(prepared, "train").shards) >= 3  # batches cross shard boundaries
    streamed = trained(prepared, tmp_path / "s1", DataAccess(resident_max_mb=0, loader_workers=0))
    again = trained(prepared, tmp_path / "s2", DataAccess(resident_max_mb=0, loader_workers=0))
    workers = trained(prepared, tmp_path / "s3", DataAccess(resident_max_mb=0, loader_workers=2))
    resident = trained(prepared, tmp_path / "r", DataAccess(resident_max_mb=1e6))
    for other in (again, workers, resident):
        assert all(torch.equal(streamed[k], other[k]) for k in streamed)
    other_seed = trained(prepared, tmp_path / "o", DataAccess(resident_max_mb=0),
                         CFG.model_copy(update={"seed": 1}))
    assert not all(torch.equal(streamed[k], other_seed[k]) for k in streamed)
