"""PtyLink and PtyWriter: real pty pairs, real pyserial ports, no fd or thread leaks."""
from __future__ import annotations

import doctest
import os
import time

import pytest
import serial

from fedgate.drivers.sim import ptylink
from fedgate.drivers.sim.ptylink import PtyLink, open_pty_writer


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@pytest.fixture
def no_fd_leak():
    before = _open_fds()
    yield
    leaked = _open_fds() - before
    # listdir itself opens one fd that is already closed again; anything left is ours
    assert not {fd for fd in leaked if os.path.exists(f"/proc/self/fd/{fd}")}, f"leaked fds {leaked}"


def _read_exactly(port: serial.Serial, n: int, timeout_s: float = 20.0) -> bytes:
    got = b""
    deadline = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        got += port.read(n - len(got))
    return got


def _serial(path: str) -> serial.Serial:
    return serial.Serial(path, baudrate=19200, timeout=0.2)


def test_bytes_flow_both_ways(no_fd_leak):
    with PtyLink() as link, _serial(link.a_path) as a, _serial(link.b_path) as b:
        a.write(b"\x01\x03\x00\x00\x00\x02\xc4\x0b")
        assert _read_exactly(b, 8) == b"\x01\x03\x00\x00\x00\x02\xc4\x0b"
        b.write(b"pong\r\n")
        assert _read_exactly(a, 6) == b"pong\r\n"
        assert link.bytes_a_to_b == 8 and link.bytes_b_to_a == 6


def test_raw_mode_keeps_every_byte(no_fd_leak):
    payload = bytes(range(256)) * 4
    with PtyLink() as link:
        fa = os.open(link.a_path, os.O_RDWR | os.O_NOCTTY)
        fb = os.open(link.b_path, os.O_RDWR | os.O_NOCTTY)
        try:
            os.write(fa, payload)
            got = b""
            deadline = time.monotonic() + 20
            while len(got) < len(payload) and time.monotonic() < deadline:
                got += os.read(fb, 4096)
        finally:
            os.close(fa)
            os.close(fb)
    assert got == payload  # no echo, no CR/LF translation, no control characters eaten


def test_symlinks_created_and_removed(tmp_path, no_fd_leak):
    la, lb = tmp_path / "plc", tmp_path / "agent"
    link = PtyLink(a_link=str(la), b_link=str(lb)).start()
    try:
        assert link.a_path == str(la) and link.b_path == str(lb)
        assert os.readlink(la) == link.a_tty and link.a_tty.startswith("/dev/pts/")
        assert os.readlink(lb) == link.b_tty
    finally:
        link.close()
    assert not la.exists() and not lb.exists()


def test_refuses_to_replace_a_regular_file(tmp_path, no_fd_leak):
    target = tmp_path / "file"
    target.write_text("keep me")
    with pytest.raises(FileExistsError):
        PtyLink(a_link=str(target)).start()
    assert target.read_text() == "keep me"


def test_survives_one_side_closing_and_reopening(no_fd_leak):
    with PtyLink() as link, _serial(link.a_path) as a:
        b = _serial(link.b_path)
        a.write(b"one")
        assert _read_exactly(b, 3) == b"one"
        b.close()
        # nobody listens on B: writes must neither block the writer nor kill the relay
        for _ in range(200):
            a.write(b"x" * 1024)
        a.flush()
        b = _serial(link.b_path)  # pyserial flushes stale input on open
        try:
            deadline = time.monotonic() + 20
            while link.bytes_a_to_b + link.dropped_bytes < 3 + 200 * 1024 and time.monotonic() < deadline:
                time.sleep(0.01)
            b.reset_input_buffer()
            a.write(b"two")
            assert _read_exactly(b, 3) == b"two"
            b.write(b"back")
            assert _read_exactly(a, 4) == b"back"
        finally:
            b.close()


def test_start_twice_and_use_before_start():
    link = PtyLink()
    with pytest.raises(RuntimeError):
        _ = link.a_path
    link.start()
    try:
        with pytest.raises(RuntimeError):
            link.start()
    finally:
        link.close()
    link.close()  # idempotent


def test_writer_lines_reach_a_pyserial_reader(tmp_path, no_fd_leak):
    with open_pty_writer(str(tmp_path / "vib")) as w, serial.Serial(w.path, timeout=0.2) as r:
        assert os.readlink(w.path) == w.tty
        assert w.write_line("$FGVIB,1.5*00")
        assert w.write_line(b"rms=2.5")
        lines = []
        deadline = time.monotonic() + 20
        while len(lines) < 2 and time.monotonic() < deadline:
            line = r.readline()
            if line:
                lines.append(line)
        assert lines == [b"$FGVIB,1.5*00\r\n", b"rms=2.5\r\n"]
        r.write(b"SI\r\n")
        deadline = time.monotonic() + 20
        echo = b""
        while len(echo) < 4 and time.monotonic() < deadline:
            echo += w.drain_echo()
        assert echo == b"SI\r\n"
    assert not (tmp_path / "vib").exists()


def test_writer_drops_when_nobody_reads(no_fd_leak):
    with open_pty_writer() as w:
        results = [w.write_line("x" * 200) for _ in range(2000)]  # far over the pty buffer
        assert not all(results)
        assert w.dropped_lines == results.count(False) > 0
        assert w.lines_written == results.count(True) > 0
    with pytest.raises(RuntimeError):
        w.write_line("closed")


def test_docstring_examples_run():
    result = doctest.testmod(ptylink)
    assert result.attempted >= 2 and result.failed == 0
