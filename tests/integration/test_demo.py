"""The reduced demo, end to end: ``fedgate-demo`` with two sites and a few rounds.

Real processes throughout: ``fedgate-server keygen``/``fedgate-agent keygen``, two
``fedgate-sim`` plants (one over Modbus RTU on a pty pair, the fault-free new line over
Modbus TCP), two ``fedgate-agent run`` daemons and ``fedgate-server run`` with CURVE keys.
The demo reports through ``--json``; the test then checks that nothing it started is
still running.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

pytestmark = pytest.mark.slow

ROUNDS = 6


def demo_command(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("fedgate-demo")
    head = [str(script)] if script.exists() else [sys.executable, "-m", "fedgate.agent.demo"]
    return head + list(args)


def leftovers(workdir: Path, pids: dict[str, int]) -> list[str]:
    """Processes the demo started that still exist, by pid or by a command line naming its directory."""
    found = []
    for name, pid in pids.items():
        try:
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                found.append(f"{name} (pid {pid}): {proc.cmdline()}")
        except psutil.NoSuchProcess:
            pass
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if proc.info["pid"] != me and any(str(workdir) in part for part in cmd):
            found.append(f"pid {proc.info['pid']}: {cmd}")
    return found


@pytest.fixture(scope="module")
def reduced_demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("demo")
    workdir, report = base / "work", base / "demo.json"
    proc = subprocess.run(
        demo_command("--agents", "2", "--rounds", str(ROUNDS), "--warmup", "40", "--workdir", str(workdir),
                     "--json", str(report)),
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"demo failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    result = json.loads(report.read_text())
    result["_stdout"] = proc.stdout
    result["_workdir"] = workdir
    return result


def test_reduced_demo_runs_every_round_and_prints_the_table(reduced_demo: dict[str, Any]) -> None:
    out = reduced_demo["_stdout"]
    assert reduced_demo["ok"] is True
    assert [r["round"] for r in reduced_demo["rounds"]] == list(range(1, ROUNDS + 1))
    assert all(r["agents"] == 2 for r in reduced_demo["rounds"])
    for r in range(1, ROUNDS + 1):
        assert f"round {r}/{ROUNDS}  agents 2" in out
    assert "Was federation worth it?" in out
    assert {s["site"] for s in reduced_demo["sites"]} == {"site-a", "site-b"}


def test_global_model_validation_improves_and_beats_always_no_fault(reduced_demo: dict[str, Any]) -> None:
    rounds = reduced_demo["rounds"]
    first, last = rounds[0], rounds[-1]
    seen = [(r["round"], r["val_loss"], r["val_f1"], r["val_auc"]) for r in rounds]
    # the agents' evaluation of each new global model on their own data
    assert last["val_loss"] < first["val_loss"], seen
    assert last["val_auc"] >= first["val_auc"], seen
    # "always no fault" scores F1 0 and AUC 0.5
    assert last["val_f1"] > 0.0, seen
    assert last["val_auc"] > 0.5, seen


def test_federated_model_is_at_least_as_good_as_the_average_local_model(reduced_demo: dict[str, Any]) -> None:
    sites = {s["site"]: s for s in reduced_demo["sites"]}
    fed = [s["f1"]["federated"] for s in sites.values()]
    local = [s["f1"]["local"] for s in sites.values()]
    table = reduced_demo["table"]
    assert sum(fed) / len(fed) >= sum(local) / len(local), table
    assert min(fed) > 0.0, table  # beats "always no fault" on every site's held-out data
    new_line = sites["site-b"]
    assert new_line["train_positive"] == 0, table  # its own history holds no fault ...
    assert new_line["test_faults"] >= 1, table  # ... its future does
    assert new_line["warned"]["local"] == 0, table
    assert new_line["warned"]["federated"] >= 1, table


def test_no_process_is_left_behind(reduced_demo: dict[str, Any]) -> None:
    pids = reduced_demo["pids"]
    assert {"server", "agent-site-a", "agent-site-b", "plant-site-a", "plant-site-b"} <= set(pids)
    assert leftovers(reduced_demo["_workdir"], pids) == []
    codes = reduced_demo["exit_codes"]
    assert all(codes[n] == 0 for n in ("server", "agent-site-a", "agent-site-b", "plant-site-a", "plant-site-b"))


def test_interrupt_stops_every_process(tmp_path: Path) -> None:
    workdir, report = tmp_path / "work", tmp_path / "demo.json"
    proc = subprocess.Popen(
        demo_command("--agents", "2", "--rounds", "3", "--warmup", "60", "--workdir", str(workdir),
                     "--json", str(report)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        agents_up = [workdir / "sites" / s / "data" / "agent.db" for s in ("site-a", "site-b")]
        deadline = time.monotonic() + 60
        while not all(p.exists() for p in agents_up):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the demo's agents did not start"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, out
    assert "interrupted" in out
    result = json.loads(report.read_text())
    assert result["error"] == "interrupted"
    assert {"agent-site-a", "agent-site-b", "plant-site-a", "plant-site-b"} <= set(result["pids"])
    assert leftovers(workdir, result["pids"]) == []


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:  # gone meanwhile
        return []


def test_a_daemon_dying_fails_the_demo_cleanly(tmp_path: Path) -> None:
    workdir, report = tmp_path / "work", tmp_path / "demo.json"
    proc = subprocess.Popen(
        demo_command("--agents", "2", "--rounds", "3", "--warmup", "60", "--workdir", str(workdir),
                     "--json", str(report)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        db = workdir / "sites" / "site-b" / "data" / "agent.db"
        deadline = time.monotonic() + 60
        while not db.exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the demo's agents did not start"
            time.sleep(0.2)
        victim = None
        config = str(workdir / "sites" / "site-b" / "agent.toml")
        while victim is None:  # the database can appear before the daemon (commissioning runs first)
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the demo's agent for site-b did not start"
            # this demo's own agent (by its config's full path): another run's demo may be alive too
            victim = next((p for p in psutil.Process(proc.pid).children(recursive=True)
                           if _cmdline(p) and any(part.endswith(config) or part == config
                                                  for part in _cmdline(p)) and "run" in _cmdline(p)), None)
            if victim is None:
                time.sleep(0.1)
        victim.kill()
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, out
    assert "agent-site-b exited" in out
    result = json.loads(report.read_text())
    assert "agent-site-b" in result["error"]
    assert leftovers(workdir, result["pids"]) == []
