"""The uplink's durable outbox: results kept on disk until their round is committed.

A result (the header fields of a ``result`` message and its encoded payload) is
written to a table of the agent's SQLite state file and committed with
``synchronous=FULL`` *before* it is sent. It stays there, and is re-sent after every
reconnect, until the server announces ``committed`` for its round; a crash of the
agent or of the server therefore loses nothing, and the server's once-only check on
the task nonce keeps anything from being counted twice.

The table lives beside the agent's own tables in the same file (WAL mode, so the
agent's store and the uplink can both use it); only the outbox's own connection is
opened with ``synchronous=FULL``.

>>> import tempfile, os
>>> box = Outbox(os.path.join(tempfile.mkdtemp(), "state.db"))
>>> box.put(OutboxEntry(task_id="ab" * 16, round=3, kind="train", fields={"n_samples": 10}, payload=b"xyz"))
>>> [e.round for e in box.pending()], box.count()
([3], 1)
>>> box.drop_through(3), box.count()
(1, 0)
>>> box.close()
"""
from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedgate.core.errors import StoreError

__all__ = ["Outbox", "OutboxEntry"]

log = logging.getLogger(__name__)

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
    from its event-loop thread. SQLite errors become :class:`StoreError`.
    """

    def __init__(self, db_path: str | Path) -> None:
        self.path = Path(db_path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None,
                                       check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=30000")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"outbox {self.path}: cannot open: {exc}") from exc

    # -- writes -------------------------------------------------------------------
    def put(self, entry: OutboxEntry) -> None:
        """Store ``entry`` durably (fsynced) before it is ever sent.

        A second ``put`` of the same task_id replaces the first (a re-run task).
        """
        row = (entry.task_id, entry.round, entry.kind, json.dumps(entry.fields, allow_nan=False),
               None if entry.payload is None else memoryview(entry.payload), entry.created_ts, entry.sends)
        self._write("INSERT OR REPLACE INTO uplink_outbox"
                    "(task_id, round, kind, fields, payload, created_ts, sends) VALUES (?,?,?,?,?,?,?)", row)

    def remove(self, task_id: str) -> bool:
        """Delete one entry; True if it was there."""
        return self._write("DELETE FROM uplink_outbox WHERE task_id = ?", (task_id,), durable=False) > 0

    def drop_through(self, round_: int) -> int:
        """Delete every entry of a round ``<= round_`` (those rounds are committed)."""
        return self._write("DELETE FROM uplink_outbox WHERE round <= ?", (int(round_),), durable=False)

    # -- reads --------------------------------------------------------------------
    def get(self, task_id: str) -> OutboxEntry | None:
        """The entry for ``task_id``, or None."""
        rows = self._read("SELECT task_id, round, kind, fields, payload, created_ts, sends "
                          "FROM uplink_outbox WHERE task_id = ?", (task_id,))
        return _entry(rows[0]) if rows else None

    def pending(self) -> list[OutboxEntry]:
        """Every stored entry, oldest round first."""
        rows = self._read("SELECT task_id, round, kind, fields, payload, created_ts, sends "
                          "FROM uplink_outbox ORDER BY round, created_ts", ())
        return [_entry(r) for r in rows]

    def count(self) -> int:
        """Number of stored entries."""
        return int(self._read("SELECT COUNT(*) FROM uplink_outbox", ())[0][0])

    def size_bytes(self) -> int:
        """Total payload bytes held."""
        return int(self._read("SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM uplink_outbox", ())[0][0])

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None  # type: ignore[assignment]

    # -- internals ----------------------------------------------------------------
    def _write(self, sql: str, args: tuple[Any, ...], *, durable: bool = True) -> int:
        with self._lock:
            db = self._conn()
            try:
                if not durable:
                    db.execute("PRAGMA synchronous=NORMAL")
                db.execute("BEGIN IMMEDIATE")
                try:
                    cur = db.execute(sql, args)
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                return cur.rowcount
            except sqlite3.Error as exc:
                raise StoreError(f"outbox {self.path}: write failed: {exc}") from exc
            finally:
                if not durable:
                    db.execute("PRAGMA synchronous=FULL")

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


def _entry(row: tuple[Any, ...]) -> OutboxEntry:
    task_id, round_, kind, fields, payload, created_ts, sends = row
    try:
        decoded = json.loads(fields)
    except ValueError as exc:
        raise StoreError(f"outbox entry {task_id}: corrupt fields: {exc}") from exc
    return OutboxEntry(task_id=task_id, round=int(round_), kind=kind, fields=decoded,
                       payload=None if payload is None else bytes(payload),
                       created_ts=float(created_ts), sends=int(sends))
