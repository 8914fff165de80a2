"""train.ema: the run validates, keeps and ships the moving average of its weights; training itself is unchanged."""

import pytest
import torch

from tuneline.core.config.model import ModelConfig
from tuneline.core.config.train import TrainConfig
from tuneline.tasks.data.prepare import load_split
from tuneline.tasks.lineage import Lineage
from tuneline.tasks.model.checkpoint import load_checkpoint
from tuneline.tasks.train.averaging import WeightAverage, warmed_decay
from tuneline.tasks.train.loop import predict_logits, run_train

LINEAGE = Lineage("abc123.dir", "p" * 16, "c" * 40)


@pytest.mark.fast
def test_the_average_follows_the_live_weights_with_a_warmed_up_decay():
    live = torch.nn.BatchNorm1d(2)
    average = WeightAverage(live, decay=0.9)
    expected = live.weight.detach().clone()
    for step, value in enumerate((1.0, 3.0, -2.0), start=1):
        with torch.no_grad():
            live.weight.fill_(value)
        live.num_batches_tracked += 5
        average.update()
        d = min(0.9, (1 + step) / (10 + step))
        expected = d * expected + (1 - d) * value
    assert warmed_decay(0.9, 1) == pytest.approx(2 / 11) and warmed_decay(0.9, 1000) == 0.9
    assert torch.allclose(average.module.weight, expected)
    assert int(average.module.num_batches_tracked) == 15  # a count: copied, not averaged
    assert not average.module.weight.requires_grad and average.updates == 3


def test_the_shipped_and_validated_model_is_the_average_and_training_is_unchanged(tmp_path, small_prepared_dir):
    cfg = TrainConfig(epochs=2, batch_size=64, device="cpu", deterministic=True, restore_best=False, seed=0,
                      precision="fp32")
    runs = {}
    for ema in (0.0, 0.9):
        runs[ema] = run_train(ModelConfig(arch="lean_cnn"), cfg.model_copy(update={"ema": ema}), small_prepared_dir,
                              tmp_path / f"{ema}.pt", tmp_path / f"{ema}.csv", LINEAGE)
    # The average is read off the training, never fed back: the live weights took the same steps.
    assert [h["train_loss"] for h in runs[0.0].history] == [h["train_loss"] for h in runs[0.9].history]
    live, _ = load_checkpoint(tmp_path / "0.0.pt")
    averaged, _ = load_checkpoint(tmp_path / "0.9.pt")
    weight = "net.features.0.weight"
    assert not torch.equal(live.state_dict()[weight], averaged.state_dict()[weight])
    # What was validated each epoch is what was saved: the saved model scores the last epoch's val accuracy exactly.
    images, labels = load_split(small_prepared_dir, "val")
    for model, run in ((averaged, runs[0.9]), (live, runs[0.0])):
        accuracy = float((predict_logits(model, images, 500).argmax(1) == labels).float().mean())
        assert accuracy == pytest.approx(run.history[-1]["val_accuracy"], abs=1e-6)
