"""`geovr-pipeline demo`: the whole pipeline on CPU with tiny random models (a thin wrapper over `app.demo`)."""

from __future__ import annotations

from pathlib import Path

import typer

from geovr.app.cli import DEMO, app
from geovr.app.demo.config import DemoConfig
from geovr.app.options import preset_option

# GeoVR's four objectives plus SpatialSV's point map (the combined recipe), on the tiny models.
DEMO_PRESET = "tiny-geovr-spatialsv"


@app.command(rich_help_panel=DEMO)
def demo(
    out: Path = typer.Option(
        Path("demo-out"), "--out", help="output directory (a previous demo's is replaced)"
    ),
    steps: int | None = preset_option(DemoConfig, "demo", "steps", "student optimizer steps"),
    train_scenes: int | None = preset_option(DemoConfig, "demo", "train_scenes", "synthetic training scenes"),
    heldout_scenes: int | None = preset_option(
        DemoConfig, "demo", "heldout_scenes", "synthetic held-out scenes"
    ),
    frames: int | None = preset_option(DemoConfig, "demo", "frames", "frames per scene video"),
    metric_depth: bool | None = preset_option(
        DemoConfig,
        "demo",
        "metric_depth",
        "label a metric scale with a tiny DA3-Metric",
        "--metric-depth/--no-metric-depth",
    ),
    preset: str = typer.Option(
        DEMO_PRESET,
        help="preset whose sections configure every stage (and `demo`); tiny: GeoVR's recipe alone",
    ),
    overrides: list[str] | None = typer.Option(
        None, "--set", help="override a preset value: demo.lr_heads=3e-3, train.warmup_ratio=0.1 (repeatable)"
    ),
) -> None:
    """The whole pipeline on CPU in minutes, with tiny random models; writes OUT/report.md and summary.json.

    Synthetic corpus -> tiny teacher -> index -> precompute on a local Ray cluster -> train -> export
    -> eval vsibench / geometry -> inspect.
    """
    from geovr.app.demo.run import run_demo
    from geovr.app.presets import load_section

    cfg = load_section(
        DemoConfig,
        "demo",
        preset,
        overrides,
        steps=steps,
        train_scenes=train_scenes,
        heldout_scenes=heldout_scenes,
        frames=frames,
        metric_depth=metric_depth,
    )
    run_demo(out, cfg, preset, overrides)
