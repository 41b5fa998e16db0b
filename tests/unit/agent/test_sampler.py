"""The sampler: grid alignment, gaps, quality, every aggregate, look-ahead labels."""
from __future__ import annotations

import numpy as np
import pytest

from fedgate.agent.config import Agg, FeatureConfig, LabelConfig, SamplesConfig
from fedgate.agent.sampler import AGG_ORDER, Sampler, window_aggregates
from fedgate.drivers import Quality, TagValue


def TV(name: str, value: object, ts: float, quality: str = "good") -> TagValue:
    """A reading as the drivers deliver it."""
    return TagValue(name, value, ts, Quality(quality))


def _cfg(*, grid=1.0, window=4.0, hop=4.0, cov=1.0, gap=1.0, aggs=("mean",), horizon=None, label_agg="max",
         delay=0.0) -> SamplesConfig:
    feats = tuple(FeatureConfig(name=f"x_{a}", tag="m.x", agg=Agg(a)) for a in aggs)
    label = None if horizon is None else LabelConfig(name="fault", tag="m.f", agg=Agg(label_agg), horizon_s=horizon)
    return SamplesConfig(grid_s=grid, window_s=window, hop_s=hop, min_coverage=cov, max_gap_s=gap, delay_s=delay,
                         features=feats, label=label)


def _reference(x: np.ndarray, t: np.ndarray) -> dict[Agg, float]:
    slope = np.polyfit(t, x, 1)[0] if len(x) > 1 else 0.0
    return {
        Agg.LAST: x[-1], Agg.MEAN: x.mean(), Agg.MIN: x.min(), Agg.MAX: x.max(), Agg.STD: x.std(),
        Agg.RMS: np.sqrt((x * x).mean()), Agg.DELTA: x[-1] - x[0], Agg.SLOPE: slope,
    }


def test_window_aggregates_match_numpy_reference_with_gaps():
    rng = np.random.default_rng(7)
    w, c = 50, 6
    x = rng.normal(3.0, 2.0, (w, c))
    ok = rng.random((w, c)) > 0.3
    ok[:, 5] = False  # a column without a valid point
    ok[:, 4] = False
    ok[17, 4] = True  # a single point: std 0, slope 0, delta 0
    x[~ok] = 1e9  # ignored values must not leak in
    t = np.arange(w, dtype=float) * 0.5 - 24.5
    table = window_aggregates(x, ok, t)
    assert table.shape == (len(AGG_ORDER), c)
    for j in range(4):
        ref = _reference(x[ok[:, j], j], t[ok[:, j]])
        for i, agg in enumerate(AGG_ORDER):
            assert table[i, j] == pytest.approx(ref[agg], rel=1e-10, abs=1e-10), (agg, j)
    single = {agg: table[i, 4] for i, agg in enumerate(AGG_ORDER)}
    assert single[Agg.STD] == 0 and single[Agg.SLOPE] == 0 and single[Agg.DELTA] == 0
    assert single[Agg.LAST] == single[Agg.MEAN] == x[17, 4]
    assert np.isnan(table[:, 5]).all()


@pytest.mark.parametrize("agg", [a.value for a in Agg])
def test_each_aggregate_through_the_sampler(agg):
    s = Sampler(_cfg(aggs=(agg,), window=5, hop=5), start_s=100.0)
    values = [4.0, -1.0, 2.5, 7.0, 3.0]
    s.feed(TV("m.x", v, 101.0 + i) for i, v in enumerate(values))  # ticks 101..105
    windows, _ = s.advance(105.0)
    assert [w.t_end for w in windows] == [105.0]
    ref = _reference(np.array(values), np.arange(5.0))[Agg(agg)]
    assert windows[0].features[0] == pytest.approx(ref)


def test_grid_alignment_and_forward_fill_stop_at_max_gap():
    # values at irregular times; grid 1 s; max_gap 1.5 s
    s = Sampler(_cfg(aggs=("last",), window=1, hop=1, gap=1.5), start_s=10.0)
    s.feed([TV("m.x", 1.0, 9.7), TV("m.x", 2.0, 11.2), TV("m.x", 3.0, 11.9), TV("m.x", 4.0, 15.0)])
    windows, _ = s.advance(17.0)
    got = {w.t_end: float(w.features[0]) for w in windows}
    # t=10: 9.7 (age .3); 11: 9.7 age 1.3; 12: 11.9; 13: 11.9 age 1.1; 14: age 2.1 -> missing;
    # 15: exact timestamp counts; 16: 15 age 1; 17: age 2 -> missing
    assert got == {10.0: 1.0, 11.0: 1.0, 12.0: 3.0, 13.0: 3.0, 15.0: 4.0, 16.0: 4.0}
    assert s.counters["windows_low_coverage"] == 2


def test_min_coverage_counts_points_per_tag():
    s = Sampler(_cfg(window=10, hop=10, cov=0.7, gap=0.0), start_s=1.0)
    # window (0, 10]: ticks 1..10; values on 7 of them -> kept; next window 11..20: 6 -> dropped
    s.feed(TV("m.x", 1.0, float(t)) for t in [1, 2, 3, 5, 6, 8, 10, 11, 12, 14, 16, 18, 20])
    windows, _ = s.advance(20.0)
    assert [w.t_end for w in windows] == [10.0]
    assert s.counters["windows_low_coverage"] == 1


@pytest.mark.parametrize("bad", [TV("m.x", 5.0, 3.0, "stale"), TV("m.x", 5.0, 3.0, "bad_range"),
                                 TV("m.x", None, 3.0, "good"), TV("m.x", "ERR", 3.0, "good"),
                                 TV("m.x", float("nan"), 3.0, "good")])
def test_a_stale_or_bad_value_makes_the_window_invalid(bad):
    s = Sampler(_cfg(window=4, hop=4, cov=0.5, gap=0.0), start_s=1.0)
    s.feed([TV("m.x", 1.0, 1.0), TV("m.x", 1.0, 2.0), bad, TV("m.x", 1.0, 4.0)])
    s.feed(TV("m.x", 1.0, float(t)) for t in range(5, 9))
    windows, _ = s.advance(8.0)
    assert [w.t_end for w in windows] == [8.0]  # (0,4] refused, (4,8] fine
    assert s.counters["windows_bad_quality"] == 1


def _ground_truth_run(horizon: float, step: float):
    """A fault signal with known times; returns samples from advancing in steps of ``step``."""
    cfg = _cfg(window=3, hop=1, horizon=horizon, aggs=("mean",))
    s = Sampler(cfg, start_s=0.0)
    fault_at = {7, 8, 20}
    for t in range(0, 40):
        s.feed([TV("m.x", float(t), float(t)), TV("m.f", bool(t in fault_at), float(t))])
    samples, windows = [], []
    now = 0.0
    while now < 39:
        now = min(now + step, 39.0)
        w, smp = s.advance(now)
        windows += w
        samples += smp
    return s, windows, samples, fault_at


@pytest.mark.parametrize("step", [1.0, 7.0, 50.0])
def test_look_ahead_labels_cover_t_exclusive_to_t_plus_horizon_inclusive(step):
    s, windows, samples, fault_at = _ground_truth_run(horizon=3.0, step=step)
    by_t = {smp.t_end: smp for smp in samples}
    assert len(by_t) == len(samples)
    for t_end, smp in by_t.items():
        expected = float(any(t_end < f <= t_end + 3.0 for f in fault_at))
        assert smp.label == expected, t_end
        assert smp.features[0] == pytest.approx(t_end - 1.0)  # mean of t-2, t-1, t
    assert by_t[4.0].label == 1.0 and by_t[5.0].label == 1.0  # 7 in (4, 7], (5, 8]
    assert by_t[8.0].label == 0.0  # the fault at 8 itself is not in (8, 11]
    assert by_t[17.0].label == 1.0 and by_t[16.0].label == 0.0
    # windows at 2..39 (t=0,1 lack history); samples only once the horizon passed (<= 39 - 3)
    assert max(by_t) == 36.0 and min(by_t) == 2.0
    assert s.pending == 3


def test_windows_are_held_until_the_horizon_has_passed():
    cfg = _cfg(window=2, hop=2, horizon=4.0)
    s = Sampler(cfg, start_s=0.0)
    for t in range(0, 12):
        s.feed([TV("m.x", 1.0, float(t)), TV("m.f", 0.0, float(t))])
    w, smp = s.advance(2.0)
    assert [x.t_end for x in w] == [2.0] and smp == []
    w, smp = s.advance(5.0)
    assert smp == [] and s.pending == 2
    w, smp = s.advance(6.0)
    assert [x.t_end for x in smp] == [2.0]


def test_horizon_zero_labels_the_window_itself():
    s = Sampler(_cfg(window=3, hop=3, horizon=0.0, label_agg="mean"), start_s=1.0)
    for t in range(1, 7):
        s.feed([TV("m.x", 1.0, float(t)), TV("m.f", float(t), float(t))])
    _, smp = s.advance(6.0)
    assert [(x.t_end, x.label) for x in smp] == [(3.0, 2.0), (6.0, 5.0)]


def test_a_label_over_missing_data_drops_the_sample():
    s = Sampler(_cfg(window=2, hop=2, horizon=2.0, gap=0.0), start_s=1.0)
    for t in range(1, 9):
        s.feed([TV("m.x", 1.0, float(t))])
        if t not in (5, 6):
            s.feed([TV("m.f", 0.0, float(t))])
    w, smp = s.advance(10.0)
    assert [x.t_end for x in w] == [2.0, 4.0, 6.0, 8.0]
    assert [x.t_end for x in smp] == [2.0, 6.0]  # (4, 6] and (8, 10] have no label data
    assert s.counters["labels_invalid"] == 2


def test_incremental_and_one_shot_advance_agree():
    rng = np.random.default_rng(3)
    cfg = _cfg(grid=0.5, window=5.0, hop=1.5, cov=0.8, gap=0.6, aggs=[a.value for a in Agg], horizon=2.0)
    ts = np.sort(rng.uniform(0, 60, 400))
    vals = [TV("m.x", float(v), float(t)) for t, v in zip(ts, rng.normal(size=ts.size))]
    flt = [TV("m.f", float(v > 1.5), float(t)) for t, v in zip(ts, rng.normal(size=ts.size))]
    a, b = Sampler(cfg, start_s=0.0), Sampler(cfg, start_s=0.0)
    a.feed(vals), a.feed(flt)
    wa, sa = a.advance(60.0)
    wb, sb = [], []
    feed = sorted(vals + flt, key=lambda v: v.ts)
    i = 0
    for now in np.arange(0.25, 60.01, 0.25):
        while i < len(feed) and feed[i].ts <= now:
            b.feed([feed[i]])
            i += 1
        w, smp = b.advance(float(now))
        wb += w
        sb += smp
    assert [w.t_end for w in wa] == [w.t_end for w in wb] and len(wa) > 5
    for x, y in zip(wa, wb):
        np.testing.assert_allclose(x.features, y.features)
    assert [(x.t_end, x.label) for x in sa] == [(x.t_end, x.label) for x in sb] and len(sa) > 5


def test_out_of_order_values_are_counted_and_ignored():
    s = Sampler(_cfg(window=1, hop=1, aggs=("last",)), start_s=1.0)
    s.feed([TV("m.x", 1.0, 1.0), TV("m.x", 9.0, 0.5), TV("m.x", 2.0, 2.0), TV("other.tag", 5.0, 2.0)])
    w, _ = s.advance(2.0)
    assert [float(x.features[0]) for x in w] == [1.0, 2.0]
    assert s.counters["values_out_of_order"] == 1


def test_a_long_stall_skips_ahead_without_unbounded_work():
    s = Sampler(_cfg(window=2, hop=2), start_s=0.0)
    s.feed([TV("m.x", 1.0, 0.0)])
    s.advance(1.0)
    s.feed([TV("m.x", 1.0, 1e6 - 1), TV("m.x", 1.0, 1e6)])
    w, _ = s.advance(1e6)
    assert s.counters["ticks_skipped"] > 0
    assert [x.t_end for x in w] == [1e6]


def test_delay_waits_for_late_values():
    s = Sampler(_cfg(window=1, hop=1, aggs=("last",), delay=0.5), start_s=1.0)
    s.feed([TV("m.x", 1.0, 1.0)])
    assert s.advance(1.4) == ([], [])
    w, _ = s.advance(1.5)
    assert [x.t_end for x in w] == [1.0]
    assert s.next_tick_s() == pytest.approx(2.5)


def test_next_due_is_the_next_window_end_or_label():
    s = Sampler(_cfg(window=4, hop=4, horizon=2.0, delay=0.5), start_s=1.0)
    s.feed([TV("m.x", 1.0, float(t)) for t in range(1, 12)] + [TV("m.f", 0.0, float(t)) for t in range(1, 12)])
    assert s.next_due_s() == 0.0  # not started: advance now
    s.advance(1.5)  # closes tick 1
    assert s.next_due_s() == pytest.approx(4.5)  # the window ending at 4
    w, _ = s.advance(4.5)
    assert [x.t_end for x in w] == [4.0]
    assert s.next_due_s() == pytest.approx(6.5)  # its label, due at 4 + 2
    _, smp = s.advance(6.5)
    assert [x.t_end for x in smp] == [4.0] and s.next_due_s() == pytest.approx(8.5)
