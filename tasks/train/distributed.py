"""Data-parallel training across processes, GPUs and nodes, launched by `torchrun`.

torchrun (torch.distributed.run) starts one process per device and tells each its RANK, LOCAL_RANK and
WORLD_SIZE through the environment; `tasks/train/loop.py` reads them through `context()`. One process and no
torchrun is the same code path with world size 1.

Semantics (what `train.batch_size` etc. mean under DDP): the batch size is the *global* batch. Every
rank draws the same permutation each epoch and takes its 1/world share of every global batch; DDP
averages the gradients, so an update is the one a single process would make on the whole batch and the
tuned learning rate carries over unchanged. Rank 0 alone writes the resume checkpoint, the model and the
history; every rank can resume from them (on several nodes the model folder must be shared storage).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tuneline.core.errors import StageFailed

NPROC_ENV = "TUNELINE_NPROC_PER_NODE"  # the flow's train stage launches torchrun itself when this is > 1


class DistributedTrainingFailed(StageFailed, RuntimeError):
    """A torchrun training job ended with a non-zero exit (its ranks' errors are in the log above it)."""


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def context() -> DistContext:
    """This process's place in the job, from torchrun's environment (world size 1 without torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    return DistContext(rank=int(os.environ["RANK"]), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                       world_size=world)


def device_for(ctx: DistContext, device: torch.device) -> torch.device:
    """One GPU per process (LOCAL_RANK) under torchrun; CPU processes share the host."""
    if ctx.enabled and device.type == "cuda":
        if ctx.local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"rank {ctx.rank}: LOCAL_RANK {ctx.local_rank} but only {torch.cuda.device_count()} "
                               "GPU(s) visible: lower --nproc-per-node to the GPUs on this node")
        torch.cuda.set_device(ctx.local_rank)
        return torch.device("cuda", ctx.local_rank)
    return device


@contextlib.contextmanager
def process_group(ctx: DistContext, device: torch.device):
    """Join the job's process group for the duration of a run (NCCL on GPUs, gloo on CPUs)."""
    if not ctx.enabled or dist.is_initialized():
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    try:
        yield
    finally:
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def nproc_from_env(value: str | None) -> int:
    """$TUNELINE_NPROC_PER_NODE: empty -> 1; `auto` -> every visible GPU (1 without any); else a number."""
    if not value:
        return 1
    if value.strip().lower() == "auto":
        return max(1, torch.cuda.device_count())
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{NPROC_ENV}={value!r}: expected a number of processes or `auto`") from None


def torchrun_command(nproc_per_node: int, cli_args: list[str]) -> list[str]:
    """`torchrun --standalone --nproc-per-node N -m tuneline.flows.cli ARGS` with this interpreter (one node).

    Several nodes: run torchrun yourself on each, with --nnodes, --node-rank and a rendezvous endpoint
    (README, "Scaling out").
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc_per_node}",
            "-m", "tuneline.flows.cli", *cli_args]
