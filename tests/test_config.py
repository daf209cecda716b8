"""Typed configuration: presets, overrides with type coercion, and errors that name the bad value."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import yaml

from geovr.app.presets import load_section, parse_overrides, preset_names, read_preset
from geovr.corpus.config import SynthConfig
from geovr.teacher_cache.config import ConfigError, from_dict, require, to_dict


@dataclass
class Example:
    count: int = 1
    rate: float = 0.5
    enabled: bool = False
    name: str = "base"
    path: Path | None = None
    layers: tuple[int, ...] = (1, 2)
    mode: Literal["fast", "exact"] = "fast"
    limit: int | None = 10

    def validate(self) -> None:
        require(self.count >= 0, f"ex.count: must be >= 0, got {self.count}")


@pytest.fixture
def preset_file(tmp_path: Path) -> Path:
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"ex": {"count": 3, "rate": 2, "layers": [4, 11]}, "other": {"x": 1}}))
    return path


def test_shipped_presets_are_found_and_are_mappings_of_sections() -> None:
    names = preset_names()
    assert {"tiny", "vggt-1b", "qwen3vl-2b-geovr"} <= set(names)
    for name in names:
        preset = read_preset(name)
        assert "sampling" in preset
        assert all(isinstance(section, dict) for section in preset.values()), name


def test_load_section_from_a_shipped_preset() -> None:
    config = load_section(SynthConfig, "synth", "tiny")
    assert to_dict(config) == {**to_dict(SynthConfig()), **read_preset("tiny")["synth"]}
    # A preset without the section gives the dataclass defaults.
    assert load_section(SynthConfig, "synth", "vggt-1b") == SynthConfig()


def test_preset_file_then_overrides_then_keywords(preset_file: Path) -> None:
    config = load_section(Example, "ex", preset_file)
    assert (config.count, config.rate, config.layers) == (3, 2.0, (4, 11))
    assert isinstance(config.rate, float)
    overrides = [
        "ex.count=0x10",
        "ex.rate=1e-3",
        "ex.enabled=yes",
        "ex.path=/data/x",
        "ex.mode=exact",
        "other.x=2",
    ]
    config = load_section(Example, "ex", preset_file, overrides, name="kw", count=None)
    assert config == Example(
        count=16, rate=1e-3, enabled=True, name="kw", path=Path("/data/x"), layers=(4, 11), mode="exact"
    )
    assert load_section(Example, "ex", None, ["ex.layers=5,6,7", "ex.limit=none"]).layers == (5, 6, 7)
    assert load_section(Example, "ex", None, ["ex.layers=[8, 9]"]).layers == (8, 9)
    assert load_section(Example, "ex", None, ["ex.limit=none"]).limit is None
    # Keyword values win over overrides.
    assert load_section(Example, "ex", None, ["ex.count=5"], count=7).count == 7


def test_to_dict_is_plain_and_round_trips() -> None:
    config = Example(path=Path("/x"), layers=(3,))
    plain = to_dict(config)
    assert plain["path"] == "/x" and plain["layers"] == [3]
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain
    assert from_dict(Example, plain) == config


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["ex.bogus=1"], "bogus"),
        (["ex.count=abc"], "ex.count"),
        (["ex.count=1.5"], "ex.count"),
        (["ex.rate=fast"], "ex.rate"),
        (["ex.enabled=maybe"], "ex.enabled"),
        (["ex.mode=slow"], "ex.mode"),
        (["ex.layers=a,b"], "ex.layers"),
        (["ex.count=-1"], "ex.count"),  # from validate()
        (["excount=1"], "excount=1"),
        (["ex.count"], "ex.count"),
    ],
)
def test_bad_values_raise_config_error_naming_them(overrides: list[str], named: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_section(Example, "ex", None, overrides)
    assert named in str(err.value)


def test_yaml_values_are_checked_like_overrides(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("ex:\n  count: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"ex\.count"):
        load_section(Example, "ex", path)
    path.write_text("ex: 3\n")
    with pytest.raises(ConfigError, match="section 'ex' must be a mapping"):
        load_section(Example, "ex", path)
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_section(Example, "ex", path)


def test_unknown_presets_are_named() -> None:
    with pytest.raises(ConfigError, match=r"unknown preset 'tinyy'; known presets: .*tiny"):
        load_section(SynthConfig, "synth", "tinyy")
    with pytest.raises(ConfigError, match=r"missing\.yaml does not exist"):
        read_preset("missing.yaml")


def test_parse_overrides_groups_by_section() -> None:
    assert parse_overrides(["a.x=1", "b.y = two", "a.z=3=4"]) == {
        "a": {"x": "1", "z": "3=4"},
        "b": {"y": "two"},
    }


def test_override_of_a_misspelt_section_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="trian"):
        load_section(SynthConfig, "synth", "tiny", ["trian.lr=1"])
