"""Our own register codec and the request planner (no network)."""
from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgate.drivers import ByteOrder, DataType, codec_for, load_config, plan_device

ORDERS = [o.value for o in ByteOrder]


def test_known_wire_images_of_a_float32():
    # 123.456 = 0x42F6E979 -> bytes A=42 B=F6 C=E9 D=79
    expect = {"ABCD": (0x42F6, 0xE979), "DCBA": (0x79E9, 0xF642), "BADC": (0xF642, 0x79E9), "CDAB": (0xE979, 0x42F6)}
    for order, regs in expect.items():
        codec = codec_for("float32", order)
        assert codec.encode(123.456) == regs, order
        assert codec.decode(regs) == pytest.approx(123.456, rel=1e-7)


def test_sixteen_bit_orders_swap_bytes_only_for_dcba_and_badc():
    assert codec_for("uint16", "ABCD").decode((0x1234,)) == 0x1234
    assert codec_for("uint16", "CDAB").decode((0x1234,)) == 0x1234
    assert codec_for("uint16", "DCBA").decode((0x1234,)) == 0x3412
    assert codec_for("uint16", "BADC").decode((0x1234,)) == 0x3412


def test_eight_bit_bits_strings_and_half_floats():
    assert codec_for("int8l").decode((0x12FE,)) == -2
    assert codec_for("uint8h").decode((0xFE12,)) == 0xFE
    assert codec_for("bit", bit=15).decode((0x8000,)) is True
    assert codec_for("bit", bit=0).decode((0x8000,)) is False
    assert codec_for("string", length=3).decode((0x6869, 0x2100, 0x4142)) == "hi!"
    assert codec_for("string", "BADC", length=1).decode((0x6968,)) == "hi"
    assert codec_for("float16").decode(struct.unpack(">H", struct.pack(">e", -0.75))) == -0.75
    # writing a sub-register type keeps the other bits of the register
    assert codec_for("uint8h").encode(0xAB, current=0x1234) == (0xAB34,)
    assert codec_for("bit", bit=1).encode(False, current=0xFFFF) == (0xFFFD,)


def test_scale_and_offset_apply_both_ways():
    codec = codec_for("int16", scale=0.1, offset=-40.0)
    assert codec.decode((650,)) == pytest.approx(25.0)
    assert codec.encode(25.0) == (650,)
    assert isinstance(codec_for("int16").decode((7,)), int)


@pytest.mark.parametrize("dtype,value", [("uint16", -1), ("int8l", 128), ("uint32", 2**32), ("float16", 1e6),
                                         ("int16", math.nan), ("string", 5), ("bool", 2)])
def test_encode_refuses_values_that_do_not_fit(dtype, value):
    with pytest.raises(ValueError):
        codec_for(dtype, length=1).encode(value)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(order=st.sampled_from(ORDERS), value=st.integers(-(2**63), 2**63 - 1))
def test_int64_round_trip_every_order(order, value):
    codec = codec_for("int64", order)
    regs = codec.encode(value)
    assert len(regs) == 4 and all(0 <= r <= 0xFFFF for r in regs)
    assert codec.decode(regs) == value


@settings(max_examples=200, deadline=None, derandomize=True)
@given(order=st.sampled_from(ORDERS), value=st.floats(allow_nan=False, width=64))
def test_float64_round_trip_every_order(order, value):
    codec = codec_for("float64", order)
    assert codec.decode(codec.encode(value)) == value


def test_every_type_has_a_register_count():
    counts = {d: codec_for(d, length=5).count for d in DataType}
    assert counts[DataType.FLOAT64] == 4 and counts[DataType.INT32] == 2 and counts[DataType.STRING] == 5
    assert counts[DataType.BOOL] == 1 and counts[DataType.INT8H] == 1


def _device(tags, **kw):
    dev = {"name": "m", "transport": "t", "tags": tags}
    dev.update(kw)
    doc = {"transports": [{"name": "t", "kind": "modbus-tcp", "host": "127.0.0.1"}], "devices": [dev]}
    return load_config(doc, file="agent.toml").devices[0]


def _h(name, address, dtype="uint16", **kw):
    return {"name": name, "register": "holding", "address": address, "type": dtype, **kw}


def test_plan_merges_within_max_gap_only():
    dev = _device([_h("a", 0), _h("b", 5), _h("c", 20)], max_gap=4)
    spans = [(r.start, r.count) for r in plan_device(dev).requests]
    assert spans == [(0, 6), (20, 1)]
    dev = _device([_h("a", 0), _h("b", 5), _h("c", 20)], max_gap=14)
    assert [(r.start, r.count) for r in plan_device(dev).requests] == [(0, 21)]


def test_plan_respects_the_register_cap_and_never_splits_a_tag():
    tags = [_h(f"t{i}", i * 4, "float64") for i in range(100)]  # 400 contiguous registers
    plan = plan_device(_device(tags, max_registers_per_request=125))
    assert [r.count for r in plan.requests] == [124, 124, 124, 28]
    assert all(p.offset + p.count <= r.count for r in plan.requests for p in r.tags)
    assert sum(len(r.tags) for r in plan.requests) == 100


def test_plan_bits_cap_and_tables_are_separate():
    tags = [{"name": f"c{i}", "register": "coil", "address": i * 10, "type": "bool"} for i in range(30)]
    tags.append({"name": "d0", "register": "discrete", "address": 0, "type": "bool"})
    plan = plan_device(_device(tags, max_bits_per_request=100, max_gap=10))
    assert [(r.table.value, r.start, r.count) for r in plan.requests] == [
        ("coil", 0, 91), ("coil", 100, 91), ("coil", 200, 91), ("discrete", 0, 1)]


def test_sub_register_tags_share_one_request_and_baseline_has_one_per_tag():
    tags = [_h("lo", 7, "uint8l"), _h("hi", 7, "int8h"), _h("b0", 8, "bit", bit=0), _h("b1", 8, "bit", bit=1)]
    dev = _device(tags, max_gap=0)
    merged = plan_device(dev)
    assert [(r.start, r.count, r.tag_names) for r in merged.requests] == [(7, 2, ("hi", "lo", "b0", "b1"))]
    assert len(plan_device(dev, merge=False).requests) == 4


def test_one_request_per_tag_device_setting():
    dev = _device([_h("a", 0), _h("b", 1), _h("c", 2)], one_request_per_tag=True)
    assert [(r.start, r.count) for r in plan_device(dev).requests] == [(0, 1), (1, 1), (2, 1)]
    assert len(plan_device(dev, merge=True).requests) == 1
