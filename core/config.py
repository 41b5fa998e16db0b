"""One loader from TOML tables to frozen, keyword-only dataclasses.

Each config section is a ``@dataclass(frozen=True, kw_only=True)`` whose fields
say their type; :func:`build` turns a TOML table into it and reports any problem
as a :class:`~fedgate.core.errors.ConfigError` naming the file, the dotted key and
the value. Field metadata (made with :func:`option`) adds units, choices and bounds:

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True, kw_only=True)
... class Poll:
...     period_s: float = option(1.0, toml="period", unit="duration", gt=0)
...     mode: str = option("fast", choices=("fast", "slow"))
>>> build(Poll, {"period": "250ms"}, file="agent.toml", key="poll")
Poll(period_s=0.25, mode='fast')
>>> build(Poll, {"period": "0s"}, file="agent.toml", key="poll")
Traceback (most recent call last):
...
fedgate.core.errors.ConfigError: agent.toml: poll.period = '0s': must be > 0

Supported field types: ``bool``, ``int``, ``float``, ``str``, ``X | None``,
``tuple[T, ...]`` (from a TOML array), nested dataclasses (from a table) and
``tuple[Dataclass, ...]`` (from an array of tables), and ``dict`` (taken as is).
"""
from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from fedgate.core.errors import ConfigError
from fedgate.core.units import parse_duration, parse_size

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = ["option", "build", "load_toml", "check_keys", "toml_key", "changed_fields"]

T = TypeVar("T")
_MISSING = dataclasses.MISSING


def option(
    default: Any = _MISSING,
    *,
    default_factory: Any = _MISSING,
    toml: str | None = None,
    unit: str | None = None,
    choices: tuple[Any, ...] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    doc: str = "",
) -> Any:
    """A dataclass field with config metadata.

    ``toml`` is the key in the file when it differs from the field name (a field
    ``timeout_s`` read from ``timeout``); ``unit`` is ``"duration"`` (seconds) or
    ``"size"`` (bytes); ``choices``/``ge``/``gt``/``le``/``lt`` bound the value.
    """
    meta = {"toml": toml, "unit": unit, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "doc": doc}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def toml_key(f: dataclasses.Field[Any]) -> str:
    """The key a field of a config class is read from: its ``toml`` name, else its own."""
    return f.metadata.get("toml") or f.name


def changed_fields(old: Any, new: Any) -> list[str]:
    """Names of the fields whose values differ between two instances of one config class."""
    return [f.name for f in dataclasses.fields(old) if getattr(old, f.name) != getattr(new, f.name)]


def load_toml(path: str) -> dict[str, Any]:
    """Read a TOML file; syntax errors become a ConfigError naming the file."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError("file not found", file=str(path)) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", file=str(path)) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", file=str(path)) from exc


def check_keys(data: Mapping[str, Any], allowed: typing.Iterable[str], *, file: str | None, key: str) -> None:
    """Refuse keys of ``data`` that are not in ``allowed``."""
    allowed = set(allowed)
    for k in data:
        if k not in allowed:
            raise ConfigError(
                f"unknown key (allowed: {', '.join(sorted(allowed))})",
                file=file, key=_join(key, k), value=data[k],
            )


def build(cls: type[T], data: Any, *, file: str | None = None, key: str = "") -> T:
    """Build dataclass ``cls`` from the TOML table ``data``."""
    if not isinstance(data, Mapping):
        raise ConfigError("expected a table", file=file, key=key or None, value=data)
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]
    by_toml = {toml_key(f): f for f in fields}
    check_keys(data, by_toml, file=file, key=key)
    kwargs: dict[str, Any] = {}
    for tname, f in by_toml.items():
        fkey = _join(key, tname)
        if tname not in data:
            if f.default is _MISSING and f.default_factory is _MISSING:
                raise ConfigError("missing required key", file=file, key=fkey)
            continue
        kwargs[f.name] = _convert(hints[f.name], data[tname], f.metadata, file, fkey)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc), file=file, key=key or None) from exc


def _join(prefix: str, name: str | int) -> str:
    if isinstance(name, int):
        return f"{prefix}[{name}]"
    return f"{prefix}.{name}" if prefix else name


def _convert(tp: Any, value: Any, meta: Mapping[str, Any], file: str | None, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None:
            return None
        if len(inner) == 1:
            return _convert(inner[0], value, meta, file, key)
        for cand in inner:  # first that fits
            try:
                return _convert(cand, value, meta, file, key)
            except ConfigError:
                continue
        raise ConfigError(f"expected one of {', '.join(getattr(a, '__name__', str(a)) for a in inner)}",
                          file=file, key=key, value=value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError("expected an array", file=file, key=key, value=value)
        item_tp = args[0] if args else Any
        return tuple(_convert(item_tp, v, {}, file, _join(key, i)) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return build(tp, value, file=file, key=key)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError("expected a table", file=file, key=key, value=value)
        return dict(value)
    if tp is Any:
        return value
    unit = meta.get("unit")
    if unit == "duration":
        out: Any = parse_duration(value, key=key, file=file)
    elif unit == "size":
        out = parse_size(value, key=key, file=file)
    elif tp is bool:
        if not isinstance(value, bool):
            raise ConfigError("expected true or false", file=file, key=key, value=value)
        out = value
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError("expected an integer", file=file, key=key, value=value)
        out = value
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError("expected a number", file=file, key=key, value=value)
        out = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError("expected a string", file=file, key=key, value=value)
        out = value
    else:  # enums and other callables taking the raw value
        try:
            out = tp(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid value ({exc})", file=file, key=key, value=value) from exc
    _check_bounds(out, value, meta, file, key)
    return out


def _check_bounds(out: Any, raw: Any, meta: Mapping[str, Any], file: str | None, key: str) -> None:
    choices = meta.get("choices")
    if choices is not None and out not in choices:
        raise ConfigError(f"must be one of {', '.join(map(str, choices))}", file=file, key=key, value=raw)
    for name, op, ok in (
        ("ge", ">=", lambda a, b: a >= b),
        ("gt", ">", lambda a, b: a > b),
        ("le", "<=", lambda a, b: a <= b),
        ("lt", "<", lambda a, b: a < b),
    ):
        bound = meta.get(name)
        if bound is not None and not ok(out, bound):
            raise ConfigError(f"must be {op} {bound:g}", file=file, key=key, value=raw)
