"""The relay's config section and its hand-off between the uplink's thread and the server loop.

A real :class:`~fedgate.server.service.Server` with a ``[relay]`` section is built in
process (insecure, port 0; its loop and uplink thread are not started): the handler
is called from a worker thread as the uplink would, and the test plays the loop.
"""
from __future__ import annotations

import pathlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from fedgate.core.config import toml_key
from fedgate.core.errors import ConfigError, TrainingError
from fedgate.core.protocol import TaskKind
from fedgate.server.config import load_config, parse_config
from fedgate.server.relay_coordinator import RelayFailure, RelayOutcome, RelayRequest, local_deadline_s

ROOT = pathlib.Path(__file__).resolve().parents[3]

BASE = {
    "server": {"data_dir": "data", "insecure": True, "bind": "tcp://127.0.0.1:0", "metrics": ""},
    "federation": {"name": "f", "model": {"kind": "linear", "n_features": 2}, "features": ["a", "b"],
                   "label": "y", "min_agents": 2, "round_timeout": "30s"},
    "relay": {"name": "relay-7", "server": "tcp://127.0.0.1:7443", "insecure": True},
}


def _doc(**sections: dict[str, Any]) -> dict[str, Any]:
    doc = {k: dict(v) for k, v in BASE.items()}
    for name, table in sections.items():
        doc.setdefault(name, {}).update(table)
    return doc


# ---------------------------------------------------------------- config

def test_shipped_relay_example_loads():
    cfg = load_config(ROOT / "deploy" / "relay.toml")
    assert cfg.relay is not None and cfg.relay.name == "relay-plant-7"
    up = cfg.relay.uplink
    assert up.server == "tcp://hq.example.net:7443" and not up.insecure
    assert up.server_key == "/etc/fedgate/hq.key" and up.heartbeat_s == 5.0 and up.dead_after_s == 15.0
    assert cfg.federation.rounds == 0 and not cfg.privacy.enabled


def test_relay_section_defaults_and_relative_key_paths(tmp_path):
    doc = _doc(relay={"insecure": False, "server_key": "keys/hq.key", "secret_key": "keys/relay-7.key_secret",
                      "heartbeat": "2s"})
    cfg = parse_config(doc, file=str(tmp_path / "relay.toml"), base_dir=str(tmp_path))
    assert cfg.relay.uplink.server_key == str(tmp_path / "keys" / "hq.key")
    assert cfg.relay.uplink.secret_key == str(tmp_path / "keys" / "relay-7.key_secret")
    assert cfg.relay.uplink.dead_after_s == 6.0 and cfg.federation.rounds == 0
    plain = parse_config({k: v for k, v in _doc().items() if k != "relay"} | {"federation": {
        **BASE["federation"], "rounds": 3}}, file="s.toml")
    assert plain.relay is None


@pytest.mark.parametrize("sections,key,value", [
    ({"relay": {"name": None}}, "relay.name", None),
    ({"relay": {"name": "bad name"}}, "relay.name", "bad name"),
    ({"relay": {"server": None}}, "relay.server", None),
    ({"relay": {"server": "http://hq"}}, "relay.server", "http://hq"),
    ({"relay": {"insecure": False}}, "relay.server_key", None),
    ({"relay": {"insecure": False, "server_key": "hq.key"}}, "relay.secret_key", None),
    ({"relay": {"heartbeat": "soon"}}, "relay.heartbeat", "soon"),
    ({"relay": {"reconnect_delay": "5s", "reconnect_delay_max": "1s"}}, "relay.reconnect_delay_max", 1.0),
    ({"relay": {"rounds": 3}}, "relay.rounds", 3),
    ({"privacy": {"noise_multiplier": 1.1}}, "privacy.noise_multiplier", 1.1),
    ({"strategy": {"name": "fedadam"}}, "strategy.name", "fedadam"),
])
def test_relay_config_errors_name_file_key_and_value(sections, key, value):
    doc = _doc(**sections)
    for section, table in sections.items():  # None: the key is missing
        for k, v in table.items():
            if v is None:
                del doc[section][k]
    with pytest.raises(ConfigError) as err:
        parse_config(doc, file="relay.toml")
    assert err.value.file == "relay.toml" and err.value.key == key
    if value is not None:
        assert err.value.value == value
    assert "relay.toml" in str(err.value) and key in str(err.value)


def test_relay_section_must_be_a_table():
    with pytest.raises(ConfigError) as err:
        parse_config(_doc() | {"relay": "tcp://hq"}, file="relay.toml")
    assert err.value.key == "relay"


def test_robust_strategies_are_allowed_on_a_relay():
    cfg = parse_config(_doc(strategy={"name": "median"}), file="relay.toml")
    assert cfg.strategy.name.value == "median"


# ---------------------------------------------------------------- deadline arithmetic and requests

@pytest.mark.parametrize("timeout,upstream,want", [(60.0, 20.0, 16.0), (5.0, 20.0, 5.0), (10.0, 12.5, 10.0),
                                                   (100.0, 1.0, 0.8)])
def test_local_deadline_is_the_smaller_of_round_timeout_and_a_share_of_upstream(timeout, upstream, want):
    assert local_deadline_s(timeout, upstream) == pytest.approx(want)
    assert local_deadline_s(timeout, upstream, share=1.0) == min(timeout, upstream)


@pytest.mark.parametrize("share", [0.0, -0.5, 1.5])
def test_local_deadline_share_out_of_range(share):
    with pytest.raises(ValueError):
        local_deadline_s(10.0, 10.0, share=share)


def _request(kind: TaskKind = TaskKind.TRAIN, **kw: Any) -> RelayRequest:
    return RelayRequest(task_id="ab" * 16, round=3, kind=kind, local_s=1.0, scaler=None, hyper={},
                        codec="f32", codec_params={}, params=kw.get("params"))


def test_a_request_is_answered_once_across_threads():
    req = _request()
    with ThreadPoolExecutor(1) as pool:
        waiting: Future[RelayOutcome] = pool.submit(req.future.result, 30)
        req.complete(RelayOutcome(n_samples=7, metrics={"loss": 1.0}))
        req.fail("quorum", "too late")  # a second answer is ignored
        assert waiting.result(30).n_samples == 7
    failed = _request()
    failed.fail("spec", "wrong model")
    failed.complete(RelayOutcome(n_samples=1, metrics={}))
    with pytest.raises(RelayFailure, match="wrong model") as err:
        failed.future.result(0)
    assert err.value.reason == "spec"


# ---------------------------------------------------------------- hand-off through a real relay server

@pytest.fixture
def relay_server(tmp_path):
    from fedgate.server.service import Server

    cfg = parse_config(_doc(federation={"round_timeout": "200ms"}), file=str(tmp_path / "relay.toml"),
                       base_dir=str(tmp_path))
    server = Server(cfg, serve_metrics=False)
    try:
        yield server
    finally:
        server.relay.stop()
        server.close()


def _task(kind: str = "train", **over: Any) -> Any:
    from fedgate.agent.uplink_types import Task

    fields = {"task_id": "cd" * 16, "round": 2, "kind": kind, "deadline_s": 0.25,
              "spec": {"kind": "linear", "n_features": 2, "n_outputs": 1, "hidden": [], "activation": "relu",
                       "loss": "squared"},
              "features": ["a", "b"], "label": "y", "scaler": None, "hyper": {"epochs": 1, "batch_size": 8,
                                                                              "lr": 0.1}}
    fields.update(over)
    return Task.from_fields(fields)


def _loop_until(server: Any, done: Future[Any]) -> None:
    """Play the server loop (poll, pump, tick) until ``done`` settles."""
    for _ in range(2000):
        if done.done():
            return
        for _m in server.transport.poll(0.02):
            pass
        server.relay.pump()
        server.coordinator.tick()
    raise AssertionError("the loop never settled the request")


def _until_serving(server: Any) -> Any:
    """Play the loop until it takes the upstream task the uplink posted; its request."""
    co = server.coordinator
    for _ in range(2000):
        server.relay.pump()
        if co.request is not None:
            return co.request
        server.transport.poller.poll(10)
    raise AssertionError("the loop never took the upstream task")


def _hq_model(co: Any, rnd: int) -> Any:
    """Headquarters' global model of round ``rnd`` as the uplink hands it over (params all ``rnd``)."""
    from fedgate.agent.uplink_types import GlobalModel

    return GlobalModel(round=rnd, spec=co.model.spec, features=["a", "b"], label="y",
                       scaler={"mean": [0.0, 1.0], "std": [1.0, 2.0]}, params=np.full(3, float(rnd), dtype=np.float32))


def _settle(server: Any) -> Any:
    """The loop takes the posted events; checkpoints are written and announced. The newest checkpoint."""
    co = server.coordinator
    server.relay.pump()
    co.writer.wait()
    co.tick()
    assert not co.committing
    return co.checkpoints.load_latest()[0]


def test_a_task_reaches_the_loop_wakes_it_and_fails_without_gateways(relay_server):
    server = relay_server
    relay = server.relay
    params = np.zeros(3, dtype=np.float32)
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(relay.uplink.handler.run_task, _task(), params)
        # the uplink's thread woke the loop: the relay's pipe is readable in the transport's poller
        for _ in range(200):
            if dict(server.transport.poller.poll(100)).get(relay._wake_r):
                break
        else:
            raise AssertionError("the loop was not woken")
        _loop_until(server, answer)
        with pytest.raises(TrainingError, match="0 gateways ready within 0.2s, need 2"):
            answer.result(0)
    assert server.metrics.value("fedgate_server_relay_upstream_failures_total", reason="quorum") == 1
    assert server.metrics.value("fedgate_server_relay_upstream_tasks_total", kind="train") == 1
    assert server.coordinator.idle


def test_a_task_for_another_model_fails_before_the_loop(relay_server):
    relay = relay_server.relay
    with pytest.raises(TrainingError, match=r"features \['a', 'c'\].*missing \['b'\]"):
        relay.uplink.handler.run_task(_task(features=["a", "c"]), np.zeros(3, dtype=np.float32))
    with pytest.raises(TrainingError, match="label 'z'"):
        relay.uplink.handler.run_task(_task(label="z"), np.zeros(3, dtype=np.float32))
    assert relay_server.metrics.value("fedgate_server_relay_upstream_failures_total", reason="spec") == 2
    assert relay_server.coordinator.idle


def test_stopping_fails_the_waiting_task(relay_server):
    relay = relay_server.relay
    started = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        def run() -> Any:
            started.set()
            return relay.uplink.handler.run_task(_task(deadline_s=60.0), np.zeros(3, dtype=np.float32))

        answer = pool.submit(run)
        assert started.wait(30)
        _until_serving(relay_server)  # the loop takes it (no gateway: it waits for them)
        relay.stop()
        with pytest.raises(TrainingError, match="stopping"):
            answer.result(30)
    with pytest.raises(TrainingError, match="stopping"):  # and a task after stop fails at once
        relay.uplink.handler.run_task(_task(), np.zeros(3, dtype=np.float32))


def test_a_relay_checkpoint_of_a_round_holds_headquarters_model_of_that_round(relay_server):
    # headquarters' commit notice of a round often reaches the loop before that round's model
    # (the notice of its last round rides on the evaluate task whose model is handed over
    # next; a notice of round r comes while the uplink holds round r + 2's model, not yet
    # committed): the checkpoint of round r waits for the model of round r
    from fedgate.server.store import read_checkpoint

    server, relay, co = relay_server, relay_server.relay, relay_server.coordinator

    with ThreadPoolExecutor(1) as pool:  # a train task of round 3 is being served (no gateways yet)
        task_params = np.full(3, 7.0, dtype=np.float32)
        answer = pool.submit(relay.uplink.handler.run_task, _task(round=3), task_params)
        assert _until_serving(server).round == 3
        relay.post(("committed", 0))
        relay.post(("committed", 1))  # round 1's model was superseded by round 2's, not yet committed
        ckpt = _settle(server)
        _loop_until(server, answer)  # no gateways: the task fails
    with pytest.raises(TrainingError):
        answer.result(0)
    assert (ckpt.round, ckpt.phase) == (0, "statistics")
    np.testing.assert_array_equal(ckpt.arrays["params"], co.model.initial_params())  # not the task's

    relay.uplink.handler.on_model(_hq_model(co, 2))  # committed: handed over by the uplink
    ckpt = _settle(server)
    assert (ckpt.round, ckpt.phase, ckpt.meta["model_round"]) == (2, "train", 2)
    relay.post(("committed", 3))  # before its model: nothing of round 3 yet
    assert _settle(server).round == 2 and co.durable == 2
    relay.uplink.handler.on_model(_hq_model(co, 3))
    ckpt = _settle(server)
    assert (ckpt.round, ckpt.meta["model_round"]) == (3, 3) and co.durable == 3
    np.testing.assert_array_equal(ckpt.arrays["params"], _hq_model(co, 3).params)
    for path in co.checkpoints.files():  # no file ever paired a round with another round's model
        ckpt = read_checkpoint(path)
        if ckpt.phase == "train":
            np.testing.assert_array_equal(ckpt.arrays["params"], _hq_model(co, ckpt.round).params)


def test_configuration_doc_lists_every_relay_key_with_its_default():
    import dataclasses
    import re

    from fedgate.agent.uplink_types import UplinkConfig

    text = (ROOT / "docs" / "configuration.md").read_text()
    table = text[text.index("### `[relay]`"):]
    documented = dict(re.findall(r"^\| `([a-z_]+)` \| [^|]* \| ([^|]*) \|", table, re.M))
    want = {"name"} | {toml_key(f) for f in dataclasses.fields(UplinkConfig)}
    assert set(documented) == want
    assert documented["name"].strip() == "required" and documented["heartbeat"].strip() == '`"5s"`'


def test_gateways_are_told_no_commit_of_the_round_being_served_until_it_is_answered(tmp_path):
    # an asynchronous headquarters commits rounds after a task's round while the relay is
    # still collecting its gateways' results for that task (the answer is still wanted):
    # the gateways keep those results (a reconnecting gateway re-sends them) until the
    # local round is answered or failed, then they hear the rest of the notice
    from fedgate.server.service import Server

    cfg = parse_config(_doc(federation={"round_timeout": "30s"}), file=str(tmp_path / "relay.toml"),
                       base_dir=str(tmp_path))
    server = Server(cfg, serve_metrics=False)
    relay, co = server.relay, server.coordinator
    try:
        with ThreadPoolExecutor(1) as pool:  # a train task of round 3 (issued with model 2) is being served
            answer = pool.submit(relay.uplink.handler.run_task, _task(round=3, deadline_s=60.0),
                                 np.full(3, 2.0, dtype=np.float32))
            assert _until_serving(server).round == 3
            relay.uplink.handler.on_model(_hq_model(co, 2))
            _settle(server)
            assert (co.durable, co.gateways_committed) == (2, 2)
            relay.uplink.handler.on_model(_hq_model(co, 4))  # headquarters moved on while round 3 is served
            _settle(server)
            assert co.durable == 4 and co.checkpoints.load_latest()[0].round == 4
            assert co.gateways_committed == 2  # their results of local round 3 are kept
            co.fail_all("stopping", "the relay is stopping")  # the local round ends (answered or failed) ...
            co.tick()
            assert co.gateways_committed == 4  # ... and the gateways hear headquarters' commit
            with pytest.raises(TrainingError, match="stopping"):
                answer.result(30)
    finally:
        relay.stop()
        server.close()
