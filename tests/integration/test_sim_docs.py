"""docs/simulated-plant.md tells the truth: its tables are the code's, its agent.toml reads the plant."""
from __future__ import annotations

import asyncio
import re
import struct
from pathlib import Path

import pytest

from fedgate.core.config import load_toml
from fedgate.drivers import check, load_config
from fedgate.drivers.sim import regmap
from fedgate.drivers.sim.plant import PROFILES, Plant
from fedgate.drivers.sim.ptylink import PtyLink, open_pty_writer
from fedgate.drivers.sim.sensor import SensorEmitter
from fedgate.drivers.sim.server import PlantServer, ServerThread

DOC = Path(__file__).resolve().parents[2] / "docs" / "simulated-plant.md"


def _toml_snippet() -> str:
    text = DOC.read_text()
    start = text.index("## agent.toml for the simulated plant")
    m = re.search(r"```toml\n(.*?)```", text[start:], re.S)
    assert m
    return m.group(1)


def test_register_tables_in_the_doc_are_the_code_tables():
    text = DOC.read_text()
    for fields, table in ((regmap.INPUT_FIELDS, "input"), (regmap.HOLDING_FIELDS, "holding")):
        for line in regmap.markdown_table(fields, table).splitlines()[2:]:
            assert line in text, f"docs/simulated-plant.md lacks: {line}"
    for addr, name, _ in regmap.COILS:
        assert f"| {addr} | coil | bool | `{name}` |" in text
    for addr, name, _ in regmap.DISCRETE_INPUTS:
        assert f"| {addr} | discrete | bool | `{name}` |" in text
    for p in PROFILES.values():
        assert f"| `{p.name}` | {p.kind.value} | {p.load:g} ± {p.load_swing:g} | {p.ambient_c:g} | {p.life_min:g} |" in text


def _f32(x: float) -> float:
    return struct.unpack(">f", struct.pack(">f", x))[0]


def test_doc_agent_toml_reads_both_plants_and_the_sensor(tmp_path):
    plc, vib = tmp_path / "plc2", tmp_path / "vib2"
    snippet = (_toml_snippet().replace("port = 5020", "port = {port}")
               .replace("/tmp/fedgate-plc2", str(plc)).replace("/tmp/fedgate-vib2", str(vib)))
    plant1 = Plant([PROFILES["standard"]], seed=21)
    plant2 = Plant([PROFILES["new-line"]], seed=22)
    with ServerThread(PlantServer(plant1, speed=0)) as tcp, PtyLink(b_link=str(plc)) as link, \
            ServerThread(PlantServer(plant2, speed=0), rtu=link.a_tty) as rtu, open_pty_writer(str(vib)) as writer:
        tcp.call(tcp.server.advance(300))
        rtu.call(rtu.server.advance(40))
        stream = rtu.submit(SensorEmitter(plant2, "nmea").stream(writer, 20.0))
        try:
            path = tmp_path / "agent.toml"
            path.write_text(snippet.replace("{port}", str(tcp.tcp_port)))
            doc = load_toml(str(path))
            load_config(doc, file=str(path))  # the whole fragment is valid as written
            # Modbus devices and the serial sensor are checked in two passes
            got = {}
            for serial_line in (False, True):
                names = {t["name"] for t in doc["transports"] if (t["kind"] == "serial-line") == serial_line}
                part = {"transports": [t for t in doc["transports"] if t["name"] in names],
                        "devices": [d for d in doc["devices"] if d["transport"] in names]}
                report = asyncio.run(check(load_config(part, file=str(path)), line_wait_s=20.0))
                assert report.ok, report.failures
                got.update({f"{r.device}.{r.tag}": r.value for r in report.rows})
        finally:
            stream.cancel()
    v1, v2 = plant1.values, plant2.values
    assert got["pump1.temperature"] == _f32(v1["temperature_c"][0])
    assert got["pump1.vibration"] == _f32(v1["vibration_mm_s"][0])
    assert got["pump1.power"] == _f32(v1["power_kw"][0])
    assert got["pump1.speed"] == round(v1["speed_rpm"][0])
    assert got["pump1.pressure"] == pytest.approx(round(v1["pressure_bar"][0] * 100) * 0.01)
    assert got["pump1.load"] == pytest.approx(round(v1["load_pct"][0] * 10) * 0.1)
    assert got["pump1.energy"] == round(v1["energy_wh"][0])
    assert got["pump1.fault"] is bool(plant1.fault[0]) and got["pump1.alarm"] is False
    assert got["pump1.prediction"] == 0.0
    assert got["pump2.temperature"] == _f32(v2["temperature_c"][0])
    assert got["pump2.vibration"] == pytest.approx(round(v2["vibration_mm_s"][0] * 100) * 0.01)
    assert got["pump2.fault"] is False
    assert got["vib2.vibration"] == pytest.approx(v2["vibration_mm_s"][0], abs=1e-3)
    assert got["vib2.temperature"] == pytest.approx(v2["temperature_c"][0], abs=1e-2)
