"""Thin adapter over pymodbus' async clients (pinned ``~=3.16.1``).

One :class:`ModbusLink` per ``[[transports]]`` entry. Every request on a link holds
the link's ``asyncio.Lock`` (one RS485 bus, one TCP connection: pymodbus is not safe
for parallel calls), honours ``pause_between_requests``, retries busy replies
(exception 6) and translates every pymodbus/pyserial failure into a
:class:`~fedgate.core.errors.DriverError`:

- no answer in time -> :class:`~fedgate.core.errors.DeviceTimeout`
- a Modbus exception reply -> :class:`~fedgate.core.errors.DeviceException` (``code``)
- connect refused, port gone, connection dropped -> :class:`~fedgate.core.errors.ConnectionLost`

pymodbus' own reconnect loop is disabled (``reconnect_delay=0``); the acquisition
loop owns backoff. A timeout never closes a serial port, so one dead unit does not
take the bus down for the others; a TCP connection is reopened only after
:data:`TCP_TIMEOUTS_BEFORE_RECONNECT` timeouts in a row with no reply from any unit
(a half-open connection), so a silent unit behind a gateway does not either.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

from fedgate.core.errors import ConnectionLost, DeviceException, DeviceTimeout, DriverError
from fedgate.drivers.config import RegisterTable, TransportConfig, TransportKind

__all__ = ["ModbusLink", "ConnectFailed", "BUSY", "TCP_TIMEOUTS_BEFORE_RECONNECT"]

log = logging.getLogger(__name__)

#: Modbus exception code "server device busy"
BUSY = 6
#: consecutive timeouts on a TCP link, with no reply from any unit in between, after
#: which the connection is presumed half-open and reopened (serial ports stay open)
TCP_TIMEOUTS_BEFORE_RECONNECT = 4

try:  # pyserial is optional for pymodbus; translate its errors when it is there
    from serial import SerialException as _SerialException
except ImportError:  # pragma: no cover - pyserial is a dependency of fedgate
    _SerialException = OSError  # type: ignore[assignment,misc]


class ConnectFailed(ConnectionLost):
    """The link could not be opened; no request was sent."""


class ModbusLink:
    """One Modbus transport (TCP connection or serial port) and its lock.

    Parameters
    ----------
    cfg
        The transport's config.
    on_request
        Called with the transport name after each request put on the wire (counters).
    """

    def __init__(self, cfg: TransportConfig, *, on_request: Callable[[str], None] | None = None) -> None:
        if cfg.kind is TransportKind.SERIAL_LINE:
            raise ValueError(f"transport {cfg.name!r} is a serial-line transport, not Modbus")
        self.cfg = cfg
        self.lock = asyncio.Lock()
        self.connects = 0
        self._client: AsyncModbusTcpClient | AsyncModbusSerialClient | None = None
        self._last_request = 0.0
        self._on_request = on_request
        self._timeouts = 0

    # ------------------------------------------------------------------ connection
    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    def _make_client(self) -> AsyncModbusTcpClient | AsyncModbusSerialClient:
        c = self.cfg
        common: dict[str, Any] = {
            "timeout": c.timeout_s,
            "retries": c.retries,
            "reconnect_delay": 0,  # our loop owns reconnects and backoff
            "reconnect_delay_max": 0,
        }
        if c.kind is TransportKind.MODBUS_TCP:
            port = c.port if isinstance(c.port, int) else 502
            client: AsyncModbusTcpClient | AsyncModbusSerialClient = AsyncModbusTcpClient(
                c.host or "", port=port, framer=FramerType.SOCKET, **common)
        else:
            client = AsyncModbusSerialClient(
                str(c.port), framer=FramerType.RTU, baudrate=c.baudrate, bytesize=c.bytesize,
                parity=c.parity, stopbits=c.stopbits if c.stopbits != int(c.stopbits) else int(c.stopbits),
                **common)
        # never let pymodbus drop the link on its own after a few silent units
        client.set_max_no_responses(1 << 30)
        return client

    async def connect(self) -> None:
        """Open the link (no-op when it is open); raises ConnectionLost."""
        if self.connected:
            return
        self.close()
        client = self._make_client()
        try:
            ok = await client.connect()
        except (ModbusException, OSError, _SerialException) as exc:
            client.close()
            raise ConnectFailed(f"{self.cfg.name}: cannot connect to {self._where()}: {exc}") from exc
        if not ok:
            client.close()
            raise ConnectFailed(f"{self.cfg.name}: cannot connect to {self._where()}")
        self._client = client
        self.connects += 1
        log.info("transport %s connected to %s", self.cfg.name, self._where())

    def close(self) -> None:
        """Close the link; the next request reconnects."""
        if self._client is not None:
            client, self._client = self._client, None
            try:
                client.close()
            except (ModbusException, OSError, _SerialException) as exc:  # pragma: no cover - best effort
                log.debug("transport %s: close failed: %s", self.cfg.name, exc)

    def _where(self) -> str:
        c = self.cfg
        return f"{c.host}:{c.port if c.port is not None else 502}" if c.kind is TransportKind.MODBUS_TCP else str(c.port)

    # ------------------------------------------------------------------ requests
    async def read(self, table: RegisterTable, unit_id: int, start: int, count: int, *,
                   busy_retries: int = 0, busy_wait_s: float = 0.1) -> list[int] | list[bool]:
        """Read ``count`` registers (ints) or bits (bools) from ``table``."""
        async with self.lock:
            return await self._call(self._reader(table), start, count, unit_id,
                                    busy_retries, busy_wait_s, bits=table.is_bits)

    async def write_registers(self, unit_id: int, start: int, values: Sequence[int], *,
                              busy_retries: int = 0, busy_wait_s: float = 0.1) -> None:
        """FC06 for one register, FC16 for several."""
        async with self.lock:
            await self.write_registers_locked(unit_id, start, values, busy_retries=busy_retries,
                                              busy_wait_s=busy_wait_s)

    async def write_registers_locked(self, unit_id: int, start: int, values: Sequence[int], *,
                                     busy_retries: int = 0, busy_wait_s: float = 0.1) -> None:
        """As :meth:`write_registers`, for a caller that already holds :attr:`lock`."""
        if len(values) == 1:
            await self._call("write_register", start, int(values[0]), unit_id, busy_retries, busy_wait_s)
        else:
            await self._call("write_registers", start, [int(v) for v in values], unit_id, busy_retries,
                             busy_wait_s)

    async def read_locked(self, table: RegisterTable, unit_id: int, start: int, count: int, *,
                          busy_retries: int = 0, busy_wait_s: float = 0.1) -> list[int] | list[bool]:
        """As :meth:`read`, for a caller that already holds :attr:`lock`."""
        return await self._call(self._reader(table), start, count, unit_id, busy_retries, busy_wait_s,
                                bits=table.is_bits)

    async def write_coil(self, unit_id: int, address: int, value: bool, *,
                         busy_retries: int = 0, busy_wait_s: float = 0.1) -> None:
        """FC05."""
        async with self.lock:
            await self._call("write_coil", address, bool(value), unit_id, busy_retries, busy_wait_s)

    @staticmethod
    def _reader(table: RegisterTable) -> str:
        return {
            RegisterTable.COIL: "read_coils",
            RegisterTable.DISCRETE: "read_discrete_inputs",
            RegisterTable.HOLDING: "read_holding_registers",
            RegisterTable.INPUT: "read_input_registers",
        }[table]

    async def _call(self, method: str, address: int, arg: Any, unit_id: int, busy_retries: int,
                    busy_wait_s: float, *, bits: bool = False) -> Any:
        await self.connect()
        tries = 0
        while True:
            await self._pause()
            client = self._client
            if client is None:  # closed while we waited
                raise ConnectionLost(f"{self.cfg.name}: link closed")
            fn = getattr(client, method)
            try:
                if method.startswith("read"):
                    rr = await fn(address, count=arg, device_id=unit_id)
                else:
                    rr = await fn(address, arg, device_id=unit_id)
            except ModbusIOException as exc:
                self._count()
                if not client.connected:
                    self.close()
                    raise ConnectionLost(f"{self.cfg.name}: connection lost ({exc})") from exc
                self._timed_out()
                raise DeviceTimeout(f"{self.cfg.name} unit {unit_id}: no answer to {method} {address}") from exc
            except ConnectionException as exc:
                self.close()
                raise ConnectionLost(f"{self.cfg.name}: connection lost ({exc})") from exc
            except (asyncio.TimeoutError, TimeoutError) as exc:
                self._count()
                self._timed_out()
                raise DeviceTimeout(f"{self.cfg.name} unit {unit_id}: no answer to {method} {address}") from exc
            except (ModbusException, OSError, _SerialException) as exc:
                self.close()
                raise ConnectionLost(f"{self.cfg.name}: {exc}") from exc
            finally:
                self._last_request = time.monotonic()
            self._count()
            self._timeouts = 0
            if rr is None:
                raise DriverError(f"{self.cfg.name} unit {unit_id}: empty reply to {method} {address}")
            if rr.isError():
                code = int(getattr(rr, "exception_code", 0) or 0)
                if code == BUSY and tries < busy_retries:
                    tries += 1
                    await asyncio.sleep(busy_wait_s)
                    continue
                raise DeviceException(f"{self.cfg.name} unit {unit_id}: exception {code} to {method} {address}",
                                      code)
            if not method.startswith("read"):
                return None
            if bits:
                values = list(rr.bits)
                if len(values) < arg:
                    raise DriverError(f"{self.cfg.name} unit {unit_id}: {len(values)} bits for {arg} asked")
                return values[:arg]
            regs = list(rr.registers)
            if len(regs) != arg:
                raise DriverError(f"{self.cfg.name} unit {unit_id}: {len(regs)} registers for {arg} asked")
            return regs

    def _timed_out(self) -> None:
        self._timeouts += 1
        if self.cfg.kind is TransportKind.MODBUS_TCP and self._timeouts >= TCP_TIMEOUTS_BEFORE_RECONNECT:
            log.warning("transport %s: %d timeouts in a row, reopening the connection", self.cfg.name,
                        self._timeouts)
            self._timeouts = 0
            self.close()

    def _count(self) -> None:
        if self._on_request is not None:
            self._on_request(self.cfg.name)

    async def _pause(self) -> None:
        pause = self.cfg.pause_between_requests_s
        if pause > 0:
            wait = self._last_request + pause - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
