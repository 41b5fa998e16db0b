"""Updates checked and summed in place (f32, q8) agree with decoding them first."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from fedgate.core import aggregate as agg
from fedgate.core import codec
from fedgate.core.errors import AggregationError
from fedgate.server.config import StrategySection
from fedgate.server.strategies import make_strategy
from fedgate.server.validate import Rejected, UpdateValidator, check_update

H = codec.HEADER_SIZE


def _vectors(dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=dim).astype(np.float32)
    return ref, (ref + rng.normal(0, 0.1, dim)).astype(np.float32)


def _sq(a: np.ndarray, b: np.ndarray) -> float:
    d = (a - b).astype(np.float64)  # float32 difference, squared in float64
    return float((d * d).sum())


@pytest.mark.parametrize("dim", [1, 7, 8, 9, 1023, 4097, 100_003])
def test_f32_check_matches_numpy_at_any_alignment(dim):
    ref, vec = _vectors(dim)
    buf = codec.encode(vec, "f32")
    bad, sq = agg.check_f32_update(buf, H, ref)
    assert bad == -1 and sq == pytest.approx(_sq(vec, ref), rel=1e-12)
    for shift in (1, 2, 3):  # a frame can start anywhere
        shifted = memoryview(b"\0" * shift + buf)
        assert agg.check_f32_update(shifted, H + shift, ref) == (bad, sq)


@pytest.mark.parametrize("dim,block", [(1, 1), (9, 3), (1000, 256), (4097, 1024), (5000, 5000), (100_003, 256)])
def test_q8_check_and_sum_match_the_decoder(dim, block):
    ref, vec = _vectors(dim, seed=dim)
    buf = codec.encode(vec, "q8", block=block, seed=3)
    decoded = codec.decode(buf)
    status, index, sq = agg.check_q8_update(buf, H, block, ref)
    assert (status, index) == (0, -1) and sq == pytest.approx(_sq(decoded, ref), rel=1e-12)
    fused, plain = agg.StreamingMean(dim), agg.StreamingMean(dim)
    fused.add_q8(memoryview(b"\0" + buf), H + 1, block, 2.5)
    plain.add(decoded, 2.5)
    assert np.array_equal(fused.result(np.float64), plain.result(np.float64))
    assert (fused.count, fused.total_weight) == (1, 2.5)


@pytest.mark.parametrize("where", [0, 5, 4095, 4096, 9999])
def test_the_first_non_finite_value_is_named(where):
    ref, vec = _vectors(10_000)
    vec[where] = np.nan
    vec[min(where + 3, 9_999)] = np.inf
    assert agg.check_f32_update(vec.tobytes(), 0, ref)[0] == where


def _q8_with_scale(vec: np.ndarray, block: int, block_index: int, scale: float) -> bytes:
    """A q8 buffer with one scale replaced (header CRC left stale: the in-place check skips it)."""
    buf = bytearray(codec.encode(vec, "q8", block=block))
    struct.pack_into("<f", buf, H + 4 * block_index, scale)
    return bytes(buf)


def test_q8_bad_scales_and_overflows_are_found():
    ref, vec = _vectors(1000)
    assert agg.check_q8_update(_q8_with_scale(vec, 100, 3, -1.0), H, 100, ref)[:2] == (1, 3)
    assert agg.check_q8_update(_q8_with_scale(vec, 100, 4, float("nan")), H, 100, ref)[:2] == (1, 4)
    status, index, _ = agg.check_q8_update(_q8_with_scale(vec, 100, 2, 3e38), H, 100, ref)
    assert status == 2 and 200 <= index < 300  # a code of +-127 times 3e38 overflows float32


def test_facades_refuse_wrong_lengths():
    ref, vec = _vectors(100)
    with pytest.raises(AggregationError, match="expected 400"):
        agg.check_f32_update(codec.encode(vec[:99], "f32"), H, ref)
    with pytest.raises(AggregationError, match="q8 update"):
        agg.check_q8_update(codec.encode(vec, "q8", block=10), H, 7, ref)
    with pytest.raises(AggregationError, match="float32"):
        agg.check_f32_update(vec.tobytes(), 0, ref.astype(np.float64))
    with pytest.raises(AggregationError, match="weight"):
        agg.StreamingMean(100).add_q8(codec.encode(vec, "q8", block=10), H, 10, 0.0)


def _validator(dim: int, max_norm: float = 1e9) -> UpdateValidator:
    return UpdateValidator(dim, max_norm)


@pytest.mark.parametrize("name", ["f32", "f16", "q8"])
def test_validator_norm_matches_the_decoded_update(name):
    ref, vec = _vectors(3000)
    buf = codec.encode(vec, name)
    out = np.empty(3000, dtype=np.float32)
    params, norm = check_update(_validator(3000), memoryview(buf), ref, lambda: out)
    decoded = codec.decode(buf)
    assert np.array_equal(params, decoded)
    assert norm == pytest.approx(np.sqrt(_sq(decoded, ref)), rel=1e-9)
    if name == "q8":
        v = _validator(3000)
        assert v.check_q8(buf, v.header(buf), ref) == pytest.approx(norm, rel=1e-12)


@pytest.mark.parametrize("name", ["f32", "q8"])
def test_validator_refusals_have_their_reasons(name):
    ref, vec = _vectors(500)
    v = _validator(500, max_norm=0.5)
    far = codec.encode(vec + 1.0, name)
    with pytest.raises(Rejected) as info:
        if name == "q8":
            v.check_q8(far, v.header(far), ref)
        else:
            v.check(far, ref, lambda: np.empty(500, np.float32))
    assert info.value.reason == "norm"
    bad = vec.copy()
    bad[17] = np.inf
    raw = bytearray(codec.encode(vec, "f32"))
    raw[H + 4 * 17: H + 4 * 18] = struct.pack("<f", float("inf"))
    with pytest.raises(Rejected, match="index 17") as info:
        v.check(bytes(raw), ref, lambda: np.empty(500, np.float32))
    assert info.value.reason == "nonfinite"
    with pytest.raises(Rejected) as info:
        v.header(codec.encode(vec[:499], name))
    assert info.value.reason == "size"
    with pytest.raises(Rejected) as info:
        v.header(b"FGVC" + b"\0" * 30)
    assert info.value.reason == "decode"
    scaled = _q8_with_scale(vec, 256, 1, -2.0)
    with pytest.raises(Rejected) as info:
        v.check_q8(scaled, v.header(scaled), ref)
    assert info.value.reason == "decode"


def test_streaming_strategies_sum_q8_in_place_like_decoded_updates():
    ref, _ = _vectors(2000)
    fused = make_strategy(StrategySection(), 2000)
    plain = make_strategy(StrategySection(), 2000)
    fused.begin(ref, expected=3)
    plain.begin(ref, expected=3)
    for seed, weight in ((1, 10.0), (2, 30.0), (3, 5.0)):
        buf = codec.encode(_vectors(2000, seed)[1], "q8", block=128)
        fused.add_q8(memoryview(buf), H, 128, weight)
        plain.add(codec.decode(buf), weight)
    assert np.array_equal(fused.combine(), plain.combine())
