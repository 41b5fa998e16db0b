"""Line splitting and parsing of serial sensors, and the backoff, without any port."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgate.drivers import Quality, load_config
from fedgate.drivers.serial_line import BadLine, LineParser, LineSplitter, nmea_checksum
from fedgate.drivers.values import Backoff


def _device(**kw):
    dev = {"name": "s", "transport": "t", **kw}
    doc = {"transports": [{"name": "t", "kind": "serial-line", "port": "/dev/null"}], "devices": [dev]}
    return load_config(doc, file="agent.toml").devices[0]


NMEA = _device(format="nmea", tags=[{"name": "sog", "sentence": "RMC", "field": 7}])
KV = _device(format="kv", tags=[{"name": "t", "key": "t"}, {"name": "p", "key": "p", "type": "int64"}])
CSV = _device(format="csv", tags=[{"name": "a", "column": 1}])
RX = _device(format="regex", pattern=r"V=(\d+)", tags=[{"name": "v", "group": 1, "max": 10.0}])


def test_splitter_handles_split_terminators_and_overlong_lines():
    s = LineSplitter(b"\r\n", 10)
    assert s.feed(b"abc\r") == ([], 0)
    assert s.feed(b"\ndef\r\n") == ([b"abc", b"def"], 0)
    lines, overlong = s.feed(b"x" * 50)
    assert (lines, overlong) == ([], 1)
    assert s.feed(b"y" * 50 + b"\r\nok\r\n") == ([b"ok"], 0)  # the rest of the long line is dropped


def test_nmea_talker_agnostic_and_checksum_rules():
    body = "GNRMC,1,A,1,N,1,E,5.5,0,0,,"
    assert [v.value for v in LineParser(NMEA).parse(f"${body}*{nmea_checksum(body)}", 0.0)] == [5.5]
    assert LineParser(NMEA).parse(f"$GPGGA,1*{nmea_checksum('GPGGA,1')}", 0.0) == []  # other sentence
    with pytest.raises(BadLine, match="truncated"):
        LineParser(NMEA).parse(f"${body}", 0.0)
    with pytest.raises(BadLine, match="garbage"):
        LineParser(NMEA).parse("hello", 0.0)
    empty = "GPRMC,1,V,,,,,,,,,"
    (tv,) = LineParser(NMEA).parse(f"${empty}*{nmea_checksum(empty)}", 0.0)
    assert tv.quality is Quality.ERROR and tv.value is None  # no fix: empty field


def test_kv_csv_regex_values_and_errors():
    values = {v.name: v for v in LineParser(KV).parse("t=1.5, p=3 extra=x", 0.0)}
    assert values["s.t"].value == 1.5 and values["s.p"].value == 3
    assert LineParser(KV).parse("p=abc", 0.0)[0].quality is Quality.ERROR
    with pytest.raises(BadLine, match="truncated"):
        LineParser(KV).parse("t=1.5 p", 0.0)
    assert LineParser(CSV).parse("x, 7.25 ,y", 0.0)[0].value == 7.25
    with pytest.raises(BadLine, match="truncated"):
        LineParser(CSV).parse("only", 0.0)
    assert LineParser(RX).parse("V=12", 0.0)[0].quality is Quality.BAD_RANGE
    with pytest.raises(BadLine, match="garbage"):
        LineParser(RX).parse("nothing", 0.0)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(chunks=st.lists(st.binary(max_size=120), max_size=20))
def test_arbitrary_bytes_never_break_the_reader(chunks):
    s = LineSplitter(b"\n", 64)
    parsers = [LineParser(d) for d in (NMEA, KV, CSV, RX)]
    for chunk in chunks:
        lines, _ = s.feed(chunk)
        for raw in lines:
            assert len(raw) <= 64
            text = raw.decode("latin-1")
            for p in parsers:
                try:
                    p.parse(text, 0.0)
                except BadLine:
                    pass


def test_backoff_doubles_with_jitter_up_to_the_cap_and_resets():
    b = Backoff(0.1, 1.0, seed=7)
    delays = [b.next() for _ in range(8)]
    steps = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]
    assert all(0.75 * s <= d <= s for d, s in zip(delays, steps))
    assert len(set(delays)) == len(delays)  # jittered
    b.reset()
    assert b.next() <= 0.1
