"""Modbus TCP acquisition against a real pymodbus server on 127.0.0.1."""
from __future__ import annotations

import math

import pytest
from drivers_peers import ModbusPeer, run, tcp_doc, wait_until

from fedgate.core.errors import ConfigError, DeviceException
from fedgate.drivers import Acquisition, ByteOrder, DataType, Quality, codec_for, load_config, plan_device

# every numeric type, with a value that fits it
NUMERIC = [
    ("int8l", -5), ("int8h", -100), ("uint8l", 200), ("uint8h", 7),
    ("int16", -12345), ("uint16", 54321), ("int32", -123456789), ("uint32", 4000000000),
    ("int64", -(2**62) + 3), ("uint64", 2**63 + 5), ("float16", 1.5), ("float32", -2.75), ("float64", math.pi),
]


@pytest.mark.parametrize("order", [o.value for o in ByteOrder])
def test_every_type_and_byte_order_round_trips_through_a_real_server(order):
    # Arrange: one tag of each type at its own address, written by the peer in `order`
    tags, address, expected = [], 0, {}
    for dtype, value in NUMERIC:
        tags.append({"name": dtype, "register": "holding", "address": address, "type": dtype})
        expected[dtype] = (address, value)
        address += codec_for(dtype).count
    tags.append({"name": "flag", "register": "holding", "address": address, "type": "bit", "bit": 13})
    tags.append({"name": "label", "register": "holding", "address": address + 1, "type": "string", "length": 3})
    tags.append({"name": "run", "register": "coil", "address": 9, "type": "bool"})

    async def main():
        async with ModbusPeer() as peer:
            for dtype, (addr, value) in expected.items():
                await peer.set("holding", addr, list(codec_for(dtype, order).encode(value)))
            await peer.set("holding", address, [1 << 13])
            await peer.set("holding", address + 1, list(codec_for("string", order, length=3).encode("ab1")))
            await peer.set("coil", 9, [True])
            cfg = load_config(tcp_doc(peer.port, tags, byte_order=order), file="agent.toml")
            acq = Acquisition(cfg)
            values, failed = await acq.poll_device(cfg.devices[0])
            await acq.stop()
            return {v.name.split(".")[1]: v for v in values}, failed

    got, failed = run(main())
    # Assert
    assert not failed
    for dtype, (_, value) in expected.items():
        assert got[dtype].quality is Quality.GOOD, dtype
        assert got[dtype].value == value, (dtype, got[dtype].raw)
    assert got["flag"].value is True
    assert got["label"].value == "ab1"
    assert got["run"].value is True and got["run"].raw == (True,)


def test_plan_promises_the_requests_the_server_sees():
    tags = [
        {"name": "a", "register": "holding", "address": 0, "type": "float32"},
        {"name": "b", "register": "holding", "address": 4, "type": "int16"},
        {"name": "c", "register": "holding", "address": 100, "type": "uint32"},
        {"name": "d", "register": "input", "address": 10, "type": "int16", "scale": 0.1},
        {"name": "e", "register": "input", "address": 11, "type": "int16"},
        {"name": "f", "register": "coil", "address": 3, "type": "bool"},
        {"name": "g", "register": "coil", "address": 300, "type": "bool"},
    ]

    async def main():
        async with ModbusPeer() as peer:
            cfg = load_config(tcp_doc(peer.port, tags, max_gap=8), file="agent.toml")
            plan = plan_device(cfg.devices[0])
            acq = Acquisition(cfg)
            for _ in range(3):
                _, failed = await acq.poll_device(cfg.devices[0])
                assert not failed
            await acq.stop()
            return plan, peer.reads()

    plan, seen = run(main())
    assert len(plan.requests) == 5  # holding 0..5, holding 100..101, input 10..11, coil 3, coil 300
    assert len(seen) == 3 * len(plan.requests)
    promised = [(1, {"coil": 1, "holding": 3, "input": 4}[r.table.value], r.start) for r in plan.requests]
    assert sorted((u, fc, a) for u, fc, a, _ in seen[:5]) == sorted(promised)


def test_poll_loop_publishes_scaled_values_and_stays_up():
    tags = [{"name": "temp", "register": "input", "address": 2, "type": "int16", "scale": 0.1, "offset": -5.0,
             "unit": "degC", "min": -20.0, "max": 40.0},
            {"name": "hot", "register": "input", "address": 3, "type": "int16", "max": 100.0}]
    batches = []

    async def main():
        async with ModbusPeer() as peer:
            await peer.set("input", 2, [215])
            await peer.set("input", 3, [150])
            acq = Acquisition(load_config(tcp_doc(peer.port, tags), file="agent.toml"), on_values=batches.append)
            await acq.start()
            try:
                await wait_until(lambda: len(batches) >= 3, what="three cycles")
                return acq.latest(), acq.status()
            finally:
                await acq.stop()

    latest, status = run(main())
    temp = latest["m1.temp"]
    assert temp.value == pytest.approx(16.5) and temp.unit == "degC" and temp.raw == (215,)
    assert temp.quality is Quality.GOOD
    assert latest["m1.hot"].quality is Quality.BAD_RANGE
    assert status["m1"]["state"] == "up" and status["m1"]["requests"] >= 3
    assert sum(status["m1"]["errors"].values()) == 0
    assert status["m1"]["last_cycle_ms"] > 0 and status["m1"]["backoff_s"] == 0.0


def test_a_failed_request_only_affects_its_own_tags():
    # address 500 lies outside the peer's 400 registers: exception 2 for that request only
    tags = [{"name": "ok", "register": "holding", "address": 1, "type": "uint16"},
            {"name": "bad", "register": "holding", "address": 500, "type": "uint16"},
            {"name": "also_ok", "register": "input", "address": 1, "type": "uint16"}]

    async def main():
        async with ModbusPeer() as peer:
            await peer.set("holding", 1, [42])
            await peer.set("input", 1, [43])
            cfg = load_config(tcp_doc(peer.port, tags), file="agent.toml")
            acq = Acquisition(cfg)
            values, failed = await acq.poll_device(cfg.devices[0])
            status = acq.status()["m1"]
            await acq.stop()
            return {v.name: v for v in values}, failed, status

    got, failed, status = run(main())
    assert not failed
    assert got["m1.ok"].value == 42 and got["m1.also_ok"].value == 43
    assert got["m1.bad"].quality is Quality.ERROR and got["m1.bad"].value is None
    assert status["errors"]["exception"] == 1 and "exception 2" in status["last_error"]


@pytest.mark.parametrize("dtype,order,value,scale,offset", [
    ("int16", "ABCD", -12.5, 0.5, 0.0),
    ("uint32", "CDAB", 1234.5, 0.1, 100.0),
    ("float32", "DCBA", 3.25, 1.0, 0.0),
    ("float64", "BADC", -1e-3, 1.0, 0.0),
    ("int64", "DCBA", -77, 1.0, 0.0),
    ("float16", "BADC", 0.5, 2.0, 0.0),
    ("uint8h", "ABCD", 17, 1.0, 0.0),
    ("int8l", "ABCD", -3, 1.0, 0.0),
])
def test_write_back_encodes_like_the_read_and_reads_back(dtype, order, value, scale, offset):
    tags = [{"name": "sp", "register": "holding", "address": 20, "type": dtype, "byte_order": order,
             "scale": scale, "offset": offset, "writable": True},
            {"name": "neighbour", "register": "holding", "address": 20 if "8" in dtype else 30,
             "type": "uint8l" if dtype.endswith("h") else ("uint8h" if dtype.endswith("l") else "uint16")}]

    async def main():
        async with ModbusPeer() as peer:
            await peer.set("holding", 20, [0xA5A5] * 4)
            await peer.set("holding", 30, [0xA5A5])
            cfg = load_config(tcp_doc(peer.port, tags), file="agent.toml")
            acq = Acquisition(cfg)
            await acq.write("m1.sp", value)
            values, _ = await acq.poll_device(cfg.devices[0])
            wire = [fc for _, fc, _, _ in peer.requests if fc not in (3, 4)]
            await acq.stop()
            return {v.name: v for v in values}, wire

    got, wire = run(main())
    assert got["m1.sp"].value == pytest.approx(value, rel=1e-6)
    assert got["m1.neighbour"].value == (0xA5 if "8" in dtype else 0xA5A5)  # untouched
    assert wire == ([6] if codec_for(dtype).count == 1 else [16])


def test_write_coil_uses_fc05_and_refuses_read_only_tags():
    tags = [{"name": "pump", "register": "coil", "address": 5, "type": "bool", "writable": True},
            {"name": "speed", "register": "holding", "address": 0, "type": "uint16"}]

    async def main():
        async with ModbusPeer() as peer:
            cfg = load_config(tcp_doc(peer.port, tags), file="agent.toml")
            acq = Acquisition(cfg)
            await acq.write("m1.pump", True)
            with pytest.raises(ConfigError, match="not writable"):
                await acq.write("m1.speed", 3)
            with pytest.raises(ConfigError, match="no such tag"):
                await acq.write("m1.nope", 3)
            bits = await peer.get("coil", 5, 1)
            await acq.stop()
            return bits, [fc for _, fc, _, _ in peer.requests]

    bits, fcs = run(main())
    assert bits == [True]
    assert fcs == [5]


def test_write_refused_by_the_device_raises_a_driver_error():
    tags = [{"name": "far", "register": "holding", "address": 1000, "type": "uint16", "writable": True}]

    async def main():
        async with ModbusPeer() as peer:
            acq = Acquisition(load_config(tcp_doc(peer.port, tags), file="agent.toml"))
            try:
                with pytest.raises(DeviceException) as info:
                    await acq.write("m1.far", 1)
                return info.value.code
            finally:
                await acq.stop()

    assert run(main()) == 2


def test_pymodbus_contract_coil_bit_order_and_device_id():
    """Pins what the adapter relies on: coil i is bits[i]; device_id= selects the unit."""
    from pymodbus.client import AsyncModbusTcpClient

    async def main():
        async with ModbusPeer(units=(1, 2)) as peer:
            await peer.set("coil", 0, [True, False, False, True, False, False, False, False, False, True], unit=2)
            await peer.set("holding", 7, [1234], unit=2)
            client = AsyncModbusTcpClient("127.0.0.1", port=peer.port, timeout=2, retries=0, reconnect_delay=0)
            await client.connect()
            try:
                coils2 = (await client.read_coils(0, count=10, device_id=2)).bits[:10]
                coils1 = (await client.read_coils(0, count=10, device_id=1)).bits[:10]
                hr2 = (await client.read_holding_registers(7, count=1, device_id=2)).registers
            finally:
                client.close()
            return coils1, coils2, hr2

    coils1, coils2, hr2 = run(main())
    assert coils2 == [True, False, False, True, False, False, False, False, False, True]
    assert coils1 == [False] * 10
    assert hr2 == [1234]


def test_decode_matches_numpy_views_for_plain_orders():
    # ABCD is big endian words; DCBA is the full little-endian reverse
    import numpy as np
    regs = (0x4049, 0x0FDB)
    assert codec_for(DataType.FLOAT32, "ABCD").decode(regs) == np.array(regs, ">u2").view(">f4")[0]
    # little-endian bytes of the float, read as big-endian words off the wire
    le = tuple(int(x) for x in np.frombuffer(np.float32(3.1415927).astype("<f4").tobytes(), ">u2"))
    assert codec_for(DataType.FLOAT32, "DCBA").decode(le) == np.float32(3.1415927)
