"""fedgate.drivers: field I/O (Modbus TCP/RTU, serial line sensors) and the simulated plant."""
from __future__ import annotations

__all__: list[str] = []
