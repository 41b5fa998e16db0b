"""The buffered asynchronous coordinator, driven directly.

Real history and checkpoints, a recording send function and a clock the test moves;
agents are simulated by answering their tasks with delta-coded results.
"""
from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedgate.agent.outbox import Outbox
from fedgate.agent.uplink_types import Task
from fedgate.agent.uplink_work import ResultEncoder
from fedgate.core import codec
from fedgate.core.errors import ConfigError
from fedgate.core.protocol import MsgType, decode, encode
from fedgate.server.async_coordinator import AsyncCoordinator, staleness_weight
from fedgate.server.config import load_config
from fedgate.server.metrics import ServerMetrics
from fedgate.server.spec import load_model_spec
from fedgate.server.store import CheckpointStore, History

from test_server_support import FEATURES, write_config

A, B, C = "gw-a", "gw-b", "gw-c"
N = {A: 10, B: 30, C: 20}


class Rig:
    def __init__(self, tmp_path: Path, **federation: Any) -> None:
        self.tmp_path = tmp_path
        self.cfg = load_config(write_config(tmp_path, federation={
            "statistics": False, "rounds": 6, "min_agents": 2, "mode": "async", "buffer_size": 2,
            "max_staleness": 2, **federation}))
        self.now = 1000.0
        self.sent: list[tuple[str, Any]] = []
        self.metrics = ServerMetrics()
        self.start()

    def start(self) -> None:
        self.history = History(self.tmp_path / "history.db")
        self.co = AsyncCoordinator(self.cfg, load_model_spec(self.cfg.federation.model, seed=0), self._send,
                                   history=self.history, checkpoints=CheckpointStore(self.tmp_path / "ckpt"),
                                   metrics=self.metrics, population=lambda: 3, clock=lambda: self.now)

    def hello(self, *names: str) -> None:
        for name in names:
            self.co.handle(name.encode(), None, encode(MsgType.HELLO, {
                "agent": name, "software": "test", "features": FEATURES, "n_samples": N[name],
                "task_models": 1, "quiet_acks": 1, "task_commits": 1}))

    def _send(self, rid: bytes, frames: list[Any]) -> bool:
        msg = decode([bytes(f) for f in frames])
        payload = None if msg.payload is None else codec.decode(bytes(msg.payload))
        self.sent.append((rid.decode(), (msg.type.value, msg.fields, payload)))
        return True

    def take(self) -> dict[str, list[tuple[str, dict[str, Any], Any]]]:
        out: dict[str, list[tuple[str, dict[str, Any], Any]]] = {A: [], B: [], C: []}
        for name, msg in self.sent:
            out[name].append(msg)
        self.sent.clear()
        return out

    def answer(self, name: str, task: tuple[str, dict[str, Any], Any], delta: float) -> None:
        _, fields, carried = task
        buf = codec.encode(np.full(carried.size, delta, dtype=np.float32), "f32", delta=True)
        self.co.handle(name.encode(), None, encode(MsgType.RESULT, {
            "agent": name, "task_id": fields["task_id"], "round": fields["round"], "kind": "train",
            "n_samples": N[name], "metrics": {"loss": 1.0}}, buf))

    def durable(self) -> None:
        self.co.writer.wait()
        self.co.tick()

    def close(self) -> None:
        self.co.close()
        self.history.close()


def tasks(msgs: dict[str, list[Any]]) -> dict[str, Any]:
    return {name: m for name, got in msgs.items() for m in got if m[0] == "task" and m[1]["kind"] == "train"}


def committed(got: list[Any]) -> list[int]:
    return [m[1]["round"] for m in got if m[0] == "committed"]


@pytest.fixture
def rig(tmp_path: Path):
    r = Rig(tmp_path)
    r.hello(A, B, C)
    yield r
    r.close()


def test_every_idle_agent_gets_a_delta_task_at_once_and_a_round_closes_at_buffer_size(rig: Rig):
    got = tasks(rig.take())
    assert sorted(got) == [A, B, C]
    assert all(t[1]["round"] == 1 and t[1]["codec_params"]["delta"] is True for t in got.values())
    start = rig.co.params.copy()
    rig.answer(A, got[A], 0.5)
    after_a = tasks(rig.take())
    assert after_a[A][1]["round"] == 1 and after_a[A][1]["task_id"] != got[A][1]["task_id"]  # idle: a new task
    assert rig.co.open.round == 1 and rig.co.committed == -1
    rig.answer(B, got[B], 1.0)  # K = 2: round 1 closes
    assert rig.co.committed == 1 and rig.co.open.round == 2
    new = tasks(rig.take())
    assert sorted(new) == [B]  # A already works on its round 1 task; C still trains
    want = start + np.float32((10 * 0.5 + 30 * 1.0) / 40)
    np.testing.assert_allclose(rig.co.params, want, rtol=1e-6)
    rig.durable()
    rows = rig.history.db.execute("SELECT round, n_accepted FROM rounds WHERE kind = 'train'").fetchall()
    assert rows == [(1, 2)]


def test_a_stale_delta_is_rebased_on_the_current_model_with_its_staleness_weight(rig: Rig):
    first = tasks(rig.take())
    rig.answer(A, first[A], 0.5)
    rig.answer(B, first[B], 1.0)     # round 1 closes
    g1 = rig.co.params.copy()
    second = tasks(rig.take())
    rig.answer(C, first[C], -1.0)    # issued in round 1, arrives in round 2: tau = 1
    rig.answer(B, second[B], 2.0)    # fresh
    assert rig.co.committed == 2
    wc, wb = staleness_weight(20, 1, 0.5), staleness_weight(30, 0, 0.5)
    assert wc == pytest.approx(20 / np.sqrt(2))
    want = g1 + np.float32((wc * -1.0 + wb * 2.0) / (wc + wb))  # the delta added to g1, not to g0
    np.testing.assert_allclose(rig.co.params, want, rtol=1e-5)
    rig.durable()
    rows = dict(rig.history.db.execute(
        "SELECT agent, json_extract(metrics, '$.staleness') FROM agent_metrics WHERE round = 2").fetchall())
    assert rows == {C: 1.0, B: 0.0}
    assert rig.metrics.value("fedgate_server_update_staleness_count") == 4


def test_a_result_older_than_max_staleness_is_refused_and_the_agent_gets_a_fresh_task(rig: Rig):
    got = tasks(rig.take())
    old_c = got[C]
    for _ in range(3):  # three rounds without C: its task of round 1 is 3 > max_staleness old
        rig.answer(A, got[A], 0.1)
        rig.answer(B, got[B], 0.1)
        got = tasks(rig.take())
    assert rig.co.open.round == 4
    before = rig.co.params.copy()
    rig.answer(C, old_c, 100.0)
    msgs = rig.take()
    acks = [m[1] for m in msgs[C] if m[0] == "ack"]
    assert acks == [{"task_id": old_c[1]["task_id"], "status": "rejected", "reason": "stale"}]
    fresh = tasks(msgs)[C]
    assert fresh[1]["round"] == 4
    assert rig.metrics.value("fedgate_server_updates_rejected_total", reason="stale") == 1
    np.testing.assert_array_equal(rig.co.params, before)
    rig.answer(C, fresh, 0.2)  # and contributes again
    assert rig.co.open.accepted == 1
    reasons = rig.history.db.execute("SELECT reason FROM rejections").fetchall()
    assert reasons == [("stale",)]


def test_an_agent_with_an_old_task_out_is_never_told_a_commit_that_covers_it(rig: Rig):
    told: dict[str, list[int]] = {A: [], B: [], C: []}
    open_tasks: dict[str, dict[str, int]] = {A: {}, B: {}, C: {}}  # agent -> task_id -> round, not yet durable

    def step() -> dict[str, Any]:
        got: dict[str, Any] = {}
        for name, msgs in rig.take().items():
            for kind, fields, payload in msgs:
                if kind == "committed":
                    told[name].append(fields["round"])
                    # the agent would drop results of rounds <= this one: none of its open tasks
                    assert all(fields["round"] < v for v in open_tasks[name].values()), (name, fields, open_tasks)
                elif kind == "task" and fields["kind"] == "train":
                    got[name] = (kind, fields, payload)
                    open_tasks[name][fields["task_id"]] = fields["round"]
        return got

    into: dict[str, int] = {}  # task_id -> the round its result was accepted into

    def answer(name: str, task: Any) -> None:
        into[task[1]["task_id"]] = rig.co.open.round
        rig.answer(name, task, 0.1)

    def durable() -> None:
        rig.co.writer.wait()
        for tasks_of in open_tasks.values():  # results in a durable round may be dropped now
            for tid in [t for t in tasks_of if into.get(t, 10**9) <= rig.co.committed]:
                del tasks_of[tid]
        rig.co.tick()

    got = step()
    first_c = got[C]
    for _ in range(2):  # rounds 1 and 2 without C
        answer(A, got[A])
        got.update(step())
        answer(B, got[B])
        got.update(step())
        durable()
        got.update(step())
    assert max(told[C]) == 0 and rig.co.commit_cap(C) == 0  # its task of round 1 is still out
    assert max(told[A]) >= 1
    answer(C, first_c)                 # tau 2: accepted into round 3, not durable yet
    got.update(step())
    assert max(told[C]) == 0
    answer(A, got[A])                  # round 3 closes
    got.update(step())
    durable()
    got.update(step())
    assert max(told[C]) == 2            # its round-1 result is durable; its new task is of round 3
    assert list(open_tasks[C].values()) == [3]


def test_a_duplicate_result_is_acked_duplicate_and_counted_once(rig: Rig):
    got = tasks(rig.take())
    rig.answer(A, got[A], 0.5)
    rig.answer(A, got[A], 0.5)
    acks = [m[1] for m in rig.take()[A] if m[0] == "ack"]
    assert acks == [{"task_id": got[A][1]["task_id"], "status": "duplicate", "reason": "already received"}]
    assert rig.co.open.accepted == 1


def test_a_parameter_result_without_the_delta_flag_is_refused(rig: Rig):
    got = tasks(rig.take())
    _, fields, carried = got[A]
    rig.co.handle(A.encode(), None, encode(MsgType.RESULT, {
        "agent": A, "task_id": fields["task_id"], "round": 1, "kind": "train", "n_samples": 10, "metrics": {}},
        codec.encode(carried, "f32")))
    acks = [m[1] for m in rig.take()[A] if m[0] == "ack"]
    assert acks[0]["status"] == "rejected" and acks[0]["reason"] == "decode"


def test_restart_reopens_the_round_and_takes_each_result_exactly_once(tmp_path: Path):
    rig = Rig(tmp_path)
    rig.hello(A, B, C)
    got = tasks(rig.take())
    rig.answer(A, got[A], 0.1)
    rig.answer(B, got[B], 0.1)        # round 1 closes
    rig.durable()
    second = tasks(rig.take())
    rig.answer(A, second[A], 0.3)      # buffered in round 2; the server dies before round 2 closes
    g1 = rig.co.params.copy()
    rig.co.writer.close()
    rig.history.close()
    rig.start()                        # the same data: resumes at round 1's checkpoint
    try:
        assert rig.co.committed == 1 and rig.co.open.round == 2
        np.testing.assert_array_equal(rig.co.params, g1)
        assert {i.agent for i in rig.co.issued.values()} == {A, B, C}
        rig.hello(A, B, C)
        resent = tasks(rig.take())
        assert resent[A][1]["task_id"] == second[A][1]["task_id"]
        assert resent[C][1]["task_id"] == got[C][1]["task_id"] and resent[C][1]["round"] == 1
        rig.answer(A, second[A], 0.3)
        rig.answer(A, second[A], 0.3)  # again: a duplicate
        rig.answer(C, got[C], 0.3)
        assert rig.co.committed == 2
        rig.durable()
        n = rig.history.db.execute("SELECT COUNT(*) FROM agent_metrics WHERE task_id = ?",
                                   (second[A][1]["task_id"],)).fetchone()[0]
        assert n == 1
        np.testing.assert_allclose(rig.co.params, g1 + np.float32(0.3), rtol=1e-6)
    finally:
        rig.close()


def test_concurrency_limits_the_agents_training_at_once(tmp_path: Path):
    rig = Rig(tmp_path, concurrency=2)
    rig.hello(A, B, C)
    try:
        got = tasks(rig.take())
        assert len(got) == 2
        name = sorted(got)[0]
        rig.answer(name, got[name], 0.1)
        nxt = tasks(rig.take())
        assert len(nxt) == 1 and next(iter(nxt)) not in got  # the agent idle longest goes next
    finally:
        rig.close()


def test_finishing_expires_outstanding_tasks_and_tells_everyone_the_last_round(tmp_path: Path):
    rig = Rig(tmp_path, rounds=1)
    rig.hello(A, B, C)
    try:
        got = tasks(rig.take())
        rig.answer(A, got[A], 0.1)
        rig.answer(B, got[B], 0.1)
        rig.durable()
        msgs = rig.take()
        assert all(committed(msgs[n]) == [1] for n in (A, B, C))
        assert rig.co.finished and not rig.co.issued
    finally:
        rig.close()


@pytest.mark.parametrize(("table", "key"), [
    ({"mode": "later"}, "federation.mode"),
    ({"mode": "async", "buffer_size": 1, "min_agents": 2}, "federation.buffer_size"),
    ({"mode": "async", "buffer_size": -1}, "federation.buffer_size"),
    ({"mode": "async", "staleness_exponent": -0.5}, "federation.staleness_exponent"),
    ({"mode": "async", "max_staleness": -1}, "federation.max_staleness"),
    ({"mode": "async", "concurrency": -2}, "federation.concurrency"),
    ({"codec_params": {"delta": 1}}, "federation.codec_params.delta"),
])
def test_config_errors_name_the_key_and_value(tmp_path: Path, table: dict[str, Any], key: str):
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, federation=table))
    assert key in str(err.value)


def test_dp_in_async_mode_is_refused_with_the_reason(tmp_path: Path):
    with pytest.raises(ConfigError, match="async") as err:
        load_config(write_config(tmp_path, federation={"mode": "async"}, privacy={"noise_multiplier": 1.0}))
    assert "privacy.noise_multiplier" in str(err.value)


@pytest.mark.parametrize("name", ["f32", "f16", "q8"])
def test_the_agent_delta_encoding_round_trips(tmp_path: Path, name: str):
    rng = np.random.default_rng(5)
    glob = rng.normal(size=300).astype(np.float32)
    new = glob + rng.normal(scale=0.05, size=300).astype(np.float32)
    box = Outbox(tmp_path / "state.db")
    try:
        task = Task(task_id=uuid.uuid4().hex, round=3, kind="train", deadline_s=30.0, spec={}, features=["a"],
                    label="y", scaler=None, hyper={}, codec=name, codec_params={"delta": True})
        buf = ResultEncoder("gw-1", box).encode_params(new, task, glob)
    finally:
        box.close()
    head = codec.read_header(buf)
    assert head.delta and head.codec.value == name
    tol = {"f32": 1e-7, "f16": 1e-4, "q8": 2e-3}[name]
    np.testing.assert_allclose(codec.decode(buf), new - glob, atol=tol)
    from fedgate.server.validate import UpdateValidator, check_update

    params, _ = check_update(UpdateValidator(300, 1e6), buf, glob, lambda: np.empty(300, dtype=np.float32))
    np.testing.assert_allclose(params, new, atol=tol)


def test_async_mode_on_a_relay_is_a_config_error(tmp_path: Path):
    path = write_config(tmp_path, federation={"mode": "async"})
    path.write_text(path.read_text() + '[relay]\nname = "plant-7"\n')
    with pytest.raises(ConfigError, match="relay") as err:
        load_config(path)
    assert "federation.mode" in str(err.value) and "async" in str(err.value)


def test_status_names_the_mode_and_counts_outstanding_tasks(rig: Rig):
    rig.take()
    st = rig.co.status()
    assert st["mode"] == "async" and st["buffer_size"] == 2 and st["outstanding"] == 3
    assert st["open"]["round"] == 1


def test_the_new_model_goes_as_a_message_only_to_agents_whose_task_does_not_carry_it(rig: Rig):
    got = tasks(rig.take())
    rig.answer(A, got[A], 0.5)   # A's next task is of round 1: it carries the model of round 0
    rig.answer(B, got[B], 0.5)   # round 1 closes; B's next task is of round 2: it carries round 1's model
    rig.take()
    rig.durable()
    msgs = rig.take()
    kinds = {name: [m[0] for m in got_] for name, got_ in msgs.items()}
    assert kinds[B] == ["committed"] and committed(msgs[B]) == [1]
    assert kinds[A] == ["committed", "model"] and committed(msgs[A]) == [0]
    assert kinds[C] == ["committed", "model"] and committed(msgs[C]) == [0]
    np.testing.assert_allclose(msgs[A][1][2], rig.co.params)


def test_a_task_out_longer_than_max_staleness_is_expired_and_its_agent_gets_a_new_one(rig: Rig):
    got = tasks(rig.take())
    lost = got[C]  # as if the task never reached C
    for _ in range(3):
        rig.answer(A, got[A], 0.1)
        rig.answer(B, got[B], 0.1)
        got.update(tasks(rig.take()))
    assert rig.co.open.round == 4 and lost[1]["task_id"] in rig.co.issued
    rig.now += 1.0
    rig.co.tick()
    fresh = tasks(rig.take())[C]
    assert fresh[1]["round"] == 4 and lost[1]["task_id"] not in rig.co.issued
    assert rig.history.task(lost[1]["task_id"]).status == "expired"
    rig.answer(C, lost, 0.1)  # if it comes after all: refused as stale
    acks = [m[1] for m in rig.take()[C] if m[0] == "ack"]
    assert acks[0]["reason"] == "stale"


def test_a_reload_raising_rounds_resumes_a_finished_async_federation(tmp_path: Path):
    r = Rig(tmp_path, rounds=1, buffer_size=0)
    r.hello(A, B, C)
    try:
        got = tasks(r.take())
        r.answer(A, got[A], 0.5)
        r.answer(B, got[B], 1.0)  # buffer_size 0 = min_agents 2: round 1 closes, the last one
        r.durable()
        assert r.co.finished
        r.take()
        applied, restart = r.co.reconfigure(dataclasses.replace(r.cfg.federation, rounds=2, min_agents=3))
        assert applied == ["rounds", "min_agents"] and restart == []
        assert r.co.buffer_size == 3  # buffer_size 0 follows min_agents
        r.co.tick()
        again = tasks(r.take())
        assert sorted(again) == [A, B, C] and all(t[1]["round"] == 2 for t in again.values())
        for name, delta in ((A, 1.0), (B, 1.0)):
            r.answer(name, again[name], delta)
        assert r.co.committed == 1  # 2 of 3 results: round 2 waits for the third
        r.answer(C, again[C], 1.0)
        assert r.co.committed == 2
    finally:
        r.close()
