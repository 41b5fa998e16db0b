"""Large outbox payloads in reusable slot files beside the agent's state database.

A model update of a million parameters is 4 MB. Stored as a SQLite blob it costs,
per round, a copy into SQLite's buffers, a thousand WAL frames, the same pages again
when the row is deleted, and a checkpoint copying them into the database file.
Here it is written with one ``pwritev`` into a slot file that an earlier result
already used (its pages are in the OS cache: no allocation, no page faults), and
the outbox row keeps the slot number, length and CRC-32.

Each slot file starts with a header naming the task it holds::

    magic "FGOBX001" | task_id (32 ASCII bytes) | payload length (uint64 LE) | CRC-32 (uint32 LE)

followed by the payload. A payload is accepted on reading only when the header names
the row's task and both length and CRC match, so a torn write (power loss before the
background fsync) or a slot reused after a delete that a power cut undid is detected,
never sent. Slots are reused lowest first; files are never deleted (a slot the
current rows do not name is free).
"""
from __future__ import annotations

import os
import struct
import threading
import zlib
from pathlib import Path

__all__ = ["PayloadSlots", "SLOT_MIN_BYTES"]

SLOT_MIN_BYTES = 64 * 1024      # smaller payloads stay inline in the outbox row
_HEADER = struct.Struct("<8s32sQI")
_MAGIC = b"FGOBX001"


class PayloadSlots:
    """The slot files of one outbox (``<db>.outbox/slot-N.bin``).

    Parameters
    ----------
    directory : Path
        Created if missing.

    Notes
    -----
    :meth:`claim`, :meth:`write` and :meth:`release` are called under the outbox's
    lock; :meth:`fsync_dirty` runs on its harden thread (the dirty set has its own lock).
    """

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self._used: set[int] = set()
        self._dirty: set[int] = set()
        self._new_entries = True          # the directory itself needs an fsync
        self._dirty_lock = threading.Lock()

    def path(self, slot: int) -> Path:
        return self.dir / f"slot-{slot}.bin"

    def mark_used(self, slot: int) -> None:
        """A row of the table names ``slot`` (at open)."""
        self._used.add(slot)

    def claim(self) -> int:
        """The lowest free slot, now in use."""
        slot = 0
        while slot in self._used:
            slot += 1
        self._used.add(slot)
        return slot

    def release(self, slot: int | None) -> None:
        if slot is not None:
            self._used.discard(slot)

    def write(self, slot: int, task_id: str, payload: bytes | memoryview) -> int:
        """Write ``payload`` for ``task_id`` into ``slot``; returns its CRC-32.

        Raises
        ------
        OSError
        """
        view = memoryview(payload).cast("B")
        crc = zlib.crc32(view)
        head = _HEADER.pack(_MAGIC, task_id.encode("ascii"), len(view), crc)
        path = self.path(slot)
        created = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            size = _HEADER.size + len(view)
            done = os.pwritev(fd, [head, view], 0)
            if done != size:
                raise OSError(f"{path}: short write ({done} of {size} bytes)")
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)
        finally:
            os.close(fd)
        with self._dirty_lock:
            self._dirty.add(slot)
            self._new_entries = self._new_entries or created
        return crc

    def read(self, slot: int, task_id: str, length: int, crc: int) -> bytes | None:
        """The payload of ``task_id`` in ``slot``, or None if the slot holds anything else."""
        try:
            with open(self.path(slot), "rb") as fh:
                head = fh.read(_HEADER.size)
                data = fh.read(length + 1)
        except OSError:
            return None
        if len(head) != _HEADER.size:
            return None
        magic, tid, n, c = _HEADER.unpack(head)
        if magic != _MAGIC or tid != task_id.encode("ascii") or n != length or c != crc:
            return None
        if len(data) != length or zlib.crc32(data) != crc:
            return None
        return data

    def fsync_dirty(self) -> None:
        """fsync every slot written since the last call (and the directory after new files).

        Raises
        ------
        OSError
            The slots stay dirty and are tried again next time.
        """
        with self._dirty_lock:
            dirty, self._dirty = self._dirty, set()
            new, self._new_entries = self._new_entries, False
        try:
            for slot in sorted(dirty):
                fd = os.open(self.path(slot), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            if new:
                fd = os.open(self.dir, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError:
            with self._dirty_lock:
                self._dirty |= dirty
                self._new_entries = self._new_entries or new
            raise
