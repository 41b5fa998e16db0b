"""The outbox's background hardening: coalesced fdatasync passes and WAL checkpoints.

Every write the outbox commits (WAL mode, ``synchronous=NORMAL``) is counted here
(:meth:`Hardener.kick`). A stored result wakes one background thread
(``outbox-harden``) unless it is already awake: it ``fdatasync``-s the dirty slot
files, the WAL and, when a checkpoint changed it, the database file, then marks every
write counted before the pass as hardened. Passes are at least ``spacing_s`` apart,
so results that come faster share one; the thread exits after ``linger_s`` without
writes (first applying the outbox's deferred deletes through a callback), and the
next write starts a new one. The WAL is checkpointed by the same thread once about
1 MiB went into it, on its own connection (PASSIVE: it never waits for the uplink).
"""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from fedgate.agent.outbox_slots import PayloadSlots

__all__ = ["Hardener"]

log = logging.getLogger(__name__)

_CHECKPOINT_WAL_BYTES = 1 << 20  # checkpoint the WAL (off the send path) once it is this large
_TRUST_MTIME_NS = 50_000_000     # a file time this old changes with the next write (coarse kernel clock)


class Hardener:
    """Counts the outbox's writes and makes them durable in the background.

    Parameters
    ----------
    path : Path
        The SQLite database file (its WAL is ``<path>-wal``).
    slots : PayloadSlots
        The outbox's payload files, synced by every pass.
    flush : callable
        Applies the outbox's deferred deletes (called on the thread before it idles out;
        may raise :class:`~fedgate.core.errors.StoreError`).
    linger_s, spacing_s : float
        Idle time before the thread exits; least time between two passes.
    """

    def __init__(self, path: Path, slots: PayloadSlots, flush: Callable[[], None], *,
                 linger_s: float, spacing_s: float) -> None:
        self.path = path
        self._wal_path = path.with_name(path.name + "-wal")
        self._slots = slots
        self._flush = flush
        self._linger_s = linger_s
        self._spacing_s = spacing_s
        self.lock = threading.Lock()                 # guards the state below
        self._wake = threading.Condition(self.lock)  # a pass finished (wait)
        self._work = threading.Condition(self.lock)  # a write to harden (the thread)
        self._sync_lock = threading.Lock()           # one pass at a time
        self._fds: dict[Path, tuple[int, int]] = {}  # path -> (fd, inode); see _fd
        self._stale_fds: list[int] = []
        self._db_synced: tuple[int, int] | None = None  # (mtime_ns, size) of the database at its last fsync
        self.written = 1            # writes committed so far (the schema is the first)
        self.hardened = 0           # writes known to be on stable storage
        self.deferred = False       # the outbox holds deferred deletes (set under self.lock)
        self._thread: threading.Thread | None = None
        self._sleeping = False      # the thread waits for a write (needs a notify)
        self._closing = False
        self.errors = 0
        self.passes = 0
        self.calls = 0              # fsync/fdatasync system calls made by the passes
        self.checkpoints = 0
        self.checkpointed = 0       # writes moved from the WAL into the database file
        self._wal_bytes = 0         # about how much the WAL holds since it last started over
        self._backfilled = False    # the last checkpoint moved every frame: the WAL starts over

    def kick(self, nbytes: int, harden: bool) -> None:
        """Count a committed write of about ``nbytes`` into the WAL; ``harden``: make sure
        a pass will cover it (deletes do not ask: they ride with the next result)."""
        with self.lock:
            self.written += 1
            if self._backfilled:
                self._backfilled, self._wal_bytes = False, 0
            self._wal_bytes += nbytes
            if self._closing or not harden:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="outbox-harden", daemon=True)
                self._thread.start()
            elif self._sleeping:  # else it is in a pass or spacing them: it looks again before sleeping
                self._sleeping = False
                self._work.notify()

    def defer(self) -> None:
        """The outbox deferred a delete: make sure a thread is there to apply it once idle."""
        with self.lock:
            self.deferred = True
            if self._thread is None and not self._closing:
                self._thread = threading.Thread(target=self._loop, name="outbox-harden", daemon=True)
                self._thread.start()

    def sync(self) -> bool:
        """One pass now, in the calling thread, covering every write counted so far."""
        with self.lock:
            target = self.written
        return self._harden(target)

    def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the passes to cover every write counted so far."""
        deadline = time.monotonic() + timeout_s
        with self.lock:
            target = self.written
            while self.hardened < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wake.wait(min(left, 0.05))
        return True

    def stop(self) -> None:
        """Stop the thread (the caller then applies what is left and calls :meth:`sync`)."""
        with self.lock:
            self._closing = True
            thread = self._thread
            self._work.notify_all()
        if thread is not None:
            thread.join()

    def close(self) -> None:
        """Close the kept descriptors, after the SQLite connections (see :meth:`_fd`)."""
        with self._sync_lock:
            for fd in [*(fd for fd, _ in self._fds.values()), *self._stale_fds]:
                os.close(fd)
            self._fds.clear()
            self._stale_fds.clear()
            self._slots.close()

    # -- the thread ---------------------------------------------------------------
    def _loop(self) -> None:
        ckpt: list[sqlite3.Connection] = []  # this thread's own connection for checkpoints
        last = -self._spacing_s
        try:
            while True:
                with self.lock:
                    if self.hardened >= self.written and not self._closing:
                        self._sleeping = True
                        self._work.wait(self._linger_s)
                        self._sleeping = False
                    if self._closing:
                        self._thread = None  # close() hardens what is left
                        return
                    idle = self.hardened >= self.written
                    if idle and not self.deferred:
                        self._thread = None  # idle: exit; the next write starts a new one
                        return
                    wait = last + self._spacing_s - time.monotonic()
                    if not idle and wait > 0:  # a pass ran just now: let this burst grow
                        self._work.wait(wait)
                    target = self.written
                if idle:  # no write for linger_s: apply the deferred deletes (hardened next turn)
                    if not self._flush_or_quit():
                        return
                    continue
                ok = self._harden(target)
                last = time.monotonic()
                if ok:
                    self._maybe_checkpoint(ckpt, target)
                else:
                    time.sleep(0.1)  # a failing disk: do not spin
        finally:
            for db in ckpt:
                db.close()

    def _flush_or_quit(self) -> bool:
        try:
            self._flush()
            return True
        except Exception as exc:  # StoreError: the next write retries; the thread must end cleanly
            log.error("outbox %s: deferred delete failed (retried with the next write): %s", self.path, exc)
            with self.lock:
                self._thread = None
            return False

    def _harden(self, target: int) -> bool:
        """fsync the slot files, the WAL and the database file: every write up to
        ``target`` is then durable."""
        with self._sync_lock:
            with self.lock:
                if self.hardened >= target:
                    return True
            try:
                calls = self._slots.fsync_dirty()  # payload files (order does not matter: CRC-checked)
                got = self._fd(self._wal_path)
                if got is not None:
                    os.fdatasync(got[0])
                    calls += 1
                calls += self._sync_db_file()
            except OSError as exc:
                self.errors += 1
                log.error("outbox %s: fsync failed (results stay in the OS cache, retried): %s", self.path, exc)
                return False
            self.passes += 1
            self.calls += calls
            with self.lock:
                self.hardened = max(self.hardened, target)
                self._wake.notify_all()
            return True

    def _sync_db_file(self) -> int:
        """fdatasync the database file unless it is unchanged since the last time (in WAL
        mode only checkpoints write it); returns the number of calls made."""
        got = self._fd(self.path)
        if got is None:
            return 0
        fd, st = got
        seen = (st.st_mtime_ns, st.st_size)
        if seen == self._db_synced:
            return 0
        os.fdatasync(fd)
        # a file time older than the kernel's clock tick surely changes with the next write
        self._db_synced = seen if time.time_ns() - st.st_mtime_ns > _TRUST_MTIME_NS else None
        return 1

    def _fd(self, path: Path) -> tuple[int, os.stat_result] | None:
        """A descriptor of ``path`` to fsync through, opened once and kept open, and the
        file's status (one ``stat`` per call).

        Closing any descriptor of a file drops every POSIX lock this process holds on
        it, SQLite's included: another process would then think the database idle and
        delete its WAL under our connections. So descriptors are only ever closed by
        :meth:`close`, after the connections; a WAL file that was replaced (new inode)
        gets a new descriptor and the stale one waits for :meth:`close` too.
        """
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None  # no WAL: everything is in the (synced) database file
        kept = self._fds.get(path)
        if kept is not None and kept[1] == st.st_ino:
            return kept[0], st
        if kept is not None:
            self._stale_fds.append(kept[0])
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(fd)  # (replaced between stat and open: this is the file we sync)
        self._fds[path] = (fd, st.st_ino)
        if path == self.path:
            self._db_synced = None
        return fd, st

    def _maybe_checkpoint(self, ckpt: list[sqlite3.Connection], target: int) -> None:
        """Move the WAL into the database (PASSIVE: never waits for the uplink's writes).

        Once every frame is in the database, the next write starts the WAL file over,
        so it stays about one round of results large.
        """
        with self.lock:
            grown = self._wal_bytes
        if grown < _CHECKPOINT_WAL_BYTES:  # (the WAL file keeps its size when it starts over: count bytes)
            self.checkpointed = target
            return
        try:
            if not ckpt:
                ckpt.append(sqlite3.connect(str(self.path), timeout=0.0, isolation_level=None))
            busy, frames, moved = ckpt[0].execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            self.checkpoints += 1
            if not busy and frames == moved:
                self.checkpointed = target
                with self.lock:
                    self._backfilled = self.written == target
        except sqlite3.Error as exc:
            log.debug("outbox %s: checkpoint postponed: %s", self.path, exc)
