"""``fedgate-agent``: run the daemon, check devices, make keys, show the state.

::

    fedgate-agent run --config /etc/fedgate/agent.toml
    fedgate-agent check --config agent.toml [--json]
    fedgate-agent keygen press-07 [--dir /etc/fedgate/keys] [--force]
    fedgate-agent status --config agent.toml [--json]     (or --state FILE)

Imports are lazy so ``run`` reaches systemd readiness quickly.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "format_status"]


def _cmd_run(args: argparse.Namespace) -> int:
    from fedgate.agent.service import run_agent

    return run_agent(args.config)


def _cmd_check(argv: Sequence[str]) -> int:
    from fedgate.drivers.check import main as check_main

    return check_main(list(argv))


def _cmd_keygen(args: argparse.Namespace) -> int:
    import zmq

    from fedgate.core.errors import SecurityError
    from fedgate.core.keys import write_keypair

    directory = Path(args.dir)
    targets = [directory / f"{args.name}.key", directory / f"{args.name}.key_secret"]
    if not args.force and any(p.exists() for p in targets):
        sys.stderr.write(f"fedgate-agent keygen: {targets[1]} exists (use --force to replace it)\n")
        return 1
    public, secret = zmq.curve_keypair()
    try:
        pub_path, sec_path = write_keypair(directory, args.name, public.decode("ascii"), secret.decode("ascii"))
    except (SecurityError, OSError) as exc:
        sys.stderr.write(f"fedgate-agent keygen: {exc}\n")
        return 1
    sys.stdout.write(f"public key: {pub_path} (copy it to the server's agents_dir)\n"
                     f"secret key: {sec_path} (mode 0600; [uplink] secret_key)\n")
    return 0


def _age(ts: Any, now: float) -> str:
    if ts is None:
        return "never"
    from fedgate.core.units import format_duration

    return f"{format_duration(max(0.0, now - float(ts)))} ago"


def format_status(state: dict[str, Any], *, now: float | None = None) -> str:
    """The state file as a few human lines."""
    now = time.time() if now is None else now
    s, f, p = state.get("samples", {}), state.get("federation", {}), state.get("prediction", {})
    running = state.get("running", False)
    lines = [
        f"agent {state.get('agent')} (pid {state.get('pid')}): {'running' if running else 'stopped'}, "
        f"state updated {_age(state.get('updated_ts'), now)}",
        f"samples stored: {s.get('stored', 0)} (written {s.get('rows_written', 0)}, dropped "
        f"{s.get('rows_dropped', 0)}, waiting for label {s.get('pending_windows', 0)})",
        f"last round: {f.get('last_round')} ({f.get('last_kind') or '-'}, {_age(f.get('last_task_ts'), now)}); "
        f"tasks done {f.get('tasks_done', 0)}, failed {f.get('tasks_failed', 0)}",
        f"model: round {f.get('model_round')}, age {_age(f.get('model_ts'), now).removesuffix(' ago')}",
    ]
    if p.get("score") is None:
        lines.append("last prediction: none")
    else:
        lines.append(f"last prediction: {p['score']:.4g} at window end {_age(p.get('ts'), now)}"
                     f"{', ALARM' if p.get('alarm') else ''} ({p.get('predictions', 0)} scored, "
                     f"{p.get('write_errors', 0)} write errors)")
    up = state.get("uplink")
    if up:
        lines.append(f"uplink: {'connected' if up.get('connected') else 'disconnected'} to {up.get('server')}, "
                     f"outbox {up.get('outbox')}, last contact {_age(up.get('last_contact_ts'), now)}")
    else:
        lines.append("uplink: none configured")
    for name, d in sorted((state.get("devices") or {}).items()):
        errs = sum((d.get("errors") or {}).values())
        lines.append(f"device {name}: {d.get('state')} ({d.get('requests', 0)} requests, {errs} errors"
                     f"{', last: ' + d['last_error'] if d.get('last_error') else ''})")
    return "\n".join(lines)


def _cmd_status(args: argparse.Namespace) -> int:
    if args.state:
        path = Path(args.state)
    else:
        from fedgate.agent.config import load_agent_config
        from fedgate.core.errors import ConfigError

        try:
            path = load_agent_config(args.config, with_drivers=False).agent.state_path
        except ConfigError as exc:
            sys.stderr.write(f"fedgate-agent status: {exc}\n")
            return 2
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        sys.stderr.write(f"fedgate-agent status: {path} does not exist (has the agent run yet?)\n")
        return 1
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"fedgate-agent status: cannot read {path}: {exc}\n")
        return 1
    if state.get("running"):
        pid = state.get("pid")
        try:
            os.kill(int(pid), 0)
        except (ProcessLookupError, TypeError, ValueError):
            state["running"] = False
        except PermissionError:
            pass
    if args.json:
        sys.stdout.write(json.dumps(state, indent=1, sort_keys=True) + "\n")
    else:
        sys.stdout.write(format_status(state) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "check":
        return _cmd_check(argv[1:])
    ap = argparse.ArgumentParser(prog="fedgate-agent", description="fedgate gateway agent")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="run the daemon (systemd Type=notify)")
    p.add_argument("--config", required=True, help="agent.toml")
    sub.add_parser("check", help="read every configured device once (--config FILE [--json])")
    p = sub.add_parser("keygen", help="write this agent's CURVE key pair")
    p.add_argument("name", nargs="?", help="the agent's name ([agent] name); the key files' stem")
    p.add_argument("--name", dest="name_opt", help=argparse.SUPPRESS)
    p.add_argument("--dir", default=".", help="directory for NAME.key and NAME.key_secret")
    p.add_argument("--force", action="store_true", help="replace existing key files")
    p = sub.add_parser("status", help="show the running agent's state")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--config", help="agent.toml (the state file is under its data_dir)")
    g.add_argument("--state", help="the state file itself")
    p.add_argument("--json", action="store_true", help="print the state as JSON")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        return _cmd_run(args)
    if args.cmd == "keygen":
        args.name = args.name or args.name_opt
        if not args.name:
            ap.error("keygen needs the agent's name")
        return _cmd_keygen(args)
    return _cmd_status(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
