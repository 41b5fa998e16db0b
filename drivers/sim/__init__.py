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

from fedgate.core.lazy import lazy_exports


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

__all__, __getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
