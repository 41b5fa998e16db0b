"""The plant as a streaming serial sensor: line-protocol readings into a pty.

A vibration transmitter bolted to machine ``machine`` emits one line per reading:

- ``nmea``: ``$FGVIB,<vib_rms mm/s>,<temp degC>,<step>*HH`` with the NMEA XOR
  checksum of everything between ``$`` and ``*`` (fields 1, 2, 3);
- ``kv``: ``vib_rms=<mm/s> temp_c=<degC> step=<n>`` (logfmt);
- ``csv``: ``<vib_rms>,<temp_c>,<step>`` (columns 0, 1, 2).

It streams at a rate (:meth:`SensorEmitter.stream`) or, like a request/response
instrument, answers each poll command with one reading (:meth:`SensorEmitter.answer`).
With ``garbage_rate`` > 0 a seeded share of lines is replaced by the faults a
real line shows: binary noise, a truncated line, a bad checksum (nmea) or an
unparsable value, an overlong line, an empty line.

>>> from fedgate.drivers.sim.plant import Plant, PROFILES
>>> plant = Plant([PROFILES["standard"]], seed=3); plant.step()
>>> em = SensorEmitter(plant, SensorFormat.NMEA)
>>> line = em.format_reading()
>>> line.startswith("$FGVIB,") and nmea_checksum(line[1:line.index("*")]) == line[-2:]
True
"""
from __future__ import annotations

import asyncio
import enum
import logging
from functools import reduce

import numpy as np

from fedgate.drivers.sim.plant import Plant
from fedgate.drivers.sim.ptylink import PtyWriter

__all__ = ["SensorFormat", "SensorEmitter", "nmea_checksum"]

log = logging.getLogger(__name__)


class SensorFormat(str, enum.Enum):
    NMEA = "nmea"
    KV = "kv"
    CSV = "csv"


def nmea_checksum(body: str) -> str:
    """XOR of the characters between ``$`` and ``*``, two uppercase hex digits.

    >>> nmea_checksum("GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,")
    '47'
    """
    return f"{reduce(lambda acc, ch: acc ^ ord(ch), body, 0):02X}"


class SensorEmitter:
    """Formats (and optionally streams) the plant's readings as text lines.

    Parameters
    ----------
    plant : Plant
    fmt : SensorFormat
    machine : int
        Which machine the sensor sits on.
    garbage_rate : float
        Share of lines replaced by garbage, 0..1.
    seed : int
        Seed of the garbage generator (independent of the plant's streams).
    """

    def __init__(self, plant: Plant, fmt: SensorFormat | str = SensorFormat.NMEA, *, machine: int = 0,
                 garbage_rate: float = 0.0, seed: int = 0) -> None:
        if not 0.0 <= garbage_rate <= 1.0:
            raise ValueError(f"garbage_rate = {garbage_rate!r} must be within 0..1")
        if not 0 <= machine < plant.n_machines:
            raise ValueError(f"machine = {machine!r} not in 0..{plant.n_machines - 1}")
        self.plant = plant
        self.fmt = SensorFormat(fmt)
        self.machine = machine
        self.garbage_rate = float(garbage_rate)
        self._rng = np.random.default_rng([seed, 0x5E45])
        self.lines = 0
        self.garbage_lines = 0
        self.dropped_lines = 0
        self.requests = 0

    def format_reading(self) -> str:
        """The current reading as one line (no terminator)."""
        m = self.machine
        vib = float(self.plant.values["vibration_mm_s"][m])
        temp = float(self.plant.values["temperature_c"][m])
        step = self.plant.step_count
        if self.fmt is SensorFormat.NMEA:
            body = f"FGVIB,{vib:.3f},{temp:.2f},{step}"
            return f"${body}*{nmea_checksum(body)}"
        if self.fmt is SensorFormat.KV:
            return f"vib_rms={vib:.3f} temp_c={temp:.2f} step={step}"
        return f"{vib:.3f},{temp:.2f},{step}"

    def next_line(self) -> bytes:
        """The next line to send (a reading, or garbage at ``garbage_rate``), without terminator."""
        line = self.format_reading()
        self.lines += 1
        if self.garbage_rate <= 0.0 or self._rng.random() >= self.garbage_rate:
            return line.encode("ascii")
        self.garbage_lines += 1
        kind = int(self._rng.integers(5))
        if kind == 0:
            return self._rng.integers(0, 256, size=int(self._rng.integers(4, 40)), dtype=np.uint8).tobytes().replace(b"\n", b"\x00")
        if kind == 1:
            return line[: max(1, len(line) // 2)].encode("ascii")
        if kind == 2:
            if self.fmt is SensorFormat.NMEA:
                bad = "00" if not line.endswith("00") else "FF"
                return (line[:-2] + bad).encode("ascii")
            return line.replace(".", "#", 1).encode("ascii")
        if kind == 3:
            return (line + "," + "9" * 300).encode("ascii")
        return b""

    async def stream(self, writer: PtyWriter, rate_hz: float, terminator: bytes = b"\r\n") -> None:
        """Write ``rate_hz`` lines per real second into ``writer`` until cancelled."""
        if not rate_hz > 0:
            raise ValueError(f"rate_hz = {rate_hz!r} must be > 0")
        period = 1.0 / rate_hz
        loop = asyncio.get_running_loop()
        next_t = loop.time()
        while True:
            if not writer.write_line(self.next_line(), terminator):
                self.dropped_lines += 1
            writer.drain_echo()  # a streaming sensor ignores what the reader sends
            next_t += period
            delay = next_t - loop.time()
            if delay < -10 * period:  # fell far behind (suspended): do not burst
                next_t = loop.time()
                delay = 0.0
            await asyncio.sleep(max(delay, 0.0))

    async def answer(self, writer: PtyWriter, request: str, terminator: bytes = b"\r\n", poll_s: float = 0.005) -> None:
        """Request/response mode: answer each ``request`` line the reader sends with one reading.

        Lines are matched without surrounding whitespace; other commands get ``ERR``
        (the way many ASCII instruments refuse an unknown command). Runs until cancelled.
        """
        want = request.strip().encode("ascii")
        if not want:
            raise ValueError("request must not be empty")
        pending = b""
        while True:
            pending += writer.drain_echo()
            while b"\n" in pending or b"\r" in pending:
                cut = min(i for i in (pending.find(b"\n"), pending.find(b"\r")) if i >= 0)
                line, pending = pending[:cut].strip(), pending[cut + 1 :]
                if not line:
                    continue
                self.requests += 1
                reply = self.next_line() if line == want else b"ERR"
                if not writer.write_line(reply, terminator):
                    self.dropped_lines += 1
            if len(pending) > 4096:  # a reader sending garbage without terminators
                pending = b""
            await asyncio.sleep(poll_s)
