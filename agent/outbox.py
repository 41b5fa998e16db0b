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
* Power loss or a kernel crash is covered *shortly after*: a stored result wakes a
  background thread (``outbox-harden``) that ``fdatasync``-s the slot files, the WAL
  and (when a checkpoint changed it) the database file, coalescing every write made
  meanwhile: one pass right after a result, and at most one per 0.5 s (rounds that
  come faster share a pass: each pass wakes a thread that, on a busy gateway, also
  competes for the interpreter), off the send path. Only results written in the last
  moments before a power cut (at most ~0.5 s when rounds come that fast) can be lost;
  such a result was at most just sent, and the server, which
  never counts a task twice and re-issues nothing it did not aggregate, closes the
  round without it (as for an agent that died mid-round). :meth:`Outbox.sync` hardens
  on demand and :meth:`Outbox.close` always does.
* Deletes are lazy. :meth:`Outbox.drop_through` (a committed round) takes the rows
  out of the outbox at once in memory -- :meth:`~Outbox.get`, :meth:`~Outbox.pending`
  and :meth:`~Outbox.count` never return them again -- and the ``DELETE`` itself
  rides in the transaction of the next stored result (which simply takes over the
  dropped row when there is one: a single ``UPDATE``), or runs when the background
  thread has seen no write for ``linger_s``, or on :meth:`~Outbox.sync`,
  :meth:`~Outbox.pending` and :meth:`~Outbox.close`. A delete lost to a crash or a
  power cut only brings back a result of a committed round: the restarted agent
  re-sends it, the server refuses it as stale and the agent then removes it.
* The WAL is checkpointed into the database by the same thread (the outbox's own
  connection never checkpoints inline, so a large payload never puts an fsync on
  the send path).

The table lives beside the agent's own tables in the same file (WAL mode, so the
agent's store and the uplink can both use it). The outbox keeps an index of its rows
in memory (task id, round, payload slot and length, and the stored entry itself while
the kept payloads total at most 32 MiB), so :meth:`~Outbox.get`, :meth:`~Outbox.count` and
:meth:`~Outbox.drop_through` touch no disk. Payloads of 8 KiB or more are kept in
reusable slot files beside it (``<state file>.outbox/``, see
:mod:`fedgate.agent.outbox_slots`): the file is written before the row that names it
(with its length and CRC-32), both are fsynced by the same background pass, and a
row whose slot does not hold exactly its payload is dropped with an error and
counted (:attr:`Outbox.corrupt_payloads`), never sent.

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

from fedgate.agent.outbox_harden import Hardener
from fedgate.agent.outbox_slots import SLOT_MIN_BYTES, PayloadSlots, payload_crc
from fedgate.core.errors import StoreError

__all__ = ["Outbox", "OutboxEntry"]

log = logging.getLogger(__name__)

_HARDEN_SPACING_S = 0.5          # at most one background fsync pass this often (coalesces fast rounds)
_CACHE_BYTES = 32 << 20          # payload bytes of stored entries kept in memory for get()/pending()

# keyed by task id, without a rowid: a result costs one b-tree page per write
_TABLE = """uplink_outbox (
    task_id      TEXT PRIMARY KEY,
    round        INTEGER NOT NULL,
    kind         TEXT NOT NULL,
    fields       TEXT NOT NULL,
    payload      BLOB,
    created_ts   REAL NOT NULL,
    sends        INTEGER NOT NULL DEFAULT 0,
    payload_slot INTEGER,
    payload_len  INTEGER,
    payload_crc  INTEGER
) WITHOUT ROWID"""
# payloads of SLOT_MIN_BYTES or more live in slot files (fedgate.agent.outbox_slots)
_SLOT_COLUMNS = (("payload_slot", "INTEGER"), ("payload_len", "INTEGER"), ("payload_crc", "INTEGER"))
_COLUMNS = "task_id, round, kind, fields, payload, created_ts, sends, payload_slot, payload_len, payload_crc"
_INSERT = f"INSERT OR REPLACE INTO uplink_outbox({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)"
_DROP = "DELETE FROM uplink_outbox WHERE round <= ?"
_REMOVE = "DELETE FROM uplink_outbox WHERE task_id = ?"
_REUSE = (f"UPDATE uplink_outbox SET ({_COLUMNS}) = (?,?,?,?,?,?,?,?,?,?) WHERE task_id = ?")
_encode_fields = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode


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
    linger_s : float
        How long the background thread waits for more writes before it applies
        deferred deletes, hardens them and exits.

    Notes
    -----
    Thread-safe: the uplink may store results from one thread and delete them from
    another. :meth:`get` may return the very :class:`OutboxEntry` given to
    :meth:`put` (treat it as read-only). SQLite and OS errors become
    :class:`StoreError` (a failed background fsync is logged and counted in
    :attr:`harden_errors`, and retried on the next write or :meth:`sync`).
    """

    def __init__(self, db_path: str | Path, *, linger_s: float = 0.5) -> None:
        self.path = Path(db_path)
        self._lock = threading.Lock()           # the connection, the index, the slots, deferred deletes
        # task_id -> (round, slot or None, payload length, the entry if kept in memory)
        self._index: dict[str, tuple[int, int | None, int, OutboxEntry | None]] = {}
        self._cached_bytes = 0
        self._drop_round: int | None = None     # a deferred DELETE of the rounds <= this
        self._drop_slots: list[int] = []        # slots free once that DELETE committed
        self._drop_ids: list[str] = []          # the rows it deletes
        self.corrupt_payloads = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db: sqlite3.Connection | None = sqlite3.connect(
                str(self.path), timeout=30.0, isolation_level=None, check_same_thread=False)
            db = self._db
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints run on the harden thread
            db.execute("PRAGMA busy_timeout=30000")
            _create_or_upgrade(db)
            self._slots = PayloadSlots(self.path.with_name(self.path.name + ".outbox"))
            for tid, rnd, slot, length in db.execute(
                    "SELECT task_id, round, payload_slot, COALESCE(payload_len, LENGTH(payload), 0) "
                    "FROM uplink_outbox"):
                self._index[tid] = (int(rnd), None if slot is None else int(slot), int(length), None)
                if slot is not None:
                    self._slots.mark_used(int(slot))
        except sqlite3.Error as exc:
            raise StoreError(f"outbox {self.path}: cannot open: {exc}") from exc
        except OSError as exc:
            raise StoreError(f"outbox {self.path}: cannot open its payload slots: {exc}") from exc
        self._h = Hardener(self.path, self._slots, self._idle_flush, linger_s=float(linger_s),
                           spacing_s=_HARDEN_SPACING_S)
        self._fsync_dir()
        self.sync()

    # -- writes -------------------------------------------------------------------
    def put(self, entry: OutboxEntry, fields_json: str | None = None) -> None:
        """Store ``entry`` before it is ever sent (safe from a crash of this process at once,
        from power loss once the background fsync ran; see the module docstring).

        ``fields_json``: ``entry.fields`` already encoded as JSON (by the caller that
        built the wire header from it), stored as it is. A second ``put`` of the same
        task_id replaces the first (a re-run task).
        """
        text = _encode_fields(entry.fields) if fields_json is None else fields_json
        payload = entry.payload
        if payload is None or type(payload) is bytes:
            view: bytes | memoryview | None = payload
            n = 0 if payload is None else len(payload)
        else:
            view = memoryview(payload).cast("B")
            n = view.nbytes
        tid = entry.task_id
        with self._lock:
            self._conn()
            slot = None
            if n >= SLOT_MIN_BYTES:  # the file first, then the row that names it
                assert view is not None
                slot = self._slots.claim(self._h.hardened)
                crc = payload_crc(view)
                try:
                    self._slots.write(slot, tid, view, crc)
                except (OSError, ValueError) as exc:  # (ValueError: a task id that is not ASCII)
                    self._slots.release(slot)
                    raise StoreError(f"outbox {self.path}: cannot write payload slot {slot}: {exc}") from exc
                row = (tid, entry.round, entry.kind, text, None, entry.created_ts, entry.sends, slot, n, crc)
                nbytes = 4096 + len(text)
            else:
                row = (tid, entry.round, entry.kind, text, view, entry.created_ts, entry.sends, None, None, None)
                nbytes = 4096 + len(text) + n
            try:
                if len(self._drop_ids) == 1 and tid not in self._index:
                    self._reuse_row(row)
                else:
                    self._commit(_INSERT, row)
            except StoreError:
                self._slots.release(slot)
                raise
            self._unindex(tid)  # a replaced row (its slot is free now)
            keep = (view is None or view is payload) and self._cached_bytes + n <= _CACHE_BYTES
            if keep:
                self._cached_bytes += n
            self._index[tid] = (entry.round, slot, n, entry if keep else None)
            self._h.kick(nbytes, harden=True)

    def remove(self, task_id: str) -> bool:
        """Delete one entry; True if it was there."""
        with self._lock:
            self._conn()
            n = self._commit(_REMOVE, (task_id,))
            self._unindex(task_id)
            self._h.kick(4096, harden=False)
        return n > 0

    def drop_through(self, round_: int) -> int:
        """Drop every entry of a round ``<= round_`` (those rounds are committed); how many.

        They are gone at once for :meth:`get`, :meth:`pending` and :meth:`count`; the
        ``DELETE`` is deferred (see the module docstring).
        """
        r = int(round_)
        with self._lock:
            self._conn()
            gone = [tid for tid, meta in self._index.items() if meta[0] <= r]
            self._drop_ids += gone
            for tid in gone:
                _, slot, n, kept = self._index.pop(tid)
                if kept is not None:
                    self._cached_bytes -= n
                if slot is not None:
                    self._drop_slots.append(slot)  # still named by a row until the DELETE commits
            if gone:
                self._drop_round = r if self._drop_round is None else max(self._drop_round, r)
                self._h.defer()
        return len(gone)

    # -- durability ---------------------------------------------------------------
    @property
    def writes(self) -> int:
        """Writes committed so far (a sequence number; :attr:`checkpointed` compares to it)."""
        with self._h.lock:
            return self._h.written

    @property
    def durable(self) -> bool:
        """True when every write so far has been fsynced and no delete is deferred."""
        h = self._h
        with h.lock:
            return h.hardened >= h.written and not h.deferred

    @property
    def fsyncs(self) -> int:
        """Hardening passes so far (background or :meth:`sync`)."""
        return self._h.passes

    @property
    def fsync_calls(self) -> int:
        """fsync/fdatasync system calls those passes made."""
        return self._h.calls

    @property
    def harden_errors(self) -> int:
        """Passes that failed (logged; retried)."""
        return self._h.errors

    @property
    def checkpoints(self) -> int:
        """WAL checkpoints run by the background thread."""
        return self._h.checkpoints

    @property
    def checkpointed(self) -> int:
        """Writes moved from the WAL into the database file (compare with :attr:`writes`)."""
        return self._h.checkpointed

    def sync(self) -> bool:
        """Apply deferred deletes and fsync every write made so far now (in the calling
        thread); True on success."""
        with self._lock:
            if self._db is None:
                return self.durable
            self._flush_drop()
        return self._h.sync()

    def wait_durable(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the background thread to harden every write so far."""
        return self._h.wait(timeout_s)

    # -- reads --------------------------------------------------------------------
    def get(self, task_id: str) -> OutboxEntry | None:
        """The entry for ``task_id``, or None."""
        self._conn()
        meta = self._index.get(task_id)
        if meta is None:
            return None
        if meta[3] is not None:
            return meta[3]
        entries = self._load(f"SELECT {_COLUMNS} FROM uplink_outbox WHERE task_id = ?", (task_id,), {})
        return entries[0] if entries else None

    def pending(self) -> list[OutboxEntry]:
        """Every stored entry, oldest round first."""
        with self._lock:
            self._conn()
            self._flush_drop()
            kept = {tid: meta[3] for tid, meta in self._index.items() if meta[3] is not None}
        return self._load(f"SELECT {_COLUMNS} FROM uplink_outbox ORDER BY round, created_ts", (), kept)

    def count(self) -> int:
        """Number of stored entries."""
        self._conn()
        return len(self._index)

    def size_bytes(self) -> int:
        """Total payload bytes held."""
        with self._lock:
            self._conn()
            return sum(meta[2] for meta in self._index.values())

    def close(self) -> None:
        """Stop the background thread, apply deferred deletes, fsync what is left, close
        (idempotent)."""
        self._h.stop()
        if self._db is not None:
            try:
                self.sync()
            except StoreError as exc:
                log.error("outbox %s: deferred deletes not applied at close: %s", self.path, exc)
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
        self._h.close()

    # -- internals ----------------------------------------------------------------
    def _commit(self, sql: str, args: tuple[Any, ...]) -> int:
        """One statement in its own transaction, with the deferred DELETE if there is one
        (WAL, synchronous=NORMAL); under ``self._lock``. Returns its row count."""
        db = self._conn()
        drop = self._drop_round
        try:
            if drop is None:
                return int(db.execute(sql, args).rowcount)
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(_DROP, (drop,))
                n = int(db.execute(sql, args).rowcount)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreError(f"outbox {self.path}: write failed: {exc}") from exc
        self._dropped()
        return n

    def _reuse_row(self, row: tuple[Any, ...]) -> None:
        """Store ``row`` in place of the one row whose DELETE is deferred: one statement
        (the usual round: a result stored, the previous round's dropped)."""
        db = self._conn()
        try:
            done = db.execute(_REUSE, (*row, self._drop_ids[0])).rowcount
        except sqlite3.Error as exc:
            raise StoreError(f"outbox {self.path}: write failed: {exc}") from exc
        if done != 1:  # (the row was not there after all)
            self._commit(_INSERT, row)
            return
        self._dropped()

    def _flush_drop(self) -> bool:
        """Run the deferred DELETE now, alone (under ``self._lock``); True if there was one."""
        if self._drop_round is None:
            return False
        try:
            self._conn().execute(_DROP, (self._drop_round,))
        except sqlite3.Error as exc:
            raise StoreError(f"outbox {self.path}: write failed: {exc}") from exc
        self._dropped()
        self._h.kick(4096, harden=False)
        return True

    def _idle_flush(self) -> None:
        """The harden thread, idle: apply the deferred deletes."""
        with self._lock:
            if self._db is not None:
                self._flush_drop()

    def _dropped(self) -> None:
        self._drop_round = None
        self._drop_ids.clear()
        with self._h.lock:
            self._h.deferred = False
        at = self._h.written + 1  # the write being committed (counted right after)
        for slot in self._drop_slots:
            self._slots.release(slot, at)
        self._drop_slots.clear()

    def _unindex(self, task_id: str) -> None:
        meta = self._index.pop(task_id, None)
        if meta is None:
            return
        if meta[3] is not None:
            self._cached_bytes -= meta[2]
        self._slots.release(meta[1], self._h.written + 1)

    def _load(self, sql: str, args: tuple[Any, ...], kept: dict[str, OutboxEntry]) -> list[OutboxEntry]:
        """Rows -> entries (``kept``: those still in memory), their slot payloads read under
        the same lock (so no slot is reused meanwhile); a row whose slot does not hold its
        payload (torn by a power cut, or reused after a delete the power cut undid) is
        dropped."""
        rows: list[tuple[Any, ...]] = []
        with self._lock:
            try:
                found = self._conn().execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"outbox {self.path}: read failed: {exc}") from exc
            for row in found:
                task_id, payload, slot = row[0], row[4], row[7]
                if task_id not in kept and slot is not None:
                    payload = self._slots.read(int(slot), task_id, int(row[8]), int(row[9]))
                rows.append(row[:4] + (payload,) + row[5:8])
        out, bad = [], []
        for row in rows:
            entry = kept.get(row[0])
            if entry is not None:
                out.append(entry)
            elif row[4] is None and row[7] is not None:
                bad.append(row[0])
            else:
                out.append(_entry(row[:7]))
        for task_id in bad:
            self.corrupt_payloads += 1
            log.error("outbox %s: the payload of task %s is missing or damaged; result dropped", self.path, task_id)
            self.remove(task_id)
        return out

    def _conn(self) -> sqlite3.Connection:
        db = self._db
        if db is None:
            raise StoreError(f"outbox {self.path}: closed")
        return db

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


def _create_or_upgrade(db: sqlite3.Connection) -> None:
    """Create the table, or move the rows of an earlier layout (a rowid table with an
    index on round, maybe without the slot columns) into the current one, atomically."""
    got = db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'uplink_outbox'").fetchone()
    if got is None:
        db.execute(f"CREATE TABLE IF NOT EXISTS {_TABLE}")
        return
    if "WITHOUT ROWID" in str(got[0]).upper():
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        got = db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'uplink_outbox'").fetchone()
        if "WITHOUT ROWID" in str(got[0]).upper():  # another process was quicker
            db.execute("COMMIT")
            return
        have = {r[1] for r in db.execute("PRAGMA table_info(uplink_outbox)")}
        for name, kind in _SLOT_COLUMNS:
            if name not in have:  # a state file from before slot files
                db.execute(f"ALTER TABLE uplink_outbox ADD COLUMN {name} {kind}")
        db.execute(f"CREATE TABLE {_TABLE.replace('uplink_outbox', 'uplink_outbox_next', 1)}")
        db.execute(f"INSERT INTO uplink_outbox_next({_COLUMNS}) SELECT {_COLUMNS} FROM uplink_outbox")
        db.execute("DROP TABLE uplink_outbox")
        db.execute("ALTER TABLE uplink_outbox_next RENAME TO uplink_outbox")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _entry(row: tuple[Any, ...]) -> OutboxEntry:
    task_id, round_, kind, fields, payload, created_ts, sends = row
    try:
        decoded = json.loads(fields)
    except ValueError as exc:
        raise StoreError(f"outbox entry {task_id}: corrupt fields: {exc}") from exc
    return OutboxEntry(task_id=task_id, round=int(round_), kind=kind, fields=decoded,
                       payload=None if payload is None else bytes(payload),
                       created_ts=float(created_ts), sends=int(sends))
