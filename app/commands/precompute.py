"""`geovr-pipeline index` and `geovr-pipeline precompute` (stage 1): thin wrappers over pipeline.index / pipeline.precompute."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from geovr.app.cli import STAGE_1, UsageError, app
from geovr.app.options import preset_option
from geovr.corpus.config import SamplingConfig
from geovr.pipeline.config import CLIPS_PER_SHARD, MAX_PROBE_WORKERS, PrecomputeConfig
from geovr.teacher_cache.backends import FORMATS

PRESET_HELP = "config preset (tiny, vggt-1b, ...) or a YAML file"
SET_HELP = "override a preset value: section.key=value (repeatable)"


@app.command(rich_help_panel=STAGE_1)
def index(
    sources: list[Path] = typer.Argument(
        ..., help="video folders and/or QA files (JSON / JSONL rows naming a video)"
    ),
    out: Path = typer.Option(..., "--out", help="manifest to write (Parquet)"),
    corpus_root: Path | None = typer.Option(None, help="video paths are stored relative to this folder"),
    fps: float | None = preset_option(SamplingConfig, "sampling", "fps", "frames kept per second of video"),
    min_frames: int | None = preset_option(
        SamplingConfig, "sampling", "min_frames", "at least this many frames per clip"
    ),
    max_frames: int | None = preset_option(
        SamplingConfig, "sampling", "max_frames", "at most this many frames per clip"
    ),
    sampling: str | None = preset_option(
        SamplingConfig, "sampling", "method", "uniform (GeoVR) or space_aware (Spatial-MLLM)"
    ),
    candidate_frames: int | None = preset_option(
        SamplingConfig, "sampling", "candidate_frames", "space_aware: candidate frames per clip"
    ),
    clips_per_shard: int = typer.Option(CLIPS_PER_SHARD, help="clips per output shard"),
    extend: Path | None = typer.Option(None, help="previous manifest: its clips keep their shards"),
    workers: int | None = typer.Option(
        None, help=f"probe processes (default: the CPU count, at most {MAX_PROBE_WORKERS})"
    ),
    preset: str = typer.Option("vggt-1b", help=PRESET_HELP),
    overrides: list[str] | None = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Index videos into a clip manifest: probe, deduplicate across QA rows, assign shards."""
    from geovr.app.presets import load_section
    from geovr.pipeline.index import build_manifest

    policy = load_section(
        SamplingConfig,
        "sampling",
        preset,
        overrides,
        fps=fps,
        min_frames=min_frames,
        max_frames=max_frames,
        method=sampling,
        candidate_frames=candidate_frames,
    )
    report = build_manifest(sources, out, policy, corpus_root, clips_per_shard, extend, workers)
    console = Console()
    console.print(
        f"indexed {report.num_clips} clips into {report.num_shards} shards -> {out} "
        f"({report.num_qa_rows} QA rows, {report.rows_without_video} without a video)"
    )
    print_rgbd_pairing(console, report)
    for line in report.bad_rows[:20]:
        console.print(f"[yellow]skipped QA row[/] {line}", highlight=False, soft_wrap=True)
    if len(report.bad_rows) > 20:
        console.print(f"... and {len(report.bad_rows) - 20} more skipped QA rows", highlight=False)
    if report.bad:
        table = Table(title=f"{len(report.bad)} unusable videos", header_style="bold")
        for column in ("video", "status", "reason"):
            table.add_column(column, overflow="fold")
        for row in report.bad:
            table.add_row(row["video"], row["status"], row["reason"])
        console.print(table)


def print_rgbd_pairing(console: Console, report: Any) -> None:
    """RGB-D folders paired with the videos (`pipeline.rgbd_pairing`), one warning per mismatch."""
    counts = report.rgbd_counts
    if not counts.get("paired") and not report.rgbd_problems:
        return
    console.print(
        f"RGB-D ground truth: {counts.get('paired', 0)} videos paired, {counts.get('mismatch', 0)} mismatched"
    )
    for problem in report.rgbd_problems:
        console.print(
            f"[yellow]warning:[/] {problem['video']}: {problem['problem']}", highlight=False, soft_wrap=True
        )


@app.command(rich_help_panel=STAGE_1)
def precompute(
    manifest: Path = typer.Option(..., help="clip manifest from `geovr-pipeline index`"),
    out: Path = typer.Option(..., "--out", help="the label store (created, or resumed)"),
    teacher: Path | None = typer.Option(None, help="VGGT checkpoint (dir, .safetensors or model.pt)"),
    metric_teacher: Path | None = typer.Option(
        None, help="metric-depth dir for the scale: DA3METRIC-LARGE (teacher.metric_teacher names the kind)"
    ),
    format: str | None = preset_option(
        PrecomputeConfig, "precompute", "format", f"store format: {' or '.join(FORMATS)}", "--format"
    ),
    ray_address: str | None = typer.Option(
        None, help="Ray cluster address, or 'local' for an in-process one"
    ),
    num_gpus: int | None = preset_option(
        PrecomputeConfig, "precompute", "num_actors", "teacher actors (0: one per GPU; 1 on cpu)"
    ),
    decode_workers: int | None = preset_option(
        PrecomputeConfig, "precompute", "decode_workers", "decode tasks in flight (0: the free CPUs)"
    ),
    device: str | None = preset_option(PrecomputeConfig, "precompute", "device", "cuda or cpu"),
    clips_per_batch: int | None = preset_option(
        PrecomputeConfig, "precompute", "clips_per_batch", "clips per teacher call"
    ),
    max_failure_ratio: float | None = preset_option(
        PrecomputeConfig, "precompute", "max_failure_ratio", "exit 1 when failed/all clips is above"
    ),
    max_teacher_frames: int | None = preset_option(
        PrecomputeConfig, "precompute", "max_teacher_frames", "split clips longer than this (0: only on OOM)"
    ),
    retry_failed: bool = typer.Option(
        False, "--retry-failed", help="relabel only the clips recorded as failed"
    ),
    preset: str = typer.Option("vggt-1b", help=PRESET_HELP),
    overrides: list[str] | None = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Label every clip of the manifest with the teacher on Ray and commit the cache shards."""
    from geovr.app.presets import load_section
    from geovr.pipeline.config import TeacherConfig
    from geovr.pipeline.precompute import run_precompute

    sampling = [item for item in overrides or [] if item.strip().startswith("sampling.")]
    if sampling:  # the manifest's sampling policy is what precompute uses: an override would be ignored
        raise UsageError(
            f"--set {sampling[0]}: sampling is set at `index` (the manifest holds the policy and every clip id "
            f"depends on it); re-index with `geovr-pipeline index ... --set {sampling[0]}`"
        )
    cfg = load_section(
        PrecomputeConfig,
        "precompute",
        preset,
        overrides,
        format=format,
        device=device,
        num_actors=num_gpus,
        decode_workers=decode_workers,
        clips_per_batch=clips_per_batch,
        max_failure_ratio=max_failure_ratio,
        max_teacher_frames=max_teacher_frames,
    )
    teacher_cfg = load_section(
        TeacherConfig, "teacher", preset, overrides, checkpoint=teacher, metric_checkpoint=metric_teacher
    )
    if teacher_cfg.checkpoint is None:
        raise typer.BadParameter(
            "give the teacher checkpoint: --teacher DIR (or teacher.checkpoint in the preset)"
        )
    record = {"preset": str(preset), "overrides": list(overrides or []), "manifest": str(manifest)}
    result = run_precompute(manifest, out, teacher_cfg, cfg, ray_address, Console(), retry_failed, record)
    if result.exit_code:
        Console(stderr=True).print(
            f"[bold red]error:[/] failure ratio {result.failure_ratio:.3f} is above --max-failure-ratio "
            f"{cfg.max_failure_ratio} ({result.store_failures} of {result.store_clips + result.store_failures} clips "
            f"failed; see {out / 'failures.jsonl'})"
        )
        raise typer.Exit(result.exit_code)
