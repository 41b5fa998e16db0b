"""Buffered asynchronous federations on 127.0.0.1: the real server daemon and agent processes.

The fast agents' train tasks sleep 0.1 s, so a round (``buffer_size`` results) takes
at least that long whatever the machine's load, and a much slower agent's results are
a bounded number of rounds stale. Assertions are on the history (who contributed to
which round, what was refused), never on time.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedtools
from test_federation import Federation, _outbox_rounds, federation_factory, ols_on_scaled

pytestmark = pytest.mark.slow

FAST_S = 0.1


class AsyncFederation(Federation):
    """A :class:`Federation` in async mode whose agents can be paused (``pause(name)``)."""

    def __init__(self, root: Path, agents: list[str], *, extra_fed: dict[str, Any] | None = None,
                 **kw: Any) -> None:
        fed = {"mode": "async", "evaluate": False, **(extra_fed or {})}
        kw.setdefault("evaluate", False)
        super().__init__(root, agents, extra_fed=fed, **kw)

    def pause_file(self, name: str) -> Path:
        return self.root / f"{name}.pause"

    def start_agent(self, name: str, *, train_delay_s: float = 0.0, **extra: Any) -> None:
        super().start_agent(name, train_delay_s=train_delay_s, pause_file=self.pause_file(name), **extra)

    def contributions(self) -> dict[str, list[tuple[int, float]]]:
        """agent -> [(round, staleness)] of its accepted train results."""
        out: dict[str, list[tuple[int, float]]] = {n: [] for n in self.names}
        for agent, rnd, tau in self.query("SELECT agent, round, json_extract(metrics, '$.staleness') "
                                          "FROM agent_metrics WHERE kind = 'train' ORDER BY round"):
            out[agent].append((rnd, tau))
        return out

    def assert_each_task_accepted_at_most_once(self) -> None:
        # one statement, so one snapshot of a history the server may still be writing
        # (a round's rows are committed in one transaction; separate queries saw more rows)
        snapshot = self.query(
            "SELECT (SELECT SUM(n_accepted) FROM rounds WHERE kind = 'train'), "
            "(SELECT COUNT(*) FROM agent_metrics WHERE kind = 'train'), "
            "(SELECT COUNT(*) FROM agent_metrics m JOIN tasks t ON t.task_id = m.task_id WHERE m.kind = 'train'), "
            "(SELECT COUNT(*) FROM agent_metrics m JOIN tasks t ON t.task_id = m.task_id "
            "WHERE m.kind = 'train' AND t.status != 'accepted')")
        assert snapshot, "the server's history could not be read"
        accepted, rows, joined, not_accepted = snapshot[0]
        assert rows > 0 and accepted == rows
        assert joined == rows and not_accepted == 0


@pytest.fixture
def federations(tmp_path: Path) -> Iterator[Callable[..., AsyncFederation]]:
    yield from federation_factory(tmp_path, AsyncFederation)


def test_async_converges_and_fast_agents_do_not_wait_for_the_slow_one(federations, capsys):
    names = ["press-01", "press-02", "press-03", "press-04"]
    rounds = 40
    fed = federations("conv", names, rounds=rounds, min_agents=2, curve=False,
                      extra_fed={"buffer_size": 3, "max_staleness": 30, "min_available": 4})
    fed.start_server()
    for name in names[:3]:
        fed.start_agent(name, train_delay_s=FAST_S)
    fed.start_agent("press-04", train_delay_s=12 * FAST_S)  # min_available: all four in the statistics round
    fed.wait(lambda: fed.train_rounds_done() >= rounds, f"{rounds} async rounds", timeout_s=120)
    params = fed.final_params(rounds)
    X, y = fed.pooled_data()
    np.testing.assert_allclose(params, ols_on_scaled(X, y), rtol=0, atol=0.05)
    got = fed.contributions()
    slow = got["press-04"]
    # the slow agent got through, with stale results, and far less often than the fast ones
    assert slow and all(tau >= 1 for _, tau in slow)
    assert all(len(got[n]) > 2 * len(slow) for n in names[:3])
    # rounds closed without it: most of them hold no result of the slow agent
    assert rounds - len({r for r, _ in slow}) > rounds // 2
    sizes = fed.query("SELECT n_accepted FROM rounds WHERE kind = 'train'")
    assert {n for (n,) in sizes} == {3}
    fed.assert_each_task_accepted_at_most_once()
    fed.wait(lambda: all(not _outbox_rounds(fed, n) for n in names), "every outbox to empty", timeout_s=30)
    fed.wait(lambda: all((fed.root / f"{n}.model.round").exists()
                         and int((fed.root / f"{n}.model.round").read_text()) == rounds for n in names),
             f"agents to hold the model of round {rounds}", timeout_s=30)
    np.testing.assert_allclose(np.load(fed.root / "press-04.model.npy"), params, rtol=0, atol=1e-6)
    # fedgate-server status shows the mode and the mean staleness of the last round
    from fedgate.server.cli import main

    assert main(["status", "--config", str(fed.config)]) == 0
    out = capsys.readouterr().out
    assert "mode: async (buffer_size 3, max_staleness 30, staleness_exponent 0.5, concurrency any)" in out
    assert f"{rounds} of {rounds} train rounds committed" in out and "staleness" in out


def test_an_agent_stopped_longer_than_max_staleness_is_refused_as_stale_then_contributes(federations):
    names = ["line-a", "line-b", "line-c"]
    fed = federations("stale", names, rounds=400, min_agents=2, curve=False,
                      extra_fed={"buffer_size": 2, "max_staleness": 3})
    paused = fed.pause_file("line-c")
    paused.touch()  # line-c's first train task waits (a gateway that is stopped)
    fed.start_server()
    for name in names:
        fed.start_agent(name, train_delay_s=FAST_S)
    fed.wait(lambda: fed.count("SELECT COUNT(*) FROM tasks WHERE agent = 'line-c' AND kind = 'train'") >= 1,
             "a task for line-c")
    first = fed.count("SELECT MIN(round) FROM tasks WHERE agent = 'line-c' AND kind = 'train'")
    held = fed.query("SELECT task_id FROM tasks WHERE agent = 'line-c' AND kind = 'train'")
    fed.wait(lambda: fed.train_rounds_done() >= first + 3 + 2, "rounds past max_staleness")
    assert not fed.contributions()["line-c"]
    paused.unlink()
    stale = "SELECT task_id FROM rejections WHERE agent = 'line-c' AND reason = 'stale' ORDER BY id"
    fed.wait(lambda: bool(fed.query(stale)), "the stale refusal")
    assert fed.query(stale)[0] == held[0]  # the result of the task it held while stopped
    fed.wait(lambda: len(fed.contributions()["line-c"]) >= 3, "line-c to contribute again")
    assert all(tau <= 3 for _, tau in fed.contributions()["line-c"])
    assert held[0][0] not in {t for (t,) in fed.query("SELECT task_id FROM agent_metrics")}
    fed.assert_each_task_accepted_at_most_once()


def test_server_kill9_with_results_buffered_resumes_and_takes_each_task_once(federations):
    names = ["cell-1", "cell-2", "cell-3", "cell-4"]
    rounds = 14
    fed = federations("crash", names, rounds=rounds, min_agents=2, curve=True,
                      extra_fed={"buffer_size": 4, "max_staleness": 8})
    fed.start_server()
    for name in names[:3]:
        fed.start_agent(name, train_delay_s=FAST_S)
    fed.start_agent("cell-4", train_delay_s=6 * FAST_S)
    fed.wait(lambda: fed.train_rounds_done() >= 5, "5 rounds")
    # a result of the open round is in an agent's outbox (sent, buffered by the server)
    fed.wait(lambda: any(r > fed.train_rounds_done() for n in names for r in _outbox_rounds(fed, n)),
             "a buffered result")
    fedtools.kill9(fed.server)
    done_before = fed.train_rounds_done()
    assert done_before < rounds
    fed.start_server()
    fed.wait(lambda: fed.train_rounds_done() >= rounds, "the resumed run", timeout_s=120)
    fed.wait(lambda: all(not _outbox_rounds(fed, n) for n in names), "every outbox to empty", timeout_s=30)
    rows = fed.query("SELECT round FROM rounds WHERE kind = 'train' ORDER BY round")
    assert [r for (r,) in rows] == list(range(1, rounds + 1))
    fed.assert_each_task_accepted_at_most_once()
    fed.final_params(rounds)
    assert all(fed.agents[n].poll() is None for n in names)
