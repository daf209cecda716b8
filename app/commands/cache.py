"""`geovr-pipeline cache verify|stats|convert`: thin wrappers over `geovr.teacher_cache`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from geovr.app.cli import STAGE_1, app
from geovr.teacher_cache.backends import FORMATS

# Imported inside the commands: the store backends pull in zarr and webdataset, which would slow
# down every `geovr-pipeline` invocation, `--help` included.

cache_app = typer.Typer(help="Inspect, check and convert teacher-label stores.", no_args_is_help=True)
app.add_typer(cache_app, name="cache", rich_help_panel=STAGE_1)


@cache_app.command("verify")
def verify(store: Path = typer.Argument(..., help="Store directory.")) -> None:
    """Check every checksum, the schema, and that every committed shard opens and every clip decodes.
    Exit status 1 on any problem; each bad shard is named."""
    from geovr.teacher_cache.verify import verify_store

    report = verify_store(store)
    for warning in report.warnings:
        typer.echo(f"warning: {warning}")
    for where, problem in report.problems:
        label = "store" if where == "store" else f"shard {where}"
        typer.echo(f"BAD {label}: {problem}", err=True)
    if report.ok:
        status = "OK"
    elif report.bad_shards:
        status = f"FAILED ({len(report.bad_shards)} bad shards: {', '.join(report.bad_shards)})"
    else:
        status = "FAILED (the store itself, see above)"
    typer.echo(
        f"{status}: {report.shards_checked} shards, {report.clips_checked} clips, "
        f"{report.frames_checked} frames checked in {store}"
    )
    if not report.ok:
        raise typer.Exit(1)


@cache_app.command("stats")
def stats(
    store: Path = typer.Argument(..., help="Store directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the statistics as JSON."),
) -> None:
    """Clips, frames, failures and bytes per field per frame of the committed shards."""
    from geovr.teacher_cache.verify import store_stats

    result = store_stats(store)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(
        f"{result['path']} ({result['format']}, fingerprint {result['fingerprint_digest']}): "
        f"{result['shards']} shards, {result['clips']} clips, {result['frames']} frames, "
        f"{result['failures']} failures {result['failures_by_stage'] or ''}"
    )
    typer.echo(f"{'field':<12} {'bytes':>14} {'bytes/frame':>14}")
    for name, total in result["bytes"].items():
        typer.echo(f"{name:<12} {total:>14,} {result['bytes_per_frame'][name]:>14,.0f}")
    typer.echo(f"{'total':<12} {result['total_bytes']:>14,} {result['total_bytes_per_frame']:>14,.0f}")


@cache_app.command("convert")
def convert(
    src: Path = typer.Argument(..., help="Source store."),
    dst: Path = typer.Argument(..., help="Destination store (created, or resumed when it exists)."),
    format: str = typer.Option(..., "--format", help=f"Destination backend: {' | '.join(FORMATS)}."),
) -> None:
    """Copy a store into another backend, keeping every field and its encoded payload bit for bit."""
    from geovr.teacher_cache.convert import convert_store

    summary = convert_store(src, dst, format)
    typer.echo(
        f"converted {src} -> {dst} ({format}): {summary['shards_written']} shards written, "
        f"{summary['shards_skipped']} already there, {summary['clips']} clips"
    )
