"""`geovr-pipeline index`: the clip manifest (Parquet) that the precompute consumes.

Sources are video folders (searched recursively for `VIDEO_EXTENSIONS`, symlinked folders
followed; every entry named like a video gets a row, so a dangling or looping symlink or a folder
named `x.mp4` is listed as unusable with its reason; a symlinked folder that leads back to one of its
ancestors and a folder that cannot be listed are listed too) or QA files (VSI-590K / LLaVA rows
naming a `"video"`, VLM-3R rows naming `"data_source"` and `"scene_name"`), read by the QA contract
of both stages, `geovr.teacher_cache.qa`: its file formats (JSON Lines, a JSON list, a
`{"data": [...]}` wrapper; streamed, never held whole), the video of a row and its normalised,
corpus-relative path. Rows without a video (image or text only) are counted; rows the contract
refuses (not valid JSON, several videos, a path outside the corpus root) are counted and listed in
`IndexReport.bad_rows`, and the run goes on.

Teacher labels depend only on the video and the sampling policy, so QA rows that name the same
video share one clip: `clip_id = qa.clip_id_of(video, sampling.policy(), corpus_root)`, the id the
training join computes for the same row.

Probing runs in a local process pool, not in Ray: it is a metadata pass (demux packet headers and
decode one frame per video, tens of milliseconds each), so one node's cores saturate the file
system within minutes even at 100,000 videos; it needs no cluster, starts in a second, and its
result is deterministic. The GPU work is what goes to Ray.

Shard assignment (deterministic, append-stable):
- Without `--extend`: the clips sorted by clip id, `K = --clips-per-shard` per shard, shard ids
  `f"{i:06d}"`. Sorting by the id (a hash) spreads long and short videos of one folder across shards,
  which evens out the shard tasks.
- With `--extend OLD.parquet`: every clip already in the old manifest keeps its shard; only new
  clips are sorted and packed into new shards numbered after the old ones. This is what makes
  appending videos to a corpus safe: the shards a store has already committed keep their exact
  clip lists, so a resume with the extended manifest skips them and labels only the new shards.
  (Re-sorting everything instead would move clips between committed shards.)

Manifest rows, one per clip (all probed fields null when the video failed):
  clip_id, video (relative path), shard, status ("ok" | "missing" | "broken-link" | "symlink-loop" |
  "not-a-file" | "unreadable" | "empty" | "corrupt" | "no-video-stream" | "too-short"), reason (the
  detail message, "" when ok), width, height,
  num_frames, fps, duration_s, variable_frame_rate, codec, pix_fmt, num_qa_rows, rgbd (the paired
  RGB-D folder, "" when none), rgbd_status (`pipeline.rgbd_pairing`; a QA row may name its video's
  folder under "rgbd").
Parquet schema metadata key `geovr` (JSON): format_version, corpus_root (absolute), sampling
(the policy dict), clips_per_shard, sources.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from geovr.corpus.config import SamplingConfig
from geovr.corpus.video import VideoError, is_video_file, probe_video
from geovr.pipeline.config import CLIPS_PER_SHARD, MAX_PROBE_WORKERS
from geovr.pipeline.rgbd_pairing import pair_rgbd
from geovr.teacher_cache.qa import QARowError, normalise_video, read_rows, video_of
from geovr.teacher_cache.schema import clip_id_for

MANIFEST_FORMAT_VERSION = 1
OPTIONAL_COLUMNS = {"rgbd", "rgbd_status"}  # absent from older manifests: read as absent from the rows

MANIFEST_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("video", pa.string()),
        ("shard", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("num_frames", pa.int64()),
        ("fps", pa.float64()),
        ("duration_s", pa.float64()),
        ("variable_frame_rate", pa.bool_()),
        ("codec", pa.string()),
        ("pix_fmt", pa.string()),
        ("num_qa_rows", pa.int64()),
        ("rgbd", pa.string()),  # `rgbd_pairing`: optional (manifests written before it lack them)
        ("rgbd_status", pa.string()),
    ]
)


@dataclass
class Manifest:
    """A loaded manifest: its rows as one Arrow table with the MANIFEST_SCHEMA columns (columnar:
    about 100 bytes a row in memory, where a row as a Python dict costs about 2.3 KB; the precompute
    driver makes dicts of a shard's rows only while the shard is in flight), and its metadata."""

    table: pa.Table
    corpus_root: Path
    sampling: dict[str, Any]
    clips_per_shard: int
    sources: list[str] = field(default_factory=list)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """Every row as a dict (a copy of the whole manifest: for small uses, not the driver)."""
        return self.table.to_pylist()

    def shards(self) -> dict[str, list[dict[str, Any]]]:
        """Rows grouped by shard id, shards in id order, rows in manifest order (every row as a
        dict: for small uses; the driver uses `shard_positions`)."""
        rows = self.rows
        return {shard: [rows[p] for p in positions] for shard, positions in self.shard_positions().items()}

    def shard_positions(self) -> dict[str, np.ndarray]:
        """Row positions (int64) grouped by shard id, shards in id order, rows in manifest order."""
        shard = self.table.column("shard").to_numpy(zero_copy_only=False)
        order = np.argsort(shard, kind="stable")
        ids, starts = np.unique(shard[order], return_index=True)
        bounds = [*starts.tolist(), len(order)]
        return {str(s): order[a:b] for s, a, b in zip(ids, bounds, bounds[1:], strict=False)}

    def take(self, positions: np.ndarray) -> list[dict[str, Any]]:
        """The rows at `positions`, as dicts."""
        return self.table.take(pa.array(positions, type=pa.int64())).to_pylist()

    def clip_ids(self) -> np.ndarray:
        """(N,) the clip id of every row, in manifest order."""
        return self.table.column("clip_id").to_numpy(zero_copy_only=False)


@dataclass
class IndexReport:
    num_clips: int
    num_shards: int
    num_qa_rows: int
    rows_without_video: int
    bad: list[dict[str, str]]  # {"video", "status", "reason"}
    status_counts: dict[str, int]
    bad_rows: list[str] = field(default_factory=list)  # "<file>:<line>: <problem>" per refused QA row
    rgbd_counts: dict[str, int] = field(default_factory=dict)  # RGB-D folders: paired, none, mismatch
    rgbd_problems: list[dict[str, str]] = field(default_factory=list)  # {"video", "problem"}


def shard_id(index: int) -> str:
    return f"{index:06d}"


@dataclass
class CollectedVideos:
    """What the sources name: video -> number of QA rows naming it (0 for folder sources), QA rows
    read, rows without a video, the refused rows ("<file>:<line>: <problem>"), and the folder
    problems {"video": relative path, "status", "reason"} (see `walk_folder`)."""

    videos: Counter[str] = field(default_factory=Counter)
    qa_rows: int = 0
    rows_without_video: int = 0
    bad_rows: list[str] = field(default_factory=list)
    folder_problems: list[dict[str, str]] = field(default_factory=list)
    rgbd: dict[str, str] = field(default_factory=dict)  # video -> RGB-D folder its QA rows name


def collect_videos(sources: list[Path], corpus_root: Path) -> CollectedVideos:
    """Relative video paths named by the sources (folders walked, QA files streamed row by row)."""
    found = CollectedVideos()
    for source in sources:
        if source.is_dir():
            for path in walk_folder(source, corpus_root, found.folder_problems):
                found.videos[_relative(path, corpus_root)] += 0
        elif source.is_file():
            _collect_qa_file(source, corpus_root, found)
        else:
            raise FileNotFoundError(f"index source {source} does not exist")
    return found


def _collect_qa_file(source: Path, corpus_root: Path, found: CollectedVideos) -> None:
    """Count the videos the rows of `source` name, streaming the rows (none is kept). Many rows name
    one video (VSI-590K: about 6 per video), so each distinct path is normalised once."""
    normalised: dict[str, str | QARowError] = {}
    for row in read_rows(source):
        found.qa_rows += 1
        try:
            if row.error is not None:
                raise QARowError(row.error)
            video = video_of(row.value)
            if video is None:
                found.rows_without_video += 1
                continue
            if video not in normalised:
                normalised[video] = _normalised_or_error(video, corpus_root)
            normal = normalised[video]
            if isinstance(normal, QARowError):
                raise normal
            found.videos[normal] += 1
            _collect_rgbd(row.value, normal, corpus_root, found)
        except QARowError as err:
            found.bad_rows.append(f"{row.where}: {err}")


def _normalised_or_error(video: str, corpus_root: Path) -> str | QARowError:
    try:
        return normalise_video(video, corpus_root)
    except QARowError as err:
        return err


def _collect_rgbd(row: dict[str, Any], video: str, corpus_root: Path, found: CollectedVideos) -> None:
    """A QA row's explicit `"rgbd"` folder (corpus-relative, or absolute) for its video."""
    folder = row.get("rgbd")
    if folder is None:
        return
    if not isinstance(folder, str) or not folder.strip():
        raise QARowError("'rgbd' must be a non-empty folder path")
    found.rgbd[video] = os.path.normpath(folder)


def walk_folder(folder: Path, corpus_root: Path, problems: list[dict[str, str]]) -> list[Path]:
    """Every entry named like a video under `folder` (sorted, whatever its type: the probe lists a
    dangling or looping symlink or a folder named `x.mp4` as unusable). Symlinked folders are
    followed, except one leading back to its own ancestor (a loop); that one, and a folder that
    cannot be listed, are appended to `problems`."""
    found: list[Path] = []

    def problem(path: Path, status: str, detail: str) -> None:
        problems.append(
            {"video": _relative(path, corpus_root), "status": status, "reason": f"{status}: {detail}"}
        )

    def walk(path: Path, ancestors: frozenset[tuple[int, int]]) -> None:
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as err:
            problem(path, "unreadable", f"folder {path} cannot be listed ({err.strerror})")
            return
        for entry in entries:
            child = Path(entry.path)
            if is_video_file(child):
                found.append(child)
            try:
                if not entry.is_dir():  # follows symlinks
                    continue
                stat = entry.stat()
            except OSError:  # a symlink loop: listed by the probe when named like a video
                continue
            if (stat.st_dev, stat.st_ino) in ancestors:
                detail = f"{child} leads back to its own folder {os.path.realpath(child)}; not followed"
                problem(child, "symlink-loop", detail)
                continue
            walk(child, ancestors | {(stat.st_dev, stat.st_ino)})

    root = folder.stat()
    walk(folder, frozenset({(root.st_dev, root.st_ino)}))
    return found


def _relative(path: Path, corpus_root: Path) -> str:
    resolved = Path(os.path.normpath(path.absolute()))
    try:
        return resolved.relative_to(corpus_root).as_posix()
    except ValueError:
        raise ValueError(
            f"video {path} is outside the corpus root {corpus_root}; pass --corpus-root"
        ) from None


def _probe_row(args: tuple[str, str, dict[str, Any]]) -> dict[str, Any]:
    """Probe one video (runs in a pool worker) -> the probed manifest columns."""
    video, root, policy = args
    empty = dict.fromkeys(
        ("width", "height", "num_frames", "fps", "duration_s", "variable_frame_rate", "codec", "pix_fmt")
    )
    try:
        info = probe_video(Path(root) / video)
    except VideoError as err:
        return {**empty, "status": err.reason, "reason": str(err)}
    cfg = SamplingConfig.from_policy(policy)
    if info.num_frames < cfg.min_frames:
        reason = f"too-short: {video}: {info.num_frames} frames, at least {cfg.min_frames} are needed"
        return {**empty, "status": "too-short", "reason": reason}
    row = {
        "status": "ok",
        "reason": "",
        "width": info.width,
        "height": info.height,
        "num_frames": info.num_frames,
        "fps": info.fps,
        "duration_s": info.duration_s,
        "variable_frame_rate": info.variable_frame_rate,
        "codec": info.codec,
        "pix_fmt": info.pix_fmt,
    }
    return row


def probe_all(
    videos: list[str], corpus_root: Path, policy: dict[str, Any], workers: int
) -> list[dict[str, Any]]:
    """Probe videos in a process pool of `workers` (inline when 1), results in input order."""
    jobs = [(video, str(corpus_root), policy) for video in videos]
    if workers <= 1 or len(jobs) <= 1:
        return [_probe_row(job) for job in jobs]
    # spawn: a forked child of a process that has started Ray or torch threads can deadlock.
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        return list(pool.map(_probe_row, jobs, chunksize=max(1, min(64, len(jobs) // (4 * workers)))))


def assign_shards(
    clip_ids: list[str], clips_per_shard: int, previous: dict[str, str] | None = None
) -> dict[str, str]:
    """clip id -> shard id. Clips in `previous` keep their shard; the others, sorted by id, fill
    new shards of `clips_per_shard` numbered after the highest previous shard."""
    previous = previous or {}
    assignment = {cid: previous[cid] for cid in clip_ids if cid in previous}
    first_new = max((int(s) for s in previous.values()), default=-1) + 1
    new = sorted(cid for cid in clip_ids if cid not in previous)
    for position, cid in enumerate(new):
        assignment[cid] = shard_id(first_new + position // clips_per_shard)
    return assignment


def build_manifest(
    sources: list[Path],
    out: Path,
    sampling: SamplingConfig,
    corpus_root: Path | None = None,
    clips_per_shard: int = CLIPS_PER_SHARD,
    extend: Path | None = None,
    workers: int | None = None,
) -> IndexReport:
    """Index `sources` into the Parquet manifest `out` (see the module docstring)."""
    if clips_per_shard < 1:
        raise ValueError(f"--clips-per-shard must be >= 1, got {clips_per_shard}")
    if not sources:
        raise ValueError("index needs at least one source (a video folder or a QA file)")
    sources = [Path(s) for s in sources]
    for source in sources:
        if not source.exists():
            raise FileNotFoundError(f"index source {source} does not exist")
    if corpus_root is None:
        if len(sources) > 1:
            raise ValueError("several sources: pass --corpus-root (video paths are stored relative to it)")
        corpus_root = sources[0] if sources[0].is_dir() else sources[0].parent
    corpus_root = Path(os.path.normpath(Path(corpus_root).absolute()))
    policy = sampling.policy()

    previous: dict[str, str] = {}
    if extend is not None:
        old = read_manifest(extend)
        if old.sampling != policy:
            raise ValueError(f"--extend {extend}: its sampling policy {old.sampling} differs from {policy}")
        if old.corpus_root != corpus_root:
            raise ValueError(
                f"--extend {extend}: its corpus root {old.corpus_root} differs from {corpus_root}"
            )
        previous = {row["clip_id"]: row["shard"] for row in old.rows}

    found = collect_videos(sources, corpus_root)
    videos = found.videos
    names = sorted(videos)
    probed = probe_all(names, corpus_root, policy, workers or min(os.cpu_count() or 1, MAX_PROBE_WORKERS))
    clip_ids = [clip_id_for(name, policy) for name in names]
    shards = assign_shards(clip_ids, clips_per_shard, previous)
    rows = [
        {"clip_id": cid, "video": name, "shard": shards[cid], **probe, "num_qa_rows": videos[name]}
        for cid, name, probe in zip(clip_ids, names, probed, strict=True)
    ]
    rows.sort(key=lambda r: (r["shard"], r["clip_id"]))
    rgbd = pair_rgbd(rows, corpus_root, found.rgbd)
    metadata = {
        "format_version": MANIFEST_FORMAT_VERSION,
        "corpus_root": str(corpus_root),
        "sampling": policy,
        "clips_per_shard": clips_per_shard,
        "sources": [str(s) for s in sources],
    }
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA).replace_schema_metadata(
        {"geovr": json.dumps(metadata)}
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(out)
    bad = found.folder_problems + [
        {"video": r["video"], "status": r["status"], "reason": r["reason"]}
        for r in rows
        if r["status"] != "ok"
    ]
    return IndexReport(
        num_clips=len(rows),
        num_shards=len(set(shards.values())),
        num_qa_rows=found.qa_rows,
        rows_without_video=found.rows_without_video,
        bad=sorted(bad, key=lambda b: b["video"]),
        status_counts=dict(Counter(r["status"] for r in rows)),
        bad_rows=found.bad_rows,
        **rgbd,
    )


def read_manifest(path: str | Path) -> Manifest:
    """Load a manifest written by `build_manifest`; ValueError naming the file if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"manifest {path} is not a Parquet file ({err})") from None
    raw = (table.schema.metadata or {}).get(b"geovr")
    if raw is None:
        raise ValueError(f"manifest {path} lacks the geovr metadata: write it with `geovr-pipeline index`")
    metadata = json.loads(raw)
    if metadata.get("format_version") != MANIFEST_FORMAT_VERSION:
        raise ValueError(f"manifest {path}: format version {metadata.get('format_version')} is not supported")
    missing = sorted(set(MANIFEST_SCHEMA.names) - set(table.schema.names) - OPTIONAL_COLUMNS)
    if missing:
        raise ValueError(f"manifest {path} lacks the column(s) {', '.join(missing)}")
    return Manifest(
        table=table,
        corpus_root=Path(metadata["corpus_root"]),
        sampling=metadata["sampling"],
        clips_per_shard=int(metadata["clips_per_shard"]),
        sources=list(metadata.get("sources", [])),
    )
