"""`geovr-pipeline train`: train the GeoVR student from the teacher cache (a thin wrapper over `student.training`).

Single process:  geovr-pipeline train --preset tiny --store STORE --qa qa.jsonl --model MODEL --out RUN
Several:         torchrun --nproc-per-node N --no-python geovr-pipeline train ... (same arguments)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from geovr.app.cli import STAGE_2, app


@app.command("train", rich_help_panel=STAGE_2)
def train_command(
    preset: str = typer.Option(
        "qwen3vl-2b-geovr", "--preset", help="Preset name (tiny, qwen3vl-2b-geovr) or YAML file."
    ),
    store: Path = typer.Option(..., "--store", help="Teacher-label store (Zarr or WebDataset)."),
    qa: Path = typer.Option(
        ..., "--qa", help="QA file, VSI-590K / LLaVA conversation style (.jsonl or .json)."
    ),
    model: Path = typer.Option(
        ..., "--model", help="Local Qwen3-VL model directory (or a student checkpoint)."
    ),
    out: Path = typer.Option(..., "--out", help="Run directory: checkpoints, metrics.jsonl, TensorBoard."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run's last complete checkpoint."),
    corpus_root: Path | None = typer.Option(
        None,
        "--corpus-root",
        help="The --corpus-root of `index` (data.corpus_root): needed for QA rows with absolute video paths.",
    ),
    overrides: list[str] = typer.Option(
        [], "--set", help="Override a preset value: train.steps=100, data.num_workers=2, student.depth=false."
    ),
    ray_workers: int = typer.Option(
        0,
        "--ray-workers",
        help="Launch with Ray Train on this many workers of the Ray cluster (RAY_ADDRESS).",
    ),
) -> None:
    """Train the student on cached teacher labels (DDP / FSDP2 under torchrun), with exact resume."""
    # Imported here: transformers and the student take seconds to import, which every other command
    # (and `--help`) would pay if they were module-level imports.
    from geovr.app.presets import load_section
    from geovr.student.config import DataConfig, StudentConfig
    from geovr.student.training.config import TrainConfig, TrainInputs
    from geovr.student.training.trainer import train

    train_cfg = load_section(TrainConfig, "train", preset, overrides)
    root = str(corpus_root) if corpus_root is not None else None
    data_cfg = load_section(DataConfig, "data", preset, overrides, corpus_root=root)
    student_cfg = load_section(StudentConfig, "student", preset, overrides, base_model=str(model))
    if not model.is_dir():
        raise FileNotFoundError(f"model directory {model} does not exist")
    inputs = TrainInputs(store, qa, model, out, resume)
    if ray_workers > 0:
        from geovr.student.ray_train import train_with_ray

        summary = train_with_ray(inputs, train_cfg, data_cfg, student_cfg, num_workers=ray_workers)
    else:
        summary = train(inputs, train_cfg, data_cfg, student_cfg)
    last = summary["last"]
    if last and os.environ.get("RANK", "0") == "0":
        typer.echo(
            json.dumps(
                {
                    "run": str(out),
                    "steps": summary["steps"],
                    "loss": last["loss"],
                    "data": summary["data"]["joined"],
                }
            )
        )
