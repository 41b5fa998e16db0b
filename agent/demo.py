"""``fedgate-demo``: a whole federation on this machine, with the real commands.

It generates CURVE keys (``fedgate-server keygen``, ``fedgate-agent keygen``) into a
temporary directory, starts one simulated plant per site (``fedgate-sim``; see
:mod:`fedgate.agent.demo_setup` for the sites), one agent per site polling it over Modbus
(``fedgate-agent run``), lets the agents collect some history, starts the aggregation
server (``fedgate-server run``) and prints one line per training round. At the end it
stops every process and prints, per site, the federated model against a local-only and
a centralized model on the site's held-out future (:mod:`fedgate.agent.demo_report`).

Every process runs in its own process group and is stopped on exit, on Ctrl-C and on
SIGTERM; the demo never imports the server: it talks to the daemons through their
files (configs, the server's ``history.db``, the agents' databases) and the server's
Prometheus endpoint.

Exit status: 0 done, 1 a daemon failed or a step timed out, 2 bad arguments,
130 interrupted.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import math
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedgate.agent.demo_procs import ChildDied, Supervisor, command, free_port, wait_until
from fedgate.agent.demo_setup import FEATURES, SITES, SPEED, Site, Timing, agent_config, dump_toml, server_config
from fedgate.agent.demo_watch import eval_summary, model_round, pick, read_rounds, read_state, sample_counts
from fedgate.agent.demo_watch import scrape_bytes
from fedgate.core.errors import FedgateError

__all__ = ["main", "build_parser", "Demo"]

log = logging.getLogger("fedgate.demo")

HELD_OUT_START_S = 6 * 3600.0  # plant time where every site's held-out data begins ...
HELD_OUT_LEN_S = 3.5 * 3600.0  # ... and how long it lasts
_HEADER = "Written by fedgate-demo for one site of the demo federation (a temporary file)."


_STREAM = [sys.stdout]


def _out(line: str = "") -> None:
    _STREAM[0].write(line + "\n")
    _STREAM[0].flush()


def _num(v: float | None, fmt: str) -> str:
    return "  -  " if v is None else format(v, fmt)


def _kb(n: float) -> str:
    return f"{n / 1024:.1f} kB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.2f} MB"


class Demo:
    """One run of the demo (see the module docstring)."""

    def __init__(self, *, n_agents: int, rounds: int, warmup_s: float, keep: bool, workdir: Path | None = None,
                 timing: Timing = Timing()) -> None:
        self.sites: tuple[Site, ...] = SITES[:n_agents]
        self.rounds = rounds
        self.warmup_s = warmup_s
        self.keep = keep
        self.timing = timing
        self.sup = Supervisor()
        self.dir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="fedgate-demo-"))
        self.t0 = time.monotonic()
        self.ready_wall: dict[str, float] = {}
        self.plants: dict[str, dict[str, Any]] = {}
        self.traces: dict[str, Any] = {}
        self.round_rows: list[dict[str, Any]] = []
        self.result: dict[str, Any] = {"ok": False, "workdir": str(self.dir), "sites": [], "rounds": []}
        self._cleaned = False
        self.metrics_port = 0
        self.server_cfg_path = self.dir / "server" / "server.toml"

    # ------------------------------------------------------------------ paths
    def site_dir(self, site: Site) -> Path:
        return self.dir / "sites" / site.name

    def db(self, site: Site) -> Path:
        return self.site_dir(site) / "data" / "agent.db"

    @property
    def history_db(self) -> Path:
        return self.dir / "server" / "data" / "history.db"

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    # ------------------------------------------------------------------ steps
    def run(self) -> dict[str, Any]:
        names = ", ".join(f"{s.name} ({s.profile})" for s in self.sites)
        _out(f"fedgate demo: {len(self.sites)} sites [{names}], {self.rounds} rounds; working in {self.dir}")
        self.make_keys()
        self.start_plants()
        self.start_agents()
        self.warm_up()
        self.start_server()
        self.follow_rounds()
        self.wait_for_models()
        self.show_live()
        self.stop_daemons()
        self.report()
        self.result["ok"] = True
        self.result["elapsed_s"] = round(self.elapsed(), 1)
        _out(f"\ndone in {self.elapsed():.0f} s; every process stopped"
             + (f"; files kept in {self.dir}" if self.keep else ""))
        return self.result

    def make_keys(self) -> None:
        keys = self.dir / "keys"
        allow = self.dir / "server" / "agents.d"
        for d in (keys, allow, self.dir / "logs"):
            d.mkdir(parents=True, exist_ok=True)
        jobs = [("keygen-server", command("fedgate-server") + ["keygen", "server", "--dir", str(keys)])]
        jobs += [(f"keygen-{s.name}", command("fedgate-agent") + ["keygen", s.name, "--dir", str(keys)])
                 for s in self.sites]
        for name, argv in jobs:
            self.sup.spawn(name, argv, self.dir / "logs" / f"{name}.log")
        for name, _ in jobs:
            child = self.sup.children[name]
            code = child.proc.wait(timeout=60)
            if code != 0:
                raise ChildDied(f"{name} failed (exit {code}):\n{child.tail()}")
        for s in self.sites:
            shutil.copyfile(keys / f"{s.name}.key", allow / f"{s.name}.key")
        _out(f"keys: CURVE key pairs for the server and {len(self.sites)} agents in {keys} "
             f"(public keys allow-listed in {allow})")

    def start_plants(self) -> None:
        ready: dict[str, Path] = {}
        for s in self.sites:
            d = self.site_dir(s)
            d.mkdir(parents=True, exist_ok=True)
            ready[s.name] = d / "plant.json"
            argv = command("fedgate-sim") + ["--profile", s.profile, "--seed", str(s.seed), "--speed", f"{SPEED:g}",
                                             "--ready-file", str(ready[s.name]), "--log-level", "warning"]
            if s.link == "rtu":
                argv += ["--rtu-pty", str(d / "plc.tty"), "--baudrate", "19200"]
            else:
                argv += ["--tcp", "127.0.0.1:0"]
            if s.link == "tcp+sensor":
                argv += ["--sensor-pty", str(d / "vib.tty"), "--sensor-format", "nmea",
                         "--sensor-rate", f"{1.0 / self.timing.poll_s:g}"]
            self.sup.spawn(f"plant-{s.name}", argv, self.dir / "logs" / f"plant-{s.name}.log")
        for s in self.sites:
            name = f"plant-{s.name}"
            wait_until(lambda p=ready[s.name]: p.exists(), 30, f"{name} ready file",
                       check=lambda n=name: self.sup.check_alive([n]))
            self.ready_wall[s.name] = time.time()
            self.plants[s.name] = info = json.loads(ready[s.name].read_text())
            where = (f"Modbus RTU on {info['rtu_link']} (pty pair)" if s.link == "rtu"
                     else f"Modbus TCP on {info['host']}:{info['port']}")
            if s.link == "tcp+sensor":
                where += f", NMEA vibration sensor on {info['sensor_path']} (pty)"
            _out(f"plant {s.name}: fedgate-sim --profile {s.profile} --seed {s.seed} --speed {SPEED:g}, {where}")

    def start_agents(self) -> None:
        self.server_port = free_port()
        keys = self.dir / "keys"
        for s in self.sites:
            d = self.site_dir(s)
            doc = agent_config(s, data_dir=d / "data", server=f"tcp://127.0.0.1:{self.server_port}",
                               server_key=keys / "server.key", secret_key=keys / f"{s.name}.key_secret",
                               plant=self.plants[s.name], timing=self.timing)
            (d / "agent.toml").write_text(dump_toml(doc, _HEADER))
        self.check_devices()
        for s in self.sites:
            self.sup.spawn(f"agent-{s.name}",
                           command("fedgate-agent") + ["run", "--config", str(self.site_dir(s) / "agent.toml")],
                           self.dir / "logs" / f"agent-{s.name}.log")
        _out(f"agents: fedgate-agent run --config {self.dir}/sites/<site>/agent.toml (x{len(self.sites)}), "
             "sampling and storing; the server is not up yet")

    def check_devices(self) -> None:
        """Commission every site as an engineer would: ``fedgate-agent check`` reads each tag once."""
        for s in self.sites:
            self.sup.spawn(f"check-{s.name}",
                           command("fedgate-agent") + ["check", "--config", str(self.site_dir(s) / "agent.toml"),
                                                       "--json"],
                           self.dir / "logs" / f"check-{s.name}.log", stdout_path=self.site_dir(s) / "check.json")
        for s in self.sites:
            child = self.sup.children[f"check-{s.name}"]
            code = child.proc.wait(timeout=60)
            try:
                report = json.loads((self.site_dir(s) / "check.json").read_text())
            except (OSError, ValueError):
                raise ChildDied(f"fedgate-agent check for {s.name} failed (exit {code}):\n{child.tail()}") from None
            tags = {f"{t['device']}.{t['tag']}": t for t in report.get("tags", [])}
            good = sum(1 for t in tags.values() if t.get("quality") == "good")
            plans = ", ".join(f"{p['device']} {p['requests_per_cycle']} request(s) per cycle"
                              for p in report.get("plan", []))
            shown = []
            for key, unit_fmt in (("vibration", ".2f"), ("temperature", ".1f")):
                t = tags.get(s.tag_of(key))
                if t and isinstance(t.get("value"), (int, float)):
                    shown.append(f"{key} {format(t['value'], unit_fmt)} {t.get('unit', '')}".rstrip())
            _out(f"check {s.name}: {good}/{len(tags)} tags read good ({plans}); " + ", ".join(shown))
            if not report.get("ok"):
                raise ChildDied(f"fedgate-agent check for {s.name} failed: " + "; ".join(report.get("failures", [])))

    def _agent_names(self) -> list[str]:
        return [f"agent-{s.name}" for s in self.sites]

    def _daemons(self) -> list[str]:
        names = [f"plant-{s.name}" for s in self.sites] + self._agent_names()
        return names + (["server"] if "server" in self.sup.children else [])

    def sample_counts(self) -> dict[str, tuple[int, int]]:
        """Labelled samples and positive labels each agent has stored so far."""
        return {s.name: sample_counts(self.db(s)) for s in self.sites}

    def warm_up(self) -> None:
        from fedgate.agent.demo_report import simulate

        start = time.monotonic()
        next_line = start + 5.0
        todo = list(self.sites)
        min_samples = max(20, int(0.5 * self.warmup_s / self.timing.hop_s))
        while True:
            self.sup.check_alive(self._daemons())
            if todo:  # the ground truth of one site, while the agents collect
                s = todo.pop(0)
                self.traces[s.name] = simulate(s, HELD_OUT_START_S + HELD_OUT_LEN_S)
            counts = self.sample_counts()
            waited = time.monotonic() - start
            enough = all(n >= min_samples for n, _ in counts.values())
            if waited >= self.warmup_s and enough and not todo:
                break
            if waited > 4 * self.warmup_s + 60:
                raise TimeoutError(f"agents did not store {min_samples} samples each within {waited:.0f} s: "
                                   f"{counts} (see {self.dir}/logs)")
            if time.monotonic() >= next_line:
                next_line += 5.0
                _out(f"warm-up {waited:4.0f} s  samples stored (with a fault ahead): "
                     + "  ".join(f"{k} {n} ({p})" for k, (n, p) in counts.items()))
            time.sleep(0.5)
        counts = self.sample_counts()
        _out(f"warm-up done after {time.monotonic() - start:.0f} s: "
             + "  ".join(f"{k} {n} ({p})" for k, (n, p) in counts.items()))

    def start_server(self) -> None:
        self.metrics_port = free_port()
        sdir = self.dir / "server"
        doc = server_config(bind=f"tcp://127.0.0.1:{self.server_port}", data_dir=sdir / "data",
                            secret_key=self.dir / "keys" / "server.key_secret", agents_dir=sdir / "agents.d",
                            metrics=f"127.0.0.1:{self.metrics_port}", rounds=self.rounds, n_agents=len(self.sites))
        self.server_doc = doc
        self.server_cfg_path.write_text(dump_toml(doc, "Written by fedgate-demo (a temporary file)."))
        self.sup.spawn("server", command("fedgate-server") + ["run", "--config", str(self.server_cfg_path)],
                       self.dir / "logs" / "server.log")
        _out(f"server: fedgate-server run --config {self.server_cfg_path} (tcp://127.0.0.1:{self.server_port}, "
             f"CURVE, {len(self.sites)} allowed keys); statistics round, then {self.rounds} training rounds")

    def follow_rounds(self) -> None:
        printed_stats = False
        next_round = 1
        last_progress = time.monotonic()
        train_seen_at: dict[int, float] = {}
        while next_round <= self.rounds:
            self.sup.check_alive(self._daemons())
            rows = read_rounds(self.history_db)
            if not printed_stats and (0, "statistics") in rows:
                r = rows[(0, "statistics")]
                _out(f"statistics round: global feature scaler merged from {r['n']} agents "
                     f"({r['finished'] - r['started']:.2f} s)")
                printed_stats = True
                last_progress = time.monotonic()
            ready = []
            rnd = next_round
            while rnd <= self.rounds and (rnd, "train") in rows:
                train_seen_at.setdefault(rnd, time.monotonic())
                # every agent evaluates the new model; the server records them as they come in
                ev = rows.get((rnd, "evaluate"))
                complete = ev is not None and len(ev.get("agents", [])) >= int(rows[(rnd, "train")]["n"] or 0)
                if not complete and time.monotonic() - train_seen_at[rnd] < 10.0:
                    break
                ready.append(rnd)
                rnd += 1
            if ready:
                # Rounds take milliseconds, so several may commit between two looks at the server's
                # byte counters: show the average per round so far (all traffic since the server started).
                moved = scrape_bytes(self.metrics_port)
                share = None if moved is None else moved / ready[-1]
                for r in ready:
                    self._print_round(r, rows[(r, "train")], rows.get((r, "evaluate")), share, True)
                next_round = ready[-1] + 1
                last_progress = time.monotonic()
                continue
            stalled = time.monotonic() - last_progress
            if stalled > 25.0:
                self._raise_on_failed_tasks(next_round)
            if stalled > 90.0:
                raise TimeoutError(f"no training round committed for 90 s (waiting for round {next_round}); "
                                   f"see {self.dir}/logs/server.log")
            time.sleep(0.1)

    def _raise_on_failed_tasks(self, rnd: int) -> None:
        """A round that waits because agents fail their tasks: say which and why, from their logs."""
        problems = []
        for s in self.sites:
            failed = int((self._state(s).get("federation") or {}).get("tasks_failed") or 0)
            if failed:
                log_path = self.dir / "logs" / f"agent-{s.name}.log"
                errors = [line for line in log_path.read_text(errors="replace").splitlines() if " ERROR " in line]
                problems.append(f"{s.name}: {failed} failed task(s); last: {errors[-1] if errors else '?'}")
        if problems:
            raise TimeoutError(f"round {rnd} cannot close, agents fail their tasks:\n  " + "\n  ".join(problems))

    def _print_round(self, rnd: int, train: dict[str, Any], ev: dict[str, Any] | None, moved: float | None,
                     shared: bool) -> None:
        tm = train["metrics"]
        summary = eval_summary(ev.get("agents", []) if ev else [])
        loss = pick(tm, "loss", "train_loss")
        bytes_in, bytes_out = pick(tm, "bytes_in"), pick(tm, "bytes_out")
        if bytes_in is not None and bytes_out is not None:  # the server counted this round itself
            moved, shared = bytes_in + bytes_out, False
        seconds = max(0.0, float(train["finished"]) - float(train["started"]))
        row = {"round": rnd, "agents": train["n"], "train_loss": loss, "val_f1": summary["f1"],
               "val_auc": summary["auc"], "val_loss": summary["loss"], "bytes": moved,
               "seconds": round(seconds, 4), "train_metrics": tm,
               "eval_metrics": ev["metrics"] if ev else {}}
        self.round_rows.append(row)
        self.result["rounds"] = self.round_rows
        width = len(str(self.rounds))
        moved_text = "-" if moved is None else _kb(moved) + ("/round (mean)" if shared else "")
        _out(f"round {rnd:>{width}}/{self.rounds}  agents {train['n']}  train loss {_num(loss, '.3f')}  "
             f"val F1 {_num(summary['f1'], '.2f')}  AUC {_num(summary['auc'], '.2f')}  "
             f"moved {moved_text}  {seconds:.2f} s")

    def wait_for_models(self) -> None:
        def all_have() -> bool:
            return all((model_round(self.db(s)) or 0) >= self.rounds for s in self.sites)

        wait_until(all_have, 30, f"every agent holding the global model of round {self.rounds}",
                   poll_s=0.2, check=lambda: self.sup.check_alive(self._daemons()))

    def _state(self, site: Site) -> dict[str, Any]:
        return read_state(self.site_dir(site) / "data" / "agent.state.json")

    def show_live(self, seconds: float = 6.0) -> None:
        """A few seconds of the global model at work on every gateway (from the agents' state files)."""
        _out(f"live: every agent now scores each new window with the global model of round {self.rounds} "
             "and writes the score to its PLC (holding register 0), the alarm to coil 1")
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(2.0)
            self.sup.check_alive(self._daemons())
            cells = []
            for s in self.sites:
                pred = self._state(s).get("prediction") or {}
                score = pred.get("score")
                text = "-" if not isinstance(score, (int, float)) else f"p {score:.2f}"
                cells.append(f"{s.name} {text}{' ALARM' if pred.get('alarm') else ''}")
            _out("live  " + "   ".join(cells))
        writes = errors = 0
        for s in self.sites:
            pred = self._state(s).get("prediction") or {}
            writes += int(pred.get("predictions") or 0)
            errors += int(pred.get("write_errors") or 0)
        self.result["live"] = {"predictions": writes, "write_errors": errors}
        _out(f"live: {writes} predictions written back to the PLCs, {errors} write errors")

    def stop_daemons(self) -> None:
        self.stop_wall = time.time()
        codes = self.sup.stop_all(order=[self._agent_names(), ["server"]])
        self.result["exit_codes"] = codes
        self.result["pids"] = self.sup.pids()
        daemons = {k: v for k, v in codes.items() if not k.startswith(("keygen", "check"))}
        bad = {k: v for k, v in daemons.items() if v not in (0, None)}
        _out(f"stopped {len(daemons)} daemons (SIGTERM): "
             + ("all exited cleanly" if not bad else f"unclean exits {bad}"))

    def report(self) -> None:
        from fedgate.agent.config import parse_agent_config
        from fedgate.agent.demo_report import compare, format_table, held_out, load_site, simulate
        from fedgate.core.config import load_toml

        names = [n for n, _, _ in FEATURES]
        fed = self.server_doc["federation"]
        data, tests = {}, {}
        starts = []
        for s in self.sites:
            plant_at_stop = (self.stop_wall - self.ready_wall[s.name]) * SPEED
            starts.append(max(HELD_OUT_START_S, math.ceil((plant_at_stop + 600.0) / 1800.0) * 1800.0))
        start = max(starts)
        end = start + HELD_OUT_LEN_S
        for s in self.sites:
            path = self.site_dir(s) / "agent.toml"
            cfg = parse_agent_config(load_toml(str(path)), file=str(path), with_drivers=False)
            trace = self.traces.get(s.name)
            if trace is None or len(trace.step) * trace.dt_s < end:
                trace = simulate(s, end)
            tests[s.name] = held_out(s, trace, cfg.samples, start_s=start, end_s=end, speed=SPEED,
                                     poll_s=self.timing.poll_s)
            data[s.name] = load_site(self.db(s), names)
        results = compare(self.sites, data, tests, spec=fed["model"], hyper=fed, rounds=self.rounds,
                          threshold=0.5, horizon_s=self.timing.horizon_s * SPEED)
        table = format_table(results, (start / 3600.0, end / 3600.0), self.timing.horizon_s * SPEED / 60.0)
        _out("")
        _out(table)
        self.result["sites"] = [r.to_dict() for r in results]
        self.result["held_out_hours"] = [start / 3600.0, end / 3600.0]
        self.result["table"] = table

    # ------------------------------------------------------------------ cleanup
    def cleanup(self) -> None:
        """Stop every process (idempotent); remove the work directory unless kept."""
        if self._cleaned:
            return
        self._cleaned = True
        with contextlib.suppress(ValueError):  # only in the main thread
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.sup.stop_all(order=[self._agent_names(), ["server"]])
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fedgate-demo", description="A whole fedgate federation on this machine.")
    ap.add_argument("--agents", type=int, default=len(SITES), choices=range(2, len(SITES) + 1),
                    help=f"number of sites, one plant and one agent each (default {len(SITES)})")
    ap.add_argument("--rounds", type=int, default=20, help="training rounds (default 20)")
    ap.add_argument("--warmup", type=float, default=75.0, metavar="SECONDS",
                    help="history the agents collect before the server starts (default 75)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (keys, configs, logs, databases)")
    ap.add_argument("--json", metavar="PATH",
                    help="also write the results as JSON to PATH ('-': JSON on stdout, progress on stderr)")
    ap.add_argument("--workdir", metavar="DIR", help=argparse.SUPPRESS)
    return ap


class _Stop(KeyboardInterrupt):
    """SIGTERM or SIGHUP: handled like Ctrl-C."""


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fedgate-demo``; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.rounds < 1:
        build_parser().error("--rounds must be >= 1")
    if args.warmup < 0:
        build_parser().error("--warmup must be >= 0")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _STREAM[0] = sys.stderr if args.json == "-" else sys.stdout
    workdir = Path(args.workdir) if args.workdir else None
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    demo = Demo(n_agents=args.agents, rounds=args.rounds, warmup_s=args.warmup, keep=args.keep or bool(workdir),
                workdir=workdir)
    atexit.register(demo.cleanup)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_stop)
    code = 0
    try:
        demo.run()
    except KeyboardInterrupt as exc:
        _out(f"\ninterrupted ({str(exc) or 'SIGINT'}): stopping every process")
        demo.result["error"] = "interrupted"
        code = 130
    except (ChildDied, TimeoutError, OSError, ValueError, ImportError, FedgateError) as exc:
        demo.keep = True  # the logs explain what went wrong
        _out(f"\nfedgate-demo failed: {exc}\n(keys, configs, logs and databases kept in {demo.dir})")
        demo.result["error"] = str(exc)
        code = 1
    finally:
        demo.cleanup()
        demo.result["pids"] = demo.sup.pids()
        if args.json == "-":
            sys.stdout.write(json.dumps(demo.result, indent=2, default=str) + "\n")
            sys.stdout.flush()
        elif args.json:
            Path(args.json).write_text(json.dumps(demo.result, indent=2, default=str))
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
