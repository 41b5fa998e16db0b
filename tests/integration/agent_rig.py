"""Real processes for the agent's end-to-end tests: fedgate-sim, fedgate-agent, sd_notify.

``Sim`` runs ``fedgate-sim`` (TCP on a free port, or RTU + a serial sensor on pty
links); ``AgentProc`` runs ``fedgate-agent run`` with its own ``NOTIFY_SOCKET`` (a
datagram socket the test reads, as systemd would) and reads its state file and
database. Every process is stopped by the fixture that made it.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent


def wait_for(cond: Callable[[], Any], what: str, timeout_s: float = 30.0, every_s: float = 0.05) -> Any:
    """Poll ``cond`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        out = cond()
        if out:
            return out
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(every_s)


class Sim:
    """A ``fedgate-sim`` process; ``info`` is its ready-file JSON."""

    def __init__(self, tmp: Path, *args: str, name: str = "sim") -> None:
        self.tmp = tmp
        self.args = list(args)
        self.name = name
        self.ready = tmp / f"{name}.ready.json"
        self.log_path = tmp / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}

    def start(self, *extra: str) -> Sim:
        self.ready.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([str(BIN / "fedgate-sim"), *self.args, *extra, "--ready-file", str(self.ready)],
                                         stdout=subprocess.DEVNULL, stderr=log)
        wait_for(lambda: self.ready.exists() or self.proc.poll() is not None, "fedgate-sim ready file", 30)
        assert self.proc.poll() is None, self.log_path.read_text()
        self.info = json.loads(self.ready.read_text())
        return self

    @property
    def port(self) -> int:
        return int(self.info["port"])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


class AgentProc:
    """A ``fedgate-agent run`` process under a test-owned NOTIFY_SOCKET."""

    def __init__(self, tmp: Path, config: Path, data_dir: Path) -> None:
        self.tmp = tmp
        self.config = config
        self.data_dir = data_dir
        self.log_path = tmp / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.notify_path = tmp / "notify.sock"
        self.sock: socket.socket | None = None
        self.messages: list[str] = []

    # ------------------------------------------------------------------ process
    def start(self, *, watchdog_usec: int | None = None) -> AgentProc:
        if self.sock is None:
            self.notify_path.unlink(missing_ok=True)
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.sock.bind(str(self.notify_path))
        env = dict(os.environ, NOTIFY_SOCKET=str(self.notify_path), PYTHONUNBUFFERED="1")
        env.pop("JOURNAL_STREAM", None)
        if watchdog_usec:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        self.messages.clear()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([str(BIN / "fedgate-agent"), "run", "--config", str(self.config)],
                                         stdout=log, stderr=log, env=env)
        return self

    def wait_notify(self, text: str, timeout_s: float = 30.0) -> str:
        """Wait for a notify datagram containing ``text``."""
        assert self.sock is not None
        deadline = time.monotonic() + timeout_s
        while True:
            for m in self.messages:
                if text in m:
                    self.messages.remove(m)
                    return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {text!r} from the agent; log:\n{self.log()[-3000:]}")
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"the agent exited ({self.proc.returncode}); log:\n{self.log()[-3000:]}")
            self.sock.settimeout(min(left, 0.5))
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self.proc = None

    def stop(self, timeout_s: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        rc = self.proc.returncode
        self.proc = None
        return rc

    def close(self) -> None:
        self.stop()
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        path = self.data_dir / "agent.state.json"
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def rows(self) -> int:
        db = self.data_dir / "agent.db"
        if not db.exists():
            return 0
        conn = sqlite3.connect(str(db), timeout=10)
        try:
            return int(conn.execute("SELECT COUNT(*) FROM agent_samples").fetchone()[0])
        except sqlite3.OperationalError:
            return 0
        finally:
            conn.close()


def plant_toml(*, data_dir: Path, port: int, grid: str = "250ms", window: str = "1s", hop: str = "500ms",
               horizon: str = "2s", poll: str = "100ms", extra: str = "", features: str | None = None,
               uplink: str = "", metrics: str = "127.0.0.1:0", min_coverage: float = 0.75) -> str:
    """An agent.toml for one ``fedgate-sim --tcp`` plant (unit 1)."""
    features = features or """[
  { name = "vib_mean", tag = "pump1.vibration", agg = "mean" },
  { name = "vib_max", tag = "pump1.vibration", agg = "max" },
  { name = "temp_mean", tag = "pump1.temperature", agg = "mean" },
  { name = "step_last", tag = "pump1.step", agg = "last" },
  { name = "fault_last", tag = "pump1.fault", agg = "last" },
]"""
    return f"""
[agent]
name = "site-a"
data_dir = "{data_dir}"
log_level = "info"
{uplink}
[[transports]]
name = "plant1"
kind = "modbus-tcp"
host = "127.0.0.1"
port = {port}
timeout = "500ms"
reconnect_delay = "100ms"
reconnect_delay_max = "1s"

[[devices]]
name = "pump1"
transport = "plant1"
poll = "{poll}"
  [[devices.tags]]
  name = "temperature"
  register = "input"
  address = 0
  type = "float32"
  [[devices.tags]]
  name = "vibration"
  register = "input"
  address = 2
  type = "float32"
  [[devices.tags]]
  name = "step"
  register = "input"
  address = 60
  type = "uint64"
  [[devices.tags]]
  name = "fault"
  register = "discrete"
  address = 0
  type = "bool"
  [[devices.tags]]
  name = "prediction"
  register = "holding"
  address = 0
  type = "float32"
  writable = true
  [[devices.tags]]
  name = "alarm"
  register = "coil"
  address = 1
  type = "bool"
  writable = true

[samples]
grid = "{grid}"
window = "{window}"
hop = "{hop}"
min_coverage = {min_coverage}
max_gap = "1s"
features = {features}
  [samples.label]
  name = "fault_soon"
  tag = "pump1.fault"
  agg = "max"
  horizon = "{horizon}"

[metrics]
address = "{metrics}"
{extra}
"""
