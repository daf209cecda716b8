"""`geovr-pipeline synth`: write the procedural scene corpus (a thin wrapper over `corpus.synth`)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import typer
from rich.console import Console

from geovr.app.cli import DATA, UsageError, app
from geovr.app.options import field_default, preset_option
from geovr.corpus.config import SynthConfig


def parse_size(text: str) -> tuple[int, int]:
    """`"320x240"` -> (320, 240); signs pass through so that validation names the bad value."""
    match = re.fullmatch(r"\s*([+-]?\d+)\s*[xX]\s*([+-]?\d+)\s*", text)
    if match is None:
        raise UsageError(f"--size: expected WIDTHxHEIGHT such as 320x240, got {text!r}")
    return int(match.group(1)), int(match.group(2))


@app.command(rich_help_panel=DATA)
def synth(
    out: Path = typer.Option(..., "--out", help="corpus directory to write (created if missing)"),
    scenes: int | None = preset_option(SynthConfig, "synth", "scenes", "number of scenes"),
    frames: int | None = preset_option(SynthConfig, "synth", "frames", "frames per scene video"),
    size: str | None = typer.Option(
        None,
        help="frame size WIDTHxHEIGHT, even numbers (default: the preset's synth.width/height, else "
        f"{field_default(SynthConfig, 'width')}x{field_default(SynthConfig, 'height')})",
    ),
    fps: float | None = preset_option(SynthConfig, "synth", "fps", "frame rate of the videos"),
    seed: int | None = preset_option(SynthConfig, "synth", "seed", "random seed: same seed, same corpus"),
    preset: str | None = typer.Option(
        None, help="preset or YAML file whose `synth` section gives the defaults"
    ),
    overrides: list[str] | None = typer.Option(None, "--set", help="override a value: synth.key=value"),
) -> None:
    """Render procedural indoor scenes to H.264 videos with exact depth, poses and object ground truth."""
    from geovr.app.presets import load_section
    from geovr.corpus.synth import write_corpus

    width, height = parse_size(size) if size is not None else (None, None)
    config = load_section(
        SynthConfig,
        "synth",
        preset,
        overrides,
        scenes=scenes,
        frames=frames,
        width=width,
        height=height,
        fps=fps,
        seed=seed,
    )
    start = time.perf_counter()
    scene_ids = write_corpus(out, config, progress=True)
    Console(stderr=True).print(
        f"wrote {len(scene_ids)} scenes x {config.frames} frames at {config.width}x{config.height} to {out} "
        f"in {time.perf_counter() - start:.1f} s"
    )
