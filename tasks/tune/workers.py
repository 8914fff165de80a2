"""Workers: one runs trials until the study has n_trials (packed or one at a time); several run as processes."""

from __future__ import annotations

import logging
import multiprocessing
import os
from pathlib import Path

from tasks.config import Params, TuneConfig
from tasks.tune.objective import make_objective
from tasks.tune.packed_rounds import optimize_packed, packing_size
from tasks.tune.study import create_study


def optimize(base: Params, cfg: TuneConfig, prepared: Path, name: str, url: str, workdir: Path) -> None:
    """One worker: run trials until the study holds n_trials finished ones (or the timeout passes)."""
    import optuna
    import torch

    from tasks.train.loop import DivergedError

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = create_study(cfg, name, url)
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    done = len(study.get_trials(deepcopy=False, states=states))
    if done >= cfg.n_trials:
        return
    pack_size = packing_size(cfg, base)
    if pack_size:
        optimize_packed(study, base, cfg, prepared, workdir, pack_size)
        return
    study.optimize(make_objective(base, cfg, prepared, workdir), timeout=cfg.timeout_s,
                   callbacks=[optuna.study.MaxTrialsCallback(cfg.n_trials, states=states)],
                   catch=(DivergedError, torch.cuda.OutOfMemoryError), gc_after_trial=False)


def run_workers(params: Params, prepared: Path, name: str, url: str, workdir: Path, workers: int) -> None:
    """Run the study's trials in `workers` processes (in this one when workers <= 1), one GPU each when several."""
    cfg = params.tune
    if workers <= 1:
        optimize(params, cfg, prepared, name, url, workdir)
        return
    gpus = _visible_gpus()
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: no forked CUDA/threads
    procs = [ctx.Process(target=_worker, args=(params.model_dump(mode="json"), cfg.model_dump(mode="json"),
                                                 str(prepared), name, url, str(workdir),
                                                 gpus[i % len(gpus)] if len(gpus) > 1 else None))
             for i in range(workers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"tune: {len(failed)} of {workers} workers failed (exit codes {failed}); "
                           "the study keeps every finished trial: rerun to continue")


def _worker(base_json: dict, cfg_json: dict, prepared: str, name: str, url: str, workdir: str, gpu: str | None) -> None:
    if gpu is not None:  # pin this worker to one GPU before CUDA initialises
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    logging.basicConfig(level=logging.WARNING)
    optimize(Params.model_validate(base_json), TuneConfig.model_validate(cfg_json), Path(prepared), name, url, Path(workdir))


def _visible_gpus() -> list[str]:
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
