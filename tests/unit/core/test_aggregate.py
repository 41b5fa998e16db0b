"""Aggregation kernels against the NumPy references, in float32 and float64."""
from __future__ import annotations

import agg_reference as ref
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgate.core import _robust
from fedgate.core import aggregate as agg
from fedgate.core.errors import AggregationError

DTYPES = [np.float32, np.float64]


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------- streaming mean


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 30), d=st.integers(1, 5000), seed=st.integers(0, 2**31))
def test_streaming_mean_equals_np_average(dtype, n, d, seed):
    rng = np.random.default_rng(seed)
    stack = (rng.standard_normal((n, d)) * rng.uniform(0.1, 100)).astype(dtype)
    weights = rng.uniform(0.01, 1000, n)
    acc = agg.StreamingMean(d)
    for row, w in zip(stack, weights):
        acc.add(row, w)
    expected = ref.weighted_mean(stack, weights)
    assert acc.count == n
    assert acc.total_weight == pytest.approx(weights.sum())
    np.testing.assert_allclose(acc.result(np.float64), expected, rtol=1e-12, atol=1e-12 * np.abs(stack).max())
    assert acc.result().dtype == np.float32
    np.testing.assert_allclose(acc.result(), expected.astype(np.float32), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("row, col", [(0, 0), (3, 2047), (3, 2048), (4, 5002)])
def test_weighted_mean_names_a_non_finite_value(row, col):
    stack = np.ones((5, 5003), dtype=np.float32)
    stack[row, col] = np.inf
    with pytest.raises(AggregationError, match=rf"update {row} has a non-finite value inf at index {col}"):
        agg.weighted_mean(stack)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_stack_and_weighted_mean_match_single_adds(dtype):
    rng = np.random.default_rng(1)
    stack = rng.standard_normal((7, 5003)).astype(dtype)  # dim not a multiple of the block
    weights = rng.uniform(1, 10, 7)
    one = agg.StreamingMean(5003)
    for row, w in zip(stack, weights):
        one.add(row, w)
    many = agg.StreamingMean(5003)
    many.add_stack(stack, weights)
    np.testing.assert_allclose(many.result(np.float64), one.result(np.float64), rtol=1e-13)
    out = agg.weighted_mean(stack, weights)
    assert out.dtype == dtype
    np.testing.assert_allclose(out, ref.weighted_mean(stack, weights), **_tol(dtype))
    np.testing.assert_allclose(agg.weighted_mean(list(stack)), stack.astype(np.float64).mean(0), **_tol(dtype))


def test_streaming_mean_memory_does_not_grow_with_updates():
    acc = agg.StreamingMean(1000)
    before = acc._acc.nbytes
    for i in range(500):
        acc.add(np.full(1000, i, dtype=np.float32), 1.0)
    assert acc._acc.nbytes == before == 8000
    assert acc.result()[0] == pytest.approx(249.5)


def test_streaming_mean_float64_accumulation_keeps_small_contributions():
    acc = agg.StreamingMean(1)
    acc.add(np.array([1e8], dtype=np.float32), 1.0)
    for _ in range(1000):
        acc.add(np.array([1.0], dtype=np.float32), 1.0)
    # a float32 accumulator would lose every +1 (1e8 + 1 == 1e8 in float32)
    assert acc.result(np.float64)[0] == pytest.approx((1e8 + 1000) / 1001, rel=1e-12)


def test_streaming_mean_merge_and_reset():
    rng = np.random.default_rng(2)
    stack = rng.standard_normal((6, 100)).astype(np.float32)
    a, b = agg.StreamingMean(100), agg.StreamingMean(100)
    for row in stack[:2]:
        a.add(row, 2.0)
    for row in stack[2:]:
        b.add(row, 1.0)
    a.merge(b)
    np.testing.assert_allclose(a.result(np.float64), ref.weighted_mean(stack, [2, 2, 1, 1, 1, 1]), rtol=1e-12)
    assert a.count == 6
    a.reset()
    assert a.count == 0 and a.total_weight == 0.0
    with pytest.raises(AggregationError, match="no update"):
        a.result()


@pytest.mark.parametrize(
    "vec, weight, match",
    [
        (np.ones(3, dtype=np.float32), 1.0, "3 values, expected 4"),
        (np.ones(4, dtype=np.int64), 1.0, "dtype int64"),
        (np.ones((2, 2), dtype=np.float32), 1.0, "1-D"),
        (np.array([1, np.nan, 1, 1], dtype=np.float32), 1.0, "non-finite value nan at index 1"),
        (np.array([1, 1, 1, np.inf]), 1.0, "non-finite value inf at index 3"),
        (np.ones(4, dtype=np.float32), 0.0, "weight = 0.0"),
        (np.ones(4, dtype=np.float32), float("nan"), "weight = nan"),
        (np.ones(4, dtype=np.float32), -1, "weight = -1"),
    ],
)
def test_streaming_mean_refuses_bad_updates_and_stays_clean(vec, weight, match):
    acc = agg.StreamingMean(4)
    acc.add(np.ones(4, dtype=np.float32), 1.0)
    with pytest.raises(AggregationError, match=match):
        acc.add(vec, weight)
    assert acc.count == 1
    np.testing.assert_array_equal(acc.result(), np.ones(4, dtype=np.float32))


def test_streaming_mean_reads_float32_without_converting(monkeypatch):
    calls = []
    real = agg._k.accumulate
    monkeypatch.setattr(agg._k, "accumulate", lambda acc, x, w: (calls.append(x), real(acc, x, w)))
    vec = np.arange(10, dtype=np.float32)
    m = agg.StreamingMean(10)
    m.add(vec, 1.0)
    assert calls[0] is vec  # the caller's array itself reaches the kernel: no temporary


@pytest.mark.parametrize("dim", [0, -3, 2.5, True, "4"])
def test_streaming_mean_dim_validated(dim):
    with pytest.raises(AggregationError, match="dim"):
        agg.StreamingMean(dim)


# -------------------------------------------------------------- median, trimmed mean

SHAPES = [(1, 7), (2, 33), (3, 100), (4, 17), (5, 1000), (10, 1001), (17, 300), (33, 64), (64, 129),
          (65, 50), (100, 40), (257, 19)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, d", SHAPES)
def test_median_matches_numpy(dtype, n, d):
    rng = np.random.default_rng(n * 1000 + d)
    stack = rng.standard_normal((n, d)).astype(dtype)
    stack[:, :3] = 1.5  # ties
    out = agg.median(stack)
    assert out.dtype == dtype and out.shape == (d,)
    np.testing.assert_allclose(out, ref.median(stack), **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, d", SHAPES)
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.25, 0.49])
def test_trimmed_mean_matches_reference(dtype, n, d, beta):
    rng = np.random.default_rng(n * 7 + d)
    stack = rng.standard_normal((n, d)).astype(dtype)
    stack[: n // 2, :2] = 0.25
    out = agg.trimmed_mean(stack, beta)
    assert out.dtype == dtype
    np.testing.assert_allclose(out, ref.trimmed_mean(stack, beta), **_tol(dtype))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 150),
    d=st.integers(1, 40),
    beta=st.floats(0, 0.49),
    seed=st.integers(0, 2**31),
    levels=st.integers(1, 5),
)
def test_order_statistics_with_heavy_ties(n, d, beta, seed, levels):
    rng = np.random.default_rng(seed)
    stack = rng.integers(0, levels, (n, d)).astype(np.float32)
    np.testing.assert_allclose(agg.median(stack), ref.median(stack), atol=1e-6)
    np.testing.assert_allclose(agg.trimmed_mean(stack, beta), ref.trimmed_mean(stack, beta), atol=1e-5)


@pytest.fixture(params=["network", "counting"])
def order_path(request, monkeypatch):
    """Run a test through the sorting-network kernel and through the counting-pass kernel."""
    limit = 10**9 if request.param == "network" else 0
    monkeypatch.setattr(_robust, "_NETWORK_MAX_N", {0: limit, 1: limit})
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, d", [(2, 40), (3, 17), (7, 33), (64, 50), (130, 40), (257, 35), (1000, 48)])
def test_both_order_paths_on_hard_columns(order_path, dtype, n, d):
    rng = np.random.default_rng(n + d)
    stack = rng.standard_normal((n, d)).astype(dtype)
    stack[:, 0] = 7.0  # one value
    stack[:, 1] = np.round(stack[:, 1])  # few values, many ties
    stack[:, 2] = np.exp(rng.uniform(-80, 80, n)) * rng.choice([-1, 1], n)  # huge dynamic range
    stack[:, 3] = 1e4 + rng.standard_normal(n) * 1e-3  # narrow band far from zero
    stack[: n // 3, 4] = np.finfo(dtype).max  # a third of the updates at the largest float
    stack[:, 5] = np.arange(n)[::-1]  # sorted, reversed
    stack[:, 6] = np.where(np.arange(n) % 2, 0.0, -0.0)  # signed zeros
    stack[:, 7] = rng.integers(0, 2, n) * np.finfo(dtype).tiny / 4  # subnormals
    np.testing.assert_allclose(agg.median(stack), ref.median(stack), rtol=1e-6)
    for beta in (0.0, 0.1, 0.3):
        with np.errstate(over="ignore"):
            expected = ref.trimmed_mean(stack, beta)
        np.testing.assert_allclose(agg.trimmed_mean(stack, beta), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("row, col", [(0, 0), (5, 33), (129, 39), (64, 15)])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_both_order_paths_refuse_non_finite(order_path, row, col, bad):
    stack = np.ones((130, 40), dtype=np.float32)
    stack[row, col] = bad
    for call in (agg.median, lambda s: agg.trimmed_mean(s, 0.2)):
        with pytest.raises(AggregationError, match=rf"update {row} has a non-finite value {bad} at index {col}"):
            call(stack)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 300), d=st.integers(1, 40), seed=st.integers(0, 2**31), levels=st.integers(1, 50))
def test_counting_path_matches_reference(n, d, seed, levels):
    rng = np.random.default_rng(seed)
    stack = (rng.integers(0, levels, (n, d)) + rng.standard_normal((n, d)) * (seed % 2)).astype(np.float32)
    limits = _robust._NETWORK_MAX_N
    _robust._NETWORK_MAX_N = {0: 0, 1: 0}
    try:
        np.testing.assert_allclose(agg.median(stack), ref.median(stack), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(agg.trimmed_mean(stack, 0.2), ref.trimmed_mean(stack, 0.2), rtol=1e-5, atol=1e-5)
    finally:
        _robust._NETWORK_MAX_N = limits


def test_select_path_survives_adversarial_orders():
    # sorted, reverse-sorted and organ-pipe columns: no quadratic blow-up, right answer
    n = 2001
    base = np.arange(n, dtype=np.float64)
    organ = np.concatenate([base[::2], base[1::2][::-1]])
    stack = np.stack([base, base[::-1], organ, np.zeros(n)], axis=1).copy()
    np.testing.assert_allclose(agg.median(stack), ref.median(stack))
    np.testing.assert_allclose(agg.trimmed_mean(stack, 0.3), ref.trimmed_mean(stack, 0.3))


def test_comparator_networks_sort_every_zero_one_input():
    # 0-1 principle: a network sorting all 2^n binary inputs sorts everything
    for n in range(2, 13):
        pairs = agg._batcher_pairs(n)
        for bits in range(2**n):
            v = [(bits >> i) & 1 for i in range(n)]
            for i, j in pairs:
                if v[i] > v[j]:
                    v[i], v[j] = v[j], v[i]
            assert v == sorted(v), (n, bits)


@pytest.mark.parametrize("n, f", [(10, 3), (21, 5), (101, 30)])
def test_median_and_trimmed_mean_resist_outliers(n, f):
    rng = np.random.default_rng(3)
    d = 200
    honest = rng.normal(1.0, 0.1, (n - f, d)).astype(np.float32)
    attacks = [honest[:f] * -100.0, np.full((f, d), 1e6, dtype=np.float32), honest[:f] * 1e4]
    for attack in attacks:
        stack = np.concatenate([attack.astype(np.float32), honest])
        assert np.abs(agg.median(stack) - 1.0).max() < 0.5
        assert np.abs(agg.trimmed_mean(stack, f / n + 1e-9) - 1.0).max() < 0.5
        assert np.abs(agg.weighted_mean(stack) - 1.0).max() > 1.0  # the plain mean is dragged away


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: agg.median(np.ones((0, 3), dtype=np.float32)), "empty"),
        (lambda: agg.median(np.ones(3, dtype=np.float32)), "2-D"),
        (lambda: agg.median(np.ones((2, 3), dtype=np.int32)), "int32"),
        (lambda: agg.median(np.array([[1.0, np.nan]])), r"update 0 has a non-finite value nan at index 1"),
        (lambda: agg.trimmed_mean(np.ones((4, 3)), 0.5), "beta = 0.5"),
        (lambda: agg.trimmed_mean(np.ones((4, 3)), -0.1), "beta = -0.1"),
        (lambda: agg.weighted_mean(np.ones((2, 3)), [1, -1]), r"weights\[1\] = -1.0"),
        (lambda: agg.weighted_mean(np.ones((2, 3)), [0, 0]), "sum to zero"),
        (lambda: agg.weighted_mean(np.ones((2, 3)), [1, 2, 3]), r"shape \(2,\)"),
        (lambda: agg.weighted_mean([np.ones(3), np.ones(4)]), "different shapes"),
    ],
)
def test_bad_stacks_raise_aggregation_error(call, match):
    with pytest.raises(AggregationError, match=match):
        call()


# ------------------------------------------------------------------------- Krum


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, f, m", [(7, 2, 1), (12, 3, 4), (30, 5, 10)])
def test_krum_matches_reference(dtype, n, f, m):
    rng = np.random.default_rng(n)
    stack = rng.standard_normal((n, 300)).astype(dtype)
    out, sel = agg.krum(stack, f, m)
    ref_out, ref_sel = ref.krum(stack, f, m)
    assert sorted(sel.tolist()) == sorted(ref_sel.tolist())
    assert out.dtype == dtype
    np.testing.assert_allclose(out, ref_out, **_tol(dtype))
    scores = agg._krum_scores(agg._pairwise_sq_dists(stack), f)
    np.testing.assert_allclose(scores, ref.krum_scores(stack, f), rtol=1e-9)


def test_krum_picks_the_honest_cluster():
    rng = np.random.default_rng(4)
    n, f, d = 15, 5, 1000
    honest = (rng.normal(0, 0.01, (n - f, d)) + 3.0).astype(np.float32)
    # attackers agree with each other but sit far away (a coordinated attack)
    byz = (rng.normal(0, 0.01, (f, d)) - 50.0).astype(np.float32)
    stack = np.concatenate([byz, honest])
    out, sel = agg.krum(stack, f)
    assert sel[0] >= f
    out_m, sel_m = agg.krum(stack, f, m=n - f)
    assert sorted(sel_m.tolist()) == list(range(f, n))
    np.testing.assert_allclose(out_m, honest.astype(np.float64).mean(0), rtol=1e-5)


def test_krum_distances_stay_accurate_for_large_offsets():
    # a common offset of 1e4 on nearly equal vectors: the Gram form must not lose them
    rng = np.random.default_rng(5)
    stack = (1e4 + rng.normal(0, 1e-2, (9, 5000))).astype(np.float64)
    dist = agg._pairwise_sq_dists(stack)
    np.testing.assert_allclose(dist, ref.pairwise_sq_dists(stack), rtol=1e-6)


def test_bulyan_resists_and_validates():
    rng = np.random.default_rng(6)
    n, f, d = 15, 3, 300
    honest = rng.normal(2.0, 0.1, (n - f, d))
    stack = np.concatenate([np.full((f, d), -1e3), honest])
    out, sel = agg.bulyan(stack, f)
    assert len(sel) == n - 2 * f and set(range(f)).isdisjoint(sel[: n - 3 * f].tolist())
    assert np.abs(out - 2.0).max() < 0.3
    with pytest.raises(AggregationError, match="at least 15 updates"):
        agg.bulyan(stack[:14], 3)


@pytest.mark.parametrize(
    "n, f, m, match",
    [(6, 2, 1, "at least 7 updates"), (7, -1, 1, "f = -1"), (7, 2, 0, "m = 0"), (7, 2, 6, "m = 6"),
     (7, 1.5, 1, "f = 1.5")],
)
def test_krum_validates(n, f, m, match):
    with pytest.raises(AggregationError, match=match):
        agg.krum(np.zeros((n, 4)), f, m)


# --------------------------------------------------------- norms, clipping, finiteness


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_clip_and_finiteness(dtype):
    rng = np.random.default_rng(7)
    vec = rng.standard_normal(10007).astype(dtype)
    norm = np.linalg.norm(vec.astype(np.float64))
    assert agg.l2_norm(vec) == pytest.approx(norm, rel=1e-12)
    clipped = agg.clip_norm(vec, norm / 4)
    assert clipped is not vec
    assert agg.l2_norm(clipped) == pytest.approx(norm / 4, rel=1e-5)
    np.testing.assert_allclose(clipped, vec / 4, **_tol(dtype))
    same = agg.clip_norm(vec, norm * 2)
    np.testing.assert_array_equal(same, vec)
    inplace = vec.copy()
    assert agg.clip_norm(inplace, 1.0, inplace=True) is inplace
    assert agg.l2_norm(inplace) == pytest.approx(1.0, rel=1e-5)
    assert agg.is_finite(vec)
    for pos in (0, 1023, 1024, 10006):
        bad = vec.copy()
        bad[pos] = np.inf if pos % 2 else np.nan
        assert not agg.is_finite(bad)
        assert agg.first_nonfinite(bad) == pos
    with pytest.raises(AggregationError, match="max_norm = 0"):
        agg.clip_norm(vec, 0)
    with pytest.raises(AggregationError, match="writable"):
        agg.clip_norm(vec[::2], 1.0, inplace=True)


# ---------------------------------------------------------------- feature statistics


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 50), min_size=1, max_size=8), seed=st.integers(0, 2**31))
def test_chan_merge_equals_pooled_statistics(sizes, seed):
    rng = np.random.default_rng(seed)
    if sum(sizes) == 0:
        sizes = sizes + [1]
    chunks = [rng.normal(rng.uniform(-100, 100), rng.uniform(0.01, 10), (s, 3)) for s in sizes]
    parts = [agg.feature_stats(c) for c in chunks]
    count, mean, m2 = agg.merge_stats(parts)
    rc, rmean, rm2 = ref.pooled_stats(chunks)
    assert count == rc
    np.testing.assert_allclose(mean, rmean, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(m2, rm2, rtol=1e-8, atol=1e-7)


def test_stats_to_scaler_floors_constant_features():
    x = np.array([[1.0, 5.0], [3.0, 5.0]])
    mean, std = agg.stats_to_scaler(*agg.feature_stats(x))
    assert mean.dtype == std.dtype == np.float32
    assert mean.tolist() == [2.0, 5.0]
    assert std.tolist() == [1.0, 1.0]  # std of column 0 is 1; column 1 is constant -> 1
    mean, std = agg.stats_to_scaler(*agg.feature_stats(x * 4))
    assert std.tolist() == [4.0, 1.0]


@pytest.mark.parametrize(
    "parts, match",
    [
        ([], "no statistics"),
        ([(2, [0.0], [-1.0])], "negative m2"),
        ([(2, [0.0], [1.0]), (2, [0.0, 1.0], [1.0, 1.0])], r"parts\[1\] has 2 features, expected 1"),
        ([(-1, [0.0], [1.0])], "count = -1"),
        ([(1, [np.nan], [0.0])], "non-finite"),
        ([(1, [0.0])], r"parts\[0\] is not"),
    ],
)
def test_merge_stats_validates(parts, match):
    with pytest.raises(AggregationError, match=match):
        agg.merge_stats(parts)


# ---------------------------------------------------------------- server optimisers


@pytest.mark.parametrize("rule", ["fedadagrad", "fedadam", "fedyogi"])
def test_server_optimiser_steps_match_reference(rule):
    rng = np.random.default_rng(8)
    d = 1001
    params = rng.standard_normal(d).astype(np.float32)
    m = np.zeros(d, dtype=np.float32)
    v = np.full(d, 1e-6, dtype=np.float32)
    rp, rm, rv = params.astype(np.float64), m.astype(np.float64), v.astype(np.float64)
    for _ in range(5):
        delta = rng.normal(0, 0.1, d).astype(np.float32)
        agg.server_opt_step(rule, params, delta, m, v, lr=0.05, beta1=0.9, beta2=0.99, tau=1e-3)
        rp, rm, rv = ref.fedopt(rule, rp, delta, rm, rv, 0.05, 0.9, 0.99, 1e-3)
    np.testing.assert_allclose(params, rp, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(m, rm, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(v, rv, rtol=1e-4, atol=1e-8)


def test_momentum_step_matches_reference():
    params = np.zeros(4, dtype=np.float32)
    mom = np.zeros(4, dtype=np.float32)
    delta = np.array([1, -1, 2, 0], dtype=np.float32)
    agg.momentum_step(params, delta, mom, lr=0.5, beta=0.9)
    agg.momentum_step(params, delta, mom, lr=0.5, beta=0.9)
    np.testing.assert_allclose(mom, delta * 1.9)
    np.testing.assert_allclose(params, 0.5 * delta + 0.5 * delta * 1.9)


def test_server_optimiser_validates():
    p = np.zeros(3, dtype=np.float32)
    with pytest.raises(AggregationError, match="rule = 'sgd'"):
        agg.server_opt_step("sgd", p, p.copy(), p.copy(), p.copy(), lr=0.1)
    with pytest.raises(AggregationError, match="v must be"):
        agg.server_opt_step("fedadam", p, p.copy(), p.copy(), np.zeros(4, dtype=np.float32), lr=0.1)
    with pytest.raises(AggregationError, match="params must be"):
        agg.momentum_step(np.zeros(3), p, p)


def test_docstring_examples_run():
    import doctest

    from fedgate.core import codec

    for module in (agg, codec):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__
