"""The resume record (tasks/train/resume.py): it round-trips everything a run continues from, refuses a checkpoint
of another run saying what differs, reads checkpoints in the layout older releases wrote, and a run stopped
mid-way then resumed ends with the weights of one that never stopped (the SIGKILL version, on real MNIST, is
tests/tasks/train/test_train_resume.py)."""

import copy
from pathlib import Path

import pytest
import torch

from tuneline.core.config.model import ModelConfig
from tuneline.core.config.train import TrainConfig
from tuneline.tasks.data.prepare import load_manifest
from tuneline.tasks.data.stream import DataAccess
from tuneline.tasks.lineage import Lineage
from tuneline.tasks.model.checkpoint import save_checkpoint
from tuneline.tasks.train.epochs import Trainee
from tuneline.tasks.train.loop import OneModel, run_train
from tuneline.tasks.train.resume import RESUME_FORMAT, ResumeMismatch, ResumeState, identity_key, run_identity
from tuneline.tasks.train.setup import prepare_run

MODEL = ModelConfig(arch="seed_mlp", dropout=0.3)  # dropout: the global RNG must resume too
CFG = TrainConfig(epochs=3, batch_size=64, device="cpu", deterministic=True, scheduler="step",
                  augment_rotate_deg=5, optimizer="adam")  # augmentation: the data stream must resume too
LINEAGE = Lineage("tiny.dir", "p" * 16, "c" * 40)


def started_run(prepared: Path, steps: int):
    """A run set up as run_train sets one up, trained `steps` batches, with some early-stopping bookkeeping."""
    with prepare_run(MODEL, CFG, prepared) as run:
        one = OneModel(run.model, CFG, run.ctx, run.device, run.steps_per_epoch)
        stream = run.data.stream
        for _, (x, y) in zip(range(steps), run.data.train.walk(run.data.plan(stream))):
            one.step(run.data.augment(x, stream), y)
    trainee = Trainee(CFG)
    if steps:
        trainee.history = [{"epoch": 1, "val_accuracy": 0.5}]
        trainee.best_metric, trainee.bad_epochs, trainee.best_state = 0.5, 1, one.weights(0)
    return run, one, trainee


@pytest.mark.fast
def test_a_resume_state_round_trips_everything_a_run_continues_from(tiny_prepared_dir, tmp_path):
    run, one, trainee = started_run(tiny_prepared_dir, steps=3)
    identity = run_identity(MODEL, CFG, run.manifest)
    ResumeState.capture(identity, 1, run.model, one.optimizer, one.schedule, run.data.generator, run.device,
                        trainee).save(tmp_path / "last.pt")
    next_draws = torch.rand(4), torch.randperm(50, generator=run.data.generator)  # what the run would draw next

    fresh_run, fresh, fresh_trainee = started_run(tiny_prepared_dir, steps=0)
    torch.manual_seed(12345)  # the resuming process's own RNG must not matter
    state = ResumeState.load(tmp_path / "last.pt", identity)
    assert state.epoch == 1 and state.identity == identity
    state.restore(fresh_run.model, fresh.optimizer, fresh.schedule, fresh_run.data.generator, fresh_run.device,
                  fresh_trainee)

    assert torch.equal(torch.rand(4), next_draws[0])
    assert torch.equal(torch.randperm(50, generator=fresh_run.data.generator), next_draws[1])
    saved, restored = run.model.state_dict(), fresh_run.model.state_dict()
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
    a, b = one.optimizer.state_dict()["state"], fresh.optimizer.state_dict()["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[i]["exp_avg"], b[i]["exp_avg"]) for i in a)
    assert fresh.schedule.state_dict() == one.schedule.state_dict()
    assert fresh_trainee.history == trainee.history
    assert (fresh_trainee.best_metric, fresh_trainee.bad_epochs) == (0.5, 1)
    assert all(torch.equal(fresh_trainee.best_state[k], trainee.best_state[k]) for k in trainee.best_state)


@pytest.mark.fast
def test_a_checkpoint_of_another_run_is_refused_saying_what_differs(tiny_prepared_dir, tmp_path):
    run, one, trainee = started_run(tiny_prepared_dir, steps=1)
    path = tmp_path / "last.pt"
    ResumeState.capture(run_identity(MODEL, CFG, run.manifest), 1, run.model, one.optimizer, one.schedule,
                        run.data.generator, run.device, trainee).save(path)

    other_lr = run_identity(MODEL, CFG.model_copy(update={"lr": 0.01}), run.manifest)
    with pytest.raises(ResumeMismatch, match=rf"{path}: a resume checkpoint of another run \(train\.lr: {CFG.lr} in "
                                             r"the checkpoint, 0\.01 in this run\)"):
        ResumeState.load(path, other_lr)
    changed = copy.deepcopy(run.manifest)
    changed["splits"]["train"]["shards"][0]["sha256"]["x"] = "0" * 64
    other_data = run_identity(MODEL, CFG, changed)
    with pytest.raises(ResumeMismatch, match=r"data\.train/00000\.x\.npy: '[0-9a-f]{64}' in the checkpoint, '0+' in "):
        ResumeState.load(path, other_data)
    # Whether to resume is not part of what is trained: train.resume does not change the identity.
    assert run_identity(MODEL, CFG.model_copy(update={"resume": False}), run.manifest) == \
        run_identity(MODEL, CFG, run.manifest)

    save_checkpoint(tmp_path / "model.pt", run.model)  # a final model where the resume checkpoint belongs
    with pytest.raises(ResumeMismatch, match=r"not a resume checkpoint \(format 'tuneline\.checkpoint/1'"):
        ResumeState.load(tmp_path / "model.pt", other_lr)


@pytest.mark.fast
def test_a_checkpoint_in_the_layout_older_releases_wrote_still_resumes(tiny_prepared_dir, tmp_path):
    run, one, trainee = started_run(tiny_prepared_dir, steps=1)
    identity = run_identity(MODEL, CFG, run.manifest)
    old = {  # what tasks/train/loop.py's _save_resume wrote before the record (commit 1d19023)
        "format": RESUME_FORMAT, "key": identity_key(identity), "epoch": 2,
        "model": run.model.state_dict(), "optimizer": one.optimizer.state_dict(), "schedule": one.schedule.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "generator": run.data.generator.get_state(), "cuda": None},
        "history": [], "best_metric": None, "best_state": None, "bad_epochs": 0,
    }
    torch.save(old, tmp_path / "old.pt")
    state = ResumeState.load(tmp_path / "old.pt", identity)
    assert state.epoch == 2 and state.identity is None
    with pytest.raises(ResumeMismatch, match="written by an older release"):
        ResumeState.load(tmp_path / "old.pt", run_identity(MODEL, CFG.model_copy(update={"lr": 0.01}), run.manifest))


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("access", [DataAccess(), DataAccess(resident_max_mb=0, loader_workers=1)],
                         ids=["resident", "streaming"])
def test_a_run_stopped_mid_way_resumes_to_the_weights_of_an_uninterrupted_run(tiny_prepared_dir, tmp_path, access):
    def stop_in_epoch_2(record, model):  # raised before epoch 2's checkpoint: the one after epoch 1 remains
        if record["epoch"] == 2:
            raise Interrupted

    cfg = CFG.model_copy(update={"epochs": 2})
    with pytest.raises(Interrupted):
        run_train(MODEL, cfg, tiny_prepared_dir, tmp_path / "a.pt", tmp_path / "a.csv", LINEAGE,
                  checkpoint_dir=tmp_path / "ckpt", on_epoch=stop_in_epoch_2, access=access)
    identity = run_identity(MODEL, cfg, load_manifest(tiny_prepared_dir))
    assert ResumeState.load(tmp_path / "ckpt" / "last.pt", identity).epoch == 1
    torch.manual_seed(999)  # whatever the process drew since, the resumed run draws what the checkpoint says
    resumed = run_train(MODEL, cfg, tiny_prepared_dir, tmp_path / "a.pt", tmp_path / "a.csv", LINEAGE,
                        checkpoint_dir=tmp_path / "ckpt", access=access)
    straight = run_train(MODEL, cfg, tiny_prepared_dir, tmp_path / "b.pt", tmp_path / "b.csv", LINEAGE,
                         checkpoint_dir=tmp_path / "other", access=access)

    assert resumed.resumed_from_epoch == 1 and straight.resumed_from_epoch == 0
    untimed = lambda history: [{k: v for k, v in h.items() if k not in ("seconds", "images_per_s")} for h in history]
    assert untimed(resumed.history) == untimed(straight.history)
    a = torch.load(tmp_path / "a.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)



class Stopped(Exception):
    pass


@pytest.mark.parametrize("access", [DataAccess(), DataAccess(resident_max_mb=0)], ids=["resident", "streaming"])
def test_a_run_stopped_mid_epoch_resumes_from_its_step_checkpoint_to_the_weights_of_an_uninterrupted_run(
        tiny_prepared_dir, tmp_path, access, monkeypatch):
    cfg = CFG.model_copy(update={"epochs": 2, "checkpoint_every_steps": 5})  # 15 steps an epoch: 5 and 10 inside
    saved = []
    real_save = ResumeState.save

    def save_then_maybe_stop(self, path):
        real_save(self, path)
        saved.append((self.epoch, (self.mid_epoch or {}).get("step")))
        if saved[-1] == (1, 10):  # epoch 2, 10 steps in: the process "dies" right after this checkpoint
            raise Stopped

    monkeypatch.setattr(ResumeState, "save", save_then_maybe_stop)
    with pytest.raises(Stopped):
        run_train(MODEL, cfg, tiny_prepared_dir, tmp_path / "a.pt", tmp_path / "a.csv", LINEAGE,
                  checkpoint_dir=tmp_path / "ckpt", access=access)
    assert saved == [(0, 5), (0, 10), (1, None), (1, 5), (1, 10)]
    monkeypatch.setattr(ResumeState, "save", real_save)
    torch.manual_seed(999)  # whatever the process drew since, the resumed run draws what the checkpoint says
    resumed = run_train(MODEL, cfg, tiny_prepared_dir, tmp_path / "a.pt", tmp_path / "a.csv", LINEAGE,
                        checkpoint_dir=tmp_path / "ckpt", access=access)
    straight = run_train(MODEL, CFG.model_copy(update={"epochs": 2}), tiny_prepared_dir, tmp_path / "b.pt",
                         tmp_path / "b.csv", LINEAGE, checkpoint_dir=tmp_path / "other", access=access)
    assert resumed.resumed_from_epoch == 1
    untimed = lambda history: [{k: v for k, v in h.items() if k not in ("seconds", "images_per_s")} for h in history]
    assert untimed(resumed.history) == untimed(straight.history)
    a = torch.load(tmp_path / "a.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
