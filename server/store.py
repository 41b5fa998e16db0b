"""Server persistence: atomic checksummed checkpoints and the SQLite history.

Checkpoint file format (``ckpt-<seq>.fgc``, no pickle)::

    offset 0   8 bytes   magic b"FGCKPT01"
    offset 8   4 bytes   header length H, little-endian uint32 (<= 1 MiB)
    offset 12  H bytes   UTF-8 JSON header:
                           {"format": 1, "round": int, "phase": str, "created": float,
                            "meta": {...},
                            "arrays": [{"name": str, "dtype": "<f4"|"<f8", "length": int,
                                        "offset": int}, ...]}   offsets from the body start
    offset 12+H          body: the arrays' raw little-endian bytes, back to back
    last 32 bytes        SHA-256 of everything before it

Written to a temp file, fdatasynced, renamed over, directory fsynced; the last N are
kept. The oldest one dropped is kept aside as ``.spare.fgc`` and becomes the next temp
file (its blocks and cached pages are written over instead of allocated anew). :meth:`CheckpointStore.load_latest` verifies size, digest and every header
field; a corrupt newest file is reported and the previous one is used.

The history (``history.db``, WAL) holds rounds, per-agent metrics, the issued task
table (so a restarted server resumes the same round and knows its task nonces),
participation and rejections.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import sqlite3
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedgate.core.errors import StoreError

__all__ = ["Checkpoint", "CheckpointStore", "CheckpointWriter", "History", "TaskRow", "read_checkpoint",
           "write_checkpoint"]

log = logging.getLogger(__name__)

MAGIC = b"FGCKPT01"
_MAX_HEADER = 1 << 20
_DTYPES = {"<f4": np.float32, "<f8": np.float64}
_NAME_RE = re.compile(r"ckpt-(\d{10})\.fgc\Z")
_SPARE = ".spare.fgc"   # an old checkpoint kept aside as the next one's file (never read)
_IOV_MAX = 1024


@dataclass
class Checkpoint:
    """What a restarted server needs.

    Attributes
    ----------
    round : int
        Last committed train round (0: only the statistics round, if any, is done).
    phase : str
        ``"init"`` (nothing committed), ``"statistics"`` (scaler known) or ``"train"``.
    arrays : dict of str -> 1-D float32/float64 array
        ``params`` (D,), optional ``scaler_mean``/``scaler_std`` (F,), strategy state
        under ``strategy.<name>``.
    meta : dict
        JSON-safe extras (federation name, spec, features, privacy history, ...).
    """

    round: int
    phase: str
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0


def write_checkpoint(path: str | os.PathLike[str], ckpt: Checkpoint, *,
                     spare: str | os.PathLike[str] | None = None) -> None:
    """Write ``ckpt`` atomically (temp file, fdatasync, rename, directory fsync).

    ``spare``: a file that is no longer a checkpoint (an old one moved aside) to write
    into instead of a new temp file: its blocks and cached pages are reused, which spares
    the file system an inode and block allocation per checkpoint. It is renamed to the
    temp name first, so a crash never leaves a half-written file under a checkpoint name.
    """
    path = Path(path)
    arrays = []
    offset = 0
    blobs: list[memoryview] = []
    for name, vec in ckpt.arrays.items():
        arr = np.ascontiguousarray(vec)
        dt = arr.dtype.newbyteorder("<").str if arr.dtype.byteorder != "|" else arr.dtype.str
        if arr.ndim != 1 or dt not in _DTYPES:
            raise StoreError(f"checkpoint array {name!r}: need 1-D float32/float64, got {arr.dtype} {arr.shape}")
        arr = arr.astype(dt, copy=False)
        arrays.append({"name": name, "dtype": dt, "length": int(arr.size), "offset": offset})
        blobs.append(memoryview(arr).cast("B"))
        offset += arr.nbytes
    header = json.dumps({
        "format": 1, "round": ckpt.round, "phase": ckpt.phase, "created": ckpt.created or time.time(),
        "meta": ckpt.meta, "arrays": arrays,
    }, allow_nan=False, separators=(",", ":")).encode("utf-8")
    if len(header) > _MAX_HEADER:
        raise StoreError(f"checkpoint header of {len(header)} bytes is too large")
    chunks: list[bytes | memoryview] = [MAGIC, struct.pack("<I", len(header)), header, *blobs]
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    chunks.append(digest.digest())
    size = sum(len(c) for c in chunks)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = -1
        if spare is not None:
            try:
                os.replace(spare, tmp)
                fd = os.open(tmp, os.O_WRONLY | os.O_CLOEXEC)
            except OSError:
                fd = -1  # gone or unusable: write a new file
        if fd < 0:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, chunks, size)
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)
            os.fdatasync(fd)  # data and size; the file times need no sync
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise StoreError(f"{path}: cannot write checkpoint: {exc.strerror}") from exc


def _write_all(fd: int, chunks: list[bytes | memoryview], size: int) -> None:
    """Write ``chunks`` from offset 0 (``pwritev``, resumed after a short write)."""
    done = 0
    while done < size:
        skip, todo = done, []
        for c in chunks:  # the part of the chunks not yet written
            if skip >= len(c):
                skip -= len(c)
                continue
            todo.append(memoryview(c)[skip:] if skip else c)
            skip = 0
        n = os.pwritev(fd, todo[:_IOV_MAX], done)
        if n <= 0:
            raise OSError(5, "short write")
        done += n


def read_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read and verify one checkpoint file; any defect raises :class:`StoreError` naming it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise StoreError(f"{path}: cannot read checkpoint: {exc.strerror}") from exc
    return parse_checkpoint(data, str(path))


def parse_checkpoint(data: bytes, where: str = "<checkpoint>") -> Checkpoint:
    """Verify and decode checkpoint bytes (see the module docstring for the format)."""
    if len(data) < len(MAGIC) + 4 + 32 or data[: len(MAGIC)] != MAGIC:
        raise StoreError(f"{where}: not a fedgate checkpoint (bad magic or truncated)")
    if hashlib.sha256(data[:-32]).digest() != data[-32:]:
        raise StoreError(f"{where}: checksum mismatch (corrupt or truncated)")
    (hlen,) = struct.unpack_from("<I", data, len(MAGIC))
    body_start = len(MAGIC) + 4 + hlen
    if hlen > _MAX_HEADER or body_start > len(data) - 32:
        raise StoreError(f"{where}: header length {hlen} does not fit the file")
    try:
        head = json.loads(data[len(MAGIC) + 4: body_start].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise StoreError(f"{where}: header is not JSON: {exc}") from exc
    body = memoryview(data)[body_start: len(data) - 32]
    try:
        if head["format"] != 1:
            raise StoreError(f"{where}: unknown checkpoint format {head['format']!r}")
        rnd, phase, meta = head["round"], head["phase"], head["meta"]
        if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0 or not isinstance(phase, str) \
                or not isinstance(meta, dict):
            raise StoreError(f"{where}: bad round/phase/meta in header")
        arrays: dict[str, np.ndarray] = {}
        end = 0
        for spec in head["arrays"]:
            name, dt, length, offset = spec["name"], spec["dtype"], spec["length"], spec["offset"]
            if not isinstance(name, str) or dt not in _DTYPES or name in arrays:
                raise StoreError(f"{where}: bad array entry {spec!r}"[:200])
            if isinstance(length, bool) or isinstance(offset, bool) or not isinstance(length, int) \
                    or not isinstance(offset, int) or length < 0 or offset != end:
                raise StoreError(f"{where}: bad array bounds for {name!r}")
            nbytes = length * np.dtype(dt).itemsize
            if offset + nbytes > body.nbytes:
                raise StoreError(f"{where}: array {name!r} runs past the end of the file")
            arrays[name] = np.frombuffer(body[offset: offset + nbytes], dtype=_DTYPES[dt]).copy()
            end = offset + nbytes
        if end != body.nbytes:
            raise StoreError(f"{where}: {body.nbytes - end} unexplained bytes after the arrays")
        created = float(head.get("created", 0.0))
    except (KeyError, TypeError) as exc:
        raise StoreError(f"{where}: incomplete checkpoint header ({exc!r})") from exc
    return Checkpoint(round=rnd, phase=phase, arrays=arrays, meta=meta, created=created)


class CheckpointStore:
    """The checkpoint directory: numbered files, the last ``keep`` kept."""

    def __init__(self, directory: str | os.PathLike[str], keep: int = 5) -> None:
        self.dir = Path(directory)
        self.keep = max(1, keep)
        self.fallbacks = 0
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{self.dir}: cannot create checkpoint directory: {exc.strerror}") from exc
        self._spare = (self.dir / _SPARE).is_file()  # an old checkpoint's file, to be written over

    def files(self) -> list[Path]:
        """Checkpoint files, oldest first."""
        found = []
        try:
            entries = list(self.dir.iterdir())
        except OSError as exc:
            raise StoreError(f"{self.dir}: cannot list checkpoints: {exc.strerror}") from exc
        for p in entries:
            m = _NAME_RE.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def save(self, ckpt: Checkpoint) -> Path:
        """Write ``ckpt`` as the newest checkpoint, then drop those past the last ``keep``.

        The first one dropped becomes the spare file the next checkpoint is written into.
        """
        files = self.files()
        seq = int(_NAME_RE.match(files[-1].name).group(1)) + 1 if files else 1  # type: ignore[union-attr]
        path = self.dir / f"ckpt-{seq:010d}.fgc"
        spare = self.dir / _SPARE
        write_checkpoint(path, ckpt, spare=spare if self._spare else None)
        self._spare = False  # consumed (or, if it could not be used, replaced by a new file)
        files.append(path)
        for old in files[: -self.keep]:
            try:
                if self._spare:
                    old.unlink()
                else:
                    os.replace(old, spare)
                    self._spare = True
            except OSError as exc:
                log.warning("cannot remove old checkpoint %s: %s", old, exc.strerror)
        return path

    def load_latest(self) -> tuple[Checkpoint | None, Path | None]:
        """The newest valid checkpoint; corrupt newer ones are logged and counted in ``fallbacks``."""
        for path in reversed(self.files()):
            try:
                return read_checkpoint(path), path
            except StoreError as exc:
                self.fallbacks += 1
                log.error("checkpoint %s is unusable, trying the previous one: %s", path, exc)
        return None, None


class CheckpointWriter:
    """Writes checkpoints on one worker thread, newest first when the disk falls behind.

    The round loop hands a checkpoint over with a tag and goes on serving while the file
    is written and fsynced; :meth:`completed` returns ``(tag, error)`` for each one
    finished since the last call, in order, so the loop can announce each commit once it
    is on disk. A checkpoint still waiting when a newer one is submitted is superseded:
    only the newer one is written, and both tags complete with it (it holds everything
    the older one did: the later round's model, scaler and strategy state). So when
    rounds come faster than the disk syncs, the writer keeps up by writing fewer files,
    and at most two checkpoints are held in memory (one being written, one waiting). The
    arrays of a submitted checkpoint must not change afterwards.
    """

    def __init__(self, store: CheckpointStore) -> None:
        self.store = store
        self._cond = threading.Condition()
        self._next: tuple[Checkpoint, list[Any]] | None = None  # waiting to be written
        self._busy = False                                       # one is being written
        self._closing = False
        self._finished: collections.deque[tuple[Any, StoreError | None]] = collections.deque()
        self._thread: threading.Thread | None = None
        self._pending = 0
        self.superseded = 0  # checkpoints never written because a newer one came first

    @property
    def pending(self) -> int:
        """Checkpoints submitted and not yet collected through :meth:`completed`."""
        return self._pending

    def submit(self, ckpt: Checkpoint, tag: Any = None) -> None:
        if self._thread is None:
            self._closing = False
            self._thread = threading.Thread(target=self._run, name="fedgate-checkpoint", daemon=True)
            self._thread.start()
        self._pending += 1
        with self._cond:
            if self._next is None:
                self._next = (ckpt, [tag])
            else:
                self.superseded += 1
                self._next = (ckpt, [*self._next[1], tag])
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._next is None and not self._closing:
                    self._cond.wait()
                if self._next is None:
                    return
                (ckpt, tags), self._next = self._next, None
                self._busy = True
            error: StoreError | None = None
            try:
                self.store.save(ckpt)
            except StoreError as exc:
                error = exc
            except Exception as exc:  # noqa: BLE001 - reported to the round loop as a StoreError
                error = StoreError(f"{self.store.dir}: checkpoint failed: {exc!r}")
            with self._cond:
                self._finished.extend((tag, error) for tag in tags)
                self._busy = False
                self._cond.notify_all()

    def completed(self) -> list[tuple[Any, StoreError | None]]:
        """``(tag, error)`` of the checkpoints finished since the last call, oldest first."""
        out = []
        while self._finished:
            out.append(self._finished.popleft())
        self._pending -= len(out)
        return out

    def wait(self) -> None:
        """Block until every submitted checkpoint is written (or failed)."""
        with self._cond:
            while self._next is not None or self._busy:
                self._cond.wait()

    def close(self) -> None:
        """Wait for the queue, then stop the worker thread."""
        if self._thread is not None:
            self.wait()
            with self._cond:
                self._closing = True
                self._cond.notify_all()
            self._thread.join()
            self._thread = None


@dataclass(frozen=True)
class TaskRow:
    task_id: str
    round: int
    kind: str
    agent: str
    issued: float
    status: str


_SCHEMA = """
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER NOT NULL, kind TEXT NOT NULL, started REAL, finished REAL,
    n_sampled INTEGER, n_accepted INTEGER, n_rejected INTEGER, metrics TEXT, epsilon REAL,
    PRIMARY KEY (round, kind));
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY, round INTEGER NOT NULL, kind TEXT NOT NULL, agent TEXT NOT NULL,
    issued REAL NOT NULL, status TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS tasks_round ON tasks (round, kind);
CREATE TABLE IF NOT EXISTS agent_metrics (
    task_id TEXT PRIMARY KEY, round INTEGER NOT NULL, kind TEXT NOT NULL, agent TEXT NOT NULL,
    n_samples INTEGER, metrics TEXT, ts REAL);
CREATE TABLE IF NOT EXISTS rejections (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, round INTEGER, agent TEXT,
    task_id TEXT, reason TEXT NOT NULL, detail TEXT);
CREATE TABLE IF NOT EXISTS agents (
    name TEXT PRIMARY KEY, first_seen REAL, last_seen REAL, software TEXT, n_samples INTEGER,
    state TEXT);
"""


class History:
    """The SQLite history of a federation (``data_dir/history.db``)."""

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False) -> None:
        self.path = str(path)
        self._batch = False
        try:
            if readonly:
                self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10, check_same_thread=False)
            else:
                self.db = sqlite3.connect(self.path, timeout=10, check_same_thread=False)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
                self.db.executescript(_SCHEMA)
                self.db.commit()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open history: {exc}") from exc

    def close(self) -> None:
        self.db.close()

    def _write(self, sql: str, rows: Iterable[tuple[Any, ...]]) -> None:
        try:
            if self._batch:
                self.db.executemany(sql, rows)
                return
            with self.db:
                self.db.executemany(sql, rows)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: write failed: {exc}") from exc

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Group the writes made inside into one transaction (committed at the end, rolled
        back if anything raises); writes outside commit one by one."""
        if self._batch:
            yield
            return
        self._batch = True
        try:
            with self.db:
                yield
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: write failed: {exc}") from exc
        finally:
            self._batch = False

    # tasks -----------------------------------------------------------------
    def add_tasks(self, tasks: Iterable[TaskRow]) -> None:
        self._write("INSERT OR REPLACE INTO tasks VALUES (?, ?, ?, ?, ?, ?)",
                    [(t.task_id, t.round, t.kind, t.agent, t.issued, t.status) for t in tasks])

    def set_task_status(self, items: Iterable[tuple[str, str]]) -> None:
        self._write("UPDATE tasks SET status = ? WHERE task_id = ?", [(s, t) for t, s in items])

    def expire_tasks_after(self, round_: int) -> None:
        """Mark every task of a round after ``round_`` expired (never run to a commit)."""
        self._write("UPDATE tasks SET status = 'expired' WHERE round > ? AND status != 'expired'", [(round_,)])

    def tasks_of(self, round_: int, kind: str) -> list[TaskRow]:
        rows = self.db.execute("SELECT task_id, round, kind, agent, issued, status FROM tasks "
                               "WHERE round = ? AND kind = ? ORDER BY issued, agent", (round_, kind)).fetchall()
        return [TaskRow(*r) for r in rows]

    def task(self, task_id: str) -> TaskRow | None:
        row = self.db.execute("SELECT task_id, round, kind, agent, issued, status FROM tasks WHERE task_id = ?",
                              (task_id,)).fetchone()
        return TaskRow(*row) if row else None

    # results ---------------------------------------------------------------
    def add_agent_metrics(self, task_id: str, round_: int, kind: str, agent: str, n_samples: int,
                          metrics: dict[str, float]) -> None:
        self._write("INSERT OR REPLACE INTO agent_metrics VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(task_id, round_, kind, agent, n_samples, json.dumps(metrics), time.time())])

    def add_agent_metrics_many(self, rows: Iterable[tuple[str, int, str, str, int, dict[str, float]]]) -> None:
        """Several ``(task_id, round, kind, agent, n_samples, metrics)`` rows in one transaction."""
        now = time.time()
        self._write("INSERT OR REPLACE INTO agent_metrics VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(t, r, k, a, n, json.dumps(m), now) for t, r, k, a, n, m in rows])

    def add_round(self, round_: int, kind: str, *, started: float, finished: float, n_sampled: int,
                  n_accepted: int, n_rejected: int, metrics: dict[str, float], epsilon: float | None) -> None:
        eps = None if epsilon is None or not math.isfinite(epsilon) else epsilon
        self._write("INSERT OR REPLACE INTO rounds VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(round_, kind, started, finished, n_sampled, n_accepted, n_rejected,
                      json.dumps(metrics), eps)])

    def last_started(self, kind: str) -> float | None:
        """Wall time at which the newest recorded round of ``kind`` started (None: none yet)."""
        row = self.db.execute("SELECT MAX(started) FROM rounds WHERE kind = ?", (kind,)).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def prune(self, before: float, max_round: int, limit: int = 5000) -> int:
        """Delete up to about ``limit`` old per-task rows; how many went (call again while > 0).

        The tasks (and their ``agent_metrics`` rows) of every round that finished before
        wall time ``before``, up to round ``max_round``, and the rejections logged before
        ``before``. The ``rounds`` rows (one per round) and ``agents`` stay. Each batch is
        one transaction and uses the indexes, so a call stays short on a large history.
        """
        q = self.db.execute
        try:
            row = q("SELECT MAX(round) FROM rounds WHERE finished < ? AND round <= ?", (before, max_round)).fetchone()
            gone = 0
            with self.db:
                if row is not None and row[0] is not None:
                    ids = [(t,) for (t,) in q("SELECT task_id FROM tasks WHERE round <= ? LIMIT ?", (row[0], limit))]
                    if ids:
                        self.db.executemany("DELETE FROM agent_metrics WHERE task_id = ?", ids)
                        self.db.executemany("DELETE FROM tasks WHERE task_id = ?", ids)
                        gone += len(ids)
                oldest = q("SELECT ts FROM rejections ORDER BY id LIMIT 1").fetchone()
                if oldest is not None and oldest[0] < before:
                    gone += q("DELETE FROM rejections WHERE id IN (SELECT id FROM rejections ORDER BY id LIMIT ?) "
                              "AND ts < ?", (limit, before)).rowcount
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: pruning the history failed: {exc}") from exc
        return gone

    def add_rejection(self, round_: int | None, agent: str | None, task_id: str | None, reason: str,
                      detail: str) -> None:
        self._write("INSERT INTO rejections (ts, round, agent, task_id, reason, detail) VALUES (?, ?, ?, ?, ?, ?)",
                    [(time.time(), round_, agent, task_id, reason, detail[:500])])

    def upsert_agent(self, name: str, *, software: str, n_samples: int, state: str) -> None:
        now = time.time()
        self._write("INSERT INTO agents VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                    "last_seen = excluded.last_seen, software = excluded.software, "
                    "n_samples = excluded.n_samples, state = excluded.state",
                    [(name, now, now, software, n_samples, state)])

    def set_agent_state(self, name: str, state: str) -> None:
        self._write("UPDATE agents SET state = ?, last_seen = ? WHERE name = ?", [(state, time.time(), name)])

    # reports -----------------------------------------------------------------
    def summary(self, last: int = 10) -> dict[str, Any]:
        """Rounds, agents, last metrics and rejection counts, JSON-ready (for ``status``)."""
        q = self.db.execute
        rounds = [
            {"round": r, "kind": k, "started": s, "finished": f, "n_sampled": ns, "n_accepted": na,
             "n_rejected": nr, "metrics": json.loads(m or "{}"), "epsilon": e}
            for r, k, s, f, ns, na, nr, m, e in q(
                "SELECT * FROM rounds ORDER BY finished DESC LIMIT ?", (last,)).fetchall()
        ]
        agents = [
            {"name": n, "first_seen": fs, "last_seen": ls, "software": sw, "n_samples": ns, "state": st}
            for n, fs, ls, sw, ns, st in q("SELECT * FROM agents ORDER BY name").fetchall()
        ]
        rejections = dict(q("SELECT reason, COUNT(*) FROM rejections GROUP BY reason").fetchall())
        n_train = q("SELECT COUNT(*) FROM rounds WHERE kind = 'train'").fetchone()[0]
        return {"rounds": list(reversed(rounds)), "train_rounds": n_train, "agents": agents,
                "rejections": rejections}
