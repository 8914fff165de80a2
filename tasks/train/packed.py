"""Packed trials: K configurations of one network trained in one process, in one set of kernels.

A small network leaves a modern GPU mostly idle, and one trial per process pays the whole per-step
overhead (kernel launches, data indexing, augmentation, Python) K times. Here the K models' parameters are
stacked along a new leading dimension (`torch.func.stack_module_state`) and one forward runs all of them
(`vmap` over `functional_call`: the first layer sees the one shared normalised batch, so it runs as one
wide convolution / matmul; later convolutions become grouped convolutions, linear layers batched matmuls
over weights stored input-major so they are read in place). The optimizer step is written as batched
tensor ops whose hyperparameters are per-model tensors of shape [K], so inside one pack each model has
its own:

    learning rate and schedule (scheduler, step_size, gamma, warm-up, one-cycle, plateau: a per-model
    multiplier each step), weight decay, L1, momentum / nesterov, Adam betas (adam and adamw mix:
    coupled vs decoupled decay is per model), grad clip, label smoothing, dropout rate, seed (init),
    divergence threshold, early stopping and epochs.

Each TrainConfig field declares its packing role beside its default (json_schema_extra={"packing": ...}):

    per_model  each member of a pack trains with its own value (tests/tasks/test_packing_roles.py trains
               every one of them packed against its solo twin);
    shared     one value for the whole pack; members that differ go to different packs (`group_key`):
               batch size, augmentation, device/precision/determinism, eval batch size. train.compile,
               train.channels_last and train.resume only choose kernels or what is on disk, not what is
               trained: a pack runs its own stacked kernels and keeps no checkpoints;
    solo       packed training does not implement it: a config that sets it away from its default trains
               alone (`pack_capacity` is 1, so the tuner runs it with run_train) instead of being ignored.

A field without a role fails `group_key` (and the test): a new knob cannot be silently dropped by packs.
Besides the shared fields, a pack shares the architecture, the optimizer family (sgd | adam/adamw |
rmsprop) and the data order: one permutation per epoch and one augmentation draw per batch, driven by
`data_seed` (default: the first member's train.seed; the tuner passes the base config's train.seed). A
member whose seed equals the data seed therefore trains like `run_train` with that seed; with dropout > 0
the dropout masks are drawn for the whole pack (vmap randomness="different") from the global generator
seeded by the data seed, so they differ from a solo run's draws (same distribution, different samples).

Each model's loss is its own slice of the stacked outputs, so its gradients never touch another model's:
a member whose epoch loss is NaN/inf or above its divergence threshold is marked diverged at the end of
that epoch and dropped, and the others go on exactly as if it had never been there. Members that finish,
are pruned (the `on_epoch` callback returns true) or diverge are removed from the stacked tensors at the
epoch boundary, so the rest of the pack gets cheaper. Batch norm (bn_cnn) works: its running statistics
are stacked buffers, updated per model.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from tasks.data.augment import augment_batch
from tasks.config import ModelConfig, TrainConfig
from tasks.model.architectures import ModelArgs, build_model
from tasks.train.optim import LRSchedule
from tasks.data.prepare import load_manifest, load_split
from tasks.train.loop import _autocast, _determinism, resolve_device

log = logging.getLogger(__name__)

PACKING_ROLES = ("per_model", "shared", "solo")  # see the module docstring
OPTIMIZER_FAMILY = {"sgd": "sgd", "adam": "adam", "adamw": "adam", "rmsprop": "rmsprop"}
OPTIMIZER_STATES = {"sgd": 1, "adam": 2, "rmsprop": 2}  # state tensors per parameter tensor
ADAM_EPS, RMSPROP_ALPHA, RMSPROP_EPS = 1e-8, 0.99, 1e-8  # torch's defaults, as build_optimizer uses them
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
    return (("arch", model_cfg.arch), ("optimizer_family", OPTIMIZER_FAMILY[train_cfg.optimizer]), *shared)


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
    """K models of one architecture as stacked tensors, with a batched optimizer step."""

    def __init__(self, model_cfgs: list[ModelConfig], train_cfgs: list[TrainConfig], args: ModelArgs,
                 device: torch.device):
        self.device, self.family = device, OPTIMIZER_FAMILY[train_cfgs[0].optimizer]
        no_dropout = all(m.dropout == 0 for m in model_cfgs)
        models = []
        for mcfg, tcfg in zip(model_cfgs, train_cfgs):
            torch.manual_seed(tcfg.seed)  # as run_train: the seed, then the model: the same initial weights
            model = build_model(ModelArgs(**{**args.to_dict(), "dropout": mcfg.dropout}))
            self.dropout_buffers = _replace_dropout(model, no_dropout)
            models.append(model.to(device))
        self.params, stacked = stack_module_state(models)
        # Linear weights are stored input-major ([K, in, out], handed to the model as a transposed view): the
        # batched matmul then reads them in place instead of copying a transposed weight every step.
        self.input_major = {f"{n}.weight" for n, m in models[0].named_modules() if isinstance(m, nn.Linear)}
        with torch.no_grad():
            for n in self.input_major:
                self.params[n] = self.params[n].transpose(1, 2).contiguous().requires_grad_(True)
        # The input normalisation is one constant for all (one manifest): kept unbatched, the normalised batch
        # stays one tensor and the first layer runs as one wide convolution / matmul over all K models.
        self.shared = {n: models[0].get_buffer(n) for n in SHARED_BUFFERS}
        self.buffers = {n: b for n, b in stacked.items() if n not in self.shared}
        self.base = copy.deepcopy(models[0]).to("meta")
        self.l1_names = [n for n in self.params if n.endswith("weight") and self.params[n].dim() > 2]
        self.n_classes = args.n_classes

        def one(params, buffers, shared, x):
            return functional_call(self.base, (params, buffers, shared), (x,))

        self._forward = vmap(one, in_dims=(0, 0, None, None), randomness="different")
        # Per-model hyperparameters: host copies (float64, for the per-step coefficient tables) and [K] tensors.
        self.host = {"beta1": [c.beta1 for c in train_cfgs], "beta2": [c.beta2 for c in train_cfgs],
                     "dwd": [c.weight_decay if c.optimizer == "adamw" else 0.0 for c in train_cfgs]}
        self.hyper = {name: torch.tensor(values, dtype=torch.float32, device=device) for name, values in {
            "l2": [0.0 if c.optimizer == "adamw" else c.weight_decay for c in train_cfgs],  # adamw: decoupled
            "momentum": [c.momentum for c in train_cfgs],
            "nesterov": [float(c.nesterov and c.momentum > 0) for c in train_cfgs],
            "one_minus_beta1": [1.0 - c.beta1 for c in train_cfgs],
            "one_minus_beta2": [1.0 - c.beta2 for c in train_cfgs],
            "l1": [c.l1 for c in train_cfgs],
            "smoothing": [c.label_smoothing for c in train_cfgs],
            "clip": [c.grad_clip for c in train_cfgs],
        }.items()}
        # Ops every model would skip are not run at all (a zero hyperparameter costs nothing).
        self.uses = {"l2": any(self.hyper["l2"].tolist()), "dwd": any(self.host["dwd"]),
                     "l1": any(c.l1 for c in train_cfgs), "smoothing": any(c.label_smoothing for c in train_cfgs),
                     "clip": any(c.grad_clip for c in train_cfgs), "momentum": any(c.momentum for c in train_cfgs),
                     "nesterov": any(c.nesterov and c.momentum > 0 for c in train_cfgs),
                     "all_nesterov": all(c.nesterov and c.momentum > 0 for c in train_cfgs)}
        n_states = OPTIMIZER_STATES[self.family]
        self.state = {n: [torch.zeros_like(p) for _ in range(n_states)] for n, p in self.params.items()}
        self._views: dict[tuple[str, int], torch.Tensor] = {}

    @property
    def size(self) -> int:
        return next(iter(self.params.values())).shape[0]

    def _hyper_view(self, name: str, dim: int) -> torch.Tensor:
        """Hyperparameter `name` [K] shaped [K, 1, ...] against a `dim`-dimensional stacked tensor (cached)."""
        view = self._views.get((name, dim))
        if view is None:
            view = self._views[(name, dim)] = self.hyper[name].view(-1, *([1] * (dim - 1)))
        return view

    def coefficients(self, lr: torch.Tensor, first_step: int) -> dict[str, torch.Tensor]:
        """Per-step, per-model update coefficients [steps, K] for lrs `lr` (float64 [steps, K]), in float64 first.

        Adam's bias corrections fold into two numbers per model and step: with c = sqrt(1 - beta2^t),
        lr/(1 - beta1^t) * m / (sqrt(v)/c + eps) == (lr * c/(1 - beta1^t)) * m / (sqrt(v) + eps * c).
        """
        table = {"neg_lr": -lr}
        if self.family == "adam":
            t = torch.arange(first_step + 1, first_step + lr.shape[0] + 1, dtype=torch.float64).unsqueeze(1)
            beta1 = torch.tensor(self.host["beta1"], dtype=torch.float64)
            beta2 = torch.tensor(self.host["beta2"], dtype=torch.float64)
            root = (1 - beta2 ** t).sqrt()
            table = {"neg_scale": -lr * root / (1 - beta1 ** t), "eps": ADAM_EPS * root,
                     "decay": 1 - lr * torch.tensor(self.host["dwd"], dtype=torch.float64)}
        return {name: values.to(self.device, torch.float32) for name, values in table.items()}

    def train(self, mode: bool = True) -> None:
        self.base.train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1, H, W] pixels -> [K, B, classes] logits."""
        params = {n: p.transpose(1, 2) if n in self.input_major else p for n, p in self.params.items()}
        return self._forward(params, self.buffers, self.shared, x)

    def losses(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-model cross-entropy [K] with per-model label smoothing (torch's formula)."""
        logp = logits.float().log_softmax(-1)
        nll = -logp.gather(-1, y.expand(logp.shape[0], -1).unsqueeze(-1)).squeeze(-1).mean(1)
        if not self.uses["smoothing"]:
            return nll
        eps = self.hyper["smoothing"]
        return (1 - eps) * nll + eps * (-logp.mean(-1).mean(1))

    def step(self, x: torch.Tensor, y: torch.Tensor, autocast, coefficients: dict[str, torch.Tensor]) -> torch.Tensor:
        """One training step of every model on batch (x, y); returns the per-model data losses [K] (detached).

        `coefficients`: this step's row of `coefficients()` ({name: [K]}).
        """
        with autocast:
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
        with torch.no_grad():
            self._update(params, coefficients)
        return loss.detach()

    def _update(self, params: list[torch.Tensor], row: dict[str, torch.Tensor]) -> None:
        """The optimizer step of every model at once: torch.optim's update rules with [K] hyperparameters.

        The gradients are this step's own (set to None before backward), so they double as scratch space:
        the Adam and SGD paths allocate nothing.
        """
        uses, hv = self.uses, self._hyper_view
        grads = [p.grad for p in params]
        if uses["clip"]:  # per-model global norm, as clip_grad_norm_ over one model's parameters
            norm = torch.stack([g.float().pow(2).flatten(1).sum(1) for g in grads]).sum(0).sqrt()
            clip = self.hyper["clip"]
            coef = torch.where(clip > 0, (clip / (norm + 1e-6)).clamp(max=1.0), torch.ones_like(norm))
            for g in grads:
                g.mul_(coef.view(-1, *([1] * (g.dim() - 1))))
        for p, g, state in zip(params, grads, self.state.values()):
            dim = p.dim()
            per_step = {name: values.view(-1, *([1] * (dim - 1))) for name, values in row.items()}
            if uses["l2"]:  # L2 in the gradient: adam, sgd, rmsprop (adamw decays decoupled, below)
                g.addcmul_(p, hv("l2", dim))
            if self.family == "adam":
                if uses["dwd"]:
                    p.mul_(per_step["decay"])
                exp_avg, exp_avg_sq = state
                exp_avg.lerp_(g, hv("one_minus_beta1", dim))
                exp_avg_sq.lerp_(g.mul_(g), hv("one_minus_beta2", dim))  # == beta2*v + (1-beta2)*g^2
                denom = torch.sqrt(exp_avg_sq, out=g).add_(per_step["eps"])
                p.addcmul_(torch.div(exp_avg, denom, out=g), per_step["neg_scale"])
            elif self.family == "sgd":
                update = g
                if uses["momentum"]:
                    (buf,) = state
                    buf.mul_(hv("momentum", dim)).add_(g)  # torch starts the buffer at the first gradient: the same
                    update = buf
                    if uses["nesterov"]:
                        nesterov = g.addcmul_(buf, hv("momentum", dim))
                        update = (nesterov if uses["all_nesterov"]
                                  else torch.where(hv("nesterov", dim) > 0, nesterov, buf))
                p.addcmul_(update, per_step["neg_lr"])
            else:  # rmsprop
                square_avg, buf = state
                square_avg.mul_(RMSPROP_ALPHA).addcmul_(g, g, value=1 - RMSPROP_ALPHA)
                g.div_(square_avg.sqrt().add_(RMSPROP_EPS))
                if uses["momentum"]:
                    buf.mul_(hv("momentum", dim)).add_(g)
                    p.addcmul_(buf, per_step["neg_lr"])
                else:
                    p.addcmul_(g, per_step["neg_lr"])

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, autocast) -> tuple[list, list]:
        """Per-model validation loss and accuracy, in eval mode, batch by batch (as predict_logits)."""
        self.base.eval()
        with autocast:
            logits = torch.cat([self.forward(images[i:i + batch_size].unsqueeze(1).float()).float()
                                for i in range(0, len(images), batch_size)], dim=1)
        k = logits.shape[0]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.repeat(k), reduction="none")
        loss = loss.view(k, -1).mean(1)
        accuracy = (logits.argmax(-1) == labels).float().mean(1)
        return loss.tolist(), accuracy.tolist()

    def keep(self, rows: list[int]) -> None:
        """Drop every model not in `rows` from the stacked tensors (parameters, buffers, optimizer state, hypers)."""
        index = torch.tensor(rows, device=self.device)
        with torch.no_grad():
            self.params = {n: p.index_select(0, index).requires_grad_(True) for n, p in self.params.items()}
            self.buffers = {n: b.index_select(0, index) for n, b in self.buffers.items()}
            self.state = {n: [s.index_select(0, index) for s in states] for n, states in self.state.items()}
            self.hyper = {n: t.index_select(0, index) for n, t in self.hyper.items()}
        self.host = {n: [values[r] for r in rows] for n, values in self.host.items()}
        self._views.clear()

    def member_state(self, row: int) -> dict[str, torch.Tensor]:
        """Model `row`'s state dict as build_model's module names it (the packed dropout rates left out)."""
        tensors = {**self.params, **self.buffers}
        state = {n: (t[row].T if n in self.input_major else t[row]).detach().contiguous().clone()
                 for n, t in tensors.items() if n not in self.dropout_buffers}
        return {**state, **{n: t.detach().clone() for n, t in self.shared.items()}}


class _Schedules:
    """Each member's LRSchedule, driven through a one-parameter stand-in optimizer: exactly run_train's lrs."""

    def __init__(self, train_cfgs: list[TrainConfig], steps_per_epoch: int):
        self.optimizers, self.schedules = [], []
        for cfg in train_cfgs:
            optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
            self.schedules.append(LRSchedule(cfg, optimizer, steps_per_epoch))
            optimizer.step()  # marks it stepped, so the scheduler does not warn about the order of calls
            self.optimizers.append(optimizer)
        self.steps_per_epoch = steps_per_epoch

    def epoch_table(self, rows: list[int]) -> list[list[float]]:
        """The lr of each member in `rows` at every step of the coming epoch ([steps][members]), advancing them."""
        table = [[0.0] * len(rows) for _ in range(self.steps_per_epoch)]
        for j, i in enumerate(rows):
            group = self.optimizers[i].param_groups[0]
            for s in range(self.steps_per_epoch):
                table[s][j] = group["lr"]
                self.schedules[i].after_step()
        return table

    def after_epoch(self, i: int, val_accuracy: float) -> None:
        self.schedules[i].after_epoch(val_accuracy)


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
                             "group them with tasks.train.packed.group_key")
    return key


def train_packed(members: list[Member], prepared_dir: Path, data_seed: int | None = None,
                 keep_states: bool = False) -> list[MemberResult]:
    """Train every member together on the prepared train split; validate each epoch; results in member order.

    Every member must share `group_key`. Nothing is written to disk (tuning trials need only their metrics);
    `keep_states` returns each member's final weights (its best epoch's when train.restore_best).
    """
    _check_pack(members)
    shared = members[0].train
    with _determinism(shared.deterministic):
        return _train_packed(members, Path(prepared_dir), shared.seed if data_seed is None else data_seed, keep_states)


def _train_packed(members: list[Member], prepared_dir: Path, data_seed: int, keep_states: bool) -> list[MemberResult]:
    shared = members[0].train
    device = resolve_device(shared.device)
    manifest = load_manifest(prepared_dir)
    train_x, train_y = (t.to(device) for t in load_split(prepared_dir, "train"))
    val_x, val_y = (t.to(device) for t in load_split(prepared_dir, "val"))
    args = ModelArgs(arch=members[0].model.arch, dropout=0.0, n_classes=len(manifest["classes"]),
                     image_shape=tuple(manifest["image_shape"]), **manifest["normalization"])
    pack = _Pack([m.model for m in members], [m.train for m in members], args, device)
    torch.manual_seed(data_seed)  # the pack's dropout masks
    n_train = len(train_y)
    starts = [s for s in range(0, n_train, shared.batch_size) if min(shared.batch_size, n_train - s) >= 2]
    schedules = _Schedules([m.train for m in members], len(starts))
    generator = torch.Generator(device=device).manual_seed(data_seed)
    autocast = _autocast(shared, device)

    results = [MemberResult(index=i, status="running") for i in range(len(members))]
    live = list(range(len(members)))  # member index of each row of the pack
    best_metric: dict[int, float] = {}
    bad_epochs = {i: 0 for i in live}
    best_state: dict[int, dict] = {}
    steps_done = 0
    max_epochs = max(m.train.epochs for m in members)
    log.info("packed: %d x %s on %s, %d train / %d val images, %d epochs, data seed %d", len(members), args.arch,
             device, n_train, len(val_y), max_epochs, data_seed)

    def finish(i: int, status: str, reason: str = "", stopped_early: bool = False) -> None:
        result = results[i]
        result.status, result.reason, result.stopped_early = status, reason, stopped_early
        if keep_states and status != "diverged":
            row = live.index(i)
            best = best_state.get(i) if members[i].train.restore_best else None
            result.state = best if best is not None else pack.member_state(row)
        if members[i].on_end is not None:
            members[i].on_end(result)

    for epoch in range(1, max_epochs + 1):
        started = time.perf_counter()
        pack.train()
        lr_table = torch.tensor(schedules.epoch_table(live), dtype=torch.float64)
        lrs_at_start = lr_table[0].tolist()
        table = pack.coefficients(lr_table, steps_done)
        order = torch.randperm(n_train, device=device, generator=generator)
        loss_sum = torch.zeros(pack.size, device=device)
        for s, start in enumerate(starts):
            idx = order[start:start + shared.batch_size]
            x = train_x[idx].unsqueeze(1).float()
            x = augment_batch(x, shared.augment_rotate_deg, shared.augment_translate, shared.augment_scale, generator)
            loss = pack.step(x, train_y[idx], autocast, {name: values[s] for name, values in table.items()})
            loss_sum += loss * len(idx)
        steps_done += len(starts)
        train_losses = (loss_sum / n_train).tolist()

        # Divergence is judged per model, as run_train judges it; a diverged model leaves before validation.
        keep_rows = []
        for row, i in enumerate(list(live)):
            cfg, train_loss = members[i].train, train_losses[row]
            if not math.isfinite(train_loss) or train_loss > cfg.divergence_factor * math.log(args.n_classes):
                reason = (f"train: loss diverged to {train_loss:.3g} in epoch {epoch} (lr {lrs_at_start[row]:g}, "
                          f"optimizer {cfg.optimizer}): lower train.lr or change the optimizer; the rest of its pack "
                          "trained on")
                log.info("packed: member %d %s", i, reason)
                finish(i, "diverged", reason)
            else:
                keep_rows.append(row)
        _compact(pack, live, keep_rows, train_losses, lrs_at_start)
        if not live:
            break

        val_losses, val_accuracies = pack.evaluate(val_x, val_y, shared.eval_batch_size, autocast)
        seconds = time.perf_counter() - started
        keep_rows = []
        for row, i in enumerate(list(live)):
            cfg = members[i].train
            schedules.after_epoch(i, val_accuracies[row])
            record = {"epoch": epoch, "train_loss": round(train_losses[row], 6), "val_loss": round(val_losses[row], 6),
                      "val_accuracy": round(val_accuracies[row], 6), "lr": lrs_at_start[row],
                      "seconds": round(seconds, 3), "images_per_s": round(n_train / seconds, 1)}
            results[i].history.append(record)
            stop = bool(members[i].on_epoch(record)) if members[i].on_epoch is not None else False
            higher = cfg.early_stopping_metric == "val_accuracy"
            metric = val_accuracies[row] if higher else val_losses[row]
            best = best_metric.get(i)
            if best is None or (metric - best if higher else best - metric) > cfg.early_stopping_min_delta:
                best_metric[i], bad_epochs[i] = metric, 0
                if keep_states and cfg.restore_best:
                    best_state[i] = pack.member_state(row)
            else:
                bad_epochs[i] += 1
            stopped_early = bool(cfg.early_stopping_patience) and bad_epochs[i] >= cfg.early_stopping_patience
            if stop:
                finish(i, "pruned")
            elif stopped_early or epoch >= cfg.epochs:
                finish(i, "complete", stopped_early=stopped_early)
            else:
                keep_rows.append(row)
        log.info("packed: epoch %d/%d, %d model(s), %.1fs, val_acc %s", epoch, max_epochs, len(live), seconds,
                 " ".join(f"{a:.4f}" for a in val_accuracies))
        _compact(pack, live, keep_rows)
        if not live:
            break
    return results


def _compact(pack: _Pack, live: list[int], keep_rows: list[int], *row_lists: list) -> None:
    """Keep only `keep_rows` of the pack (and of `live` and each per-row list), in place."""
    if len(keep_rows) == len(live):
        return
    if keep_rows:
        pack.keep(keep_rows)
    for values in (live, *row_lists):
        values[:] = [values[r] for r in keep_rows]


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
    torch.manual_seed(0)
    model = build_model(ModelArgs(**{**args.to_dict(), "dropout": model_cfg.dropout})).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    saved: dict[int, int] = {}

    def pack_hook(t: torch.Tensor):
        saved[id(t)] = t.numel() * t.element_size()
        return t

    x = torch.zeros(train_cfg.batch_size, *args.image_shape, device=device)
    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t), _autocast(train_cfg, device):
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
        pack = _Pack([model_cfg] * k, [train_cfg] * k, args, device)
        row = {n: v[0] for n, v in pack.coefficients(torch.full((1, k), train_cfg.lr, dtype=torch.float64), 0).items()}
        pack.step(x, y, _autocast(train_cfg, device), row)
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - before)
        del pack
        torch.cuda.empty_cache()
    return peaks[1] - peaks[0]


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
    args = ModelArgs(arch=model_cfg.arch, dropout=model_cfg.dropout, n_classes=len(manifest["classes"]),
                     image_shape=tuple(manifest["image_shape"]), **manifest["normalization"])
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
