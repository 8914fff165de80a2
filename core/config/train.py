"""train: how the train stage (and every tuning trial) trains: optimizer, schedule, regularisation, device."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tuneline.core.config.base import Section


class TrainConfig(Section):
    """How the train stage (and every tuning trial) trains: optimizer, schedule, regularisation, device."""

    # Flat keys on purpose: every knob is one `-S train.key=value` away, as DVC spells overrides.
    epochs: int = Field(8, ge=1, description="passes over the training split", json_schema_extra={"packing": "per_model"})
    batch_size: int = Field(256, ge=1, description="images per optimizer step (the global batch under DDP)", json_schema_extra={"packing": "shared"})
    images_per_epoch: int | None = Field(None, gt=0, description="train on this many images per epoch (the first of the epoch's shuffled order; null: the whole split), for data far larger than an epoch's budget", json_schema_extra={"packing": "shared"})
    optimizer: Literal["sgd", "adam", "adamw", "rmsprop"] = Field("adamw", description="sgd | adam | adamw | rmsprop", json_schema_extra={"packing": "per_model"})
    lr: float = Field(4e-3, gt=0.0, description="peak learning rate", json_schema_extra={"packing": "per_model"})
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="sgd and rmsprop: momentum factor", json_schema_extra={"packing": "per_model"})
    nesterov: bool = Field(False, description="sgd: Nesterov momentum", json_schema_extra={"packing": "per_model"})
    beta1: float = Field(0.9, ge=0.0, lt=1.0, description="adam / adamw: first-moment decay", json_schema_extra={"packing": "per_model"})
    beta2: float = Field(0.999, ge=0.0, lt=1.0, description="adam / adamw: second-moment decay", json_schema_extra={"packing": "per_model"})
    eps: float = Field(1e-8, gt=0.0, description="adam / adamw: added to the update's denominator for numerical stability", json_schema_extra={"packing": "per_model"})
    weight_decay: float = Field(5e-4, ge=0.0, description="L2 (decoupled for adamw)", json_schema_extra={"packing": "per_model"})
    l1: float = Field(0.0, ge=0.0, description="L1 penalty on weights (not biases / norm layers)", json_schema_extra={"packing": "per_model"})
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="cross-entropy label smoothing (0 = off)", json_schema_extra={"packing": "per_model"})
    grad_clip: float = Field(0.0, ge=0.0, description="max global grad norm; 0 = off", json_schema_extra={"packing": "per_model"})
    ema: float = Field(0.98, ge=0.0, lt=1.0, description="weight averaging: validate, keep and export an exponential moving average of the weights (and batch-norm statistics), updated after every step with this decay, warmed up over the first steps; 0 = off (the live weights)", json_schema_extra={"packing": "per_model"})
    scheduler: Literal["none", "step", "exponential", "cosine", "onecycle", "plateau"] = Field("onecycle", description="none | step | exponential | cosine | onecycle | plateau", json_schema_extra={"packing": "per_model"})
    step_size: int = Field(1, ge=1, description="step: epochs between decays", json_schema_extra={"packing": "per_model"})
    gamma: float = Field(0.5, gt=0.0, le=1.0, description="step / exponential: lr multiplier per decay (per epoch)", json_schema_extra={"packing": "per_model"})
    warmup_epochs: float = Field(0.0, ge=0.0, description="linear warm-up from ~0 to lr; fractions of an epoch allowed", json_schema_extra={"packing": "per_model"})
    onecycle_pct_start: float = Field(0.25, gt=0.0, lt=1.0, description="onecycle: share of the steps spent warming up", json_schema_extra={"packing": "per_model"})
    plateau_patience: int = Field(1, ge=0, description="plateau: epochs without val improvement before decaying", json_schema_extra={"packing": "per_model"})
    plateau_factor: float = Field(0.5, gt=0.0, lt=1.0, description="plateau: lr multiplier per decay", json_schema_extra={"packing": "per_model"})
    augment_rotate_deg: float = Field(8.0, ge=0.0, le=180.0, description="random rotation in ±degrees, per image, on device", json_schema_extra={"packing": "shared"})
    augment_translate: float = Field(0.08, ge=0.0, le=0.5, description="random shift in ± fraction of the image side", json_schema_extra={"packing": "shared"})
    augment_scale: float = Field(0.08, ge=0.0, lt=1.0, description="random zoom in 1 ± scale", json_schema_extra={"packing": "shared"})
    augment_flip: bool = Field(False, description="random horizontal flip, per image, on device (off for digits and text: they are not mirror-symmetric)", json_schema_extra={"packing": "shared"})
    augment_time_shift: float = Field(0.0, ge=0.0, le=0.5, description="audio: random shift of each clip in ± fraction of its length, zeros shifted in", json_schema_extra={"packing": "shared"})
    augment_noise: float = Field(0.0, ge=0.0, le=1.0, description="audio: Gaussian noise added to each clip, standard deviation drawn up to this (samples are -1..1)", json_schema_extra={"packing": "shared"})
    augment_spec_mask: float = Field(0.0, ge=0.0, le=0.5, description="audio: SpecAugment masks, one time span and one frequency band of up to this fraction per clip", json_schema_extra={"packing": "shared"})
    early_stopping_patience: int = Field(0, ge=0, description="epochs without improvement before stopping; 0 = off", json_schema_extra={"packing": "per_model"})
    early_stopping_metric: Literal["val_accuracy", "val_loss"] = Field("val_accuracy", description="val_accuracy | val_loss", json_schema_extra={"packing": "per_model"})
    early_stopping_min_delta: float = Field(0.0, ge=0.0, description="smallest change that counts as an improvement", json_schema_extra={"packing": "per_model"})
    divergence_factor: float = Field(100.0, gt=1.0, description="loss above this × ln(classes) (100× a uniform guess) = diverged", json_schema_extra={"packing": "per_model"})
    restore_best: bool = Field(True, description="keep the best epoch's weights, not the last", json_schema_extra={"packing": "per_model"})
    seed: int = Field(0, description="weight init, data order and augmentation seed", json_schema_extra={"packing": "per_model"})
    deterministic: bool = Field(False, description="deterministic kernels: bit-identical reruns, a little slower", json_schema_extra={"packing": "shared"})
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto | cpu | cuda", json_schema_extra={"packing": "shared"})
    precision: Literal["auto", "native", "fp32", "bf16"] = Field("native", description="native: bf16 autocast wherever the hardware computes bf16 (CUDA, and CPUs with AVX512-BF16 or AMX: about twice fp32's images/s for small CNNs), fp32 elsewhere | auto: bf16 autocast on CUDA, fp32 on CPU | fp32 | bf16", json_schema_extra={"packing": "shared"})
    channels_last: bool = Field(True, description="NHWC memory layout for convolutions (faster on GPUs)", json_schema_extra={"packing": "shared"})
    compile: bool = Field(False, description="torch.compile the model (pays a one-off compile time)", json_schema_extra={"packing": "shared"})
    resume: bool = Field(True, description="continue from the last epoch checkpoint of the same config", json_schema_extra={"packing": "shared"})
    checkpoint_every_steps: int | None = Field(None, ge=1, description="also write the resume checkpoint every N steps inside an epoch, so a run stopped mid-epoch continues from there (null: at epoch ends only)", json_schema_extra={"packing": "shared"})
    eval_batch_size: int = Field(1000, ge=1, description="images per forward pass when validating and evaluating", json_schema_extra={"packing": "shared"})

