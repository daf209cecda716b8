"""`geovr-pipeline export`: a trained student to a plain Qwen3-VL checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer

from geovr.app.cli import STAGE_2, app


@app.command("export", rich_help_panel=STAGE_2)
def export(
    run_or_checkpoint: Path = typer.Argument(
        ..., help="student checkpoint directory, or a run (its last checkpoint)"
    ),
    out: Path = typer.Option(..., "--out", help="new directory for the plain Qwen3-VL model"),
) -> None:
    """Write the plain Qwen3-VL model of a run or checkpoint, without the geometric tokens and heads.

    The directory holds config, safetensors, tokenizer and processor files and loads with
    Qwen3VLForConditionalGeneration.from_pretrained.
    """
    from geovr.student.export import export_plain

    written = export_plain(run_or_checkpoint, out)
    typer.echo(f"exported {written}")
