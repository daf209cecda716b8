"""Typed configuration: dataclasses filled from YAML presets and `section.key=value` overrides.

A preset is a YAML file with one mapping per section (`sampling`, `teacher`, `precompute`,
`student`, `train`, ...). Each stage declares its own dataclass for the sections it reads and
calls `load_section`. This is the one place that checks types and reports bad values by name;
dataclasses add value checks in a `validate()` method that raises `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message names it."""


def preset_names() -> list[str]:
    """Names of the presets shipped in `configs/`."""
    return sorted(
        p.name[: -len(".yaml")]
        for p in resources.files("geovr.configs").iterdir()
        if p.name.endswith(".yaml")
    )


def read_preset(preset: str | Path) -> dict[str, Any]:
    """A preset by name (`tiny`, `vggt-1b`, ...) or by path to a YAML file, as a dict of sections."""
    path = Path(preset)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"preset file {path} does not exist")
        text = path.read_text()
    else:
        candidate = resources.files("geovr.configs") / f"{preset}.yaml"
        if not candidate.is_file():
            raise ConfigError(f"unknown preset {preset!r}; known presets: {', '.join(preset_names())}")
        text = candidate.read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"preset {preset}: top level must be a mapping of sections")
    return data


def known_sections() -> set[str]:
    """Every section name used by the shipped presets."""
    return {name for preset in preset_names() for name in read_preset(preset)}


def parse_overrides(overrides: list[str] | None) -> dict[str, dict[str, str]]:
    """`["train.lr=1e-4", "sampling.fps=1"]` -> {"train": {"lr": "1e-4"}, "sampling": {"fps": "1"}}."""
    parsed: dict[str, dict[str, str]] = {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        parsed.setdefault(section, {})[name] = value.strip()
    return parsed


def load_section(
    cls: type[T],
    section: str,
    preset: str | Path | None = None,
    overrides: list[str] | None = None,
    **values: Any,
) -> T:
    """Build `cls` from the preset's `section`, then overrides, then explicit keyword values.

    Explicit keyword values that are None are ignored, so CLI options can pass through unset.
    """
    raw: dict[str, Any] = {}
    sections = known_sections()
    if preset is not None:
        preset_data = read_preset(preset)
        sections |= set(preset_data)
        from_preset = preset_data.get(section) or {}
        if not isinstance(from_preset, dict):
            raise ConfigError(f"preset {preset}: section {section!r} must be a mapping of keys to values")
        raw.update(from_preset)
    parsed = parse_overrides(overrides)
    unknown = sorted(set(parsed) - sections - {section})
    if unknown:
        # Each command reads only its own sections; a misspelt one would otherwise be ignored silently.
        raise ConfigError(
            f"override for unknown section(s) {', '.join(unknown)}; sections: {', '.join(sorted(sections))}"
        )
    raw.update(parsed.get(section, {}))
    raw.update({k: v for k, v in values.items() if v is not None})
    return from_dict(cls, raw, where=section)


def from_dict(cls: type[T], raw: dict[str, Any], where: str = "") -> T:
    """Instantiate the dataclass `cls` from `raw`, coercing strings and reporting bad keys by name."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(fields)}")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}" if where else name)
    try:
        obj = cls(**kwargs)
    except TypeError as err:  # a required field without a value
        raise ConfigError(f"{where}: {err}") from None
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    """A config dataclass as a plain JSON/YAML-ready dict (tuples become lists, paths strings)."""
    return {k: _plain(v) for k, v in dataclasses.asdict(obj).items()}


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _coerce(value: Any, hint: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (
            value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        ):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{name}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = (
                yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
            )
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_coerce(v, item, name) for v in value]
        return tuple(items) if origin is tuple else items
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            number = (
                hint(value) if hint is float else int(str(value), 0) if isinstance(value, str) else int(value)
            )
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected {hint.__name__}, got {value!r}") from None
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return number
    if hint is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return str(value)
    if hint is Path:
        return Path(str(value))
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return from_dict(hint, value, where=name)
    return value


def require(condition: bool, message: str) -> None:
    """Raise `ConfigError(message)` unless `condition`: for `validate()` methods."""
    if not condition:
        raise ConfigError(message)
