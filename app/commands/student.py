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
    teacher: Path | None = typer.Option(
        None,
        "--teacher",
        help="fusion students only: the VGGT checkpoint that labelled the store (its aggregator up to "
        "the fused stage is exported beside the model)",
    ),
) -> None:
    """Write the plain Qwen3-VL model of a run or checkpoint, without the geometric tokens and heads.

    The directory holds config, safetensors, tokenizer and processor files and loads with
    Qwen3VLForConditionalGeneration.from_pretrained. A fusion student (Spatial-MLLM's dual encoder)
    is exported with `--teacher`: the directory then also holds the connector and the VGGT aggregator
    up to the fused stage, and loads with `geovr.student.fusion_model.FusionModel.from_pretrained`.
    """
    from geovr.student.export import export_plain

    if teacher is not None:
        from geovr.student.fusion_model import export_fusion

        written = export_fusion(run_or_checkpoint, teacher, out)
    else:
        written = export_plain(run_or_checkpoint, out)
    typer.echo(f"exported {written}")
