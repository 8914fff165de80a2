"""The tune stage: an Optuna study over the training knobs.

stage.py (run_tune, the trial data slice) -> workers.py (processes) -> objective.py (one trial alone) or
packed_rounds.py (K trials per pack, with heartbeats.py); space.py (search space), study.py (name, sampler,
pruner), storage.py (SQLite/PostgreSQL), results.py (TuneResult, trials.csv, best_params.json, plots).
"""
