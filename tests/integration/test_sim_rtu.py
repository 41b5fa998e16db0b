"""The plant over Modbus RTU on a PtyLink, in-process: an RS485 line with two units."""
from __future__ import annotations

import struct

import pytest
from pymodbus.client import ModbusSerialClient
from pymodbus.exceptions import ModbusException

from fedgate.drivers.sim.plant import PROFILES, Plant
from fedgate.drivers.sim.ptylink import PtyLink
from fedgate.drivers.sim.server import PlantServer, ServerThread


def test_rtu_two_units_on_one_line(tmp_path):
    plant = Plant([PROFILES["light"], PROFILES["standard"]], seed=5)
    with PtyLink(b_link=str(tmp_path / "rs485")) as link, \
            ServerThread(PlantServer(plant, unit_id=10, speed=0), rtu=link.a_tty) as srv:
        srv.call(srv.server.advance(99))
        client = ModbusSerialClient(link.b_path, baudrate=19200, timeout=5, retries=3)
        assert client.connect()
        try:
            for machine in (0, 1):
                rr = client.read_input_registers(0, count=64, device_id=10 + machine)
                assert not rr.isError(), rr
                temp = struct.unpack(">f", struct.pack(">HH", *rr.registers[0:2]))[0]
                assert temp == struct.unpack(">f", struct.pack(">f", plant.values["temperature_c"][machine]))[0]
                assert rr.registers[60:64] == [0, 0, 0, 100]
            assert not client.write_coil(0, True, device_id=11).isError()
            assert plant.health[1] == 1.0 and plant.health[0] < 1.0
            assert client.read_discrete_inputs(0, count=2, device_id=10).bits[:2] == [bool(plant.fault[0]), bool(plant.health[0] < 0.5)]
        finally:
            client.close()
        # a unit that is not on the line stays silent, and the line keeps working
        quiet = ModbusSerialClient(link.b_path, baudrate=19200, timeout=0.3, retries=0)
        assert quiet.connect()
        try:
            with pytest.raises(ModbusException):
                quiet.read_input_registers(0, count=2, device_id=42)
            assert not quiet.read_input_registers(0, count=2, device_id=10).isError()
        finally:
            quiet.close()
    assert link.bytes_a_to_b > 0 and link.bytes_b_to_a > 0


def test_unopenable_port_raises_a_driver_error_and_leaks_nothing(tmp_path):
    from fedgate.core.errors import DriverError

    srv = ServerThread(PlantServer(Plant([PROFILES["standard"]]), speed=0), rtu=str(tmp_path / "no-such-tty"))
    with pytest.raises(DriverError, match="no-such-tty"):
        srv.start()
    srv.close()  # harmless after a failed start
