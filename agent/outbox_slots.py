"""Outbox payloads in reusable slot files beside the agent's state database.

A model update is 40 KB to several MB. Stored as a SQLite blob it costs, per round,
a copy into SQLite's buffers, one WAL frame (two ``write`` calls) per 4 KiB page, the
same pages again when the row is deleted, and a checkpoint copying them into the
database file. Here it is written with one ``pwritev`` into a slot file that an
earlier result already used (its pages are in the OS cache: no allocation, no page
faults; the descriptor stays open), and the outbox row keeps the slot number, length
and CRC-32.

Each slot file starts with a header naming the task it holds::

    magic "FGOBX001" | task_id (32 ASCII bytes) | payload length (uint64 LE) | CRC-32 (uint32 LE)

followed by the payload. A payload is accepted on reading only when the header names
the row's task and both length and CRC match, so a torn write (power loss before the
background fsync) is detected, never sent. Slots are reused lowest first, once the
delete that freed them is on stable storage, so a power cut cannot bring back a row
whose slot was overwritten (when results come faster than the fsync passes, a few
spare slots are used and then the oldest is reused anyway: such a row, of a committed
round, would be reported damaged and dropped). Files are never deleted (a slot the
current rows do not name is free).

The CRC-32 costs ~0.25 ms per MB to compute. A payload in fedgate's vector codec
format (:mod:`fedgate.core.codec`: magic ``FGVC``, a 24-byte header whose bytes
20..23 hold the CRC-32 of bytes 0..19 followed by the payload) already carries one,
computed when it was encoded: that CRC is the slot's, so storing costs no pass over
the bytes. Reading checks it the codec's way (plus the stored CRC bytes themselves);
a plain CRC-32 of the whole payload is accepted too (other payloads, and slots
written by earlier versions). A codec buffer whose own CRC is wrong is stored as it
is and, read back from its slot after a restart, dropped as damaged (the server would
refuse it as undecodable anyway).
"""
from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

from fedgate.core.crc import crc32

__all__ = ["PayloadSlots", "SLOT_MIN_BYTES", "payload_crc"]

SLOT_MIN_BYTES = 8 * 1024       # smaller payloads stay inline in the outbox row
_HEADER = struct.Struct("<8s32sQI")
_MAGIC = b"FGOBX001"
_OPEN_SLOTS = 8                 # descriptors of slots below this number stay open
_SPARE_SLOTS = 3                # slots left waiting for their delete's fsync before one is reused anyway
_CODEC_MAGIC = b"FGVC"
_CODEC_HEADER = 24              # fedgate.core.codec.HEADER_SIZE
_CODEC_CRC_AT = 20
_U32 = struct.Struct("<I")


def payload_crc(view: bytes | memoryview) -> int:
    """The CRC-32 a slot records for ``view`` (unsigned bytes).

    A codec buffer's own CRC (bytes 20..23, not recomputed: O(1)), else the CRC-32
    of the whole payload.
    """
    if len(view) >= _CODEC_HEADER and view[:4] == _CODEC_MAGIC:
        return int(_U32.unpack_from(view, _CODEC_CRC_AT)[0])
    return crc32(view)


def _crc_matches(data: bytes, crc: int) -> bool:
    if len(data) >= _CODEC_HEADER and data[:4] == _CODEC_MAGIC:
        mv = memoryview(data)
        if (_U32.unpack_from(data, _CODEC_CRC_AT)[0] == crc
                and crc32(mv[_CODEC_HEADER:], crc32(mv[:_CODEC_CRC_AT])) == crc):
            return True
    return crc32(data) == crc


class PayloadSlots:
    """The slot files of one outbox (``<db>.outbox/slot-N.bin``).

    Parameters
    ----------
    directory : Path
        Created if missing.

    Notes
    -----
    :meth:`claim`, :meth:`write`, :meth:`release` and :meth:`read` are called under
    the outbox's lock; :meth:`fsync_dirty` runs on its harden thread (the dirty set
    and the descriptor table have their own lock), :meth:`close` after the last one.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self._used: set[int] = set()
        self._freed_at: dict[int, int] = {}  # slot -> the write whose commit freed it
        self._dirty: set[int] = set()
        self._new_entries = True          # the directory itself needs an fsync
        self._fds: dict[int, int] = {}    # slot -> open descriptor (slots < _OPEN_SLOTS)
        self._sizes: dict[int, int] = {}  # slot -> file size, as last written
        self._fd_lock = threading.Lock()

    def path(self, slot: int) -> Path:
        return self.dir / f"slot-{slot}.bin"

    def mark_used(self, slot: int) -> None:
        """A row of the table names ``slot`` (at open)."""
        self._used.add(slot)

    def claim(self, hardened: int = 0) -> int:
        """The lowest free slot, now in use.

        A slot freed by a delete that is not yet on stable storage (write number above
        ``hardened``) is skipped while a few others are at hand: a power cut could bring
        its row back, whose payload should then still be there (else the row is only
        reported damaged and dropped, as it was committed anyway). So there are at most
        ``_SPARE_SLOTS`` files more than rows.
        """
        used, freed_at = self._used, self._freed_at
        slot, first_waiting, waiting = 0, -1, 0
        while slot in used or freed_at.get(slot, 0) > hardened:
            if slot not in used:
                waiting += 1
                if first_waiting < 0:
                    first_waiting = slot
            slot += 1
        if waiting >= _SPARE_SLOTS:  # results come faster than the fsync passes: reuse one anyway
            slot = first_waiting
        self._used.add(slot)
        self._freed_at.pop(slot, None)
        return slot

    def release(self, slot: int | None, at_write: int = 0) -> None:
        """``slot`` is named by no row since write number ``at_write`` (0: never was)."""
        if slot is not None:
            self._used.discard(slot)
            if at_write:
                self._freed_at[slot] = at_write

    def write(self, slot: int, task_id: str, view: bytes | memoryview, crc: int) -> None:
        """Write the payload ``view`` (unsigned bytes, CRC-32 ``crc``) for ``task_id`` into ``slot``.

        One ``pwritev`` of header and payload; the file is truncated only when it held
        a longer payload before.

        Raises
        ------
        OSError
        """
        n = len(view)
        head = _HEADER.pack(_MAGIC, task_id.encode("ascii"), n, crc)
        size = _HEADER.size + n
        with self._fd_lock:
            fd = self._fds.get(slot)
            keep = fd is not None or slot < _OPEN_SLOTS
            if fd is None:
                created = not os.path.exists(self.path(slot))
                fd = os.open(self.path(slot), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                if created:
                    self._new_entries = True
                if keep:
                    self._fds[slot] = fd
            try:
                done = os.pwritev(fd, [head, view], 0)
                if done != size:
                    raise OSError(f"{self.path(slot)}: short write ({done} of {size} bytes)")
                old = self._sizes.get(slot)
                if old is None:
                    old = os.fstat(fd).st_size
                if old > size:
                    os.ftruncate(fd, size)
                self._sizes[slot] = size
            except OSError:
                self._sizes.pop(slot, None)
                raise
            finally:
                if not keep:
                    os.close(fd)
            self._dirty.add(slot)

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
        if len(data) != length or not _crc_matches(data, crc):
            return None
        return data

    def fsync_dirty(self) -> int:
        """``fdatasync`` every slot written since the last call (and the directory after
        new files); returns how many files were synced.

        Raises
        ------
        OSError
            The slots stay dirty and are tried again next time.
        """
        with self._fd_lock:
            dirty, self._dirty = self._dirty, set()
            new, self._new_entries = self._new_entries, False
            fds = {s: self._fds.get(s) for s in dirty}
        try:
            for slot in sorted(dirty):
                fd = fds[slot]
                if fd is not None:  # kept open until close(), which the outbox calls after its last fsync
                    os.fdatasync(fd)
                    continue
                fd = os.open(self.path(slot), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
            if new:
                fd = os.open(self.dir, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError:
            with self._fd_lock:
                self._dirty |= dirty
                self._new_entries = self._new_entries or new
            raise
        return len(dirty) + (1 if new else 0)

    def close(self) -> None:
        """Close the kept descriptors (idempotent; the files stay)."""
        with self._fd_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
