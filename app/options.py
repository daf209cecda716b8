"""CLI options whose defaults come from the config dataclasses, so no command restates a default.

- `config_option(cls, name, help)`: an option of a command without presets; its default is the
  field's default (typer shows it).
- `preset_option(cls, section, name, help)`: an option overriding a preset value; unset (None) it
  leaves the preset's value, and the help names the preset key and the field's default.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import typer


def field_default(cls: type, name: str) -> Any:
    """The default of dataclass field `name` of `cls`."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise ValueError(f"{cls.__name__}.{name} has no default")
    raise AttributeError(f"{cls.__name__} has no field {name!r}")


def config_option(cls: type, name: str, help: str, *param_decls: str, **kwargs: Any) -> Any:
    """An option defaulting to `cls.name`'s default."""
    return typer.Option(field_default(cls, name), *param_decls, help=help, **kwargs)


def preset_option(cls: type, section: str, name: str, help: str, *param_decls: str, **kwargs: Any) -> Any:
    """An option that overrides the preset's `section.name` when given."""
    shown = field_default(cls, name)
    return typer.Option(
        None, *param_decls, help=f"{help} (default: the preset's {section}.{name}, else {shown})", **kwargs
    )
