"""agent.toml: every section, and errors that name file, key and value."""
from __future__ import annotations

import textwrap

import pytest

from fedgate.agent.config import Agg, load_agent_config, parse_agent_config
from fedgate.core.errors import ConfigError

BASE = textwrap.dedent("""
    [agent]
    name = "press-07"
    data_dir = "{data_dir}"

    [samples]
    grid = "500ms"
    window = "30s"
    hop = "5s"
    min_coverage = 0.9
    max_gap = "2s"
    features = [
      {{ name = "temp_mean", tag = "m1.temperature", agg = "mean" }},
      {{ name = "vib_rms", tag = "m1.vibration", agg = "rms" }},
      {{ name = "temp_slope", tag = "m1.temperature", agg = "slope" }},
    ]
    [samples.label]
    name = "fault_soon"
    tag = "m1.fault"
    agg = "max"
    horizon = "2m"

    [store]
    max_rows = 50000
    max_age = "30d"

    [predict]
    alarm_threshold = 0.7
    hysteresis = 0.1

    [metrics]
    address = "127.0.0.1:0"
""")


def _write(tmp_path, text: str):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_a_complete_file_loads(tmp_path):
    cfg = load_agent_config(_write(tmp_path, BASE.format(data_dir=tmp_path)), with_drivers=False)
    assert cfg.agent.name == "press-07" and cfg.agent.db_path == tmp_path / "agent.db"
    s = cfg.samples
    assert (s.grid_s, s.window_s, s.hop_s, s.max_gap_s) == (0.5, 30.0, 5.0, 2.0)
    assert (s.window_points, s.hop_points, s.horizon_points) == (60, 10, 240)
    assert s.feature_names == ["temp_mean", "vib_rms", "temp_slope"]
    assert s.features[1].agg is Agg.RMS and s.label is not None and s.label.horizon_s == 120.0
    assert cfg.store.max_rows == 50000 and cfg.store.max_age_s == 30 * 86400
    assert cfg.predict.alarm_threshold == 0.7 and cfg.predict.write_tag is None
    assert cfg.metrics.host_port() == ("127.0.0.1", 0)
    assert cfg.tags == ["m1.temperature", "m1.vibration", "m1.fault"]
    assert cfg.uplink is None


@pytest.mark.parametrize(
    "old, new, where",
    [
        ('agg = "rms"', 'agg = "median"', "samples.features[1].agg = 'median'"),
        ('hop = "5s"', 'hop = "1.2s"', "samples.hop = 1.2"),
        ('window = "30s"', 'window = "soon"', "samples.window = 'soon'"),
        ("min_coverage = 0.9", "min_coverage = 1.5", "samples.min_coverage = 1.5"),
        ('horizon = "2m"', 'horizon = "-1s"', "samples.label.horizon = '-1s'"),
        ("max_rows = 50000", "max_rows = 0", "store.max_rows = 0"),
        ('max_age = "30d"', "max_age = true", "store.max_age = True"),
        ('address = "127.0.0.1:0"', 'address = "localhost"', "metrics.address = 'localhost'"),
        ('name = "press-07"', 'name = "press 07"', "agent.name = 'press 07'"),
        ('name = "vib_rms"', 'name = "temp_mean"', "samples.features[1].name = 'temp_mean'"),
        ("hysteresis = 0.1", "hysteresis = 0.1\nalarm_tag = 'm1.alarm'\nbogus = 1", "predict.bogus = 1"),
        ('[metrics]', '[metric]', "metric"),
    ],
)
def test_errors_name_file_key_and_value(tmp_path, old, new, where):
    text = BASE.format(data_dir=tmp_path)
    assert old in text
    path = _write(tmp_path, text.replace(old, new, 1))
    with pytest.raises(ConfigError) as err:
        load_agent_config(path, with_drivers=False)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and where in msg, msg


def test_alarm_tag_needs_a_threshold(tmp_path):
    text = BASE.format(data_dir=tmp_path).replace("alarm_threshold = 0.7", 'alarm_tag = "m1.alarm"')
    with pytest.raises(ConfigError, match="predict.alarm_tag"):
        load_agent_config(_write(tmp_path, text), with_drivers=False)


def test_missing_sections_and_bad_toml_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"agent.toml: samples"):
        parse_agent_config({"agent": {"name": "a"}}, file="agent.toml", with_drivers=False)
    path = _write(tmp_path, "[agent\nname=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_agent_config(path)
    with pytest.raises(ConfigError, match="file not found"):
        load_agent_config(tmp_path / "nope.toml")


def test_the_uplink_section_is_the_uplinks_config(tmp_path):
    text = BASE.format(data_dir=tmp_path) + '\n[uplink]\nserver = "tcp://127.0.0.1:7443"\ninsecure = true\n'
    cfg = load_agent_config(_write(tmp_path, text), with_drivers=False)
    assert cfg.uplink.server == "tcp://127.0.0.1:7443" and cfg.uplink.insecure
    bad = text.replace("insecure = true", "insecure = false")
    with pytest.raises(ConfigError, match="agent.toml: uplink.server_key"):
        load_agent_config(_write(tmp_path, bad), with_drivers=False)


def test_the_shipped_example_is_valid_and_complete():
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "deploy" / "agent.toml"
    cfg = load_agent_config(path)
    assert cfg.uplink is not None and not cfg.uplink.insecure
    assert cfg.predict.write_tag == "pump1.prediction" and cfg.predict.alarm_tag == "pump1.alarm"
    assert cfg.samples.label is not None and cfg.samples.label.horizon_s == 300
    assert {d.name for d in cfg.drivers.devices} == {"pump1", "pump2", "vib2"}
    assert set(cfg.tags) <= {f"{d.name}.{t.name}" for d in cfg.drivers.devices for t in d.tags}


def test_tags_must_exist_and_write_tags_be_writable(tmp_path):
    drivers = """
[[transports]]
name = "plc"
kind = "modbus-tcp"
host = "127.0.0.1"
port = 502
[[devices]]
name = "m1"
transport = "plc"
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
  name = "fault"
  register = "discrete"
  address = 0
  type = "bool"
"""
    text = BASE.format(data_dir=tmp_path) + drivers
    assert load_agent_config(_write(tmp_path, text)).drivers is not None
    with pytest.raises(ConfigError, match=r"samples.features\[1\].tag = 'm1.vibrations'"):
        load_agent_config(_write(tmp_path, text.replace('tag = "m1.vibration"', 'tag = "m1.vibrations"')))
    with pytest.raises(ConfigError, match="predict.write_tag = 'm1.temperature': the tag is not writable"):
        load_agent_config(_write(tmp_path, text.replace("alarm_threshold = 0.7",
                                                        'alarm_threshold = 0.7\nwrite_tag = "m1.temperature"')))
