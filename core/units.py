"""Units in config files: durations (``"500ms"``, ``"5s"``, ``"2m"``) and sizes (``"64MiB"``).

Pure Python; importing it loads no compiled module.
"""
from __future__ import annotations

import math
import re

from fedgate.core.errors import ConfigError

__all__ = ["parse_duration", "parse_size", "format_duration", "format_size"]

_DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(us|ms|s|m|h|d)\s*")
_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9,
    "kib": 2**10, "mib": 2**20, "gib": 2**30,
    "k": 2**10, "m": 2**20, "g": 2**30,
}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?)\s*([kmg]?i?b?)\s*", re.IGNORECASE)


def parse_duration(text: str | int | float, *, key: str | None = None, file: str | None = None) -> float:
    """Parse a duration into seconds.

    Strings take one or more ``<number><unit>`` parts (``"1m30s"``) with units
    us, ms, s, m, h, d; bare numbers are seconds.

    >>> parse_duration("500ms"), parse_duration("2m"), parse_duration("1h30m"), parse_duration(3)
    (0.5, 120.0, 5400.0, 3.0)
    """
    if isinstance(text, bool):
        raise ConfigError("expected a duration such as '500ms' or '5s'", file=file, key=key, value=text)
    if isinstance(text, (int, float)):
        seconds = float(text)
    elif isinstance(text, str):
        pos, seconds, parts = 0, 0.0, 0
        while pos < len(text):
            m = _DURATION_RE.match(text, pos)
            if not m or m.end() == pos:
                raise ConfigError(
                    "expected a duration such as '500ms', '5s', '2m' or '1h30m'",
                    file=file, key=key, value=text,
                )
            seconds += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
            pos, parts = m.end(), parts + 1
        if parts == 0:
            raise ConfigError("empty duration", file=file, key=key, value=text)
    else:
        raise ConfigError("expected a duration string", file=file, key=key, value=text)
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError("a duration must be finite and not negative", file=file, key=key, value=text)
    return seconds


def parse_size(text: str | int, *, key: str | None = None, file: str | None = None) -> int:
    """Parse a byte size: ``64MiB``, ``10MB``, ``512k`` (binary), or a bare integer.

    >>> parse_size("64MiB"), parse_size("1kB"), parse_size(4096)
    (67108864, 1000, 4096)
    """
    if isinstance(text, bool):
        raise ConfigError("expected a size such as '64MiB'", file=file, key=key, value=text)
    if isinstance(text, int):
        value = text
    elif isinstance(text, str):
        m = _SIZE_RE.fullmatch(text)
        if not m or m.group(2).lower() not in _SIZE_UNITS:
            raise ConfigError("expected a size such as '64MiB', '10MB' or '4096'", file=file, key=key, value=text)
        value = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    else:
        raise ConfigError("expected a size such as '64MiB'", file=file, key=key, value=text)
    if value < 0:
        raise ConfigError("a size must not be negative", file=file, key=key, value=text)
    return value


def format_duration(seconds: float) -> str:
    """Short human form: ``0.25 -> '250ms'``, ``90 -> '1m30s'``."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return (f"{h}h" if h else "") + (f"{m}m" if m else "") + (f"{s}s" if s else "")


def format_size(n: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
