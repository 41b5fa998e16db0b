"""``fedgate-server``: run | keygen | status | export.

``run --config server.toml``
    The daemon (systemd ``Type=notify``; SIGTERM stops, SIGHUP reloads the allow-list and the live [federation] keys).
``keygen NAME [--dir DIR]``
    Writes ``NAME.key`` (public) and ``NAME.key_secret`` (mode 0600) in ZeroMQ's
    certificate format; copy an agent's ``.key`` into the server's ``agents_dir``.
``status --config server.toml [--json]``
    Rounds, agents, last metrics, rejections and privacy spent, from the history and
    the newest checkpoint (works while the daemon runs). On a relay, also its upstream
    (headquarters' endpoint, link state, last round headquarters committed).
``export --config server.toml --out DIR``
    The global model as ``DIR/model.json`` (spec, features, label, scaler, round,
    SHA-256 of the parameters) and ``DIR/model.f32`` (the flat parameter vector,
    little-endian float32; ``numpy.fromfile(path, "<f4")`` reads it).

Exit status: 0 success, 1 runtime failure, 2 bad configuration or arguments.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from fedgate.core.errors import ConfigError, FedgateError
from fedgate.core.logs import setup_logging

__all__ = ["main"]

log = logging.getLogger("fedgate.server")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedgate-server", description="fedgate aggregation server")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", required=True, help="path of server.toml")
    kg = sub.add_parser("keygen", help="make a CURVE key pair (NAME.key, NAME.key_secret)")
    kg.add_argument("name", help="key name: the server's, or an agent's (its agent name)")
    kg.add_argument("--dir", default=".", help="directory to write into (default: .)")
    kg.add_argument("--force", action="store_true", help="overwrite existing key files")
    st = sub.add_parser("status", help="rounds, agents, metrics, privacy spent")
    st.add_argument("--config", required=True)
    st.add_argument("--json", action="store_true", help="machine-readable output")
    ex = sub.add_parser("export", help="write the global model, scaler and spec")
    ex.add_argument("--config", required=True)
    ex.add_argument("--out", required=True, help="output directory")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args.config)
        setup_logging("warning")
        if args.command == "keygen":
            return _keygen(args.name, args.dir, args.force)
        if args.command == "status":
            return _status(args.config, args.json)
        return _export(args.config, args.out)
    except ConfigError as exc:
        print(f"fedgate-server: configuration error: {exc}", file=sys.stderr)
        return 2
    except FedgateError as exc:
        print(f"fedgate-server: {exc}", file=sys.stderr)
        return 1


def _run(config: str) -> int:
    from fedgate.server import heap
    from fedgate.server.config import load_config
    from fedgate.server.service import Server

    cfg = load_config(config)
    setup_logging(cfg.server.log_level)
    heap.tune()
    try:
        server = Server(cfg)
    except ConfigError:
        raise
    except FedgateError as exc:
        log.error("cannot start: %s", exc)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: server.request_stop())
    signal.signal(signal.SIGINT, lambda *_: server.request_stop())
    signal.signal(signal.SIGHUP, lambda *_: server.request_reload())
    try:
        server.run()
    except FedgateError as exc:
        log.critical("stopped: %s", exc)
        return 1
    finally:
        server.close()
    return 0


def _keygen(name: str, directory: str, force: bool) -> int:
    from fedgate.server.transport import generate_keypair

    for suffix in (".key", ".key_secret"):
        path = Path(directory) / f"{name}{suffix}"
        if path.exists() and not force:
            print(f"fedgate-server: {path} exists (use --force to overwrite)", file=sys.stderr)
            return 2
    os.makedirs(directory, exist_ok=True)
    public, secret = generate_keypair(directory, name)
    print(f"public key: {public}\nsecret key: {secret} (mode 0600; keep it on this machine)")
    return 0


def _newest_checkpoint(cfg: Any) -> Any:
    from fedgate.server.store import CheckpointStore

    store = CheckpointStore(os.path.join(cfg.server.data_dir, "checkpoints"), keep=10**9)
    ckpt, path = store.load_latest()
    return ckpt, path, store.fallbacks


def status_report(config: str) -> dict[str, Any]:
    """Everything ``status`` prints, as a JSON-ready dict."""
    from fedgate.server.config import load_config
    from fedgate.server.store import History

    cfg = load_config(config)
    report: dict[str, Any] = {"federation": cfg.federation.name, "rounds_planned": cfg.federation.rounds,
                              "strategy": cfg.strategy.name.value, "mode": cfg.federation.mode.value}
    ckpt, path, fallbacks = _newest_checkpoint(cfg)
    report["checkpoint"] = None if ckpt is None else {
        "path": str(path), "round": ckpt.round, "phase": ckpt.phase, "created": ckpt.created,
        "corrupt_skipped": fallbacks}
    report["committed_round"] = 0 if ckpt is None else ckpt.round
    db = os.path.join(cfg.server.data_dir, "history.db")
    summary: dict[str, Any] = {"rounds": [], "agents": [], "rejections": {}, "train_rounds": 0}
    last_started = None
    if os.path.exists(db):
        hist = History(db, readonly=True)
        try:
            summary = hist.summary()
            last_started = hist.last_started("train")
        finally:
            hist.close()
    report.update(summary)
    interval = cfg.federation.round_interval_s
    more = report["committed_round"] < cfg.federation.rounds
    report["schedule"] = None if not interval else {
        "round_interval_s": interval,
        "next_train_round_not_before": last_started + interval if last_started is not None and more else None}
    train = [r for r in summary["rounds"] if r["kind"] == "train"]
    evals = [r for r in summary["rounds"] if r["kind"] == "evaluate"]
    report["last_train_metrics"] = train[-1]["metrics"] if train else {}
    report["last_eval_metrics"] = evals[-1]["metrics"] if evals else {}
    eps = train[-1]["epsilon"] if train else None
    report["privacy"] = {"enabled": cfg.privacy.enabled, "delta": cfg.privacy.delta,
                         "noise_multiplier": cfg.privacy.noise_multiplier,
                         "epsilon": eps if cfg.privacy.enabled else None}
    report["relay"] = None if cfg.relay is None else _relay_report(cfg)
    fed = cfg.federation
    report["async"] = None if fed.mode.value != "async" else {
        "buffer_size": fed.buffer_size or fed.min_agents, "max_staleness": fed.max_staleness,
        "staleness_exponent": fed.staleness_exponent, "concurrency": fed.concurrency}
    return report


def _relay_report(cfg: Any) -> dict[str, Any]:
    """A relay's upstream side, from the state file the daemon rewrites about once a second."""
    from fedgate.server.relay import read_state

    state = read_state(cfg.server.data_dir) or {}
    age_s = time.time() - float(state.get("written") or 0.0)
    if not state:
        upstream_state = "unknown"
    elif state.get("stopped"):
        upstream_state = "stopped"
    elif age_s > 10.0:
        upstream_state = f"unknown (no update for {age_s:.0f}s: is the relay running?)"
    elif state.get("refused"):
        upstream_state = "refused"
    elif not state.get("joined", True):
        upstream_state = "waiting for its gateways before joining"
    else:
        upstream_state = "connected" if state.get("connected") else "disconnected"
    return {**state, "name": cfg.relay.name, "upstream": cfg.relay.uplink.server, "upstream_state": upstream_state}


def _status(config: str, as_json: bool) -> int:
    report = status_report(config)
    if as_json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    ck = report["checkpoint"]
    relay = report["relay"]
    lines = [] if relay is None else [
        f"relay {relay['name']} -> headquarters {relay['upstream']}: {relay['upstream_state']}"
        + ("" if relay.get("upstream_committed_round") is None
           else f", headquarters committed round {relay['upstream_committed_round']}")
        + (f", {relay['outbox']} results kept for headquarters" if relay.get("outbox") else "")
        + ("" if relay.get("gateways_committed_round") is None or relay["gateways_committed_round"] < 0
           else f", gateways told round {relay['gateways_committed_round']} committed")
        + (f", serving {relay['serving']['kind']} round {relay['serving']['round']}" if relay.get("serving") else ""),
    ]
    if relay is not None and relay.get("refused"):
        ref = relay["refused"]
        lines.append(f"  refused by headquarters ({ref.get('code')}): {ref.get('message')}")
    rounds = (f"{report['train_rounds']} of {report['rounds_planned']} train rounds committed" if relay is None
              else f"{report['train_rounds']} local train rounds combined (rounds set by headquarters)")
    lines += [f"federation {report['federation']} ({report['strategy']}): {rounds}",
             "checkpoint: " + ("none" if ck is None else f"round {ck['round']} ({ck['phase']}) {ck['path']}")]
    sched = report["schedule"]
    if sched is not None:
        due = sched["next_train_round_not_before"]
        lines.append(f"round_interval {sched['round_interval_s']:g}s" + (
            "" if due is None else ", next train round not before "
            + time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(due))))
    if report["async"] is not None:
        a = report["async"]
        lines.append(f"mode: async (buffer_size {a['buffer_size']}, max_staleness {a['max_staleness']}, "
                     f"staleness_exponent {a['staleness_exponent']:g}, concurrency {a['concurrency'] or 'any'})")
    if report["last_train_metrics"]:
        lines.append("last train metrics: " + _fmt(report["last_train_metrics"]))
    if report["last_eval_metrics"]:
        lines.append("last evaluation: " + _fmt(report["last_eval_metrics"]))
    priv = report["privacy"]
    if priv["enabled"]:
        eps = priv["epsilon"]
        lines.append(f"privacy spent: epsilon {eps if eps is not None else 0:.4g} at delta {priv['delta']:g}")
    else:
        lines.append("privacy: off")
    lines.append(f"agents ({len(report['agents'])}):")
    for a in report["agents"]:
        lines.append(f"  {a['name']:<24} {a['state'] or '-':<6} samples {a['n_samples']}  {a['software']}")
    if report["rejections"]:
        lines.append("rejections: " + ", ".join(f"{k} {v}" for k, v in sorted(report["rejections"].items())))
    print("\n".join(lines))
    return 0


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) and math.isfinite(v) else f"{k} {v}"
                     for k, v in sorted(metrics.items()))


def _export(config: str, out: str) -> int:
    import numpy as np

    from fedgate.server.config import load_config

    cfg = load_config(config)
    ckpt, path, _ = _newest_checkpoint(cfg)
    if ckpt is None:
        print("fedgate-server: no checkpoint to export yet", file=sys.stderr)
        return 1
    params = np.ascontiguousarray(ckpt.arrays["params"], dtype="<f4")
    os.makedirs(out, exist_ok=True)
    raw = params.tobytes()
    scaler = None
    if "scaler_mean" in ckpt.arrays:
        scaler = {"mean": ckpt.arrays["scaler_mean"].tolist(), "std": ckpt.arrays["scaler_std"].tolist()}
    doc = {"format": "fedgate-model", "version": 1, "federation": ckpt.meta.get("federation"),
           "round": ckpt.round, "phase": ckpt.phase, "spec": ckpt.meta.get("spec"),
           "features": ckpt.meta.get("features"), "label": ckpt.meta.get("label"), "scaler": scaler,
           "params": {"file": "model.f32", "dtype": "<f4", "length": int(params.size),
                      "sha256": hashlib.sha256(raw).hexdigest()},
           "source": str(path)}
    for name, data in (("model.f32", raw), ("model.json", json.dumps(doc, indent=2).encode())):
        tmp = Path(out) / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, Path(out) / name)
    print(f"exported round {ckpt.round} ({params.size} parameters) to {out}/model.json and {out}/model.f32")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
