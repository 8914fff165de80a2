"""Workers: one runs trials until the study has n_trials (packed or one at a time); several run as processes.

A worker's loop asks tasks/tune/budget.py before each trial whether to run, wait or stop. A trial that raises
is FAIL with its reason and the worker goes on; the parent of several workers replaces one that dies (its
trial is failed with the exit signal as reason and retried), so a killed worker costs a trial's progress,
not the study.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from pathlib import Path

from tuneline.core.config.tune import TuneConfig
from tuneline.tasks.tune.budget import fail_trials_of, max_failures, next_step, worker_id
from tuneline.tasks.tune.objective import make_objective
from tuneline.tasks.tune.packed_rounds import optimize_packed, packing_size
from tuneline.tasks.tune.study import create_study

if TYPE_CHECKING:  # the root schema: not a code dep of this stage (core/config/params.py)
    from tuneline.core.config.params import Params

log = logging.getLogger(__name__)

WAIT_S = 1.0  # while others' running trials would complete the budget: how often to look again


def optimize(base: Params, cfg: TuneConfig, prepared: Path, name: str, url: str, workdir: Path,
             first_number: int = 0) -> None:
    """One worker: run trials until the study holds n_trials finished ones, or it stops (patience, failures, timeout).

    `first_number` is the first trial number of this tune call: failures from there on count toward
    tune.max_failures.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial's traceback: its reason is in trials.csv
    study = create_study(cfg, name, url)
    if next_step(study, cfg, first_number).action == "stop":
        return
    pack_size = packing_size(cfg, base)
    if pack_size:
        optimize_packed(study, base, cfg, prepared, workdir, pack_size, first_number)
        return
    objective = make_objective(base, cfg, prepared, workdir)
    started = time.monotonic()
    while cfg.timeout_s is None or time.monotonic() - started < cfg.timeout_s:
        step = next_step(study, cfg, first_number)
        if step.action == "stop":
            if step.kind != "done":
                log.warning("tune: study %s stopped: %s", name, step.reason)
            return
        if step.action == "wait":
            time.sleep(WAIT_S)
            continue
        # One trial per call: study.optimize keeps its heartbeat thread and FAIL bookkeeping; the loop decides.
        study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=False)


def run_workers(params: Params, prepared: Path, name: str, url: str, workdir: Path, workers: int,
                first_number: int = 0) -> None:
    """Run the study's trials in `workers` processes (in this one when workers <= 1), one GPU each when several.

    A worker that dies (killed, out of host memory) has its running trial failed with the reason and retried,
    and is replaced, up to tune.max_failures times in one call.
    """
    cfg = params.tune
    if workers <= 1:
        optimize(params, cfg, prepared, name, url, workdir, first_number)
        return
    gpus = _visible_gpus()
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: no forked CUDA/threads

    def start(slot: int):
        proc = ctx.Process(target=_worker, args=(params, cfg,
                                                 str(prepared), name, url, str(workdir), first_number,
                                                 gpus[slot % len(gpus)] if len(gpus) > 1 else None))
        proc.start()
        return proc

    running = {start(slot): slot for slot in range(workers)}
    try:
        _supervise(running, start, cfg, name, url, first_number)
    finally:  # the parent leaving early (Ctrl-C, an error) takes its workers with it: their data folder goes too
        for proc in running:
            proc.terminate()
            proc.join()


def _supervise(running: dict, start, cfg: TuneConfig, name: str, url: str, first_number: int) -> None:
    """Wait for the workers; fail and retry a dead one's trial and start a replacement in its slot."""
    study, replaced, died = None, 0, []
    while running:
        multiprocessing.connection.wait([proc.sentinel for proc in running])
        for proc in [p for p in running if not p.is_alive()]:
            slot = running.pop(proc)
            proc.join()
            if proc.exitcode == 0:
                continue
            owner, how = worker_id(proc.pid), _exit_reason(proc.exitcode)
            died.append(proc.exitcode)
            study = study or create_study(cfg, name, url)
            lost = fail_trials_of(study, owner, f"worker lost: process {owner} {how} mid-trial; retried")
            log.warning("tune: worker %s %s (trials %s failed and retried)", owner, how, lost or "none")
            if replaced < max_failures(cfg) and next_step(study, cfg, first_number).action != "stop":
                replaced += 1
                running[start(slot)] = slot
    if died and (study is None or next_step(study, cfg, first_number).action != "stop"):
        raise RuntimeError(f"tune: {len(died)} worker processes failed (exit codes {died}); the study keeps every "
                           "finished trial: rerun to continue")


def _exit_reason(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


def _worker(base: Params, cfg: TuneConfig, prepared: str, name: str, url: str, workdir: str, first_number: int,
            gpu: str | None) -> None:
    if gpu is not None:  # pin this worker to one GPU before CUDA initialises
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    logging.basicConfig(level=logging.WARNING)
    optimize(base, cfg, Path(prepared), name, url,
             Path(workdir), first_number)


def _visible_gpus() -> list[str]:
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
