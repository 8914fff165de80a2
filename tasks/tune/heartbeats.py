"""Heartbeats for trials asked through ask/tell, which study.optimize would otherwise send for its one trial."""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


class TrialHeartbeats:
    """Heartbeats for every trial this worker holds: study.optimize beats for its one trial, ask/tell must do it.

    Without them another worker (or a rerun) would take a trial waiting for its pack for a dead one, fail it
    and enqueue a retry.
    """

    def __init__(self, study):
        from optuna.storages._heartbeat import is_heartbeat_enabled

        self.storage = study._storage
        self.interval = self.storage.get_heartbeat_interval() if is_heartbeat_enabled(self.storage) else None
        self.trial_ids: set[int] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="tune-heartbeats", daemon=True)

    def __enter__(self) -> "TrialHeartbeats":
        if self.interval:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()

    def add(self, trial) -> None:
        if self.interval:
            self.storage.record_heartbeat(trial._trial_id)
            with self.lock:
                self.trial_ids.add(trial._trial_id)

    def discard(self, trial) -> None:
        with self.lock:
            self.trial_ids.discard(trial._trial_id)

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            with self.lock:
                ids = sorted(self.trial_ids)
            for trial_id in ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as exc:  # a missed beat is retried next interval; the grace period covers a few
                    log.debug("tune: heartbeat for trial id %d failed: %s", trial_id, exc)
