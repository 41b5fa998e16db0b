"""fedgate.drivers.sim: the simulated plant (``fedgate-sim``) and pty test links.

- :class:`PtyLink` / :func:`open_pty_writer` (``ptylink``): a socat-like pty
  null-modem cable and a line writer for serial-sensor rigs.
- :class:`Plant`, :class:`Profile`, :data:`PROFILES` (``plant``): vectorised,
  seeded machine degradation model with faults, maintenance and labels.
- :class:`PlantServer`, :class:`ServerThread` (``server``): the plant served over
  Modbus TCP or RTU; the register map is data in ``regmap``.
- :class:`SensorEmitter` (``sensor``): the plant as a line-protocol serial sensor.

Names load lazily: ``from fedgate.drivers.sim import PtyLink`` loads neither the
plant model nor the Modbus server.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    "PtyLink": "fedgate.drivers.sim.ptylink",
    "PtyWriter": "fedgate.drivers.sim.ptylink",
    "open_pty_writer": "fedgate.drivers.sim.ptylink",
    "FAULT_HEALTH": "fedgate.drivers.sim.plant",
    "SIGNALS": "fedgate.drivers.sim.plant",
    "MachineKind": "fedgate.drivers.sim.plant",
    "Profile": "fedgate.drivers.sim.plant",
    "PROFILES": "fedgate.drivers.sim.plant",
    "Plant": "fedgate.drivers.sim.plant",
    "Trace": "fedgate.drivers.sim.plant",
    "fault_within": "fedgate.drivers.sim.plant",
    "PlantServer": "fedgate.drivers.sim.server",
    "ServerThread": "fedgate.drivers.sim.server",
    "SensorEmitter": "fedgate.drivers.sim.sensor",
    "SensorFormat": "fedgate.drivers.sim.sensor",
    "nmea_checksum": "fedgate.drivers.sim.sensor",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fedgate.drivers.sim' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
