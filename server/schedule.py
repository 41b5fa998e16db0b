"""When train rounds may start, and which federation settings a running server takes.

A federation that keeps learning as its plants produce data does not run its rounds
back to back: ``[federation] round_interval`` is the least time from one train
round's start to the next's (``"1h"``: a round an hour, each on the data that came in
meanwhile). The schedule survives a restart: a restarted server takes the start of
the newest train round from its history, so it neither starts one early nor waits a
whole interval again.

``systemctl reload`` (SIGHUP) applies the keys of :data:`LIVE_FEDERATION_KEYS` to the
running federation from its next round on (raise ``rounds`` to go on training, change
the interval, the quorum, the deadline or the local hyper-parameters); the others need
a restart, and :func:`merge_live` names them.

A federation that runs for years would grow its history without end (a row per task
and per result, every round): with ``[server] history_retention`` the
:class:`HistoryPruner` deletes the per-task rows of older rounds, a bounded batch at a
time from the loop, and keeps the one row per round.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence

from fedgate.core.config import changed_fields
from fedgate.core.errors import StoreError
from fedgate.server.config import LIVE_FEDERATION_KEYS, FederationSection
from fedgate.server.metrics import ServerMetrics
from fedgate.server.store import History

__all__ = ["RoundSchedule", "HistoryPruner", "merge_live"]

log = logging.getLogger(__name__)


class RoundSchedule:
    """Holds train rounds back until ``interval_s`` after the previous one started.

    Parameters
    ----------
    interval_s : float
        Least time between two train round starts (0: no wait).
    clock : callable
        The coordinator's clock (monotonic seconds).
    last_started : float or None
        Wall time (``time.time()``) of the newest train round's start in the history.
    metrics : ServerMetrics
        ``fedgate_server_next_round_start_timestamp_seconds`` is set while a round waits.
    """

    def __init__(self, interval_s: float, clock: Callable[[], float], last_started: float | None,
                 metrics: ServerMetrics) -> None:
        self.interval_s = float(interval_s)
        self.metrics = metrics
        # on the clock: the wall time's age carried over, so a restart keeps the pace
        self.started: float | None = None if last_started is None else \
            clock() - max(0.0, time.time() - last_started)
        self._before: float | None = self.started    # the start before the last (see retry)
        self._told: tuple[int, float] | None = None  # (round, due) whose wait was logged

    def wait_s(self, now: float) -> float:
        """Seconds until the next train round may start (0: now)."""
        if self.interval_s <= 0 or self.started is None:
            return 0.0
        return max(0.0, self.started + self.interval_s - now)

    def hold(self, rnd: int, now: float) -> bool:
        """True while train round ``rnd`` must wait (logged once per round and due time)."""
        wait = self.wait_s(now)
        if wait <= 0:
            return False
        due = now + wait
        if self._told is None or self._told[0] != rnd or abs(self._told[1] - due) > 1e-3:
            self._told = (rnd, due)
            start_wall = time.time() + wait
            self.metrics.next_round_start.set(start_wall)
            log.info("train round %d starts at %s (round_interval %gs)", rnd,
                     time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(start_wall)), self.interval_s)
        return True

    def start(self, now: float) -> None:
        """A train round started at ``now``."""
        self._before, self.started = self.started, now
        self.metrics.next_round_start.set(0)

    def retry(self) -> None:
        """The round last started is sampled again (too few usable results): it does not
        wait for another interval, its pace is that of the round before it."""
        self.started = self._before


def merge_live(running: FederationSection, new: FederationSection,
               live: Sequence[str] = LIVE_FEDERATION_KEYS) -> tuple[FederationSection, list[str], list[str]]:
    """Split a reloaded ``[federation]`` into what a running server applies and what waits.

    Returns
    -------
    (merged, applied, restart)
        ``merged``: ``running`` with the changed keys of ``live`` taken from ``new``;
        ``applied``: those keys; ``restart``: the changed keys that need a restart.
    """
    changed = changed_fields(running, new)
    applied = [k for k in changed if k in live]
    restart = [k for k in changed if k not in live]
    merged = dataclasses.replace(running, **{k: getattr(new, k) for k in applied}) if applied else running
    return merged, applied, restart


class HistoryPruner:
    """Deletes history rows older than ``retention_s``: a batch a second while there are
    any, then a look once an hour (see :meth:`History.prune`).

    Parameters
    ----------
    history : History
    retention_s : float
        Age (wall seconds) beyond which per-task rows go; 0 disables pruning.
    metrics : ServerMetrics
        ``fedgate_server_history_rows_deleted_total`` counts them.
    """

    EVERY_S = 3600.0   # between two looks when nothing was old enough
    BATCH_EVERY_S = 1.0  # between two batches of one pass

    def __init__(self, history: History, retention_s: float, metrics: ServerMetrics) -> None:
        self.history = history
        self.retention_s = float(retention_s)
        self.metrics = metrics
        self._next = -math.inf
        self._pass = 0  # rows deleted by the pass under way

    def tick(self, now: float, max_round: int) -> None:
        """Maybe delete one batch (rows of rounds up to ``max_round`` only); ``now`` on the loop's clock."""
        if self.retention_s <= 0 or now < self._next:
            return
        try:
            n = self.history.prune(time.time() - self.retention_s, max_round)
        except StoreError as exc:
            log.error("history rows not pruned (will retry in %.0fs): %s", self.EVERY_S, exc)
            self._next = now + self.EVERY_S
            return
        if n:
            self.metrics.history_deleted.inc(n)
            self._pass += n
            self._next = now + self.BATCH_EVERY_S
            return
        if self._pass:
            log.info("history: %d rows older than %gs deleted (history_retention)", self._pass, self.retention_s)
            self._pass = 0
        self._next = now + self.EVERY_S
