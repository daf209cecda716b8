"""The `geovr-pipeline` console script: help lists working commands; bad arguments give one error line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from geovr.app.cli import _register_commands, app, main

CONSOLE_SCRIPT = Path(sys.executable).parent / "geovr-pipeline"


def registered_commands() -> list[str]:
    _register_commands()
    return sorted(typer.main.get_command(app).commands)


def run_console_script(*args: str) -> subprocess.CompletedProcess:
    """The installed console script in a subprocess (each costs the CLI's start-up: keep them few)."""
    return subprocess.run(
        [str(CONSOLE_SCRIPT), *args], capture_output=True, text=True, timeout=120, check=False
    )


def assert_one_error_line(stdout: str, stderr: str, *named: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    for text in named:
        assert text in lines[0]
    assert "Traceback" not in stdout + stderr


def test_help_lists_every_registered_command() -> None:
    result = run_console_script("--help")
    assert result.returncode == 0, result.stderr
    commands = registered_commands()
    assert "synth" in commands
    for name in commands:
        assert f" {name} " in result.stdout, f"{name} missing from --help"


@pytest.mark.parametrize("name", registered_commands())
def test_every_listed_command_has_working_help(name: str) -> None:
    result = CliRunner().invoke(app, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_unwritable_output_from_the_console_script(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = run_console_script("synth", "--out", str(blocker / "corpus"), "--scenes", "1", "--frames", "1")
    assert result.returncode != 0
    assert_one_error_line(result.stdout, result.stderr, str(blocker / "corpus"), "Not a directory")


def run_main(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str
) -> tuple[int, str, str]:
    """`main()` in this process, exactly as the console script calls it."""
    monkeypatch.setattr(sys, "argv", ["geovr-pipeline", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--size", "abc"], ["--size", "'abc'"]),
        (["--size=-320x240"], ["synth.width", "-320"]),
        (["--size", "320x-240"], ["synth.height", "-240"]),
        (["--size", "321x240"], ["synth.width", "321"]),
        (["--scenes", "0"], ["synth.scenes"]),
        (["--frames", "-3"], ["synth.frames"]),
        (["--fps", "0"], ["synth.fps"]),
        (["--scenes", "abc"], ["--scenes"]),
        (["--preset", "nope"], ["unknown preset 'nope'"]),
        (["--set", "synth.bogus=1"], ["bogus"]),
        (["--set", "synth.crf=[x]"], ["synth.crf", "[x]"]),  # brackets are printed, not read as markup
        (["--bogus"], ["--bogus"]),
    ],
)
def test_bad_arguments_give_one_error_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    tmp_path: Path,
    args: list[str],
    named: list[str],
) -> None:
    code, out, err = run_main(monkeypatch, capsys, "synth", "--out", str(tmp_path / "out"), *args)
    assert code == 2
    assert_one_error_line(out, err, *named)
    assert not (tmp_path / "out").exists()


def test_missing_required_option(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_main(monkeypatch, capsys, "synth", "--scenes", "1")
    assert code == 2
    assert_one_error_line(out, err, "--out")


def test_synth_command_writes_a_corpus(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    args = [
        "synth",
        "--out",
        str(tmp_path),
        "--scenes",
        "2",
        "--frames",
        "3",
        "--size",
        "48x32",
        "--fps",
        "5",
        "--seed",
        "4",
    ]
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert code == 0, err
    corpus = json.loads((tmp_path / "corpus.json").read_text())
    assert corpus == {
        "format_version": 1,
        "scenes": ["scene_0000", "scene_0001"],
        "frames": 3,
        "size": [48, 32],
        "fps": 5.0,
        "seed": 4,
    }
    assert "wrote 2 scenes" in err
