"""The agent's local history: one SQLite database (WAL) under ``data_dir``.

The same file holds the uplink's outbox (its own tables); this module owns the
``agent_*`` tables:

* ``agent_samples`` — one row per labelled window: time, feature layout, features
  (float32 little-endian blob) and label; bounded by ``max_rows`` and ``max_age``,
  oldest dropped first and counted;
* ``agent_layouts`` — the ordered feature names a row was built with, so rows stay
  readable when the feature list changes;
* ``agent_model`` — the current global model, its scaler and round;
* ``agent_counters`` — persistent counters (rows dropped, rows written).

Every write is one transaction with ``synchronous=FULL``: a ``kill -9`` or a power cut
at any moment leaves the file consistent with every committed row in it.

>>> import tempfile, os
>>> d = tempfile.mkdtemp()
>>> st = Store(os.path.join(d, "agent.db"), max_rows=2)
>>> st.add_samples([(1.0, [1.0, 2.0], 0.0), (2.0, [3.0, 4.0], 1.0), (3.0, [5.0, 6.0], 1.0)], ["a", "b"])
1
>>> data = st.load_samples(["b", "a"])
>>> data.ts.tolist(), data.x.tolist(), data.y.tolist()
([2.0, 3.0], [[4.0, 3.0], [6.0, 5.0]], [1.0, 1.0])
>>> st.close()
"""
from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedgate.core.errors import StoreError

__all__ = ["Store", "SampleSet", "StoredModel", "open_connection"]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS agent_layouts (
    id INTEGER PRIMARY KEY,
    names TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS agent_samples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    layout INTEGER NOT NULL REFERENCES agent_layouts(id),
    x BLOB NOT NULL,
    y REAL
);
CREATE INDEX IF NOT EXISTS agent_samples_ts ON agent_samples(ts);
CREATE TABLE IF NOT EXISTS agent_model (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    round INTEGER NOT NULL,
    spec TEXT NOT NULL,
    features TEXT NOT NULL,
    label TEXT,
    scaler TEXT,
    params BLOB NOT NULL,
    saved_ts REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS agent_counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


def open_connection(path: str | Path, *, timeout_s: float = 10.0, cache_kib: int = 512) -> sqlite3.Connection:
    """A connection to the agent database with the pragmas every user of it needs.

    The page cache is kept small (``cache_kib``): reads are sequential scans and
    writes append, so a big cache would only cost a small gateway memory.
    """
    try:
        conn = sqlite3.connect(str(path), timeout=timeout_s, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
        conn.execute(f"PRAGMA cache_size=-{int(cache_kib)}")
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path}: cannot open the agent database: {exc}") from exc
    return conn


@dataclass(frozen=True)
class SampleSet:
    """Stored samples in time order.

    ``ts`` float64 (N,), ``x`` float32 (N, F) in the requested feature order,
    ``y`` float64 (N,) (NaN where a row has no label).
    """

    ts: np.ndarray
    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return int(self.ts.shape[0])


@dataclass(frozen=True)
class StoredModel:
    """The persisted global model: ``params`` float32 (D,)."""

    round: int
    spec: dict[str, Any]
    features: list[str]
    label: str | None
    scaler: dict[str, Any] | None
    params: np.ndarray
    saved_ts: float


class Store:
    """Samples and the current global model in the agent's SQLite file.

    Writes come from the daemon's main loop; :meth:`load_samples` may run in any
    thread (it reads through its own connection, concurrently with writers).
    """

    def __init__(self, path: str | Path, *, max_rows: int = 200_000, max_age_s: float | None = None) -> None:
        self.path = Path(path)
        self.max_rows = max_rows
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{self.path.parent}: cannot create the data directory: {exc.strerror}") from exc
        self._conn = open_connection(self.path)
        try:
            self._conn.executescript(_SCHEMA)
            self._rows = int(self._conn.execute("SELECT COUNT(*) FROM agent_samples").fetchone()[0])
            self._layouts: dict[str, int] = {
                names: int(i) for i, names in self._conn.execute("SELECT id, names FROM agent_layouts")
            }
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise StoreError(f"{self.path}: the agent database is unreadable: {exc}") from exc

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.close()
                finally:
                    self._conn = None  # type: ignore[assignment]

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, fn: Any) -> Any:
        with self._lock:
            if self._conn is None:
                raise StoreError(f"{self.path}: the store is closed")
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    out = fn(self._conn)
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
                return out
            except sqlite3.DatabaseError as exc:
                raise StoreError(f"{self.path}: write failed: {exc}") from exc

    # ------------------------------------------------------------------ samples
    def _layout_id(self, conn: sqlite3.Connection, names: Sequence[str]) -> int:
        key = json.dumps(list(names))
        lid = self._layouts.get(key)
        if lid is None:
            conn.execute("INSERT OR IGNORE INTO agent_layouts(names) VALUES (?)", (key,))
            lid = int(conn.execute("SELECT id FROM agent_layouts WHERE names = ?", (key,)).fetchone()[0])
        return lid

    def add_samples(self, samples: Iterable[Any], feature_names: Sequence[str], *, now_s: float | None = None) -> int:
        """Append samples and apply the bounds in one transaction; return rows dropped.

        Each sample is a :class:`fedgate.agent.sampler.Sample` or a tuple
        ``(t_end, features, label)``; features are float (F,) in ``feature_names`` order.
        """
        rows = []
        for s in samples:
            t, feats, label = (s.t_end, s.features, s.label) if hasattr(s, "t_end") else s
            x = np.ascontiguousarray(feats, dtype="<f4")
            if x.shape != (len(feature_names),):
                raise StoreError(f"a sample has {x.size} features, the layout {len(feature_names)}")
            rows.append((float(t), x.tobytes(), None if label is None else float(label)))
        if not rows:
            return 0
        now = time.time() if now_s is None else now_s

        def tx(conn: sqlite3.Connection) -> tuple[int, int, int]:
            lid = self._layout_id(conn, feature_names)
            conn.executemany("INSERT INTO agent_samples(ts, layout, x, y) VALUES (?, ?, ?, ?)",
                             [(t, lid, x, y) for t, x, y in rows])
            n = self._rows + len(rows)
            dropped = 0
            if self.max_age_s is not None:
                cur = conn.execute("DELETE FROM agent_samples WHERE ts < ?", (now - self.max_age_s,))
                dropped += max(cur.rowcount, 0)
                n -= max(cur.rowcount, 0)
            if n > self.max_rows:
                excess = n - self.max_rows
                cur = conn.execute(
                    "DELETE FROM agent_samples WHERE id IN (SELECT id FROM agent_samples ORDER BY id LIMIT ?)",
                    (excess,))
                dropped += max(cur.rowcount, 0)
                n -= max(cur.rowcount, 0)
            self._bump(conn, "rows_written", len(rows))
            if dropped:
                self._bump(conn, "rows_dropped", dropped)
            return n, dropped, lid

        n, dropped, lid = self._write(tx)
        self._rows = n
        self._layouts[json.dumps(list(feature_names))] = lid
        return dropped

    @staticmethod
    def _bump(conn: sqlite3.Connection, name: str, by: int) -> None:
        conn.execute("INSERT INTO agent_counters(name, value) VALUES (?, ?) "
                     "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value", (name, by))

    def count(self) -> int:
        """Rows stored now."""
        return self._rows

    def counters(self) -> dict[str, int]:
        """Persistent counters: ``rows_written``, ``rows_dropped``."""
        with self._lock:
            out = dict(self._conn.execute("SELECT name, value FROM agent_counters").fetchall())
        return {"rows_written": int(out.get("rows_written", 0)), "rows_dropped": int(out.get("rows_dropped", 0))}

    def layouts(self) -> list[list[str]]:
        """Every feature layout rows were stored with."""
        with self._lock:
            return [json.loads(n) for (n,) in self._conn.execute("SELECT names FROM agent_layouts ORDER BY id")]

    def sample_index(self, features: Sequence[str], *, labelled: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, ts)`` (int64 (N,), float64 (N,)) of the rows :meth:`load_samples` would return.

        Lets a caller plan a split and read the rows block by block (``id_range``)
        without holding every feature vector in memory.
        """
        conn = open_connection(self.path)
        try:
            conn.execute("BEGIN")
            usable, _ = self._usable(conn, features)
            if not usable:
                return np.zeros(0, np.int64), np.zeros(0)
            where, args = self._where(usable, labelled)
            n = int(conn.execute(f"SELECT COUNT(*) FROM agent_samples WHERE {where}", args).fetchone()[0])
            ids = np.empty(n, dtype=np.int64)
            ts = np.empty(n, dtype=np.float64)
            cur = conn.execute(f"SELECT id, ts FROM agent_samples WHERE {where} ORDER BY id", args)
            i = 0
            while i < n:
                chunk = cur.fetchmany(min(2048, n - i))
                if not chunk:
                    break
                ids[i:i + len(chunk)] = [r[0] for r in chunk]
                ts[i:i + len(chunk)] = [r[1] for r in chunk]
                i += len(chunk)
            conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: reading samples failed: {exc}") from exc
        finally:
            conn.close()
        return ids[:i], ts[:i]

    def index_chunks(self, features: Sequence[str], *, labelled: bool = True,
                     chunk_rows: int = 2048) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(ids, ts)`` (int64 (k,), float64 (k,)) of :meth:`sample_index`'s rows, ``chunk_rows`` at a time.

        One read snapshot per iteration; O(chunk_rows) memory whatever the history size.
        """
        conn = open_connection(self.path)
        try:
            conn.execute("BEGIN")
            usable, _ = self._usable(conn, features)
            if usable:
                where, args = self._where(usable, labelled)
                cur = conn.execute(f"SELECT id, ts FROM agent_samples WHERE {where} ORDER BY id", args)
                while chunk := cur.fetchmany(chunk_rows):
                    yield (np.fromiter((r[0] for r in chunk), np.int64, len(chunk)),
                           np.fromiter((r[1] for r in chunk), np.float64, len(chunk)))
            conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: reading samples failed: {exc}") from exc
        finally:
            conn.close()

    def block_ranges(self, features: Sequence[str], *, labelled: bool = True,
                     block_rows: int = 2048) -> list[tuple[int, int]]:
        """Inclusive id ranges of ``block_rows`` rows each covering :meth:`load_samples`'s rows.

        Streams the ids, so it needs O(n / block_rows) memory (not the O(n) of
        :meth:`sample_index`) when no split by time is wanted.
        """
        if block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, not {block_rows}")
        conn = open_connection(self.path)
        out: list[tuple[int, int]] = []
        try:
            conn.execute("BEGIN")
            usable, _ = self._usable(conn, features)
            if usable:
                where, args = self._where(usable, labelled)
                cur = conn.execute(f"SELECT id FROM agent_samples WHERE {where} ORDER BY id", args)
                while chunk := cur.fetchmany(block_rows):
                    out.append((int(chunk[0][0]), int(chunk[-1][0])))
            conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: reading samples failed: {exc}") from exc
        finally:
            conn.close()
        return out

    @staticmethod
    def _usable(conn: sqlite3.Connection, features: Sequence[str]) -> tuple[dict[int, np.ndarray], dict[int, list[str]]]:
        layouts = {int(i): json.loads(n) for i, n in conn.execute("SELECT id, names FROM agent_layouts")}
        usable = {lid: np.array([names.index(f) for f in features], dtype=np.intp)
                  for lid, names in layouts.items() if all(f in names for f in features)}
        return usable, layouts

    @staticmethod
    def _where(usable: dict[int, np.ndarray], labelled: bool) -> tuple[str, list[Any]]:
        marks = ",".join("?" * len(usable))
        return f"layout IN ({marks})" + (" AND y IS NOT NULL" if labelled else ""), list(usable)

    def load_samples(self, features: Sequence[str], *, labelled: bool = True, limit: int | None = None,
                     id_range: tuple[int, int] | None = None) -> SampleSet:
        """Rows whose layout has every name of ``features``, columns in that order.

        Reads through its own connection, so it may run in a worker thread while the
        main loop keeps writing. ``limit`` keeps the most recent rows; ``id_range``
        (inclusive, from :meth:`sample_index`) reads one block.
        """
        conn = open_connection(self.path)
        try:
            conn.execute("BEGIN")  # one snapshot for the count and the rows
            usable, layouts = self._usable(conn, features)
            if not usable:
                return SampleSet(np.zeros(0), np.zeros((0, len(features)), np.float32), np.zeros(0))
            where, args = self._where(usable, labelled)
            if id_range is not None:
                where += " AND id BETWEEN ? AND ?"
                args += [int(id_range[0]), int(id_range[1])]
            if limit is not None:
                row = conn.execute(f"SELECT id FROM agent_samples WHERE {where} ORDER BY id DESC LIMIT 1 OFFSET ?",
                                   [*args, max(int(limit) - 1, 0)]).fetchone()
                if row is not None:
                    where += " AND id >= ?"
                    args.append(int(row[0]))
            n = int(conn.execute(f"SELECT COUNT(*) FROM agent_samples WHERE {where}", args).fetchone()[0])
            ts = np.empty(n, dtype=np.float64)
            y = np.empty(n, dtype=np.float64)
            x = np.empty((n, len(features)), dtype=np.float32)
            cur = conn.execute(f"SELECT ts, layout, x, y FROM agent_samples WHERE {where} ORDER BY id", args)
            i = 0
            while i < n:  # bounded chunks: the rows never sit in memory as Python objects all at once
                chunk = cur.fetchmany(min(2048, n - i))
                if not chunk:
                    break
                m = len(chunk)
                ts[i:i + m] = [r[0] for r in chunk]
                y[i:i + m] = [np.nan if r[3] is None else r[3] for r in chunk]
                lids = {r[1] for r in chunk}
                for lid in lids:
                    idx = [j for j, r in enumerate(chunk) if r[1] == lid] if len(lids) > 1 else range(m)
                    blob = b"".join(chunk[j][2] for j in idx)
                    full = np.frombuffer(blob, dtype="<f4").reshape(len(idx), len(layouts[lid]))
                    x[i + np.asarray(idx, dtype=np.intp)] = full[:, usable[lid]]
                i += m
            conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: reading samples failed: {exc}") from exc
        finally:
            conn.close()
        if i < n:
            ts, x, y = ts[:i], x[:i], y[:i]
        return SampleSet(ts=ts, x=x, y=y)

    # ------------------------------------------------------------------ model
    def save_model(self, *, round: int, spec: dict[str, Any], features: Sequence[str], label: str | None,
                   scaler: dict[str, Any] | None, params: np.ndarray) -> None:
        """Replace the persisted global model (one transaction)."""
        blob = np.ascontiguousarray(params, dtype="<f4").tobytes()
        row = (int(round), json.dumps(spec), json.dumps(list(features)), label,
               None if scaler is None else json.dumps(scaler), blob, time.time())

        def tx(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR REPLACE INTO agent_model(id, round, spec, features, label, scaler, params, saved_ts)"
                         " VALUES (1, ?, ?, ?, ?, ?, ?, ?)", row)

        self._write(tx)

    def load_model(self) -> StoredModel | None:
        """The persisted global model, or None before the first one arrived."""
        with self._lock:
            try:
                row = self._conn.execute(
                    "SELECT round, spec, features, label, scaler, params, saved_ts FROM agent_model WHERE id = 1"
                ).fetchone()
            except sqlite3.DatabaseError as exc:
                raise StoreError(f"{self.path}: reading the model failed: {exc}") from exc
        if row is None:
            return None
        try:
            return StoredModel(round=int(row[0]), spec=json.loads(row[1]), features=list(json.loads(row[2])),
                               label=row[3], scaler=None if row[4] is None else json.loads(row[4]),
                               params=np.frombuffer(row[5], dtype="<f4").astype(np.float32), saved_ts=float(row[6]))
        except (ValueError, TypeError) as exc:
            raise StoreError(f"{self.path}: the stored model is unreadable: {exc}") from exc
