"""The uplink's durable outbox: a real SQLite file, reopened as after a crash."""
from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from fedgate.agent.outbox import Outbox, OutboxEntry
from fedgate.agent.outbox_slots import SLOT_MIN_BYTES
from fedgate.core.errors import StoreError


def _entry(i: int, round_: int, payload: bytes | None = b"\x01\x02") -> OutboxEntry:
    return OutboxEntry(task_id=f"{i:032x}", round=round_, kind="train" if payload else "evaluate",
                       fields={"n_samples": i, "metrics": {"loss": 0.5}}, payload=payload)


def test_entries_survive_reopen_and_keep_their_bytes(tmp_path):
    db = tmp_path / "state.db"
    box = Outbox(db)
    box.put(_entry(1, 4, b"\x00" * 1000 + b"\xff"))
    box.put(_entry(2, 4, None))
    box.close()  # as if the process died right after the commit

    again = Outbox(db)
    got = {e.task_id: e for e in again.pending()}
    assert set(got) == {f"{1:032x}", f"{2:032x}"}
    assert got[f"{1:032x}"].payload == b"\x00" * 1000 + b"\xff"
    assert got[f"{2:032x}"].payload is None
    assert got[f"{1:032x}"].fields == {"n_samples": 1, "metrics": {"loss": 0.5}}
    assert again.size_bytes() == 1001
    again.close()


def test_drop_through_removes_committed_rounds_only(tmp_path):
    box = Outbox(tmp_path / "state.db")
    for i, r in enumerate([1, 2, 2, 3, 5]):
        box.put(_entry(i, r))
    assert box.drop_through(2) == 3
    assert [e.round for e in box.pending()] == [3, 5]
    assert box.remove(f"{3:032x}") is True
    assert box.remove(f"{3:032x}") is False
    assert box.count() == 1
    box.close()


def test_put_of_same_task_replaces(tmp_path):
    box = Outbox(tmp_path / "state.db")
    box.put(_entry(7, 1, b"a"))
    box.put(_entry(7, 1, b"bb"))
    assert box.count() == 1
    assert box.get(f"{7:032x}").payload == b"bb"
    assert box.get("f" * 32) is None
    box.close()


def test_table_shares_the_file_in_wal_mode(tmp_path):
    db = tmp_path / "state.db"
    other = sqlite3.connect(db)
    other.execute("CREATE TABLE samples (ts REAL, x REAL)")
    other.commit()
    box = Outbox(db)
    box.put(_entry(1, 1))
    fresh = sqlite3.connect(db)
    assert fresh.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    fresh.close()
    assert other.execute("SELECT COUNT(*) FROM uplink_outbox").fetchone()[0] == 1
    other.execute("INSERT INTO samples VALUES (1, 2)")
    other.commit()
    other.close()
    assert box.count() == 1
    box.close()


def test_concurrent_writers_from_threads(tmp_path):
    box = Outbox(tmp_path / "state.db")

    def writer(base: int) -> None:
        for i in range(20):
            box.put(_entry(base + i, i))

    threads = [threading.Thread(target=writer, args=(k * 100,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert box.count() == 60
    box.close()


def test_closed_or_unusable_file_raises_store_error(tmp_path):
    box = Outbox(tmp_path / "state.db")
    box.close()
    with pytest.raises(StoreError, match="closed"):
        box.count()
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(StoreError, match="dir.db"):
        Outbox(tmp_path / "dir.db")


def test_corrupt_fields_reported(tmp_path):
    db = tmp_path / "state.db"
    box = Outbox(db)
    box.put(_entry(1, 1))
    box.close()
    raw = sqlite3.connect(db)
    raw.execute("UPDATE uplink_outbox SET fields = '{not json'")
    raw.commit()
    raw.close()
    again = Outbox(db)  # damage on disk shows when the rows are read back (after a restart)
    with pytest.raises(StoreError, match="corrupt"):
        again.pending()
    with pytest.raises(StoreError, match="corrupt"):
        again.get(f"{1:032x}")
    again.close()


_KILLED_WRITER = """
import os, signal, sys
from fedgate.agent.outbox import Outbox, OutboxEntry
box = Outbox(sys.argv[1])
box.put(OutboxEntry(task_id="c" * 32, round=9, kind="train", fields={"n_samples": 3}, payload=b"\\x07" * 5000))
box.put(OutboxEntry(task_id="d" * 32, round=9, kind="train", fields={"n_samples": 4}, payload=b"\\x08" * 300_000))
os.kill(os.getpid(), signal.SIGKILL)  # right after put: no close, no background fsync awaited
"""


def test_put_survives_kill9_of_the_writer_at_once(tmp_path):
    db = tmp_path / "state.db"
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(db)], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    box = Outbox(db)
    got = box.get("c" * 32)
    assert got is not None and got.round == 9 and got.payload == b"\x07" * 5000
    big = box.get("d" * 32)  # kept in a slot file
    assert big is not None and big.fields == {"n_samples": 4} and big.payload == b"\x08" * 300_000
    box.close()


def test_writes_are_hardened_in_the_background_and_the_thread_goes_idle(tmp_path):
    box = Outbox(tmp_path / "state.db")
    assert box.durable
    before = box.fsyncs
    box.put(_entry(1, 1, b"x" * 100))
    box.put(_entry(2, 1, b"y" * 100))
    assert box.wait_durable(20.0)
    assert box.durable and box.fsyncs > before and box.harden_errors == 0
    deadline = time.monotonic() + 20.0
    while any(t.name == "outbox-harden" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "harden thread never went idle"
        time.sleep(0.02)
    box.put(_entry(3, 2))  # a new burst starts a new thread
    assert box.wait_durable(20.0)
    box.drop_through(2)  # deletes are hardened lazily (with the next result, or sync/close)
    assert not box.durable
    assert box.sync() and box.durable
    box.close()
    assert not any(t.name == "outbox-harden" for t in threading.enumerate())


def test_wal_is_checkpointed_off_the_write_path_and_stays_bounded(tmp_path):
    db = tmp_path / "state.db"
    box = Outbox(db)
    blob = np.random.default_rng(0).bytes(SLOT_MIN_BYTES - 1)  # inline rows (below the slot size)
    for i in range(360):  # a round: the previous round's commit drops its result, a new one is stored
        box.drop_through(i - 1)
        box.put(_entry(i, i, blob))
        if i % 40 == 39:  # now and then the harden thread catches up (rounds may come faster than it)
            deadline = time.monotonic() + 20.0
            while box.checkpointed < box.writes:
                assert time.monotonic() < deadline, "the WAL was not checkpointed after a 1 MiB write"
                time.sleep(0.01)
    assert box.checkpoints >= 1
    wal = db.with_name(db.name + "-wal")
    assert wal.stat().st_size < 2 << 20  # about 4.5 MiB went through it (rows and their deletion)
    assert box.count() == 1
    box.close()


def test_large_payloads_live_in_reused_slot_files_checked_on_reading(tmp_path, caplog):
    db = tmp_path / "state.db"
    box = Outbox(db)
    rng = np.random.default_rng(1)
    blobs = [rng.bytes(200_000 + i) for i in range(6)]
    for i, blob in enumerate(blobs):  # a round each: store, then the commit drops it
        box.put(_entry(i, i, blob))
        assert box.get(f"{i:032x}").payload == blob
        box.drop_through(i)
        assert box.sync()  # the deferred DELETE applied and on disk: the slot is free again
    slots = sorted(p.name for p in (tmp_path / "state.db.outbox").iterdir())
    assert slots == ["slot-0.bin"]  # one file, rewritten in place
    box.put(_entry(10, 7, blobs[0]))
    box.put(_entry(11, 7, blobs[1]))
    box.put(_entry(11, 7, blobs[2]))  # a re-run task replaces its result (and frees its slot)
    assert box.size_bytes() == len(blobs[0]) + len(blobs[2])
    box.close()

    again = Outbox(db)
    got = {e.task_id: e.payload for e in again.pending()}
    assert got == {f"{10:032x}": blobs[0], f"{11:032x}": blobs[2]}
    again.close()
    # a torn slot (power cut before the background fsync): detected, dropped, never sent
    slot = next(p for p in (tmp_path / "state.db.outbox").iterdir() if p.read_bytes().endswith(blobs[2]))
    raw = bytearray(slot.read_bytes())
    raw[-10:] = b"\x00" * 10
    slot.write_bytes(bytes(raw))
    third = Outbox(db)
    with caplog.at_level("ERROR", logger="fedgate.agent.outbox"):
        assert [e.task_id for e in third.pending()] == [f"{10:032x}"]
    assert third.corrupt_payloads == 1 and third.count() == 1
    assert f"{11:032x}" in caplog.text and "damaged" in caplog.text
    third.close()
