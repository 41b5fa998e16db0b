"""The demo's generated configuration files load with the daemons' own loaders.

The demo writes ``agent.toml`` / ``server.toml`` from the ``deploy/`` templates; a key
renamed in a daemon must fail here in a second, not in the minute-long reduced demo.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fedgate.agent.config import parse_agent_config
from fedgate.agent.demo_setup import FEATURES, LABEL, SITES, Site, agent_config, dump_toml, server_config
from fedgate.server.config import parse_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PLANT = {"host": "127.0.0.1", "port": 5020, "unit_ids": [1], "rtu_link": "/tmp/plc.tty", "baudrate": 19200,
         "sensor_path": "/tmp/vib.tty"}


@pytest.mark.parametrize("site", SITES, ids=[s.name for s in SITES])
def test_agent_config_loads_with_the_agents_loader(site: Site, tmp_path: Path) -> None:
    doc = agent_config(site, data_dir=tmp_path / "data", server="tcp://127.0.0.1:7443",
                       server_key=tmp_path / "server.key", secret_key=tmp_path / f"{site.name}.key_secret",
                       plant=PLANT)
    path = tmp_path / "agent.toml"
    path.write_text(dump_toml(doc, "test"))
    cfg = parse_agent_config(tomllib.loads(path.read_text()), file=str(path))
    assert cfg.agent.name == site.name
    assert cfg.samples.feature_names == [n for n, _, _ in FEATURES]
    assert cfg.samples.label is not None and cfg.samples.label.name == LABEL
    kinds = sorted(t.kind.value for t in cfg.drivers.transports)
    expected = {"rtu": ["modbus-rtu"], "tcp": ["modbus-tcp"], "tcp+sensor": ["modbus-tcp", "serial-line"]}
    assert kinds == expected[site.link]
    assert cfg.predict.write_tag == f"{site.device}.prediction"


def test_server_config_loads_with_the_servers_loader(tmp_path: Path) -> None:
    doc = server_config(bind="tcp://127.0.0.1:7443", data_dir=tmp_path / "data", secret_key=tmp_path / "s.key_secret",
                        agents_dir=tmp_path / "agents.d", metrics="127.0.0.1:0", rounds=7, n_agents=3)
    text = dump_toml(doc, "test")
    cfg = parse_config(tomllib.loads(text), file="server.toml", base_dir=str(tmp_path))
    assert cfg.federation.features == tuple(n for n, _, _ in FEATURES)
    assert cfg.federation.label == LABEL
    assert (cfg.federation.rounds, cfg.federation.min_agents) == (7, 3)
    assert cfg.federation.model["n_features"] == len(FEATURES)
    assert not cfg.server.insecure and not cfg.privacy.enabled


def test_toml_writer_round_trips_what_the_demo_writes() -> None:
    doc = {"a": {"s": 'quote " and \\ backslash', "f": 0.1, "i": -3, "b": False, "arr": [1, 2], "empty": {}},
           "samples": {"features": [{"name": "x", "tag": "d.t", "agg": "mean"}], "label": {"name": "y"}},
           "devices": [{"name": "d", "tags": [{"name": "t", "scale": 0.01}, {"name": "u"}]}]}
    assert tomllib.loads(dump_toml(doc)) == doc
