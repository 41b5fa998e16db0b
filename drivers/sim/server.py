"""The simulated plant served over Modbus TCP or RTU (pymodbus' async server).

:class:`PlantServer` owns a :class:`~fedgate.drivers.sim.plant.Plant` and a
pymodbus server; machine ``i`` answers as unit ``unit_id + i`` with the map of
:mod:`fedgate.drivers.sim.regmap`. A clock task advances the plant at ``speed``
plant seconds per real second and refreshes the datastore after every batch of
steps, inside the event loop, so one Modbus request always sees one consistent
step. Writing coil 0 maintains the machine at once; writes to the prediction
registers and the alarm coil are kept and logged.

:class:`ServerThread` runs a PlantServer in its own thread and event loop, for
synchronous callers (tests, benchmarks).

>>> from fedgate.drivers.sim.plant import Plant, PROFILES
>>> with ServerThread(PlantServer(Plant([PROFILES["standard"]], seed=1), speed=0)) as srv:
...     port = srv.tcp_port
...     srv.call(srv.server.advance(10))
...     srv.server.plant.step_count
11
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import logging
import threading
import time
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

from pymodbus import FramerType
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import NoSuchIdException
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from fedgate.core.errors import DriverError
from fedgate.drivers.sim import regmap
from fedgate.drivers.sim.plant import Plant

__all__ = ["PlantServer", "ServerThread", "Transport"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_FC_READ_COILS, _FC_WRITE_COIL, _FC_WRITE_COILS = 1, 5, 15
_FC_DISCRETE, _FC_HOLDING, _FC_INPUT = 2, 3, 4
_FC_HOLDING_WRITES = (6, 16, 22, 23)
_MAX_STEPS_PER_TICK = 100_000


class _Units:
    """The server's datastore with unknown unit ids reported as missing devices.

    pymodbus' simulator core answers an unknown id with "device failure"; a real
    RS485 line stays silent and a TCP gateway answers "gateway target failed to
    respond" (exception 0x0B), which is what this wrapper makes the server do.
    """

    def __init__(self, core: Any) -> None:
        self._core = core
        self._ids = set(core.device_ids())

    def _known(self, device_id: int) -> None:
        if device_id not in self._ids:
            raise NoSuchIdException(f"unit id {device_id} is not served")

    async def async_getValues(self, device_id: int, func_code: int, address: int, count: int = 1) -> Any:
        self._known(device_id)
        return await self._core.async_getValues(device_id, func_code, address, count)

    async def async_setValues(self, device_id: int, func_code: int, address: int, values: Any) -> Any:
        self._known(device_id)
        return await self._core.async_setValues(device_id, func_code, address, values)

    def device_ids(self) -> list[int]:
        return list(self._core.device_ids())


class Transport(str, enum.Enum):
    TCP = "tcp"
    RTU = "rtu"


class PlantServer:
    """A plant behind one Modbus server (TCP or RTU).

    Parameters
    ----------
    plant : Plant
        The plant; machine ``i`` is unit ``unit_id + i``.
    unit_id : int
        Unit id of machine 0 (1..247).
    speed : float
        Plant seconds per real second; 0 pauses the clock (step with :meth:`advance`).
    tick_s : float
        Real seconds between clock ticks.
    """

    def __init__(self, plant: Plant, *, unit_id: int = 1, speed: float = 1.0, tick_s: float = 0.05) -> None:
        if not 1 <= unit_id <= 247 - (plant.n_machines - 1):
            raise ValueError(f"unit_id = {unit_id!r} must be 1..{248 - plant.n_machines} for {plant.n_machines} machine(s)")
        if speed < 0:
            raise ValueError(f"speed = {speed!r} must be >= 0")
        if not tick_s > 0:
            raise ValueError(f"tick_s = {tick_s!r} must be > 0")
        self.plant = plant
        self.unit_id = unit_id
        self.speed = float(speed)
        self.tick_s = float(tick_s)
        self.transport: Transport | None = None
        self.tcp_port: int | None = None
        self.rtu_path: str | None = None
        self.maintenance_requests = 0
        self.writes = 0
        self.skipped_steps = 0
        self._server: ModbusTcpServer | ModbusSerialServer | None = None
        self._clock: asyncio.Task[None] | None = None
        self._internal = False
        self._maint_pending: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._devices = [self._make_device(unit_id + i) for i in range(plant.n_machines)]

    # ------------------------------------------------------------------ datastore
    def _make_device(self, uid: int) -> SimDevice:
        async def action(fc: int, start: int, address: int, count: int,
                         registers: list[int], values: list[int] | list[bool] | None) -> ExcCodes | None:
            return self._on_access(uid, fc, address, values)

        blocks = (
            [SimData(0, values=[False] * regmap.BIT_COUNT, datatype=DataType.BITS)],
            [SimData(0, values=[False] * regmap.BIT_COUNT, datatype=DataType.BITS)],
            [SimData(0, count=regmap.HOLDING_COUNT, values=0, datatype=DataType.REGISTERS)],
            [SimData(0, count=regmap.INPUT_COUNT, values=0, datatype=DataType.REGISTERS)],
        )
        return SimDevice(uid, simdata=blocks, action=action)

    def _on_access(self, uid: int, fc: int, address: int, values: list[int] | list[bool] | None) -> ExcCodes | None:
        if self._internal or not values:
            return None
        machine = uid - self.unit_id
        self.writes += 1
        if fc in (_FC_WRITE_COIL, _FC_WRITE_COILS):
            for i, v in enumerate(values):
                if address + i == regmap.COIL_MAINTENANCE and v:
                    self.plant.request_maintenance(machine)
                    self.maintenance_requests += 1
                    self._maint_pending.add(machine)
                    log.info("unit %s: maintenance requested, health reset", uid)
                    task = asyncio.get_running_loop().create_task(self._refresh())
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                elif address + i == regmap.COIL_ALARM:
                    log.info("unit %s: alarm coil %s", uid, "set" if v else "cleared")
        elif fc in _FC_HOLDING_WRITES:
            log.debug("unit %s: holding registers %s..%s written", uid, address, address + len(values) - 1)
        return None

    def machine_values(self, machine: int) -> dict[str, Any]:
        """Everything the input registers of ``machine`` encode, from the plant's state."""
        p = self.plant
        vals: dict[str, Any] = {k: float(a[machine]) for k, a in p.values.items()}
        vals["health"] = float(p.health[machine])
        vals["fault_count"] = int(p.fault_count[machine])
        vals["maintenance_count"] = int(p.maintenance_count[machine])
        vals["step"] = p.step_count
        vals["profile"] = p.profiles[machine].name
        return vals

    async def _refresh(self) -> None:
        """Write the plant's state into every unit's datastore."""
        if self._server is None:
            return
        ctx = self._server.context
        p = self.plant
        self._internal = True
        try:
            for m in range(p.n_machines):
                uid = self.unit_id + m
                vals = self.machine_values(m)
                coils = await ctx.async_getValues(uid, _FC_READ_COILS, 0, regmap.BIT_COUNT)
                if m in self._maint_pending:  # acknowledge the request: coil back to 0
                    coils = list(coils)
                    coils[regmap.COIL_MAINTENANCE] = False
                    await ctx.async_setValues(uid, _FC_WRITE_COILS, 0, coils)
                alarm = bool(coils[regmap.COIL_ALARM])
                degraded = vals["health"] < regmap.DEGRADED_HEALTH
                fault = bool(p.fault[m])
                vals["status"] = (
                    (regmap.STATUS_FAULT if fault else 0)
                    | (regmap.STATUS_DEGRADED if degraded else 0)
                    | (regmap.STATUS_ALARM if alarm else 0)
                )
                await ctx.async_setValues(uid, _FC_INPUT, 0, regmap.encode_inputs(vals))
                await ctx.async_setValues(uid, _FC_DISCRETE, 0, [fault, degraded] + [False] * (regmap.BIT_COUNT - 2))
            self._maint_pending.clear()
        finally:
            self._internal = False

    async def read_holding(self, machine: int, address: int, count: int) -> list[int]:
        """Read back holding registers (the predictions the agent wrote)."""
        assert self._server is not None
        return list(await self._server.context.async_getValues(self.unit_id + machine, _FC_HOLDING, address, count))

    async def read_coils(self, machine: int) -> list[bool]:
        assert self._server is not None
        return list(await self._server.context.async_getValues(self.unit_id + machine, _FC_READ_COILS, 0, regmap.BIT_COUNT))

    # ------------------------------------------------------------------ lifecycle
    async def serve_tcp(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host:port`` (0 picks a free port); returns the port."""
        self._check_not_serving()
        self._server = ModbusTcpServer(self._devices, framer=FramerType.SOCKET, address=(host, port))
        self._server.context = _Units(self._server.context)  # type: ignore[assignment]
        try:
            await self._server.serve_forever(background=True)
        except (RuntimeError, OSError) as exc:
            self._server = None
            raise DriverError(f"fedgate-sim: cannot listen on {host}:{port}: {exc}") from exc
        if self._server.transport is None:  # pragma: no cover - pymodbus reports failure via the transport
            self._server = None
            raise DriverError(f"fedgate-sim: cannot listen on {host}:{port}")
        sockets = self._server.transport.sockets  # type: ignore[union-attr]
        self.tcp_port = int(sockets[0].getsockname()[1])
        self.transport = Transport.TCP
        await self._begin()
        log.info("serving %d machine(s) on Modbus TCP %s:%s, unit id %s", self.plant.n_machines, host, self.tcp_port, self.unit_id)
        return self.tcp_port

    async def serve_rtu(self, path: str, *, baudrate: int = 19200, parity: str = "N", stopbits: int = 1) -> None:
        """Serve Modbus RTU on a serial port or pty path."""
        self._check_not_serving()
        self._server = ModbusSerialServer(
            self._devices, framer=FramerType.RTU, port=path, baudrate=baudrate, parity=parity,
            stopbits=stopbits, bytesize=8, timeout=1.0, ignore_missing_devices=True,
        )
        self._server.context = _Units(self._server.context)  # type: ignore[assignment]
        try:
            await self._server.serve_forever(background=True)
        except (RuntimeError, OSError) as exc:
            self._server = None
            raise DriverError(f"fedgate-sim: cannot open serial port {path}: {exc}") from exc
        self.rtu_path = path
        self.transport = Transport.RTU
        await self._begin()
        log.info("serving %d machine(s) on Modbus RTU %s (%s baud), unit id %s",
                 self.plant.n_machines, path, baudrate, self.unit_id)

    def _check_not_serving(self) -> None:
        if self._server is not None:
            raise RuntimeError("PlantServer already serving")

    async def _begin(self) -> None:
        if self.plant.step_count == 0:
            self.plant.step()  # never serve the all-zero state
        await self._refresh()
        if self.speed > 0:
            self._clock = asyncio.get_running_loop().create_task(self._run_clock(), name="fedgate-sim-clock")

    async def advance(self, n: int) -> None:
        """Step the plant ``n`` times now and refresh the datastore."""
        self.plant.step(n)
        await self._refresh()

    async def _run_clock(self) -> None:
        owed = 0.0
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.tick_s)
            now = time.monotonic()
            owed += (now - last) * self.speed / self.plant.dt_s
            last = now
            n = int(owed)
            owed -= n
            # after a stall (suspend, overloaded host) the plant skips time rather than
            # blocking the event loop to catch up
            cap = max(1, min(_MAX_STEPS_PER_TICK, int(10 * self.tick_s * self.speed / self.plant.dt_s) + 1))
            if n > cap:
                if not self.skipped_steps:
                    log.warning("plant clock cannot keep up at speed %s; skipping plant time", self.speed)
                self.skipped_steps += n - cap
                n = cap
            if n:
                faults_before = int(self.plant.fault_count.sum())
                self.plant.step(n)
                await self._refresh()
                if int(self.plant.fault_count.sum()) != faults_before:
                    log.info("step %s: fault(s) now active on %s", self.plant.step_count,
                             [self.unit_id + i for i in self.plant.fault.nonzero()[0]])

    async def close(self) -> None:
        """Stop the clock and the server."""
        if self._clock is not None:
            self._clock.cancel()
            try:
                await self._clock
            except asyncio.CancelledError:
                pass
            self._clock = None
        if self._server is not None:
            await self._server.shutdown()
            self._server = None
        self.transport = None


class ServerThread:
    """Run a :class:`PlantServer` in a thread with its own event loop.

    Parameters
    ----------
    server : PlantServer
    tcp : tuple of (host, port), optional
        Serve TCP here (default ``("127.0.0.1", 0)``) unless ``rtu`` is given.
    rtu : str, optional
        Serve RTU on this serial path instead.
    """

    def __init__(self, server: PlantServer, *, tcp: tuple[str, int] | None = None, rtu: str | None = None,
                 baudrate: int = 19200) -> None:
        self.server = server
        self._tcp = tcp if tcp is not None or rtu is not None else ("127.0.0.1", 0)
        self._rtu = rtu
        self._baudrate = baudrate
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = concurrent.futures.Future[None]()
        self._stop: asyncio.Event | None = None

    @property
    def tcp_port(self) -> int:
        if self.server.tcp_port is None:
            raise RuntimeError("not serving TCP")
        return self.server.tcp_port

    def start(self) -> ServerThread:
        self._thread = threading.Thread(target=self._main, name="fedgate-sim-server", daemon=True)
        self._thread.start()
        try:
            self._ready.result(timeout=30)
        except BaseException:
            self._thread.join(timeout=30)
            self._thread = None
            raise
        return self

    def _main(self) -> None:
        asyncio.run(self._amain())

    async def _amain(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            if self._rtu is not None:
                await self.server.serve_rtu(self._rtu, baudrate=self._baudrate)
            else:
                assert self._tcp is not None
                await self.server.serve_tcp(*self._tcp)
        except BaseException as exc:
            await self.server.close()
            self._ready.set_exception(exc)
            return
        self._ready.set_result(None)
        try:
            await self._stop.wait()
        finally:
            await self.server.close()

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
        """Run a coroutine (e.g. ``server.advance(5)``) in the server's loop and wait for it."""
        if self._loop is None:
            coro.close()
            raise RuntimeError("ServerThread not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start a coroutine (e.g. a sensor stream) in the server's loop; cancel the future to stop it."""
        if self._loop is None:
            coro.close()
            raise RuntimeError("ServerThread not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def close(self) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)
        self._thread = None

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
