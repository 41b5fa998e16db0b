"""fedgate.core.crc gives zlib's CRC-32 values for every buffer type the codecs use."""
from __future__ import annotations

import zlib

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgate.core import codec, crc


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=5000), st.binary(max_size=300), st.integers(0, 2**32 - 1))
def test_crc32_equals_zlib_whole_chained_and_seeded(a, b, seed):
    assert crc.crc32(a) == zlib.crc32(a)
    assert crc.crc32(b, crc.crc32(a)) == zlib.crc32(a + b)
    assert crc.crc32(a, seed) == zlib.crc32(a, seed)


def test_crc32_of_memoryviews_and_arrays():
    x = np.random.default_rng(1).standard_normal(100_003).astype(np.float32)
    mv = memoryview(x).cast("B")
    assert crc.crc32(mv) == zlib.crc32(mv) == zlib.crc32(x.tobytes())
    assert crc.crc32(mv[7:-5]) == zlib.crc32(x.tobytes()[7:-5])


def test_codec_buffers_carry_the_zlib_crc():
    x = np.linspace(-3, 3, 4099, dtype=np.float32)
    for name in ("f32", "f16", "q8", "topk"):
        buf = codec.encode(x, name)
        mv = memoryview(buf)
        stored = int.from_bytes(buf[20:24], "little")
        assert stored == zlib.crc32(mv[24:], zlib.crc32(mv[:20]))
        np.testing.assert_array_equal(codec.decode(buf), codec.decode(bytes(buf)))
