"""The simulated plant's Modbus register map, as data.

Every machine of a plant is one Modbus unit (``unit_id + machine index``) with the
same map. :data:`INPUT_FIELDS` lists the input registers the plant fills every
step; :data:`HOLDING_FIELDS`, :data:`COILS` and :data:`DISCRETE_INPUTS` the rest.
The tables here drive both the encoder (:func:`encode_inputs`) and the register
map in ``docs/simulated-plant.md`` (:func:`markdown_table`), so the two cannot
drift apart.

Addresses are 0-based wire addresses (what goes into the PDU). Byte orders use
the drivers' letters: ``ABCD`` is big-endian with the high word first, ``CDAB``
swaps the words, ``BADC`` swaps the bytes inside each word, ``DCBA`` is fully
little-endian.
"""
from __future__ import annotations

import dataclasses
import struct
from collections.abc import Mapping

import numpy as np

__all__ = [
    "Field",
    "INPUT_FIELDS",
    "HOLDING_FIELDS",
    "COILS",
    "DISCRETE_INPUTS",
    "INPUT_COUNT",
    "HOLDING_COUNT",
    "BIT_COUNT",
    "STATUS_FAULT",
    "STATUS_DEGRADED",
    "STATUS_ALARM",
    "COIL_MAINTENANCE",
    "COIL_ALARM",
    "DEGRADED_HEALTH",
    "encode",
    "decode",
    "encode_inputs",
    "markdown_table",
]

_STRUCT = {
    "int16": "h", "uint16": "H", "int32": "i", "uint32": "I",
    "int64": "q", "uint64": "Q", "float32": "f", "float64": "d",
}

#: health below which discrete input 1 / status bit 1 ("degraded", ground truth) is set
DEGRADED_HEALTH = 0.5

STATUS_FAULT = 1 << 0
STATUS_DEGRADED = 1 << 1
STATUS_ALARM = 1 << 2

COIL_MAINTENANCE = 0
COIL_ALARM = 1


@dataclasses.dataclass(frozen=True)
class Field:
    """One value in a register table.

    ``source`` names the plant quantity (a :data:`~fedgate.drivers.sim.plant.SIGNALS`
    name, ``energy_wh``, ``health``, ``status``, ``fault_count``,
    ``maintenance_count``, ``step``, ``profile``) or ``""`` for a write area.
    Raw register value = physical value / ``scale`` (rounded for integers).
    """

    address: int
    name: str
    type: str
    order: str = "ABCD"
    scale: float = 1.0
    unit: str = ""
    source: str = ""
    meaning: str = ""
    length: int = 0  # registers, for strings

    @property
    def count(self) -> int:
        if self.type == "string":
            return self.length
        return {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2,
                "int64": 4, "uint64": 4, "float64": 4}[self.type]


def encode(value: float | int | str, type_: str, order: str = "ABCD", scale: float = 1.0, length: int = 0) -> list[int]:
    """Encode one value into registers (16-bit ints) with a byte order.

    >>> encode(1.0, "float32", "ABCD"), encode(1.0, "float32", "CDAB")
    ([16256, 0], [0, 16256])
    >>> encode(-12.34, "int16", scale=0.1)
    [65413]
    """
    if type_ == "string":
        raw = str(value).encode("ascii", "replace")[: 2 * length].ljust(2 * length, b"\x00")
    else:
        code = _STRUCT[type_]
        if code in "fd":
            v: float | int = float(value) / scale
        else:
            v = int(round(float(value) / scale))
            bits = 8 * struct.calcsize(code)
            lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if code.islower() else (0, (1 << bits) - 1)
            v = min(max(v, lo), hi)  # saturate like a PLC, never wrap
        raw = struct.pack(">" + code, v)
    words = [raw[i : i + 2] for i in range(0, len(raw), 2)]
    if order in ("CDAB", "DCBA"):
        words.reverse()
    if order in ("BADC", "DCBA"):
        words = [w[::-1] for w in words]
    return [int.from_bytes(w, "big") for w in words]


def decode(registers: list[int], type_: str, order: str = "ABCD", scale: float = 1.0) -> float | int | str:
    """Inverse of :func:`encode` (for tests and tools)."""
    words = [int(r).to_bytes(2, "big") for r in registers]
    if order in ("BADC", "DCBA"):
        words = [w[::-1] for w in words]
    if order in ("CDAB", "DCBA"):
        words.reverse()
    raw = b"".join(words)
    if type_ == "string":
        return raw.rstrip(b"\x00").decode("ascii", "replace")
    (v,) = struct.unpack(">" + _STRUCT[type_], raw)
    return v * scale if scale != 1.0 else v


def _floats(base: int, order: str) -> list[Field]:
    names = [
        ("temperature_c", "degC", "motor winding temperature"),
        ("vibration_mm_s", "mm/s", "bearing vibration velocity, RMS"),
        ("current_a", "A", "motor current, RMS per phase"),
        ("power_kw", "kW", "active power"),
        ("speed_rpm", "rpm", "shaft speed"),
        ("pressure_bar", "bar", "discharge (pump) or lube-oil (motor) pressure"),
        ("load_pct", "%", "load as % of rating (operating context)"),
        ("health", "1", "GROUND TRUTH hidden health 0..1 (not a sensor; do not use as a feature)"),
    ]
    suffix = "" if order == "ABCD" else "_" + order.lower()
    return [
        Field(base + 2 * i, name + suffix, "float32", order, 1.0, unit, name, meaning)
        for i, (name, unit, meaning) in enumerate(names)
    ]


INPUT_FIELDS: tuple[Field, ...] = tuple(
    _floats(0, "ABCD")
    + _floats(20, "CDAB")
    + [
        Field(40, "temperature_x10", "int16", scale=0.1, unit="degC", source="temperature_c", meaning="scaled"),
        Field(41, "vibration_x100", "uint16", scale=0.01, unit="mm/s", source="vibration_mm_s", meaning="scaled"),
        Field(42, "current_x10", "uint16", scale=0.1, unit="A", source="current_a", meaning="scaled"),
        Field(43, "power_x100", "uint16", scale=0.01, unit="kW", source="power_kw", meaning="scaled"),
        Field(44, "speed", "uint16", scale=1.0, unit="rpm", source="speed_rpm", meaning="scaled (whole rpm)"),
        Field(45, "pressure_x100", "uint16", scale=0.01, unit="bar", source="pressure_bar", meaning="scaled"),
        Field(46, "load_x10", "uint16", scale=0.1, unit="%", source="load_pct", meaning="scaled"),
        Field(47, "health_x10000", "uint16", scale=0.0001, unit="1", source="health", meaning="GROUND TRUTH, scaled"),
        Field(48, "status", "uint16", source="status",
              meaning="bit 0 fault active, bit 1 degraded (health < 0.5, ground truth), bit 2 alarm coil set"),
        Field(50, "energy_wh_u32", "uint32", unit="Wh", source="energy_wh", meaning="energy counter, monotonic"),
        Field(52, "energy_wh_u64", "uint64", unit="Wh", source="energy_wh", meaning="energy counter, monotonic"),
        Field(56, "fault_count", "uint32", source="fault_count", meaning="faults since start"),
        Field(58, "maintenance_count", "uint32", source="maintenance_count",
              meaning="maintenances since start (crew repairs and coil requests)"),
        Field(60, "step", "uint64", unit="step", source="step", meaning="plant step counter (one step = dt plant seconds)"),
        Field(64, "temperature_f64", "float64", unit="degC", source="temperature_c", meaning="as float64"),
        Field(68, "vibration_badc", "float32", "BADC", unit="mm/s", source="vibration_mm_s", meaning="byte-swapped words"),
        Field(70, "vibration_dcba", "float32", "DCBA", unit="mm/s", source="vibration_mm_s", meaning="little-endian"),
        Field(72, "energy_wh_u32_cdab", "uint32", "CDAB", unit="Wh", source="energy_wh", meaning="energy, low word first"),
        Field(74, "temperature_i32_x100", "int32", scale=0.01, unit="degC", source="temperature_c", meaning="scaled int32"),
        Field(76, "profile", "string", source="profile", meaning="operating profile name, ASCII, NUL padded", length=8),
    ]
)
INPUT_COUNT = 84  # registers 0..83 exist; gaps inside read as 0

HOLDING_FIELDS: tuple[Field, ...] = (
    Field(0, "prediction", "float32", "ABCD", meaning="prediction written back by the agent (e.g. fault probability)"),
    Field(2, "prediction_cdab", "float32", "CDAB", meaning="the same, for agents configured with CDAB"),
    Field(4, "prediction_x10000", "uint16", scale=0.0001, meaning="the same, scaled uint16"),
    Field(6, "prediction_f64", "float64", meaning="the same, float64"),
)
HOLDING_COUNT = 32  # registers 0..31 are writable; 10..31 are free scratch for commissioning tests

COILS: tuple[tuple[int, str, str], ...] = (
    (COIL_MAINTENANCE, "maintenance", "write 1: maintain now (health reset, fault cleared); reads 1 until the next plant step"),
    (COIL_ALARM, "alarm", "alarm raised by the agent; mirrored into status bit 2"),
)
DISCRETE_INPUTS: tuple[tuple[int, str, str], ...] = (
    (0, "fault", "fault active"),
    (1, "degraded", "GROUND TRUTH: health < 0.5"),
)
BIT_COUNT = 16


def encode_inputs(values: Mapping[str, float | int | str]) -> list[int]:
    """All input registers of one machine, shape ``(INPUT_COUNT,)`` as a list of ints.

    ``values`` maps every :attr:`Field.source` in :data:`INPUT_FIELDS` to its value.
    """
    regs = np.zeros(INPUT_COUNT, dtype=np.int64)
    for f in INPUT_FIELDS:
        regs[f.address : f.address + f.count] = encode(values[f.source], f.type, f.order, f.scale, f.length)
    return regs.tolist()


def markdown_table(fields: tuple[Field, ...], table: str) -> str:
    """The register map as a Markdown table (used to write and to check the docs)."""
    head = "| address | table | type | byte order | unit | scale | name | meaning |\n|---|---|---|---|---|---|---|---|\n"
    rows = []
    for f in fields:
        span = f"{f.address}" if f.count == 1 else f"{f.address}-{f.address + f.count - 1}"
        typ = f"string[{f.length}]" if f.type == "string" else f.type
        order = "-" if f.count == 1 or f.type == "string" else f.order
        scale = "-" if f.scale == 1.0 or f.type.startswith("float") else f"{f.scale:g}"
        rows.append(f"| {span} | {table} | {typ} | {order} | {f.unit or '-'} | {scale} | `{f.name}` | {f.meaning} |")
    return head + "\n".join(rows) + "\n"
