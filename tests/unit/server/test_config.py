"""server.toml: the shipped example loads; errors name file, key and value."""
from __future__ import annotations

import pathlib

import pytest

from fedgate.core.errors import ConfigError
from fedgate.server.config import StrategyName, load_config, parse_config

ROOT = pathlib.Path(__file__).resolve().parents[3]

BASE = {
    "server": {"data_dir": "data", "insecure": True},
    "federation": {"name": "f", "model": {"kind": "linear", "n_features": 2}, "features": ["a", "b"],
                   "label": "y", "rounds": 3},
}


def _doc(**sections):
    doc = {k: dict(v) for k, v in BASE.items()}
    for name, table in sections.items():
        doc.setdefault(name, {}).update(table)
    return doc


def test_shipped_example_loads():
    cfg = load_config(ROOT / "deploy" / "server.toml")
    assert cfg.server.max_message_size == 64 * 2**20
    assert not cfg.server.insecure
    assert cfg.federation.features and cfg.strategy.name in StrategyName
    assert cfg.server.data_dir.startswith("/")


def test_defaults_and_relative_paths(tmp_path):
    cfg = parse_config(_doc(), file=str(tmp_path / "s.toml"), base_dir=str(tmp_path))
    assert cfg.server.data_dir == str(tmp_path / "data")
    assert cfg.server.heartbeat_s == 5.0 and cfg.server.dead_after_s == 15.0
    assert cfg.strategy.name is StrategyName.FEDAVG and not cfg.privacy.enabled


@pytest.mark.parametrize("sections,key", [
    ({"server": {"insecure": False}}, "server"),
    ({"server": {"max_message_size": "12"}}, "server.max_message_size"),
    ({"server": {"heartbeat": "fast"}}, "server.heartbeat"),
    ({"server": {"metrics": "nowhere"}}, "server.metrics"),
    ({"server": {"bind": "http://x"}}, "server.bind"),
    ({"server": {"dead_after": "1s", "heartbeat": "5s"}}, "server.dead_after"),
    ({"federation": {"fraction": 0}}, "federation.fraction"),
    ({"federation": {"codec": "zip"}}, "federation.codec"),
    ({"federation": {"features": ["a", "a"]}}, "federation.features"),
    ({"federation": {"rounds": -1}}, "federation.rounds"),
    ({"strategy": {"name": "best"}}, "strategy.name"),
    ({"strategy": {"name": "krum", "byzantine": 2}}, "federation.min_agents"),
    ({"strategy": {"max_update_norm": 0}}, "strategy.max_update_norm"),
    ({"privacy": {"delta": 2}}, "privacy.delta"),
    ({"extra": {}}, "extra"),
])
def test_errors_name_the_key(sections, key):
    with pytest.raises(ConfigError) as info:
        parse_config(_doc(**sections), file="server.toml")
    assert "server.toml" in str(info.value) and key in str(info.value)


@pytest.mark.parametrize("codec,params,name", [
    ("topk", {"k": 0.0}, "k"),
    ("topk", {"k": 1.5}, "k"),
    ("topk", {"k": "0.1"}, "k"),
    ("topk", {"blocks": 64}, "blocks"),
    ("q8", {"block": 0}, "block"),
    ("q8", {"block": 2.5}, "block"),
    ("q8", {"block": True}, "block"),
    ("q8", {"seed": -1}, "seed"),
    ("f32", {"k": 2}, "k"),
])
def test_codec_params_that_would_fail_every_agent_are_refused_at_load(codec, params, name):
    with pytest.raises(ConfigError) as info:
        parse_config(_doc(federation={"codec": codec, "codec_params": params}), file="server.toml")
    assert f"federation.codec_params.{name}" in str(info.value)


def test_codec_params_in_range_load():
    cfg = parse_config(_doc(federation={"codec": "topk", "codec_params": {"k": 0.01}}), file="s.toml")
    assert cfg.federation.codec_params == {"k": 0.01}
    cfg = parse_config(_doc(federation={"codec": "q8", "codec_params": {"block": 128, "seed": 7}}), file="s.toml")
    assert cfg.federation.codec_params == {"block": 128, "seed": 7}
    # another codec's parameter is harmless (each codec reads its own)
    assert parse_config(_doc(federation={"codec": "f32", "codec_params": {"block": 7}}), file="s.toml")


def test_missing_section_and_file(tmp_path):
    with pytest.raises(ConfigError, match="federation"):
        parse_config({"server": BASE["server"]}, file="s.toml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
