"""The uplink's durable outbox: a real SQLite file, reopened as after a crash."""
from __future__ import annotations

import sqlite3
import threading

import pytest

from fedgate.agent.outbox import Outbox, OutboxEntry
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
    raw = sqlite3.connect(db)
    raw.execute("UPDATE uplink_outbox SET fields = '{not json'")
    raw.commit()
    raw.close()
    with pytest.raises(StoreError, match="corrupt"):
        box.pending()
    box.close()
