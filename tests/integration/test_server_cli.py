"""The fedgate-server command as a process: keygen, run under a fake systemd, status, export, metrics."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from fedgate.core.keys import load_public_key, load_secret_key
from fedgate.core.protocol import MsgType

from test_server_support import Agent, ServerThread, global_params, make_keys, wait_for, write_config

CMD = [sys.executable, "-m", "fedgate.server"]


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CMD, *args], capture_output=True, text=True, timeout=60, env=env)


def test_keygen_writes_a_0600_secret_and_refuses_to_overwrite(tmp_path):
    out = _cli("keygen", "press-07", "--dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    secret = tmp_path / "press-07.key_secret"
    assert os.stat(secret).st_mode & 0o777 == 0o600
    assert load_secret_key(secret) and load_public_key(tmp_path / "press-07.key")
    again = _cli("keygen", "press-07", "--dir", str(tmp_path))
    assert again.returncode == 2 and "exists" in again.stderr
    assert _cli("keygen", "press-07", "--dir", str(tmp_path), "--force").returncode == 0


def test_bad_config_and_readable_secret_are_refused(tmp_path):
    keys = make_keys(tmp_path, ["gw-a"])
    cfg = write_config(tmp_path, keys=keys, federation={"fraction": 7})
    out = _cli("run", "--config", str(cfg))
    assert out.returncode == 2 and "federation.fraction" in out.stderr and "7" in out.stderr
    cfg = write_config(tmp_path, keys=keys)
    os.chmod(keys["server_secret"], 0o644)
    out = _cli("run", "--config", str(cfg))
    assert out.returncode == 1 and "chmod 600" in out.stderr


class FakeSystemd:
    """A NOTIFY_SOCKET to read what the daemon tells systemd."""

    def __init__(self, path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.seen: list[str] = []

    def wait_for(self, text: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(text in m for m in self.seen):
                return
            try:
                self.seen.append(self.sock.recv(4096).decode())
            except socket.timeout:
                pass
        raise AssertionError(f"no {text!r} from the daemon; got {self.seen}")

    def clear(self) -> None:
        self.seen.clear()

    def close(self) -> None:
        self.sock.close()


def test_run_under_systemd_ready_watchdog_reload_and_sigterm(tmp_path):
    keys = make_keys(tmp_path, ["gw-a"])
    cfg = write_config(tmp_path, keys=keys)
    sd = FakeSystemd(tmp_path / "notify.sock")
    env = dict(os.environ, NOTIFY_SOCKET=sd.path, WATCHDOG_USEC="400000")
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen([*CMD, "run", "--config", str(cfg)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        sd.wait_for("READY=1")
        sd.wait_for("WATCHDOG=1")
        sd.clear()
        cfg.write_text(cfg.read_text().replace("rounds = 3", "rounds = 9").replace('label = "y"', 'label = "z"')
                       .replace('[server]\n', '[server]\nlog_level = "debug"\n'))
        proc.send_signal(signal.SIGHUP)
        sd.wait_for("RELOADING=1")
        sd.wait_for("READY=1")
        sd.clear()
        cfg.write_text("not toml [")
        proc.send_signal(signal.SIGHUP)  # a broken config is refused, the daemon runs on
        sd.wait_for("READY=1")
        proc.send_signal(signal.SIGTERM)
        sd.wait_for("STOPPING=1")
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr = proc.stderr.read()
        proc.stderr.close()
        sd.close()
    assert "allow-list reloaded: 1 agent keys" in stderr
    assert "reload: [federation] rounds applied from the next round on" in stderr
    assert "reload: [federation] label changed; takes effect after a restart" in stderr
    assert "config not reloaded, keeping the running one" in stderr


def test_status_and_export_after_a_federation(tmp_path):
    cfg = write_config(tmp_path, federation={"statistics": False, "rounds": 2})
    srv = ServerThread(cfg)
    a, b = Agent(srv.endpoint, "gw-a"), Agent(srv.endpoint, "gw-b")
    try:
        a.hello()
        b.hello()
        for rnd in (1, 2):
            ta, tb = a.expect(MsgType.TASK), b.expect(MsgType.TASK)
            g = global_params(ta)
            a.train_result(ta, g + rnd, metrics={"loss": 1.0 / rnd})
            b.train_result(tb, g + rnd, metrics={"loss": 1.0 / rnd})
        wait_for(lambda: srv.coordinator.finished, what="finished")
        final = srv.coordinator.params.copy()
    finally:
        a.close()
        b.close()
        srv.stop()
    out = _cli("status", "--config", str(cfg), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["train_rounds"] == 2 and report["committed_round"] == 2
    assert report["last_train_metrics"] == {"loss": 0.5}
    assert {x["name"] for x in report["agents"]} == {"gw-a", "gw-b"}
    assert report["privacy"]["enabled"] is False
    text = _cli("status", "--config", str(cfg))
    assert text.returncode == 0 and "2 of 2 train rounds" in text.stdout and "gw-a" in text.stdout
    out = _cli("export", "--config", str(cfg), "--out", str(tmp_path / "export"))
    assert out.returncode == 0, out.stderr
    doc = json.loads((tmp_path / "export" / "model.json").read_text())
    raw = (tmp_path / "export" / "model.f32").read_bytes()
    assert doc["round"] == 2 and doc["features"] == ["t", "p", "v"] and doc["spec"]["kind"] == "linear"
    assert doc["params"]["sha256"] == hashlib.sha256(raw).hexdigest()
    np.testing.assert_array_equal(np.frombuffer(raw, "<f4"), final)


def test_export_without_checkpoint_fails_cleanly(tmp_path):
    cfg = write_config(tmp_path)
    out = _cli("export", "--config", str(cfg), "--out", str(tmp_path / "x"))
    assert out.returncode == 1 and "no checkpoint" in out.stderr


def test_metrics_endpoint_on_loopback(tmp_path):
    cfg = write_config(tmp_path, server={"metrics": "127.0.0.1:0"})
    srv = ServerThread(cfg, serve_metrics=True)
    a = Agent(srv.endpoint, "gw-a")
    try:
        a.send_raw([b'{"v":7,"type":"heartbeat"}'])
        a.expect(MsgType.ERROR)
        a.hello()
        port = srv.server.metrics_port
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert 'fedgate_server_updates_rejected_total{reason="version"} 1.0' in body
        assert "fedgate_server_received_bytes_total" in body and "fedgate_server_connected_agents" in body
        wait_for(lambda: srv.metric("fedgate_server_connected_agents") == 1, what="gauge")
    finally:
        a.close()
        srv.stop()
