"""Register map encoding (every type and byte order) and the sensor's line formats."""
from __future__ import annotations

import doctest
import struct

import numpy as np
import pytest

from fedgate.drivers.sim import regmap, sensor
from fedgate.drivers.sim.plant import PROFILES, Plant
from fedgate.drivers.sim.regmap import HOLDING_FIELDS, INPUT_COUNT, INPUT_FIELDS, decode, encode
from fedgate.drivers.sim.sensor import SensorEmitter, SensorFormat, nmea_checksum


@pytest.mark.parametrize("order", ["ABCD", "CDAB", "BADC", "DCBA"])
@pytest.mark.parametrize("type_,value", [("float32", -3.25), ("float64", 1e10 / 3), ("int32", -123456),
                                         ("uint32", 4_000_000_000), ("int64", -(2**40) - 5), ("uint64", 2**63 + 7)])
def test_round_trip_every_type_and_order(type_, order, value):
    regs = encode(value, type_, order)
    assert all(0 <= r <= 0xFFFF for r in regs)
    assert decode(regs, type_, order) == pytest.approx(value, rel=1e-7)


def test_byte_orders_against_struct():
    be = struct.pack(">f", 12.5)  # A B C D
    a, b, c, d = be
    assert encode(12.5, "float32", "ABCD") == [a << 8 | b, c << 8 | d]
    assert encode(12.5, "float32", "CDAB") == [c << 8 | d, a << 8 | b]
    assert encode(12.5, "float32", "BADC") == [b << 8 | a, d << 8 | c]
    assert encode(12.5, "float32", "DCBA") == [d << 8 | c, b << 8 | a]


def test_integers_scale_round_and_saturate():
    assert encode(21.37, "int16", scale=0.1) == [214]
    assert decode([214], "int16", scale=0.1) == pytest.approx(21.4)
    assert encode(-5, "uint16") == [0] and encode(70000, "uint16") == [0xFFFF]
    assert encode(-40000, "int16") == [0x8000]
    assert decode(encode("new-line", "string", length=8), "string") == "new-line"
    assert len(encode("x" * 40, "string", length=8)) == 8


def test_map_fields_do_not_overlap_and_fit():
    for fields, count in ((INPUT_FIELDS, INPUT_COUNT), (HOLDING_FIELDS, regmap.HOLDING_COUNT)):
        used = np.zeros(count, dtype=int)
        for f in fields:
            assert f.address + f.count <= count, f
            used[f.address : f.address + f.count] += 1
        assert used.max() == 1


def test_encode_inputs_of_a_live_plant():
    plant = Plant([PROFILES["standard"]], seed=0)
    plant.step(10)
    vals = {k: float(v[0]) for k, v in plant.values.items()}
    vals.update(health=float(plant.health[0]), status=5, fault_count=2, maintenance_count=1, step=10, profile="standard")
    regs = regmap.encode_inputs(vals)
    assert len(regs) == INPUT_COUNT
    assert decode(regs[2:4], "float32") == pytest.approx(vals["vibration_mm_s"], rel=1e-6)
    assert regs[48] == 5 and decode(regs[60:64], "uint64") == 10


def test_markdown_table_lists_every_field():
    table = regmap.markdown_table(INPUT_FIELDS, "input")
    assert table.count("\n") == len(INPUT_FIELDS) + 2
    assert "| 0-1 | input | float32 | ABCD | degC | - | `temperature_c` |" in table
    assert "| 40 | input | int16 | - | degC | 0.1 | `temperature_x10` |" in table


def test_sensor_lines_in_every_format():
    plant = Plant([PROFILES["standard"]], seed=1)
    plant.step(3)
    vib, temp = plant.values["vibration_mm_s"][0], plant.values["temperature_c"][0]
    nmea = SensorEmitter(plant, "nmea").format_reading()
    body, cs = nmea[1:].split("*")
    assert body == f"FGVIB,{vib:.3f},{temp:.2f},3" and cs == nmea_checksum(body)
    assert SensorEmitter(plant, SensorFormat.KV).format_reading() == f"vib_rms={vib:.3f} temp_c={temp:.2f} step=3"
    assert SensorEmitter(plant, "csv").format_reading() == f"{vib:.3f},{temp:.2f},3"


def test_garbage_is_seeded_and_at_the_asked_rate():
    plant = Plant([PROFILES["standard"]], seed=1)
    plant.step()
    a = SensorEmitter(plant, "nmea", garbage_rate=0.25, seed=3)
    b = SensorEmitter(plant, "nmea", garbage_rate=0.25, seed=3)
    lines_a = [a.next_line() for _ in range(2000)]
    assert lines_a == [b.next_line() for _ in range(2000)]
    plant_line = SensorEmitter(plant, "nmea").format_reading().encode()
    bad = [ln for ln in lines_a if ln != plant_line]
    assert a.garbage_lines == len(bad) and 400 < len(bad) < 600
    assert any(len(ln) > 200 for ln in bad) and b"" in bad and any(not ln.isascii() for ln in bad)
    assert all(b"\n" not in ln for ln in bad)
    clean = SensorEmitter(plant, "kv")
    assert all(clean.next_line() == clean.format_reading().encode() for _ in range(100))
    with pytest.raises(ValueError):
        SensorEmitter(plant, garbage_rate=2)
    with pytest.raises(ValueError):
        SensorEmitter(plant, machine=1)


def test_docstring_examples_run():
    for mod in (regmap, sensor):
        result = doctest.testmod(mod)
        assert result.attempted >= 1 and result.failed == 0
