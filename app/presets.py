"""Preset files: the YAML presets shipped in `geovr.configs` (or given as a path), read into the
typed config dataclasses of each stage with `section.key=value` overrides (`load_section`).

A preset is a YAML file with one mapping per section (`sampling`, `teacher`, `precompute`,
`student`, `train`, ...). Each stage declares its own dataclass for the sections it reads; the
composition root (the CLI commands, the demo) calls `load_section` for each. Type checks and
the naming of bad values are `teacher_cache.config.from_dict`'s.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

from geovr.teacher_cache.config import ConfigError, from_dict

T = TypeVar("T")


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
