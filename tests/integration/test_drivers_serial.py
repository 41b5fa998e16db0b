"""Serial line sensors written into a pty: formats, bad lines, unplug and replug."""
from __future__ import annotations

import asyncio
import os

import pytest
from drivers_peers import run, wait_until

from fedgate.drivers import Acquisition, Quality, load_config
from fedgate.drivers.serial_line import nmea_checksum
from fedgate.drivers.sim import open_pty_writer


def nmea(body: str) -> str:
    return f"${body}*{nmea_checksum(body)}"


def _doc(port: str, device: dict) -> dict:
    dev = {"name": "s1", "transport": "tty", **device}
    return {"transports": [{"name": "tty", "kind": "serial-line", "port": port, "baudrate": 4800,
                            "timeout": "100ms", "reconnect_delay": "50ms", "reconnect_delay_max": "200ms"}],
            "devices": [dev]}


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


FORMATS = {
    "nmea": ({"format": "nmea", "tags": [{"name": "sog", "sentence": "RMC", "field": 7, "unit": "kn"},
                                         {"name": "alt", "sentence": "GPGGA", "field": 9, "unit": "m"}]},
             [nmea("GPRMC,120000,A,4807.038,N,01131.000,E,022.4,084.4,230394,,"),
              nmea("GPGGA,120001,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,")],
             {"sog": 22.4, "alt": 545.4}),
    "kv": ({"format": "kv", "tags": [{"name": "rms", "key": "RMS", "scale": 2.0},
                                     {"name": "ok", "key": "ok", "type": "bool"},
                                     {"name": "id", "key": "id", "type": "string"}]},
           ['RMS=1.25 ok=true id="pump-7"'], {"rms": 2.5, "ok": True, "id": "pump-7"}),
    "csv": ({"format": "csv", "delimiter": ";", "tags": [{"name": "t", "column": 0},
                                                         {"name": "n", "column": 2, "type": "int64"}]},
            ["21.5;x;17"], {"t": 21.5, "n": 17}),
    "regex": ({"format": "regex", "pattern": r"^W\s*(?P<w>[-\d.]+)\s*kg\s+(\w+)$",
               "tags": [{"name": "w", "group": "w", "unit": "kg"}, {"name": "state", "group": 2, "type": "string"}]},
              ["W 12.5 kg ST"], {"w": 12.5, "state": "ST"}),
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_each_line_format_yields_values(fmt):
    device, lines, expect = FORMATS[fmt]

    async def main():
        with open_pty_writer() as sensor:
            acq = Acquisition(load_config(_doc(sensor.path, device), file="agent.toml"))
            await acq.start()
            try:
                want = {f"s1.{k}" for k in expect}
                while not want <= set(acq.latest()):
                    for line in lines:
                        sensor.write_line(line)
                    await asyncio.sleep(0.05)
                return acq.latest(), acq.status()["s1"]
            finally:
                await acq.stop()

    latest, status = run(main())
    for name, value in expect.items():
        tv = latest[f"s1.{name}"]
        assert tv.value == pytest.approx(value) if isinstance(value, float) else tv.value == value, name
        assert tv.quality is Quality.GOOD
    assert status["state"] == "up" and sum(status["bad_lines"].values()) == 0


def test_bad_lines_are_counted_and_dropped_and_good_lines_still_read():
    device = {"format": "nmea", "max_line_length": 100,
              "tags": [{"name": "sog", "sentence": "RMC", "field": 7, "min": 0.0, "max": 50.0}]}
    good = nmea("GPRMC,120000,A,4807.038,N,01131.000,E,011.0,084.4,230394,,")
    fast = nmea("GPRMC,120000,A,4807.038,N,01131.000,E,099.0,084.4,230394,,")
    bad_sum = good[:-2] + ("00" if not good.endswith("00") else "01")

    async def main():
        with open_pty_writer() as sensor:
            acq = Acquisition(load_config(_doc(sensor.path, device), file="agent.toml"))
            await acq.start()
            try:
                await wait_until(lambda: acq._readers["tty"].opens == 1, what="port open")
                sensor.write(b"\x00\xff\xfe\x81garbage\x07\r\n")  # binary garbage
                sensor.write_line("$GPRMC," + "9" * 300)  # overlong
                sensor.write_line(bad_sum)  # checksum
                sensor.write_line(good[:30])  # truncated: cut before the checksum
                sensor.write_line(nmea("GPRMC,120000,A"))  # truncated: too few fields
                sensor.write_line(fast)  # out of range
                await wait_until(lambda: acq.latest().get("s1.sog") is not None, what="range value")
                bad_range = acq.latest()["s1.sog"]
                sensor.write_line(good)
                await wait_until(lambda: acq.latest()["s1.sog"].value == 11.0, what="good value")
                return bad_range, acq.latest()["s1.sog"], acq.status()["s1"]
            finally:
                await acq.stop()

    bad_range, tv, status = run(main())
    assert bad_range.value == 99.0 and bad_range.quality is Quality.BAD_RANGE
    assert tv.quality is Quality.GOOD and tv.raw == ("011.0",)
    assert status["bad_lines"] == {"overlong": 1, "garbage": 1, "checksum": 1, "truncated": 2}


def test_unplugged_port_is_reopened_with_backoff_without_leaking_fds(tmp_path):
    link = str(tmp_path / "ttyVIB")
    device = {"format": "kv", "stale_after": "200ms", "tags": [{"name": "rms", "key": "rms"}]}

    async def main():
        fds_before = _open_fds()
        sensor = open_pty_writer(link)
        acq = Acquisition(load_config(_doc(link, device), file="agent.toml"), seed=5)
        await acq.start()
        try:
            async def feed_until(value: float):
                while acq.latest().get("s1.rms") is None or acq.latest()["s1.rms"].value != value:
                    sensor.write_line(f"rms={value}")
                    await asyncio.sleep(0.03)
            await asyncio.wait_for(feed_until(1.0), 20)
            sensor.close()  # unplugged: the pty and its path are gone
            await wait_until(lambda: acq.status()["s1"]["state"] == "down", what="port down")
            await wait_until(lambda: acq.status()["s1"]["errors"]["connection"] >= 3, what="reopen attempts")
            await wait_until(lambda: acq.latest()["s1.rms"].quality is Quality.STALE, what="stale value")
            sensor = open_pty_writer(link)  # plugged back in, same path
            await asyncio.wait_for(feed_until(2.0), 20)
            status = acq.status()["s1"]
        finally:
            await acq.stop()
            sensor.close()
        return status, fds_before, _open_fds()

    status, fds_before, fds_after = run(main())
    assert status["state"] == "up" and status["reconnects"] >= 1
    assert fds_after == fds_before


def test_request_response_instrument_is_polled():
    device = {"format": "regex", "pattern": r"^S S\s+(?P<w>[-\d.]+) g$", "request": "SI\r\n", "poll": "50ms",
              "tags": [{"name": "weight", "group": "w", "unit": "g"}]}

    async def main():
        with open_pty_writer() as balance:
            acq = Acquisition(load_config(_doc(balance.path, device), file="agent.toml"))
            await acq.start()
            try:
                polls = 0

                async def answer():
                    nonlocal polls
                    while "s1.weight" not in acq.latest():
                        echo = balance.drain_echo()
                        if b"SI\r\n" in echo:
                            polls += echo.count(b"SI\r\n")
                            balance.write_line("S S     100.25 g")
                        await asyncio.sleep(0.02)
                await asyncio.wait_for(answer(), 20)
                return acq.latest()["s1.weight"], polls
            finally:
                await acq.stop()

    tv, polls = run(main())
    assert tv.value == 100.25 and tv.unit == "g"
    assert polls >= 1


def test_url_port_without_a_descriptor_is_polled():
    # pyserial's loop:// echoes our poll command back, which is itself a key=value line
    device = {"format": "kv", "request": "level=42\n", "poll": "50ms", "tags": [{"name": "level", "key": "level"}]}

    async def main():
        acq = Acquisition(load_config(_doc("loop://", device), file="agent.toml"))
        await acq.start()
        try:
            await wait_until(lambda: "s1.level" in acq.latest(), what="looped value")
            return acq.latest()["s1.level"]
        finally:
            await acq.stop()

    assert run(main()).value == 42.0


def test_missing_port_is_retried_with_backoff_and_counted(tmp_path):
    device = {"format": "kv", "tags": [{"name": "x", "key": "x"}]}

    async def main():
        acq = Acquisition(load_config(_doc(str(tmp_path / "nope"), device), file="agent.toml"), seed=6)
        await acq.start()
        try:
            await wait_until(lambda: acq.status()["s1"]["errors"]["connection"] >= 3, what="open attempts")
            return acq.status()["s1"]
        finally:
            await acq.stop()

    status = run(main())
    assert status["state"] == "down" and "cannot open" in status["last_error"]
