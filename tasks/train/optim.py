"""Optimizers and learning-rate schedules from TrainConfig, for one model and for K stacked models.

An optimizer knob lives here and only here: `build_optimizer` (+ `optimizer_step`) is torch.optim for one
model; `StackedOptimizer` is the same update rules written as batched tensor ops with per-model [K]
hyperparameters, for a pack of K models (tasks/train/packed.py); tests/tasks/train/test_packing_roles.py trains
every per-model knob both ways and compares.

Every schedule except plateau is one per-step multiplier of the base lr (a LambdaLR), so warm-up
composes with it by multiplication and resuming only needs the step count. Step and exponential keep
the seed article's per-epoch staircase; cosine and one-cycle move every step. Plateau must react to the
validation metric, so it is torch's ReduceLROnPlateau stepped once per epoch after warm-up.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tuneline.core.config.train import TrainConfig

OPTIMIZER_FAMILY = {"sgd": "sgd", "adam": "adam", "adamw": "adam", "rmsprop": "rmsprop"}  # one family per pack
OPTIMIZER_STATES = {"sgd": 1, "adam": 2, "rmsprop": 2}  # state tensors per parameter tensor
RMSPROP_ALPHA, RMSPROP_EPS = 0.99, 1e-8  # torch's defaults, as build_optimizer uses them


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = model.parameters()
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                 weight_decay=cfg.weight_decay)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"train.optimizer: unknown optimizer {cfg.optimizer!r}")


def optimizer_step(cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """One update of one model from its gradients: clip (train.grad_clip), then the optimizer's step."""
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()


def _host_hypers(train_cfgs: list[TrainConfig]) -> dict[str, list[float]]:
    """Host copies of the per-model hyperparameters the per-step coefficient tables need (float64 there)."""
    return {"beta1": [c.beta1 for c in train_cfgs], "beta2": [c.beta2 for c in train_cfgs],
            "eps": [c.eps for c in train_cfgs],
            "dwd": [c.weight_decay if c.optimizer == "adamw" else 0.0 for c in train_cfgs]}


def _tensor_hypers(train_cfgs: list[TrainConfig], device: torch.device) -> dict[str, torch.Tensor]:
    """The per-model hyperparameters the update reads, as [K] tensors."""
    return {name: torch.tensor(values, dtype=torch.float32, device=device) for name, values in {
        "l2": [0.0 if c.optimizer == "adamw" else c.weight_decay for c in train_cfgs],  # adamw: decoupled
        "momentum": [c.momentum for c in train_cfgs],
        "nesterov": [float(c.nesterov and c.momentum > 0) for c in train_cfgs],
        "one_minus_beta1": [1.0 - c.beta1 for c in train_cfgs],
        "one_minus_beta2": [1.0 - c.beta2 for c in train_cfgs],
        "clip": [c.grad_clip for c in train_cfgs],
    }.items()}


def _uses(train_cfgs: list[TrainConfig]) -> dict[str, bool]:
    """Ops every model would skip are not run at all (a zero hyperparameter costs nothing)."""
    return {"l2": any(0.0 if c.optimizer == "adamw" else c.weight_decay for c in train_cfgs),
            "dwd": any(c.weight_decay if c.optimizer == "adamw" else 0.0 for c in train_cfgs),
            "clip": any(c.grad_clip for c in train_cfgs), "momentum": any(c.momentum for c in train_cfgs),
            "nesterov": any(c.nesterov and c.momentum > 0 for c in train_cfgs),
            "all_nesterov": all(c.nesterov and c.momentum > 0 for c in train_cfgs)}


class StackedOptimizer:
    """torch.optim's update rules for K stacked models at once, with per-model [K] hyperparameters.

    The pack shares one optimizer family (`OPTIMIZER_FAMILY`); inside it each model has its own lr and
    schedule (through `coefficients`), weight decay (adam and adamw mix: coupled vs decoupled is per model),
    momentum / nesterov, betas, eps and grad clip.
    """

    def __init__(self, train_cfgs: list[TrainConfig], params: dict[str, torch.Tensor], device: torch.device):
        self.device, self.family = device, OPTIMIZER_FAMILY[train_cfgs[0].optimizer]
        self.host, self.hyper, self.cfgs = _host_hypers(train_cfgs), _tensor_hypers(train_cfgs, device), list(train_cfgs)
        self.uses = _uses(self.cfgs)
        n_states = OPTIMIZER_STATES[self.family]
        self.state = {n: [torch.zeros_like(p) for _ in range(n_states)] for n, p in params.items()}
        self._views: dict[tuple[str, int], torch.Tensor] = {}

    def add(self, train_cfgs: list[TrainConfig], params: dict[str, torch.Tensor]) -> None:
        """Append models (a pack's refilled slots): their hyperparameters, and fresh state for `params` (theirs, [k, ...])."""
        host = _host_hypers(train_cfgs)
        self.host = {n: values + host[n] for n, values in self.host.items()}
        hyper = _tensor_hypers(train_cfgs, self.device)
        self.hyper = {n: torch.cat([t, hyper[n]]) for n, t in self.hyper.items()}
        # The flags of every model that ever joined: an op a left model needed is a no-op for the others.
        self.cfgs += train_cfgs
        self.uses = _uses(self.cfgs)
        self.state = {n: [torch.cat([s, torch.zeros_like(params[n])]) for s in states] for n, states in self.state.items()}
        self._views.clear()

    def _hyper_view(self, name: str, dim: int) -> torch.Tensor:
        """Hyperparameter `name` [K] shaped [K, 1, ...] against a `dim`-dimensional stacked tensor (cached)."""
        view = self._views.get((name, dim))
        if view is None:
            view = self._views[(name, dim)] = self.hyper[name].view(-1, *([1] * (dim - 1)))
        return view

    def coefficients(self, lr: torch.Tensor, first_steps: list[int]) -> dict[str, torch.Tensor]:
        """Per-step, per-model update coefficients [steps, K] for lrs `lr` (float64 [steps, K]), in float64 first;
        `first_steps` [K]: the optimizer steps each model has taken (a refilled member starts at 0).

        Adam's bias corrections fold into two numbers per model and step: with c = sqrt(1 - beta2^t),
        lr/(1 - beta1^t) * m / (sqrt(v)/c + eps) == (lr * c/(1 - beta1^t)) * m / (sqrt(v) + eps * c).
        """
        table = {"neg_lr": -lr}
        if self.family == "adam":
            t = (torch.arange(1, lr.shape[0] + 1, dtype=torch.float64).unsqueeze(1)
                 + torch.tensor(first_steps, dtype=torch.float64))
            beta1 = torch.tensor(self.host["beta1"], dtype=torch.float64)
            beta2 = torch.tensor(self.host["beta2"], dtype=torch.float64)
            root = (1 - beta2 ** t).sqrt()
            eps = torch.tensor(self.host["eps"], dtype=torch.float64)
            table = {"neg_scale": -lr * root / (1 - beta1 ** t), "eps": eps * root,
                     "decay": 1 - lr * torch.tensor(self.host["dwd"], dtype=torch.float64)}
        return {name: values.to(self.device, torch.float32) for name, values in table.items()}

    @torch.no_grad()
    def step(self, params: list[torch.Tensor], row: dict[str, torch.Tensor]) -> None:
        """The optimizer step of every model at once; `row` is this step's row of `coefficients()` ({name: [K]}).

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

    def keep(self, index: torch.Tensor) -> None:
        """Keep only the models at `index` (a [k] long tensor of rows): optimizer state and hyperparameters."""
        rows = index.tolist()
        self.state = {n: [s.index_select(0, index) for s in states] for n, states in self.state.items()}
        self.hyper = {n: t.index_select(0, index) for n, t in self.hyper.items()}
        self.host = {n: [values[r] for r in rows] for n, values in self.host.items()}
        self._views.clear()


class LRSchedule:
    """Per-step and per-epoch lr control for one optimizer; `state_dict` makes it resumable."""

    def __init__(self, cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
        self.cfg = cfg
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = cfg.epochs * steps_per_epoch
        # One-cycle has its own warm-up phase (pct_start); stacking another would double it.
        self.warmup_steps = 0 if cfg.scheduler == "onecycle" else round(cfg.warmup_epochs * steps_per_epoch)
        self.per_step = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self._factor(step))
        self.plateau = (torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=cfg.plateau_factor, patience=cfg.plateau_patience)
            if cfg.scheduler == "plateau" else None)

    def _factor(self, step: int) -> float:
        """lr multiplier after `step` optimizer steps."""
        cfg, epoch = self.cfg, step // self.steps_per_epoch
        warmup = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if cfg.scheduler == "step":
            main = cfg.gamma ** (epoch // cfg.step_size)
        elif cfg.scheduler == "exponential":
            main = cfg.gamma ** epoch
        elif cfg.scheduler == "cosine":
            main = 0.5 * (1.0 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps))
        elif cfg.scheduler == "onecycle":
            main = self._one_cycle(step)
        else:  # none, plateau (plateau scales the lr itself, per epoch)
            main = 1.0
        return warmup * main

    def _one_cycle(self, step: int) -> float:
        # Cosine up from lr/25 to lr over pct_start of training, then cosine down to lr/1e4 (torch's defaults).
        up = max(1, round(self.cfg.onecycle_pct_start * self.total_steps))
        start, end = 1 / 25, 1 / 1e4
        if step < up:
            return start + (1 - start) * 0.5 * (1 - math.cos(math.pi * step / up))
        t = min(1.0, (step - up) / max(1, self.total_steps - up))
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * t))

    def after_step(self) -> None:
        if self.plateau is None or self.per_step.last_epoch < self.warmup_steps:
            self.per_step.step()

    def after_epoch(self, val_accuracy: float) -> None:
        if self.plateau is not None and self.per_step.last_epoch >= self.warmup_steps:
            self.plateau.step(val_accuracy)

    def state_dict(self) -> dict:
        return {"per_step": self.per_step.state_dict(),
                "plateau": self.plateau.state_dict() if self.plateau is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.per_step.load_state_dict(state["per_step"])
        if self.plateau is not None and state["plateau"] is not None:
            self.plateau.load_state_dict(state["plateau"])


class StackedSchedules:
    """Each stacked model's LRSchedule, driven through a one-parameter stand-in optimizer: exactly one model's lrs."""

    def __init__(self, train_cfgs: list[TrainConfig], steps_per_epoch: int):
        self.optimizers, self.schedules = [], []
        self.steps_per_epoch = steps_per_epoch
        self.add(train_cfgs)

    def epoch_table(self, members: list[int]) -> list[list[float]]:
        """The lr of each model in `members` at every step of the coming epoch ([steps][members]), advancing them."""
        table = [[0.0] * len(members) for _ in range(self.steps_per_epoch)]
        for j, i in enumerate(members):
            group = self.optimizers[i].param_groups[0]
            for s in range(self.steps_per_epoch):
                table[s][j] = group["lr"]
                self.schedules[i].after_step()
        return table

    def add(self, train_cfgs: list[TrainConfig]) -> None:
        """Schedules for models that join later (a pack's refilled slots): each starts at its own step 0."""
        for cfg in train_cfgs:
            optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
            self.schedules.append(LRSchedule(cfg, optimizer, self.steps_per_epoch))
            optimizer.step()  # marks it stepped, so the scheduler does not warn about the order of calls
            self.optimizers.append(optimizer)

    def after_epoch(self, member: int, val_accuracy: float) -> None:
        self.schedules[member].after_epoch(val_accuracy)
