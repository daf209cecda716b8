"""`verify_store` (checksums, schema, every committed shard opens and every clip decodes; in
parallel, or quick without reading payloads) and `store_stats` (clips, frames, failures, bytes per field per frame, from the done markers)."""

from __future__ import annotations

import multiprocessing
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from geovr.teacher_cache.backends import get_backend
from geovr.teacher_cache.codecs import CODEC_VERSION, FIELDS, EncodedClip, decode_clip
from geovr.teacher_cache.schema import SCHEMA_VERSION
from geovr.teacher_cache.store import (
    DONE_DIR,
    LAYOUT_VERSION,
    TMP_DIR,
    StoreReader,
    committed_shard_ids,
    committed_shard_path,
    open_shard_reader,
    read_marker,
    read_store_json,
    sha256_file,
    shard_files,
    shard_path,
)


@dataclass
class VerifyReport:
    """Outcome of `verify_store`.

    Attributes:
        problems: (shard id or "store", what is wrong); any problem fails verification.
        warnings: uncommitted leftovers of killed writers (ignored by readers; rewritten on resume).
    """

    path: str
    shards_checked: int = 0
    clips_checked: int = 0
    frames_checked: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def bad_shards(self) -> list[str]:
        return sorted({where for where, _ in self.problems if where != "store"})


@dataclass
class ShardCheck:
    """What checking one committed shard found: `name` of its data in the store root, `problems`,
    and the (clip id, frames) it decoded (full mode) or its marker lists (quick mode)."""

    shard_id: str
    name: str
    problems: list[str]
    clips: list[tuple[str, int]]


# Shards per task of the parallel verify: few enough for an even spread and a live ETA, many enough
# that a task's start-up is small beside its work (a tiny shard checks in a few ms).
SHARDS_PER_TASK = 16

# (the shard-checking function, batches of shard ids, the report of a shard whose check killed its
# process) -> the results of each batch, in any order.
BatchMap = Callable[
    [Callable[[list[str]], list[ShardCheck]], list[list[str]], Callable[[str], ShardCheck]],
    Iterable[list[ShardCheck]],
]


def verify_store(
    path: str | Path,
    quick: bool = False,
    workers: int | None = None,
    map_batches: BatchMap | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Check the store at `path`; never raises for a damaged store (see `VerifyReport`).

    Full: every marker against its shard's files (sizes and sha256), every shard opens, every clip
    decodes and matches its marker. `quick`: markers, file sizes and each shard's metadata (the
    zarr.json checksum and clip index, or the marker's rows), no payload read. Each marker is read
    once. The shards are checked in parallel in batches: by `map_batches` (e.g. Ray tasks), else in
    `workers` local processes (default: the CPUs this process may use; 1 checks in this process).
    `on_progress(shards_done, shards_total)` after each batch.
    """
    root = Path(path)
    report = VerifyReport(path=str(root))
    try:
        meta = read_store_json(root, old_layout_ok=True)
    except (OSError, ValueError) as err:
        report.problems.append(("store", str(err)))
        return report
    store_format = meta["format"]
    integrity = meta["layout_version"] == LAYOUT_VERSION
    if not integrity:
        report.warnings.append(
            f"store layout version {meta['layout_version']} has no per-chunk checksums: train refuses it; "
            f"upgrade it with `geovr-pipeline cache convert {root} NEW_STORE --format {store_format}`"
        )
    shard_ids = committed_shard_ids(root)
    batches = [shard_ids[i : i + SHARDS_PER_TASK] for i in range(0, len(shard_ids), SHARDS_PER_TASK)]
    check = partial(
        check_shards, root, store_format, meta["fingerprint"].digest(), integrity=integrity, quick=quick
    )
    if map_batches is None:
        map_batches = partial(local_map, workers or len(os.sched_getaffinity(0)))
    results: list[ShardCheck] = []
    for batch in map_batches(check, batches, partial(crashed_check, root, store_format)):
        results += batch
        if on_progress is not None:
            on_progress(len(results), len(shard_ids))
    _collect(sorted(results, key=lambda r: r.shard_id), report, quick)
    _find_leftovers(root, store_format, {r.name for r in results}, report)
    return report


def local_map(
    workers: int,
    check: Callable[[list[str]], list[ShardCheck]],
    batches: list[list[str]],
    crashed: Callable[[str], ShardCheck],
) -> Iterator[list[ShardCheck]]:
    """`check` over `batches` in `workers` spawned processes (in this one when `workers` is 1).

    A process that dies mid-check (a native crash on a damaged shard, the OOM killer) breaks the
    pool: the batches left are checked again in a new pool, and each shard a process was on when
    the pool broke is checked alone in a process of its own; a shard that kills that one too is
    `crashed(shard_id)`, a problem of that shard, so one bad shard never ends the whole check."""
    if workers <= 1 or len(batches) <= 1:
        yield from map(check, batches)
        return
    while batches:
        with tempfile.TemporaryDirectory(prefix="geovr-verify-") as board:
            left = yield from _pool_round(workers, partial(_check_tracked, check, Path(board)), batches)
            suspects = {path.read_text() for path in Path(board).iterdir()} - {""} if left else set()
        if left and not suspects:  # the processes died before checking anything: check here
            yield from map(check, left)
            return
        for shard_id in sorted(suspects):
            yield _check_alone(check, shard_id, crashed)
        batches = [kept for batch in left if (kept := [s for s in batch if s not in suspects])]


# spawn: zarr runs an event-loop thread, which a fork would copy in an unknown state.
SPAWN = multiprocessing.get_context("spawn")


def _pool_round(
    workers: int, task: Callable[[list[str]], list[ShardCheck]], batches: list[list[str]]
) -> Generator[list[ShardCheck], None, list[list[str]]]:
    """Yields the results of the batches that completed; returns those lost when the pool broke."""
    left = []
    with ProcessPoolExecutor(workers, mp_context=SPAWN) as pool:
        futures = {pool.submit(task, batch): batch for batch in batches}
        for future in as_completed(futures):
            try:
                result = future.result()
            except BrokenProcessPool:
                left.append(futures[future])
                continue
            yield result
    return left


def _check_tracked(
    check: Callable[[list[str]], list[ShardCheck]], board: Path, batch: list[str]
) -> list[ShardCheck]:
    """`check` shard by shard, with the shard in hand written to `board`/<pid> (gone once done)."""
    mine = board / str(os.getpid())
    results = []
    for shard_id in batch:
        mine.write_text(shard_id)
        results += check([shard_id])
    mine.unlink()
    return results


def _check_alone(
    check: Callable[[list[str]], list[ShardCheck]], shard_id: str, crashed: Callable[[str], ShardCheck]
) -> list[ShardCheck]:
    with ProcessPoolExecutor(1, mp_context=SPAWN) as pool:
        try:
            return pool.submit(check, [shard_id]).result()
        except BrokenProcessPool:
            return [crashed(shard_id)]


def crashed_check(root: Path, store_format: str, shard_id: str) -> ShardCheck:
    """The report of a shard whose check killed the process checking it."""
    problem = "checking it killed the verifying process (a crash while decoding, or out of memory)"
    return ShardCheck(shard_id, shard_path(root, store_format, shard_id).name, [problem], [])


def _collect(results: list[ShardCheck], report: VerifyReport, quick: bool) -> None:
    """Add the shard checks to the report, and find clips stored in two shards."""
    seen: dict[str, str] = {}
    for result in results:
        report.shards_checked += 1
        report.problems += [(result.shard_id, p) for p in result.problems]
        if result.problems:
            continue
        for clip_id, frames in result.clips:
            if clip_id in seen:
                report.problems.append((result.shard_id, f"clip {clip_id} is also in shard {seen[clip_id]}"))
            seen[clip_id] = result.shard_id
            report.clips_checked += 1
            report.frames_checked += 0 if quick else frames


def check_shards(
    root: Path, store_format: str, digest: str, shard_ids: list[str], integrity: bool, quick: bool
) -> list[ShardCheck]:
    """Check each shard of `shard_ids` (one task of `verify_store`)."""
    return [_check_shard(root, store_format, digest, s, integrity, quick) for s in shard_ids]


def _check_shard(
    root: Path, store_format: str, digest: str, shard_id: str, integrity: bool, quick: bool
) -> ShardCheck:
    try:
        marker = read_marker(root, shard_id)
    except (OSError, ValueError) as err:
        return ShardCheck(shard_id, shard_path(root, store_format, shard_id).name, [str(err)], [])
    problems, name = _check_shard_files(root, store_format, digest, shard_id, marker, quick)
    if problems:
        return ShardCheck(shard_id, name, problems, [])
    expected = [(r["clip_id"], r["num_frames"]) for r in marker["clips"] if r["status"] == "ok"]
    if not expected:
        return ShardCheck(shard_id, name, [], [])
    try:
        reader = open_shard_reader(root, store_format, shard_id, marker, integrity)
        # Quick: the shard's own clip index (Zarr: its checksummed zarr.json) against the marker.
        found = expected if quick else [_decoded(encoded) for encoded in reader]
        held = reader.clip_ids() if quick else [c for c, _ in found]
    except Exception as err:  # any failure to open or decode names the shard
        return ShardCheck(shard_id, name, [f"does not decode: {type(err).__name__}: {err}"], [])
    if held != [c for c, _ in expected] or found != expected:
        holds = held if quick else found
        return ShardCheck(shard_id, name, [f"holds clips {holds}, marker lists {expected}"], [])
    return ShardCheck(shard_id, name, [], found)


def _decoded(encoded: EncodedClip) -> tuple[str, int]:
    clip = decode_clip(encoded)
    clip.validate()
    return clip.clip_id, clip.num_frames


def _check_shard_files(
    root: Path, store_format: str, digest: str, shard_id: str, marker: dict[str, Any], quick: bool
) -> tuple[list[str], str]:
    """(problems, name of the committed shard data in the store root): the marker's own fields, and
    every file it lists against the shard's files (sizes; the sha256 too unless `quick`)."""
    expected = {
        "shard_id": shard_id,
        "format": store_format,
        "schema_version": SCHEMA_VERSION,
        "fingerprint_digest": digest,
        "codec_version": CODEC_VERSION,
    }
    problems = [
        f"marker {k} is {marker.get(k)!r}, expected {v!r}" for k, v in expected.items() if marker.get(k) != v
    ]
    path = committed_shard_path(root, store_format, shard_id, marker)
    if not path.exists():
        return [*problems, f"shard data {path.name} is missing"], path.name
    listed: dict[str, dict[str, Any]] = marker.get("files", {})
    present = {p.relative_to(root).as_posix(): p for p in shard_files(path)}
    for name, info in listed.items():
        file = present.get(name)
        if file is None:
            problems.append(f"file {name} is missing")
        elif file.stat().st_size != info["bytes"]:
            problems.append(f"file {name} has {file.stat().st_size} bytes, marker says {info['bytes']}")
        elif not quick and sha256_file(file) != info["sha256"]:
            problems.append(f"file {name} fails its sha256 checksum")
    problems += [f"file {name} is not listed in the marker" for name in sorted(set(present) - set(listed))]
    return problems, path.name


def _find_leftovers(root: Path, store_format: str, committed_names: set[str], report: VerifyReport) -> None:
    tmp = root / TMP_DIR
    if tmp.is_dir():
        report.warnings += [f"uncommitted temporary {p.name} in {TMP_DIR}/" for p in sorted(tmp.iterdir())]
    for entry in sorted(root.iterdir()):
        if entry.name in (TMP_DIR, DONE_DIR):
            continue
        # Shards are directories (Zarr) or tar files (WebDataset); other files in the root
        # (store.json, zarr.json, precompute's run.json and failures.jsonl) belong to no shard.
        if not get_backend(store_format).is_shard(entry):
            continue
        if entry.name not in committed_names:
            report.warnings.append(
                f"{entry.name} is not referenced by a done marker (uncommitted or replaced; ignored by readers)"
            )


def store_stats(path: str | Path) -> dict[str, Any]:
    """Counts and on-disk bytes of the committed shards, from the done markers.

    Returns {"path", "format", "fingerprint_digest", "shards", "clips", "frames", "failures",
    "failures_by_stage", "bytes": {field: n}, "bytes_per_frame": {field: x}, "total_bytes",
    "total_bytes_per_frame"}; fields are `codecs.FIELDS` plus "metadata".
    """
    reader = StoreReader(Path(path))
    totals: Counter[str] = Counter({name: 0 for name in (*FIELDS, "metadata")})
    frames = clips = 0
    for shard_id in reader.shards():
        marker = reader.read_marker(shard_id)
        totals.update(marker["bytes"])
        frames += marker["num_frames"]
        clips += marker["num_clips"]
    failures = reader.failures()
    total = sum(totals.values())
    return {
        "path": str(path),
        "format": reader.format,
        "fingerprint_digest": reader.fingerprint.digest(),
        "shards": len(reader.shards()),
        "clips": clips,
        "frames": frames,
        "failures": len(failures),
        "failures_by_stage": dict(Counter(row["stage"] for row in failures)),
        "bytes": dict(totals),
        "bytes_per_frame": {k: v / frames if frames else 0.0 for k, v in totals.items()},
        "total_bytes": total,
        "total_bytes_per_frame": total / frames if frames else 0.0,
    }
