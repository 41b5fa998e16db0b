"""Strategies against NumPy references; Byzantine updates do not move the robust ones far."""
from __future__ import annotations

import numpy as np
import pytest

from fedgate.core.errors import AggregationError
from fedgate.server.config import StrategyName, StrategySection
from fedgate.server.strategies import FedAvg, make_strategy


def _run(cfg: StrategySection, g: np.ndarray, ups: list[np.ndarray], ws: list[float]) -> np.ndarray:
    s = make_strategy(cfg, g.size)
    s.begin(g, expected=len(ups))
    for u, w in zip(ups, ws):
        buf = s.buffer()
        buf[:] = u
        s.add(buf, w)
    assert s.count == len(ups)
    return s.apply(g, s.combine())


@pytest.fixture
def updates():
    rng = np.random.default_rng(1)
    g = rng.normal(size=64).astype(np.float32)
    ups = [(g + rng.normal(scale=0.1, size=64)).astype(np.float32) for _ in range(9)]
    ws = [float(w) for w in rng.integers(1, 50, size=9)]
    return g, ups, ws


def test_fedavg_is_the_weighted_mean(updates):
    g, ups, ws = updates
    for name in ("fedavg", "fedprox"):
        out = _run(StrategySection(name=StrategyName(name)), g, ups, ws)
        np.testing.assert_allclose(out, np.average(np.stack(ups), axis=0, weights=ws), rtol=1e-5, atol=1e-6)


def test_fedavg_memory_is_independent_of_agent_count():
    s = FedAvg(StrategySection(), 1000)
    s.begin(np.zeros(1000, np.float32), expected=10_000)
    before = s.buffer()
    for _ in range(50):
        b = s.buffer()
        b[:] = 1.0
        s.add(b, 1.0)
    assert s.buffer() is before  # one decode buffer reused, no per-agent copies
    np.testing.assert_allclose(s.combine(), 1.0)


def test_fedavgm_matches_reference(updates):
    g, ups, ws = updates
    cfg = StrategySection(name=StrategyName.FEDAVGM, server_lr=0.5, momentum=0.8)
    s = make_strategy(cfg, g.size)
    params, mom = g.copy(), np.zeros_like(g)
    for _ in range(3):
        s.begin(params, expected=len(ups))
        for u, w in zip(ups, ws):
            s.add(u, w)
        new = s.apply(params, s.combine())
        delta = np.average(np.stack(ups), axis=0, weights=ws) - params
        mom = 0.8 * mom + delta
        params_ref = params + 0.5 * mom
        np.testing.assert_allclose(new, params_ref, rtol=1e-4, atol=1e-5)
        params = new
    assert set(s.state()) == {"momentum"}


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_fedopt_matches_reference_and_state_round_trips(updates, name):
    g, ups, ws = updates
    cfg = StrategySection(name=StrategyName(name), server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    s = make_strategy(cfg, g.size)
    m, v, params = np.zeros_like(g, dtype=np.float64), np.full(g.size, 1e-6), g.astype(np.float64)
    for _ in range(3):
        s.begin(params.astype(np.float32), expected=len(ups))
        for u, w in zip(ups, ws):
            s.add(u, w)
        new = s.apply(params.astype(np.float32), s.combine())
        d = np.average(np.stack(ups).astype(np.float64), axis=0, weights=ws) - params
        m = 0.9 * m + 0.1 * d
        if name == "fedadam":
            v = 0.99 * v + 0.01 * d * d
        elif name == "fedyogi":
            v = v - 0.01 * d * d * np.sign(v - d * d)
        else:
            v = v + d * d
        params = params + 0.1 * m / (np.sqrt(v) + 1e-3)
        np.testing.assert_allclose(new, params, rtol=1e-3, atol=1e-4)
        params = new.astype(np.float64)
    state = {k: v.copy() for k, v in s.state().items()}
    other = make_strategy(cfg, g.size)
    other.load_state(state)
    for k in state:
        np.testing.assert_array_equal(other.state()[k], state[k])
    with pytest.raises(AggregationError):
        other.load_state({"nope": state["m"]})
    with pytest.raises(AggregationError):
        other.load_state({"m": state["m"][:3]})


def test_robust_rules_match_numpy(updates):
    g, ups, ws = updates
    stack = np.stack(ups)
    np.testing.assert_allclose(_run(StrategySection(name=StrategyName.MEDIAN), g, ups, ws),
                               np.median(stack, axis=0), rtol=1e-6)
    srt = np.sort(stack, axis=0)
    np.testing.assert_allclose(_run(StrategySection(name=StrategyName.TRIMMED_MEAN, trim_beta=0.2), g, ups, ws),
                               srt[1:-1].mean(axis=0), rtol=1e-5)
    krum = _run(StrategySection(name=StrategyName.KRUM, byzantine=2), g, ups, ws)
    assert any(np.array_equal(krum, u) for u in ups)


def _byzantine(kind: str, rng, g, n_honest=8, n_bad=2):
    step = rng.normal(scale=0.5, size=g.size)  # the direction honest training agrees on
    honest = [(g + step + rng.normal(scale=0.05, size=g.size)).astype(np.float32) for _ in range(n_honest)]
    if kind == "scaled":
        bad = [(g + 50 * (h - g)).astype(np.float32) for h in honest[:n_bad]]
    else:
        bad = [(g - 5 * (h - g)).astype(np.float32) for h in honest[:n_bad]]
    return honest, bad


@pytest.mark.parametrize("attack", ["scaled", "sign_flipped"])
@pytest.mark.parametrize("name,extra", [("median", {}), ("trimmed_mean", {"trim_beta": 0.2}),
                                        ("krum", {"byzantine": 2}), ("multikrum", {"byzantine": 2}),
                                        ("bulyan", {"byzantine": 1})])
def test_byzantine_updates_do_not_move_robust_rules_far(name, extra, attack):
    rng = np.random.default_rng(7)
    g = rng.normal(size=200).astype(np.float32)
    honest, bad = _byzantine(attack, rng, g, n_bad=1 if name == "bulyan" else 2)
    clean = np.mean(np.stack(honest), axis=0)
    cfg = StrategySection(name=StrategyName(name), **extra)
    robust = _run(cfg, g, honest + bad, [1.0] * (len(honest) + len(bad)))
    naive = _run(StrategySection(), g, honest + bad, [1.0] * (len(honest) + len(bad)))
    spread = np.linalg.norm(honest[0] - clean)
    assert np.linalg.norm(robust - clean) < 2 * spread
    assert np.linalg.norm(naive - clean) > 5 * spread  # the attack does hurt a plain mean


def test_empty_round_cannot_be_combined():
    s = make_strategy(StrategySection(name=StrategyName.MEDIAN), 4)
    s.begin(np.zeros(4, np.float32), expected=2)
    with pytest.raises(AggregationError):
        s.combine()


def test_stack_grows_past_expected():
    s = make_strategy(StrategySection(name=StrategyName.MEDIAN), 3)
    s.begin(np.zeros(3, np.float32), expected=1)
    for v in (1.0, 2.0, 3.0):
        s.add(np.full(3, v, np.float32), 1.0)
    np.testing.assert_array_equal(s.combine(), [2.0, 2.0, 2.0])
