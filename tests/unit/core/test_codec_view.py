"""codec.decode(view=True): an f32 buffer is read in place, every other codec decodes as usual."""
from __future__ import annotations

import numpy as np
import pytest

from fedgate.core import codec
from fedgate.core.errors import ProtocolError


def test_an_f32_view_reads_the_buffer_in_place_read_only():
    x = np.linspace(-1, 1, 1001, dtype=np.float32)
    buf = bytearray(codec.encode(x, "f32"))
    got = codec.decode(memoryview(buf), view=True)
    np.testing.assert_array_equal(got, x)
    assert not got.flags.writeable
    with pytest.raises(ValueError):
        got[0] = 5.0
    buf[codec.HEADER_SIZE:codec.HEADER_SIZE + 4] = np.float32(7.0).tobytes()
    assert got[0] == 7.0  # the same memory, not a copy
    assert codec.decode(memoryview(buf), view=False, check_crc=False)[0] == 7.0


@pytest.mark.parametrize("name", ["f16", "q8", "topk"])
def test_other_codecs_decode_to_a_fresh_array(name):
    x = np.linspace(-1, 1, 1001, dtype=np.float32)
    buf = codec.encode(x, name)
    a, b = codec.decode(buf, view=True), codec.decode(buf)
    np.testing.assert_array_equal(a, b)
    assert a.flags.writeable and a.flags.owndata


def test_a_view_is_still_checked():
    buf = bytearray(codec.encode(np.ones(100, dtype=np.float32), "f32"))
    buf[-1] ^= 0xFF
    with pytest.raises(ProtocolError, match="CRC"):
        codec.decode(memoryview(buf), view=True)
    with pytest.raises(ProtocolError):
        codec.decode(memoryview(buf)[:-4], view=True, check_crc=False)
