"""`fedgate-agent check`: the table, the plan, --json and the exit status, as a real subprocess."""
from __future__ import annotations

import asyncio
import json
import sys

from drivers_peers import ModbusPeer, run

from fedgate.core.config import load_toml
from fedgate.drivers import check, format_report, load_config
from fedgate.drivers.sim import open_pty_writer

CHECK = "import sys; from fedgate.drivers.check import main; sys.exit(main(sys.argv[1:]))"


def _toml(port: int, far_address: int = 7, serial: str | None = None, temp_max: float = 100.0) -> str:
    text = f"""
[agent]
node_id = "gw-test"

[[transports]]
name = "plc"
kind = "modbus-tcp"
host = "127.0.0.1"
port = {port}
timeout = "300ms"

[[devices]]
name = "press"
transport = "plc"
unit_id = 1
max_gap = 4

  [[devices.tags]]
  name = "oil_temp"
  register = "input"
  address = 3
  type = "int16"
  scale = 0.1
  unit = "degC"
  max = {temp_max}

  [[devices.tags]]
  name = "pressure"
  register = "holding"
  address = {far_address}
  type = "float32"
  unit = "bar"
"""
    if serial:
        text += f"""
[[transports]]
name = "tty"
kind = "serial-line"
port = "{serial}"
timeout = "100ms"

[[devices]]
name = "vib"
transport = "tty"
format = "kv"
stale_after = "10s"

  [[devices.tags]]
  name = "rms"
  key = "rms"
  unit = "mm/s"
"""
    return text


async def _run_check(path, *args) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", CHECK, "--config", str(path), *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode() + err.decode()


def test_check_prints_table_and_plan_and_exits_zero(tmp_path):
    from fedgate.drivers import codec_for
    path = tmp_path / "agent.toml"

    async def main():
        async with ModbusPeer() as peer:
            await peer.set("input", 3, [215])
            await peer.set("holding", 7, list(codec_for("float32").encode(4.5)))
            path.write_text(_toml(peer.port))
            table = await _run_check(path)
            as_json = await _run_check(path, "--json")
            path.write_text(_toml(peer.port, temp_max=20.0))
            warned = await _run_check(path)
            return table, as_json, warned

    (rc, out), (rc_json, out_json), (rc_warned, out_warned) = run(main())
    assert rc == 0, out
    assert "press   oil_temp  21.5   degC  good     215" in out
    assert "press: 2 request(s) per cycle" in out and "all tags read" in out
    doc = json.loads(out_json)
    assert rc_json == 0 and doc["ok"] is True
    assert {t["tag"]: t["value"] for t in doc["tags"]} == {"oil_temp": 21.5, "pressure": 4.5}
    assert doc["plan"][0]["requests_per_cycle"] == 2
    # read, but outside min/max: a warning, not a failure
    assert rc_warned == 0 and "press.oil_temp: value 21.5 outside min/max" in out_warned
    assert "bad_range" in out_warned


def test_check_explains_each_failure_in_one_line_and_exits_one(tmp_path):
    path = tmp_path / "agent.toml"

    async def main():
        async with ModbusPeer(size=100) as peer:
            path.write_text(_toml(peer.port, far_address=300))
            return await _run_check(path)

    rc, out = run(main())
    assert rc == 1
    failures = [line for line in out.splitlines() if line.startswith("  press.")]
    assert failures == ["  press.pressure: plc unit 1: exception 2 to read_holding_registers 300"]


def test_check_reports_config_errors(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text(_toml(502).replace('type = "float32"', 'type = "float33"'))
    rc, out = run(_run_check(path))
    assert rc == 2
    assert 'agent.toml: devices[0].tags[1] "pressure".type = \'float33\'' in out


def test_check_in_process_with_a_serial_sensor(tmp_path):
    async def main():
        async with ModbusPeer() as peer:
            with open_pty_writer() as sensor:
                path = tmp_path / "agent.toml"
                path.write_text(_toml(peer.port, serial=sensor.path))
                cfg = load_config(load_toml(str(path)), file=str(path))
                task = asyncio.ensure_future(check(cfg, line_wait_s=10))

                while not task.done():
                    sensor.write_line("rms=0.75")
                    await asyncio.sleep(0.05)
                return await task

    report = run(main())
    assert report.ok, report.failures
    rows = {r.tag: r for r in report.rows}
    assert rows["rms"].value == 0.75 and rows["rms"].raw == ("0.75",)
    assert "vib     rms" in format_report(report)
