"""Request planning: the fewest Modbus reads that carry every tag of a device.

Tags are grouped per (unit, register table), sorted by wire address and merged
greedily: the next tag joins the current request when the hole before it is at most
``max_gap`` registers and the request stays within ``max_registers_per_request``
(``max_bits_per_request`` for coils and discrete inputs). This is Telegraf's
``max_insert`` rule; a failed request only affects the tags it carries.

>>> from fedgate.drivers.config import load_config
>>> doc = {"transports": [{"name": "plc", "kind": "modbus-tcp", "host": "127.0.0.1"}],
...        "devices": [{"name": "m1", "transport": "plc", "max_gap": 4, "tags": [
...            {"name": "a", "register": "holding", "address": 0, "type": "int16"},
...            {"name": "b", "register": "holding", "address": 3, "type": "float32"},
...            {"name": "c", "register": "holding", "address": 40, "type": "uint16"}]}]}
>>> plan = plan_device(load_config(doc, file="agent.toml").devices[0])
>>> [(r.table.value, r.start, r.count, r.tag_names) for r in plan.requests]
[('holding', 0, 5, ('a', 'b')), ('holding', 40, 1, ('c',))]
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fedgate.drivers.config import ModbusDeviceConfig, ModbusTagConfig, RegisterTable
from fedgate.drivers.decode import ByteOrder, TagCodec, codec_for

__all__ = ["PlannedTag", "Request", "DevicePlan", "codec_of", "plan_device", "format_plan"]

# order in which tables are read in a cycle
_TABLE_ORDER = (RegisterTable.COIL, RegisterTable.DISCRETE, RegisterTable.HOLDING, RegisterTable.INPUT)


@dataclass(frozen=True)
class PlannedTag:
    """A tag inside a request: ``offset`` registers (or bits) after the request's start."""

    tag: ModbusTagConfig
    offset: int
    codec: TagCodec

    @property
    def count(self) -> int:
        return self.codec.count


@dataclass(frozen=True)
class Request:
    """One read: ``count`` registers (bits) from wire address ``start`` of ``table``."""

    unit_id: int
    table: RegisterTable
    start: int
    count: int
    tags: tuple[PlannedTag, ...]

    @property
    def tag_names(self) -> tuple[str, ...]:
        return tuple(p.tag.name for p in self.tags)

    def describe(self) -> str:
        unit = "bits" if self.table.is_bits else "regs"
        return (f"unit {self.unit_id} {self.table.value} {self.start}..{self.start + self.count - 1} "
                f"({self.count} {unit}): {', '.join(self.tag_names)}")


@dataclass(frozen=True)
class DevicePlan:
    """The requests of one device's polling cycle."""

    device: str
    requests: tuple[Request, ...]

    @property
    def registers(self) -> int:
        return sum(r.count for r in self.requests if not r.table.is_bits)

    def to_dict(self) -> dict[str, object]:
        return {
            "device": self.device,
            "requests_per_cycle": len(self.requests),
            "requests": [
                {"unit_id": r.unit_id, "table": r.table.value, "start": r.start, "count": r.count,
                 "tags": list(r.tag_names)}
                for r in self.requests
            ],
        }


def codec_of(dev: ModbusDeviceConfig, tag: ModbusTagConfig) -> TagCodec:
    """The codec of a tag, with the device's byte order unless the tag overrides it."""
    order: ByteOrder = tag.byte_order or dev.byte_order
    return codec_for(tag.type, order, bit=tag.bit, length=tag.length, scale=tag.scale, offset=tag.offset)


def plan_device(dev: ModbusDeviceConfig, *, merge: bool | None = None) -> DevicePlan:
    """Plan the reads of ``dev``.

    ``merge=False`` gives one request per tag (the baseline, and Telegraf's
    ``one_request_per_field`` workaround); by default the device's
    ``one_request_per_tag`` setting decides.
    """
    if merge is None:
        merge = not dev.one_request_per_tag
    requests: list[Request] = []
    for table in _TABLE_ORDER:
        tags = sorted((t for t in dev.tags if t.register is table), key=lambda t: (t.wire_address, t.name))
        if not tags:
            continue
        cap = dev.max_bits_per_request if table.is_bits else dev.max_registers_per_request
        requests += _merge(dev, table, tags, cap, dev.max_gap if merge else -1)
    return DevicePlan(dev.name, tuple(requests))


def _merge(dev: ModbusDeviceConfig, table: RegisterTable, tags: Sequence[ModbusTagConfig],
           cap: int, max_gap: int) -> list[Request]:
    out: list[Request] = []
    group: list[tuple[ModbusTagConfig, TagCodec]] = []
    start = end = 0
    for tag in tags:
        codec = codec_of(dev, tag)
        t_start, t_end = tag.wire_address, tag.wire_address + codec.count
        if group and max_gap >= 0 and t_start - end <= max_gap and max(end, t_end) - start <= cap:
            group.append((tag, codec))
            end = max(end, t_end)
            continue
        if group:
            out.append(_request(dev, table, start, end, group))
        group, start, end = [(tag, codec)], t_start, t_end
    if group:
        out.append(_request(dev, table, start, end, group))
    return out


def _request(dev: ModbusDeviceConfig, table: RegisterTable, start: int, end: int,
             group: Iterable[tuple[ModbusTagConfig, TagCodec]]) -> Request:
    planned = tuple(PlannedTag(tag, tag.wire_address - start, codec) for tag, codec in group)
    return Request(dev.unit_id, table, start, end - start, planned)


def format_plan(plans: Iterable[DevicePlan]) -> str:
    """A readable plan: one header per device, one line per request."""
    lines = []
    for p in plans:
        lines.append(f"{p.device}: {len(p.requests)} request(s) per cycle, {p.registers} register(s)")
        lines += [f"  {r.describe()}" for r in p.requests]
    return "\n".join(lines)
