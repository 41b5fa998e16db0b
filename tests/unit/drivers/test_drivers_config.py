"""Config loading: every mistake is a ConfigError naming file, entry and value."""
from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgate.core.errors import ConfigError
from fedgate.drivers import LineDeviceConfig, ModbusDeviceConfig, TransportKind, load_config

DOC = {
    "agent": {"node_id": "gw1"},  # not ours: ignored
    "transports": [
        {"name": "plc", "kind": "modbus-tcp", "host": "10.0.0.5", "port": 502, "timeout": "500ms",
         "reconnect_delay": "100ms", "reconnect_delay_max": "10s"},
        {"name": "bus", "kind": "modbus-rtu", "port": "/dev/ttyUSB0", "baudrate": 19200, "parity": "E"},
        {"name": "gps", "kind": "serial-line", "port": "/dev/ttyS1", "baudrate": 4800},
    ],
    "devices": [
        {"name": "press", "transport": "plc", "unit_id": 1, "poll": "500ms", "byte_order": "CDAB",
         "tags": [
             {"name": "oil_temp", "register": "input", "address": 10, "type": "int16", "scale": 0.1},
             {"name": "pressure", "register": "holding", "address": 100, "type": "float32"},
             {"name": "fault", "register": "holding", "address": 110, "type": "bit", "bit": 3},
             {"name": "mode", "register": "holding", "address": 110, "type": "bit", "bit": 4},
             {"name": "lo", "register": "holding", "address": 111, "type": "uint8l"},
             {"name": "hi", "register": "holding", "address": 111, "type": "int8h"},
             {"name": "running", "register": "coil", "address": 0, "type": "bool", "writable": True},
             {"name": "recipe", "register": "holding", "address": 200, "type": "string", "length": 8},
         ]},
        {"name": "meter", "transport": "bus", "unit_id": 3, "address_base": 1,
         "tags": [{"name": "power", "register": "input", "address": 1, "type": "float32"}]},
        {"name": "nav", "transport": "gps", "format": "nmea", "stale_after": "3s",
         "tags": [{"name": "sog", "sentence": "RMC", "field": 7, "unit": "kn"}]},
    ],
}


def _doc():
    return copy.deepcopy(DOC)


def _error(doc) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(doc, file="agent.toml")
    return str(info.value)


def test_valid_document_loads_with_units_and_defaults():
    cfg = load_config(_doc(), file="agent.toml")
    assert [t.kind for t in cfg.transports] == [TransportKind.MODBUS_TCP, TransportKind.MODBUS_RTU,
                                                TransportKind.SERIAL_LINE]
    press, meter, nav = cfg.devices
    assert isinstance(press, ModbusDeviceConfig) and isinstance(nav, LineDeviceConfig)
    assert press.poll_s == 0.5 and cfg.transports[0].timeout_s == 0.5
    assert meter.tags[0].wire_address == 0  # address_base = 1
    assert nav.stale_bound_s == 3.0
    assert cfg.tag_names()[:2] == ["press.oil_temp", "press.pressure"] and cfg.tag_names()[-1] == "nav.sog"


def test_unknown_key_in_a_tag_names_the_entry():
    doc = _doc()
    doc["devices"][0]["tags"][3]["scael"] = 2
    assert _error(doc) == ('agent.toml: devices[0].tags[3] "mode".scael = 2: unknown key (allowed: address, bit, '
                           'byte_order, length, max, min, name, offset, register, scale, type, unit, writable)')


@pytest.mark.parametrize("tag_index,key,value,expect", [
    (0, "address", "ten", 'devices[0].tags[0] "oil_temp".address = \'ten\': expected an integer'),
    (0, "type", "int24", 'devices[0].tags[0] "oil_temp".type = \'int24\''),
    (1, "byte_order", "ABDC", 'devices[0].tags[1] "pressure".byte_order = \'ABDC\''),
    (1, "address", 65535, 'devices[0].tags[1] "pressure".address = 65535: float32 needs 2 registers'),
    (1, "address", 99, 'devices[0].tags[1] "pressure".address = 99: overlaps devices[0].tags[0]'),
    (3, "bit", 3, 'devices[0].tags[3] "mode".address = 110: overlaps devices[0].tags[2] "fault"'),
    (6, "type", "int16", 'devices[0].tags[6] "running".type = \'int16\': a coil holds single bits'),
    (0, "type", "bool", 'devices[0].tags[0] "oil_temp".type = \'bool\': input registers are 16-bit words'),
    (2, "bit", 16, 'devices[0].tags[2] "fault".bit = 16: must be <= 15'),
    (7, "length", 200, 'devices[0].tags[7] "recipe".length = 200: must be <= 125'),
    (0, "writable", True, 'devices[0].tags[0] "oil_temp".writable = True: a input is read-only'),
    (0, "scale", "x", 'devices[0].tags[0] "oil_temp".scale = \'x\': expected a number'),
])
def test_tag_mistakes_name_file_entry_and_value(tag_index, key, value, expect):
    doc = _doc()
    doc["devices"][0]["tags"][tag_index][key] = value
    if key == "address" and value == 99:
        doc["devices"][0]["tags"][0].update(register="holding", address=100, type="uint16")
    msg = _error(doc)
    assert msg.startswith("agent.toml: ") and expect in msg, msg


def test_tag_that_does_not_fit_the_device_request_cap():
    doc = _doc()
    doc["devices"][0]["max_registers_per_request"] = 4
    msg = _error(doc)
    assert 'devices[0].tags[7] "recipe"' in msg and "needs 8 registers" in msg and "at most 4" in msg


def test_address_base_one_refuses_address_zero():
    doc = _doc()
    doc["devices"][1]["tags"][0]["address"] = 0
    assert "below the first address" in _error(doc)


@pytest.mark.parametrize("mutate,expect", [
    (lambda d: d["transports"][0].update(kind="modbus-udp"), "transports[0].kind = 'modbus-udp'"),
    (lambda d: d["transports"][0].pop("host"), "transports[0].host: missing required key"),
    (lambda d: d["transports"][1].update(port=7), "transports[1].port = 7"),
    (lambda d: d["transports"][0].update(timeout="fast"), "transports[0].timeout = 'fast'"),
    (lambda d: d["transports"][0].update(reconnect_delay_max="10ms"), "must be >= reconnect_delay"),
    (lambda d: d["devices"][0].update(transport="nope"), "devices[0].transport = 'nope': unknown transport"),
    (lambda d: d["devices"][0].update(max_registers_per_request=126), "max_registers_per_request = 126"),
    (lambda d: d["devices"][0].update(max_bits_per_request=2001), "max_bits_per_request = 2001"),
    (lambda d: d["devices"][0].update(poll="0s"), "devices[0].poll = '0s': must be > 0"),
    (lambda d: d["devices"][1].update(name="press"), "devices[1].name = 'press': duplicate device name"),
    (lambda d: d["devices"][0]["tags"][1].update(name="oil_temp"), "duplicate tag name"),
    (lambda d: d["devices"][0]["tags"][1].update(name="a.b"), "devices[0].tags[1] \"a.b\".name = 'a.b'"),
    (lambda d: d["devices"][0].update(tags=[]), "devices[0].tags = []: a device needs at least one"),
    (lambda d: d.update(devices={"x": 1}), "devices = {'x': 1}: expected an array of tables"),
    (lambda d: d["devices"][2].update(format="xml"), "devices[2].format = 'xml'"),
    (lambda d: d["devices"][2]["tags"][0].pop("field"), 'devices[2].tags[0] "sog".field: format = "nmea" needs'),
    (lambda d: d["devices"][2]["tags"][0].update(key="x"), "key is not used by format"),
    (lambda d: d["devices"][2].update(format="regex", pattern="(unclosed"), "not a valid regular expression"),
    (lambda d: d["devices"][2]["tags"][0].update(register="holding"), "unknown key"),
])
def test_device_and_transport_mistakes(mutate, expect):
    doc = _doc()
    mutate(doc)
    msg = _error(doc)
    assert expect in msg, msg


def test_regex_group_must_exist_in_pattern():
    doc = _doc()
    doc["devices"][2] = {"name": "scale", "transport": "gps", "format": "regex", "pattern": r"W(?P<w>[\d.]+)",
                         "tags": [{"name": "weight", "group": "kg"}]}
    assert 'devices[2].tags[0] "weight".group = \'kg\': no such group' in _error(doc)


def test_same_unit_twice_on_one_transport_is_refused():
    doc = _doc()
    doc["devices"][1].update(transport="plc", unit_id=1)
    assert "unit_id already used by device 'press'" in _error(doc)


def test_serial_request_must_be_ascii():
    doc = _doc()
    doc["devices"][2]["request"] = "gewicht\u00e4\r\n"
    assert "devices[2].request = 'gewichtä\\r\\n': must be ASCII" in _error(doc)


def test_devices_on_one_serial_line_share_the_terminator():
    doc = _doc()
    doc["devices"].append({"name": "nav2", "transport": "gps", "format": "kv", "terminator": "\r",
                           "tags": [{"name": "x", "key": "x"}]})
    assert "devices[3].terminator = '\\r': devices on one serial line share its terminator" in _error(doc)


_ANY = st.one_of(st.none(), st.booleans(), st.integers(-70000, 70000), st.floats(allow_nan=True),
                 st.text(max_size=8), st.sampled_from(["holding", "coil", "input", "discrete", "float32", "bit",
                                                      "string", "ABCD", "CDAB", "int8l", "nmea", "kv"]),
                 st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
_TAG_KEYS = ["name", "register", "address", "type", "bit", "length", "byte_order", "scale", "offset", "unit",
             "min", "max", "writable", "sentence", "field", "key", "column", "group", "bogus"]
_DEV_KEYS = ["name", "transport", "unit_id", "poll", "byte_order", "address_base", "max_gap",
             "max_registers_per_request", "format", "pattern", "terminator", "stale_after", "tags"]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(device=st.dictionaries(st.sampled_from(_DEV_KEYS), _ANY, max_size=5),
       tag=st.dictionaries(st.sampled_from(_TAG_KEYS), _ANY, max_size=6),
       line=st.booleans())
def test_any_malformed_entry_is_a_config_error(device, tag, line):
    doc = _doc()
    target = doc["devices"][2 if line else 0]
    target["tags"][0].update(tag)
    target.update({k: v for k, v in device.items() if k != "tags"})
    try:
        load_config(doc, file="agent.toml")
    except ConfigError as exc:
        assert str(exc).startswith("agent.toml: ")


@pytest.mark.parametrize("key", ["scale", "offset", "min", "max"])
def test_non_finite_numbers_are_refused(key):
    doc = _doc()
    doc["devices"][0]["tags"][0][key] = float("inf")
    assert f'devices[0].tags[0] "oil_temp".{key} = inf: must be a finite number' in _error(doc)
