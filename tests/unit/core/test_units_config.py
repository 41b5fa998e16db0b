from __future__ import annotations

from dataclasses import dataclass

import pytest

from fedgate.core.config import build, option
from fedgate.core.errors import ConfigError
from fedgate.core.units import format_duration, parse_duration, parse_size


@pytest.mark.parametrize(
    "text, seconds",
    [("500ms", 0.5), ("5s", 5.0), ("2m", 120.0), ("1h30m", 5400.0), ("250us", 0.00025), (3, 3.0), (0.5, 0.5)],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "5", "5 parsecs", "-1s", "ms", True, None, "1e400s"])
def test_parse_duration_refuses_and_names_value(bad):
    with pytest.raises(ConfigError) as err:
        parse_duration(bad, key="devices[0].poll", file="agent.toml")
    assert "agent.toml" in str(err.value) and "devices[0].poll" in str(err.value)


def test_parse_size():
    assert parse_size("64MiB") == 64 << 20
    assert parse_size("10MB") == 10_000_000
    with pytest.raises(ConfigError):
        parse_size("lots")


def test_format_duration():
    assert format_duration(0.25) == "250ms"
    assert format_duration(90) == "1m30s"


@dataclass(frozen=True, kw_only=True)
class _Inner:
    name: str
    weight: float = option(1.0, gt=0)


@dataclass(frozen=True, kw_only=True)
class _Outer:
    timeout_s: float = option(3.0, toml="timeout", unit="duration")
    mode: str = option("a", choices=("a", "b"))
    tags: tuple[str, ...] = ()
    items: tuple[_Inner, ...] = ()
    limit: int | None = None


def test_build_converts_nested_tables():
    cfg = build(_Outer, {"timeout": "2s", "items": [{"name": "x"}, {"name": "y", "weight": 2}], "tags": ["p"]})
    assert cfg == _Outer(timeout_s=2.0, items=(_Inner(name="x"), _Inner(name="y", weight=2.0)), tags=("p",))


@pytest.mark.parametrize(
    "data, where",
    [
        ({"timout": "2s"}, "cfg.timout"),
        ({"mode": "c"}, "cfg.mode = 'c'"),
        ({"items": [{"name": "x", "weight": 0}]}, "cfg.items[0].weight = 0"),
        ({"items": [{"weight": 1}]}, "cfg.items[0].name"),
        ({"limit": "ten"}, "cfg.limit = 'ten'"),
        ({"tags": "p"}, "cfg.tags = 'p'"),
    ],
)
def test_build_errors_name_file_key_value(data, where):
    with pytest.raises(ConfigError) as err:
        build(_Outer, data, file="x.toml", key="cfg")
    assert str(err.value).startswith("x.toml: ") and where in str(err.value)
