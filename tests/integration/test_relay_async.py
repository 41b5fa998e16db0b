"""Relays as agents of a headquarters in buffered asynchronous mode, on 127.0.0.1.

The rig is :class:`test_relay.Tier` (headquarters, relays and gateways as real processes,
CURVE everywhere) with headquarters' ``[federation] mode = "async"``. Async train tasks
ask for deltas (``codec_params.delta = true``): a relay forwards that codec to its
gateways, combines their models and answers headquarters with its combination minus
the task's global model, like any agent. A relay killed under such a headquarters
runs its interrupted local round again (or headquarters gives it a fresh task) and
nothing is taken twice.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fedtools  # noqa: E402
from test_federation import federation_factory, ols_on_scaled, outbox_rounds_at  # noqa: E402
from test_relay import N_FEATURES, Tier  # noqa: E402

pytestmark = pytest.mark.slow

ROUNDS = 40
N_SAMPLES = 150  # per gateway (Tier's agents)
MAX_STALENESS = 4
# every gateway's train task sleeps 0.1 s: a relay (two hops) answers about as often as the
# direct gateway, so all three of headquarters' agents contribute, each a few rounds stale at most
DELAYS = {f"gw_{i}": 0.1 for i in range(1, 6)}


def _async_fed(n_direct: int) -> dict[str, Any]:
    # two results close a round; every direct agent (relay or gateway) is in the statistics round
    return {"mode": "async", "evaluate": False, "buffer_size": 2, "max_staleness": MAX_STALENESS,
            "min_agents": 2, "min_available": n_direct}


@pytest.fixture
def tiers(tmp_path: Path) -> Iterator[Callable[..., Tier]]:
    yield from federation_factory(tmp_path, Tier)


def _pooled(tier: Tier) -> tuple[np.ndarray, np.ndarray]:
    parts = [fedtools.agent_data(10 + int(gw.split("-")[1]), N_SAMPLES, N_FEATURES) for gw in tier.gateways]
    return np.vstack([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _accepted_once(tier: Tier) -> tuple[int, int]:
    """(accepted results, rounds) from one snapshot of headquarters' history; asserts each task counted once."""
    snapshot = tier.query(
        "SELECT (SELECT SUM(n_accepted) FROM rounds WHERE kind = 'train'), "
        "(SELECT COUNT(*) FROM agent_metrics WHERE kind = 'train'), "
        "(SELECT COUNT(DISTINCT task_id) FROM agent_metrics WHERE kind = 'train'), "
        "(SELECT COUNT(*) FROM agent_metrics m JOIN tasks t ON t.task_id = m.task_id "
        "WHERE m.kind = 'train' AND t.status = 'accepted'), "
        "(SELECT COUNT(*) FROM rounds WHERE kind = 'train')")
    assert snapshot, "headquarters' history could not be read"
    accepted, rows, distinct, joined, rounds = snapshot[0]
    assert rows > 0 and accepted == rows == distinct == joined
    return rows, rounds


def _run(tier: Tier) -> np.ndarray:
    tier.start_all(**DELAYS)
    tier.wait(lambda: tier.train_rounds_done() >= ROUNDS, f"{ROUNDS} async rounds", timeout_s=150)
    ckpt = tier.checkpoint(tier.hq_dir, ROUNDS)
    assert ckpt.round == ROUNDS
    return ckpt.arrays["params"].astype(np.float64)


def test_async_headquarters_with_two_relays_and_a_direct_gateway(tiers):
    flat = tiers("flat", rounds=ROUNDS, flat=True, evaluate=False, hq_fed=_async_fed(5))
    want = _run(flat)
    flat.shutdown()

    tier = tiers("tier", rounds=ROUNDS, evaluate=False, hq_fed=_async_fed(3))
    got = _run(tier)
    assert np.all(np.isfinite(got))
    # the federation finished its rounds, each one closed by two accepted results taken once
    assert tier.query("SELECT round, n_accepted FROM rounds WHERE kind = 'train' ORDER BY round") == \
        [(r, 2) for r in range(1, ROUNDS + 1)]
    accepted, _ = _accepted_once(tier)
    assert accepted == 2 * ROUNDS
    agents = {a for (a,) in tier.query("SELECT DISTINCT agent FROM agent_metrics WHERE kind = 'train'")}
    assert agents == {"relay-a", "relay-b", "gw-5"}
    # a relay's answer weighs its two gateways' samples
    weights = {n for (n,) in tier.query("SELECT n_samples FROM agent_metrics WHERE kind = 'train' "
                                        "AND agent LIKE 'relay-%'")}
    assert weights == {2 * N_SAMPLES}
    stale = tier.query("SELECT MAX(json_extract(metrics, '$.staleness')) FROM agent_metrics WHERE kind = 'train'")
    assert stale[0][0] is not None and stale[0][0] <= MAX_STALENESS

    # both runs end near the pooled least-squares optimum (features scaled by the pooled
    # statistics the statistics round computes): async order moves the exact model, not where it goes
    X, y = _pooled(tier)
    opt = ols_on_scaled(X, y)
    np.testing.assert_allclose(want, opt, rtol=0, atol=0.05)
    np.testing.assert_allclose(got, opt, rtol=0, atol=0.05)
    np.testing.assert_allclose(got, want, rtol=0, atol=0.1)

    # headquarters' last commit reached the relays: they checkpoint its model and their
    # gateways (and the relays' own outboxes towards headquarters) end empty
    for name, relay in tier.relays.items():
        ckpt = tier.checkpoint(relay["data"], ROUNDS)
        np.testing.assert_array_equal(ckpt.arrays["params"].astype(np.float64), got, err_msg=name)
    tier.wait(lambda: all(not outbox_rounds_at(tier.root / f"{gw}.db") for gw in tier.gateways),
              "the gateways' outboxes to empty", timeout_s=30)
    tier.wait(lambda: all(not outbox_rounds_at(relay["data"] / "relay.db") for relay in tier.relays.values()),
              "the relays' outboxes to empty", timeout_s=30)
    tier.wait(lambda: all((tier.root / f"{gw}.model.round").exists()
                          and int((tier.root / f"{gw}.model.round").read_text()) == ROUNDS for gw in tier.gateways),
              "gateways to hold the final model", timeout_s=30)
    for gw in tier.gateways:
        np.testing.assert_allclose(np.load(tier.root / f"{gw}.model.npy"), got, rtol=0, atol=1e-6, err_msg=gw)
    for name in tier.gateways:
        assert fedtools.stop(tier.procs[name]) == 0, tier.log(name)
    for name in ("relay-a", "relay-b", "hq"):
        assert fedtools.stop(tier.procs[name]) == 0, tier.log(name)


def test_relay_killed_under_an_async_headquarters_rejoins_and_nothing_is_taken_twice(tiers):
    tier = tiers("crash", rounds=ROUNDS, evaluate=False, hq_fed=_async_fed(3))
    tier.start_all(**DELAYS)
    tier.wait(lambda: tier.train_rounds_done() >= 5, "5 async rounds")
    relay_a = tier.relays["relay-a"]
    # relay-a holds a task of headquarters (an answer in its outbox or a local round under way)
    tier.wait(lambda: tier.query("SELECT COUNT(*) FROM tasks WHERE agent = 'relay-a' AND kind = 'train' "
                                 "AND status = 'issued'")[0][0] >= 1, "an outstanding task of relay-a")
    fedtools.kill9(tier.procs["relay-a"])
    killed_at = tier.train_rounds_done()
    # headquarters goes on with relay-b and gw-5
    tier.wait(lambda: tier.train_rounds_done() >= killed_at + 3, "rounds without relay-a")
    tier.start_relay("relay-a")
    tier.wait(lambda: tier.train_rounds_done() >= ROUNDS, f"{ROUNDS} async rounds", timeout_s=150)
    got = tier.checkpoint(tier.hq_dir, ROUNDS).arrays["params"].astype(np.float64)
    assert tier.query("SELECT round, n_accepted FROM rounds WHERE kind = 'train' ORDER BY round") == \
        [(r, 2) for r in range(1, ROUNDS + 1)]
    _accepted_once(tier)
    later = tier.query("SELECT COUNT(*) FROM agent_metrics WHERE kind = 'train' AND agent = 'relay-a' "
                       "AND round > ?", (killed_at + 3,))
    assert later[0][0] >= 1  # the restarted relay contributes again
    X, y = _pooled(tier)
    np.testing.assert_allclose(got, ols_on_scaled(X, y), rtol=0, atol=0.05)
    tier.checkpoint(relay_a["data"], ROUNDS)  # headquarters' last commit reached the restarted relay
    tier.wait(lambda: all(not outbox_rounds_at(tier.root / f"{gw}.db") for gw in tier.gateways),
              "the gateways' outboxes to empty", timeout_s=30)
    tier.wait(lambda: all(not outbox_rounds_at(relay["data"] / "relay.db") for relay in tier.relays.values()),
              "the relays' outboxes to empty", timeout_s=30)
