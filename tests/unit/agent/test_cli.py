"""fedgate-agent keygen / status / check dispatch, in process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from fedgate.agent.cli import format_status, main
from fedgate.core.keys import load_public_key, load_secret_key


def test_keygen_writes_a_key_pair_with_a_private_secret(tmp_path, capsys):
    assert main(["keygen", "press-07", "--dir", str(tmp_path)]) == 0
    pub, sec = tmp_path / "press-07.key", tmp_path / "press-07.key_secret"
    assert os.stat(sec).st_mode & 0o777 == 0o600
    assert len(load_public_key(pub)) == 40 and len(load_secret_key(sec)) == 40
    assert "press-07.key_secret" in capsys.readouterr().out
    before = sec.read_text()
    assert main(["keygen", "press-07", "--dir", str(tmp_path)]) == 1  # never overwrites silently
    assert sec.read_text() == before
    assert main(["keygen", "--name", "press-07", "--dir", str(tmp_path), "--force"]) == 0
    assert sec.read_text() != before


STATE = {
    "agent": "press-07", "pid": 1, "running": True, "updated_ts": 1000.0,
    "samples": {"stored": 1234, "rows_written": 1300, "rows_dropped": 66, "pending_windows": 3},
    "federation": {"last_round": 12, "last_kind": "train", "last_task_ts": 990.0, "tasks_done": 25,
                   "tasks_failed": 0, "model_round": 12, "model_ts": 940.0},
    "prediction": {"score": 0.8123, "ts": 995.0, "alarm": True, "predictions": 77, "write_errors": 2},
    "uplink": {"connected": True, "server": "tcp://hq:7443", "outbox": 0, "last_contact_ts": 999.0},
    "devices": {"pump1": {"state": "up", "requests": 500, "errors": {"timeout": 2}, "last_error": "timeout"},
                "vib": {"state": "down", "requests": 0, "errors": {}}},
}


def test_status_text_names_every_part():
    text = format_status(STATE, now=1000.0)
    for part in ("press-07", "samples stored: 1234", "dropped 66", "last round: 12 (train, 10s ago)",
                 "model: round 12, age 1m", "last prediction: 0.8123", "ALARM", "uplink: connected",
                 "device pump1: up (500 requests, 2 errors, last: timeout)", "device vib: down"):
        assert part in text, part


def test_status_reads_the_state_file_of_a_config(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    state = dict(STATE, pid=os.getpid(), updated_ts=time.time())
    (data / "agent.state.json").write_text(json.dumps(state))
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[agent]\nname = "press-07"\ndata_dir = "{data}"\n'
                   '[samples]\nfeatures = [{name = "x", tag = "d.x", agg = "mean"}]\n')
    assert main(["status", "--config", str(cfg), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"]["stored"] == 1234
    assert main(["status", "--state", str(data / "agent.state.json")]) == 0
    assert "running" in capsys.readouterr().out
    # a dead pid shows as stopped
    (data / "agent.state.json").write_text(json.dumps(dict(state, pid=2**22 + 12345)))
    assert main(["status", "--config", str(cfg)]) == 0
    assert "stopped" in capsys.readouterr().out


def test_status_without_a_state_file_or_with_a_bad_config(tmp_path, capsys):
    assert main(["status", "--state", str(tmp_path / "none.json")]) == 1
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "agent.toml"
    bad.write_text('[agent]\nname = "x y"\n[samples]\nfeatures = []\n')
    assert main(["status", "--config", str(bad)]) == 2
    assert "agent.name" in capsys.readouterr().err


def test_check_dispatches_to_the_drivers(tmp_path, capsys):
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[[devices]]\nname = "d"\ntransport = "nowhere"\n')
    assert main(["check", "--config", str(cfg)]) == 2
    assert "devices[0].transport" in capsys.readouterr().out


def test_run_refuses_a_bad_config_with_file_key_and_value(tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[agent]\nname = "a"\ndata_dir = "{tmp_path}"\n[samples]\ngrid = "fast"\n'
                   'features = [{name = "x", tag = "d.x"}]\n')
    out = subprocess.run([sys.executable, "-m", "fedgate.agent.cli", "run", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60, env=dict(os.environ, JOURNAL_STREAM="8:1"))
    assert out.returncode == 2
    assert f"<3>fedgate.agent.service: {cfg}: samples.grid = 'fast'" in out.stderr  # journald prefix


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as err:
        main(["keygen"])
    assert err.value.code == 2


def test_run_refuses_a_readable_secret_key_before_ready(tmp_path):
    assert main(["keygen", "gw", "--dir", str(tmp_path)]) == 0
    assert main(["keygen", "server", "--dir", str(tmp_path)]) == 0
    secret = tmp_path / "gw.key_secret"
    secret.chmod(0o644)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[agent]\nname = "gw"\ndata_dir = "{tmp_path / "data"}"\n'
                   f'[uplink]\nserver = "tcp://127.0.0.1:9"\nserver_key = "{tmp_path / "server.key"}"\n'
                   f'secret_key = "{secret}"\n'
                   '[samples]\nfeatures = [{name = "x", tag = "d.x"}]\n'
                   '[[transports]]\nname = "t"\nkind = "modbus-tcp"\nhost = "127.0.0.1"\nport = 9\n'
                   '[[devices]]\nname = "d"\ntransport = "t"\n  [[devices.tags]]\n  name = "x"\n'
                   '  register = "input"\n  address = 0\n  type = "uint16"\n')
    out = subprocess.run([sys.executable, "-m", "fedgate.agent.cli", "run", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert f"uplink.secret_key = '{secret}'" in out.stderr and not (tmp_path / "data").exists()
