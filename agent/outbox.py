"""The uplink's durable outbox: results kept on disk until their round is committed.

A result (the header fields of a ``result`` message and its encoded payload) is
written to a table of the agent's SQLite state file *before* it is sent. It stays
there, and is re-sent after every reconnect, until the server announces ``committed``
for its round; the server's once-only check on the task nonce keeps anything from
being counted twice.

Durability, precisely (WAL mode, ``synchronous=NORMAL`` on the outbox's connection):

* When :meth:`Outbox.put` returns, the row is committed to the WAL file through the
  OS: it is in the kernel's page cache, not only in this process. A ``kill -9`` (or
  any crash) of the agent at any later moment loses nothing, so the uplink sends the
  result right after ``put`` without waiting for the disk.
* Power loss or a kernel crash is covered *shortly after*: every stored result wakes a
  background thread (``outbox-harden``) that ``fsync``-s the WAL and the database
  file, coalescing all writes made meanwhile (one fsync per burst, off the send
  path). Only results written in the last few milliseconds before a power cut can
  be lost; such a result was at most just sent, and the server, which never counts
  a task twice and re-issues nothing it did not aggregate, closes the round without
  it (as for an agent that died mid-round). Deletes (of committed or rejected
  results) are hardened with the next stored result: one lost to a power cut only
  brings back a result the server refuses as stale. :meth:`Outbox.sync` hardens on
  demand and :meth:`Outbox.close` always does.
* The WAL is checkpointed into the database by the same thread (the outbox's own
  connection never checkpoints inline, so a large payload never puts an fsync on
  the send path).

The table lives beside the agent's own tables in the same file (WAL mode, so the
agent's store and the uplink can both use it). Payloads of 64 KiB or more are kept
in reusable slot files beside it (``<state file>.outbox/``, see
:mod:`fedgate.agent.outbox_slots`): the file is written before the row that names it
(with its length and CRC-32), both are fsynced by the same background pass (slots
first), and a row whose slot does not hold exactly its payload is dropped with an
error and counted (:attr:`Outbox.corrupt_payloads`), never sent.

>>> import tempfile, os
>>> box = Outbox(os.path.join(tempfile.mkdtemp(), "state.db"))
>>> box.put(OutboxEntry(task_id="ab" * 16, round=3, kind="train", fields={"n_samples": 10}, payload=b"xyz"))
>>> [e.round for e in box.pending()], box.count()
([3], 1)
>>> box.drop_through(3), box.count()
(1, 0)
>>> box.sync(), box.durable
(True, True)
>>> box.close()
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedgate.agent.outbox_slots import SLOT_MIN_BYTES, PayloadSlots
from fedgate.core.errors import StoreError

__all__ = ["Outbox", "OutboxEntry"]

log = logging.getLogger(__name__)

_HARDEN_IDLE_S = 0.5           # the background thread exits after this long without writes
_CHECKPOINT_WAL_BYTES = 1 << 20  # checkpoint the WAL (off the send path) once it is this large

_SCHEMA = """
CREATE TABLE IF NOT EXISTS uplink_outbox (
    task_id    TEXT PRIMARY KEY,
    round      INTEGER NOT NULL,
    kind       TEXT NOT NULL,
    fields     TEXT NOT NULL,
    payload    BLOB,
    created_ts REAL NOT NULL,
    sends      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS uplink_outbox_round ON uplink_outbox(round);
"""
# payloads of SLOT_MIN_BYTES or more live in slot files (fedgate.agent.outbox_slots)
_SLOT_COLUMNS = (("payload_slot", "INTEGER"), ("payload_len", "INTEGER"), ("payload_crc", "INTEGER"))
_COLUMNS = "task_id, round, kind, fields, payload, created_ts, sends, payload_slot, payload_len, payload_crc"


@dataclass(frozen=True, kw_only=True)
class OutboxEntry:
    """One result waiting for its round to be committed.

    Attributes
    ----------
    task_id : str
        The server-issued task nonce the result answers.
    round : int
        The round the task belongs to.
    kind : str
        ``"statistics"``, ``"train"`` or ``"evaluate"``.
    fields : dict
        The ``result`` header fields (JSON-serialisable).
    payload : bytes or None
        The codec-encoded parameter vector (train results), else None.
    created_ts : float
        ``time.time()`` when the result was stored.
    sends : int
        How many times it has been handed to the socket.
    """

    task_id: str
    round: int
    kind: str
    fields: dict[str, Any]
    payload: bytes | None = None
    created_ts: float = field(default_factory=time.time)
    sends: int = 0


class Outbox:
    """A crash-safe queue of results in the agent's SQLite state file.

    Parameters
    ----------
    db_path : str or Path
        The agent's state database; created if missing. The table
        ``uplink_outbox`` is created on first use.

    Notes
    -----
    Thread-safe: the uplink stores results from its worker thread and deletes them
    from its event-loop thread. SQLite and OS errors become :class:`StoreError`
    (a failed background fsync is logged and counted in :attr:`harden_errors`, and
    retried on the next write or :meth:`sync`).
    """

    def __init__(self, db_path: str | Path) -> None:
        self.path = Path(db_path)
        self._wal_path = self.path.with_name(self.path.name + "-wal")
        self._lock = threading.Lock()
        self._hlock = threading.Lock()          # guards the hardening state below
        self._sync_lock = threading.Lock()      # one fsync pass at a time
        self._sync_fds: dict[Path, int] = {}    # see _sync_fd: never closed before close()
        self._stale_fds: list[int] = []
        self._wake = threading.Condition(self._hlock)
        self._written = 1                       # writes committed so far (the schema is the first)
        self._hardened = 0                      # writes known to be on stable storage
        self._thread: threading.Thread | None = None
        self._closing = False
        self.harden_errors = 0
        self.fsyncs = 0
        self.checkpoints = 0
        self.checkpointed = 0                   # writes moved from the WAL into the database file
        self._wal_bytes = 0                     # about how much the WAL holds since it last started over
        self._backfilled = False                # the last checkpoint moved every frame: the WAL starts over
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None,
                                       check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints run on the harden thread
            self._db.execute("PRAGMA busy_timeout=30000")
            self._db.execute("PRAGMA cache_size=-16384")  # a 4 MB payload fits: cheaper deletes
            self._db.executescript(_SCHEMA)
            have = {r[1] for r in self._db.execute("PRAGMA table_info(uplink_outbox)")}
            for name, kind in _SLOT_COLUMNS:
                if name not in have:  # a state file from before slot files
                    self._db.execute(f"ALTER TABLE uplink_outbox ADD COLUMN {name} {kind}")
            self._slot_of: dict[str, tuple[int, int]] = {}   # task_id -> (round, slot)
            self._slots = PayloadSlots(self.path.with_name(self.path.name + ".outbox"))
            for tid, rnd, slot in self._db.execute(
                    "SELECT task_id, round, payload_slot FROM uplink_outbox WHERE payload_slot IS NOT NULL"):
                self._slot_of[tid] = (int(rnd), int(slot))
                self._slots.mark_used(int(slot))
        except sqlite3.Error as exc:
            raise StoreError(f"outbox {self.path}: cannot open: {exc}") from exc
        except OSError as exc:
            raise StoreError(f"outbox {self.path}: cannot open its payload slots: {exc}") from exc
        self.corrupt_payloads = 0
        self._fsync_dir()
        self.sync()

    # -- writes -------------------------------------------------------------------
    def put(self, entry: OutboxEntry) -> None:
        """Store ``entry`` before it is ever sent (safe from a crash of this process at once,
        from power loss once the background fsync ran; see the module docstring).

        A second ``put`` of the same task_id replaces the first (a re-run task).
        """
        text = json.dumps(entry.fields, allow_nan=False)
        payload = None if entry.payload is None else memoryview(entry.payload).cast("B")
        sql = (f"INSERT OR REPLACE INTO uplink_outbox({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)")
        if payload is None or len(payload) < SLOT_MIN_BYTES:
            row = (entry.task_id, entry.round, entry.kind, text, payload, entry.created_ts, entry.sends,
                   None, None, None)
            self._write(sql, row, 1024 + len(text) + (0 if payload is None else len(payload)),
                        release=(entry.task_id,))
            return
        with self._lock:  # the file first, then the row that names it
            self._conn()
            slot = self._slots.claim()
            try:
                crc = self._slots.write(slot, entry.task_id, payload)
            except OSError as exc:
                self._slots.release(slot)
                raise StoreError(f"outbox {self.path}: cannot write payload slot {slot}: {exc}") from exc
            row = (entry.task_id, entry.round, entry.kind, text, None, entry.created_ts, entry.sends,
                   slot, len(payload), crc)
            try:
                self._write(sql, row, 1024 + len(text), release=(entry.task_id,), locked=True)
            except StoreError:
                self._slots.release(slot)
                raise
            self._slot_of[entry.task_id] = (entry.round, slot)

    def remove(self, task_id: str) -> bool:
        """Delete one entry; True if it was there."""
        return self._write("DELETE FROM uplink_outbox WHERE task_id = ?", (task_id,), 4096, harden=False,
                           release=(task_id,)) > 0

    def drop_through(self, round_: int) -> int:
        """Delete every entry of a round ``<= round_`` (those rounds are committed)."""
        with self._lock:
            gone = tuple(t for t, (r, _) in self._slot_of.items() if r <= round_)
        return self._write("DELETE FROM uplink_outbox WHERE round <= ?", (int(round_),), 4096, harden=False,
                           release=gone)

    # -- durability ---------------------------------------------------------------
    @property
    def writes(self) -> int:
        """Writes committed so far (a sequence number; :attr:`checkpointed` compares to it)."""
        with self._hlock:
            return self._written

    @property
    def durable(self) -> bool:
        """True when every write so far has been fsynced (deletes are hardened lazily)."""
        with self._hlock:
            return self._hardened >= self._written

    def sync(self) -> bool:
        """fsync every write made so far now (in the calling thread); True on success."""
        with self._hlock:
            target = self._written
        return self._harden(target)

    def wait_durable(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the background thread to harden every write so far."""
        deadline = time.monotonic() + timeout_s
        with self._hlock:
            target = self._written
            while self._hardened < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wake.wait(min(left, 0.05))
        return True

    # -- reads --------------------------------------------------------------------
    def get(self, task_id: str) -> OutboxEntry | None:
        """The entry for ``task_id``, or None."""
        rows = self._read(f"SELECT {_COLUMNS} FROM uplink_outbox WHERE task_id = ?", (task_id,))
        entries = self._entries(rows)
        return entries[0] if entries else None

    def pending(self) -> list[OutboxEntry]:
        """Every stored entry, oldest round first."""
        rows = self._read(f"SELECT {_COLUMNS} FROM uplink_outbox ORDER BY round, created_ts", ())
        return self._entries(rows)

    def count(self) -> int:
        """Number of stored entries."""
        return int(self._read("SELECT COUNT(*) FROM uplink_outbox", ())[0][0])

    def size_bytes(self) -> int:
        """Total payload bytes held."""
        return int(self._read("SELECT COALESCE(SUM(COALESCE(payload_len, LENGTH(payload))), 0) "
                              "FROM uplink_outbox", ())[0][0])

    def close(self) -> None:
        """Stop the background thread, fsync what is left, close (idempotent)."""
        with self._hlock:
            self._closing = True
            thread = self._thread
            self._wake.notify_all()
        if thread is not None:
            thread.join()
        if self._db is not None:
            self.sync()
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None  # type: ignore[assignment]
        with self._sync_lock:
            for fd in [*self._sync_fds.values(), *self._stale_fds]:
                os.close(fd)
            self._sync_fds.clear()
            self._stale_fds.clear()

    # -- internals ----------------------------------------------------------------
    def _write(self, sql: str, args: tuple[Any, ...], nbytes: int, *, harden: bool = True,
               release: tuple[str, ...] = (), locked: bool = False) -> int:
        """One statement in autocommit mode (its own transaction; WAL, synchronous=NORMAL).

        ``release``: task ids whose payload slots are free once it committed.
        """
        if not locked:
            with self._lock:
                return self._write(sql, args, nbytes, harden=harden, release=release, locked=True)
        db = self._conn()
        try:
            n = db.execute(sql, args).rowcount
        except sqlite3.Error as exc:
            raise StoreError(f"outbox {self.path}: write failed: {exc}") from exc
        for tid in release:
            old = self._slot_of.pop(tid, None)
            if old is not None:
                self._slots.release(old[1])
        self._kick(nbytes, harden)
        return n

    def _entries(self, rows: list[tuple[Any, ...]]) -> list[OutboxEntry]:
        """Rows -> entries, reading slot payloads; a row whose slot does not hold its payload
        (torn by a power cut, or reused after a delete the power cut undid) is dropped."""
        out, bad = [], []
        for row in rows:
            task_id, slot, length, crc = row[0], row[7], row[8], row[9]
            payload = row[4]
            if slot is not None:
                payload = self._slots.read(int(slot), task_id, int(length), int(crc))
                if payload is None:
                    bad.append(task_id)
                    continue
            out.append(_entry(row[:4] + (payload,) + row[5:7]))
        for task_id in bad:
            self.corrupt_payloads += 1
            log.error("outbox %s: the payload of task %s is missing or damaged; result dropped", self.path, task_id)
            self.remove(task_id)
        return out

    def _read(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._conn().execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"outbox {self.path}: read failed: {exc}") from exc

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError(f"outbox {self.path}: closed")
        return self._db

    def _kick(self, nbytes: int, harden: bool) -> None:
        """Count a committed write and (``harden``) make sure the harden thread will fsync it.

        Deletes do not wake the thread: a delete lost to a power cut only brings back a
        result of a committed round, which the server refuses as stale (and the agent
        then drops); they are hardened with the next stored result, or by :meth:`sync`.
        """
        with self._hlock:
            self._written += 1
            if self._backfilled:
                self._backfilled, self._wal_bytes = False, 0
            self._wal_bytes += nbytes
            if self._closing or not harden:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._harden_loop, name="outbox-harden", daemon=True)
                self._thread.start()
            else:
                self._wake.notify_all()

    def _harden_loop(self) -> None:
        ckpt: list[sqlite3.Connection] = []  # this thread's own connection for checkpoints
        try:
            while True:
                with self._hlock:
                    if self._hardened >= self._written and not self._closing:
                        self._wake.wait(_HARDEN_IDLE_S)
                    if self._closing or self._hardened >= self._written:
                        self._thread = None  # idle (or closing): exit; the next write starts a new one
                        return
                    target = self._written
                if self._harden(target):
                    self._maybe_checkpoint(ckpt, target)
                else:
                    time.sleep(0.1)  # a failing disk: do not spin
        finally:
            for db in ckpt:
                db.close()

    def _harden(self, target: int) -> bool:
        """fsync the WAL and the database file: every write up to ``target`` is then durable."""
        with self._sync_lock:
            with self._hlock:
                if self._hardened >= target:
                    return True
            try:
                self._slots.fsync_dirty()  # payload files before the rows that name them
                for path in (self._wal_path, self.path):
                    fd = self._sync_fd(path)
                    if fd is not None:
                        os.fsync(fd)
            except OSError as exc:
                self.harden_errors += 1
                log.error("outbox %s: fsync failed (results stay in the OS cache, retried): %s", self.path, exc)
                return False
            self.fsyncs += 1
            with self._hlock:
                self._hardened = max(self._hardened, target)
                self._wake.notify_all()
            return True

    def _sync_fd(self, path: Path) -> int | None:
        """A descriptor of ``path`` to fsync through, opened once and kept open.

        Closing any descriptor of a file drops every POSIX lock this process holds on
        it, SQLite's included: another process would then think the database idle and
        delete its WAL under our connections. So descriptors are only ever closed by
        :meth:`close`, after the connections; a WAL file that was replaced (new inode)
        gets a new descriptor and the stale one waits for :meth:`close` too.
        """
        try:
            ino = os.stat(path).st_ino
        except FileNotFoundError:
            return None  # no WAL: everything is in the (synced) database file
        fd = self._sync_fds.get(path)
        if fd is not None and os.fstat(fd).st_ino == ino:
            return fd
        if fd is not None:
            self._stale_fds.append(fd)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._sync_fds[path] = fd
        return fd

    def _maybe_checkpoint(self, ckpt: list[sqlite3.Connection], target: int) -> None:
        """Move the WAL into the database (PASSIVE: never waits for the uplink's writes).

        Once every frame is in the database, the next write starts the WAL file over,
        so it stays about one round of results large.
        """
        with self._hlock:
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
                with self._hlock:
                    self._backfilled = self._written == target
        except sqlite3.Error as exc:
            log.debug("outbox %s: checkpoint postponed: %s", self.path, exc)

    def _fsync_dir(self) -> None:
        try:
            fd = os.open(self.path.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def _entry(row: tuple[Any, ...]) -> OutboxEntry:
    task_id, round_, kind, fields, payload, created_ts, sends = row
    try:
        decoded = json.loads(fields)
    except ValueError as exc:
        raise StoreError(f"outbox entry {task_id}: corrupt fields: {exc}") from exc
    return OutboxEntry(task_id=task_id, round=int(round_), kind=kind, fields=decoded,
                       payload=None if payload is None else bytes(payload),
                       created_ts=float(created_ts), sends=int(sends))
