"""`verify_store` (checksums, schema, every committed shard opens and every clip decodes) and
`store_stats` (clips, frames, failures, bytes per field per frame, from the done markers)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geovr.teacher_cache.backends import get_backend
from geovr.teacher_cache.codecs import CODEC_VERSION, FIELDS, decode_clip
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


def verify_store(path: str | Path) -> VerifyReport:
    """Check the store at `path` completely; never raises for a damaged store (see `VerifyReport`)."""
    root = Path(path)
    report = VerifyReport(path=str(root))
    try:
        meta = read_store_json(root, old_layout_ok=True)
    except (OSError, ValueError) as err:
        report.problems.append(("store", str(err)))
        return report
    store_format, digest = meta["format"], meta["fingerprint"].digest()
    integrity = meta["layout_version"] == LAYOUT_VERSION
    if not integrity:
        report.warnings.append(
            f"store layout version {meta['layout_version']} has no per-chunk checksums: train refuses it; "
            f"upgrade it with `geovr-pipeline cache convert {root} NEW_STORE --format {store_format}`"
        )

    shard_ids = committed_shard_ids(root)
    good: list[str] = []
    committed_names: set[str] = set()
    for shard_id in shard_ids:
        report.shards_checked += 1
        problems, name = _check_shard_files(root, store_format, digest, shard_id)
        report.problems += [(shard_id, p) for p in problems]
        committed_names.add(name)
        if not problems:
            good.append(shard_id)

    _check_decodes(root, store_format, good, report, integrity)
    _find_leftovers(root, store_format, committed_names, report)
    return report


def _check_shard_files(root: Path, store_format: str, digest: str, shard_id: str) -> tuple[list[str], str]:
    """(problems, name of the committed shard data in the store root)."""
    try:
        marker = read_marker(root, shard_id)
    except (OSError, ValueError) as err:
        return [str(err)], shard_path(root, store_format, shard_id).name
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
        elif sha256_file(file) != info["sha256"]:
            problems.append(f"file {name} fails its sha256 checksum")
    problems += [f"file {name} is not listed in the marker" for name in sorted(set(present) - set(listed))]
    return problems, path.name


def _check_decodes(
    root: Path, store_format: str, shard_ids: list[str], report: VerifyReport, integrity: bool
) -> None:
    """Open every checksum-clean shard, stream and decode every clip, compare with its marker."""
    seen: dict[str, str] = {}
    for shard_id in shard_ids:
        marker = read_marker(root, shard_id)
        expected = [(r["clip_id"], r["num_frames"]) for r in marker["clips"] if r["status"] == "ok"]
        if not expected:
            continue
        try:
            decoded = []
            for encoded in open_shard_reader(root, store_format, shard_id, marker, integrity):
                clip = decode_clip(encoded)
                clip.validate()
                decoded.append((clip.clip_id, clip.num_frames))
        except Exception as err:  # any failure to open or decode names the shard
            report.problems.append((shard_id, f"does not decode: {type(err).__name__}: {err}"))
            continue
        if decoded != expected:
            report.problems.append((shard_id, f"holds clips {decoded}, marker lists {expected}"))
            continue
        for clip_id, frames in decoded:
            if clip_id in seen:
                report.problems.append((shard_id, f"clip {clip_id} is also in shard {seen[clip_id]}"))
            seen[clip_id] = shard_id
            report.clips_checked += 1
            report.frames_checked += frames


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
    for marker in reader.markers.values():
        totals.update(marker["bytes"])
        frames += marker["num_frames"]
        clips += marker["num_clips"]
    failures = reader.failures()
    total = sum(totals.values())
    return {
        "path": str(path),
        "format": reader.format,
        "fingerprint_digest": reader.fingerprint.digest(),
        "shards": len(reader.markers),
        "clips": clips,
        "frames": frames,
        "failures": len(failures),
        "failures_by_stage": dict(Counter(row["stage"] for row in failures)),
        "bytes": dict(totals),
        "bytes_per_frame": {k: v / frames if frames else 0.0 for k, v in totals.items()},
        "total_bytes": total,
        "total_bytes_per_frame": total / frames if frames else 0.0,
    }
