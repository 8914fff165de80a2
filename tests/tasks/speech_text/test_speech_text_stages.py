"""Speech and text through the stage functions, in-process, on tiny synthetic sources: fetch, prepare, train,
evaluate, export. The real data sets run through `tuneline run` in tests/flows/test_speech_text_runs.py (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from tuneline.core.audio import fit_length, load_clip
from tuneline.core.config.params import build_params
from tuneline.core.onnx_metadata import read_input_spec, read_tokenizer_json
from tuneline.core.text import Tokenizer
from tuneline.tasks.data.fetch import run_fetch
from tuneline.tasks.data.idx import DataError
from tuneline.tasks.data.prepare import load_manifest, run_prepare
from tuneline.tasks.data.shards import first_records
from tuneline.tasks.evaluate.evaluate import run_evaluate
from tuneline.tasks.lineage import Lineage
from tuneline.tasks.ship.export import run_export
from tuneline.tasks.train.loop import run_train
from tests.tasks.speech_text.synthetic_media import (PITCHES, wav_bytes, write_fsdd_like, write_text_folder,
                                                     write_tone_folder)

pytestmark = pytest.mark.fast

AUDIO = {"data.source": "audio", "data.sample_rate": 8000, "data.val_fraction": 0.2, "model.arch": "audio_cnn",
         "model.dropout": 0.0, "model.kwargs": {"width": 8, "utterance_norm": True},
         "train.epochs": 12, "train.batch_size": 8, "train.optimizer": "adam", "train.lr": 1e-2, "train.scheduler": "none", "gate.min_accuracy": 0.0,
         "gate.min_class_recall": 0.0, "gate.max_ece": 1.0}
TEXT = {"data.source": "text", "data.text_column": ["sentence", "content"], "data.val_fraction": 0.2,
        "data.class_names": {"0": "negative", "1": "positive"}, "model.arch": "text_bow", "model.dropout": 0.0,
        "train.epochs": 8, "train.batch_size": 16, "train.optimizer": "adam", "train.lr": 1e-2, "train.scheduler": "none",
        "gate.min_accuracy": 0.0, "gate.min_class_recall": 0.0, "gate.max_ece": 1.0}


def _pipeline(params, tmp_path: Path) -> tuple[Path, Path, dict]:
    raw, prepared, out = tmp_path / "raw", tmp_path / "prepared", tmp_path / "out"
    out.mkdir()
    run_fetch(params.data, raw, project_dir=tmp_path)
    run_prepare(params.data, raw, prepared)
    run_train(params.model, params.train, prepared, out / "model.pt", out / "history.csv",
              Lineage("test", "test", "test"), show_progress=False)
    run_evaluate(out / "model.pt", prepared, out / "eval.json", out / "confusion.csv", params.gate, params.train)
    run_export(params.export, out / "model.pt", prepared, out / "eval.json", out / "model.onnx", model_name="m")
    return prepared, out / "model.onnx", json.loads((out / "eval.json").read_text())


def test_tones_in_class_folders_at_mixed_rates_go_from_wav_to_an_onnx_model_of_raw_samples(tmp_path):
    write_tone_folder(tmp_path)
    params = build_params({}, {**AUDIO, "data.audio_folder": "tones"})
    prepared, onnx_path, metrics = _pipeline(params, tmp_path)
    manifest = load_manifest(prepared)
    spec = manifest["input_spec"]
    # Every clip resampled to 8 kHz and fitted to the 95th-percentile length (0.2-0.6 s clips), rounded up to 0.05 s.
    assert spec["modality"] == "audio" and spec["audio"]["sample_rate"] == 8000
    assert spec["audio"]["samples"] % 400 == 0 and 3200 <= spec["audio"]["samples"] <= 4800
    assert manifest["classes"] == ["pitch0", "pitch1", "pitch2"] and manifest["record"]["dtype"] == "float32"
    assert metrics["accuracy"] >= 0.9  # three pitches: learnt, not just run
    proto = onnx.load(str(onnx_path))
    graph_input = proto.graph.input[0]
    assert graph_input.name == "samples" and graph_input.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert read_input_spec({p.key: p.value for p in proto.metadata_props}).audio.samples == spec["audio"]["samples"]
    # The stored record of a test clip is what the server would make of the clip's WAV bytes (load_clip + fit_length).
    records, _ = first_records(prepared, "test", 2)
    assert records.shape[1] == spec["audio"]["samples"] and np.abs(records).max() <= 1.0


def test_audio_fitting_pads_the_end_and_keeps_the_middle():
    clip = np.arange(1, 11, dtype=np.float32)
    assert fit_length(clip, 4).tolist() == [4, 5, 6, 7]
    assert fit_length(clip[:3], 5).tolist() == [1, 2, 3, 0, 0]
    stereo = wav_bytes(np.stack([np.full(800, 0.5), np.full(800, -0.1)], 1).astype(np.float32), 16000, channels=2)
    mono = load_clip(stereo, 8000)
    assert mono.shape == (400,) and abs(float(np.median(mono)) - 0.2) < 0.01  # mixed down, then resampled


def test_a_file_name_pattern_and_split_rule_make_fsdds_own_split(tmp_path):
    write_fsdd_like(tmp_path)
    params = build_params({}, {**AUDIO, "data.audio_folder": "recordings",
                               "data.label_pattern": "{label}_{speaker}_{index}", "data.test_rule": "index < 2"})
    fetched = run_fetch(params.data, tmp_path / "raw", project_dir=tmp_path)
    assert fetched.counts == {"train": 36, "test": 12}  # 3 labels x 2 speakers x (6 train + 2 test)
    prepared = run_prepare(params.data, tmp_path / "raw", tmp_path / "prepared")
    assert prepared.manifest["counts"]["test"] == 12 and prepared.manifest["classes"] == ["0", "1", "2"]


def test_a_name_that_does_not_match_the_pattern_is_a_clear_error(tmp_path):
    folder = write_fsdd_like(tmp_path)
    (folder / "stray.wav").write_bytes((folder / "0_ann_0.wav").read_bytes())
    params = build_params({}, {**AUDIO, "data.audio_folder": "recordings", "data.label_pattern": "{label}_{speaker}_{index}"})
    with pytest.raises(DataError, match=r"stray\.wav: the file name does not match data\.label_pattern"):
        run_fetch(params.data, tmp_path / "raw", project_dir=tmp_path)
    assert not (tmp_path / "raw").exists()  # nothing half-written


def test_a_corrupt_clip_names_itself_and_leaves_nothing_behind(tmp_path):
    folder = write_tone_folder(tmp_path)
    (folder / "pitch1" / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage")
    params = build_params({}, {**AUDIO, "data.audio_folder": "tones"})
    with pytest.raises(DataError, match=r"broken\.wav: not a readable WAV, FLAC or OGG file"):
        run_fetch(params.data, tmp_path / "raw", project_dir=tmp_path)
    assert not (tmp_path / "raw").exists()


def test_sentences_train_a_tokenizer_on_train_only_and_the_model_carries_it(tmp_path):
    folder = write_text_folder(tmp_path)
    with (folder / "dev.tsv").open("a") as extra:  # a word seen only in the test split
        extra.write("1\tzyzzyva good\n")
    params = build_params({}, {**TEXT, "data.text_files": "text"})
    prepared, onnx_path, metrics = _pipeline(params, tmp_path)
    manifest = load_manifest(prepared)
    tokenizer = Tokenizer.from_json((prepared / "tokenizer.json").read_text())
    assert manifest["classes"] == ["negative", "positive"] and manifest["counts"]["test"] == 41
    assert tokenizer.sha256 == manifest["input_spec"]["text"]["sha256"]
    assert "zyzzyva" not in tokenizer._impl.get_vocab() and "good" in tokenizer._impl.get_vocab()
    assert metrics["accuracy"] >= 0.9
    proto = onnx.load(str(onnx_path))
    metadata = {p.key: p.value for p in proto.metadata_props}
    spec = read_input_spec(metadata)
    assert proto.graph.input[0].name == "tokens" and spec.modality == "text"
    assert read_tokenizer_json(metadata, spec) == tokenizer.json  # the exact tokenizer, checked by its sha256
    # What prepare stored for a test row is what the model's tokenizer makes of the row's text.
    records, _ = first_records(prepared, "test", 1)
    first = (folder / "dev.tsv").read_text().splitlines()[1].split("\t", 1)[1]
    assert records[0].tolist() == tokenizer.encode([first])[0].tolist()


def test_text_columns_that_disagree_need_naming(tmp_path):
    write_text_folder(tmp_path)
    params = build_params({}, {**TEXT, "data.text_files": "text", "data.text_column": "sentence"})
    with pytest.raises(DataError, match=r"dev\.tsv:2: none of the text columns \['sentence'\]"):
        run_fetch(params.data, tmp_path / "raw", project_dir=tmp_path)


def test_an_image_network_or_image_augmentation_on_audio_is_refused_saying_what_fits(tmp_path):
    write_tone_folder(tmp_path, per_class=4)
    params = build_params({}, {**AUDIO, "data.audio_folder": "tones"})
    run_fetch(params.data, tmp_path / "raw", project_dir=tmp_path)
    run_prepare(params.data, tmp_path / "raw", tmp_path / "prepared")
    for overrides, problem in (({"model.arch": "seed_cnn"}, r"seed_cnn is an image network but the data is audio: "
                                                            r"use one of audio_cnn"),
                               ({"train.augment_flip": True}, r"train\.augment_flip: augmentation for another kind")):
        bad = build_params({}, {**AUDIO, "data.audio_folder": "tones", **overrides})
        with pytest.raises(ValueError, match=problem):
            run_train(bad.model, bad.train, tmp_path / "prepared", tmp_path / "m.pt", tmp_path / "h.csv",
                      Lineage("t", "t", "t"), show_progress=False)


@pytest.mark.parametrize("packing", [None, 2], ids=["one-by-one", "packed"])
def test_tuning_with_pruning_runs_on_audio_one_by_one_and_packed(tmp_path, packing):
    from tuneline.tasks.tune.stage import run_tune

    write_tone_folder(tmp_path, per_class=6)
    params = build_params({}, {**AUDIO, "data.audio_folder": "tones", "tune.enabled": True, "tune.n_trials": 3,
                               "tune.epochs": 2, "tune.pruner": "median", "tune.packing": packing,
                               "tune.space": {"train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}})
    run_fetch(params.data, tmp_path / "raw", project_dir=tmp_path)
    run_prepare(params.data, tmp_path / "raw", tmp_path / "prepared")
    result = run_tune(params, tmp_path / "prepared", tmp_path / "tuning", data_version="tones.dir")
    assert sum(result.states.values()) == 3 and result.states.get("FAIL", 0) == 0
    best = json.loads(result.best_params_path.read_text())["params"]
    assert 1e-3 <= best["train.lr"] <= 1e-2


def test_a_wordpiece_tokenizer_reaches_unseen_words_through_their_pieces_and_sizes_rows_by_its_own_tokens():
    from tuneline.core.text import train_tokenizer

    # Training words share pieces ("watch", "able", "un"); "unwatchable" itself is never seen. (Every letter also
    # occurs inside a word somewhere, as in any real corpus: WordPiece has no piece for a letter it never saw there.)
    texts = ["watchable film", "unfunny film", "unbearable film", "watch it", "able cast", "funny watch",
             "unwise show"] * 20
    word = train_tokenizer(texts, None, vocab_size=200, min_frequency=1, kind="word")
    piece = train_tokenizer(texts, None, vocab_size=200, min_frequency=1, kind="wordpiece")
    unk_word, unk_piece = word._impl.token_to_id("[UNK]"), piece._impl.token_to_id("[UNK]")
    assert unk_word in word.encode(["unwatchable"])[0].tolist()
    ids = [i for i in piece.encode(["unwatchable"])[0].tolist() if i != piece.pad_id]
    assert len(ids) >= 2 and unk_piece not in ids  # pieces, not [UNK]
    # max_length: the 99th percentile of the tokenizer's own counts (rounded up to 8): a long text of words that
    # split into pieces needs more ids as pieces than as words.
    long_texts = ["unwatchable unbearable " * 10] * 100
    assert train_tokenizer(long_texts, None, 200, 1, "word").max_length == 24  # 20 words -> 24
    many = train_tokenizer(long_texts + texts, None, 30, 1, "wordpiece")  # a vocabulary too small for whole words
    pieces = len([i for i in many.encode(long_texts[:1])[0] if i != many.pad_id])  # the longest texts: not cut
    assert 24 < pieces <= many.max_length < pieces + 8


def test_text_cnn_members_learn_from_their_own_losses():
    """Each member's gradient under the train loop's loss is what training it alone (on a third of the loss) gives:
    trained on the loss of their mean logits instead, the members would co-adapt into one wide network."""
    import torch
    import torch.nn.functional as F

    from tuneline.tasks.model.text import text_cnn
    from tuneline.tasks.train.loop import data_loss

    torch.manual_seed(0)
    three = text_cnn(2, 0.0, (8,), members=3, vocab_size=50).train()
    tokens, labels = torch.randint(1, 50, (6, 8)), torch.tensor([0, 1, 1, 0, 1, 0])
    data_loss(three(tokens), labels, 0.0).backward()
    for member in three.members:
        alone = torch.autograd.grad(F.cross_entropy(member(tokens), labels) / 3, member.head[1].weight)[0]
        assert torch.allclose(member.head[1].weight.grad, alone, atol=1e-6)


def test_text_cnn_members_average_independently_initialised_networks(tmp_path):
    import torch

    from tuneline.tasks.model.text import TextCNN, text_cnn

    torch.manual_seed(0)
    one = text_cnn(2, 0.0, (8,), vocab_size=50)
    assert isinstance(one, TextCNN) and "embed.weight" in one.state_dict()  # one CNN: the state dict it always had
    three = text_cnn(2, 0.0, (8,), members=3, vocab_size=50).eval()
    tokens = torch.randint(1, 50, (4, 8))
    logits = [member(tokens) for member in three.members]
    assert not torch.equal(three.members[0].embed.weight, three.members[1].embed.weight)  # each its own init
    assert torch.allclose(three(tokens), sum(logits) / 3, atol=1e-6)
    with pytest.raises(TypeError, match="members must be at least 1"):
        text_cnn(2, 0.0, (8,), members=0, vocab_size=50)
    # One ONNX graph of the three, equal to PyTorch at batch 1, 7 and 32 (the export stage's own parity check).
    from tuneline.tasks.ship.export import check_parity, export_onnx_file

    path = tmp_path / "three.onnx"
    export_onnx_file(three, torch.randint(1, 50, (2, 8)), path, opset=18)
    assert max(check_parity(three, path, torch.randint(0, 50, (32, 8), dtype=torch.int32), atol=1e-4).values()) < 1e-4
