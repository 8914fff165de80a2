"""One data interface for every stage that reads prepared data, with two paths: resident and streaming.

*Resident*: a split that fits `data.resident_max_mb` is read whole and held on the device (uint8), and a batch
is one index into it: the fastest path, today's. *Streaming*: a larger split stays in its shards
(tasks/data/shards.py) and batches come from a torch DataLoader whose workers gather them from memory-mapped
shards, with prefetch and (on CUDA) pinned memory; memory is a few shards per process, whatever the data's size.

Both paths walk an epoch by the same plan (`EpochPlan`), a function of (seed, epoch draw, shard counts) only:
the shard order is shuffled, then the records within each shard (prepare stored the train split shuffled, so
shards hold every class in proportion). So streaming and resident training see the same batches in the same
order, and a deterministic run gives the same weights on either path and with any number of loader workers.
Resuming at an epoch boundary replays the plan exactly; a plan position (`start`) is all a mid-epoch resume needs.

Under DDP with at least two shards per rank, the ranks take disjoint sets of shards (each rank reads only its
own); the shorter ranks wrap around their own records so every rank takes the same number of steps. With fewer
shards (small data), every rank takes its share of each global batch, as a single process would batch them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tuneline.tasks.data.shards import SplitShards, gather_rows, large_buffers_straight_to_the_os

log = logging.getLogger(__name__)

RESIDENT_SHARE = 0.5  # of free device (or host) memory, when data.resident_max_mb is not set
MAX_AUTO_WORKERS = 4


@dataclass(frozen=True)
class DataAccess:
    """How stages read prepared data (data.resident_max_mb, data.loader_workers): never what they compute."""

    resident_max_mb: float | None = None
    loader_workers: int | None = None

    @classmethod
    def from_config(cls, data_cfg) -> DataAccess:
        return cls(resident_max_mb=data_cfg.resident_max_mb, loader_workers=data_cfg.loader_workers)

    def budget_mb(self, device: torch.device) -> tuple[float, str]:
        """The resident budget in MB, and where it comes from (for the log)."""
        if self.resident_max_mb is not None:
            return float(self.resident_max_mb), "data.resident_max_mb"
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return free / 1e6 * RESIDENT_SHARE, f"{RESIDENT_SHARE:.0%} of the free memory of {device}"
        import psutil

        return (psutil.virtual_memory().available / 1e6 * RESIDENT_SHARE,
                f"{RESIDENT_SHARE:.0%} of the available host memory")

    def workers(self, device: torch.device) -> int:
        if self.loader_workers is not None:
            return self.loader_workers
        if device.type != "cuda":
            return 0  # the CPU's cores train; a gather from a mapped shard is a memory copy (docs/data.md)
        import os

        return min(MAX_AUTO_WORKERS, max((os.cpu_count() or 2) // 2, 1))

    def resident(self, nbytes: int, device: torch.device, what: str) -> bool:
        """Whether `what` (nbytes) is held on the device; the choice and its reason are logged."""
        budget, why = self.budget_mb(device)
        held = nbytes / 1e6 <= budget
        log.info("data: %s %.0f MB %s the resident budget %.0f MB (%s): %s", what, nbytes / 1e6,
                 "within" if held else "over", budget, why,
                 f"held on {device}" if held else f"streamed from its shards ({self.workers(device)} loader workers)")
        return held


# --- The epoch plan ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EpochPlan:
    """One rank's walk through one epoch: `rows` (indices into the split's stored order) cut at `bounds`."""

    rows: np.ndarray
    bounds: np.ndarray  # step k is rows[bounds[k]:bounds[k + 1]]

    @property
    def steps(self) -> int:
        return len(self.bounds) - 1

    def step(self, k: int) -> np.ndarray:
        return self.rows[self.bounds[k]:self.bounds[k + 1]]

    @classmethod
    def make(cls, shard_counts: list[int], seed: int, batch_size: int, rank: int = 0, world: int = 1,
             limit: int | None = None) -> EpochPlan:
        """The plan for an epoch drawn as `seed`: the same on every rank and for any reader of the split."""
        rng = np.random.default_rng(seed)
        starts = np.concatenate([[0], np.cumsum(shard_counts)]).astype(np.int64)
        shard_order = rng.permutation(len(shard_counts))
        within = [starts[s] + rng.permutation(n) for s, n in enumerate(shard_counts)]  # every shard, fixed order
        if world > 1 and len(shard_counts) >= 2 * world:
            return cls._disjoint(shard_order, within, batch_size, rank, world, limit)
        order = np.concatenate([within[s] for s in shard_order]) if shard_counts else np.empty(0, np.int64)
        if limit is not None:
            order = order[:limit]
        # Each global batch of batch_size, this rank's share of it; a batch too small for batch norm is skipped.
        pieces, bounds = [], [0]
        for start in range(0, len(order), batch_size):
            if min(batch_size, len(order) - start) < 2 * world:
                continue
            pieces.append(order[start:start + batch_size][rank::world])
            bounds.append(bounds[-1] + len(pieces[-1]))
        rows = np.concatenate(pieces) if pieces else np.empty(0, np.int64)
        return cls(rows.astype(np.int64), np.asarray(bounds, dtype=np.int64))

    @classmethod
    def _disjoint(cls, shard_order, within, batch_size, rank, world, limit) -> EpochPlan:
        local = max(batch_size // world, 1)
        per_rank = [np.concatenate([within[s] for s in shard_order[r::world]]) for r in range(world)]
        if limit is not None:
            per_rank = [rows[:-(-limit // world)] for rows in per_rank]
        # The longest share any draw could give a rank (its ceil(shards / world) largest shards): steps per epoch
        # then do not depend on the draw (the schedule and the progress bar count them before the epoch).
        longest = sum(sorted((len(w) for w in within), reverse=True)[:-(-len(within) // world)])
        if limit is not None:
            longest = min(longest, -(-limit // world))
        steps = -(-longest // local)
        mine = per_rank[rank]
        # Wrap around this rank's own records (as DistributedSampler pads) so every rank takes `steps` steps.
        rows = np.resize(mine, steps * local) if len(mine) else mine
        if len(rows) and len(rows) - (steps - 1) * local < 2:  # a last batch of one: batch norm cannot take it
            steps -= 1
            rows = rows[:steps * local]
        return cls(rows.astype(np.int64), np.arange(0, steps * local + 1, local, dtype=np.int64))

    def shards_read(self, shard_counts: list[int]) -> set[int]:
        """The shards this plan reads from (tests: DDP ranks read disjoint shards)."""
        starts = np.concatenate([[0], np.cumsum(shard_counts)])
        return set(np.unique(np.searchsorted(starts, self.rows, side="right") - 1).tolist())


def epoch_seed(generator: torch.Generator) -> int:
    """One draw from a run's order generator per epoch: the plan's seed (so resume, which restores the generator,
    replays it)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())


# --- Reading a split -----------------------------------------------------------------------------------------

class _PlanBatches(torch.utils.data.Dataset):
    """Map-style: item k is step k of a plan, gathered from the split's shards (in a loader worker)."""

    def __init__(self, shards: SplitShards, plan: EpochPlan):
        self.shards, self.plan = shards, plan

    def __len__(self) -> int:
        return self.plan.steps

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = gather_rows(self.shards, self.plan.step(k))
        return torch.from_numpy(x), torch.from_numpy(y)


class SplitReader:
    """A prepared split for one stage: resident (on the device) or streaming (shards through a DataLoader)."""

    def scoring_stage(self) -> None:
        """A stage that only scores a streamed split (evaluate, export, promote): give its batch-sized buffers
        their own mappings (large_buffers_straight_to_the_os), so the heap does not creep batch by batch. Not
        for training: there every activation would pay a fresh mapping (streamed training ran at half speed)."""
        if not self.resident:
            large_buffers_straight_to_the_os()

    def __init__(self, prepared_dir: Path, split: str, device: torch.device, access: DataAccess = DataAccess(),
                 resident: bool | None = None):
        from tuneline.tasks.data.prepare import load_manifest

        self.device, self.access = torch.device(device), access
        self.shards = SplitShards(Path(prepared_dir), split, load_manifest(prepared_dir))
        self.split = split
        if resident is None:
            resident = access.resident(self.shards.nbytes, self.device, f"{split} split ({self.shards.count} records)")
        self.resident = resident
        self.x = self.y = None
        # Every file's checksum, once, here: forked loader workers inherit the result instead of each re-reading.
        self.shards.verify()
        if resident:
            x, y = self.shards.read(0, self.shards.count)
            self.shards.close()
            self.x = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
            self.y = torch.from_numpy(np.ascontiguousarray(y)).to(self.device)

    def __len__(self) -> int:
        return self.shards.count

    @property
    def shard_counts(self) -> list[int]:
        return [s.count for s in self.shards.shards]

    def labels(self) -> torch.Tensor:
        """Every label, on the device (8 bytes a record)."""
        return self.y if self.resident else torch.from_numpy(self.shards.labels()).to(self.device)

    def _loader(self, dataset: torch.utils.data.Dataset, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        workers = self.access.workers(self.device)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, sampler=range(start, len(dataset)), num_workers=workers,
            pin_memory=self.device.type == "cuda", prefetch_factor=4 if workers else None,
            persistent_workers=False,
            # Its own generator: a loader draws a base seed when it starts, which from the global RNG would shift
            # every later dropout draw (streaming and resident runs would then differ).
            generator=torch.Generator().manual_seed(0))
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def walk(self, plan: EpochPlan, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The plan's steps from `start` as (uint8 records, int64 labels) on the device."""
        if self.resident:
            rows = torch.from_numpy(plan.rows).to(self.device)
            for k in range(start, plan.steps):
                idx = rows[plan.bounds[k]:plan.bounds[k + 1]]
                yield self.x[idx], self.y[idx]
        else:
            yield from self._loader(_PlanBatches(self.shards, plan), start)

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The split (its first `limit` records) in stored order, batch by batch, on the device."""
        stop = len(self) if limit is None else min(limit, len(self))
        if self.resident:
            for start in range(0, stop, batch_size):
                yield self.x[start:start + batch_size][:stop - start], self.y[start:start + batch_size][:stop - start]
            return
        rows = np.arange(stop, dtype=np.int64)
        plan = EpochPlan(rows, np.append(np.arange(0, stop, batch_size), stop).astype(np.int64))
        yield from self._loader(_PlanBatches(self.shards, plan))

    def take(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n records (stored order: val and test keep the source's order), whole, on the device."""
        n = min(n, len(self))
        if self.resident:
            return self.x[:n], self.y[:n]
        x, y = self.shards.read(0, n)
        return torch.from_numpy(np.ascontiguousarray(x)).to(self.device), torch.from_numpy(y).to(self.device)

    def sample(self, n: int, seed: int) -> torch.Tensor:
        """n records drawn without replacement (seeded), e.g. INT8 calibration images, on the device."""
        n = min(n, len(self))
        rows = np.sort(np.random.default_rng(seed).choice(len(self), size=n, replace=False))
        if self.resident:
            return self.x[torch.from_numpy(rows).to(self.device)]
        return torch.from_numpy(gather_rows(self.shards, rows)[0]).to(self.device)


class TensorSplit:
    """Images and labels already in memory, read through SplitReader's methods (tests, callers with tensors)."""

    resident = True

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.x, self.y = images, labels

    def __len__(self) -> int:
        return len(self.y)

    def labels(self) -> torch.Tensor:
        return self.y

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        stop = len(self) if limit is None else min(limit, len(self))
        for start in range(0, stop, batch_size):
            end = min(start + batch_size, stop)
            yield self.x[start:end], self.y[start:end]

    def take(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[:n], self.y[:n]

    def sample(self, n: int, seed: int) -> torch.Tensor:
        n = min(n, len(self))
        rows = np.sort(np.random.default_rng(seed).choice(len(self), size=n, replace=False))
        return self.x[torch.from_numpy(rows).to(self.x.device)]
