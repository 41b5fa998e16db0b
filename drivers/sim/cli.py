"""``fedgate-sim``: a simulated plant served over Modbus TCP or RTU, plus a serial sensor.

Examples::

    fedgate-sim --tcp 127.0.0.1:5020 --profile standard --seed 1 --speed 60
    fedgate-sim --tcp 127.0.0.1:0 --ready-file /tmp/sim.json        # port chosen by the OS
    fedgate-sim --rtu-pty /tmp/plc1 --sensor-pty /tmp/vib1 --profile new-line
    fedgate-sim --dump-csv 20000 --horizon 5m --out truth.csv --profile heavy --seed 3

Serving runs until SIGTERM or SIGINT, then stops cleanly (exit 0). The ready file
(written atomically once serving) is JSON with the chosen port and paths.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from fedgate.core.errors import ConfigError, FedgateError
from fedgate.core.logs import setup_logging
from fedgate.core.units import parse_duration
from fedgate.drivers.sim.plant import PROFILES, SIGNALS, Plant, Profile, fault_within
from fedgate.drivers.sim.ptylink import PtyLink, PtyWriter, open_pty_writer
from fedgate.drivers.sim.sensor import SensorEmitter, SensorFormat
from fedgate.drivers.sim.server import PlantServer

__all__ = ["main", "build_parser", "dump_csv", "apply_overrides", "CSV_COLUMNS"]

log = logging.getLogger("fedgate.sim")

CSV_COLUMNS = (
    ["step", "time_s", "machine", "unit_id", "profile"]
    + list(SIGNALS)
    + ["energy_wh", "health", "fault", "fault_within_horizon"]
)


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"--tcp {text!r}: expected HOST:PORT")
    try:
        port_no = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tcp {text!r}: port {port!r} is not a number") from None
    if not 0 <= port_no <= 65535:
        raise argparse.ArgumentTypeError(f"--tcp {text!r}: port must be 0..65535")
    return host.strip("[]"), port_no


def _profiles(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PROFILES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"--profile {text!r}: unknown {unknown or text!r}; choose from {sorted(PROFILES)}")
    return names


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except (ConfigError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_OVERRIDABLE = {f.name: f.type for f in dataclasses.fields(Profile) if f.name not in ("name", "kind")}


def apply_overrides(profiles: Sequence[Profile], overrides: Sequence[str]) -> list[Profile]:
    """Profiles with ``KEY=VALUE`` overrides applied (numbers only); ValueError names the bad one."""
    changes: dict[str, float] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in _OVERRIDABLE:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(_OVERRIDABLE))}")
        try:
            changes[key] = float(value)
        except ValueError:
            raise ValueError(f"--set {item!r}: {value!r} is not a number") from None
    return [dataclasses.replace(p, **changes) for p in profiles]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fedgate-sim", description="Simulated plant served over Modbus (fedgate).")
    where = ap.add_argument_group("serving (one Modbus transport)")
    where.add_argument("--tcp", type=_host_port, metavar="HOST:PORT", help="serve Modbus TCP (port 0: any free port)")
    where.add_argument("--rtu", metavar="PATH", help="serve Modbus RTU on this serial port or pty path")
    where.add_argument("--rtu-pty", metavar="LINK", help="create a pty pair, serve RTU on one end, symlink the other at LINK")
    where.add_argument("--baudrate", type=int, default=19200, help="RTU baud rate (default 19200)")
    where.add_argument("--unit-id", type=int, default=1, help="unit id of the first machine (default 1)")
    where.add_argument("--ready-file", metavar="PATH", help="write JSON with ports/paths here once serving")
    plant = ap.add_argument_group("plant")
    plant.add_argument("--profile", type=_profiles, default=["standard"],
                       help=f"profile per machine, comma-separated (one machine each): {', '.join(PROFILES)}")
    plant.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                       help="override a profile field for every machine, e.g. life_min=120 (repeatable)")
    plant.add_argument("--seed", type=int, default=0, help="plant seed (default 0)")
    plant.add_argument("--speed", type=float, default=1.0, help="plant seconds per real second (default 1)")
    plant.add_argument("--dt", type=_duration, default=1.0, help="plant time per step (default 1s)")
    plant.add_argument("--start-at", type=_duration, default=0.0, metavar="DURATION",
                       help="fast-forward the plant by this much plant time first, e.g. 6h (serving and --dump-csv)")
    sensor = ap.add_argument_group("serial sensor")
    sensor.add_argument("--sensor-pty", metavar="LINK", help="emit sensor lines into a pty; symlink the reader side at LINK")
    sensor.add_argument("--sensor-format", choices=[f.value for f in SensorFormat], default="nmea")
    sensor.add_argument("--sensor-rate", type=float, default=2.0, help="lines per real second (default 2)")
    sensor.add_argument("--sensor-request", metavar="CMD",
                        help="request/response mode: answer each CMD line with one reading instead of streaming")
    sensor.add_argument("--sensor-machine", type=int, default=0, help="machine the sensor sits on (default 0)")
    sensor.add_argument("--garbage-rate", type=float, default=0.0, help="share of garbage lines, 0..1 (default 0)")
    dump = ap.add_argument_group("ground truth")
    dump.add_argument("--dump-csv", type=int, metavar="N", help="write N steps with labels as CSV and exit (no serving)")
    dump.add_argument("--horizon", type=_duration, default=300.0, help="look-ahead of fault_within_horizon (default 5m)")
    dump.add_argument("--out", default="-", help="CSV path for --dump-csv (default stdout)")
    ap.add_argument("--log-level", default="INFO")
    return ap


def dump_csv(plant: Plant, n_steps: int, horizon_s: float, out: TextIO, *, unit_id: int = 1) -> int:
    """Write ``n_steps`` steps of ``plant`` with labels; returns the number of rows.

    ``fault_within_horizon`` at step t is 1 when the fault is active at any step in
    (t, t + horizon] (the agent's look-ahead label); the plant is run ``horizon``
    steps past the end so the last rows are labelled exactly.
    """
    h_steps = max(1, math.ceil(horizon_s / plant.dt_s - 1e-9))
    trace = plant.run(n_steps + h_steps)
    ahead = fault_within(trace.fault, h_steps)
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    rows = 0
    for k in range(n_steps):
        step = int(trace.step[k])
        for m in range(plant.n_machines):
            w.writerow(
                [step, f"{step * plant.dt_s:g}", m, unit_id + m, plant.profiles[m].name]
                + [repr(float(trace.signals[s][k, m])) for s in SIGNALS]
                + [repr(float(trace.signals["energy_wh"][k, m])), repr(float(trace.health[k, m])),
                   int(trace.fault[k, m]), int(ahead[k, m])]
            )
            rows += 1
    return rows


def _write_ready(path: str, info: dict[str, Any]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(info, fh)
        fh.write("\n")
    os.replace(tmp, path)


async def _serve(args: argparse.Namespace, plant: Plant) -> int:
    server = PlantServer(plant, unit_id=args.unit_id, speed=args.speed)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    link: PtyLink | None = None
    writer: PtyWriter | None = None
    sensor_task: asyncio.Task[None] | None = None
    info: dict[str, Any] = {
        "pid": os.getpid(), "seed": args.seed, "speed": args.speed, "dt_s": plant.dt_s, "start_step": plant.step_count,
        "profiles": [p.name for p in plant.profiles],
        "unit_ids": [args.unit_id + i for i in range(plant.n_machines)],
    }
    if args.ready_file:  # a stale file from an earlier run must not look like "ready"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.ready_file)
    try:
        if args.tcp is not None:
            host, port = args.tcp
            info.update(transport="tcp", host=host, port=await server.serve_tcp(host, port))
        else:
            path = args.rtu
            if args.rtu_pty is not None:
                link = PtyLink(b_link=args.rtu_pty).start()
                path = link.a_tty
                info["rtu_link"] = link.b_path
                info["rtu_tty"] = link.b_tty
            await server.serve_rtu(path, baudrate=args.baudrate)
            info.update(transport="rtu", rtu_path=path, baudrate=args.baudrate)
        if args.sensor_pty is not None:
            writer = open_pty_writer(args.sensor_pty)
            emitter = SensorEmitter(plant, args.sensor_format, machine=args.sensor_machine,
                                    garbage_rate=args.garbage_rate, seed=args.seed)
            if args.sensor_request:
                job = emitter.answer(writer, args.sensor_request)
                mode = f"answers {args.sensor_request!r}"
            else:
                job = emitter.stream(writer, args.sensor_rate)
                mode = f"{args.sensor_rate:g} lines/s"
            sensor_task = loop.create_task(job, name="fedgate-sim-sensor")
            info.update(sensor_path=writer.path, sensor_tty=writer.tty, sensor_format=args.sensor_format)
            log.info("serial sensor (%s, %s) at %s", args.sensor_format, mode, writer.path)
        if args.ready_file:
            _write_ready(args.ready_file, info)
        print(json.dumps(info), flush=True)
        await stop.wait()
        log.info("stopping at step %s", plant.step_count)
        return 0
    finally:
        if sensor_task is not None:
            sensor_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sensor_task
        await server.close()
        if writer is not None:
            writer.close()
        if link is not None:
            link.close()
        if args.ready_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(args.ready_file)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fedgate-sim``; returns the exit status."""
    ap = build_parser()
    args = ap.parse_args(argv)
    setup_logging(args.log_level)
    modes = [m for m in ("tcp", "rtu", "rtu_pty") if getattr(args, m) is not None]
    if args.dump_csv is None and len(modes) != 1:
        ap.error("choose exactly one of --tcp, --rtu, --rtu-pty (or --dump-csv N)")
    for name, ok in (("--speed", args.speed >= 0), ("--garbage-rate", 0 <= args.garbage_rate <= 1),
                     ("--sensor-rate", args.sensor_rate > 0), ("--dt", args.dt > 0),
                     ("--horizon", args.horizon > 0), ("--start-at", args.start_at >= 0), ("--sensor-machine", 0 <= args.sensor_machine < len(args.profile))):
        if not ok:
            ap.error(f"{name} = {getattr(args, name[2:].replace('-', '_'))!r} is out of range")
    try:
        profiles = apply_overrides([PROFILES[n] for n in args.profile], args.overrides)
    except ValueError as exc:
        ap.error(str(exc))
    plant = Plant(profiles, seed=args.seed, dt_s=args.dt)
    if args.start_at > 0:
        plant.step(round(args.start_at / plant.dt_s))
        log.info("fast-forwarded to step %s (%s plant seconds)", plant.step_count, plant.time_s)
    try:
        if args.dump_csv is not None:
            if args.dump_csv < 1:
                ap.error("--dump-csv N needs N >= 1")
            if args.out == "-":
                dump_csv(plant, args.dump_csv, args.horizon, sys.stdout, unit_id=args.unit_id)
            else:
                with open(args.out, "w", newline="") as fh:
                    rows = dump_csv(plant, args.dump_csv, args.horizon, fh, unit_id=args.unit_id)
                log.info("wrote %d rows to %s", rows, args.out)
            return 0
        return asyncio.run(_serve(args, plant))
    except (FedgateError, OSError, ValueError) as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
