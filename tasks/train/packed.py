"""Packed trials: K configurations of one network trained in one process, in one set of kernels.

A small network leaves a modern GPU mostly idle, and one trial per process pays the whole per-step
overhead (kernel launches, data indexing, augmentation, Python) K times. Here the K models' parameters are
stacked along a new leading dimension (`torch.func.stack_module_state`) and one forward runs all of them
(`vmap` over `functional_call`: the first layer sees the one shared normalised batch, so it runs as one
wide convolution / matmul; later convolutions become grouped convolutions, linear layers batched matmuls
over weights stored input-major so they are read in place). The pack is the stacked strategy of the one
training loop (tasks/train/epochs.py: data order, divergence checks, history, early stopping are run_train's)
and starts from run_train's set-up (tasks/train/setup.py: device, data, streams, model construction); its
optimizer step is tasks/train/optim.py's StackedOptimizer, batched tensor ops whose hyperparameters are
per-model tensors of shape [K]. Inside one pack each model has its own value of every `per_model` setting
(learning rate and schedule, optimizer hyperparameters, L1, label smoothing, dropout rate, seed, divergence
threshold, early stopping, epochs: the roles below).

Each TrainConfig field declares its packing role beside its default (json_schema_extra={"packing": ...}):

    per_model  each member of a pack trains with its own value (tests/tasks/train/test_packing_roles.py trains
               every one of them packed against its solo twin);
    shared     one value for the whole pack; members that differ go to different packs (`group_key`):
               batch size, augmentation, device/precision/determinism, eval batch size. train.compile,
               train.channels_last and train.resume only choose kernels or what is on disk, not what is
               trained: a pack runs its own stacked kernels and keeps no checkpoints;
    solo       packed training does not implement it: a config that sets it away from its default trains
               alone (`pack_capacity` is 1, so the tuner runs it with run_train) instead of being ignored.

A field without a role fails `group_key` (and the test): a new knob cannot be silently dropped by packs.
Besides the shared fields, a pack shares the architecture and the optimizer family (sgd | adam/adamw |
rmsprop). Data order: one permutation per epoch and one augmentation draw per batch, driven by `data_seed`
(default: the first member's train.seed) for the whole pack, or with data_seed="own" (the tuner) by each
member's own train.seed, members of one seed sharing a batch. A member whose seed equals its stream's seed
therefore trains like `run_train` with that seed. A pack given `refill` takes new members into freed slots at
epoch boundaries; each counts its own epochs, schedule and optimizer steps from 0 and walks its own stream
(rows on different streams get one batch each: [K, B, ...]). With dropout > 0 the dropout masks are drawn for
the whole pack (vmap randomness="different") from the global generator seeded by the data seed, so they
differ from a solo run's draws (same distribution, different samples).

Each model's loss is its own slice of the stacked outputs, so its gradients never touch another model's:
a member whose epoch loss is NaN/inf or above its divergence threshold is marked diverged at the end of
that epoch and dropped, and the others go on exactly as if it had never been there. Members that finish,
are pruned (the `on_epoch` callback returns true) or diverge are removed from the stacked tensors at the
epoch boundary, so the rest of the pack gets cheaper (or `refill` fills their slots). Batch norm (bn_cnn) works: its running statistics
are stacked buffers, updated per model.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from tuneline.core.config.model import ModelConfig
from tuneline.core.config.train import TrainConfig
from tuneline.tasks.model.architectures import ModelArgs, as_model_input
from tuneline.tasks.data.prepare import load_manifest
from tuneline.tasks.data.stream import DataAccess
from tuneline.tasks.train.averaging import stacked_decays
from tuneline.tasks.train.epochs import Stream, Trainee, build_member, model_args, train_epochs
from tuneline.tasks.train.optim import OPTIMIZER_FAMILY, OPTIMIZER_STATES, StackedOptimizer, StackedSchedules
from tuneline.tasks.train.setup import RunSetup, autocast, prepare_run, resolve_device

log = logging.getLogger(__name__)

PACKING_ROLES = ("per_model", "shared", "solo")  # see the module docstring
SHARED_BUFFERS = ("scale", "shift")  # Classifier's input normalisation, from the manifest: equal in every model


def packing_roles(config_cls: type[TrainConfig] = TrainConfig) -> dict[str, str | None]:
    """Each train setting's declared packing role (None where a field declares none)."""
    return {name: (field.json_schema_extra or {}).get("packing") for name, field in config_cls.model_fields.items()}


def _roles(train_cfg: TrainConfig) -> dict[str, str]:
    roles = packing_roles(type(train_cfg))
    undeclared = [name for name, role in roles.items() if role not in PACKING_ROLES]
    if undeclared:
        raise TypeError(f"TrainConfig.{undeclared[0]} declares no packing role: add json_schema_extra="
                        f"{{'packing': 'per_model' | 'shared' | 'solo'}} to its Field (see tasks/train/packed.py)")
    return roles


def solo_settings(train_cfg: TrainConfig) -> list[str]:
    """The settings of `train_cfg` that packed training does not implement and that are away from their default."""
    fields = type(train_cfg).model_fields
    return [name for name, role in _roles(train_cfg).items()
            if role == "solo" and getattr(train_cfg, name) != fields[name].get_default(call_default_factory=True)]


def group_key(model_cfg: ModelConfig, train_cfg: TrainConfig) -> tuple:
    """Configs with equal keys can share a pack: architecture, optimizer family and every shared (and solo) setting."""
    roles = _roles(train_cfg)
    shared = sorted((k, v) for k, v in train_cfg.model_dump(mode="json").items() if roles[k] != "per_model")
    # The whole model config but the dropout rate (per model): the arch and its kwargs fix the stacked shapes.
    model = sorted((k, repr(v)) for k, v in model_cfg.model_dump(mode="json").items() if k != "dropout")
    return (*(("model." + k, v) for k, v in model), ("optimizer_family", OPTIMIZER_FAMILY[train_cfg.optimizer]), *shared)


def _key_difference(a: tuple, b: tuple) -> str:
    da, db = dict(a), dict(b)
    return ", ".join(f"{k}: {da.get(k)!r} vs {db.get(k)!r}" for k in da if da.get(k) != db.get(k))


@dataclass
class Member:
    """One configuration of a pack, with optional callbacks (the tuner reports to Optuna through them)."""

    model: ModelConfig
    train: TrainConfig
    on_epoch: Callable[[dict], bool | None] | None = None  # after each validation; a true result stops it (pruned)
    on_end: Callable[["MemberResult"], None] | None = None  # once, when it completes, is pruned or diverges


# refill(free slots, fits) -> members to join (tasks/tune/packed_rounds.py); fits(member) -> why it cannot, or None
Refill = Callable[[int, Callable[["Member"], str | None]], list["Member"]]


@dataclass
class MemberResult:
    index: int
    status: str                          # complete | pruned | diverged
    history: list[dict] = field(default_factory=list)   # run_train's per-epoch records
    reason: str = ""                     # why it diverged
    stopped_early: bool = False
    state: dict[str, torch.Tensor] | None = None  # the weights run_train would save (keep_states=True)

    @property
    def best_val_accuracy(self) -> float | None:
        return max((h["val_accuracy"] for h in self.history), default=None)


class _PackedDropout(nn.Module):
    """Dropout whose rate is a buffer: stacked, each model carries its own rate and vmap hands it its slice."""

    def __init__(self, p: float):
        super().__init__()
        self.register_buffer("p", torch.tensor(float(p)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        # One uniform per element: kept -> x/(1-p), dropped -> 0 (torch's inverted dropout, with this model's p).
        keep = torch.rand_like(x, dtype=torch.float32) >= self.p
        return x * (keep / (1 - self.p)).to(x.dtype)


def _replace_dropout(module: nn.Module, none_drop: bool) -> list[str]:
    """Swap nn.Dropout for _PackedDropout (or Identity when no model of the pack drops); returns the buffer names."""
    names = []
    for name, child in list(module.named_modules()):
        for attr, sub in list(child.named_children()):
            if isinstance(sub, nn.Dropout):
                setattr(child, attr, nn.Identity() if none_drop else _PackedDropout(sub.p))
                if not none_drop:
                    names.append(f"{name}.{attr}.p" if name else f"{attr}.p")
    return names


class _Pack:
    """The stacked strategy of the training loop (tasks/train/loop.py): K models of one architecture as stacked
    tensors, one vmapped forward, per-model losses and a batched per-model optimizer step (optim.StackedOptimizer)."""

    diverged_note = "; the rest of its pack trained on"

    def __init__(self, members: list[Member], args: ModelArgs, device: torch.device, steps_per_epoch: int):
        train_cfgs = [m.train for m in members]
        # bf16 autocast does not reach through vmap's batch norm on a CPU (a dtype error), so a pack there trains in
        # fp32 whatever train.precision says; on CUDA it autocasts as run_train does.
        precision = train_cfgs[0] if device.type != "cpu" else train_cfgs[0].model_copy(update={"precision": "fp32"})
        self.device, self.autocast, self.args = device, autocast(precision, device), args
        self.key = group_key(members[0].model, members[0].train)
        self.no_dropout = all(m.model.dropout == 0 for m in members)
        models = self._build(members)
        self.params, stacked = self._stack(models)
        # The input normalisation is one constant for all (one manifest): kept unbatched, the normalised batch
        # stays one tensor and the first layer runs as one wide convolution / matmul over all K models.
        self.shared = {n: models[0].get_buffer(n) for n in SHARED_BUFFERS}
        self.buffers = {n: b for n, b in stacked.items() if n not in self.shared}
        self.base = copy.deepcopy(models[0]).to("meta")
        self.l1_names = [n for n in self.params if n.endswith("weight") and self.params[n].dim() > 2]

        def one(params, buffers, shared, x):
            return functional_call(self.base, (params, buffers, shared), (x,))

        # x shared by every model (one batch stream) or one batch per model ([K, B, ...]: refilled members).
        self._forward = vmap(one, in_dims=(0, 0, None, None), randomness="different")
        self._forward_own = vmap(one, in_dims=(0, 0, None, 0), randomness="different")
        # The loss terms' per-model hyperparameters [K]; a term no model uses is not computed.
        self.hyper = self._loss_hypers(train_cfgs)
        self.uses = {"l1": any(c.l1 for c in train_cfgs), "smoothing": any(c.label_smoothing for c in train_cfgs)}
        self.optimizer = StackedOptimizer(train_cfgs, self.params, device)
        self.schedules = StackedSchedules(train_cfgs, steps_per_epoch)
        self.members = list(range(len(members)))  # the member of each row
        self.steps_done = [0] * len(members)  # optimizer steps of each row's model (Adam's bias correction)
        self.steps_per_epoch, self._table, self._step = steps_per_epoch, {}, 0
        # train.ema: the rows' weight averages (averaging.py), stacked like the live tensors; a row with ema 0 keeps
        # its live weights there (a lerp of weight 1 is exact). A pack where no row averages keeps none.
        self.averaging = any(c.ema for c in train_cfgs)
        self.decays = torch.tensor([c.ema for c in train_cfgs], dtype=torch.float32, device=device)
        self.updates = [0] * len(members)
        self.avg_params, self.avg_buffers = self._averages(self.params, self.buffers)

    def _build(self, members: list[Member]) -> list[nn.Module]:
        models = []
        for m in members:
            model = build_member(m.model, m.train, self.args)  # as run_train: the seed, then the model
            self.dropout_buffers = _replace_dropout(model, self.no_dropout)
            models.append(model.to(self.device))
        return models

    def _stack(self, models: list[nn.Module]) -> tuple[dict, dict]:
        params, stacked = stack_module_state(models)
        # Linear weights are stored input-major ([K, in, out], handed to the model as a transposed view): the
        # batched matmul then reads them in place instead of copying a transposed weight every step.
        self.input_major = {f"{n}.weight" for n, m in models[0].named_modules() if isinstance(m, nn.Linear)}
        with torch.no_grad():
            for n in self.input_major:
                params[n] = params[n].transpose(1, 2).contiguous().requires_grad_(True)
        return params, stacked

    def _averages(self, params: dict, buffers: dict) -> tuple[dict, dict]:
        if not self.averaging:
            return {}, {}
        return ({n: p.detach().clone() for n, p in params.items()},
                {n: b.clone() for n, b in buffers.items()})

    @torch.no_grad()
    def _update_averages(self) -> None:
        self.updates = [u + 1 for u in self.updates]
        weights = 1.0 - stacked_decays(self.decays, self.updates)  # [K]
        for averaged, live in ((self.avg_params, self.params), (self.avg_buffers, self.buffers)):
            for n, a in averaged.items():
                if a.is_floating_point():
                    a.lerp_(live[n].detach(), weights.view(-1, *[1] * (a.dim() - 1)).to(a.dtype))
                else:  # counts (batch norm's num_batches_tracked): copied
                    a.copy_(live[n])

    def _loss_hypers(self, train_cfgs: list[TrainConfig]) -> dict[str, torch.Tensor]:
        return {"l1": torch.tensor([c.l1 for c in train_cfgs], dtype=torch.float32, device=self.device),
                "smoothing": torch.tensor([c.label_smoothing for c in train_cfgs], dtype=torch.float32,
                                          device=self.device)}

    def unfit_reason(self, member: Member) -> str | None:
        """Why `member` cannot join this pack (another group, or dropout in a pack built without it), or None."""
        if solo_settings(member.train):
            return f"train.{solo_settings(member.train)[0]} trains solo"
        other = group_key(member.model, member.train)
        if other != self.key:
            return _key_difference(self.key, other)
        if self.no_dropout and member.model.dropout:
            return "model.dropout > 0 in a pack built without dropout layers"
        return None

    def add(self, members: list[Member], first: int) -> None:
        """Models for `members` (numbered from `first`) as new last rows, each at its own step 0: a refilled slot."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            models = self._build(members)  # build_member seeds the global RNG: the pack's dropout stream is kept
        params, stacked = self._stack(models)
        with torch.no_grad():
            self.params = {n: torch.cat([p.detach(), params[n].detach()]).requires_grad_(True)
                           for n, p in self.params.items()}
            self.buffers = {n: torch.cat([b, stacked[n]]) for n, b in self.buffers.items()}
            if self.averaging:  # a newcomer's average starts at its own initial weights
                self.avg_params = {n: torch.cat([a, params[n].detach()]) for n, a in self.avg_params.items()}
                self.avg_buffers = {n: torch.cat([a, stacked[n]]) for n, a in self.avg_buffers.items()}
        train_cfgs = [m.train for m in members]
        hyper = self._loss_hypers(train_cfgs)
        self.hyper = {n: torch.cat([t, hyper[n]]) for n, t in self.hyper.items()}
        self.uses = {"l1": self.uses["l1"] or any(c.l1 for c in train_cfgs),
                     "smoothing": self.uses["smoothing"] or any(c.label_smoothing for c in train_cfgs)}
        self.optimizer.add(train_cfgs, params)
        self.schedules.add(train_cfgs)
        self.members += list(range(first, first + len(members)))
        self.steps_done += [0] * len(members)
        self.decays = torch.cat([self.decays, torch.tensor([c.ema for c in train_cfgs], dtype=torch.float32,
                                                           device=self.device)])
        self.updates += [0] * len(members)

    @property
    def size(self) -> int:
        return len(self.members)

    def begin_epoch(self) -> list[float]:
        """Train mode, and this epoch's per-step, per-model optimizer coefficients from each model's schedule."""
        self.base.train()
        lr_table = torch.tensor(self.schedules.epoch_table(self.members), dtype=torch.float64)
        self._table = self.optimizer.coefficients(lr_table, self.steps_done)
        self.steps_done, self._step = [s + self.steps_per_epoch for s in self.steps_done], 0
        return lr_table[0].tolist()

    def forward(self, x: torch.Tensor, averaged: bool = False) -> torch.Tensor:
        """[B, C, H, W] pixels (one batch for all) or [K, B, C, H, W] (one per model) -> [K, B, classes] logits, of the
        live weights or (`averaged`, under train.ema) of their averages."""
        live, buffers = (self.avg_params, self.avg_buffers) if averaged and self.averaging else (self.params, self.buffers)
        params = {n: p.transpose(1, 2) if n in self.input_major else p for n, p in live.items()}
        forward = self._forward_own if x.dim() == len(self.args.image_shape) + 2 else self._forward
        return forward(params, buffers, self.shared, x)

    def losses(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-model cross-entropy [K] with per-model label smoothing (torch's formula); y is [B] or [K, B]."""
        logp = logits.float().log_softmax(-1)
        nll = -logp.gather(-1, y.expand(logp.shape[0], -1).unsqueeze(-1)).squeeze(-1).mean(1)
        if not self.uses["smoothing"]:
            return nll
        eps = self.hyper["smoothing"]
        return (1 - eps) * nll + eps * (-logp.mean(-1).mean(1))

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One training step of every model on batch (x, y), shared or per model; returns the per-model data losses
        [K] (detached)."""
        with self.autocast:
            logits = self.forward(x)
        loss = self.losses(logits, y)
        total = loss.sum()  # each model's loss only reaches its own slice of the stacked parameters
        if self.uses["l1"]:
            l1 = sum(self.params[n].abs().flatten(1).sum(1) for n in self.l1_names)
            total = total + (self.hyper["l1"] * l1).sum()
        params = list(self.params.values())
        for p in params:
            p.grad = None
        total.backward()
        self.optimizer.step(params, {name: values[self._step] for name, values in self._table.items()})
        self._step += 1
        if self.averaging:
            self._update_averages()
        return loss.detach()

    @torch.no_grad()
    @torch.no_grad()
    def evaluate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list, list]:
        """Per-model validation loss and accuracy, in eval mode, batch by batch (as OneModel.evaluate)."""
        self.base.eval()
        loss_sum = correct = None
        seen = 0
        with self.autocast:
            for images, labels in batches:
                logits = self.forward(as_model_input(images), averaged=True).float()  # [K, B, classes]
                k = logits.shape[0]
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.repeat(k), reduction="none")
                batch_loss, batch_correct = loss.view(k, -1).sum(1), (logits.argmax(-1) == labels).sum(1)
                loss_sum = batch_loss if loss_sum is None else loss_sum + batch_loss
                correct = batch_correct if correct is None else correct + batch_correct
                seen += len(labels)
        seen = max(seen, 1)
        return (loss_sum / seen).tolist(), (correct.double() / seen).tolist()

    def after_epoch(self, row: int, val_accuracy: float) -> None:
        self.schedules.after_epoch(self.members[row], val_accuracy)

    def keep(self, rows: list[int]) -> None:
        """Drop every model not in `rows` from the stacked tensors (parameters, buffers, optimizer state, hypers)."""
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        with torch.no_grad():
            self.params = {n: p.index_select(0, index).requires_grad_(True) for n, p in self.params.items()}
            self.buffers = {n: b.index_select(0, index) for n, b in self.buffers.items()}
            self.hyper = {n: t.index_select(0, index) for n, t in self.hyper.items()}
            self.avg_params = {n: a.index_select(0, index) for n, a in self.avg_params.items()}
            self.avg_buffers = {n: a.index_select(0, index) for n, a in self.avg_buffers.items()}
            self.decays = self.decays.index_select(0, index)
            self.optimizer.keep(index)
        self.updates = [self.updates[r] for r in rows]
        self.members = [self.members[r] for r in rows]
        self.steps_done = [self.steps_done[r] for r in rows]
        self._table = {n: t.index_select(1, index) for n, t in self._table.items()}

    def weights(self, row: int) -> dict[str, torch.Tensor]:
        """Model `row`'s state dict as build_model's module names it (the packed dropout rates left out)."""
        tensors = {**self.avg_params, **self.avg_buffers} if self.averaging else {**self.params, **self.buffers}
        state = {n: (t[row].T if n in self.input_major else t[row]).detach().contiguous().clone()
                 for n, t in tensors.items() if n not in self.dropout_buffers}
        return {**state, **{n: t.detach().clone() for n, t in self.shared.items()}}


def _check_pack(members: list[Member]) -> tuple:
    if not members:
        raise ValueError("train_packed: no members")
    for m in members:
        solo = solo_settings(m.train)
        if solo:
            raise ValueError(f"train_packed: train.{solo[0]}={getattr(m.train, solo[0])!r} runs solo (packed training "
                             "does not implement it): train this config with run_train")
    key = group_key(members[0].model, members[0].train)
    for m in members[1:]:
        other = group_key(m.model, m.train)
        if other != key:
            raise ValueError(f"train_packed: these configs cannot share a pack ({_key_difference(key, other)}): "
                             "group them with tuneline.tasks.train.packed.group_key")
    return key


def train_packed(members: list[Member], prepared_dir: Path, data_seed: int | str | None = None,
                 keep_states: bool = False, refill: Refill | None = None,
                 access: DataAccess = DataAccess()) -> list[MemberResult]:
    """Train every member together on the prepared train split; validate each epoch; results in member order.

    Every member must share `group_key`. Nothing is written to disk (tuning trials need only their metrics);
    `keep_states` returns each member's final weights (its best epoch's when train.restore_best).

    The members walk the data by one stream seeded with `data_seed` (default: the first member's train.seed);
    `data_seed="own"`: each by its own train.seed, as it would alone (members with equal seeds share one).
    `refill(free, fits)` (packed tuning) runs at each epoch boundary where members left: it returns up to
    `free` new members that join from the next step (`fits(member)` says why one cannot: None when it can), each
    with its own epoch count, schedule, optimizer steps and its own train.seed's stream; their results follow
    the members' in the order they joined.
    """
    _check_pack(members)
    shared = members[0].train
    own = data_seed == "own"
    seed = shared.seed if data_seed is None or own else data_seed
    # run_train's set-up, but the pack builds its models itself (K of them, stacked).
    with prepare_run(members[0].model, shared, prepared_dir, data_seed=seed, build=False, access=access) as run:
        return _train_packed(run, members, own, keep_states, refill)


def _train_packed(run: RunSetup, members: list[Member], own: bool, keep_states: bool,
                  refill: Refill | None) -> list[MemberResult]:
    device = run.device
    args = replace(run.args, dropout=0.0)
    pack = _Pack(members, args, device, steps_per_epoch=run.steps_per_epoch)
    torch.manual_seed(run.seed)  # the pack's dropout masks
    streams: dict[int, Stream] = {}  # data_seed="own": one stream per distinct seed of the first members
    results: list[MemberResult] = []
    everyone = list(members)

    def trainee(m: Member, stream: Stream | None) -> Trainee:
        i = len(results)
        results.append(MemberResult(index=i, status="running"))

        def end(t: Trainee) -> None:
            result = results[i]
            result.status, result.reason, result.stopped_early = t.status, t.reason, t.stopped_early
            result.state = t.state
            if everyone[i].on_end is not None:
                everyone[i].on_end(result)

        return Trainee(m.train, on_epoch=m.on_epoch, on_end=end, keep_state=keep_states, track_best=keep_states,
                       history=results[i].history, stream=stream)

    trainees = [trainee(m, streams.setdefault(m.train.seed, Stream.seeded(m.train.seed, device)) if own else None)
                for m in members]

    def join(rows_left: int) -> list[Trainee]:
        free = len(members) - rows_left
        if refill is None or free <= 0:
            return []
        joining = refill(free, pack.unfit_reason)[:free]
        for m in joining:
            if (why := pack.unfit_reason(m)) is not None:
                raise ValueError(f"train_packed: a refilled member cannot join this pack: {why}")
        if joining:
            pack.add(joining, first=len(everyone))
            everyone.extend(joining)
            log.info("packed: %d member(s) joined in freed slots (%d rows)", len(joining), rows_left + len(joining))
        return [trainee(m, Stream.seeded(m.train.seed, device)) for m in joining]

    log.info("packed: %d x %s on %s, %d train / %d val images, %d epochs, data seed %s", len(members), args.arch,
             device, len(run.data.train), len(run.data.val), max(m.train.epochs for m in members),
             "own" if own else run.seed)
    train_epochs(pack, trainees, run.data, "packed", refill=join)
    return results


# --- Memory: how many models fit ---------------------------------------------------------------------------

def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _analytic_member_bytes(model_cfg: ModelConfig, train_cfg: TrainConfig, args: ModelArgs,
                           device: torch.device) -> int:
    """Parameters + gradients + optimizer state + the activations autograd saves for one batch (measured)."""
    model = build_member(model_cfg, train_cfg, args).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    saved: dict[int, int] = {}

    def pack_hook(t: torch.Tensor):
        saved[id(t)] = t.numel() * t.element_size()
        return t

    x = torch.zeros(train_cfg.batch_size, *args.image_shape, device=device)
    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t), autocast(train_cfg, device):
        out = model(x)
    state = OPTIMIZER_STATES[OPTIMIZER_FAMILY[train_cfg.optimizer]]
    return 4 * n_params * (2 + state) + sum(saved.values()) + 3 * out.numel() * 4


def _measured_member_bytes(model_cfg: ModelConfig, train_cfg: TrainConfig, args: ModelArgs,
                           device: torch.device) -> int:
    """CUDA: peak memory of one real packed step with 2 models minus that with 1 (the shared batch cancels out)."""
    peaks = []
    x = torch.zeros(train_cfg.batch_size, *args.image_shape, device=device)
    y = torch.zeros(train_cfg.batch_size, dtype=torch.long, device=device)
    for k in (1, 2):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        pack = _Pack([Member(model_cfg, train_cfg)] * k, args, device, steps_per_epoch=1)
        pack.begin_epoch()
        pack.step(x, y)
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - before)
        del pack
        torch.cuda.empty_cache()
    return peaks[1] - peaks[0]


def unpackable_reason(model_cfg: ModelConfig, train_cfg: TrainConfig, args: ModelArgs,
                      device: torch.device) -> str | None:
    """Why K copies of this model cannot train as one pack, or None: a probe builds a pack of 2 and runs one
    training step and one evaluation on 2 zero images. torchvision and user networks may hold what stacking
    cannot take (in-place ops on parameters, data-dependent control flow, modules vmap does not support)."""
    if model_cfg.freeze_backbone:
        return "model.freeze_backbone trains part of the network; a pack trains every stacked parameter"
    x = args.example_input(2, device)
    y = torch.zeros(2, dtype=torch.long, device=device)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            pack = _Pack([Member(model_cfg, train_cfg)] * 2, args, device, steps_per_epoch=1)
            pack.begin_epoch()
            losses = pack.step(x, y)
            pack.evaluate([(x, y)])
        if tuple(losses.shape) != (2,):
            return f"a pack of 2 gave losses of shape {tuple(losses.shape)}, not (2,)"
    except Exception as exc:  # noqa: BLE001 - any failure of the probe means: do not pack this model
        return f"a probe pack of 2 failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def pack_capacity(model_cfg: ModelConfig, train_cfg: TrainConfig, prepared_dir: Path, requested: int,
                  available: int | None = None) -> int:
    """`requested` capped by a measured estimate of what fits in the device's memory (logged when capped); 1 for a
    config with solo settings (it trains alone, with run_train)."""
    solo = solo_settings(train_cfg)
    if solo:
        log.info("tune.packing: a config with train.%s=%r trains alone: packed training does not implement it",
                 solo[0], getattr(train_cfg, solo[0]))
        return 1
    device = resolve_device(train_cfg.device)
    manifest = load_manifest(Path(prepared_dir))
    args = model_args(model_cfg, manifest)
    reason = unpackable_reason(model_cfg, train_cfg, args, device)
    if reason:
        log.warning("tune.packing: %s trains solo, one trial at a time: %s", model_cfg.arch, reason)
        return 1
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # probes leave the RNGs as found
        per_model = _analytic_member_bytes(model_cfg, train_cfg, args, device)
        how = f"params, grads, optimizer state and saved activations at batch {train_cfg.batch_size}"
        if device.type == "cuda":
            per_model = max(per_model, _measured_member_bytes(model_cfg, train_cfg, args, device))
            how = (f"peak of a probe step with 2 models minus 1 (torch.cuda.max_memory_allocated), "
                   f"batch {train_cfg.batch_size}")
    counts = manifest.get("counts", {})
    data_bytes = sum(int(counts.get(s, 0)) for s in ("train", "val")) * math.prod(args.image_shape) * 2
    free = _available_bytes(device) if available is None else available
    budget = (0.8 if device.type == "cuda" else 0.5) * free - data_bytes
    fits = max(1, int(budget // max(per_model, 1)))
    if fits < requested:
        log.warning("tune.packing: %d models per pack capped to %d: each %s model needs ~%.0f MiB (%s) and %.1f GiB "
                    "is free on %s (using %d%% of it); lower train.batch_size or tune.packing to silence this",
                    requested, fits, model_cfg.arch, per_model / 2**20, how, free / 2**30, device,
                    80 if device.type == "cuda" else 50)
        return fits
    return requested
