"""Update codecs: Hypothesis round trips, error feedback, and hostile buffers."""
from __future__ import annotations

import struct
import zlib

import agg_reference as ref
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedgate.core import codec
from fedgate.core.errors import ProtocolError

finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)
vectors = hnp.arrays(np.float32, st.integers(1, 600), elements=finite32)
f16_vectors = hnp.arrays(
    np.float32, st.integers(1, 600), elements=st.floats(-65504, 65504, allow_nan=False, width=32)
)


def _header(buf: bytes) -> tuple:
    return struct.unpack_from("<4sBBHIIII", buf, 0)


def _reseal(buf: bytearray) -> bytearray:
    """Recompute the CRC, so a test reaches the checks behind it."""
    crc = zlib.crc32(bytes(buf[24:]), zlib.crc32(bytes(buf[:20])))
    struct.pack_into("<I", buf, 20, crc)
    return buf


# -------------------------------------------------------------------- round trips


@settings(max_examples=150, deadline=None)
@given(vec=vectors)
def test_f32_round_trip_is_exact(vec):
    buf = codec.encode(vec, "f32")
    assert len(buf) == codec.HEADER_SIZE + 4 * vec.size
    out = codec.decode(buf)
    assert out.dtype == np.float32 and out.flags.writeable
    np.testing.assert_array_equal(out.view(np.uint32), vec.view(np.uint32))


@settings(max_examples=150, deadline=None)
@given(vec=f16_vectors)
def test_f16_round_trip_matches_numpy_rounding(vec):
    out = codec.decode(codec.encode(vec, codec.Codec.F16))
    np.testing.assert_array_equal(out, ref.f16_roundtrip(vec))
    # within half an f16 ulp (relative 2^-11) or the subnormal step 2^-25
    assert np.all(np.abs(out - vec) <= np.maximum(np.abs(vec) * 2.0**-11, 2.0**-25))


def test_f16_every_half_decodes_like_numpy():
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    buf = bytearray(struct.pack("<4sBBHIII", b"FGVC", 1, 2, 0, 65536, 0, 0) + b"\0" * 4 + halves.tobytes())
    out = codec.decode(_reseal(buf))
    np.testing.assert_array_equal(out.view(np.uint32), halves.astype(np.float32).view(np.uint32))


def test_f16_refuses_out_of_range_values():
    with pytest.raises(ProtocolError, match="f16 cannot carry"):
        codec.encode(np.array([1.0, 70000.0], dtype=np.float32), "f16")
    codec.encode(np.array([65519.0], dtype=np.float32), "f16")  # rounds to 65504: allowed


@settings(max_examples=150, deadline=None)
@given(vec=vectors, block=st.integers(1, 300), seed=st.integers(0, 2**32 - 1))
def test_q8_error_is_below_one_step_per_block(vec, block, seed):
    buf = codec.encode(vec, "q8", block=block, seed=seed)
    assert buf == codec.encode(vec, "q8", block=block, seed=seed)  # seeded: deterministic
    out = codec.decode(buf)
    n = vec.size
    nb = -(-n // block)
    assert len(buf) == codec.HEADER_SIZE + 4 * nb + n
    for b in range(nb):
        sl = slice(b * block, (b + 1) * block)
        peak = float(np.abs(vec[sl]).max())
        step = peak / 127
        assert np.all(np.abs(out[sl].astype(np.float64) - vec[sl]) <= step * (1 + 1e-5) + 1e-37)
        assert float(np.abs(out[sl]).max()) <= peak * (1 + 1e-6) + 1e-37


def test_q8_stochastic_rounding_is_unbiased():
    rng = np.random.default_rng(0)
    vec = rng.standard_normal(4096).astype(np.float32)
    mean = np.mean([codec.decode(codec.encode(vec, "q8", block=64, seed=s)) for s in range(400)], axis=0)
    step = np.abs(vec.reshape(-1, 64)).max(axis=1).repeat(64) / 127
    # each value's error is within [-step, step] with mean 0: 400 draws shrink it 20x
    assert np.abs(mean - vec).max() < 0.25 * step.max()
    assert abs(float(np.mean(mean - vec))) < 0.01 * step.mean()
    assert codec.encode(vec, "q8", seed=1) != codec.encode(vec, "q8", seed=2)


def test_q8_constant_zero_and_tiny_blocks():
    vec = np.zeros(10, dtype=np.float32)
    vec[5:] = 1e-40  # subnormal block peak: sent as zeros
    out = codec.decode(codec.encode(vec, "q8", block=5))
    np.testing.assert_array_equal(out, np.zeros(10, dtype=np.float32))
    ones = np.full(7, -3.0, dtype=np.float32)
    np.testing.assert_array_equal(codec.decode(codec.encode(ones, "q8", block=3)), ones)


@settings(max_examples=150, deadline=None)
@given(vec=vectors, k=st.floats(1 / 65536, 1.0))
def test_topk_keeps_the_largest_exactly(vec, k):
    buf = codec.encode(vec, "topk", k=k)
    kept = codec.topk_count(vec.size, k)
    assert len(buf) == codec.HEADER_SIZE + 8 * kept
    out = codec.decode(buf)
    nz = np.flatnonzero(out)
    np.testing.assert_array_equal(out[nz], vec[nz])  # kept values are exact
    idx = np.frombuffer(buf, dtype="<u4", count=kept, offset=codec.HEADER_SIZE)
    assert np.all(np.diff(idx.astype(np.int64)) > 0)
    np.testing.assert_array_equal(out[idx], vec[idx])
    dropped = np.setdiff1d(np.arange(vec.size), idx)
    if dropped.size:
        assert np.abs(vec[dropped]).max() <= np.abs(vec[idx]).min()
    ref_idx, _ = ref.topk_encode(vec, kept)
    np.testing.assert_array_equal(np.sort(np.abs(vec[ref_idx])), np.sort(np.abs(vec[idx])))


def test_topk_ties_take_the_lowest_indices():
    vec = np.array([1, 5, 1, 5, 1, 5], dtype=np.float32)
    idx = np.frombuffer(codec.encode(vec, "topk", k=4 / 6), dtype="<u4", count=4, offset=24)
    assert idx.tolist() == [0, 1, 3, 5]


@pytest.mark.parametrize("name", ["topk", "q8", "f16"])
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), rounds=st.integers(1, 12), n=st.integers(1, 400))
def test_error_feedback_sent_plus_residual_equals_inputs(name, seed, rounds, n):
    rng = np.random.default_rng(seed)
    ef = codec.ErrorFeedback(n)
    sent = np.zeros(n, dtype=np.float64)
    total = np.zeros(n, dtype=np.float64)
    for r in range(rounds):
        vec = rng.standard_normal(n).astype(np.float32)
        total += vec
        sent += codec.decode(codec.encode(vec, name, k=0.1, block=32, seed=r, state=ef))
    # invariant of error feedback: what was sent plus what is owed is what came in
    np.testing.assert_allclose(sent + ef.residual, total, atol=1e-4 * rounds)


def test_topk_error_feedback_eventually_sends_everything():
    n = 100
    vec = np.linspace(0.01, 1, n, dtype=np.float32)
    ef = codec.ErrorFeedback(n)
    sent = np.zeros(n)
    for _ in range(600):
        sent += codec.decode(codec.encode(vec, "topk", k=0.1, state=ef))
    assert np.all(sent > 0)  # small coordinates accumulate until they are sent
    np.testing.assert_allclose(sent + ef.residual, 600 * vec.astype(np.float64), rtol=1e-4)


def test_f32_with_state_flushes_the_residual():
    ef = codec.ErrorFeedback(3)
    ef.residual[:] = [1, 2, 3]
    out = codec.decode(codec.encode(np.zeros(3, dtype=np.float32), "f32", state=ef))
    assert out.tolist() == [1, 2, 3] and ef.residual.tolist() == [0, 0, 0]


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_decode_accepts_buffers_and_out(kind):
    vec = np.arange(100, dtype=np.float32)
    buf = codec.encode(vec, "f32")
    np.testing.assert_array_equal(codec.decode(kind(buf)), vec)
    out = np.empty(100, dtype=np.float32)
    assert codec.decode(kind(buf), out=out) is out
    np.testing.assert_array_equal(out, vec)
    # a memoryview slice of a bigger frame, and a non-byte format
    big = bytearray(b"xx" + buf + b"yy")
    np.testing.assert_array_equal(codec.decode(memoryview(big)[2:-2]), vec)
    np.testing.assert_array_equal(codec.decode(memoryview(bytearray(buf)).cast("I")), vec)
    with pytest.raises(ProtocolError, match="out must be"):
        codec.decode(buf, out=np.empty(99, dtype=np.float32))


def test_topk_decode_into_out_clears_it():
    vec = np.array([0, 0, 9, 0], dtype=np.float32)
    out = np.ones(4, dtype=np.float32)
    codec.decode(codec.encode(vec, "topk", k=0.25), out=out)
    assert out.tolist() == [0, 0, 9, 0]


def test_read_header_reports_what_the_buffer_holds():
    buf = codec.encode(np.ones(1000, dtype=np.float32), "q8", block=100)
    head = codec.read_header(buf)
    assert (head.codec, head.count, head.param, head.nbytes) == (codec.Codec.Q8, 1000, 100, len(buf))


@pytest.mark.parametrize(
    "kwargs, vec, match",
    [
        ({"codec": "zip"}, np.ones(3, np.float32), "codec = 'zip'"),
        ({}, np.array([1, np.nan], np.float32), r"vec\[1\] = nan"),
        ({}, np.ones((2, 2), np.float32), "1-D"),
        ({}, np.ones(0, np.float32), "0 values"),
        ({}, np.ones(3, np.int32), "1-D float32"),
        ({"codec": "q8", "block": 0}, np.ones(3, np.float32), "block = 0"),
        ({"codec": "q8", "seed": -1}, np.ones(3, np.float32), "seed = -1"),
        ({"codec": "topk", "k": 0.0}, np.ones(3, np.float32), "k = 0.0"),
        ({"codec": "topk", "k": 1.5}, np.ones(3, np.float32), "k = 1.5"),
        ({"codec": "topk", "state": codec.ErrorFeedback(4)}, np.ones(3, np.float32), "does not fit"),
    ],
)
def test_encode_validates(kwargs, vec, match):
    with pytest.raises(ProtocolError, match=match):
        codec.encode(vec, **kwargs)


# ---------------------------------------------------------------- hostile buffers


def _valid_buffers() -> list[bytes]:
    rng = np.random.default_rng(9)
    vec = rng.standard_normal(300).astype(np.float32)
    return [
        codec.encode(vec, "f32"),
        codec.encode(vec, "f16"),
        codec.encode(vec, "q8", block=64),
        codec.encode(vec, "topk", k=0.05),
    ]


VALID = _valid_buffers()


@pytest.mark.parametrize("buf", VALID, ids=["f32", "f16", "q8", "topk"])
def test_every_truncation_and_extension_is_refused(buf):
    for cut in range(len(buf)):
        with pytest.raises(ProtocolError):
            codec.decode(buf[:cut])
    for extra in (b"\0", b"\0" * 3, b"x" * 100):
        with pytest.raises(ProtocolError, match="oversized"):
            codec.decode(buf + extra)


@pytest.mark.parametrize("buf", VALID, ids=["f32", "f16", "q8", "topk"])
def test_every_bit_flip_is_refused(buf):
    data = bytearray(buf)
    for pos in range(len(data)):
        for bit in (0, 3, 7):
            data[pos] ^= 1 << bit
            with pytest.raises(ProtocolError):
                codec.decode(data)
            data[pos] ^= 1 << bit
    codec.decode(data)


@settings(max_examples=300, deadline=None)
@given(blob=st.binary(max_size=200))
def test_random_bytes_raise_protocol_error_only(blob):
    with pytest.raises(ProtocolError):
        codec.decode(blob)


@settings(max_examples=300, deadline=None)
@given(
    cid=st.integers(0, 6),
    count=st.integers(0, 2**32 - 1),
    param=st.integers(0, 2**32 - 1),
    flags=st.sampled_from([0, 0, 0, 1, 1, 2, 3, 0x8000]),
    body=st.binary(max_size=300),
)
def test_forged_headers_with_valid_crc_never_crash(cid, count, param, flags, body):
    buf = bytearray(struct.pack("<4sBBHIII", b"FGVC", 1, cid, flags, count, param, 0) + b"\0" * 4 + body)
    _reseal(buf)
    try:
        out = codec.decode(buf, max_decoded_size=10_000)
    except ProtocolError:
        return
    # accepted: it must be exactly what the header says, from a buffer of the honest size
    assert out.shape == (count,) and count <= 10_000 and flags in (0, 1)
    assert codec.read_header(buf).delta is (flags == 1)
    assert out.nbytes <= 4 * len(buf) * 65536


def test_topk_bad_indices_are_refused_after_a_valid_crc():
    vec = np.arange(1, 11, dtype=np.float32)
    buf = bytearray(codec.encode(vec, "topk", k=0.3))  # indices 7, 8, 9
    for idx, match in (([8, 7, 9], "not strictly increasing"), ([7, 7, 9], "not strictly"),
                       ([7, 8, 10], "out of range"), ([7, 8, 2**32 - 1], "out of range")):
        struct.pack_into("<3I", buf, 24, *idx)
        with pytest.raises(ProtocolError, match=match):
            codec.decode(_reseal(buf))


def test_q8_bad_scales_are_refused_after_a_valid_crc():
    buf = bytearray(codec.encode(np.ones(10, dtype=np.float32), "q8", block=5))
    for scale in (-1.0, float("inf"), float("nan")):
        struct.pack_into("<f", buf, 28, scale)
        with pytest.raises(ProtocolError, match="block 1 has a negative or non-finite scale"):
            codec.decode(_reseal(buf))


def test_size_guards():
    buf = codec.encode(np.ones(1000, dtype=np.float32), "f16")
    with pytest.raises(ProtocolError, match="above max_decoded_size = 999"):
        codec.decode(buf, max_decoded_size=999)
    # a tiny top-k buffer may not announce a huge vector
    forged = bytearray(struct.pack("<4sBBHIII", b"FGVC", 1, 4, 0, 2**32 - 1, 1, 0) + b"\0" * 4 + b"\0" * 8)
    with pytest.raises(ProtocolError, match="1/65536"):
        codec.decode(_reseal(forged), max_decoded_size=2**32)
    with pytest.raises(ProtocolError, match="cannot decode a int"):
        codec.decode(42)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "field, value, match",
    [(0, b"FGVX", "bad magic"), (1, 2, "unsupported codec version 2"), (2, 9, "unknown codec id 9"),
     (3, 2, "reserved"), (3, 0x8001, "reserved"), (6, 5, "reserved"), (4, 0, "empty vector")],
)
def test_header_fields_are_checked(field, value, match):
    fields = list(_header(VALID[0]))[:7]
    fields[field] = value
    buf = bytearray(struct.pack("<4sBBHIII", *fields) + VALID[0][20:])
    with pytest.raises(ProtocolError, match=match):
        codec.decode(_reseal(buf))


@pytest.mark.parametrize("name", ["f32", "f16", "q8", "topk"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_every_codec_refuses_non_finite_input(name, bad):
    vec = np.ones(1000, dtype=np.float32)
    vec[700] = bad
    with pytest.raises(ProtocolError, match=r"vec\[700\]"):
        codec.encode(vec, name, block=64)


@pytest.mark.parametrize("name", ["f16", "q8", "topk"])
def test_residual_overflow_is_refused(name):
    ef = codec.ErrorFeedback(3)
    ef.residual[:] = 3e38
    with pytest.raises(ProtocolError, match="overflows float32"):
        codec.encode(np.full(3, 3e38, dtype=np.float32), name, state=ef)


def test_skipping_the_crc_still_checks_everything_else():
    vec = np.arange(1, 11, dtype=np.float32)
    buf = bytearray(codec.encode(vec, "topk", k=0.3))
    buf[-1] ^= 0x40  # a value byte: only the CRC notices
    with pytest.raises(ProtocolError, match="CRC32"):
        codec.decode(buf)
    assert codec.decode(buf, check_crc=False)[9] != 10.0
    struct.pack_into("<I", buf, 24, 11)  # an index out of range
    with pytest.raises(ProtocolError, match="out of range"):
        codec.decode(buf, check_crc=False)
    for cut in range(len(buf)):
        with pytest.raises(ProtocolError):
            codec.decode(buf[:cut], check_crc=False)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.empty(100, dtype=np.float64), r"got float64 \(100,\)"),
        (np.empty(101, dtype=np.float32), r"got float32 \(101,\)"),
        (np.empty((10, 10), dtype=np.float32), r"got float32 \(10, 10\)"),
        (np.empty(200, dtype=np.float32)[::2], "c_contiguous=False"),
        ([0.0] * 100, "got list"),
    ],
)
def test_decode_out_of_the_wrong_kind_is_refused_untouched(bad, match):
    buf = codec.encode(np.arange(100, dtype=np.float32), "q8")
    before = bad.copy() if isinstance(bad, np.ndarray) else None
    with pytest.raises(ProtocolError, match=match):
        codec.decode(buf, out=bad)
    if before is not None:
        np.testing.assert_array_equal(bad, before)


def test_decode_out_read_only_is_refused():
    ro = np.zeros(100, dtype=np.float32)
    ro.flags.writeable = False
    with pytest.raises(ProtocolError, match="writeable=False"):
        codec.decode(codec.encode(np.ones(100, dtype=np.float32), "f16"), out=ro)


@pytest.mark.parametrize("name", ["f32", "f16", "q8", "topk"])
def test_decode_into_a_reused_out_matches_a_fresh_decode(name):
    rng = np.random.default_rng(3)
    out = np.full(1000, np.nan, dtype=np.float32)
    for _ in range(3):
        buf = codec.encode(rng.normal(size=1000).astype(np.float32), name, k=0.05)
        assert codec.decode(buf, out=out) is out
        np.testing.assert_array_equal(out, codec.decode(buf))


@pytest.mark.parametrize("name", ["f32", "f16", "q8", "topk"])
def test_delta_flag_round_trips_and_changes_nothing_else(name):
    vec = np.linspace(-2, 2, 300, dtype=np.float32)
    plain = codec.encode(vec, name, k=0.2, seed=5)
    flagged = codec.encode(vec, name, k=0.2, seed=5, delta=True)
    assert codec.read_header(plain).delta is False
    head = codec.read_header(flagged)
    assert head.delta is True and head.codec.value == name and head.nbytes == len(plain)
    assert struct.unpack_from("<H", flagged, 6)[0] == codec.FLAG_DELTA
    assert flagged[24:] == plain[24:] and flagged[:6] == plain[:6]
    np.testing.assert_array_equal(codec.decode(flagged), codec.decode(plain))
    with pytest.raises(ProtocolError, match="delta = 1: must be a bool"):
        codec.encode(vec, name, delta=1)  # type: ignore[arg-type]


def test_delta_flag_is_covered_by_the_crc():
    buf = bytearray(codec.encode(np.ones(10, dtype=np.float32), "topk", k=0.5, delta=True))
    buf[6] ^= codec.FLAG_DELTA
    with pytest.raises(ProtocolError, match="CRC32"):
        codec.decode(buf)
    assert codec.decode(buf, check_crc=False).tolist() == [1.0] * 5 + [0.0] * 5
