"""Shared rig of the server tests: keys, configs, a server in a thread, a scripted DEALER agent.

The agent here is a plain ZeroMQ DEALER that speaks the protocol message by message,
so a test can send exactly what it wants (good or hostile) and see every reply.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq
import zmq.utils.garbage

from fedgate.core import codec
from fedgate.core.keys import load_public_key
from fedgate.core.protocol import Message, MsgType, decode, encode
from fedgate.server.config import ServerConfig, load_config
from fedgate.server.service import Server
from fedgate.server.transport import generate_keypair

# pyzmq's zero-copy sends start one process-wide garbage-collector thread on first use;
# start it now so it exists before every test instead of looking like a leak of one.
if not zmq.utils.garbage.gc.is_alive():
    zmq.utils.garbage.gc.start()

FEATURES = ["t", "p", "v"]
SPEC = {"kind": "linear", "n_features": 3, "n_outputs": 1}


def make_keys(root: Path, agents: list[str]) -> dict[str, Any]:
    """Server key pair + one key pair per agent; the agents' public keys in root/agents."""
    (root / "agents").mkdir(parents=True, exist_ok=True)
    (root / "private").mkdir(parents=True, exist_ok=True)
    _, server_secret = generate_keypair(root, "server")
    out: dict[str, Any] = {"server_secret": server_secret, "server_public": load_public_key(root / "server.key"),
                           "agents_dir": str(root / "agents"), "agents": {}}
    for name in agents:
        generate_keypair(root / "private", name)
        os.replace(root / "private" / f"{name}.key", root / "agents" / f"{name}.key")
        pub = load_public_key(root / "agents" / f"{name}.key")
        from fedgate.core.keys import load_secret_key
        out["agents"][name] = (pub, load_secret_key(root / "private" / f"{name}.key_secret"))
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def write_config(root: Path, *, keys: dict[str, Any] | None = None, federation: dict[str, Any] | None = None,
                 strategy: dict[str, Any] | None = None, privacy: dict[str, Any] | None = None,
                 server: dict[str, Any] | None = None, model: dict[str, Any] | None = None) -> Path:
    """A server.toml for tests: loopback, port 0, short heartbeats; tables override the defaults."""
    srv: dict[str, Any] = {"bind": "tcp://127.0.0.1:0", "data_dir": str(root / "data"), "metrics": "",
                           "heartbeat": "1s", "dead_after": "3s"}
    if keys:
        srv.update(secret_key=keys["server_secret"], agents_dir=keys["agents_dir"])
    else:
        srv["insecure"] = True
    srv.update(server or {})
    fed: dict[str, Any] = {"name": "test-line", "features": FEATURES, "label": "y", "rounds": 3, "min_agents": 2,
                           "round_timeout": "20s", "evaluate": False}
    fed.update(federation or {})
    tables = {"server": srv, "federation": fed, "federation.model": dict(model or SPEC),
              "strategy": dict(strategy or {}), "privacy": dict(privacy or {})}
    text = "".join(f"[{name}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in t.items()) + "\n"
                   for name, t in tables.items())
    path = root / "server.toml"
    path.write_text(text)
    return path


class ServerThread:
    """A Server running its loop in a thread (stopped and joined by :meth:`stop`)."""

    def __init__(self, cfg: ServerConfig | Path, *, serve_metrics: bool = False) -> None:
        self.cfg = cfg if isinstance(cfg, ServerConfig) else load_config(cfg)
        self.server = Server(self.cfg, serve_metrics=serve_metrics)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="test-server")
        self.thread.start()

    def _run(self) -> None:
        try:
            self.server.run()
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    @property
    def coordinator(self):
        return self.server.coordinator

    def metric(self, name: str, **labels: str) -> float:
        return self.server.metrics.value(name, **labels)

    def stop(self) -> None:
        self.server.request_stop()
        self.thread.join(timeout=20)
        assert not self.thread.is_alive(), "server loop did not stop"
        self.server.close()
        if self.error is not None:
            raise self.error


def wait_for(cond, timeout_s: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


class Agent:
    """A scripted DEALER agent (CURVE when keys are given)."""

    def __init__(self, endpoint: str, name: str, *, keys: dict[str, Any] | None = None,
                 key_name: str | None = None, ctx: zmq.Context | None = None) -> None:
        self.name = name
        self.stash: list[Message] = []
        self.own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        if keys is not None:
            pub, sec = keys["agents"][key_name or name] if (key_name or name) in keys["agents"] \
                else zmq.curve_keypair()
            self.public_key = pub.decode() if isinstance(pub, bytes) else pub
            self.sock.curve_publickey = pub.encode() if isinstance(pub, str) else pub
            self.sock.curve_secretkey = sec.encode() if isinstance(sec, str) else sec
            self.sock.curve_serverkey = keys["server_public"].encode()
        self.sock.connect(endpoint)

    def send(self, msg_type: MsgType | str, fields: dict[str, Any], payload: bytes | None = None) -> None:
        self.sock.send_multipart(encode(msg_type, fields, payload))

    def send_raw(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def recv(self, timeout_s: float = 20.0) -> Message:
        if not self.sock.poll(int(timeout_s * 1000)):
            raise AssertionError(f"{self.name}: nothing received in {timeout_s}s")
        return decode(self.sock.recv_multipart(copy=False))

    def expect(self, msg_type: MsgType, timeout_s: float = 20.0, skip: tuple[MsgType, ...] = (
            MsgType.HEARTBEAT, MsgType.MODEL, MsgType.COMMITTED, MsgType.ACK)) -> Message:
        """The next message of ``msg_type``; ``skip`` types are passed over. Tasks that arrive
        while another type is awaited are kept and handed out by the next ``expect(TASK)``."""
        if msg_type is MsgType.TASK and self.stash:
            return self.stash.pop(0)
        deadline = time.monotonic() + timeout_s
        while True:
            msg = self.recv(max(0.01, deadline - time.monotonic()))
            if msg.type is msg_type:
                return msg
            if msg.type is MsgType.TASK:  # a task arriving early is queued, as an agent would
                self.stash.append(msg)
                continue
            if msg.type not in skip:
                raise AssertionError(f"{self.name}: expected {msg_type.value}, got {msg.type.value} {msg.fields}")

    def committed(self, rnd: int, timeout_s: float = 20.0) -> Message:
        """Wait for ``committed`` of round ``rnd`` (earlier rounds' announcements may come late)."""
        while True:
            msg = self.expect(MsgType.COMMITTED, timeout_s, skip=(MsgType.HEARTBEAT, MsgType.MODEL, MsgType.ACK))
            if msg.fields["round"] >= rnd:
                assert msg.fields["round"] == rnd, f"{self.name}: committed {msg.fields['round']}, expected {rnd}"
                return msg

    def silent(self, timeout_s: float = 0.5) -> bool:
        return not self.sock.poll(int(timeout_s * 1000))

    def hello(self, features: list[str] | None = None, n_samples: int = 100) -> Message:
        self.send(MsgType.HELLO, {"agent": self.name, "software": "test-agent 1", "features": features or FEATURES,
                                  "n_samples": n_samples})
        return self.recv()

    def stats_result(self, task: Message, x: np.ndarray) -> None:
        self.send(MsgType.RESULT, {
            "agent": self.name, "task_id": task.fields["task_id"], "round": task.fields["round"],
            "kind": "statistics", "n_samples": int(x.shape[0]), "metrics": {},
            "stats": {"count": int(x.shape[0]), "mean": x.mean(axis=0).tolist(),
                      "m2": ((x - x.mean(axis=0)) ** 2).sum(axis=0).tolist()}})

    def train_result(self, task: Message, params: np.ndarray, n_samples: int = 10, codec_name: str = "f32",
                     metrics: dict[str, float] | None = None, **overrides: Any) -> None:
        fields = {"agent": self.name, "task_id": task.fields["task_id"], "round": task.fields["round"],
                  "kind": "train", "n_samples": n_samples, "metrics": metrics or {"loss": 1.0}}
        fields.update(overrides)
        self.send(MsgType.RESULT, fields, codec.encode(np.asarray(params, dtype=np.float32), codec_name))

    def close(self) -> None:
        self.sock.close(0)
        if self.own_ctx:
            self.ctx.term()


def global_params(task: Message) -> np.ndarray:
    return codec.decode(task.payload)


