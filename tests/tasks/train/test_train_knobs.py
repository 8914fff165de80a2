"""Each training knob changes training as it should, on a small slice of real MNIST."""

import math

import pytest
import torch

from tuneline.tasks.data.augment import augment_batch
from tuneline.tasks.model.checkpoint import load_checkpoint
from tuneline.core.config.model import ModelConfig
from tuneline.core.config.params import build_params
from tuneline.core.config.train import TrainConfig
from tuneline.tasks.lineage import Lineage
from tuneline.tasks.model.architectures import ModelArgs, build_model
from tuneline.tasks.train.optim import LRSchedule, build_optimizer
from tuneline.tasks.data.prepare import load_split
from tuneline.tasks.train.loop import DivergedError, predict_logits, run_train
from tuneline.tasks.tune.space import validate_space

LINEAGE = Lineage("abc123.dir", "p" * 16, "c" * 40)
MLP = ModelConfig(arch="seed_mlp", dropout=0.0)


def train(tmp_path, prepared, name="m", model_cfg=MLP, **knobs):
    # One plain epoch: the knob under test alone, not the default recipe's augmentation and weight decay.
    plain = {"augment_rotate_deg": 0.0, "augment_translate": 0.0, "augment_scale": 0.0, "weight_decay": 0.0}
    cfg = TrainConfig(**{"epochs": 1, "batch_size": 128, "device": "cpu", "scheduler": "none", **plain, **knobs})
    result = run_train(model_cfg, cfg, prepared, tmp_path / f"{name}.pt", tmp_path / f"{name}.csv", LINEAGE)
    model, _ = load_checkpoint(tmp_path / f"{name}.pt")
    return result, model


def lrs_over(cfg: TrainConfig, steps_per_epoch: int, epochs_metric=None) -> list[float]:
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(cfg, model)
    schedule = LRSchedule(cfg, optimizer, steps_per_epoch)
    lrs = []
    for epoch in range(cfg.epochs):
        for _ in range(steps_per_epoch):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.after_step()
        schedule.after_epoch(epochs_metric[epoch] if epochs_metric else 0.5)
    return lrs


# --- optimizers ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer, lr, cls", [
    ("sgd", 0.05, torch.optim.SGD), ("adam", 1e-3, torch.optim.Adam),
    ("adamw", 1e-3, torch.optim.AdamW), ("rmsprop", 1e-3, torch.optim.RMSprop),
])
def test_each_optimizer_trains(tmp_path, small_prepared_dir, optimizer, lr, cls):
    cfg = TrainConfig(optimizer=optimizer, lr=lr, nesterov=True)
    assert isinstance(build_optimizer(cfg, torch.nn.Linear(2, 2)), cls)
    result, _ = train(tmp_path, small_prepared_dir, optimizer=optimizer, lr=lr, nesterov=True)
    assert result.history[0]["val_accuracy"] > 0.7  # one epoch on 2,750 images; chance is 0.1


def test_sgd_nesterov_and_momentum_are_passed():
    group = build_optimizer(TrainConfig(optimizer="sgd", momentum=0.8, nesterov=True), torch.nn.Linear(2, 2)).param_groups[0]
    assert group["nesterov"] is True and group["momentum"] == 0.8


def test_adam_eps_reaches_the_optimizer_and_is_tunable(tmp_path, small_prepared_dir):
    # Packed trials apply it too: tests/tasks/train/test_packing_roles.py trains eps packed against its solo twin.
    for optimizer in ("adam", "adamw"):
        group = build_optimizer(TrainConfig(optimizer=optimizer, eps=1e-3), torch.nn.Linear(2, 2)).param_groups[0]
        assert group["eps"] == 1e-3
    params = build_params({}, {"tune.space": {"train.eps": {"type": "float", "low": 1e-8, "high": 1e-2, "log": True}}})
    validate_space(params, params.tune.space)
    # eps far above sqrt(v) turns Adam's step lr * m / (sqrt(v) + eps) into about lr * m / eps: it barely learns.
    default, _ = train(tmp_path, small_prepared_dir, "default")
    large, _ = train(tmp_path, small_prepared_dir, "large", eps=1.0)
    assert large.history[0]["val_accuracy"] < default.history[0]["val_accuracy"] - 0.2


# --- schedules -----------------------------------------------------------------------------------------------

def test_warmup_ramps_the_lr_linearly_then_hands_over():
    lrs = lrs_over(TrainConfig(lr=0.1, epochs=2, scheduler="none", warmup_epochs=1.0), steps_per_epoch=10)
    assert lrs[:10] == pytest.approx([0.1 * (i + 1) / 10 for i in range(10)])
    assert lrs[10:] == pytest.approx([0.1] * 10)


def test_step_and_exponential_are_per_epoch_staircases():
    step = lrs_over(TrainConfig(lr=0.1, epochs=4, scheduler="step", step_size=2, gamma=0.5), steps_per_epoch=3)
    assert step[::3] == pytest.approx([0.1, 0.1, 0.05, 0.05])
    expo = lrs_over(TrainConfig(lr=0.1, epochs=3, scheduler="exponential", gamma=0.5), steps_per_epoch=3)
    assert expo[::3] == pytest.approx([0.1, 0.05, 0.025])
    assert expo[:3] == pytest.approx([0.1] * 3)


def test_cosine_decays_smoothly_to_zero_and_composes_with_warmup():
    lrs = lrs_over(TrainConfig(lr=0.1, epochs=4, scheduler="cosine", warmup_epochs=1), steps_per_epoch=10)
    assert lrs[0] == pytest.approx(0.01 * math.cos(0) * 0.5 * 2, rel=1e-6)  # first warm-up step: 1/10 of lr
    assert max(lrs) <= 0.1 and lrs[-1] < 0.001
    assert all(b <= a for a, b in zip(lrs[10:], lrs[11:]))


def test_onecycle_peaks_at_pct_start():
    lrs = lrs_over(TrainConfig(lr=0.1, epochs=4, scheduler="onecycle", onecycle_pct_start=0.25), steps_per_epoch=10)
    assert lrs[0] == pytest.approx(0.1 / 25)
    assert max(lrs) == pytest.approx(0.1) and lrs.index(max(lrs)) == 10
    assert lrs[-1] < 0.001


def test_plateau_decays_after_patience_without_improvement():
    lrs = lrs_over(TrainConfig(lr=0.1, epochs=4, scheduler="plateau", plateau_patience=1, plateau_factor=0.5),
                   steps_per_epoch=2, epochs_metric=[0.9, 0.9, 0.9, 0.9])
    assert lrs[::2] == pytest.approx([0.1, 0.1, 0.1, 0.05])


# --- regularisation ------------------------------------------------------------------------------------------

def test_l1_shrinks_weights(tmp_path, small_prepared_dir):
    _, plain = train(tmp_path, small_prepared_dir, "plain")
    _, sparse = train(tmp_path, small_prepared_dir, "l1", l1=1e-3)
    weight_mass = lambda m: sum(p.abs().sum().item() for n, p in m.named_parameters() if p.dim() > 1)  # noqa: E731
    assert weight_mass(sparse) < 0.7 * weight_mass(plain)


def test_weight_decay_shrinks_weights(tmp_path, small_prepared_dir):
    _, plain = train(tmp_path, small_prepared_dir, "plain", optimizer="adamw", epochs=2)
    _, decayed = train(tmp_path, small_prepared_dir, "wd", optimizer="adamw", epochs=2, weight_decay=5.0)
    norm = lambda m: sum(p.norm().item() ** 2 for n, p in m.named_parameters() if p.dim() > 1)  # noqa: E731
    assert norm(decayed) < 0.9 * norm(plain)


def test_label_smoothing_makes_predictions_less_confident(tmp_path, small_prepared_dir):
    images, _ = load_split(small_prepared_dir, "test")
    confidence = {}
    for smoothing in (0.0, 0.3):
        _, model = train(tmp_path, small_prepared_dir, f"ls{smoothing}", epochs=2, label_smoothing=smoothing)
        confidence[smoothing] = predict_logits(model, images, 1000).softmax(1).max(1).values.mean().item()
    assert confidence[0.3] < confidence[0.0] - 0.05


def test_dropout_rate_reaches_the_model():
    model = build_model(ModelArgs("seed_cnn", 0.3, 10, (1, 28, 28), 0.13, 0.31))
    assert [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)] == [0.3]
    x = torch.rand(8, 1, 28, 28) * 255
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_gradient_clipping_limits_the_update(tmp_path, small_prepared_dir):
    args = ModelArgs("seed_mlp", 0.0, 10, (1, 28, 28), 0.1307, 0.3081)
    torch.manual_seed(0)
    initial = build_model(args).state_dict()  # run_train seeds the same way, so this is its start point
    moved = {}
    for clip in (0.0, 1e-3):
        _, model = train(tmp_path, small_prepared_dir, f"clip{clip}", optimizer="sgd", lr=0.1, momentum=0.0, grad_clip=clip)
        moved[clip] = sum((model.state_dict()[k] - initial[k]).norm().item() for k in initial)
    # With SGD, lr 0.1 and 22 steps of norm <= 1e-3, the weights move by at most ~2.2e-3 in total per tensor.
    assert moved[1e-3] < 0.02 < moved[0.0]


def test_augmentation_changes_images_but_keeps_them_recognisable(small_checkpoint, small_prepared_dir):
    images, labels = load_split(small_prepared_dir, "test")
    pixels = images.float()
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(augment_batch(pixels, 0, 0, 0, generator), pixels)  # all off: untouched
    augmented = augment_batch(pixels, rotate_deg=10, translate=0.08, scale=0.1, generator=generator)
    assert augmented.shape == pixels.shape
    changed = (augmented - pixels).abs().flatten(1).amax(1) > 1
    assert changed.float().mean() > 0.95
    again = augment_batch(pixels, 10, 0.08, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(again, augmented)  # seeded: reproducible
    model, _ = load_checkpoint(small_checkpoint)
    with torch.no_grad():
        accuracy = (model(augmented).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.75  # the labels still hold for the transformed digits


def test_training_with_augmentation_still_learns(tmp_path, small_prepared_dir):
    result, _ = train(tmp_path, small_prepared_dir, epochs=2, augment_rotate_deg=10, augment_translate=0.1, augment_scale=0.1)
    assert result.history[-1]["val_accuracy"] > 0.8


# --- early stopping, divergence ------------------------------------------------------------------------------

def test_early_stopping_stops_and_restores_the_best(tmp_path, small_prepared_dir):
    # min_delta 1.0: no epoch can improve on the first by that much, so patience 2 ends the run after epoch 3.
    result, _ = train(tmp_path, small_prepared_dir, epochs=10, early_stopping_patience=2, early_stopping_min_delta=1.0)
    assert result.stopped_early and [h["epoch"] for h in result.history] == [1, 2, 3]
    no_stop, _ = train(tmp_path, small_prepared_dir, "full", epochs=4)
    assert not no_stop.stopped_early and len(load_checkpoint(tmp_path / "full.pt")[1]["history"]) == 4


def test_sgd_lr_100_diverges_within_one_epoch(tmp_path, small_prepared_dir):
    with pytest.raises(DivergedError, match=r"loss diverged to \S+ in epoch 1 \(lr 100, optimizer sgd\)"):
        train(tmp_path, small_prepared_dir, optimizer="sgd", lr=100.0, epochs=3)
    assert not (tmp_path / "m.pt").exists()


def test_bn_cnn_trains(tmp_path, small_prepared_dir):
    result, model = train(tmp_path, small_prepared_dir, model_cfg=ModelConfig(arch="bn_cnn", dropout=0.1),
                          lr=3e-3, scheduler="onecycle", epochs=1, ema=0.0)  # one short epoch: the live weights
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert result.history[-1]["val_accuracy"] > 0.85


@pytest.mark.fast
def test_precision_native_is_bf16_exactly_where_the_hardware_computes_it():
    from tuneline.tasks.train.setup import autocast, native_bf16

    cpu = torch.device("cpu")
    hardware = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # AVX512-BF16 or AMX
    assert native_bf16("cpu") is hardware and native_bf16("cuda")
    assert autocast(TrainConfig(precision="native"), cpu)._enabled is hardware
    assert autocast(TrainConfig(precision="auto"), cpu)._enabled is False   # auto: fp32 on any CPU
    assert autocast(TrainConfig(precision="bf16"), cpu)._enabled is True    # asked for: bf16 even where emulated
