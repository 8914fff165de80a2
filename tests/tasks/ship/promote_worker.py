"""The body of each process in the promotion race (tests/tasks/ship/test_promote_race.py), kept out of the test
module so a spawned worker imports only this and tuneline.tasks.ship.promote.

Both variants hold the critical section open for `hold_s` after reading the champion (a sleep after `_compare`),
so that racing workers overlap there. `mode="unlocked"` is the mutant: run_promote's own `registry.locked()`
becomes a no-op, while each registration and each alias move still takes the real lock by itself (so what breaks
is only compare-then-promote being one step, not the registry's own writes).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path


def unlocked_registry():
    """The mutant's Registry: `with registry.locked()` in run_promote guards nothing; register and promote still
    take the real lock, each on its own."""
    from tuneline.tasks.ship.registry import Registry

    class Unlocked(Registry):
        def locked(self):
            return contextlib.nullcontext()

        def register(self, *args, **kwargs):
            with Registry.locked(self):
                return super().register(*args, **kwargs)

        def promote(self, *args, **kwargs):
            with Registry.locked(self):
                return super().promote(*args, **kwargs)

    return Unlocked


def race_promote(mode: str, registry_dir: str, model: str, prepared: str, eval_json: str, export_json: str,
                 hold_s: float, barrier, results) -> None:
    """Wait for every worker, then run the real promote step on `model`; put (model, version, promoted, comparison)."""
    from tuneline.core.config.gate import GateConfig
    from tuneline.tasks.ship import promote

    compare = promote._compare

    def slow_compare(*args, **kwargs):
        judged = compare(*args, **kwargs)
        time.sleep(hold_s)  # between reading the champion and moving the alias: the window the lock must close
        return judged

    promote._compare = slow_compare
    if mode == "unlocked":
        promote.Registry = unlocked_registry()
    elif mode != "locked":
        raise ValueError(f"mode {mode!r}: 'locked' (the real step) or 'unlocked' (the mutant)")
    barrier.wait(timeout=120)  # a worker that failed to start breaks the barrier for all instead of hanging them
    result = promote.run_promote(GateConfig(max_regression=1.0), Path(registry_dir), Path(model), Path(prepared),
                                 Path(eval_json), Path(export_json), name="race", run_id=Path(model).stem)
    results.put((Path(model).stem, result.version, result.promoted, result.comparison))
