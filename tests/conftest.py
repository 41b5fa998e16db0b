"""Suite-wide fixtures.

``no_leaked_threads`` (autouse) fails a test that leaves a non-daemon-owned thread
running after it, the way pymodbus' own suite guards against leaked tasks.
"""
from __future__ import annotations

import threading
import time

import pytest


def _threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t is not threading.main_thread()}


@pytest.fixture(autouse=True)
def no_leaked_threads():
    before = _threads()
    yield
    deadline = time.monotonic() + 5.0
    leaked = _threads() - before
    while leaked and time.monotonic() < deadline:
        time.sleep(0.05)
        leaked = {t for t in leaked if t.is_alive()}
    leaked = {t for t in leaked if t.is_alive() and not t.name.startswith(("asyncio_", "ThreadPoolExecutor"))}
    assert not leaked, f"test leaked threads: {sorted(t.name for t in leaked)}"
