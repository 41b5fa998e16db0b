"""Paced train rounds (``round_interval``) and the live ``[federation]`` keys of a reload.

The synchronous coordinator driven directly: real history and checkpoints, a recording
send function and a clock the test moves.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedgate.core import codec
from fedgate.core.errors import ConfigError
from fedgate.core.protocol import MsgType, decode, encode
from fedgate.server.config import load_config
from fedgate.server.coordinator import Coordinator
from fedgate.server.metrics import ServerMetrics
from fedgate.server.schedule import merge_live
from fedgate.server.spec import load_model_spec
from fedgate.server.store import CheckpointStore, History

from test_server_support import FEATURES, write_config

A, B = "gw-a", "gw-b"


class Rig:
    def __init__(self, tmp_path: Path, strategy: dict[str, Any] | None = None, **federation: Any) -> None:
        self.tmp_path = tmp_path
        self.cfg = load_config(write_config(tmp_path, strategy=strategy, federation={
            "statistics": False, "rounds": 3, "min_agents": 2, "round_interval": "10s", **federation}))
        self.now = 1000.0
        self.sent: list[tuple[str, str, dict[str, Any]]] = []
        self.metrics = ServerMetrics()
        self.start()

    def start(self) -> None:
        self.history = History(self.tmp_path / "history.db")
        self.co = Coordinator(self.cfg, load_model_spec(self.cfg.federation.model, seed=0), self._send,
                              history=self.history, checkpoints=CheckpointStore(self.tmp_path / "ckpt"),
                              metrics=self.metrics, population=lambda: 2, clock=lambda: self.now)

    def restart(self) -> None:
        self.close()
        self.start()
        self.hello()

    def _send(self, rid: bytes, frames: list[Any]) -> bool:
        msg = decode([bytes(f) for f in frames])
        self.sent.append((rid.decode(), msg.type.value, msg.fields))
        return True

    def hello(self) -> None:
        for name in (A, B):
            self.co.handle(name.encode(), None, encode(MsgType.HELLO, {
                "agent": name, "software": "test", "features": FEATURES, "n_samples": 10}))

    def advance(self, dt_s: float) -> None:
        """Move the clock; the agents stay alive (a heartbeat each)."""
        self.now += dt_s
        for name in (A, B):
            self.co.handle(name.encode(), None, encode(MsgType.HEARTBEAT, {"agent": name}))

    def tasks(self) -> dict[str, dict[str, Any]]:
        """The train tasks sent since the last call, by agent."""
        got = {name: f for name, t, f in self.sent if t == "task" and f["kind"] == "train"}
        self.sent.clear()
        return got

    def run_round(self) -> int:
        """Answer the open round's tasks (every agent adds 1.0); the round number."""
        got = self.tasks()
        assert sorted(got) == [A, B], got
        rnd = got[A]["round"]
        for name, f in got.items():
            params = (self.co.params + 1.0).astype(np.float32)
            self.co.handle(name.encode(), None, encode(MsgType.RESULT, {
                "agent": name, "task_id": f["task_id"], "round": rnd, "kind": "train", "n_samples": 10,
                "metrics": {"loss": 1.0}}, codec.encode(params, "f32")))
        assert self.co.committed == rnd
        self.co.writer.wait()
        self.co.tick()
        return rnd

    def close(self) -> None:
        self.co.close()
        self.history.close()


@pytest.fixture
def rig(tmp_path: Path):
    r = Rig(tmp_path)
    r.hello()
    yield r
    r.close()


def test_a_train_round_starts_only_round_interval_after_the_previous_one_started(rig: Rig):
    rig.co.tick()
    assert rig.run_round() == 1                    # the first round starts at once
    assert rig.co.open is None and rig.tasks() == {}
    rig.advance(9.9)
    rig.co.tick()
    assert rig.co.open is None and rig.tasks() == {}
    assert rig.co.schedule.wait_s(rig.now) == pytest.approx(0.1)
    assert rig.metrics.value("fedgate_server_next_round_start_timestamp_seconds") > 0
    rig.advance(0.1)
    rig.co.tick()
    assert rig.co.open.round == 2
    assert rig.metrics.value("fedgate_server_next_round_start_timestamp_seconds") == 0
    assert rig.run_round() == 2
    started = [s for (s,) in rig.history.db.execute("SELECT started FROM rounds WHERE kind = 'train' ORDER BY round")]
    assert len(started) == 2


def test_a_round_that_took_longer_than_the_interval_is_followed_at_once(rig: Rig):
    rig.co.tick()
    rig.advance(25.0)  # the round itself took 25 s of a 10 s interval
    assert rig.run_round() == 1
    assert rig.co.open is not None and rig.co.open.round == 2  # opened by the close itself
    assert sorted(rig.tasks()) == [A, B]


def test_a_restarted_server_keeps_the_pace_from_its_history(rig: Rig):
    rig.co.tick()
    rig.run_round()
    rig.restart()                                  # the clock has not moved: round 2 still waits
    rig.co.tick()
    assert rig.co.open is None and rig.tasks() == {}
    assert 9.0 < rig.co.schedule.wait_s(rig.now) <= 10.0
    rig.advance(10.0)
    rig.co.tick()
    assert rig.run_round() == 2


def test_reconfigure_raises_rounds_and_changes_the_next_tasks_hyper_parameters(tmp_path: Path):
    r = Rig(tmp_path, rounds=1, round_interval="0s", lr=0.01)
    r.hello()
    try:
        r.co.tick()
        assert r.run_round() == 1
        r.co.tick()
        assert r.co.finished and r.tasks() == {}
        new = dataclasses.replace(r.cfg.federation, rounds=2, lr=0.5, round_timeout_s=7.0, codec="q8")
        applied, restart = r.co.reconfigure(new)
        assert applied == ["rounds", "round_timeout_s", "lr"] and restart == ["codec"]
        assert r.co.fed.codec == "f32" and r.co.cfg.federation.rounds == 2
        r.co.tick()
        got = r.tasks()
        assert got[A]["round"] == 2 and got[A]["hyper"]["lr"] == 0.5 and got[A]["deadline_s"] == 7.0
        assert got[A]["codec"] == "f32"            # not live: still the running codec
    finally:
        r.close()


def test_reconfigure_lowering_rounds_ends_the_federation_after_the_open_round(tmp_path: Path):
    r = Rig(tmp_path, rounds=5, round_interval="0s")
    r.hello()
    try:
        r.co.tick()
        r.co.reconfigure(dataclasses.replace(r.cfg.federation, rounds=1))
        assert r.run_round() == 1                  # the open round finishes
        r.co.tick()
        assert r.co.finished and r.co.open is None and r.tasks() == {}
    finally:
        r.close()


def test_reconfigure_refuses_live_keys_that_break_the_running_strategy(tmp_path: Path):
    r = Rig(tmp_path, strategy={"name": "krum", "byzantine": 1}, min_agents=5)
    try:
        with pytest.raises(ConfigError, match="min_agents >= 5"):
            r.co.reconfigure(dataclasses.replace(r.cfg.federation, min_agents=2))
        assert r.co.fed.min_agents == 5            # nothing applied
    finally:
        r.close()


def test_reconfigure_interval_applies_to_the_waiting_round(rig: Rig):
    rig.co.tick()
    rig.run_round()
    rig.co.tick()
    assert rig.co.open is None
    rig.co.reconfigure(dataclasses.replace(rig.cfg.federation, round_interval_s=0.0))
    rig.co.tick()
    assert rig.run_round() == 2


def test_merge_live_names_what_waits_for_a_restart(tmp_path: Path):
    fed = load_config(write_config(tmp_path)).federation
    same, applied, restart = merge_live(fed, fed)
    assert same is fed and applied == [] and restart == []
    new = dataclasses.replace(fed, fraction=0.5, label="z", features=("a", "b"))
    merged, applied, restart = merge_live(fed, new)
    assert applied == ["fraction"] and restart == ["features", "label"]
    assert merged.fraction == 0.5 and merged.label == fed.label
    _, applied, restart = merge_live(fed, new, live=())
    assert applied == [] and restart == ["features", "label", "fraction"]


@pytest.mark.parametrize(("extra", "match"), [
    ({"mode": "async"}, "round_interval paces sync rounds"),
    ({"round_interval": "-1s"}, "round_interval"),
])
def test_round_interval_config_errors(tmp_path: Path, extra: dict[str, Any], match: str):
    with pytest.raises(ConfigError, match=match):
        load_config(write_config(tmp_path, federation={"round_interval": "1h", **extra}))


def test_history_retention_deletes_the_per_task_rows_of_old_rounds_in_batches(tmp_path: Path):
    r = Rig(tmp_path, round_interval="0s", rounds=4)
    r.cfg = dataclasses.replace(r.cfg, server=dataclasses.replace(r.cfg.server, history_retention_s=30 * 86400.0))
    r.close()
    r.start()
    r.hello()
    try:
        r.co.tick()
        for _ in range(3):
            r.run_round()
        db = r.history.db
        r.co.handle(A.encode(), None, encode(MsgType.RESULT, {  # a refusal: a rejections row
            "agent": A, "task_id": "f" * 32, "round": 4, "kind": "train", "n_samples": 1, "metrics": {}},
            codec.encode(np.zeros(3, dtype=np.float32), "f32")))
        assert db.execute("SELECT COUNT(*) FROM rejections").fetchone()[0] == 1
        with db:  # rounds 1 and 2 (and the refusal) are 40 days old
            db.execute("UPDATE rounds SET started = started - 40 * 86400, finished = finished - 40 * 86400 "
                       "WHERE round <= 2")
            db.execute("UPDATE rejections SET ts = ts - 40 * 86400")
        r.co.pruner.BATCH_EVERY_S = 0.0
        r.advance(3600.0)  # the next look (the first, at the start, found nothing old)
        r.co.tick()
        r.co.tick()
        r.co.tick()
        per_round = dict(db.execute("SELECT round, COUNT(*) FROM tasks GROUP BY round").fetchall())
        assert per_round == {3: 2, 4: 2}              # round 3 (recent) and the open round 4 stay
        assert sorted(x for (x,) in db.execute("SELECT DISTINCT round FROM agent_metrics")) == [3]
        assert db.execute("SELECT COUNT(*) FROM rejections").fetchone()[0] == 0
        assert db.execute("SELECT COUNT(*) FROM rounds WHERE kind = 'train'").fetchone()[0] == 3  # a row per round stays
        assert r.metrics.value("fedgate_server_history_rows_deleted_total") == 4 + 1
    finally:
        r.close()


def test_history_prune_keeps_rounds_a_result_may_still_need(tmp_path: Path):
    h = History(tmp_path / "h.db")
    try:
        from fedgate.server.store import TaskRow
        h.add_tasks([TaskRow(f"{i:032x}", i // 10, "train", f"gw-{i % 10}", 0.0, "accepted") for i in range(60)])
        for rnd in range(6):
            h.add_round(rnd, "train", started=0.0, finished=1.0, n_sampled=10, n_accepted=10, n_rejected=0,
                        metrics={}, epsilon=None)
        assert h.prune(before=2.0, max_round=3, limit=25) == 25   # a batch of at most `limit`
        assert h.prune(before=2.0, max_round=3, limit=25) == 15
        assert h.prune(before=2.0, max_round=3, limit=25) == 0    # rounds 4 and 5: beyond max_round
        assert h.prune(before=0.5, max_round=10) == 0             # finished after `before`
        assert h.db.execute("SELECT MIN(round) FROM tasks").fetchone()[0] == 4
    finally:
        h.close()


def test_a_round_resampled_for_too_few_usable_results_does_not_wait_another_interval(rig: Rig):
    rig.co.tick()
    rig.run_round()
    rig.advance(10.0)
    rig.co.tick()
    got = rig.tasks()
    first = set(t["task_id"] for t in got.values())
    for name, size in ((A, rig.co.params.size + 1), (B, rig.co.params.size)):  # A's is refused (size)
        rig.co.handle(name.encode(), None, encode(MsgType.RESULT, {
            "agent": name, "task_id": got[name]["task_id"], "round": 2, "kind": "train", "n_samples": 10,
            "metrics": {}}, codec.encode(np.zeros(size, dtype=np.float32), "f32")))
    rig.co.tick()                                  # every task answered, 1 usable of min_agents 2: re-sampled
    assert rig.co.committed == 1 and rig.co.open is not None and rig.co.open.round == 2
    assert not first & set(rig.co.open.tasks)      # new tasks, at once: no second interval
    assert rig.run_round() == 2
