"""One run set-up for the three ways to train: `run_train`, a tuning trial and a pack of trials.

run_train (tasks/train/loop.py), train_trial (tasks/tune/trial_run.py) and train_packed (tasks/train/packed.py)
differ in what they hold and write (one model with resume checkpoints, one model and nothing written, K stacked
models), not in how a run starts. `prepare_run` is that start, written once: the device (one GPU per rank under
torchrun), deterministic kernels if asked, the process group, the splits on the device, the model args for the
prepared data, the seeded model, and the data streams (batch order, augmentation, each rank's own dropout). So a
trial's numbers equal a run_train of its config, and a packed member whose seed is its stream's trains like
its solo twin (tests/tasks/tune/test_trial_run.py, tests/tasks/train/test_packed.py).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from tuneline.core.config.model import ModelConfig
from tuneline.core.config.train import TrainConfig
from tuneline.tasks.data.stream import DataAccess, SplitReader
from tuneline.tasks.model.architectures import Classifier, ModelArgs
from tuneline.tasks.train.distributed import DistContext, device_for, process_group
from tuneline.tasks.train.host_memory import keep_freed_memory
from tuneline.tasks.train.epochs import EpochData, build_member, check_augmentation, load_data, model_args

Splits = tuple[dict, SplitReader, SplitReader]  # manifest, train, val (each resident or streaming)
RANK_EPOCH_STRIDE = 1000  # a resumed rank > 0 reseeds with seed + rank + this × epochs done: fresh draws, not replays


def resolve_device(requested: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; an explicit 'cuda' without a GPU is an error, not a fallback."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible: use train.device=auto or cpu")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


@functools.cache
def native_bf16(device_type: str) -> bool:
    """Whether a `device_type` device computes bf16 in hardware: CUDA, or a CPU with AVX512-BF16 or AMX (oneDNN's
    test; asked once per process, not at every step). Elsewhere oneDNN emulates bf16 on a CPU, slower than fp32."""
    return device_type == "cuda" or (device_type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))


def autocast(cfg: TrainConfig, device: torch.device) -> torch.autocast:
    """bf16 autocast where it pays (auto: CUDA; native: CUDA and bf16 CPUs) or where asked; plain fp32 otherwise."""
    use_bf16 = (cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
                or (cfg.precision == "native" and native_bf16(device.type)))
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)


def memory_format(cfg: TrainConfig) -> torch.memory_format:
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


@contextlib.contextmanager
def determinism(enabled: bool) -> Iterator[None]:
    """Deterministic kernels for the duration of one run (a process-wide switch, so it is restored after)."""
    previous = torch.are_deterministic_algorithms_enabled()
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
    # The switch's first call in a process costs about a second (torch imports its deterministic-op tables), so a
    # run that keeps the process's setting does not touch it.
    if enabled != previous:
        torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.benchmark = not enabled
    try:
        yield
    finally:
        if enabled != previous:
            torch.use_deterministic_algorithms(previous)


@dataclass(frozen=True)
class RunSetup:
    """What a run starts from; the caller adds its strategy (one model or a pack), its trainees and its writes."""

    device: torch.device
    ctx: DistContext
    seed: int  # the data streams' seed (train.seed, or a pack's data seed)
    manifest: dict
    args: ModelArgs  # model.arch's args for the prepared data's input spec
    data: EpochData  # the splits on the device and how each epoch walks them (its n_classes: divergence checks)
    model: Classifier | None  # seeded with train.seed, built, on the device; None where the caller builds (a pack)

    @property
    def steps_per_epoch(self) -> int:
        return self.data.steps

    def seed_rank(self, epochs_done: int = 0) -> None:
        """Ranks > 0 draw their own augmentation and dropout (two ranks never apply the same random transform to
        their different images); rank 0 keeps the streams a single process would have. On resume each rank > 0
        reseeds past its draws before the checkpoint (rank 0's saved streams are restored from it)."""
        if self.ctx.rank:
            seed = self.seed + self.ctx.rank + RANK_EPOCH_STRIDE * epochs_done
            torch.manual_seed(seed)
            self.data.augment_generator.manual_seed(seed)


@contextlib.contextmanager
def prepare_run(model_cfg: ModelConfig, train_cfg: TrainConfig, prepared: Path, *, ctx: DistContext = DistContext(),
                load: Callable[[Path, torch.device, DataAccess], Splits] = load_data, data_seed: int | None = None,
                build: bool = True, access: DataAccess = DataAccess()) -> Iterator[RunSetup]:
    """The set-up of one run, inside its process-wide state (deterministic kernels, the torchrun process group),
    which is restored when the block ends.

    `load(prepared, device, access)` gives the splits, each resident or streaming as `access` (data.resident_max_mb,
    data.loader_workers) decides (a tuning worker passes its per-process cache); `data_seed` seeds
    the batch order and augmentation (default train.seed); `build=False` leaves the model to the caller (a pack
    builds K of them with build_member, as this does one).
    """
    device = device_for(ctx, resolve_device(train_cfg.device))
    keep_freed_memory()  # a step's buffers stay in the process: no page faults per step (host_memory.py)
    with determinism(train_cfg.deterministic), process_group(ctx, device):
        manifest, train, val = load(Path(prepared), device, access)
        args = model_args(model_cfg, manifest)
        model = (build_member(model_cfg, train_cfg, args).to(device, memory_format=memory_format(train_cfg))
                 if build else None)  # build_member seeds the global RNG with train.seed first
        seed = train_cfg.seed if data_seed is None else data_seed
        # The batch order is the same on every rank (each takes its share of it); augmentation draws per rank.
        order = torch.Generator(device=device).manual_seed(seed)
        augment = order if not ctx.enabled else torch.Generator(device=device).manual_seed(seed + ctx.rank)
        check_augmentation(train_cfg, args.modality)
        data = EpochData(train, val, args.n_classes, train_cfg, order, augment, ctx, args.modality)
        run = RunSetup(device, ctx, seed, manifest, args, data, model)
        run.seed_rank()
        yield run
