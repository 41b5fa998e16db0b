"""The one exception tree of fedgate.

::

    FedgateError                      root: catch this to catch everything of ours
    ├── ConfigError (ValueError)      a config file, a spec or an argument is wrong
    ├── DriverError                   field I/O failed (Modbus, serial); wraps pymodbus/pyserial
    │   ├── DeviceTimeout             no answer in time
    │   ├── DeviceException           the device answered with a Modbus exception code
    │   └── ConnectionLost            the link (TCP connection, serial port) is gone
    ├── ProtocolError (ValueError)    a message or an encoded buffer is malformed or hostile
    ├── TrainingError                 training refused its input or diverged
    ├── AggregationError              updates cannot be merged (shapes, no quorum, ...)
    ├── StoreError                    persistent state is unreadable or corrupt
    └── SecurityError                 keys, permissions, authentication

Third-party exceptions are translated at the layer boundary (``raise DriverError(...)
from exc``), so upper layers only ever see these types.
"""
from __future__ import annotations

from typing import Any

__all__ = [
    "FedgateError",
    "ConfigError",
    "DriverError",
    "DeviceTimeout",
    "DeviceException",
    "ConnectionLost",
    "ProtocolError",
    "TrainingError",
    "AggregationError",
    "StoreError",
    "SecurityError",
]


class FedgateError(Exception):
    """Root of every error fedgate raises on purpose."""


class ConfigError(FedgateError, ValueError):
    """A configuration value is wrong.

    Carries where it was found so the message can name file, key and value.

    >>> str(ConfigError("must be > 0", file="agent.toml", key="devices[0].poll", value="-1s"))
    "agent.toml: devices[0].poll = '-1s': must be > 0"
    """

    _MISSING = object()

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        key: str | None = None,
        value: Any = _MISSING,
    ) -> None:
        self.reason = message
        self.file = file
        self.key = key
        self.value = None if value is ConfigError._MISSING else value
        self.has_value = value is not ConfigError._MISSING
        where = ""
        if file:
            where += f"{file}: "
        if key:
            where += key
            if self.has_value:
                where += f" = {value!r}"
            where += ": "
        elif self.has_value:
            where += f"{value!r}: "
        super().__init__(where + message)


class DriverError(FedgateError):
    """Reading or writing a field device failed."""


class DeviceTimeout(DriverError):
    """The device did not answer in time."""


class DeviceException(DriverError):
    """The device answered with a Modbus exception code (``code``)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class ConnectionLost(DriverError):
    """The link to the device is down."""


class ProtocolError(FedgateError, ValueError):
    """A wire message or encoded buffer is malformed, truncated or hostile."""


class TrainingError(FedgateError):
    """Training refused its input (NaN/Inf, shapes) or diverged."""


class AggregationError(FedgateError):
    """Updates cannot be aggregated."""


class StoreError(FedgateError):
    """Persistent state (SQLite, checkpoints) is unreadable or corrupt."""


class SecurityError(FedgateError):
    """Keys, key-file permissions or authentication are wrong."""
