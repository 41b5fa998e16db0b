"""What acquisition produces: tag values with quality, per-device state and backoff."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = ["Quality", "TagValue", "DeviceStatus", "Backoff", "judge"]


class Quality(str, Enum):
    """Quality of one reading."""

    GOOD = "good"
    BAD_RANGE = "bad_range"
    STALE = "stale"
    ERROR = "error"


@dataclass(frozen=True)
class TagValue:
    """One reading of a tag.

    ``name`` is ``"device.tag"``; ``ts`` is ``time.time()`` when the reply arrived;
    ``raw`` the registers/bits the value was decoded from (or the line field).

    >>> TagValue("press.temp", 21.5, 1.0, Quality.GOOD, (215,), "degC").quality.value
    'good'
    """

    name: str
    value: float | int | bool | str | None
    ts: float
    quality: Quality
    raw: tuple[Any, ...] = ()
    unit: str = ""


def judge(value: Any, lo: float | None, hi: float | None) -> Quality:
    """GOOD, or BAD_RANGE for a number outside [lo, hi] or not finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return Quality.GOOD
    if isinstance(value, float) and not math.isfinite(value):
        return Quality.BAD_RANGE
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        return Quality.BAD_RANGE
    return Quality.GOOD


@dataclass
class DeviceStatus:
    """Per-device state and counters (mutable, owned by the device's poll loop)."""

    transport: str
    state: str = "down"
    cycles: int = 0
    requests: int = 0
    errors: dict[str, int] = field(default_factory=lambda: {
        "timeout": 0, "exception": 0, "busy": 0, "connection": 0, "protocol": 0})
    reconnects: int = 0
    bad_lines: dict[str, int] = field(default_factory=lambda: {
        "overlong": 0, "garbage": 0, "checksum": 0, "truncated": 0})
    lines: int = 0
    last_error: str = ""
    last_ok_ts: float | None = None
    next_attempt_s: float = 0.0
    last_cycle_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "transport": self.transport,
            "cycles": self.cycles,
            "requests": self.requests,
            "errors": dict(self.errors),
            "reconnects": self.reconnects,
            "lines": self.lines,
            "bad_lines": dict(self.bad_lines),
            "last_error": self.last_error,
            "last_ok_ts": self.last_ok_ts,
            "backoff_s": self.next_attempt_s if self.state == "down" else 0.0,
            "last_cycle_ms": self.last_cycle_ms,
        }


class Backoff:
    """Exponential backoff with jitter: ``base``, ``2*base``, ... up to ``cap`` seconds.

    Each delay is the current step scaled by a random factor in [0.75, 1.0], so a
    bus full of gateways does not reconnect in lockstep, and never exceeds ``cap``.

    >>> b = Backoff(0.1, 0.4, seed=1)
    >>> [round(b.step, 2) for _ in range(4) if b.next() > 0]
    [0.2, 0.4, 0.4, 0.4]
    """

    def __init__(self, base_s: float, cap_s: float, *, seed: int | None = None) -> None:
        self.base_s = base_s
        self.cap_s = max(cap_s, base_s)
        self.step = base_s
        self._rng = random.Random(seed)

    def next(self) -> float:
        delay = self.step * (0.75 + 0.25 * self._rng.random())
        self.step = min(self.cap_s, self.step * 2.0)
        return delay

    def reset(self) -> None:
        self.step = self.base_s
