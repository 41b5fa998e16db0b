"""Register encode/decode for every Modbus data type and byte order.

pymodbus' own helpers know only word order; field devices also swap bytes inside
words, pack 8-bit values into one half of a register and use half floats, so fedgate
decodes with its own code (``struct`` with precompiled formats: per tag that is
cheaper than building NumPy arrays for a handful of registers).

Byte orders follow Telegraf's letters, ``A`` being the most significant byte:

========  ==============================================  ==========================
``ABCD``  big endian: high word first, high byte first    wire ``AB CD``
``DCBA``  little endian                                   wire ``DC BA``
``BADC``  high word first, bytes swapped in each word     wire ``BA DC``
``CDAB``  low word first, high byte first in each word    wire ``CD AB``
========  ==============================================  ==========================

For one-register values ``ABCD``/``CDAB`` are big endian and ``DCBA``/``BADC`` swap
the two bytes. Strings only honour the byte swap (``BADC``/``DCBA``); their
characters run from the first register on.

>>> codec = codec_for("float32", "CDAB")
>>> codec.encode(1.5)
(0, 16320)
>>> codec.decode((0, 16320))
1.5
"""
from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from enum import Enum

from fedgate.core.errors import ConfigError

__all__ = ["ByteOrder", "DataType", "TagCodec", "codec_for", "register_count", "BIT_TYPES", "SUB_REGISTER_TYPES"]


class ByteOrder(str, Enum):
    """Order of bytes and words of a multi-register value (Telegraf's letters)."""

    ABCD = "ABCD"
    DCBA = "DCBA"
    BADC = "BADC"
    CDAB = "CDAB"


class DataType(str, Enum):
    """Tag data types, as written in ``[[devices.tags]] type``."""

    BOOL = "bool"
    BIT = "bit"
    INT8L = "int8l"
    INT8H = "int8h"
    UINT8L = "uint8l"
    UINT8H = "uint8h"
    INT16 = "int16"
    UINT16 = "uint16"
    INT32 = "int32"
    UINT32 = "uint32"
    INT64 = "int64"
    UINT64 = "uint64"
    FLOAT16 = "float16"
    FLOAT32 = "float32"
    FLOAT64 = "float64"
    STRING = "string"


#: types read from coils / discrete inputs
BIT_TYPES = frozenset({DataType.BOOL})
#: types that use part of one register (several may share a register)
SUB_REGISTER_TYPES = frozenset({DataType.BIT, DataType.INT8L, DataType.INT8H, DataType.UINT8L, DataType.UINT8H})

# struct format and register count of the word-sized types
_WORD_FORMATS: dict[DataType, tuple[str, int]] = {
    DataType.INT16: ("h", 1),
    DataType.UINT16: ("H", 1),
    DataType.FLOAT16: ("e", 1),
    DataType.INT32: ("i", 2),
    DataType.UINT32: ("I", 2),
    DataType.FLOAT32: ("f", 2),
    DataType.INT64: ("q", 4),
    DataType.UINT64: ("Q", 4),
    DataType.FLOAT64: ("d", 4),
}
_INT_RANGES: dict[DataType, tuple[int, int]] = {
    DataType.INT8L: (-(2**7), 2**7 - 1),
    DataType.INT8H: (-(2**7), 2**7 - 1),
    DataType.UINT8L: (0, 2**8 - 1),
    DataType.UINT8H: (0, 2**8 - 1),
    DataType.INT16: (-(2**15), 2**15 - 1),
    DataType.UINT16: (0, 2**16 - 1),
    DataType.INT32: (-(2**31), 2**31 - 1),
    DataType.UINT32: (0, 2**32 - 1),
    DataType.INT64: (-(2**63), 2**63 - 1),
    DataType.UINT64: (0, 2**64 - 1),
}


def register_count(dtype: DataType, length: int | None = None) -> int:
    """Number of registers (or bits, for ``bool``) a value of ``dtype`` occupies."""
    if dtype in _WORD_FORMATS:
        return _WORD_FORMATS[dtype][1]
    if dtype is DataType.STRING:
        if not length or length < 1:
            raise ValueError("a string needs length >= 1 (registers)")
        return length
    return 1


class TagCodec:
    """Encoder/decoder of one tag: raw registers (or bits) <-> engineering value.

    ``decode`` takes exactly ``count`` registers (ints 0..65535) or bits and returns
    ``raw * scale + offset`` (ints stay ints when scale is 1 and offset 0);
    ``encode`` inverts it and raises ``ValueError`` naming the value when it does
    not fit the type.
    """

    __slots__ = ("dtype", "byte_order", "bit", "length", "scale", "offset", "count",
                 "_value", "_words", "_reverse", "_identity")

    def __init__(
        self,
        dtype: DataType,
        byte_order: ByteOrder = ByteOrder.ABCD,
        *,
        bit: int | None = None,
        length: int | None = None,
        scale: float = 1.0,
        offset: float = 0.0,
    ) -> None:
        self.dtype = dtype
        self.byte_order = byte_order
        self.bit = bit
        self.length = length
        self.scale = scale
        self.offset = offset
        self.count = register_count(dtype, length)
        swap = byte_order in (ByteOrder.BADC, ByteOrder.DCBA)
        self._words = struct.Struct(("<" if swap else ">") + "H" * self.count)
        self._reverse = byte_order in (ByteOrder.CDAB, ByteOrder.DCBA)
        self._value = struct.Struct(">" + _WORD_FORMATS[dtype][0]) if dtype in _WORD_FORMATS else None
        self._identity = scale == 1.0 and offset == 0.0

    def __repr__(self) -> str:
        return (f"TagCodec({self.dtype.value}, {self.byte_order.value}, bit={self.bit}, length={self.length}, "
                f"scale={self.scale:g}, offset={self.offset:g})")

    # ------------------------------------------------------------------ decode
    def decode_raw(self, regs: Sequence[int] | Sequence[bool]) -> int | float | bool | str:
        """Decode without scale/offset."""
        dt = self.dtype
        if dt in _WORD_FORMATS:
            words = regs[::-1] if self._reverse else regs
            return self._value.unpack(self._words.pack(*words))[0]
        if dt is DataType.BOOL:
            return bool(regs[0])
        if dt is DataType.BIT:
            return bool((int(regs[0]) >> (self.bit or 0)) & 1)
        if dt is DataType.STRING:
            data = self._words.pack(*regs)
            return data.split(b"\0", 1)[0].decode("utf-8", errors="replace")
        reg = int(regs[0])
        byte = (reg >> 8) & 0xFF if dt in (DataType.INT8H, DataType.UINT8H) else reg & 0xFF
        if dt in (DataType.INT8L, DataType.INT8H) and byte >= 0x80:
            byte -= 0x100
        return byte

    def decode(self, regs: Sequence[int] | Sequence[bool]) -> int | float | bool | str:
        """Decode ``count`` registers/bits into the engineering value."""
        raw = self.decode_raw(regs)
        if self._identity or isinstance(raw, (bool, str)):
            return raw
        return raw * self.scale + self.offset

    # ------------------------------------------------------------------ encode
    def encode(self, value: int | float | bool | str, current: int = 0) -> tuple[int, ...]:
        """Encode an engineering value into registers (or one bit for ``bool``).

        ``current`` is the register's present content, kept for the bits a
        sub-register type (``bit``, 8-bit) does not own.
        """
        dt = self.dtype
        if dt is DataType.BOOL:
            return (int(_as_bool(value)),)
        if dt is DataType.BIT:
            mask = 1 << (self.bit or 0)
            return ((current | mask) if _as_bool(value) else (current & ~mask & 0xFFFF),)
        if dt is DataType.STRING:
            if not isinstance(value, str):
                raise ValueError(f"expected a string, got {value!r}")
            data = value.encode("utf-8")
            if len(data) > 2 * self.count:
                raise ValueError(f"{value!r} does not fit {self.count} registers")
            data = data.ljust(2 * self.count, b"\0")
            return tuple(self._words.unpack(data))
        raw = self._unscale(value)
        if dt in _WORD_FORMATS:
            words = self._words.unpack(self._value.pack(raw))
            return tuple(words[::-1] if self._reverse else words)
        byte = int(raw) & 0xFF
        if dt in (DataType.INT8H, DataType.UINT8H):
            return ((current & 0x00FF) | (byte << 8),)
        return ((current & 0xFF00) | byte,)

    def _unscale(self, value: int | float | bool | str) -> int | float:
        if isinstance(value, (bool, str)) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {value!r}")
        raw: int | float = value if self._identity else (value - self.offset) / self.scale
        if self.dtype in _INT_RANGES:
            if not math.isfinite(raw):
                raise ValueError(f"{value!r} is not finite")
            raw = int(round(raw))
            lo, hi = _INT_RANGES[self.dtype]
            if not lo <= raw <= hi:
                raise ValueError(f"{value!r} is out of range for {self.dtype.value} ({lo}..{hi})")
            return raw
        if self.dtype is DataType.FLOAT16 and math.isfinite(raw) and abs(raw) > 65504.0:
            raise ValueError(f"{value!r} is out of range for float16")
        if self.dtype is DataType.FLOAT32 and math.isfinite(raw) and abs(raw) > 3.4028234663852886e38:
            raise ValueError(f"{value!r} is out of range for float32")
        return float(raw)


def _as_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    raise ValueError(f"expected true/false or 0/1, got {value!r}")


def codec_for(
    dtype: DataType | str,
    byte_order: ByteOrder | str = ByteOrder.ABCD,
    *,
    bit: int | None = None,
    length: int | None = None,
    scale: float = 1.0,
    offset: float = 0.0,
) -> TagCodec:
    """Build the codec of one tag; unknown names raise ConfigError."""
    try:
        dt = DataType(dtype)
    except ValueError as exc:
        raise ConfigError(f"unknown type (one of {', '.join(d.value for d in DataType)})", value=dtype) from exc
    try:
        bo = ByteOrder(byte_order)
    except ValueError as exc:
        raise ConfigError(f"unknown byte order (one of {', '.join(b.value for b in ByteOrder)})",
                          value=byte_order) from exc
    return TagCodec(dt, bo, bit=bit, length=length, scale=scale, offset=offset)
