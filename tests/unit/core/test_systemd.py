"""sd_notify against a real datagram socket standing in for systemd."""
from __future__ import annotations

import socket

import pytest

from fedgate.core import systemd


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield sock
    sock.close()


def test_ready_and_watchdog_reach_the_socket(notify_socket):
    assert systemd.ready("3 samples stored")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=3 samples stored"
    assert systemd.watchdog_ping()
    assert notify_socket.recv(4096) == b"WATCHDOG=1"


def test_no_socket_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.ready() is False


def test_a_reader_that_stopped_draining_never_blocks_the_sender(notify_socket):
    # fill the receive queue; further notifications are dropped, not blocking
    results = [systemd.status(f"step {i}" + "x" * 2000) for i in range(2000)]
    assert results[0] is True
    assert results[-1] is False


def test_watchdog_interval_is_half_the_period(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert systemd.watchdog_interval_s() == 5.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert systemd.watchdog_interval_s() is None
