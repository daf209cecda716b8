"""`geovr-pipeline synth`: write the procedural scene corpus (a thin wrapper over `corpus.synth`)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import typer
from rich.console import Console

from geovr.app.cli import DATA, UsageError, app


def parse_size(text: str) -> tuple[int, int]:
    """`"320x240"` -> (320, 240); signs pass through so that validation names the bad value."""
    match = re.fullmatch(r"\s*([+-]?\d+)\s*[xX]\s*([+-]?\d+)\s*", text)
    if match is None:
        raise UsageError(f"--size: expected WIDTHxHEIGHT such as 320x240, got {text!r}")
    return int(match.group(1)), int(match.group(2))


@app.command(rich_help_panel=DATA)
def synth(
    out: Path = typer.Option(..., "--out", help="corpus directory to write (created if missing)"),
    scenes: int | None = typer.Option(None, help="number of scenes [default: 8]"),
    frames: int | None = typer.Option(None, help="frames per scene video [default: 64]"),
    size: str | None = typer.Option(None, help="frame size WIDTHxHEIGHT, even numbers [default: 320x240]"),
    fps: float | None = typer.Option(None, help="frame rate of the videos [default: 8]"),
    seed: int | None = typer.Option(None, help="random seed: same seed, same corpus [default: 0]"),
    preset: str | None = typer.Option(
        None, help="preset or YAML file whose `synth` section gives the defaults"
    ),
    overrides: list[str] | None = typer.Option(None, "--set", help="override a value: synth.key=value"),
) -> None:
    """Render procedural indoor scenes to H.264 videos with exact depth, poses and object ground truth."""
    from geovr.app.presets import load_section
    from geovr.corpus.synth import SynthConfig, write_corpus

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
