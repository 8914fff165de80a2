import csv

import pytest
import torch

from tuneline.tasks.model.checkpoint import load_checkpoint
from tuneline.core.config.model import ModelConfig
from tuneline.core.config.train import TrainConfig
from tuneline.tasks.lineage import Lineage
from tuneline.tasks.train.loop import DivergedError, HISTORY_FIELDS, run_train

LINEAGE = Lineage("abc123.dir", "p" * 16, "c" * 40)


def test_training_learns_and_writes_a_self_describing_checkpoint(small_checkpoint, small_prepared_dir):
    model, checkpoint = load_checkpoint(small_checkpoint)
    assert checkpoint["lineage"] == LINEAGE.to_dict()
    assert checkpoint["model_args"]["arch"] == "lean_cnn" and checkpoint["classes"] == [str(d) for d in range(10)]
    assert checkpoint["config"]["train"]["epochs"] == 2
    history = checkpoint["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[-1]["val_accuracy"] >= 0.85  # 2 epochs on 2,750 images
    assert history[1]["train_loss"] < history[0]["train_loss"]
    rows = list(csv.DictReader(open(small_checkpoint.parent / "history.csv")))
    assert tuple(rows[0]) == HISTORY_FIELDS and len(rows) == 2
    # The default one-cycle schedule: the history records each epoch's starting lr, rising from lr/25 toward 4e-3.
    assert float(rows[0]["lr"]) == pytest.approx(4e-3 / 25) and float(rows[0]["lr"]) < float(rows[1]["lr"]) <= 4e-3


def test_same_seed_same_model_on_cpu(tmp_path, small_prepared_dir):
    cfg = TrainConfig(epochs=1, batch_size=256, device="cpu")
    a = run_train(ModelConfig(arch="seed_mlp"), cfg, small_prepared_dir, tmp_path / "a.pt", tmp_path / "a.csv", LINEAGE)
    b = run_train(ModelConfig(arch="seed_mlp"), cfg, small_prepared_dir, tmp_path / "b.pt", tmp_path / "b.csv", LINEAGE)
    assert a.history[0]["val_loss"] == b.history[0]["val_loss"]
    state_a = torch.load(tmp_path / "a.pt", weights_only=True)["state_dict"]
    state_b = torch.load(tmp_path / "b.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_divergence_fails_within_one_epoch_and_saves_nothing(tmp_path, small_prepared_dir):
    cfg = TrainConfig(epochs=3, optimizer="sgd", lr=1e6, momentum=0.9, device="cpu", scheduler="none")
    with pytest.raises(DivergedError, match=r"loss diverged to (nan|inf|\S+) in epoch 1 .*lower train.lr"):
        run_train(ModelConfig(arch="seed_mlp"), cfg, small_prepared_dir, tmp_path / "m.pt", tmp_path / "h.csv", LINEAGE)
    assert not (tmp_path / "m.pt").exists() and not (tmp_path / "h.csv").exists()
    assert list(tmp_path.iterdir()) == []


def test_cuda_requested_without_a_gpu_is_an_error(tmp_path, small_prepared_dir):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(RuntimeError, match="train.device=cuda but no CUDA device"):
        run_train(ModelConfig(), TrainConfig(device="cuda"), small_prepared_dir, tmp_path / "m.pt", tmp_path / "h.csv", LINEAGE)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trains_on_cuda(tmp_path, small_prepared_dir):
    result = run_train(ModelConfig(), TrainConfig(epochs=1, device="cuda"), small_prepared_dir,
                       tmp_path / "m.pt", tmp_path / "h.csv", LINEAGE)
    assert result.device.startswith("cuda") and result.best_val_accuracy > 0.8
