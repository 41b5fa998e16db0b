"""Test and benchmark rig for federations on one machine: agents as real processes.

``python tests/fedtools.py agent ...`` runs one :class:`~fedgate.agent.uplink.Uplink`
with a task handler on synthetic data until SIGTERM (or until its parent dies):

- ``--mode synth``: a seeded regression data set per agent (features ``f0..f{k-1}``,
  label ``y``), trained with :class:`fedgate.core.model.Model` exactly as the task says
  (global scaler, hyper-parameters). Everything is a function of the agent's seed and
  the round, so two runs of the same federation give the same models.
- ``--mode broken``: as ``synth``, but every train result is off by +50 (a faulty
  gateway, for robust strategies).
- ``--mode bench``: no data; a train task returns the global parameters plus a fixed
  seeded noise vector (the Flower baseline's client does the same), so a round costs
  only the framework.

It writes the latest global model it received to ``--model-out`` (``.npy``) and, at
exit, a JSON report (``--report``: peak RSS, task arrival times, uplink counters).
The helpers below (keys, configs, process control) are shared by the integration
tests and ``benchmarks/bench_round.py``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
FEATURES_SEED = 20_240_601
NOISE_SCALE = 1e-3


# ---------------------------------------------------------------- synthetic data

def true_weights(n_features: int) -> tuple[np.ndarray, float]:
    """The regression every agent samples from: y = X @ w + b + noise."""
    rng = np.random.default_rng(FEATURES_SEED)
    return rng.uniform(-2.0, 2.0, n_features), 0.5


def agent_data(seed: int, n_samples: int, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """One agent's samples: ``X`` (n, k) float64 with an agent-specific shift, ``y`` (n,)."""
    rng = np.random.default_rng(seed)
    shift = rng.uniform(-1.0, 1.0, n_features)
    scale = rng.uniform(0.5, 2.0, n_features)
    X = rng.standard_normal((n_samples, n_features)) * scale + shift + 3.0
    w, b = true_weights(n_features)
    y = X @ w + b + 0.1 * rng.standard_normal(n_samples)
    return X, y


def bench_noise(cid: int, dim: int) -> np.ndarray:
    rng = np.random.default_rng(1000 + cid)
    return (rng.standard_normal(dim, dtype=np.float32) * np.float32(NOISE_SCALE)).astype(np.float32)


class SynthHandler:
    """A :class:`~fedgate.agent.uplink.TaskHandler` on :func:`agent_data`."""

    def __init__(self, seed: int, n_samples: int, n_features: int, model_out: Path | None,
                 train_delay_s: float = 0.0, pause_file: Path | None = None) -> None:
        self.seed = seed
        self.train_delay_s = train_delay_s
        self.pause_file = pause_file  # a train task waits while this file exists (a stopped gateway)
        self.features = [f"f{i}" for i in range(n_features)]
        self.X, self.y = agent_data(seed, n_samples, n_features)
        self.model_out = model_out
        self.task_log: list[dict[str, Any]] = []

    def hello_info(self):
        from fedgate.agent.uplink import HelloInfo

        return HelloInfo(features=list(self.features), n_samples=len(self.y))

    def _columns(self, task) -> np.ndarray:
        index = {name: i for i, name in enumerate(self.features)}
        return self.X[:, [index[f] for f in task.features]]

    def _scaled(self, task) -> np.ndarray:
        X = self._columns(task)
        if task.scaler is None:
            return X
        mean = np.asarray(task.scaler["mean"], dtype=np.float64)
        std = np.asarray(task.scaler["std"], dtype=np.float64)
        return (X - mean) / np.where(std > 0, std, 1.0)

    def run_task(self, task, global_params):
        from fedgate.agent.uplink import TaskOutcome
        from fedgate.core.model import Model, ModelSpec

        self.task_log.append({"t": time.time(), "round": task.round, "kind": task.kind})
        n = len(self.y)
        if task.kind == "statistics":
            X = self._columns(task)
            mean = X.mean(axis=0)
            m2 = ((X - mean) ** 2).sum(axis=0)
            return TaskOutcome(n_samples=n, metrics={}, stats=(n, mean, m2))
        model = Model(ModelSpec.from_dict(task.spec), seed=self.seed * 100_003 + task.round)
        model.params = global_params
        X = self._scaled(task)
        if task.kind == "evaluate":
            return TaskOutcome(n_samples=n, metrics={"loss": float(model.loss(X, self.y))})
        if self.train_delay_s:
            time.sleep(self.train_delay_s)
        while self.pause_file is not None and self.pause_file.exists():
            time.sleep(0.02)
        h = task.hyper
        mu = float(h.get("prox_mu") or 0.0)
        report = model.fit(X, self.y, epochs=int(h["epochs"]), batch_size=int(h["batch_size"]),
                           lr=float(h["lr"]), lr_schedule=h.get("lr_schedule") or "constant",
                           l2=float(h.get("l2") or 0.0), prox_mu=mu,
                           reference=global_params if mu > 0 else None)
        return TaskOutcome(n_samples=n, metrics={"loss": report.mean_loss}, params=model.params.copy())

    def on_model(self, model) -> None:
        # both files replaced atomically, the params first: a test polling ``.round`` never
        # reads a half-written file, and once it reads round r the params are of round r
        if self.model_out is not None:
            tmp = self.model_out.with_suffix(".tmp.npy")
            np.save(tmp, model.params)
            os.replace(tmp, self.model_out)
            tmp_round = self.model_out.with_suffix(".round.tmp")
            tmp_round.write_text(str(model.round))
            os.replace(tmp_round, self.model_out.with_suffix(".round"))


class BrokenHandler(SynthHandler):
    """A faulty gateway: trains like :class:`SynthHandler`, then reports params far off (+50)."""

    def run_task(self, task, global_params):
        from fedgate.agent.uplink import TaskOutcome

        out = super().run_task(task, global_params)
        if out.params is None:
            return out
        return TaskOutcome(n_samples=out.n_samples, metrics=out.metrics, params=out.params + np.float32(50.0))


class BenchHandler(SynthHandler):
    """Trivial local work: global + fixed noise; what remains is framework overhead."""

    def __init__(self, cid: int, n_features: int) -> None:
        self.cid = cid
        self.features = [f"f{i}" for i in range(n_features)]
        self.model_out = None
        self.task_log = []
        self._noise: np.ndarray | None = None
        self._out: np.ndarray | None = None

    def hello_info(self):
        from fedgate.agent.uplink import HelloInfo

        return HelloInfo(features=list(self.features), n_samples=100 + self.cid)

    def run_task(self, task, global_params):
        from fedgate.agent.uplink import TaskOutcome

        self.task_log.append({"t": time.time(), "round": task.round, "kind": task.kind})
        n = 100 + self.cid
        if task.kind == "statistics":
            k = len(task.features)
            return TaskOutcome(n_samples=n, metrics={}, stats=(n, np.zeros(k), np.full(k, float(n))))
        if task.kind == "evaluate":
            return TaskOutcome(n_samples=n, metrics={"loss": 0.0})
        if self._noise is None or self._noise.size != global_params.size:
            self._noise = bench_noise(self.cid, global_params.size)
            self._out = np.empty_like(self._noise)
        # the result is encoded (copied) before the next task can run: one buffer serves every round
        return TaskOutcome(n_samples=n, metrics={}, params=np.add(global_params, self._noise, out=self._out))

    def on_model(self, model) -> None:
        return None


# ---------------------------------------------------------------- agent process

def _peak_rss_kb() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _thread_cpu_s() -> dict[str, float]:
    """CPU seconds per OS thread of this process (by thread name), from /proc."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/stat") as fh:
                raw = fh.read()
            name = raw[raw.index("(") + 1:raw.rindex(")")]
            fields = raw[raw.rindex(")") + 2:].split()
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    except (OSError, ValueError, IndexError):
        pass
    return out


def _watch_parent(parent: int) -> None:
    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def cmd_agent(args: argparse.Namespace) -> int:
    from fedgate.agent.uplink import Uplink, UplinkConfig
    from fedgate.core.config import build

    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format=f"%(asctime)s {args.name} %(levelname)s %(name)s: %(message)s")
    _watch_parent(os.getppid())
    table: dict[str, Any] = {"server": args.server, "heartbeat": args.heartbeat, "dead_after": args.dead_after,
                             "hello_timeout": args.hello_timeout, "reconnect_delay": args.reconnect_delay,
                             "reconnect_delay_max": args.reconnect_delay_max}
    if args.insecure:
        table["insecure"] = True
    else:
        table.update(server_key=args.server_key, secret_key=args.secret_key)
    cfg = build(UplinkConfig, table, file="<fedtools>", key="uplink")
    if args.mode == "bench":
        handler: SynthHandler = BenchHandler(args.seed, args.n_features)
    else:
        cls = BrokenHandler if args.mode == "broken" else SynthHandler
        handler = cls(args.seed, args.n_samples, args.n_features,
                      Path(args.model_out) if args.model_out else None, args.train_delay,
                      Path(args.pause_file) if args.pause_file else None)
    uplink = Uplink(cfg, agent_name=args.name, db_path=args.db, handler=handler)
    cpu_start = time.process_time()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: uplink.stop())

    if args.profile:
        import cProfile

        prof = cProfile.Profile(time.thread_time)  # CPU of the link thread, not wall time
        prof.enable()
        uplink.serve()
        prof.disable()
        prof.dump_stats(args.profile)
    else:
        uplink.serve()  # the link on this (main) thread: no event loop in a test agent
    threads_cpu = _thread_cpu_s()
    status = uplink.status()
    uplink.close()
    if args.report:
        Path(args.report).write_text(json.dumps({
            "name": args.name, "vm_hwm_kb": _peak_rss_kb(), "tasks": handler.task_log, "status": status,
            "cpu_s": time.process_time(), "cpu_s_at_start": cpu_start, "threads_cpu_s": threads_cpu,
        }))
    return 0


# ---------------------------------------------------------------- helpers for tests and benchmarks

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_keys(directory: Path, server: str, agents: list[str]) -> dict[str, Path]:
    """Server and agent key pairs; agents' public keys copied into ``directory/agents``."""
    import zmq

    from fedgate.core.keys import write_keypair, write_public_key

    out: dict[str, Path] = {}
    keys = directory / "keys"
    allowed = directory / "agents"
    allowed.mkdir(parents=True, exist_ok=True)
    for name in [server, *agents]:
        pub, sec = zmq.curve_keypair()
        write_keypair(keys, name, pub.decode(), sec.decode())
        if name != server:
            write_public_key(allowed, name, pub.decode())
    out["server_public"] = keys / f"{server}.key"
    out["server_secret"] = keys / f"{server}.key_secret"
    out["agents_dir"] = allowed
    out["keys_dir"] = keys
    return out


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"no TOML for {v!r}")


def write_toml(path: Path, doc: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for section, table in doc.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def server_command(config: Path) -> list[str]:
    exe = Path(sys.executable).with_name("fedgate-server")
    if exe.exists():
        return [str(exe), "run", "--config", str(config)]
    return [sys.executable, "-m", "fedgate.server.cli", "run", "--config", str(config)]


def agent_command(name: str, *, server: str, db: Path, keys: dict[str, Path] | None, seed: int,
                  mode: str = "synth", n_samples: int = 200, n_features: int = 4,
                  model_out: Path | None = None, report: Path | None = None,
                  heartbeat: str = "500ms", dead_after: str = "3s", log_level: str = "info",
                  train_delay_s: float = 0.0, profile: Path | None = None,
                  pause_file: Path | None = None) -> list[str]:
    cmd = [sys.executable, str(HERE), "agent", "--name", name, "--server", server, "--db", str(db),
           "--seed", str(seed), "--mode", mode, "--n-samples", str(n_samples), "--n-features", str(n_features),
           "--heartbeat", heartbeat, "--dead-after", dead_after, "--log-level", log_level,
           "--train-delay", str(train_delay_s)]
    if keys is None:
        cmd.append("--insecure")
    else:
        cmd += ["--server-key", str(keys["server_public"]),
                "--secret-key", str(keys["keys_dir"] / f"{name}.key_secret")]
    if model_out is not None:
        cmd += ["--model-out", str(model_out)]
    if report is not None:
        cmd += ["--report", str(report)]
    if profile is not None:
        cmd += ["--profile", str(profile)]
    if pause_file is not None:
        cmd += ["--pause-file", str(pause_file)]
    return cmd


def spawn(cmd: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    finally:
        log.close()


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 15.0) -> int:
    """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def kill9(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("agent", help="run one agent (uplink + synthetic handler)")
    a.add_argument("--name", required=True)
    a.add_argument("--server", required=True)
    a.add_argument("--db", required=True)
    a.add_argument("--insecure", action="store_true")
    a.add_argument("--server-key")
    a.add_argument("--secret-key")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--mode", choices=("synth", "bench", "broken"), default="synth")
    a.add_argument("--n-samples", type=int, default=200)
    a.add_argument("--n-features", type=int, default=4)
    a.add_argument("--model-out")
    a.add_argument("--train-delay", type=float, default=0.0, help="seconds each train task sleeps")
    a.add_argument("--report")
    a.add_argument("--pause-file", help="train tasks wait while this file exists")
    a.add_argument("--profile", help="write cProfile stats of the agent's run here")
    a.add_argument("--heartbeat", default="500ms")
    a.add_argument("--dead-after", default="3s")
    a.add_argument("--hello-timeout", default="2s")
    a.add_argument("--reconnect-delay", default="100ms")
    a.add_argument("--reconnect-delay-max", default="1s")
    a.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)
    return {"agent": cmd_agent}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
