"""The demo federation's sites and their configuration files.

Four sites, each a simulated plant (``fedgate-sim``) read by one agent; they differ in
seed, operating profile and link, so their data are not identically distributed:

========  ==========  ======================================================
site      profile     link
========  ==========  ======================================================
site-a    heavy       Modbus RTU on a pty pair (word-swapped and scaled tags)
site-b    new-line    Modbus TCP; no fault in its short history
site-c    standard    Modbus TCP
site-d    light       Modbus TCP + a serial NMEA vibration sensor (pty)
========  ==========  ======================================================

Configurations start from the commented templates in ``deploy/`` when they are there
(a source checkout) and override what a site needs; the files are written with
:func:`dump_toml`.

>>> print(dump_toml({"a": {"x": 1, "t": ["p", "q"], "m": {"k": "v"}}, "d": [{"n": 1, "tags": [{"z": True}]}]}))
[a]
x = 1
t = ["p", "q"]
<BLANKLINE>
[a.m]
k = "v"
<BLANKLINE>
[[d]]
n = 1
<BLANKLINE>
[[d.tags]]
z = true
<BLANKLINE>
"""
from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedgate.core.config import load_toml

__all__ = [
    "SITES",
    "FEATURES",
    "LABEL",
    "SPEED",
    "Site",
    "Timing",
    "agent_config",
    "server_config",
    "dump_toml",
    "template",
]

#: plant seconds per real second: a `standard` pump faults about every 20 real seconds
SPEED = 120.0

#: the federation's ordered features: (name, tag key, aggregate)
FEATURES: tuple[tuple[str, str, str], ...] = (
    ("vib_mean", "vibration", "mean"),
    ("vib_max", "vibration", "max"),
    ("vib_slope", "vibration", "slope"),
    ("temp_mean", "temperature", "mean"),
    ("temp_slope", "temperature", "slope"),
    ("current_mean", "current", "mean"),
    ("pressure_mean", "pressure", "mean"),
    ("load_mean", "load", "mean"),
)
LABEL = "fault_soon"

#: which plant signal each tag key reads (for the ground truth)
SIGNAL_OF = {"vibration": "vibration_mm_s", "temperature": "temperature_c", "current": "current_a",
             "pressure": "pressure_bar", "load": "load_pct", "fault": "fault"}


@dataclass(frozen=True)
class Site:
    """One gateway of the demo and the plant it reads."""

    name: str
    profile: str
    seed: int
    link: str  # "rtu" | "tcp" | "tcp+sensor"

    @property
    def device(self) -> str:
        return "motor1" if self.profile == "light" else "pump1"

    def tag_of(self, key: str) -> str:
        """The agent's ``DEVICE.TAG`` for a tag key (``vibration``, ``fault``, ...)."""
        if self.link == "tcp+sensor" and key in ("vibration", "temperature"):
            return f"vib1.{key}"
        return f"{self.device}.{key}"

    @property
    def link_text(self) -> str:
        return {"rtu": "Modbus RTU (pty)", "tcp": "Modbus TCP", "tcp+sensor": "TCP + NMEA sensor"}[self.link]


SITES: tuple[Site, ...] = (
    Site("site-a", "heavy", 12, "rtu"),
    Site("site-b", "new-line", 14, "tcp"),
    Site("site-c", "standard", 11, "tcp"),
    Site("site-d", "light", 13, "tcp+sensor"),
)


@dataclass(frozen=True)
class Timing:
    """Real-time settings of the samples (seconds of wall clock, the plant runs at SPEED)."""

    poll_s: float = 0.25
    grid_s: float = 0.5
    window_s: float = 4.0
    hop_s: float = 0.5
    horizon_s: float = 3.0
    max_gap_s: float = 1.5
    min_coverage: float = 0.8


def _dur(seconds: float) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def template(name: str) -> dict[str, Any]:
    """The parsed ``deploy/NAME`` of a source checkout, or ``{}`` when not installed from one."""
    path = Path(__file__).resolve().parents[1] / "deploy" / name
    if not path.is_file():
        return {}
    return load_toml(str(path))


def _merge(base: dict[str, Any], over: Mapping[str, Any], replace: tuple[str, ...] = ()) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if key in replace or not isinstance(value, Mapping) or not isinstance(out.get(key), dict):
            out[key] = copy.deepcopy(value)
        else:
            out[key] = _merge(out[key], value)
    return out


# ------------------------------------------------------------------------ agent.toml
def _modbus_tags(site: Site) -> list[dict[str, Any]]:
    if site.link == "rtu":  # the plant's alternative encodings, to show them off
        tags = [
            {"name": "temperature", "register": "input", "address": 20, "type": "float32", "byte_order": "CDAB",
             "unit": "degC", "min": -40.0, "max": 250.0},
            {"name": "vibration", "register": "input", "address": 41, "type": "uint16", "scale": 0.01,
             "unit": "mm/s"},
            {"name": "current", "register": "input", "address": 42, "type": "uint16", "scale": 0.1, "unit": "A"},
            {"name": "pressure", "register": "input", "address": 45, "type": "uint16", "scale": 0.01,
             "unit": "bar"},
            {"name": "load", "register": "input", "address": 46, "type": "uint16", "scale": 0.1, "unit": "%"},
            {"name": "fault", "register": "input", "address": 48, "type": "bit", "bit": 0},
        ]
    else:
        tags = [
            {"name": "current", "register": "input", "address": 4, "type": "float32", "unit": "A"},
            {"name": "pressure", "register": "input", "address": 10, "type": "float32", "unit": "bar"},
            {"name": "load", "register": "input", "address": 12, "type": "float32", "unit": "%"},
            {"name": "fault", "register": "discrete", "address": 0, "type": "bool"},
        ]
        if site.link == "tcp":
            tags[:0] = [
                {"name": "temperature", "register": "input", "address": 0, "type": "float32", "unit": "degC",
                 "min": -40.0, "max": 250.0},
                {"name": "vibration", "register": "input", "address": 2, "type": "float32", "unit": "mm/s",
                 "min": 0.0, "max": 100.0},
            ]
    tags += [
        {"name": "prediction", "register": "holding", "address": 0, "type": "float32", "writable": True},
        {"name": "alarm", "register": "coil", "address": 1, "type": "bool", "writable": True},
    ]
    return tags


def agent_config(site: Site, *, data_dir: Path, server: str, server_key: Path, secret_key: Path,
                 plant: Mapping[str, Any], timing: Timing = Timing()) -> dict[str, Any]:
    """The site's ``agent.toml`` as a document (``plant`` is its ``fedgate-sim`` ready file)."""
    transports: list[dict[str, Any]] = []
    devices: list[dict[str, Any]] = []
    if site.link == "rtu":
        transports.append({"name": "plc", "kind": "modbus-rtu", "port": plant["rtu_link"],
                           "baudrate": plant.get("baudrate", 19200), "parity": "N", "stopbits": 1,
                           "timeout": "500ms", "retries": 1, "reconnect_delay": "200ms",
                           "reconnect_delay_max": "2s"})
    else:
        transports.append({"name": "plc", "kind": "modbus-tcp", "host": plant["host"], "port": plant["port"],
                           "timeout": "500ms", "retries": 1, "reconnect_delay": "200ms",
                           "reconnect_delay_max": "2s"})
    devices.append({"name": site.device, "transport": "plc", "unit_id": plant["unit_ids"][0],
                    "poll": _dur(timing.poll_s), "byte_order": "ABCD", "max_gap": 24, "tags": _modbus_tags(site)})
    if site.link == "tcp+sensor":
        transports.append({"name": "vib", "kind": "serial-line", "port": plant["sensor_path"], "baudrate": 9600})
        devices.append({"name": "vib1", "transport": "vib", "format": "nmea", "terminator": "\r\n",
                        "max_line_length": 82, "stale_after": "2s",
                        "tags": [{"name": "vibration", "sentence": "FGVIB", "field": 1, "unit": "mm/s"},
                                 {"name": "temperature", "sentence": "FGVIB", "field": 2, "unit": "degC"}]})
    ours = {
        "agent": {"name": site.name, "data_dir": str(data_dir), "log_level": "info"},
        "uplink": {"server": server, "server_key": str(server_key), "secret_key": str(secret_key),
                   "insecure": False, "heartbeat": "1s", "reconnect_delay": "250ms", "reconnect_delay_max": "2s"},
        "transports": transports,
        "devices": devices,
        "samples": {
            "grid": _dur(timing.grid_s), "window": _dur(timing.window_s), "hop": _dur(timing.hop_s),
            "min_coverage": timing.min_coverage, "max_gap": _dur(timing.max_gap_s),
            "features": [{"name": n, "tag": site.tag_of(k), "agg": a} for n, k, a in FEATURES],
            "label": {"name": LABEL, "tag": site.tag_of("fault"), "agg": "max", "horizon": _dur(timing.horizon_s)},
        },
        "predict": {"write_tag": f"{site.device}.prediction", "alarm_threshold": 0.5,
                    "alarm_tag": f"{site.device}.alarm", "hysteresis": 0.1},
        "metrics": {"address": ""},
    }
    base = template("agent.toml")
    keep = {k: v for k, v in base.items() if k in ("agent", "uplink", "store")}
    return _merge(keep, ours, replace=("transports", "devices", "samples", "predict", "metrics"))


# ------------------------------------------------------------------------ server.toml
def server_config(*, bind: str, data_dir: Path, secret_key: Path, agents_dir: Path, metrics: str,
                  rounds: int, n_agents: int) -> dict[str, Any]:
    """The demo's ``server.toml`` as a document (from ``deploy/server.toml`` when present)."""
    ours = {
        "server": {"bind": bind, "data_dir": str(data_dir), "secret_key": str(secret_key),
                   "agents_dir": str(agents_dir), "insecure": False, "metrics": metrics,
                   "heartbeat": "1s", "dead_after": "5s", "log_level": "info"},
        "federation": {
            "name": "fault-warning-demo",
            "features": [n for n, _, _ in FEATURES],
            "label": LABEL,
            "rounds": rounds,
            "min_agents": n_agents,
            "fraction": 1.0,
            "round_timeout": "20s",
            "local_epochs": 1,
            "batch_size": 16,
            "lr": 0.1,
            "lr_schedule": "constant",
            "l2": 0.0,
            "prox_mu": 0.0,
            "codec": "f32",
            "evaluate": True,
            "statistics": True,
            "seed": 0,
            "model": {"kind": "logistic", "n_features": len(FEATURES), "n_outputs": 1},
        },
        "strategy": {"name": "fedavg", "max_update_norm": 100.0},
        "privacy": {"noise_multiplier": 0.0},
    }
    base = template("server.toml")
    base.get("federation", {}).pop("model", None)
    base.get("federation", {}).pop("min_available", None)
    return _merge(base, ours)


# ------------------------------------------------------------------------ TOML writer
def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"TOML cannot hold {value!r} here")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_key(k)} = {_scalar(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _key(key: str) -> str:
    return key if key and all(c.isalnum() or c in "-_" for c in key) else json.dumps(key)


def _is_table_array(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, Mapping) for v in value)


def _emit(table: Mapping[str, Any], path: list[str], out: list[str], *, inline_arrays: bool) -> None:
    subs: list[tuple[str, Mapping[str, Any]]] = []
    arrays: list[tuple[str, list[Mapping[str, Any]]]] = []
    for key, value in table.items():
        if isinstance(value, Mapping) and value:
            subs.append((key, value))
        elif _is_table_array(value) and not inline_arrays:
            arrays.append((key, list(value)))
        else:
            out.append(f"{_key(key)} = {_scalar(value)}")
    for key, value in subs:
        out.append("")
        out.append("[" + ".".join(_key(p) for p in [*path, key]) + "]")
        _emit(value, [*path, key], out, inline_arrays=key == "samples")
    for key, items in arrays:
        for item in items:
            out.append("")
            out.append("[[" + ".".join(_key(p) for p in [*path, key]) + "]]")
            _emit(item, [*path, key], out, inline_arrays=False)


def dump_toml(doc: Mapping[str, Any], header: str = "") -> str:
    """A TOML document for ``doc`` (tables, arrays of tables, inline ``features`` lists)."""
    out: list[str] = [f"# {line}" if line else "#" for line in header.splitlines()]
    top = {k: v for k, v in doc.items() if not isinstance(v, Mapping) and not _is_table_array(v)}
    for key, value in top.items():
        out.append(f"{_key(key)} = {_scalar(value)}")
    rest = {k: v for k, v in doc.items() if k not in top}
    _emit(rest, [], out, inline_arrays=False)
    text = "\n".join(out).lstrip("\n") + "\n"
    return text
