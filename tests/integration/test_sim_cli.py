"""fedgate-sim as a real process: TCP with port 0 and a ready file, RTU on a pty link, a serial sensor."""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import serial
from pymodbus.client import ModbusSerialClient, ModbusTcpClient

from fedgate.drivers.sim.sensor import nmea_checksum


def _start(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, dict]:
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedgate.drivers.sim.cli", "--ready-file", str(ready), "--log-level", "WARNING", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"fedgate-sim did not get ready (rc={proc.returncode}): {err}")
        time.sleep(0.05)
    return proc, json.loads(ready.read_text())


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> tuple[int, str]:
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("fedgate-sim did not stop on signal")
    return proc.returncode, err


def _u(regs):
    v = 0
    for r in regs:
        v = (v << 16) | r
    return v


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_tcp_port_zero_ready_file_and_clean_shutdown(tmp_path, sig):
    proc, info = _start(tmp_path, "--tcp", "127.0.0.1:0", "--profile", "heavy,new-line", "--unit-id", "3",
                        "--speed", "500", "--seed", "4")
    try:
        assert info["transport"] == "tcp" and info["port"] > 0 and info["pid"] == proc.pid
        assert info["unit_ids"] == [3, 4] and info["profiles"] == ["heavy", "new-line"]
        client = ModbusTcpClient("127.0.0.1", port=info["port"], timeout=10)
        assert client.connect()
        try:
            regs = client.read_input_registers(0, count=84, device_id=4).registers
            name = b"".join(r.to_bytes(2, "big") for r in regs[76:84]).rstrip(b"\0").decode()
            assert name == "new-line"
            temp = struct.unpack(">f", struct.pack(">HH", *regs[0:2]))[0]
            assert 20 < temp < 120
            first = _u(regs[60:64])
            deadline = time.monotonic() + 20
            step = first
            while step < first + 200 and time.monotonic() < deadline:
                time.sleep(0.05)
                step = _u(client.read_input_registers(60, count=4, device_id=3).registers)
            assert step >= first + 200, "the plant clock runs in the served process"
        finally:
            client.close()
    finally:
        rc, err = _stop(proc, sig)
    assert rc == 0, err
    assert not (tmp_path / "ready.json").exists()
    assert "Traceback" not in err


def test_rtu_on_a_pty_link_and_serial_sensor(tmp_path):
    plc, vib = tmp_path / "ttyPLC", tmp_path / "ttyVIB"
    proc, info = _start(tmp_path, "--rtu-pty", str(plc), "--sensor-pty", str(vib), "--sensor-rate", "40",
                        "--garbage-rate", "0.3", "--speed", "100", "--profile", "standard")
    try:
        assert info["transport"] == "rtu" and info["rtu_link"] == str(plc) and info["sensor_path"] == str(vib)
        assert os.readlink(plc).startswith("/dev/pts/") and os.readlink(vib).startswith("/dev/pts/")
        client = ModbusSerialClient(str(plc), baudrate=19200, timeout=5, retries=3)
        assert client.connect()
        try:
            rr = client.read_input_registers(0, count=16, device_id=1)
            assert not rr.isError(), rr
            vib_rtu = struct.unpack(">f", struct.pack(">HH", *rr.registers[2:4]))[0]
            assert 0.5 < vib_rtu < 30
            assert not client.write_registers(0, [0x3F00, 0], device_id=1).isError()
            assert client.read_holding_registers(0, count=2, device_id=1).registers == [0x3F00, 0]
        finally:
            client.close()
        good, garbage, steps = [], 0, []
        with serial.Serial(str(vib), timeout=0.5) as port:
            deadline = time.monotonic() + 30
            while (len(good) < 30 or garbage < 3) and time.monotonic() < deadline:
                line = port.readline()
                if not line.endswith(b"\r\n"):
                    continue
                text = line[:-2]
                try:
                    s = text.decode("ascii")
                    body, cs = s[1:].split("*")
                    fields = body.split(",")
                    ok = s.startswith("$FGVIB,") and nmea_checksum(body) == cs and len(fields) == 4
                    vals = (float(fields[1]), float(fields[2]), int(fields[3]))
                except (UnicodeDecodeError, ValueError, IndexError):
                    ok = False
                if ok:
                    good.append(vals)
                    steps.append(vals[2])
                else:
                    garbage += 1
        assert len(good) >= 30 and garbage >= 3
        assert steps == sorted(steps) and steps[-1] > steps[0]
        assert all(0.3 < v < 30 and 0 < t < 150 for v, t, _ in good)
    finally:
        rc, err = _stop(proc)
    assert rc == 0, err
    assert not plc.exists() and not vib.exists(), "links are removed on shutdown"


def test_dump_csv_to_file_and_bad_arguments(tmp_path):
    out = tmp_path / "truth.csv"
    res = subprocess.run(
        [sys.executable, "-m", "fedgate.drivers.sim.cli", "--dump-csv", "50", "--horizon", "30s",
         "--profile", "light", "--seed", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=60,
    )
    assert res.returncode == 0, res.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 51 and lines[1].startswith("1,1,0,1,light,")
    for bad in (["--tcp", "nohost"], ["--tcp", "127.0.0.1:0", "--rtu", "/dev/null"], ["--profile", "nope", "--dump-csv", "1"],
                ["--tcp", "127.0.0.1:0", "--speed", "-1"], ["--dump-csv", "1", "--set", "nope=1"],
                ["--dump-csv", "1", "--set", "load=abc"], ["--dump-csv", "1", "--set", "load=9"]):
        res = subprocess.run([sys.executable, "-m", "fedgate.drivers.sim.cli", *bad], capture_output=True, text=True, timeout=60)
        assert res.returncode == 2, (bad, res.stderr)
        assert "fedgate-sim: error:" in res.stderr


def test_unopenable_serial_port_fails_cleanly(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "fedgate.drivers.sim.cli", "--rtu", str(tmp_path / "missing-tty")],
        capture_output=True, text=True, timeout=60,
    )
    assert res.returncode == 1 and "missing-tty" in res.stderr and "Traceback" not in res.stderr


def test_rtu_on_a_given_serial_path(tmp_path):
    from fedgate.drivers.sim.ptylink import PtyLink

    with PtyLink(a_link=str(tmp_path / "sim-side"), b_link=str(tmp_path / "agent-side")) as link:
        proc, info = _start(tmp_path, "--rtu", link.a_path, "--unit-id", "9", "--speed", "0", "--seed", "3")
        try:
            assert info["transport"] == "rtu" and info["rtu_path"] == link.a_path and info["unit_ids"] == [9]
            client = ModbusSerialClient(link.b_path, baudrate=19200, timeout=5, retries=3)
            assert client.connect()
            try:
                rr = client.read_input_registers(60, count=4, device_id=9)
                assert not rr.isError(), rr
                assert _u(rr.registers) == 1  # paused clock: the one step taken before serving
            finally:
                client.close()
        finally:
            rc, err = _stop(proc)
        assert rc == 0, err


def test_start_at_fast_forwards_the_same_trajectory(tmp_path):
    def dump(*extra: str) -> list[str]:
        res = subprocess.run([sys.executable, "-m", "fedgate.drivers.sim.cli", "--dump-csv", "30", "--seed", "6",
                              "--profile", "heavy", "--log-level", "WARNING", *extra],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        return res.stdout.splitlines()

    whole, late = dump(), dump("--start-at", "20s")
    assert late[0] == whole[0]
    assert late[1:11] == whole[21:31]  # rows for steps 21..30
    assert late[1].startswith("21,21,0,1,heavy,")


def test_sensor_in_request_response_mode(tmp_path):
    vib = tmp_path / "ttyVIB"
    proc, info = _start(tmp_path, "--tcp", "127.0.0.1:0", "--sensor-pty", str(vib), "--sensor-format", "kv",
                        "--sensor-request", "SI", "--speed", "0")
    try:
        with serial.Serial(str(vib), timeout=0.5) as port:
            time.sleep(0.3)
            assert port.read(256) == b"", "a polled instrument says nothing unasked"
            answers = []
            for cmd in (b"SI\r\n", b"XYZ\r\n", b"  SI\n"):
                port.write(cmd)
                deadline = time.monotonic() + 20
                line = b""
                while not line.endswith(b"\r\n") and time.monotonic() < deadline:
                    line += port.readline()
                answers.append(line)
        assert answers[0].startswith(b"vib_rms=") and b" step=1" in answers[0]
        assert answers[1] == b"ERR\r\n"
        assert answers[2] == answers[0], "paused plant: the same reading again"
    finally:
        rc, err = _stop(proc)
    assert rc == 0, err
