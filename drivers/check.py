"""``fedgate-agent check --config FILE [--json]``: read every device once and report.

Prints one row per tag (device, tag, value, unit, quality, raw registers), then the
request plan. Exit status 0 when every tag was read, 1 otherwise, with one line per
failure; 2 when the config itself is wrong.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fedgate.core.config import load_toml
from fedgate.core.errors import ConfigError
from fedgate.drivers.acquisition import Acquisition
from fedgate.drivers.config import DriversConfig, LineDeviceConfig, ModbusDeviceConfig, load_config
from fedgate.drivers.plan import DevicePlan, format_plan
from fedgate.drivers.values import Quality, TagValue

__all__ = ["CheckRow", "CheckReport", "check", "format_report", "main"]


@dataclass(frozen=True)
class CheckRow:
    """One tag's reading."""

    device: str
    tag: str
    value: Any
    unit: str
    quality: str
    raw: tuple[Any, ...]


@dataclass
class CheckReport:
    """Result of :func:`check`: rows, plans, failures and warnings (one line each).

    A tag that could not be read is a failure; a value read outside its min/max is
    a warning (it was read, but look at it).
    """

    rows: list[CheckRow] = field(default_factory=list)
    plans: list[DevicePlan] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "tags": [
                {"device": r.device, "tag": r.tag, "value": r.value, "unit": r.unit, "quality": r.quality,
                 "raw": list(r.raw)}
                for r in self.rows
            ],
            "plan": [p.to_dict() for p in self.plans],
            "failures": list(self.failures),
            "warnings": list(self.warnings),
        }


async def check(cfg: DriversConfig, *, line_wait_s: float | None = None) -> CheckReport:
    """Read every configured device once.

    Modbus devices run one cycle of their plan; serial line devices are listened to
    until each tag has a value or ``line_wait_s`` passes (default: the device's
    ``stale_after``).
    """
    acq = Acquisition(cfg)
    report = CheckReport(plans=list(acq.plans().values()))
    got: dict[str, TagValue] = {}
    errors: dict[str, str] = {}
    modbus = [d for d in cfg.devices if isinstance(d, ModbusDeviceConfig)]
    lines = [d for d in cfg.devices if isinstance(d, LineDeviceConfig)]
    try:
        for dev in modbus:
            values, _ = await acq.poll_device(dev)
            got.update((v.name, v) for v in values)
            if acq.status()[dev.name]["last_error"]:
                errors[dev.name] = acq.status()[dev.name]["last_error"]
        if lines:
            await acq.start()
            wanted = {f"{d.name}.{t.name}" for d in lines for t in d.tags}
            wait = line_wait_s if line_wait_s is not None else max(d.stale_after_s for d in lines)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and not wanted <= set(acq.latest()):
                await asyncio.sleep(0.05)
            got.update((k, v) for k, v in acq.latest().items() if k in wanted)
            for d in lines:
                st = acq.status()[d.name]
                if st["last_error"]:
                    errors[d.name] = st["last_error"]
                bad = {k: v for k, v in st["bad_lines"].items() if v}
                if bad and not all(f"{d.name}.{t.name}" in got for t in d.tags):
                    errors.setdefault(d.name, "dropped lines: " + ", ".join(f"{k}={v}" for k, v in bad.items()))
    finally:
        await acq.stop()
    for dev in cfg.devices:
        for tag in dev.tags:
            name = f"{dev.name}.{tag.name}"
            tv = got.get(name)
            if tv is None:
                why = errors.get(dev.name, "no value received")
                report.rows.append(CheckRow(dev.name, tag.name, None, tag.unit, Quality.ERROR.value, ()))
                report.failures.append(f"{name}: {why}")
                continue
            report.rows.append(CheckRow(dev.name, tag.name, tv.value, tv.unit, tv.quality.value, tv.raw))
            if tv.quality is Quality.ERROR:
                report.failures.append(f"{name}: {errors.get(dev.name, 'read failed')}")
            elif tv.quality is Quality.BAD_RANGE:
                report.warnings.append(f"{name}: value {tv.value!r} outside min/max")
    return report


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def format_report(report: CheckReport) -> str:
    """The human table, then the plan, then failures."""
    header = ("device", "tag", "value", "unit", "quality", "raw")
    rows = [header] + [
        (r.device, r.tag, _fmt(r.value), r.unit, r.quality, " ".join(str(x) for x in r.raw))
        for r in report.rows
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    if report.plans:
        lines += ["", "request plan:", format_plan(report.plans)]
    if report.warnings:
        lines += ["", f"{len(report.warnings)} warning(s):"] + [f"  {w}" for w in report.warnings]
    if report.failures:
        lines += ["", f"{len(report.failures)} failure(s):"] + [f"  {f}" for f in report.failures]
    else:
        lines += ["", "all tags read"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``fedgate-agent check --config FILE [--json]``; returns the exit status."""
    ap = argparse.ArgumentParser(prog="fedgate-agent check", description="read every configured device once")
    ap.add_argument("--config", required=True, help="agent.toml")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(load_toml(args.config), file=args.config)
    except ConfigError as exc:
        sys.stdout.write(f"config error: {exc}\n")
        return 2
    report = asyncio.run(check(cfg))
    if args.json:
        sys.stdout.write(json.dumps(report.to_dict(), default=str) + "\n")
    else:
        sys.stdout.write(format_report(report) + "\n")
    return 0 if report.ok else 1
