"""The teacher-label store: one writer and one reader interface over the Zarr v3 and WebDataset backends.

On disk (STORE is a directory):

    STORE/store.json          {"layout": "geovr-teacher-cache", "layout_version", "format": "zarr"|"wds",
                               "fingerprint": `StoreFingerprint.to_json()`, "fingerprint_digest",
                               "codecs": `CodecConfig.to_dict()`}
    STORE/zarr.json           (Zarr only) the root group; each output shard is a child group
    STORE/<shard_id>/         (Zarr) one output shard, see `zarr_backend`
    STORE/<shard_id>.tar      (WebDataset) one output shard, see `wds_backend`
    STORE/<shard_id>.r<N>/, STORE/<shard_id>.r<N>.tar   revision N >= 1 of a replaced shard
    STORE/_done/<shard_id>.json   the done marker: its presence commits the shard
    STORE/_tmp/               shards and markers being written
    STORE/run.json, STORE/failures.jsonl   written by precompute at the end of each run; part of no shard

Commit protocol (one writer per shard id; many writers per store): the shard is written whole under
`_tmp/`, its files are fsynced and checksummed, it is renamed to its final name, and the done marker
(per-clip status, frame counts, bytes per field, sha256 of every file) is written to `_tmp/` and
renamed into `_done/` last. A writer killed at any point leaves either no marker (the shard does not
exist for readers, `verify` and resume, and is rewritten by the next `write_shard`) or a complete
shard. Readers list shards by marker only.

Replacing a committed shard (`replace=True`, precompute's --retry-failed) writes the new version as
the next revision beside the old one, under its own name, and commits it by renaming its marker
over the old marker (one atomic step); the old revision is deleted after that. A kill at any point
leaves the old or the new version committed, never neither; an unreferenced revision left by a
kill is reported by `verify` and deleted by the next write of that shard.

Done marker: {"shard_id", "revision" (0 unless replaced; absent means 0), "format", "schema_version",
"fingerprint_digest", "codec_version", "num_clips", "num_frames", "num_failures", "clips": [{"clip_id", "video", "status": "ok",
"num_frames", "location"} | {"clip_id", "video", "status": "failed", "stage", "reason"}],
"bytes": {field: bytes}, "files": {path relative to STORE: {"bytes", "sha256"}}}.

Integrity on read (layout 2): the readers training uses (`read_clip`, `read_encoded`,
`iter_shard_encoded`, `iter_shard_checked`) check what they read (Zarr: the zstd checksum or crc32c
of every chunk, no absent chunk file, the sha256 of the shard's zarr.json; WebDataset: the crc32c or
zstd checksum of every member of a sample; see the backends) and raise or yield `DamagedClipError`,
one line naming the store, shard, clip, field and problem. Layout 1 (no checksums) is refused by everything but `cache convert`, which
copies its payloads into a new layout-2 store bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from geovr.teacher_cache import wds_backend, zarr_backend
from geovr.teacher_cache.codecs import CODEC_VERSION, CodecConfig, EncodedClip, decode_clip, encode_clip
from geovr.teacher_cache.schema import (
    SCHEMA_VERSION,
    ClipLabels,
    DamagedClipError,
    DamagedShardError,
    SchemaError,
    StoreFingerprint,
)

StoreFormat = Literal["zarr", "wds"]
FORMATS: tuple[str, ...] = ("zarr", "wds")
LAYOUT = "geovr-teacher-cache"
# 2: a checksum in every Zarr chunk and every chunk written, a checksum for every tar member. 1 is
# read by `cache convert` only.
LAYOUT_VERSION = 2
OLD_LAYOUT_VERSIONS = (1,)
STORE_JSON = "store.json"
DONE_DIR = "_done"
TMP_DIR = "_tmp"
FAILURE_KEYS = ("clip_id", "video", "stage", "reason")
_SHARD_ID = re.compile(r"^[0-9A-Za-z_-]+$")


def shard_path(root: Path, store_format: str, shard_id: str, revision: int = 0) -> Path:
    """Final path of a shard's revision: a directory (Zarr) or a tar file (WebDataset)."""
    name = shard_id if revision == 0 else f"{shard_id}.r{revision}"
    return root / (name if store_format == "zarr" else f"{name}.tar")


def committed_shard_path(root: Path, store_format: str, shard_id: str, marker: dict[str, Any]) -> Path:
    """Path of the revision of `shard_id` that its done marker commits."""
    return shard_path(root, store_format, shard_id, int(marker.get("revision", 0)))


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def shard_files(path: Path) -> list[Path]:
    """Every file of a shard, sorted (the shard itself for a tar)."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(data: dict[str, Any], tmp_dir: Path, final: Path) -> None:
    tmp = tmp_dir / f"{final.name}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(data, indent=1))
    _fsync(tmp)
    os.replace(tmp, final)
    _fsync(final.parent)


def read_store_json(root: Path, old_layout_ok: bool = False) -> dict[str, Any]:
    """store.json of `root`, parsed, with the fingerprint checked first (`SchemaError` for another
    schema version, before anything reads a payload). A layout of `OLD_LAYOUT_VERSIONS` is a
    `SchemaError` saying how to upgrade it, unless `old_layout_ok` (conversion, verify)."""
    path = root / STORE_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{root}: not a teacher-label store (no {STORE_JSON})")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SchemaError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("fingerprint"), dict):
        raise SchemaError(f"{path}: no fingerprint object")
    meta["fingerprint"] = StoreFingerprint.from_json(meta["fingerprint"], where=str(path))
    if (
        meta.get("layout") == LAYOUT
        and meta.get("layout_version") in OLD_LAYOUT_VERSIONS
        and not old_layout_ok
    ):
        raise SchemaError(
            f"{root}: store layout version {meta['layout_version']} has no checksums to read it "
            f"safely (this code reads version {LAYOUT_VERSION}); re-run precompute into a new store, "
            f"or upgrade it with `geovr-pipeline cache convert {root} NEW_STORE --format {meta.get('format')}`"
        )
    versions = (LAYOUT_VERSION, *OLD_LAYOUT_VERSIONS) if old_layout_ok else (LAYOUT_VERSION,)
    if meta.get("layout") != LAYOUT or meta.get("layout_version") not in versions:
        raise SchemaError(
            f"{path}: layout {meta.get('layout')!r} version {meta.get('layout_version')!r}, "
            f"this code reads {LAYOUT!r} version {LAYOUT_VERSION}"
        )
    if meta.get("format") not in FORMATS:
        raise SchemaError(f"{path}: unknown format {meta.get('format')!r} (expected one of {FORMATS})")
    meta["codecs"] = CodecConfig.from_dict(meta.get("codecs", {}), where=str(path))
    return meta


def read_marker(root: Path, shard_id: str) -> dict[str, Any]:
    path = root / DONE_DIR / f"{shard_id}.json"
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SchemaError(f"{path}: done marker is not valid JSON ({err})") from None


def committed_shard_ids(root: Path) -> list[str]:
    done = root / DONE_DIR
    return sorted(p.stem for p in done.glob("*.json")) if done.is_dir() else []


class StoreWriter:
    """Writes whole shards into one store; see the module docstring for the commit protocol."""

    def __init__(self, root: Path, fingerprint: StoreFingerprint, store_format: str, codecs: CodecConfig):
        self.root = root
        self.fingerprint = fingerprint
        self.format = store_format
        self.codecs = codecs

    def committed_shards(self) -> set[str]:
        return set(committed_shard_ids(self.root))

    def is_committed(self, shard_id: str) -> bool:
        """One file check (listing every marker of a large store per shard written would not scale)."""
        return (self.root / DONE_DIR / f"{shard_id}.json").is_file()

    def write_shard(
        self, shard_id: str, clips: list[ClipLabels], failures: list[dict], replace: bool = False
    ) -> dict[str, Any]:
        """Encode and commit one shard. A clip that fails validation or encoding becomes a failure row
        (stage "encode"). failures rows: {"clip_id", "video", "stage", "reason"}. `replace`: see
        `write_encoded_shard`. Returns the marker."""
        encoded: list[EncodedClip] = []
        failures = list(failures)
        for clip in clips:
            try:
                encoded.append(encode_clip(clip, self.codecs))
            except SchemaError as err:
                failures.append(
                    {"clip_id": clip.clip_id, "video": clip.video, "stage": "encode", "reason": str(err)}
                )
        return self.write_encoded_shard(shard_id, encoded, failures, replace)

    def write_encoded_shard(
        self, shard_id: str, clips: list[EncodedClip], failures: list[dict], replace: bool = False
    ) -> dict[str, Any]:
        """Commit already encoded clips (used by `write_shard` and by conversion between backends).

        A committed shard is an error unless `replace`: then the clips and failures given become the
        shard's whole new content, committed atomically over the old (module docstring).
        """
        if not _SHARD_ID.match(shard_id):
            raise ValueError(f"shard id {shard_id!r}: use letters, digits, '_' and '-' only (e.g. '000042')")
        previous = read_marker(self.root, shard_id) if self.is_committed(shard_id) else None
        if previous is not None and not replace:
            raise ValueError(f"{self.root}: shard {shard_id} is already committed")
        ids = [c.clip_id for c in clips]
        if len(set(ids)) != len(ids):
            raise ValueError(f"shard {shard_id}: duplicate clip ids")
        for clip in clips:
            clip.validate()
        for row in failures:
            missing = [k for k in FAILURE_KEYS if k not in row]
            if missing:
                raise ValueError(f"shard {shard_id}: failure row {row!r} lacks {', '.join(missing)}")

        revision = 0 if previous is None else int(previous.get("revision", 0)) + 1
        final = shard_path(self.root, self.format, shard_id, revision)
        tmp = self.root / TMP_DIR / f"{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        backend = zarr_backend if self.format == "zarr" else wds_backend
        files: dict[str, dict[str, Any]] = {}
        try:
            written = backend.write_shard(tmp, clips, self.codecs.zstd_level)
            for file in shard_files(tmp):
                _fsync(file)
                relative = (Path(final.name) / file.relative_to(tmp)) if tmp.is_dir() else Path(final.name)
                files[relative.as_posix()] = {"bytes": file.stat().st_size, "sha256": sha256_file(file)}
        except BaseException:
            # An exception (not a kill) cleans up; a killed writer's temporary is only a warning in verify.
            _remove(tmp)
            raise
        # A final path without a marker is the leftover of a writer killed after its rename.
        if final.is_dir():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(self.root)

        rows: list[dict[str, Any]] = [
            {"video": c.video, "status": "ok", **row} for c, row in zip(clips, written["clips"], strict=True)
        ]
        rows += [{"status": "failed", **{k: str(row[k]) for k in FAILURE_KEYS}} for row in failures]
        marker = {
            "shard_id": shard_id,
            "revision": revision,
            "format": self.format,
            "schema_version": SCHEMA_VERSION,
            "fingerprint_digest": self.fingerprint.digest(),
            "codec_version": CODEC_VERSION,
            "num_clips": len(clips),
            "num_frames": sum(c.num_frames for c in clips),
            "num_failures": len(failures),
            "clips": rows,
            "bytes": written["bytes"],
            "files": files,
        }
        _write_json_atomic(marker, self.root / TMP_DIR, self.root / DONE_DIR / f"{shard_id}.json")
        # Committed: the replaced revision, and an older one whose deletion a kill interrupted, are
        # unreferenced now.
        for old_revision in range(revision):
            _remove(shard_path(self.root, self.format, shard_id, old_revision))
        return marker


def open_writer(
    path: str | Path, fingerprint: StoreFingerprint, format: str, codecs: CodecConfig | None = None
) -> StoreWriter:
    """Create a store or open an existing one for more shards (resume).

    Codec settings: `codecs`, else `fingerprint.preprocess["codecs"]` when present; a new store
    without either gets the defaults, an existing one keeps its own (so that a resume under newer
    code defaults still matches). Raises `SchemaError` when the existing store has another
    fingerprint (the message lists the differences), format, or codec settings than requested.
    """
    if format not in FORMATS:
        raise ValueError(f"store format {format!r}: expected one of {FORMATS}")
    if codecs is None and "codecs" in fingerprint.preprocess:
        codecs = CodecConfig.from_dict(fingerprint.preprocess["codecs"], where="fingerprint.preprocess")
    if codecs is not None:
        codecs.validate()
    root = Path(path)
    if not (root / STORE_JSON).exists():
        if root.exists() and any(p.name not in (TMP_DIR, DONE_DIR) for p in root.iterdir()):
            raise ValueError(
                f"{root}: exists, is not empty and has no {STORE_JSON}; refusing to write a store there"
            )
        _create_store(root, fingerprint, format, codecs or CodecConfig())

    meta = read_store_json(root)
    problems = [f"fingerprint {d}" for d in meta["fingerprint"].differences(fingerprint)]
    if meta["format"] != format:
        problems.append(f"format: {meta['format']!r} != {format!r}")
    if codecs is not None and meta["codecs"] != codecs:
        problems.append(f"codecs: {meta['codecs'].to_dict()} != {codecs.to_dict()}")
    if problems:
        raise SchemaError(
            f"{root}: the store was written with other settings; refusing to add shards:\n  "
            + "\n  ".join(problems)
        )
    return StoreWriter(root, fingerprint, format, meta["codecs"])


def _create_store(root: Path, fingerprint: StoreFingerprint, store_format: str, codecs: CodecConfig) -> None:
    for sub in (TMP_DIR, DONE_DIR):
        (root / sub).mkdir(parents=True, exist_ok=True)
    if store_format == "zarr":
        import zarr

        zarr.open_group(store=str(root), mode="a", zarr_format=3, attributes={"layout": LAYOUT})
    meta = {
        "layout": LAYOUT,
        "layout_version": LAYOUT_VERSION,
        "format": store_format,
        "fingerprint": fingerprint.to_json(),
        "fingerprint_digest": fingerprint.digest(),
        "codecs": codecs.to_dict(),
    }
    tmp = root / TMP_DIR / f"{STORE_JSON}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(meta, indent=1))
    _fsync(tmp)
    try:
        os.link(tmp, root / STORE_JSON)  # atomic create-if-absent: a concurrent creator's store.json wins
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


ShardReader = zarr_backend.ZarrShardReader | wds_backend.WdsShardReader


def open_shard_reader(
    root: Path, store_format: str, shard_id: str, marker: dict[str, Any], integrity: bool = True
) -> ShardReader:
    """Reader of one committed shard (`.read(clip_id)`, `.iter_checked()`; iteration streams its clips
    in order). `integrity`: the store's layout has checksums (False for layout 1). Raises
    `DamagedShardError` when the shard's data is missing or its metadata damaged."""
    path = committed_shard_path(root, store_format, shard_id, marker)
    if not path.exists():
        raise DamagedShardError(root, shard_id, "shard", f"committed shard data {path.name} is missing")
    if store_format == "zarr":
        metadata = marker.get("files", {}).get(f"{path.name}/zarr.json", {}).get("sha256")
        return zarr_backend.ZarrShardReader(path, str(root), shard_id, metadata, integrity)
    rows = [r for r in marker["clips"] if r["status"] == "ok"]
    return wds_backend.WdsShardReader(path, rows, str(root), shard_id, integrity)


class StoreReader:
    """Reads committed shards of one store (see `open_store`)."""

    def __init__(self, root: Path, old_layout_ok: bool = False):
        self.root = root
        meta = read_store_json(root, old_layout_ok)
        self.fingerprint: StoreFingerprint = meta["fingerprint"]
        self.format: str = meta["format"]
        self.codecs: CodecConfig = meta["codecs"]
        self.integrity = meta["layout_version"] == LAYOUT_VERSION
        self.markers: dict[str, dict[str, Any]] = {}
        self._clip_shard: dict[str, str] = {}
        for shard_id in committed_shard_ids(root):
            marker = read_marker(root, shard_id)
            if marker.get("schema_version") != SCHEMA_VERSION:
                raise SchemaError(
                    f"{root}: shard {shard_id} was written with schema version {marker.get('schema_version')}, "
                    f"this code reads {SCHEMA_VERSION}"
                )
            if marker.get("fingerprint_digest") != self.fingerprint.digest():
                raise SchemaError(f"{root}: shard {shard_id} was written under another fingerprint")
            self.markers[shard_id] = marker
            for row in marker["clips"]:
                if row["status"] == "ok":
                    self._clip_shard.setdefault(row["clip_id"], shard_id)
        self._readers: dict[str, ShardReader] = {}

    def shards(self) -> list[str]:
        return list(self.markers)

    def clip_ids(self) -> list[str]:
        return list(self._clip_shard)

    def failures(self) -> list[dict[str, Any]]:
        """Failure rows of every committed shard: {"clip_id", "video", "stage", "reason", "shard_id"}."""
        return [
            {**{k: row[k] for k in FAILURE_KEYS}, "shard_id": shard_id}
            for shard_id, marker in self.markers.items()
            for row in marker["clips"]
            if row["status"] == "failed"
        ]

    def shard_reader(self, shard_id: str) -> ShardReader:
        if shard_id not in self.markers:
            raise KeyError(f"{self.root}: no committed shard {shard_id!r}")
        if shard_id not in self._readers:
            self._readers[shard_id] = open_shard_reader(
                self.root, self.format, shard_id, self.markers[shard_id], self.integrity
            )
        return self._readers[shard_id]

    def read_encoded(self, clip_id: str) -> EncodedClip:
        """The clip as stored; `DamagedClipError` when its data is missing or fails a check."""
        if clip_id not in self._clip_shard:
            raise KeyError(f"{self.root}: no clip {clip_id!r} in the committed shards")
        try:
            reader = self.shard_reader(self._clip_shard[clip_id])
        except DamagedShardError as err:
            raise err.for_clip(clip_id) from None
        return reader.read(clip_id)

    def read_clip(self, clip_id: str) -> ClipLabels:
        return decode_clip(self.read_encoded(clip_id))

    def iter_shard_checked(self, shard_id: str) -> Iterator[EncodedClip | DamagedClipError]:
        """The shard's stored clips in order, each as the clip or the `DamagedClipError` saying why it
        cannot be read; damage to one clip does not end the iteration (training skips and counts)."""
        rows = [r["clip_id"] for r in self.markers[shard_id]["clips"] if r["status"] == "ok"]
        if not rows:
            return
        try:
            reader = self.shard_reader(shard_id)
        except DamagedShardError as err:
            yield from (err.for_clip(clip_id) for clip_id in rows)
            return
        yield from reader.iter_checked()

    def iter_shard_encoded(self, shard_id: str) -> Iterator[EncodedClip]:
        """The shard's stored clips in order; raises `DamagedClipError` at the first damaged one."""
        for item in self.iter_shard_checked(shard_id):
            if isinstance(item, DamagedClipError):
                raise item
            yield item

    def iter_shard(self, shard_id: str) -> Iterator[ClipLabels]:
        for encoded in self.iter_shard_encoded(shard_id):
            yield decode_clip(encoded)

    def iter_clips(self) -> Iterator[ClipLabels]:
        for shard_id in self.shards():
            yield from self.iter_shard(shard_id)


def open_store(path: str | Path, old_layout_ok: bool = False) -> StoreReader:
    """Open a store for reading (format from store.json; `SchemaError` for another schema version or,
    unless `old_layout_ok`, an old layout)."""
    return StoreReader(Path(path), old_layout_ok)
