"""Real peers for the drivers' integration tests: a pymodbus server with fault switches.

``ModbusPeer`` serves one or more units over TCP on 127.0.0.1 (a free port) or RTU on
a serial path. It counts every request it answers (function code, address, count),
and can reply busy (exception 6), stay silent, be stopped and restarted on the same
port. Values are set through the server's own datastore.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from pymodbus import FramerType
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import NoSuchIdException
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

FC_WRITE = {"coil": 15, "discrete": 2, "holding": 16, "input": 4}
FC_READ = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}
READ_FCS = {1, 2, 3, 4}


def run(coro: Awaitable[Any], timeout_s: float = 60.0) -> Any:
    """Run a coroutine in a fresh event loop with a generous bound."""
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout_s)
    return asyncio.run(bounded())


async def wait_until(cond: Callable[[], bool], timeout_s: float = 20.0, what: str = "condition") -> None:
    """Poll ``cond`` until it holds; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


class ModbusPeer:
    """A pymodbus server (TCP or RTU) whose units share one fault-injecting action."""

    def __init__(self, units: Iterable[int] = (1,), *, size: int = 400, serial_port: str | None = None) -> None:
        self.units = tuple(units)
        self.size = size
        self.serial_port = serial_port
        self.port = 0
        self.requests: list[tuple[int, int, int, int]] = []  # (unit, fc, address, count) as received
        self.busy_left = 0
        self.busy_replies = 0
        self.mute_units: set[int] = set()
        self._internal = False
        self._server: ModbusTcpServer | ModbusSerialServer | None = None

    def _trace_pdu(self, sending: bool, pdu: Any) -> Any:
        if not sending:
            self.requests.append((pdu.dev_id, pdu.function_code, pdu.address, pdu.count))
        return pdu

    def _device(self, unit: int) -> SimDevice:
        async def action(fc: int, _start: int, address: int, count: int, _regs: list[int],
                         values: Any) -> ExcCodes | None:
            if self._internal:
                return None
            if unit in self.mute_units:
                raise NoSuchIdException(f"unit {unit} muted")  # the server then sends nothing
            if self.busy_left > 0:
                self.busy_left -= 1
                self.busy_replies += 1
                return ExcCodes.DEVICE_BUSY
            return None

        bits = [SimData(0, count=self.size, values=False, datatype=DataType.BITS)]
        regs = [SimData(0, count=self.size, values=0, datatype=DataType.REGISTERS)]
        return SimDevice(unit, simdata=(list(bits), [SimData(0, count=self.size, values=False,
                                                             datatype=DataType.BITS)],
                                        list(regs), [SimData(0, count=self.size, values=0,
                                                             datatype=DataType.REGISTERS)]),
                         action=action)

    async def start(self) -> ModbusPeer:
        devices = [self._device(u) for u in self.units]
        if self.serial_port is None:
            self._server = ModbusTcpServer(devices, address=("127.0.0.1", self.port), ignore_missing_devices=True,
                                          trace_pdu=self._trace_pdu)
        else:
            self._server = ModbusSerialServer(devices, port=self.serial_port, framer=FramerType.RTU,
                                              baudrate=115200, ignore_missing_devices=True,
                                              trace_pdu=self._trace_pdu)
        await self._server.serve_forever(background=True)
        if self.serial_port is None:
            self.port = self._server.transport.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await server.shutdown()
            await asyncio.sleep(0)

    async def set(self, table: str, address: int, values: list[int] | list[bool], unit: int | None = None) -> None:
        assert self._server is not None
        self._internal = True
        try:
            await self._server.context.async_setValues(unit or self.units[0], FC_WRITE[table], address,
                                                       list(values))
        finally:
            self._internal = False

    async def get(self, table: str, address: int, count: int, unit: int | None = None) -> list[Any]:
        assert self._server is not None
        self._internal = True
        try:
            return list(await self._server.context.async_getValues(unit or self.units[0], FC_READ[table],
                                                                   address, count))
        finally:
            self._internal = False

    def reads(self) -> list[tuple[int, int, int, int]]:
        return [r for r in self.requests if r[1] in READ_FCS]

    async def __aenter__(self) -> ModbusPeer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def tcp_doc(port: int, tags: list[dict[str, Any]], **device: Any) -> dict[str, Any]:
    """A one-device agent.toml document for a peer on 127.0.0.1:port."""
    transport = {"name": "plc", "kind": "modbus-tcp", "host": "127.0.0.1", "port": port, "timeout": "300ms",
                 "reconnect_delay": "50ms", "reconnect_delay_max": "200ms"}
    transport.update(device.pop("transport", {}))
    dev = {"name": "m1", "transport": "plc", "unit_id": 1, "poll": "50ms", "tags": tags}
    dev.update(device)
    return {"transports": [transport], "devices": [dev]}
