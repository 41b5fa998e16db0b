"""Hardening the outbox must not cost SQLite its locks.

POSIX drops every lock a process holds on a file when any descriptor of that file is
closed; a reader in another process then finds the database idle and deletes the WAL
under the agent's connections, whose later commits vanish for every other reader.
"""
from __future__ import annotations

import os
import subprocess
import sys

from fedgate.agent.outbox import Outbox, OutboxEntry

_READ = (
    "import sqlite3, sys\n"
    "c = sqlite3.connect(sys.argv[1], timeout=10)\n"
    "print(c.execute('SELECT COUNT(*) FROM uplink_outbox').fetchone()[0])\n"
    "c.close()\n"
)


def _count_from_another_process(db) -> int:
    out = subprocess.run([sys.executable, "-c", _READ, str(db)], capture_output=True, text=True, check=True)
    return int(out.stdout)


def test_other_readers_keep_seeing_commits_after_background_fsyncs(tmp_path):
    db = tmp_path / "agent.db"
    box = Outbox(db)
    try:
        for rnd in range(1, 4):
            box.put(OutboxEntry(task_id=f"{rnd:032x}", round=rnd, kind="train", fields={"n_samples": 1},
                                payload=b"p" * 100))
            assert box.sync()                      # fsyncs the WAL and the database
            wal_inode = os.stat(f"{db}-wal").st_ino
            assert _count_from_another_process(db) == rnd   # a reader opens and closes
            assert os.stat(f"{db}-wal").st_ino == wal_inode  # ... and left our WAL alone
    finally:
        box.close()


def test_close_releases_every_descriptor(tmp_path):
    before = set(os.listdir("/proc/self/fd"))
    box = Outbox(tmp_path / "agent.db")
    box.put(OutboxEntry(task_id="cd" * 16, round=1, kind="train", fields={"n_samples": 1}, payload=b"x"))
    assert box.sync()
    box.close()
    assert set(os.listdir("/proc/self/fd")) <= before
