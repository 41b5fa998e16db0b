"""The ``[[transports]]`` and ``[[devices]]`` sections of agent.toml.

``load_config(doc, file=...)`` reads only those two arrays of an already parsed
document and checks everything a commissioning engineer can get wrong: unknown keys,
wrong types, unknown transports, addresses out of range or overlapping, tags that do
not fit one request, types that do not match their register table, bad regexes.
Every error is a :class:`~fedgate.core.errors.ConfigError` naming the file, the
entry (``devices[1].tags[3] "spindle_temp"``) and the value.

>>> doc = {"transports": [{"name": "plc", "kind": "modbus-tcp", "host": "127.0.0.1", "port": 502}],
...        "devices": [{"name": "press", "transport": "plc", "poll": "500ms",
...                     "tags": [{"name": "temp", "register": "input", "address": 3, "type": "int16",
...                               "scale": 0.1, "unit": "degC"}]}]}
>>> cfg = load_config(doc, file="agent.toml")
>>> cfg.devices[0].poll_s, cfg.devices[0].tags[0].scale
(0.5, 0.1)
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from fedgate.core.config import build, option
from fedgate.core.errors import ConfigError
from fedgate.drivers.decode import BIT_TYPES, ByteOrder, DataType, register_count

__all__ = [
    "TransportKind",
    "RegisterTable",
    "LineFormat",
    "TransportConfig",
    "ModbusTagConfig",
    "ModbusDeviceConfig",
    "LineTagConfig",
    "LineDeviceConfig",
    "DriversConfig",
    "load_config",
]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


class TransportKind(str, Enum):
    """What a ``[[transports]]`` entry is."""

    MODBUS_TCP = "modbus-tcp"
    MODBUS_RTU = "modbus-rtu"
    SERIAL_LINE = "serial-line"


class RegisterTable(str, Enum):
    """The four Modbus tables."""

    COIL = "coil"
    DISCRETE = "discrete"
    HOLDING = "holding"
    INPUT = "input"

    @property
    def is_bits(self) -> bool:
        return self in (RegisterTable.COIL, RegisterTable.DISCRETE)


class LineFormat(str, Enum):
    """Line formats of serial sensors."""

    NMEA = "nmea"
    KV = "kv"
    CSV = "csv"
    REGEX = "regex"


_KINDS = tuple(k.value for k in TransportKind)
_TABLES = tuple(t.value for t in RegisterTable)
_TYPES = tuple(t.value for t in DataType)
_ORDERS = tuple(b.value for b in ByteOrder)
_FORMATS = tuple(f.value for f in LineFormat)
_LINE_TYPES = ("float64", "int64", "string", "bool")


@dataclass(frozen=True, kw_only=True)
class TransportConfig:
    """One physical link; every request on it is serialised."""

    name: str
    kind: TransportKind = option(choices=_KINDS)
    host: str | None = None
    port: int | str | None = None
    baudrate: int = option(9600, gt=0)
    bytesize: int = option(8, choices=(5, 6, 7, 8))
    parity: str = option("N", choices=("N", "E", "O", "M", "S"))
    stopbits: float = option(1.0, choices=(1.0, 1.5, 2.0))
    timeout_s: float = option(1.0, toml="timeout", unit="duration", gt=0)
    retries: int = option(0, ge=0, le=10)
    reconnect_delay_s: float = option(0.1, toml="reconnect_delay", unit="duration", gt=0)
    reconnect_delay_max_s: float = option(30.0, toml="reconnect_delay_max", unit="duration", gt=0)
    pause_between_requests_s: float = option(0.0, toml="pause_between_requests", unit="duration")


@dataclass(frozen=True, kw_only=True)
class ModbusTagConfig:
    """One ``[[devices.tags]]`` entry of a Modbus device; ``address`` is as written."""

    name: str
    register: RegisterTable = option(choices=_TABLES)
    address: int = option(ge=0, le=65536)
    type: DataType = option(choices=_TYPES)
    bit: int | None = option(None, ge=0, le=15)
    length: int | None = option(None, ge=1, le=125)
    byte_order: ByteOrder | None = option(None, choices=_ORDERS)
    scale: float = 1.0
    offset: float = 0.0
    unit: str = ""
    min: float | None = None
    max: float | None = None
    writable: bool = False
    #: wire (0-based) address, filled by load_config from address and address_base
    wire_address: int = dataclasses.field(default=-1, init=False)


@dataclass(frozen=True, kw_only=True)
class ModbusDeviceConfig:
    """A Modbus unit on a transport and the tags read from it."""

    name: str
    transport: str
    unit_id: int = option(1, ge=0, le=255)
    poll_s: float = option(1.0, toml="poll", unit="duration", gt=0)
    byte_order: ByteOrder = option(ByteOrder.ABCD, choices=_ORDERS)
    address_base: int = option(0, choices=(0, 1))
    max_gap: int = option(16, ge=0, le=124)
    max_registers_per_request: int = option(125, ge=1, le=125)
    max_bits_per_request: int = option(2000, ge=1, le=2000)
    one_request_per_tag: bool = False
    busy_retries: int = option(0, ge=0, le=100)
    busy_retries_wait_s: float = option(0.1, toml="busy_retries_wait", unit="duration")
    stale_after_s: float | None = option(None, toml="stale_after", unit="duration", gt=0)
    tags: tuple[ModbusTagConfig, ...] = ()

    @property
    def stale_bound_s(self) -> float:
        """Age after which a value turns stale (default: three poll periods, at least 1 s)."""
        return self.stale_after_s if self.stale_after_s is not None else max(3.0 * self.poll_s, 1.0)


@dataclass(frozen=True, kw_only=True)
class LineTagConfig:
    """One ``[[devices.tags]]`` entry of a serial line device."""

    name: str
    sentence: str | None = None
    field: int | None = option(None, ge=0)
    key: str | None = None
    column: int | None = option(None, ge=0)
    group: int | str | None = None
    type: str = option("float64", choices=_LINE_TYPES)
    scale: float = 1.0
    offset: float = 0.0
    unit: str = ""
    min: float | None = None
    max: float | None = None


@dataclass(frozen=True, kw_only=True)
class LineDeviceConfig:
    """A sensor that writes text lines on a ``serial-line`` transport."""

    name: str
    transport: str
    format: LineFormat = option(choices=_FORMATS)
    terminator: str = "\n"
    max_line_length: int = option(256, ge=8, le=65536)
    request: str | None = None
    poll_s: float = option(1.0, toml="poll", unit="duration", gt=0)
    stale_after_s: float = option(5.0, toml="stale_after", unit="duration", gt=0)
    delimiter: str = ","
    pattern: str | None = None
    checksum: bool = True
    tags: tuple[LineTagConfig, ...] = ()

    @property
    def stale_bound_s(self) -> float:
        return self.stale_after_s


@dataclass(frozen=True, kw_only=True)
class DriversConfig:
    """Everything the drivers read from agent.toml."""

    transports: tuple[TransportConfig, ...] = ()
    devices: tuple[ModbusDeviceConfig | LineDeviceConfig, ...] = ()
    file: str = "<config>"

    def transport(self, name: str) -> TransportConfig:
        for t in self.transports:
            if t.name == name:
                return t
        raise KeyError(name)

    def tag_names(self) -> list[str]:
        """Every tag as ``"device.tag"``, in config order (the keys of ``Acquisition.latest()``)."""
        return [f"{d.name}.{t.name}" for d in self.devices for t in d.tags]

    def device(self, name: str) -> ModbusDeviceConfig | LineDeviceConfig:
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(name)


# ---------------------------------------------------------------------------- loading
def load_config(doc: Mapping[str, Any], *, file: str) -> DriversConfig:
    """Build the drivers' config from a parsed agent.toml document.

    Only ``transports`` and ``devices`` are read; other top-level keys are ignored.
    """
    raw_transports = _array(doc, "transports", file)
    raw_devices = _array(doc, "devices", file)
    transports: list[TransportConfig] = []
    for i, raw in enumerate(raw_transports):
        key = f"transports[{i}]"
        t = build(TransportConfig, raw, file=file, key=key)
        _check_name(t.name, file, f"{key}.name")
        _check_transport(t, file, key)
        if any(o.name == t.name for o in transports):
            raise ConfigError("duplicate transport name", file=file, key=f"{key}.name", value=t.name)
        transports.append(t)
    by_name = {t.name: t for t in transports}
    devices: list[ModbusDeviceConfig | LineDeviceConfig] = []
    for i, raw in enumerate(raw_devices):
        key = f"devices[{i}]"
        if not isinstance(raw, Mapping):
            raise ConfigError("expected a table", file=file, key=key, value=raw)
        tname = raw.get("transport")
        if not isinstance(tname, str) or tname not in by_name:
            raise ConfigError(f"unknown transport (configured: {', '.join(by_name) or 'none'})",
                              file=file, key=f"{key}.transport", value=tname)
        body = {k: v for k, v in raw.items() if k != "tags"}
        raw_tags = raw.get("tags", [])
        if not isinstance(raw_tags, list) or not raw_tags:
            raise ConfigError("a device needs at least one [[devices.tags]] entry",
                              file=file, key=f"{key}.tags", value=raw_tags)
        dev: ModbusDeviceConfig | LineDeviceConfig
        if by_name[tname].kind is TransportKind.SERIAL_LINE:
            dev = _load_line_device(body, raw_tags, file, key)
        else:
            dev = _load_modbus_device(body, raw_tags, file, key)
        _check_name(dev.name, file, f"{key}.name")
        if any(o.name == dev.name for o in devices):
            raise ConfigError("duplicate device name", file=file, key=f"{key}.name", value=dev.name)
        devices.append(dev)
    _check_shared_units(devices, file)
    return DriversConfig(transports=tuple(transports), devices=tuple(devices), file=file)


def _array(doc: Mapping[str, Any], name: str, file: str) -> list[Any]:
    value = doc.get(name, [])
    if not isinstance(value, list):
        raise ConfigError(f"expected an array of tables ([[{name}]])", file=file, key=name, value=value)
    return value


def _check_name(name: str, file: str, key: str) -> None:
    if not _NAME.match(name):
        raise ConfigError("names use letters, digits, '_' and '-' and start with a letter or '_'",
                          file=file, key=key, value=name)


def _check_transport(t: TransportConfig, file: str, key: str) -> None:
    if t.kind is TransportKind.MODBUS_TCP:
        if not t.host:
            raise ConfigError("missing required key for modbus-tcp", file=file, key=f"{key}.host")
        port = 502 if t.port is None else t.port
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigError("a TCP port is an integer 1..65535", file=file, key=f"{key}.port", value=t.port)
    else:
        if t.host is not None:
            raise ConfigError(f"host is for modbus-tcp, not {t.kind.value}", file=file, key=f"{key}.host",
                              value=t.host)
        if not isinstance(t.port, str) or not t.port:
            raise ConfigError("a serial port is a path or a pyserial URL", file=file, key=f"{key}.port",
                              value=t.port)
    if t.reconnect_delay_max_s < t.reconnect_delay_s:
        raise ConfigError("must be >= reconnect_delay", file=file, key=f"{key}.reconnect_delay_max",
                          value=t.reconnect_delay_max_s)


def _tag_key(dev_key: str, j: int, raw: Any) -> str:
    name = raw.get("name") if isinstance(raw, Mapping) else None
    return f'{dev_key}.tags[{j}] "{name}"' if isinstance(name, str) else f"{dev_key}.tags[{j}]"


def _load_modbus_device(body: Mapping[str, Any], raw_tags: list[Any], file: str, key: str) -> ModbusDeviceConfig:
    dev = build(ModbusDeviceConfig, body, file=file, key=key)
    tags: list[ModbusTagConfig] = []
    spans: dict[RegisterTable, list[tuple[int, int, int, str, str]]] = {}
    for j, raw in enumerate(raw_tags):
        tkey = _tag_key(key, j, raw)
        tag = build(ModbusTagConfig, raw, file=file, key=tkey)
        _check_name(tag.name, file, f"{tkey}.name")
        if any(o.name == tag.name for o in tags):
            raise ConfigError("duplicate tag name in this device", file=file, key=f"{tkey}.name", value=tag.name)
        _check_finite(tag, file, tkey)
        wire = _check_modbus_tag(dev, tag, file, tkey)
        object.__setattr__(tag, "wire_address", wire)
        count = register_count(tag.type, tag.length)
        mask = _bit_mask(tag)
        for start, end, other_mask, other_key, other_name in spans.get(tag.register, []):
            if wire < end and start < wire + count and (mask & other_mask):
                raise ConfigError(f"overlaps {other_key}", file=file,
                                  key=f"{tkey}.address", value=tag.address)
        spans.setdefault(tag.register, []).append((wire, wire + count, mask, tkey, tag.name))
        tags.append(tag)
    return dataclasses.replace(dev, tags=tuple(tags))


def _check_finite(tag: ModbusTagConfig | LineTagConfig, file: str, tkey: str) -> None:
    for name in ("scale", "offset", "min", "max"):
        value = getattr(tag, name)
        if value is not None and not math.isfinite(value):
            raise ConfigError("must be a finite number", file=file, key=f"{tkey}.{name}", value=value)


def _bit_mask(tag: ModbusTagConfig) -> int:
    """Bits of the register a tag owns (sub-register types may share a register)."""
    if tag.type is DataType.BIT:
        return 1 << (tag.bit or 0)
    if tag.type in (DataType.INT8L, DataType.UINT8L):
        return 0x00FF
    if tag.type in (DataType.INT8H, DataType.UINT8H):
        return 0xFF00
    return 0xFFFF


def _check_modbus_tag(dev: ModbusDeviceConfig, tag: ModbusTagConfig, file: str, tkey: str) -> int:
    if tag.register.is_bits and tag.type not in BIT_TYPES:
        raise ConfigError(f"a {tag.register.value} holds single bits: use type = \"bool\"",
                          file=file, key=f"{tkey}.type", value=tag.type.value)
    if not tag.register.is_bits and tag.type in BIT_TYPES:
        raise ConfigError(f"{tag.register.value} registers are 16-bit words: use type = \"bit\" with bit = N "
                          "for one bit", file=file, key=f"{tkey}.type", value=tag.type.value)
    if (tag.bit is None) != (tag.type is not DataType.BIT):
        raise ConfigError("type = \"bit\" needs bit = 0..15, and only it takes bit", file=file,
                          key=f"{tkey}.bit", value=tag.bit)
    if (tag.length is None) != (tag.type is not DataType.STRING):
        raise ConfigError("type = \"string\" needs length (registers), and only it takes length",
                          file=file, key=f"{tkey}.length", value=tag.length)
    non_numeric = tag.type in (DataType.BOOL, DataType.BIT, DataType.STRING)
    if non_numeric and (tag.scale != 1.0 or tag.offset != 0.0 or tag.min is not None or tag.max is not None):
        raise ConfigError(f"scale, offset, min and max apply to numbers, not {tag.type.value}",
                          file=file, key=tkey, value=tag.type.value)
    if tag.scale == 0.0:
        raise ConfigError("scale must not be 0", file=file, key=f"{tkey}.scale", value=tag.scale)
    if tag.min is not None and tag.max is not None and tag.min > tag.max:
        raise ConfigError("min is greater than max", file=file, key=f"{tkey}.min", value=tag.min)
    if tag.writable and tag.register in (RegisterTable.DISCRETE, RegisterTable.INPUT):
        raise ConfigError(f"a {tag.register.value} is read-only on every Modbus device",
                          file=file, key=f"{tkey}.writable", value=True)
    wire = tag.address - dev.address_base
    if wire < 0:
        raise ConfigError(f"below the first address (address_base = {dev.address_base})",
                          file=file, key=f"{tkey}.address", value=tag.address)
    count = register_count(tag.type, tag.length)
    if wire + count > 65536:
        raise ConfigError(f"{tag.type.value} needs {count} registers and runs past address 65535",
                          file=file, key=f"{tkey}.address", value=tag.address)
    cap = dev.max_bits_per_request if tag.register.is_bits else dev.max_registers_per_request
    if count > cap:
        raise ConfigError(f"needs {count} registers; a request carries at most {cap} "
                          "(max_registers_per_request)", file=file, key=tkey, value=tag.length)
    return wire


def _load_line_device(body: Mapping[str, Any], raw_tags: list[Any], file: str, key: str) -> LineDeviceConfig:
    dev = build(LineDeviceConfig, body, file=file, key=key)
    if not dev.terminator:
        raise ConfigError("must not be empty", file=file, key=f"{key}.terminator", value=dev.terminator)
    for name in ("terminator", "request"):
        text = getattr(dev, name)
        if text is not None and not text.isascii():
            raise ConfigError("must be ASCII", file=file, key=f"{key}.{name}", value=text)
    if len(dev.delimiter) != 1:
        raise ConfigError("one character", file=file, key=f"{key}.delimiter", value=dev.delimiter)
    compiled = None
    if dev.format is LineFormat.REGEX:
        if not dev.pattern:
            raise ConfigError("format = \"regex\" needs pattern", file=file, key=f"{key}.pattern")
        try:
            compiled = re.compile(dev.pattern)
        except re.error as exc:
            raise ConfigError(f"not a valid regular expression ({exc})", file=file, key=f"{key}.pattern",
                              value=dev.pattern) from exc
    elif dev.pattern is not None:
        raise ConfigError("pattern is for format = \"regex\"", file=file, key=f"{key}.pattern", value=dev.pattern)
    needs = {
        LineFormat.NMEA: ("sentence", "field"),
        LineFormat.KV: ("key",),
        LineFormat.CSV: ("column",),
        LineFormat.REGEX: ("group",),
    }[dev.format]
    selectors = ("sentence", "field", "key", "column", "group")
    tags: list[LineTagConfig] = []
    for j, raw in enumerate(raw_tags):
        tkey = _tag_key(key, j, raw)
        tag = build(LineTagConfig, raw, file=file, key=tkey)
        _check_name(tag.name, file, f"{tkey}.name")
        if any(o.name == tag.name for o in tags):
            raise ConfigError("duplicate tag name in this device", file=file, key=f"{tkey}.name", value=tag.name)
        _check_finite(tag, file, tkey)
        for sel in selectors:
            present = getattr(tag, sel) is not None
            if sel in needs and not present:
                raise ConfigError(f"format = \"{dev.format.value}\" needs {sel}", file=file, key=f"{tkey}.{sel}")
            if sel not in needs and present:
                raise ConfigError(f"{sel} is not used by format = \"{dev.format.value}\"", file=file,
                                  key=f"{tkey}.{sel}", value=getattr(tag, sel))
        if compiled is not None:
            grp = tag.group
            ok = (isinstance(grp, int) and 0 <= grp <= compiled.groups) or (grp in compiled.groupindex)
            if not ok:
                raise ConfigError("no such group in pattern", file=file, key=f"{tkey}.group", value=grp)
        if tag.type in ("string", "bool") and (tag.scale != 1.0 or tag.offset != 0.0):
            raise ConfigError(f"scale and offset apply to numbers, not {tag.type}", file=file, key=tkey,
                              value=tag.type)
        if tag.scale == 0.0:
            raise ConfigError("scale must not be 0", file=file, key=f"{tkey}.scale", value=tag.scale)
        if tag.min is not None and tag.max is not None and tag.min > tag.max:
            raise ConfigError("min is greater than max", file=file, key=f"{tkey}.min", value=tag.min)
        tags.append(tag)
    return dataclasses.replace(dev, tags=tuple(tags))


def _check_shared_units(devices: list[ModbusDeviceConfig | LineDeviceConfig], file: str) -> None:
    seen: dict[tuple[str, int], str] = {}
    terminators: dict[str, tuple[str, str]] = {}
    for i, dev in enumerate(devices):
        if isinstance(dev, LineDeviceConfig):
            first = terminators.setdefault(dev.transport, (dev.terminator, dev.name))
            if first[0] != dev.terminator:
                raise ConfigError(f"devices on one serial line share its terminator ({first[0]!r} of device "
                                  f"{first[1]!r})", file=file, key=f"devices[{i}].terminator", value=dev.terminator)
        if isinstance(dev, ModbusDeviceConfig):
            k = (dev.transport, dev.unit_id)
            if k in seen:
                raise ConfigError(f"unit_id already used by device {seen[k]!r} on transport {dev.transport!r}",
                                  file=file, key=f"devices[{i}].unit_id", value=dev.unit_id)
            seen[k] = dev.name
