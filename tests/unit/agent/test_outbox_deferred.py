"""The outbox's cheap paths: deferred deletes, the in-memory index, slot reuse, the codec's
own CRC, the schema upgrade -- on real SQLite files and real killed processes."""
from __future__ import annotations

import doctest
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest

import fedgate.agent.outbox as outbox_module
from fedgate.agent.outbox import Outbox, OutboxEntry
from fedgate.agent.outbox_slots import _SPARE_SLOTS, SLOT_MIN_BYTES, PayloadSlots, payload_crc
from fedgate.core import codec


def _tid(i: int) -> str:
    return f"{i:032x}"


def _entry(i: int, round_: int, payload: bytes | None = b"\x01\x02") -> OutboxEntry:
    return OutboxEntry(task_id=_tid(i), round=round_, kind="train", fields={"n_samples": i}, payload=payload)


def _rows(db) -> list[tuple[str, int]]:
    raw = sqlite3.connect(db, timeout=10)
    try:
        return sorted(raw.execute("SELECT task_id, round FROM uplink_outbox").fetchall())
    finally:
        raw.close()


def _until(cond, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_module_example_runs():
    assert doctest.testmod(outbox_module, raise_on_error=False).failed == 0


def test_drop_through_hides_rows_at_once_and_deletes_them_with_the_next_result(tmp_path):
    db = tmp_path / "state.db"
    box = Outbox(db, linger_s=60.0)  # the idle thread would otherwise apply the delete itself
    box.put(_entry(1, 1))
    box.put(_entry(2, 1, None))
    box.put(_entry(3, 2))
    assert box.drop_through(1) == 2
    # gone for every reader of the outbox ...
    assert box.get(_tid(1)) is None and box.get(_tid(2)) is None
    assert box.count() == 1 and box.size_bytes() == 2
    assert box.drop_through(1) == 0
    assert not box.durable
    # ... while the rows wait in the file for the next write
    assert _rows(db) == [(_tid(1), 1), (_tid(2), 1), (_tid(3), 2)]
    box.put(_entry(4, 3))  # one transaction: the deferred DELETE and the new row
    assert _rows(db) == [(_tid(3), 2), (_tid(4), 3)]
    assert [e.task_id for e in box.pending()] == [_tid(3), _tid(4)]
    box.close()


def test_a_result_of_a_dropped_round_stored_again_is_kept(tmp_path):
    db = tmp_path / "state.db"
    box = Outbox(db, linger_s=60.0)
    box.put(_entry(1, 5))
    box.drop_through(7)
    box.put(_entry(2, 6))  # e.g. a late re-run: the DELETE runs first, in the same transaction
    assert box.count() == 1 and _rows(db) == [(_tid(2), 6)]
    box.close()
    again = Outbox(db)
    assert [e.task_id for e in again.pending()] == [_tid(2)]
    again.close()


def test_remove_and_pending_apply_a_deferred_delete(tmp_path):
    db = tmp_path / "state.db"
    box = Outbox(db, linger_s=60.0)
    for i, r in enumerate([1, 1, 2, 3]):
        box.put(_entry(i, r))
    box.drop_through(1)
    assert box.remove(_tid(0)) is False  # already dropped
    assert box.remove(_tid(2)) is True
    assert _rows(db) == [(_tid(3), 3)]
    box.put(_entry(9, 4))
    box.drop_through(3)
    assert [e.task_id for e in box.pending()] == [_tid(9)]
    assert _rows(db) == [(_tid(9), 4)]
    box.close()


def test_idle_background_thread_applies_and_hardens_the_deferred_delete(tmp_path):
    db = tmp_path / "state.db"
    box = Outbox(db, linger_s=0.05)
    box.put(_entry(1, 1))
    assert box.wait_durable(20.0)
    _until(lambda: not any(t.name == "outbox-harden" for t in threading.enumerate()), "the thread to go idle")
    box.drop_through(1)  # slow rounds: the commit comes after the thread went idle; it starts again
    _until(lambda: _rows(db) == [], "the deferred DELETE")
    _until(lambda: box.durable, "the deferred DELETE to be hardened")
    _until(lambda: not any(t.name == "outbox-harden" for t in threading.enumerate()), "the thread to exit")
    box.close()


def test_sync_and_close_apply_deferred_deletes(tmp_path):
    db = tmp_path / "state.db"
    box = Outbox(db, linger_s=60.0)
    box.put(_entry(1, 1))
    box.put(_entry(2, 2))
    box.drop_through(1)
    assert box.sync() and box.durable
    assert _rows(db) == [(_tid(2), 2)]
    box.drop_through(2)
    box.close()
    assert _rows(db) == []


_CRASH_AFTER_DROP = """
import os, signal, sys
from fedgate.agent.outbox import Outbox, OutboxEntry
box = Outbox(sys.argv[1], linger_s=60.0)
big = bytes(range(256)) * 1000
box.put(OutboxEntry(task_id="a" * 32, round=1, kind="train", fields={"n_samples": 1}, payload=big))
box.drop_through(1)
if sys.argv[2] == "put":
    box.put(OutboxEntry(task_id="b" * 32, round=2, kind="train", fields={"n_samples": 2}, payload=big[::-1]))
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("then", ["nothing", "put"])
def test_kill9_after_drop_through(tmp_path, then):
    """A delete not yet written only brings the committed result back (the server refuses
    it as stale and the agent removes it); its slot was not reused meanwhile."""
    db = tmp_path / "state.db"
    proc = subprocess.run([sys.executable, "-c", _CRASH_AFTER_DROP, str(db), then], capture_output=True,
                          timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    box = Outbox(db)
    big = bytes(range(256)) * 1000
    got = {e.task_id: e.payload for e in box.pending()}
    if then == "nothing":
        assert got == {"a" * 32: big}
    else:
        assert got == {"b" * 32: big[::-1]}
    assert box.corrupt_payloads == 0
    box.close()


def test_kill9_right_after_put_of_codec_payloads(tmp_path):
    """A codec buffer (its own CRC reused by the slot) of 40 KB and 4 MB survives kill -9."""
    db = tmp_path / "state.db"
    script = """
import os, signal, sys
import numpy as np
from fedgate.core import codec
from fedgate.agent.outbox import Outbox, OutboxEntry
box = Outbox(sys.argv[1])
rng = np.random.default_rng(5)
for i, n in enumerate((10_000, 1_000_000)):
    buf = codec.encode(rng.standard_normal(n).astype(np.float32), "f32")
    box.put(OutboxEntry(task_id=f"{i:032x}", round=4, kind="train", fields={"n_samples": n}, payload=buf))
os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", script, str(db)], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    rng = np.random.default_rng(5)
    want = [rng.standard_normal(n).astype(np.float32) for n in (10_000, 1_000_000)]
    box = Outbox(db)
    for i, vec in enumerate(want):
        got = box.get(_tid(i))
        assert got is not None and got.fields == {"n_samples": vec.size}
        np.testing.assert_array_equal(codec.decode(got.payload), vec)
    assert box.corrupt_payloads == 0
    box.close()


def test_slot_check_reuses_a_codec_crc_and_still_catches_damage(tmp_path):
    buf = codec.encode(np.linspace(-1, 1, 4000, dtype=np.float32), "f32")
    assert payload_crc(buf) == int.from_bytes(buf[20:24], "little")  # taken, not recomputed
    plain = b"\x05" * 20_000
    assert payload_crc(plain) == zlib.crc32(plain)
    slots = PayloadSlots(tmp_path / "slots")
    slots.write(0, "a" * 32, buf, payload_crc(buf))
    assert slots.read(0, "a" * 32, len(buf), payload_crc(buf)) == buf
    # slots written before codec CRCs were reused hold a CRC-32 of the whole payload
    slots.write(1, "b" * 32, buf, zlib.crc32(buf))
    assert slots.read(1, "b" * 32, len(buf), zlib.crc32(buf)) == buf
    for at in (3, 21, 100, len(buf) - 1):  # magic, the CRC bytes, the header, the values
        bad = bytearray(buf)
        bad[at] ^= 0x40
        slots.write(2, "c" * 32, bytes(bad), payload_crc(buf))
        assert slots.read(2, "c" * 32, len(buf), payload_crc(buf)) is None, at
    assert slots.read(0, "d" * 32, len(buf), payload_crc(buf)) is None  # another task's slot
    slots.close()


def test_shrinking_payload_truncates_its_reused_slot(tmp_path):
    db = tmp_path / "state.db"
    box = Outbox(db, linger_s=60.0)
    rng = np.random.default_rng(2)
    sizes = [300_000, SLOT_MIN_BYTES, 120_000, SLOT_MIN_BYTES + 1]
    blobs = [rng.bytes(n) for n in sizes]
    for i, blob in enumerate(blobs):
        box.put(_entry(i, i, blob))
        box.drop_through(i - 1)
        assert box.sync()  # the delete on disk: its slot is free for the next result
    box.close()
    files = {p.name: p.stat().st_size for p in (tmp_path / "state.db.outbox").iterdir()}
    # slot 0 held 300 kB, then 120 kB; slot 1 grew from 8192 to 8193 bytes
    assert files == {"slot-0.bin": 52 + sizes[2], "slot-1.bin": 52 + sizes[3]}
    again = Outbox(db)
    assert [e.payload for e in again.pending()] == blobs[-1:]
    again.close()


def test_get_count_and_size_come_from_the_index_and_survive_reopen(tmp_path):
    db = tmp_path / "state.db"
    box = Outbox(db)
    small, big = b"s" * 100, np.random.default_rng(3).bytes(SLOT_MIN_BYTES * 3)
    kept = _entry(1, 1, big)
    box.put(kept)
    box.put(_entry(2, 1, small))
    box.put(_entry(3, 2, None))
    assert box.get(_tid(1)) is kept  # held in memory: no read, no copy
    assert box.count() == 3 and box.size_bytes() == len(big) + len(small)
    box.close()
    again = Outbox(db)
    assert again.count() == 3 and again.size_bytes() == len(big) + len(small)
    got = again.get(_tid(1))  # read back from its slot file, CRC-checked
    assert got is not None and got.payload == big and got.fields == {"n_samples": 1}
    assert again.get(_tid(2)).payload == small and again.get(_tid(3)).payload is None
    assert again.get(_tid(4)) is None
    again.close()


def test_a_mutable_payload_is_stored_as_it_was_at_put(tmp_path):
    box = Outbox(tmp_path / "state.db")
    for i, n in enumerate((100, SLOT_MIN_BYTES * 2)):
        buf = bytearray(b"\x07" * n)
        box.put(_entry(i, 1, buf))  # type: ignore[arg-type]
        buf[:] = b"\x00" * n  # the caller reuses its buffer
        got = box.get(_tid(i))
        assert got is not None and got.payload == b"\x07" * n and isinstance(got.payload, bytes)
    box.close()


def test_opens_a_state_file_of_the_earlier_layout(tmp_path):
    db = tmp_path / "state.db"
    raw = sqlite3.connect(db)
    raw.executescript("""
        CREATE TABLE uplink_outbox (task_id TEXT PRIMARY KEY, round INTEGER NOT NULL, kind TEXT NOT NULL,
            fields TEXT NOT NULL, payload BLOB, created_ts REAL NOT NULL, sends INTEGER NOT NULL DEFAULT 0);
        CREATE INDEX uplink_outbox_round ON uplink_outbox(round);
        CREATE TABLE samples (ts REAL);
    """)
    raw.execute("INSERT INTO uplink_outbox VALUES (?, 3, 'train', '{\"n_samples\": 4}', ?, 1.5, 0)",
                (_tid(1), b"old"))
    raw.commit()
    raw.close()
    box = Outbox(db)
    got = box.get(_tid(1))
    assert got is not None and got.payload == b"old" and got.round == 3 and got.created_ts == 1.5
    box.put(_entry(2, 4, np.random.default_rng(4).bytes(SLOT_MIN_BYTES)))
    box.close()
    raw = sqlite3.connect(db)
    (sql,) = raw.execute("SELECT sql FROM sqlite_master WHERE name = 'uplink_outbox'").fetchone()
    indexes = raw.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'uplink_outbox' "
                          "AND sql IS NOT NULL").fetchall()
    tables = {n for (n,) in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    raw.close()
    assert "WITHOUT ROWID" in sql.upper() and indexes == [] and tables == {"uplink_outbox", "samples"}
    again = Outbox(db)
    assert sorted(e.task_id for e in again.pending()) == [_tid(1), _tid(2)]
    again.close()


def test_many_rounds_share_background_passes_and_end_durable(tmp_path):
    db = tmp_path / "state.db"
    box = Outbox(db)
    rng = np.random.default_rng(6)
    blob = codec.encode(rng.standard_normal(10_000).astype(np.float32), "f32")
    for r in range(200):
        box.put(_entry(r, r, blob))
        box.drop_through(r - 1)
    assert box.wait_durable(20.0)
    assert box.harden_errors == 0 and 1 <= box.fsyncs <= 201
    assert box.count() == 1 and box.get(_tid(199)).payload == blob
    box.close()
    assert box.durable
    again = Outbox(db)
    assert [e.task_id for e in again.pending()] == [_tid(199)]
    # this round's, the previous one's (not yet committed), the one whose row this put's
    # transaction deletes, and a few waiting for the fsync of the delete that freed them
    assert len(list((tmp_path / "state.db.outbox").iterdir())) <= 3 + _SPARE_SLOTS
    again.close()


def test_a_slot_is_reused_once_the_delete_that_freed_it_is_hardened(tmp_path):
    slots = PayloadSlots(tmp_path / "slots")
    assert [slots.claim(), slots.claim()] == [0, 1]
    slots.release(0, at_write=7)  # its row's DELETE is write 7
    assert slots.claim(hardened=6) == 2  # not yet on disk: a power cut could bring the row back
    slots.release(2)  # never named by a committed row: free at once
    assert slots.claim(hardened=6) == 2
    assert slots.claim(hardened=7) == 0
    slots.release(0)
    slots.release(1)
    slots.release(2)
    # results faster than the fsync passes: a round frees a slot (its write not hardened)
    # and claims one; a few slots wait for their fsync, then the oldest is reused anyway
    seen = set()
    for write in range(10, 40):
        slot = slots.claim(hardened=5)
        seen.add(slot)
        slots.release(slot, at_write=write)
    assert len(seen) == _SPARE_SLOTS  # (no row held meanwhile)
    slots.close()


def test_the_row_of_a_dropped_round_is_reused_in_place(tmp_path):
    db = tmp_path / "state.db"
    box = Outbox(db, linger_s=60.0)
    big = np.random.default_rng(7).bytes(SLOT_MIN_BYTES * 2)
    box.put(_entry(1, 1, big))
    box.put(_entry(2, 2, b"two"))
    box.drop_through(1)
    box.put(_entry(3, 3, None))  # one statement: row 1 becomes row 3
    assert _rows(db) == [(_tid(2), 2), (_tid(3), 3)]
    box.drop_through(3)
    box.put(_entry(3, 4, b"again"))  # the same task stored again after its round was dropped
    assert _rows(db) == [(_tid(3), 4)]
    box.drop_through(2)  # nothing left of round <= 2 ...
    box.put(_entry(3, 5, big))  # ... so this replaces row 3 the ordinary way
    assert _rows(db) == [(_tid(3), 5)]
    box.close()
    again = Outbox(db)
    assert [(e.task_id, e.round, e.payload) for e in again.pending()] == [(_tid(3), 5, big)]
    again.close()


def test_a_slot_that_cannot_be_written_is_a_store_error_and_nothing_is_stored(tmp_path):
    from fedgate.core.errors import StoreError

    db = tmp_path / "state.db"
    box = Outbox(db)
    (tmp_path / "state.db.outbox" / "slot-0.bin").mkdir()  # not a file any more
    with pytest.raises(StoreError, match="slot 0"):
        box.put(_entry(1, 1, b"\x09" * SLOT_MIN_BYTES))
    assert box.count() == 0 and box.get(_tid(1)) is None and _rows(db) == []
    box.put(_entry(2, 1, b"small"))  # the outbox itself keeps working
    assert box.count() == 1
    box.close()
