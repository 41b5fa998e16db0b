"""Acquisition: one poll loop per device, values with quality, write-back.

Behaviour, per Modbus device (serial line devices: see :mod:`fedgate.drivers.serial_line`):

- each cycle runs the device's request plan (:mod:`fedgate.drivers.plan`) in order on
  the transport's :class:`~fedgate.drivers.modbus.ModbusLink`; every value carries the
  time its reply arrived, its quality and its raw registers;
- a failed request gives ``error`` values for the tags it carries and nothing else;
- when every request of a cycle timed out or the link is down, the device is
  ``down`` and is tried again after an exponential backoff with jitter
  (``reconnect_delay`` .. ``reconnect_delay_max`` of its transport), so a device that
  comes back is polled again within one backoff step; otherwise it is ``up`` and
  polled every ``poll``;
- :meth:`Acquisition.latest` reports a good value older than the device's stale
  bound as ``stale``.

>>> from fedgate.drivers.config import load_config
>>> doc = {"transports": [{"name": "plc", "kind": "modbus-tcp", "host": "127.0.0.1", "port": 5020}],
...        "devices": [{"name": "m1", "transport": "plc", "tags": [
...            {"name": "t", "register": "input", "address": 0, "type": "int16"}]}]}
>>> acq = Acquisition(load_config(doc, file="agent.toml"))
>>> print(acq.plan())
m1: 1 request(s) per cycle, 1 register(s)
  unit 1 input 0..0 (1 regs): t
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from fedgate.core.errors import (
    ConfigError,
    ConnectionLost,
    DeviceException,
    DeviceTimeout,
    DriverError,
)
from fedgate.drivers.config import (
    DriversConfig,
    LineDeviceConfig,
    ModbusDeviceConfig,
    RegisterTable,
    TransportKind,
)
from fedgate.drivers.decode import SUB_REGISTER_TYPES
from fedgate.drivers.modbus import BUSY, ConnectFailed, ModbusLink
from fedgate.drivers.plan import DevicePlan, Request, codec_of, format_plan, plan_device
from fedgate.drivers.serial_line import SerialLineReader
from fedgate.drivers.values import Backoff, DeviceStatus, Quality, TagValue, judge

__all__ = ["Acquisition", "error_kind"]

log = logging.getLogger(__name__)

OnValues = Callable[[list[TagValue]], None]


def error_kind(exc: DriverError) -> str:
    """Counter name of a driver error."""
    if isinstance(exc, DeviceTimeout):
        return "timeout"
    if isinstance(exc, DeviceException):
        return "busy" if exc.code == BUSY else "exception"
    if isinstance(exc, ConnectionLost):
        return "connection"
    return "protocol"


class Acquisition:
    """Runs every transport's devices: Modbus poll loops and serial line readers.

    Parameters
    ----------
    cfg
        The drivers' config (:func:`fedgate.drivers.load_config`).
    on_values
        Called from the event loop with each batch of new values (one device cycle,
        or one parsed line).
    """

    def __init__(self, cfg: DriversConfig, *, on_values: OnValues | None = None, seed: int | None = None) -> None:
        self.cfg = cfg
        self._on_values = on_values
        self._seed = seed
        self._latest: dict[str, TagValue] = {}
        self._status: dict[str, DeviceStatus] = {}
        self._plans: dict[str, DevicePlan] = {}
        self._links: dict[str, ModbusLink] = {}
        self._readers: dict[str, SerialLineReader] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        for dev in cfg.devices:
            self._status[dev.name] = DeviceStatus(transport=dev.transport)
            if isinstance(dev, ModbusDeviceConfig):
                self._plans[dev.name] = plan_device(dev)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Open transports lazily and start one task per device (or serial port)."""
        if self._tasks:
            return
        log.info("request plan:\n%s", self.plan())
        for t in self.cfg.transports:
            if t.kind is TransportKind.SERIAL_LINE:
                devs = [d for d in self.cfg.devices if isinstance(d, LineDeviceConfig) and d.transport == t.name]
                if devs:
                    reader = SerialLineReader(t, devs, self._line_values,
                                              {d.name: self._status[d.name] for d in devs}, seed=self._seed)
                    self._readers[t.name] = reader
                    self._tasks.append(asyncio.create_task(reader.run(), name=f"fedgate-serial-{t.name}"))
            else:
                self._links[t.name] = ModbusLink(t)
        for dev in self.cfg.devices:
            if isinstance(dev, ModbusDeviceConfig):
                self._tasks.append(asyncio.create_task(self._run_device(dev), name=f"fedgate-poll-{dev.name}"))

    async def stop(self) -> None:
        """Cancel every loop and close every transport."""
        tasks, self._tasks = self._tasks, []
        self._stopping = True
        for reader in self._readers.values():
            reader.stopping = True
        pending = set(tasks)
        while pending:
            # cancel again until done: on Python < 3.12 asyncio.wait_for inside pymodbus can
            # swallow a cancellation that races with a reply
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=1.0)
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                log.error("acquisition task %s failed: %r", task.get_name(), task.exception())
        self._stopping = False
        for link in self._links.values():
            link.close()
        self._links.clear()
        self._readers.clear()

    async def __aenter__(self) -> Acquisition:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ views
    def plan(self) -> str:
        """The request plan of every Modbus device, printable."""
        return format_plan(self._plans.values())

    def plans(self) -> dict[str, DevicePlan]:
        return dict(self._plans)

    def latest(self) -> dict[str, TagValue]:
        """Newest value of every tag read so far; old good values are returned as stale."""
        now = time.time()
        out: dict[str, TagValue] = {}
        bounds = {d.name: d.stale_bound_s for d in self.cfg.devices}
        for name, tv in self._latest.items():
            if tv.quality in (Quality.GOOD, Quality.BAD_RANGE) and now - tv.ts > bounds[name.split(".", 1)[0]]:
                tv = dataclasses.replace(tv, quality=Quality.STALE)
            out[name] = tv
        return out

    def status(self) -> dict[str, dict[str, Any]]:
        """Per device: state "up"/"down" and counters."""
        return {name: st.to_dict() for name, st in self._status.items()}

    # ------------------------------------------------------------------ modbus
    def _link(self, dev: ModbusDeviceConfig) -> ModbusLink:
        link = self._links.get(dev.transport)
        if link is None:
            link = self._links[dev.transport] = ModbusLink(self.cfg.transport(dev.transport))
        return link

    async def _run_device(self, dev: ModbusDeviceConfig) -> None:
        loop = asyncio.get_running_loop()
        tcfg = self.cfg.transport(dev.transport)
        backoff = Backoff(tcfg.reconnect_delay_s, tcfg.reconnect_delay_max_s, seed=self._seed)
        st = self._status[dev.name]
        next_t = loop.time()
        while not self._stopping:
            try:
                values, link_failed = await self.poll_device(dev)
            except Exception as exc:  # a bug must not end acquisition: count, back off, go on
                log.exception("device %s: poll failed unexpectedly", dev.name)
                st.errors["protocol"] += 1
                st.last_error = f"internal error: {exc!r}"
                values, link_failed = [], True
            self._publish(values)
            if link_failed:
                if st.state != "down":
                    log.warning("device %s down: %s", dev.name, st.last_error)
                st.state = "down"
                delay = backoff.next()
                st.next_attempt_s = delay
                await asyncio.sleep(delay)
                next_t = loop.time()
                continue
            if st.state != "up":
                log.info("device %s up", dev.name)
            st.state = "up"
            backoff.reset()
            next_t += dev.poll_s
            now = loop.time()
            if next_t < now:  # overran: skip the missed ticks, never burst
                next_t = now
            await asyncio.sleep(next_t - now)

    async def poll_device(self, dev: ModbusDeviceConfig) -> tuple[list[TagValue], bool]:
        """Run one cycle of ``dev``'s plan.

        Returns the values (failed requests give ERROR values for their tags only)
        and whether the link itself failed (every request timed out or lost the
        connection), which puts the device in backoff.
        """
        link = self._link(dev)
        st = self._status[dev.name]
        plan = self._plans[dev.name]
        values: list[TagValue] = []
        link_failures = 0
        connects_before = link.connects
        t0 = time.perf_counter()
        unreachable = False
        for req in plan.requests:
            if unreachable:  # the link could not be opened this cycle: do not knock again
                link_failures += 1
                ts = time.time()
                values += [TagValue(f"{dev.name}.{p.tag.name}", None, ts, Quality.ERROR, (), p.tag.unit)
                           for p in req.tags]
                continue
            try:
                regs = await link.read(req.table, dev.unit_id, req.start, req.count,
                                       busy_retries=dev.busy_retries, busy_wait_s=dev.busy_retries_wait_s)
            except DriverError as exc:
                kind = error_kind(exc)
                st.errors[kind] += 1
                st.last_error = str(exc)
                if kind in ("timeout", "connection"):
                    link_failures += 1
                if isinstance(exc, ConnectFailed):  # that one never reached the wire
                    unreachable = True
                else:
                    st.requests += 1
                ts = time.time()
                values += [TagValue(f"{dev.name}.{p.tag.name}", None, ts, Quality.ERROR, (), p.tag.unit)
                           for p in req.tags]
                continue
            st.requests += 1
            values += self._decode(dev, req, regs, time.time())
        st.cycles += 1
        st.last_cycle_ms = (time.perf_counter() - t0) * 1e3
        if link.connects > connects_before and connects_before > 0:
            st.reconnects += link.connects - connects_before
        failed = bool(plan.requests) and link_failures == len(plan.requests)
        if not failed and link_failures < len(plan.requests):
            st.last_ok_ts = time.time()
        return values, failed

    @staticmethod
    def _decode(dev: ModbusDeviceConfig, req: Request, regs: list[int] | list[bool], ts: float) -> list[TagValue]:
        out = []
        for p in req.tags:
            raw = tuple(regs[p.offset:p.offset + p.count])
            tag = p.tag
            try:
                value = p.codec.decode(raw)
            except (ValueError, OverflowError) as exc:  # pragma: no cover - decode is total
                log.debug("decode %s.%s failed: %s", dev.name, tag.name, exc)
                out.append(TagValue(f"{dev.name}.{tag.name}", None, ts, Quality.ERROR, raw, tag.unit))
                continue
            out.append(TagValue(f"{dev.name}.{tag.name}", value, ts, judge(value, tag.min, tag.max), raw, tag.unit))
        return out

    # ------------------------------------------------------------------ write-back
    async def write(self, tag: str, value: Any) -> None:
        """Write ``value`` to the ``"device.tag"`` tag (FC05, FC06 or FC16).

        The value is encoded with the tag's type, byte order, scale and offset.
        Raises ConfigError when the tag is unknown, not writable or the value does
        not fit, DriverError when the device refuses or does not answer.
        """
        dev_name, _, tag_name = tag.partition(".")
        try:
            dev = self.cfg.device(dev_name)
        except KeyError:
            raise ConfigError("no such device", key="write", value=tag) from None
        if not isinstance(dev, ModbusDeviceConfig):
            raise ConfigError("serial line sensors cannot be written", key="write", value=tag)
        t = next((x for x in dev.tags if x.name == tag_name), None)
        if t is None:
            raise ConfigError("no such tag", key="write", value=tag)
        if not t.writable:
            raise ConfigError("tag is not writable (set writable = true)", key="write", value=tag)
        codec = codec_of(dev, t)
        link = self._link(dev)
        st = self._status[dev.name]
        kw = {"busy_retries": dev.busy_retries, "busy_wait_s": dev.busy_retries_wait_s}
        try:
            if t.register is RegisterTable.COIL:
                regs = codec.encode(value)
                st.requests += 1
                await link.write_coil(dev.unit_id, t.wire_address, bool(regs[0]), **kw)
                return
            if t.type in SUB_REGISTER_TYPES:
                codec.encode(value)  # validate before touching the device
                async with link.lock:  # read-modify-write of the shared register
                    st.requests += 1
                    current = await link.read_locked(RegisterTable.HOLDING, dev.unit_id, t.wire_address, 1, **kw)
                    st.requests += 1
                    await link.write_registers_locked(dev.unit_id, t.wire_address,
                                                      codec.encode(value, int(current[0])), **kw)
                return
            regs = codec.encode(value)
            st.requests += 1
            await link.write_registers(dev.unit_id, t.wire_address, regs, **kw)
        except ValueError as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(str(exc), key=f"write {tag}", value=value) from exc
        except DriverError as exc:
            st.errors[error_kind(exc)] += 1
            st.last_error = str(exc)
            raise

    # ------------------------------------------------------------------ publishing
    def _publish(self, values: list[TagValue]) -> None:
        if not values:
            return
        for tv in values:
            self._latest[tv.name] = tv
        if self._on_values is not None:
            try:
                self._on_values(values)
            except Exception:  # a consumer bug must not stop acquisition
                log.exception("on_values callback failed")

    def _line_values(self, values: list[TagValue]) -> None:
        self._publish(values)
