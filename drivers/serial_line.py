"""Serial line sensors: NMEA 0183, key=value, CSV and regex lines over pyserial.

A :class:`SerialLineReader` owns one ``serial-line`` transport. It opens the port
non-blocking, waits for data with the event loop (``add_reader``, no thread),
splits the byte stream on the device's terminator and hands each line to the
:class:`LineParser` of every device on the port. Lines that are too long, binary
garbage, fail their NMEA checksum or are cut short are counted per device and
dropped; they never stop the reader. A port that fails (USB adapter unplugged, pty
closed) is closed and reopened with exponential backoff; the file descriptor is
closed on every path.

>>> from fedgate.drivers.config import load_config
>>> doc = {"transports": [{"name": "s", "kind": "serial-line", "port": "/dev/null"}],
...        "devices": [{"name": "gps", "transport": "s", "format": "nmea",
...                     "tags": [{"name": "sog", "sentence": "RMC", "field": 7, "unit": "kn"}]}]}
>>> parser = LineParser(load_config(doc, file="agent.toml").devices[0])
>>> [(v.name, v.value) for v in parser.parse("$GPRMC,120000,A,4807.038,N,01131.000,E,022.4,084.4,230394,,*1F", 1.0)]
[('gps.sog', 22.4)]
>>> parser.parse("$GPRMC,120000,A,4807.038,N,01131.000,E,022.4,084.4,230394,,*2B", 1.0)
Traceback (most recent call last):
...
fedgate.drivers.serial_line.BadLine: checksum: 2B != 1F
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import serial

from fedgate.drivers.config import LineDeviceConfig, LineFormat, LineTagConfig, TransportConfig
from fedgate.drivers.values import Backoff, DeviceStatus, Quality, TagValue, judge

__all__ = ["BadLine", "LineParser", "LineSplitter", "SerialLineReader", "nmea_checksum"]

log = logging.getLogger(__name__)

_KV = re.compile(r"([A-Za-z_][\w.\-]*)\s*[=:]\s*(\"[^\"]*\"|[^\s,;]+)")
_PRINTABLE = re.compile(r"^[\x20-\x7e\t]*$")
_TRUE = ("1", "true", "on", "yes")
_FALSE = ("0", "false", "off", "no")


class BadLine(ValueError):
    """A line that is dropped; ``kind`` names the counter (overlong, garbage, checksum, truncated)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


def nmea_checksum(body: str) -> str:
    """XOR of the characters between ``$`` and ``*``, as two upper-case hex digits.

    >>> nmea_checksum("GPGLL,5300.97914,N,00259.98174,E,125926,A")
    '28'
    """
    x = 0
    for ch in body.encode("ascii"):
        x ^= ch
    return f"{x:02X}"


class LineSplitter:
    """Split a byte stream into lines of at most ``max_len`` bytes.

    ``feed`` returns complete lines (without terminator) and the number of overlong
    lines it dropped; an overlong line is discarded up to its terminator.

    >>> s = LineSplitter(b"\\n", 8)
    >>> s.feed(b"ab\\ncdefghijklmn\\nxy")
    ([b'ab'], 1)
    >>> s.feed(b"z\\n")
    ([b'xyz'], 0)
    """

    def __init__(self, terminator: bytes, max_len: int) -> None:
        self.term = terminator
        self.max_len = max_len
        self._buf = bytearray()
        self._discarding = False

    def feed(self, data: bytes) -> tuple[list[bytes], int]:
        self._buf += data
        lines: list[bytes] = []
        overlong = 0
        while True:
            idx = self._buf.find(self.term)
            if idx < 0:
                if len(self._buf) > self.max_len:
                    if not self._discarding:
                        overlong += 1
                        self._discarding = True
                    # keep a tail that may hold the start of the terminator
                    del self._buf[: len(self._buf) - len(self.term) + 1]
                return lines, overlong
            line = bytes(self._buf[:idx])
            del self._buf[: idx + len(self.term)]
            if self._discarding:
                self._discarding = False
                continue
            if len(line) > self.max_len:
                overlong += 1
                continue
            lines.append(line)


class LineParser:
    """Turn one text line into the values of one device's tags."""

    def __init__(self, dev: LineDeviceConfig) -> None:
        self.dev = dev
        self._pattern = re.compile(dev.pattern) if dev.pattern else None
        self._max_column = max((t.column or 0 for t in dev.tags), default=0)

    def parse(self, line: str, ts: float) -> list[TagValue]:
        """Values found in ``line`` (maybe none: the line is for another device).

        Raises :class:`BadLine` for a line that is malformed.
        """
        fmt = self.dev.format
        if fmt is LineFormat.NMEA:
            fields = self._nmea_fields(line)
            out = []
            for tag in self.dev.tags:
                if not _sentence_matches(fields[0], tag.sentence or ""):
                    continue
                if (tag.field or 0) >= len(fields):
                    raise BadLine("truncated", f"{fields[0]} has {len(fields) - 1} fields, tag {tag.name} "
                                               f"wants field {tag.field}")
                out.append(self._value(tag, fields[tag.field or 0], ts))
            return out
        if fmt is LineFormat.KV:
            pairs = {k: v.strip('"') for k, v in _KV.findall(line)}
            if not pairs:
                raise BadLine("garbage", f"no key=value pair in {line[:40]!r}")
            last = line.rstrip().rsplit(None, 1)[-1]
            if "=" not in last and ":" not in last:
                raise BadLine("truncated", f"line ends in {last[:20]!r}")
            return [self._value(t, pairs[t.key or ""], ts) for t in self.dev.tags if t.key in pairs]
        if fmt is LineFormat.CSV:
            cols = line.split(self.dev.delimiter)
            if len(cols) <= self._max_column:
                raise BadLine("truncated", f"{len(cols)} columns, column {self._max_column} configured")
            return [self._value(t, cols[t.column or 0].strip(), ts) for t in self.dev.tags]
        assert self._pattern is not None
        m = self._pattern.search(line)
        if m is None:
            raise BadLine("garbage", f"pattern does not match {line[:40]!r}")
        out = []
        for t in self.dev.tags:
            text = m.group(t.group)  # type: ignore[arg-type]
            out.append(self._value(t, text if text is not None else "", ts))
        return out

    def _nmea_fields(self, line: str) -> list[str]:
        if not line or line[0] not in "$!":
            raise BadLine("garbage", f"not an NMEA sentence: {line[:20]!r}")
        star = line.rfind("*")
        if star < 0:
            if self.dev.checksum:
                raise BadLine("truncated", "no *hh checksum")
            body = line[1:]
        else:
            body, given = line[1:star], line[star + 1:].strip()
            if len(given) < 2:
                raise BadLine("truncated", f"checksum cut short: {given!r}")
            want = nmea_checksum(body)
            if given[:2].upper() != want:
                raise BadLine("checksum", f"{given[:2]} != {want}")
        fields = body.split(",")
        if len(fields[0]) < 3:
            raise BadLine("truncated", f"sentence id {fields[0]!r}")
        return fields

    def _value(self, tag: LineTagConfig, text: str, ts: float) -> TagValue:
        name = f"{self.dev.name}.{tag.name}"
        value: Any
        try:
            if tag.type == "string":
                value = text
            elif tag.type == "bool":
                low = text.strip().lower()
                if low not in _TRUE + _FALSE:
                    raise ValueError(text)
                value = low in _TRUE
            elif text == "":
                raise ValueError("empty field")
            elif tag.type == "int64":
                value = int(text)
                if tag.scale != 1.0 or tag.offset != 0.0:
                    value = value * tag.scale + tag.offset
            else:
                value = float(text) * tag.scale + tag.offset
        except ValueError:
            return TagValue(name, None, ts, Quality.ERROR, (text,), tag.unit)
        return TagValue(name, value, ts, judge(value, tag.min, tag.max), (text,), tag.unit)


def _sentence_matches(address: str, sentence: str) -> bool:
    """``RMC`` matches any talker (``GPRMC``, ``GNRMC``); a 5-letter id must match exactly."""
    if len(sentence) <= 3:
        return address[-3:] == sentence and len(address) >= 3
    return address == sentence


class SerialLineReader:
    """Reads one serial-line transport until cancelled.

    Parameters
    ----------
    cfg
        The transport (port path or pyserial URL, line settings, backoff).
    devices
        The devices on this port; they share the first device's terminator.
    on_values
        Called with the values of each accepted line.
    status
        Per-device status objects whose counters this reader updates.
    """

    def __init__(self, cfg: TransportConfig, devices: Sequence[LineDeviceConfig],
                 on_values: Callable[[list[TagValue]], None], status: dict[str, DeviceStatus],
                 *, seed: int | None = None) -> None:
        self.cfg = cfg
        self.devices = list(devices)
        self.parsers = [LineParser(d) for d in self.devices]
        self._on_values = on_values
        self._status = status
        self._backoff = Backoff(cfg.reconnect_delay_s, cfg.reconnect_delay_max_s, seed=seed)
        self.opens = 0
        self.stopping = False
        first = self.devices[0]
        self._term = first.terminator.encode("latin-1")
        self._max_len = min(d.max_line_length for d in self.devices)
        self._requesters = [d for d in self.devices if d.request]

    async def run(self) -> None:
        """Open, read, and reopen with backoff after a failure, until cancelled (or :attr:`stopping`)."""
        while not self.stopping:
            try:
                port = self._open()
            except (serial.SerialException, OSError, ValueError) as exc:
                self._down(f"cannot open {self.cfg.port}: {exc}")
                await asyncio.sleep(self._backoff.next())
                continue
            self.opens += 1
            for st in self._status.values():
                if self.opens > 1:
                    st.reconnects += 1
            log.info("serial port %s open (%s)", self.cfg.port, self.cfg.name)
            try:
                await self._pump(port)
            except (serial.SerialException, OSError) as exc:
                self._down(f"{self.cfg.port}: {exc}")
            except Exception as exc:  # a bug must not end the reader: count, back off, reopen
                log.exception("serial port %s: reader failed unexpectedly", self.cfg.port)
                self._down(f"internal error: {exc!r}")
            finally:
                with contextlib.suppress(serial.SerialException, OSError):
                    port.close()
            await asyncio.sleep(self._backoff.next())

    def _down(self, reason: str) -> None:
        for st in self._status.values():
            if st.state != "down" or st.last_error != reason:
                log.warning("serial device on %s down: %s", self.cfg.name, reason)
            st.state = "down"
            st.errors["connection"] += 1
            st.last_error = reason

    def _open(self) -> serial.Serial:
        c = self.cfg
        stopbits = c.stopbits if c.stopbits != int(c.stopbits) else int(c.stopbits)
        return serial.serial_for_url(str(c.port), baudrate=c.baudrate, bytesize=c.bytesize, parity=c.parity,
                                     stopbits=stopbits, timeout=0, write_timeout=c.timeout_s)

    async def _pump(self, port: serial.Serial) -> None:
        loop = asyncio.get_running_loop()
        splitter = LineSplitter(self._term, self._max_len)
        ready = asyncio.Event()
        fd: int | None
        try:
            fd = port.fileno()
            loop.add_reader(fd, ready.set)
        except (AttributeError, OSError, NotImplementedError, serial.SerialException):
            fd = None  # URL handlers without a descriptor (loop://): poll
        next_request = loop.time()
        try:
            while not self.stopping:
                wait_s: float = 0.05 if fd is None else self.cfg.timeout_s
                if self._requesters:
                    now = loop.time()
                    if now >= next_request:
                        for d in self._requesters:
                            port.write((d.request or "").encode("latin-1"))
                        next_request = now + min(d.poll_s for d in self._requesters)
                    wait_s = min(wait_s, max(0.0, next_request - loop.time()))
                if fd is not None:
                    with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                        await asyncio.wait_for(ready.wait(), wait_s)
                    if not ready.is_set():
                        continue
                    ready.clear()
                else:
                    await asyncio.sleep(wait_s)
                data = port.read(4096)
                if data:
                    self._feed(splitter, data)
        finally:
            if fd is not None:
                loop.remove_reader(fd)

    def _feed(self, splitter: LineSplitter, data: bytes) -> None:
        lines, overlong = splitter.feed(data)
        for st in self._status.values():
            st.bad_lines["overlong"] += overlong
        for raw in lines:
            self._line(raw)

    def _line(self, raw: bytes) -> None:
        ts = time.time()
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if not raw.strip():
            return
        try:
            line = raw.decode("ascii")
            if not _PRINTABLE.match(line):
                raise UnicodeDecodeError("ascii", raw, 0, len(raw), "control characters")
        except UnicodeDecodeError:
            for st in self._status.values():
                st.lines += 1
                st.bad_lines["garbage"] += 1
            return
        for dev, parser in zip(self.devices, self.parsers):
            st = self._status[dev.name]
            st.lines += 1
            try:
                values = parser.parse(line, ts)
            except BadLine as exc:
                st.bad_lines[exc.kind] += 1
                log.debug("%s: dropped line (%s)", dev.name, exc)
                continue
            if values:
                if st.state != "up":
                    log.info("serial device %s up", dev.name)
                st.state = "up"
                st.last_ok_ts = ts
                self._backoff.reset()
                self._on_values(values)
