"""fedgate.drivers: field I/O (Modbus TCP/RTU, serial line sensors) and the simulated plant.

Public API used by the agent::

    cfg = load_config(doc, file="agent.toml")      # [[transports]] + [[devices]]
    acq = Acquisition(cfg, on_values=callback)      # async start()/stop(), latest(), write(), status(), plan()
    report = await check(cfg)                       # fedgate-agent check
"""
from __future__ import annotations

from fedgate.drivers.acquisition import Acquisition
from fedgate.drivers.check import CheckReport, check, format_report
from fedgate.drivers.config import (
    DriversConfig,
    LineDeviceConfig,
    LineFormat,
    LineTagConfig,
    ModbusDeviceConfig,
    ModbusTagConfig,
    RegisterTable,
    TransportConfig,
    TransportKind,
    load_config,
)
from fedgate.drivers.decode import ByteOrder, DataType, TagCodec, codec_for
from fedgate.drivers.plan import DevicePlan, Request, format_plan, plan_device
from fedgate.drivers.values import Quality, TagValue

__all__ = [
    "Acquisition",
    "ByteOrder",
    "CheckReport",
    "DataType",
    "DevicePlan",
    "DriversConfig",
    "LineDeviceConfig",
    "LineFormat",
    "LineTagConfig",
    "ModbusDeviceConfig",
    "ModbusTagConfig",
    "Quality",
    "RegisterTable",
    "Request",
    "TagCodec",
    "TagValue",
    "TransportConfig",
    "TransportKind",
    "check",
    "codec_for",
    "format_plan",
    "format_report",
    "load_config",
    "plan_device",
]
