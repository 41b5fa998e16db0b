"""fedgate-sim served over Modbus TCP (in-process) and read with a plain pymodbus client."""
from __future__ import annotations

import io
import struct
import time

import pytest
from pymodbus.client import ModbusTcpClient

from fedgate.drivers.sim import regmap
from fedgate.drivers.sim.cli import CSV_COLUMNS, dump_csv
from fedgate.drivers.sim.plant import PROFILES, Plant
from fedgate.drivers.sim.server import PlantServer, ServerThread

UNIT = 7


def _f32(regs, order="ABCD"):
    words = [r.to_bytes(2, "big") for r in regs]
    if order == "CDAB":
        words.reverse()
    elif order == "BADC":
        words = [w[::-1] for w in words]
    elif order == "DCBA":
        words = [w[::-1] for w in reversed(words)]
    return struct.unpack(">f", b"".join(words))[0]


def _u(regs):
    v = 0
    for r in regs:
        v = (v << 16) | r
    return v


@pytest.fixture
def sim():
    plant = Plant([PROFILES["standard"], PROFILES["heavy"]], seed=11)
    with ServerThread(PlantServer(plant, unit_id=UNIT, speed=0)) as srv:
        client = ModbusTcpClient("127.0.0.1", port=srv.tcp_port, timeout=10)
        assert client.connect()
        try:
            yield srv, client
        finally:
            client.close()


def _inputs(client, unit):
    rr = client.read_input_registers(0, count=regmap.INPUT_COUNT, device_id=unit)
    assert not rr.isError(), rr
    return rr.registers


@pytest.mark.parametrize("machine", [0, 1])
def test_decoded_registers_match_the_plant_state(sim, machine):
    srv, client = sim
    srv.call(srv.server.advance(250))
    regs = _inputs(client, UNIT + machine)
    truth = srv.call(_values(srv.server, machine))
    assert _u(regs[60:64]) == truth["step"] == 251
    for i, name in enumerate(["temperature_c", "vibration_mm_s", "current_a", "power_kw", "speed_rpm",
                              "pressure_bar", "load_pct", "health"]):
        assert _f32(regs[2 * i : 2 * i + 2]) == pytest.approx(truth[name], rel=1e-6)
        assert _f32(regs[20 + 2 * i : 22 + 2 * i], "CDAB") == pytest.approx(truth[name], rel=1e-6)
    assert struct.unpack(">h", regs[40].to_bytes(2, "big"))[0] == round(truth["temperature_c"] * 10)
    assert regs[41] == round(truth["vibration_mm_s"] * 100)
    assert regs[44] == round(truth["speed_rpm"])
    assert regs[47] == round(truth["health"] * 10000)
    assert _u(regs[50:52]) == _u(regs[52:56]) == round(truth["energy_wh"]) > 0
    assert _u(regs[72:74][::-1]) == round(truth["energy_wh"])
    assert struct.unpack(">d", b"".join(r.to_bytes(2, "big") for r in regs[64:68]))[0] == truth["temperature_c"]
    assert _f32(regs[68:70], "BADC") == pytest.approx(truth["vibration_mm_s"], rel=1e-6)
    assert _f32(regs[70:72], "DCBA") == pytest.approx(truth["vibration_mm_s"], rel=1e-6)
    assert struct.unpack(">i", b"".join(r.to_bytes(2, "big") for r in regs[74:76]))[0] == round(truth["temperature_c"] * 100)
    assert b"".join(r.to_bytes(2, "big") for r in regs[76:84]).rstrip(b"\0").decode() == ("standard", "heavy")[machine]
    assert _u(regs[56:58]) == truth["fault_count"]


async def _values(server, machine):
    return server.machine_values(machine)


def test_fault_shows_on_discrete_input_and_status_word(sim):
    srv, client = sim
    plant = srv.server.plant
    for _ in range(200):
        if plant.fault[1]:
            break
        srv.call(srv.server.advance(50))
    assert plant.fault[1], "the heavy machine faults within 10000 steps"
    assert client.read_discrete_inputs(0, count=2, device_id=UNIT + 1).bits[:2] == [True, True]
    assert _inputs(client, UNIT + 1)[48] & (regmap.STATUS_FAULT | regmap.STATUS_DEGRADED) == 3
    assert client.read_discrete_inputs(0, count=1, device_id=UNIT).bits[0] == bool(plant.fault[0])


def test_maintenance_coil_resets_health(sim):
    srv, client = sim
    srv.call(srv.server.advance(600))
    regs = _inputs(client, UNIT + 1)
    health_before, maint_before = _f32(regs[14:16]), _u(regs[58:60])
    assert health_before < 0.9
    assert not client.write_coil(regmap.COIL_MAINTENANCE, True, device_id=UNIT + 1).isError()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        regs = _inputs(client, UNIT + 1)
        if _f32(regs[14:16]) == 1.0:
            break
        time.sleep(0.01)
    assert _f32(regs[14:16]) == 1.0 and _u(regs[58:60]) == maint_before + 1
    assert srv.server.maintenance_requests == 1
    assert client.read_coils(0, count=1, device_id=UNIT + 1).bits[0] is False  # acknowledged
    assert _f32(_inputs(client, UNIT)[14:16]) < 0.9  # the other machine is untouched


def test_prediction_write_back_and_alarm_coil(sim):
    srv, client = sim
    regs = list(struct.unpack(">HH", struct.pack(">f", 0.8125)))
    assert not client.write_registers(0, regs, device_id=UNIT).isError()
    assert not client.write_registers(2, regs[::-1], device_id=UNIT).isError()
    assert not client.write_register(4, 8125, device_id=UNIT).isError()
    back = client.read_holding_registers(0, count=5, device_id=UNIT).registers
    assert _f32(back[0:2]) == 0.8125 and _f32(back[2:4], "CDAB") == 0.8125 and back[4] == 8125
    assert srv.call(srv.server.read_holding(0, 0, 2)) == regs
    assert client.read_holding_registers(0, count=2, device_id=UNIT + 1).registers == [0, 0]
    assert not client.write_coil(regmap.COIL_ALARM, True, device_id=UNIT).isError()
    assert client.read_coils(0, count=2, device_id=UNIT).bits[:2] == [False, True]
    srv.call(srv.server.advance(1))
    assert _inputs(client, UNIT)[48] & regmap.STATUS_ALARM
    assert srv.server.writes == 4


def test_out_of_map_addresses_are_refused(sim):
    _, client = sim
    rr = client.read_input_registers(regmap.INPUT_COUNT - 1, count=2, device_id=UNIT)
    assert rr.isError() and rr.exception_code == 2
    rr = client.read_holding_registers(regmap.HOLDING_COUNT, count=1, device_id=UNIT)
    assert rr.isError() and rr.exception_code == 2


def test_dump_csv_matches_served_values(sim):
    srv, client = sim
    out = io.StringIO()
    dump_csv(Plant([PROFILES["standard"], PROFILES["heavy"]], seed=11), 400, 60.0, out, unit_id=UNIT)
    rows = [r.split(",") for r in out.getvalue().splitlines()[1:]]
    col = CSV_COLUMNS.index
    for target in (57, 400):
        srv.call(srv.server.advance(target - srv.server.plant.step_count))
        for m in (0, 1):
            regs = _inputs(client, UNIT + m)
            row = rows[2 * (target - 1) + m]
            assert int(row[col("step")]) == _u(regs[60:64]) == target
            assert int(row[col("unit_id")]) == UNIT + m
            assert _f32(regs[2:4]) == pytest.approx(float(row[col("vibration_mm_s")]), rel=1e-6)
            assert _f32(regs[0:2]) == pytest.approx(float(row[col("temperature_c")]), rel=1e-6)
            assert _u(regs[52:56]) == round(float(row[col("energy_wh")]))


def test_clock_advances_with_speed():
    plant = Plant([PROFILES["light"]], seed=0)
    with ServerThread(PlantServer(plant, speed=2000, tick_s=0.01)) as srv:
        client = ModbusTcpClient("127.0.0.1", port=srv.tcp_port, timeout=10)
        assert client.connect()
        try:
            first = _u(_inputs(client, 1)[60:64])
            deadline = time.monotonic() + 20
            last = first
            while last < first + 1000 and time.monotonic() < deadline:
                time.sleep(0.02)
                last = _u(_inputs(client, 1)[60:64])
            assert last >= first + 1000
        finally:
            client.close()


def test_server_arguments_are_checked():
    plant = Plant([PROFILES["standard"]])
    with pytest.raises(ValueError, match="unit_id"):
        PlantServer(plant, unit_id=0)
    with pytest.raises(ValueError, match="speed"):
        PlantServer(plant, speed=-1)


def test_unknown_unit_id_is_a_missing_device(sim):
    _, client = sim
    rr = client.read_input_registers(0, count=2, device_id=UNIT + 5)
    assert rr.isError() and rr.exception_code == 0x0B  # gateway target failed to respond
    assert not client.read_input_registers(0, count=2, device_id=UNIT).isError()  # still serving


def test_docstring_examples_run():
    import doctest

    from fedgate.drivers.sim import server as server_mod

    result = doctest.testmod(server_mod)
    assert result.attempted >= 2 and result.failed == 0


def test_port_in_use_raises_a_driver_error():
    import socket

    from fedgate.core.errors import DriverError

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        srv = ServerThread(PlantServer(Plant([PROFILES["standard"]]), speed=0), tcp=("127.0.0.1", port))
        with pytest.raises(DriverError, match=str(port)):
            srv.start()
