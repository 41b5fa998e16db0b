"""Lean agents: no ack for an accepted result, commit notices in the next task.

An agent that says ``quiet_acks`` and ``task_commits`` in its hello costs one message
in and one out per round. The coordinator is driven directly (real history and
checkpoints, a recording send function, a clock the test moves), beside an agent that
asked for neither and must see the protocol as before.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedgate.core import codec
from fedgate.core.protocol import MsgType, decode, encode
from fedgate.server.config import load_config
from fedgate.server.coordinator import Coordinator
from fedgate.server.rounds import _COMMIT_HOLD_S
from fedgate.server.metrics import ServerMetrics
from fedgate.server.spec import load_model_spec
from fedgate.server.store import CheckpointStore, History

from test_server_support import FEATURES, write_config

LEAN, PLAIN = "gw-lean", "gw-plain"


class Rig:
    def __init__(self, tmp_path: Path, checkpoints: CheckpointStore | None = None, **federation: Any) -> None:
        cfg = load_config(write_config(tmp_path, federation={
            "statistics": False, "rounds": 4, "min_agents": 2, **federation}))
        self.now = 1000.0
        self.sent: list[tuple[str, Any]] = []
        self.history = History(tmp_path / "history.db")
        self.co = Coordinator(cfg, load_model_spec(cfg.federation.model, seed=0), self._send,
                              history=self.history, checkpoints=checkpoints or CheckpointStore(tmp_path / "ckpt"),
                              metrics=ServerMetrics(), population=lambda: 2, clock=lambda: self.now)
        self.co.handle(LEAN.encode(), None, encode(MsgType.HELLO, {
            "agent": LEAN, "software": "test", "features": FEATURES, "n_samples": 10,
            "task_models": 1, "quiet_acks": 1, "task_commits": 1}))
        self.co.handle(PLAIN.encode(), None, encode(MsgType.HELLO, {
            "agent": PLAIN, "software": "test", "features": FEATURES, "n_samples": 10}))
        self.take()

    def _send(self, rid: bytes, frames: list[Any]) -> bool:
        self.sent.append((rid.decode(), decode([bytes(f) for f in frames])))
        return True

    def take(self) -> dict[str, list[tuple[str, dict[str, Any]]]]:
        """Messages sent since the last call, per agent, as (type, fields)."""
        out: dict[str, list[tuple[str, dict[str, Any]]]] = {LEAN: [], PLAIN: []}
        for name, msg in self.sent:
            out[name].append((msg.type.value, msg.fields))
        self.sent.clear()
        return out

    def answer(self, tasks: dict[str, dict[str, Any]], *, scale: float = 0.01) -> None:
        g = self.co.params
        for name, task in tasks.items():
            buf = codec.encode(g + np.float32(scale), "f32")
            self.co.handle(name.encode(), None, encode(MsgType.RESULT, {
                "agent": name, "task_id": task["task_id"], "round": task["round"], "kind": "train",
                "n_samples": 5, "metrics": {"loss": 1.0}}, buf))

    def durable(self) -> None:
        self.co.writer.wait()
        self.co.tick()

    def close(self) -> None:
        self.co.close()
        self.history.close()


def tasks_of(msgs: dict[str, list[tuple[str, dict[str, Any]]]]) -> dict[str, dict[str, Any]]:
    return {name: f for name, got in msgs.items() for t, f in got if t == "task"}


def types(got: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [t for t, _ in got]


@pytest.fixture
def rig(tmp_path: Path):
    r = Rig(tmp_path)
    yield r
    r.close()


def test_a_lean_agent_gets_one_task_per_round_carrying_the_last_durable_commit(rig: Rig):
    rig.co.tick()
    tasks = tasks_of(rig.take())
    assert tasks[LEAN]["round"] == 1 and "committed" not in tasks[LEAN]
    for rnd in range(1, 5):
        rig.answer(tasks)
        after_results = rig.take()
        # round rnd closed: the next tasks are out before its checkpoint is durable
        assert "ack" not in types(after_results[LEAN])           # accepted: no ack for the lean agent
        assert types(after_results[PLAIN]).count("ack") == 1
        rig.durable()
        after_commit = rig.take()
        assert ("committed", {"round": rnd}) in after_commit[PLAIN]
        tasks = tasks_of(after_results)
        if rnd < 4:
            # the lean agent is in round rnd + 1: its notice waits for its next task
            assert after_commit[LEAN] == []
            assert tasks[LEAN]["round"] == rnd + 1
            assert tasks[LEAN].get("committed") == (rnd - 1 if rnd > 1 else None)
            assert "committed" not in tasks[PLAIN]
        else:  # the last round: nothing follows, the notice goes at once
            assert after_commit[LEAN][0] == ("committed", {"round": 4})
    assert rig.co.finished
    np.testing.assert_allclose(rig.co.params, load_params_plus(rig, 4 * 0.01), rtol=1e-5, atol=1e-6)


def load_params_plus(rig: Rig, delta: float) -> np.ndarray:
    start = load_model_spec(rig.co.cfg.federation.model, seed=0).initial_params()
    return start + np.float32(delta)


def test_a_held_notice_goes_on_its_own_once_the_hold_passes(rig: Rig):
    rig.co.tick()
    rig.answer(tasks_of(rig.take()))
    rig.take()
    rig.durable()
    assert rig.take()[LEAN] == []  # held: the lean agent has a task in round 2
    rig.now += _COMMIT_HOLD_S / 2
    rig.co.tick()
    assert rig.take()[LEAN] == []
    rig.now += _COMMIT_HOLD_S
    rig.co.tick()
    assert rig.take()[LEAN] == [("committed", {"round": 1})]
    rig.now += 10 * _COMMIT_HOLD_S
    rig.co.tick()
    assert rig.take()[LEAN] == []  # paid once


def test_refusals_and_duplicates_are_still_acked_to_a_lean_agent(rig: Rig):
    rig.co.tick()
    tasks = tasks_of(rig.take())
    rig.answer({LEAN: tasks[LEAN]})
    assert rig.take()[LEAN] == []  # accepted: silence
    rig.answer({LEAN: tasks[LEAN]})  # again: a duplicate
    assert rig.take()[LEAN] == [("ack", {"task_id": tasks[LEAN]["task_id"], "status": "duplicate",
                                         "reason": "already received"})]
    rig.answer({PLAIN: tasks[PLAIN]})
    lean = tasks_of(rig.take())[LEAN]
    bad = codec.encode(np.zeros(3, np.float32), "f32")  # the wrong size
    rig.co.handle(LEAN.encode(), None, encode(MsgType.RESULT, {
        "agent": LEAN, "task_id": lean["task_id"], "round": 2, "kind": "train", "n_samples": 5,
        "metrics": {}}, bad))
    assert rig.take()[LEAN] == [("ack", {"task_id": lean["task_id"], "status": "rejected", "reason": "size"})]


def test_a_lean_agent_not_sampled_next_gets_its_notice_when_the_round_closes(tmp_path: Path):
    rig = Rig(tmp_path, fraction=0.5, min_agents=1, rounds=6)
    try:
        rig.co.tick()
        seen_lean_commits: list[int] = []
        for _ in range(6):
            msgs = rig.take()
            tasks = tasks_of(msgs)
            seen_lean_commits += [f["round"] for t, f in msgs[LEAN] if t == "committed"]
            seen_lean_commits += [tasks[LEAN]["committed"]] if "committed" in tasks.get(LEAN, {}) else []
            rig.answer(tasks)
            rig.durable()
        msgs = rig.take()
        seen_lean_commits += [f["round"] for t, f in msgs[LEAN] if t == "committed"]
        assert rig.co.finished
        # every commit reached the lean agent, in order, by message or in a task
        assert seen_lean_commits == sorted(seen_lean_commits) and seen_lean_commits[-1] == 6
    finally:
        rig.close()


def test_a_lean_agent_that_reconnects_gets_a_held_notice_after_welcome(rig: Rig):
    rig.co.tick()
    rig.answer(tasks_of(rig.take()))
    rig.take()
    rig.durable()
    assert rig.take()[LEAN] == []
    rig.co.handle(LEAN.encode(), None, encode(MsgType.HELLO, {
        "agent": LEAN, "software": "test", "features": FEATURES, "n_samples": 10, "quiet_acks": 1,
        "task_commits": 1}))
    got = types(rig.take()[LEAN])
    assert got[:3] == ["welcome", "model", "committed"] and got[3:] == ["task"]


def test_hello_flags_are_validated():
    from fedgate.core.protocol import MessageError
    for bad in (2, -1, "1", 1.0, True):
        raw = json.dumps({"v": 1, "type": "hello", "agent": "gw", "software": "t", "features": ["a"],
                          "n_samples": 1, "task_commits": bad}).encode()
        with pytest.raises(MessageError):
            decode([raw])


def test_round_lines_reach_info_at_most_once_a_second(rig: Rig, caplog):
    import logging
    caplog.set_level(logging.DEBUG, logger="fedgate.server")
    rig.co.tick()
    tasks = tasks_of(rig.take())
    for _ in range(3):  # three rounds within the same second
        rig.answer(tasks)
        tasks = tasks_of(rig.take())
        rig.durable()
        rig.take()
    rig.now += 1.5
    rig.answer(tasks)
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if "committed:" in r.getMessage()]
    assert [lvl for lvl, _ in lines] == [logging.INFO, logging.DEBUG, logging.DEBUG, logging.INFO]
    assert lines[-1][1].startswith("train round 4 committed")


class GatedStore(CheckpointStore):
    """A real checkpoint directory whose saves wait for the test to open the gate."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = threading.Event()

    def save(self, ckpt: Any) -> Any:
        self.gate.wait(20)
        return super().save(ckpt)


def test_an_agent_welcomed_before_a_round_is_durable_gets_that_model_only_once_it_is(tmp_path: Path):
    store = GatedStore(tmp_path / "ckpt")
    store.gate.set()  # the first checkpoint (the initial state) goes through
    r = Rig(tmp_path, checkpoints=store, evaluate=False)
    try:
        store.gate.clear()
        r.co.tick()
        r.answer(tasks_of(r.take()))
        assert r.co.committed == 1 and r.co.durable < 1   # aggregated; its checkpoint waits at the gate
        r.take()
        r.co.handle(PLAIN.encode(), None, encode(MsgType.HELLO, {  # reconnects meanwhile
            "agent": PLAIN, "software": "test", "features": FEATURES, "n_samples": 10}))
        got = r.take()[PLAIN]
        assert "welcome" in types(got) and "model" not in types(got)  # round 1 may still be lost
        store.gate.set()
        r.durable()
        models = [f for t, f in r.take()[PLAIN] if t == "model"]
        assert [m["round"] for m in models] == [1]
    finally:
        store.gate.set()
        r.close()
