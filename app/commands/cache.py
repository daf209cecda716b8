"""`geovr-pipeline cache verify|stats|convert`: thin wrappers over `geovr.teacher_cache`."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from geovr.app.cli import STAGE_1, app
from geovr.teacher_cache.backends import FORMATS

# Imported inside the commands: the store backends pull in zarr and webdataset, which would slow
# down every `geovr-pipeline` invocation, `--help` included.

cache_app = typer.Typer(help="Inspect, check and convert teacher-label stores.", no_args_is_help=True)
app.add_typer(cache_app, name="cache", rich_help_panel=STAGE_1)


@cache_app.command("verify")
def verify(
    store: Path = typer.Argument(..., help="Store directory."),
    quick: bool = typer.Option(
        False,
        "--quick",
        help="Markers, file sizes and shard metadata only: no payload is read or checksummed.",
    ),
    workers: int = typer.Option(0, help="Local processes checking shards (0: one per CPU available)."),
    ray_address: str = typer.Option(
        None,
        help="Check shards as tasks on this Ray cluster ('local': start one) instead of local processes.",
    ),
) -> None:
    """Check every checksum, the schema, and that every committed shard opens and every clip decodes
    (--quick: no payload read). Exit status 1 on any problem; each bad shard is named."""
    from geovr.teacher_cache.verify import verify_store

    with Progress(
        TextColumn("verify {task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), transient=True,
    ) as progress:  # fmt: skip
        task = progress.add_task(str(store), total=None)

        def on_progress(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        if ray_address is None:
            report = verify_store(store, quick, workers or None, on_progress=on_progress)
        else:
            report = _verify_on_ray(store, quick, ray_address, on_progress)
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
        f"{report.frames_checked} frames checked in {store}" + (" (quick: no payload read)" if quick else "")
    )
    if not report.ok:
        raise typer.Exit(1)


def _call(check: Callable[[list[str]], Any], batch: list[str]) -> Any:
    return check(batch)


def _verify_on_ray(store: Path, quick: bool, address: str, on_progress: Callable[[int, int], None]) -> Any:
    """`verify_store` with each batch of shards as a Ray task (the store must be on a shared filesystem)."""
    import ray

    from geovr.pipeline.precompute import connect_ray
    from geovr.teacher_cache.verify import verify_store

    def ray_map(check: Callable, batches: list[list[str]], crashed: Callable[[str], Any]) -> Iterator[Any]:
        # A batch whose task dies (a crash while decoding, out of memory) is checked again shard by
        # shard; a shard whose own task dies is reported as that shard's problem.
        task = ray.remote(_call).options(num_cpus=1, max_retries=0)
        pending = {task.remote(check, batch): batch for batch in batches}
        while pending:
            [done], _ = ray.wait(list(pending), num_returns=1)
            batch = pending.pop(done)
            try:
                yield ray.get(done)
            except ray.exceptions.WorkerCrashedError:
                if len(batch) == 1:
                    yield [crashed(batch[0])]
                else:
                    pending.update({task.remote(check, [shard]): [shard] for shard in batch})

    started = connect_ray(address)
    try:
        return verify_store(store, quick, map_batches=ray_map, on_progress=on_progress)
    finally:
        if started:
            ray.shutdown()


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
