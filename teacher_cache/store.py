"""The teacher-label store: one writer and one reader interface over the storage backends (`backends`:
the `StoreBackend` interface and the registry of formats, Zarr v3 and WebDataset).

On disk (STORE is a directory):

    STORE/store.json          {"layout": "geovr-teacher-cache", "layout_version", "format": "zarr"|"wds",
                               "fingerprint": `StoreFingerprint.to_json()`, "fingerprint_digest",
                               "codecs": `CodecConfig.to_dict()`}
    STORE/zarr.json           (Zarr only) the root group; each output shard is a child group
    STORE/<shard_id>/         (Zarr) one output shard, see `backends.zarr_backend`
    STORE/<shard_id>.tar      (WebDataset) one output shard, see `backends.wds_backend`
    STORE/<shard_id>.r<N>/, STORE/<shard_id>.r<N>.tar   revision N >= 1 of a replaced shard
    STORE/_done/<shard_id>.json   the done marker: its presence commits the shard
    STORE/_tmp/               shards and markers being written
    STORE/_lease.json         the writing run's lease, see `lease` (absent when no run writes)
    STORE/run.json, STORE/failures.jsonl   written at the end of each precompute run (`records`); part of no shard

Writers: one run at a time per store, holding the store lease (`lease`, `STORE/_lease.json`):
precompute, precompute --retry-failed and `cache convert` into a store take it for their whole run;
a second run is refused with a line naming the holder. `open_writer` takes the lease itself, or
joins the lease its caller holds (`lease=`), or, in another process of the same run (a Ray write
task), checks the run's token (`lease_token=`). Within the run, one writer per shard id.

Commit protocol: the shard is written whole under `_tmp/`, its files are fsynced and checksummed,
it is renamed to its final name, the writer checks that its run still holds the lease (fencing: a
run whose lease was taken over commits nothing more), and the done marker (per-clip status, frame
counts, bytes per field, sha256 of every file) is written to `_tmp/` and renamed into `_done/`
last. A writer killed at any point leaves either no marker (the shard does not exist for readers,
`verify` and resume, and is rewritten by the next `write_shard`) or a complete shard. Readers list
shards by marker only.

Replacing a committed shard (`replace=True`, precompute's --retry-failed) writes the new version as
the next revision beside the old one, under its own name, and commits it by renaming its marker
over the old marker (one atomic step). A kill at any point leaves the old or the new version
committed, never neither. The replaced revision is NOT deleted then: a reader that read the old
marker a moment earlier is about to open it. Superseded revisions are deleted by the next run that
takes the lease, once superseded for at least `REVISION_GRACE_S` (the marker's mtime is the moment
of the last replacement). Why then: a new lease means no writer of this store is active, so no
new marker can appear during the cleanup, and the grace period covers readers that read a marker
just before. A reader that still finds its revision gone (a job that opened the store before an
earlier replacement) re-reads the marker and opens the revision it names now (`StoreReader`), so
readers see the old version or the new one, never a missing shard. The same cleanup removes what
killed writers left in `_tmp/`. An unreferenced revision left by a kill is reported by `verify` and
replaced by the next write of that shard.

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
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from geovr.teacher_cache.backends import FORMATS, get_backend
from geovr.teacher_cache.backends.base import ShardReader
from geovr.teacher_cache.clip_index import ClipIndex
from geovr.teacher_cache.codecs import CODEC_VERSION, CodecConfig, EncodedClip, decode_clip, encode_clip
from geovr.teacher_cache.lease import LEASE_FILE, StoreLease, acquire_lease, check_lease
from geovr.teacher_cache.records import ClipFailure
from geovr.teacher_cache.schema import (
    SCHEMA_VERSION,
    ClipLabels,
    DamagedClipError,
    DamagedShardError,
    SchemaError,
    StoreFingerprint,
    dict_differences,
)

LAYOUT = "geovr-teacher-cache"
# 2: a checksum in every Zarr chunk and every chunk written, a checksum for every tar member. 1 is
# read by `cache convert` only.
LAYOUT_VERSION = 2
OLD_LAYOUT_VERSIONS = (1,)
STORE_JSON = "store.json"
DONE_DIR = "_done"
TMP_DIR = "_tmp"
# A superseded revision is deleted by the next writer run at least this long after the replacement.
REVISION_GRACE_S = 3600.0
# Shard readers a `StoreReader` keeps open (LRU); `data.open_shards` sets it for training.
MAX_OPEN_SHARDS = 64
_SHARD_ID = re.compile(r"^[0-9A-Za-z_-]+$")
_SHARD_NAME = re.compile(r"^(?P<id>[0-9A-Za-z_-]+?)(?:\.r(?P<revision>[0-9]+))?$")


def shard_path(root: Path, store_format: str, shard_id: str, revision: int = 0) -> Path:
    """Final path of a shard's revision: its name plus the backend's suffix (a Zarr directory, a tar)."""
    name = shard_id if revision == 0 else f"{shard_id}.r{revision}"
    return root / (name + get_backend(store_format).suffix)


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
    """Writes whole shards into one store; see the module docstring for the lease and the commit protocol.

    `lease_token`: the token of the run's store lease, checked before every commit. `owned_lease`:
    a lease `open_writer` took for this writer, given up by `close()` (or leaving a `with` block).
    """

    def __init__(
        self,
        root: Path,
        fingerprint: StoreFingerprint,
        store_format: str,
        codecs: CodecConfig,
        lease_token: str,
        owned_lease: StoreLease | None = None,
    ):
        self.root = root
        self.fingerprint = fingerprint
        self.format = store_format
        self.codecs = codecs
        self.lease_token = lease_token
        self._owned_lease = owned_lease

    def close(self) -> None:
        if self._owned_lease is not None:
            self._owned_lease.release()
            self._owned_lease = None

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def committed_shards(self) -> set[str]:
        return set(committed_shard_ids(self.root))

    def is_committed(self, shard_id: str) -> bool:
        """One file check (listing every marker of a large store per shard written would not scale)."""
        return (self.root / DONE_DIR / f"{shard_id}.json").is_file()

    def write_shard(
        self, shard_id: str, clips: list[ClipLabels], failures: list[ClipFailure], replace: bool = False
    ) -> dict[str, Any]:
        """Encode and commit one shard. A clip that fails validation or encoding becomes a failure
        (stage "encode"). `replace`: see `write_encoded_shard`. Returns the marker."""
        encoded: list[EncodedClip] = []
        failures = list(failures)
        for clip in clips:
            try:
                encoded.append(encode_clip(clip, self.codecs))
            except SchemaError as err:
                failures.append(ClipFailure(clip.clip_id, clip.video, "encode", str(err)))
        return self.write_encoded_shard(shard_id, encoded, failures, replace)

    def write_encoded_shard(
        self, shard_id: str, clips: list[EncodedClip], failures: list[ClipFailure], replace: bool = False
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
        for failure in failures:
            if not isinstance(failure, ClipFailure):
                raise TypeError(f"shard {shard_id}: failure {failure!r} is not a ClipFailure")

        revision = 0 if previous is None else int(previous.get("revision", 0)) + 1
        final = shard_path(self.root, self.format, shard_id, revision)
        tmp = self.root / TMP_DIR / f"{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        files: dict[str, dict[str, Any]] = {}
        try:
            written = get_backend(self.format).write_shard(tmp, clips, self.codecs.zstd_level)
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
        check_lease(self.root, self.lease_token)  # fencing: a run that lost the lease commits nothing

        rows: list[dict[str, Any]] = [
            {"video": c.video, "status": "ok", **row} for c, row in zip(clips, written["clips"], strict=True)
        ]
        rows += [{"status": "failed", **failure.to_row()} for failure in failures]
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
        # A replaced revision stays until a later run's cleanup (`collect_garbage`): readers may hold
        # the old marker.
        return marker


def open_writer(
    path: str | Path,
    fingerprint: StoreFingerprint,
    format: str,
    codecs: CodecConfig | None = None,
    lease: StoreLease | None = None,
    lease_token: str | None = None,
) -> StoreWriter:
    """Create a store or open an existing one for more shards (resume).

    The store lease (module docstring): `lease`, held by the caller for its run; else `lease_token`,
    the token of the lease another process of the run holds (checked now and before every commit);
    else the writer takes the lease itself (`StoreLeaseError` when another run holds it) and gives
    it up on `close()`. The first writer under a newly taken lease removes what killed writers left
    and the revisions superseded long enough ago (`collect_garbage`).

    Codec settings: `codecs`, else `fingerprint.preprocess["codecs"]` when present; a new store
    without either gets the defaults, an existing one keeps its own (so that a resume under newer
    code defaults still matches). Raises `SchemaError` when the existing store has another
    fingerprint (the message names each differing key with both values), format, or codec settings
    than requested.
    """
    get_backend(format)  # a format without a backend: ValueError naming the known ones
    if codecs is None and "codecs" in fingerprint.preprocess:
        codecs = CodecConfig.from_dict(fingerprint.preprocess["codecs"], where="fingerprint.preprocess")
    if codecs is not None:
        codecs.validate()
    root = Path(path)
    owned = None
    if lease_token is not None:
        check_lease(root, lease_token)
    elif lease is None:
        owned = lease = acquire_lease(root, "store writer")
    try:
        meta = _open_for_writing(root, fingerprint, format, codecs)
        if lease is not None and lease.cleanup_pending:
            collect_garbage(root, format)
            lease.cleanup_pending = False
    except BaseException:
        if owned is not None:
            owned.release()
        raise
    token = lease.token if lease is not None else lease_token
    return StoreWriter(root, fingerprint, format, meta["codecs"], token, owned)  # type: ignore[arg-type]


def _open_for_writing(
    root: Path, fingerprint: StoreFingerprint, format: str, codecs: CodecConfig | None
) -> dict[str, Any]:
    """store.json of `root` (the store is created when absent), refused when its settings differ."""
    if not (root / STORE_JSON).exists():
        ours = (TMP_DIR, DONE_DIR, LEASE_FILE)
        if root.exists() and any(not p.name.startswith(ours) for p in root.iterdir()):
            raise ValueError(
                f"{root}: exists, is not empty and has no {STORE_JSON}; refusing to write a store there"
            )
        _create_store(root, fingerprint, format, codecs or CodecConfig())

    meta = read_store_json(root)
    problems = meta["fingerprint"].differences(fingerprint)
    if meta["format"] != format:
        problems.append(f"format: {meta['format']!r} != {format!r}")
    if codecs is not None and meta["codecs"] != codecs:
        problems += [f"codecs.{d}" for d in dict_differences(meta["codecs"].to_dict(), codecs.to_dict())]
    if problems:
        raise SchemaError(
            f"{root}: the store was written with other settings (the store's != this run's); refusing to "
            f"add shards: {'; '.join(problems)}"
        )
    return meta


def collect_garbage(root: Path, store_format: str, grace_s: float = REVISION_GRACE_S) -> None:
    """Delete killed writers' temporaries and the revisions superseded at least `grace_s` ago.

    Only under a newly taken lease (`open_writer` calls it): no writer of this store is active, so
    nothing in `_tmp/` is in use and no marker moves meanwhile. One listing of the store root; a
    marker is read only for shards with more than one revision present.
    """
    tmp = root / TMP_DIR
    if tmp.is_dir():
        for entry in tmp.iterdir():
            _remove(entry)
    suffix = get_backend(store_format).suffix
    revisions: dict[str, list[tuple[int, Path]]] = {}
    for entry in root.iterdir():
        stem = entry.name[: len(entry.name) - len(suffix)] if entry.name.endswith(suffix) else None
        match = _SHARD_NAME.match(stem) if stem is not None else None
        if entry.name in (TMP_DIR, DONE_DIR) or match is None:
            continue
        revisions.setdefault(match["id"], []).append((int(match["revision"] or 0), entry))
    now = time.time()
    for shard_id, found in revisions.items():
        marker_path = root / DONE_DIR / f"{shard_id}.json"
        if len(found) < 2 or not marker_path.is_file():
            continue
        try:
            committed = int(read_marker(root, shard_id).get("revision", 0))
            replaced_at = marker_path.stat().st_mtime
        except (OSError, SchemaError):
            continue
        if now - replaced_at >= grace_s:
            for revision, entry in found:
                if revision < committed:
                    _remove(entry)


def _create_store(root: Path, fingerprint: StoreFingerprint, store_format: str, codecs: CodecConfig) -> None:
    for sub in (TMP_DIR, DONE_DIR):
        (root / sub).mkdir(parents=True, exist_ok=True)
    get_backend(store_format).create_store(root, {"layout": LAYOUT})
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


def open_shard_reader(
    root: Path, store_format: str, shard_id: str, marker: dict[str, Any], integrity: bool = True
) -> ShardReader:
    """Reader of one committed shard (`.read(clip_id)`, `.iter_checked()`; iteration streams its clips
    in order). `integrity`: the store's layout has checksums (False for layout 1). Raises
    `DamagedShardError` when the shard's data is missing or its metadata damaged."""
    path = committed_shard_path(root, store_format, shard_id, marker)
    if not path.exists():
        raise DamagedShardError(root, shard_id, "shard", f"committed shard data {path.name} is missing")
    return get_backend(store_format).open_reader(path, str(root), shard_id, marker, integrity)


class StoreReader:
    """Reads committed shards of one store (see `open_store`).

    The done markers are read once, into the compact `ClipIndex`; a pickled reader (a DataLoader
    worker's) carries that index and no open shard. Open shard readers are kept in an LRU cache of
    at most `max_open_shards` (each costs about 100 KB on Zarr), so a process that touches every
    shard of a large store stays bounded.
    """

    def __init__(self, root: Path, old_layout_ok: bool = False, max_open_shards: int = MAX_OPEN_SHARDS):
        if max_open_shards < 1:
            raise ValueError(f"max_open_shards must be >= 1, got {max_open_shards}")
        self.root = root
        meta = read_store_json(root, old_layout_ok)
        self.fingerprint: StoreFingerprint = meta["fingerprint"]
        self.format: str = meta["format"]
        self.codecs: CodecConfig = meta["codecs"]
        self.integrity = meta["layout_version"] == LAYOUT_VERSION
        self.max_open_shards = max_open_shards
        digest = self.fingerprint.digest()
        self.index = ClipIndex(
            ((shard_id, self._checked_marker(shard_id, digest)) for shard_id in committed_shard_ids(root)),
            get_backend(self.format).reader_marker,
        )
        self._readers: OrderedDict[str, ShardReader] = OrderedDict()

    def _checked_marker(self, shard_id: str, digest: str) -> dict[str, Any]:
        marker = read_marker(self.root, shard_id)
        if marker.get("schema_version") != SCHEMA_VERSION:
            raise SchemaError(
                f"{self.root}: shard {shard_id} was written with schema version {marker.get('schema_version')}, "
                f"this code reads {SCHEMA_VERSION}"
            )
        if marker.get("fingerprint_digest") != digest:
            raise SchemaError(f"{self.root}: shard {shard_id} was written under another fingerprint")
        return marker

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without open shards (a DataLoader worker opens its own)."""
        return {**self.__dict__, "_readers": OrderedDict()}

    def detached(self) -> StoreReader:
        """A reader of the same store sharing this one's clip index, with no open shard: what a
        loader worker opens (pickled with it, so no worker reads a marker)."""
        copy = object.__new__(StoreReader)
        copy.__dict__.update(self.__getstate__())
        return copy

    def shards(self) -> list[str]:
        return list(self.index.shard_ids)

    def clip_ids(self) -> list[str]:
        return self.index.clip_ids()

    def shard_clip_ids(self, shard_id: str) -> list[str]:
        """The shard's stored clip ids in order (its failed clips are in `failures()`)."""
        return self.index.shard_clip_ids(shard_id)

    def read_marker(self, shard_id: str) -> dict[str, Any]:
        """The shard's whole done marker, read from disk now (the reader keeps only `index`)."""
        if shard_id not in self.index:
            raise KeyError(f"{self.root}: no committed shard {shard_id!r}")
        return read_marker(self.root, shard_id)

    def failures(self) -> list[dict[str, Any]]:
        """Failure rows of every committed shard: {"clip_id", "video", "stage", "reason", "shard_id"}."""
        return [dict(row) for row in self.index.failures]

    def shard_reader(self, shard_id: str) -> ShardReader:
        if shard_id not in self.index:
            raise KeyError(f"{self.root}: no committed shard {shard_id!r}")
        reader = self._readers.get(shard_id)
        if reader is not None:
            self._readers.move_to_end(shard_id)
            return reader
        try:
            reader = self._open_shard(shard_id)
        except DamagedShardError:
            if not self._marker_moved(shard_id):
                raise
            reader = self._open_shard(shard_id)
        self._readers[shard_id] = reader
        while len(self._readers) > self.max_open_shards:
            self._readers.popitem(last=False)
        return reader

    def _open_shard(self, shard_id: str) -> ShardReader:
        marker = self.index.reader_marker(shard_id)
        return open_shard_reader(self.root, self.format, shard_id, marker, self.integrity)

    def _marker_moved(self, shard_id: str) -> bool:
        """Re-read the shard's marker; True (and this reader follows it) when a replacement committed
        another revision since it was read: the revision read so far may be deleted (module docstring)."""
        try:
            marker = read_marker(self.root, shard_id)
        except (OSError, SchemaError):
            return False
        if int(marker.get("revision", 0)) == self.index.revision(shard_id):
            return False
        self.index.update(shard_id, marker)
        self._readers.pop(shard_id, None)
        return True

    def read_encoded(self, clip_id: str) -> EncodedClip:
        """The clip as stored; `DamagedClipError` when its data is missing or fails a check."""
        shard_id = self.index.shard_of(clip_id)
        if shard_id is None:
            raise KeyError(f"{self.root}: no clip {clip_id!r} in the committed shards")
        try:
            return self._read_current(shard_id, clip_id)
        except DamagedClipError:
            if not self._marker_moved(shard_id):
                raise
            return self._read_current(shard_id, clip_id)

    def _read_current(self, shard_id: str, clip_id: str) -> EncodedClip:
        try:
            reader = self.shard_reader(shard_id)
        except DamagedShardError as err:
            raise err.for_clip(clip_id) from None
        if not reader.path.exists():  # one stat: a revision deleted under an open reader
            raise DamagedClipError(
                self.root, shard_id, clip_id, "shard", f"shard data {reader.path.name} is missing"
            )
        return reader.read(clip_id)

    def read_clip(self, clip_id: str) -> ClipLabels:
        return decode_clip(self.read_encoded(clip_id))

    def iter_shard_checked(self, shard_id: str) -> Iterator[EncodedClip | DamagedClipError]:
        """The shard's stored clips in order, each as the clip or the `DamagedClipError` saying why it
        cannot be read; damage to one clip does not end the iteration (training skips and counts).
        A revision replaced and deleted mid-stream is followed into the one committed now."""
        seen: set[str] = set()
        for item in self._iter_current(shard_id):
            if isinstance(item, DamagedClipError) and self._marker_moved(shard_id):
                yield from (c for c in self._iter_current(shard_id) if c.clip_id not in seen)
                return
            seen.add(item.clip_id)
            yield item

    def _iter_current(self, shard_id: str) -> Iterator[EncodedClip | DamagedClipError]:
        rows = self.index.shard_clip_ids(shard_id)
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


def iter_committed_shard(root: Path, shard_id: str) -> Iterator[EncodedClip]:
    """The stored clips of one committed shard in order, from store.json and that shard's marker only:
    rewriting one shard (precompute --retry-failed) costs the same in a store of any size. Raises
    `SchemaError` for another schema version or fingerprint, `DamagedClipError` at a damaged clip."""
    meta = read_store_json(root)
    marker = read_marker(root, shard_id)
    if (
        marker.get("schema_version") != SCHEMA_VERSION
        or marker.get("fingerprint_digest") != meta["fingerprint"].digest()
    ):
        raise SchemaError(f"{root}: shard {shard_id} was written under another schema or fingerprint")
    try:
        reader = open_shard_reader(root, meta["format"], shard_id, marker)
    except DamagedShardError as err:
        raise err.for_clip(next((r["clip_id"] for r in marker["clips"]), "?")) from None
    yield from reader


def open_store(
    path: str | Path, old_layout_ok: bool = False, max_open_shards: int = MAX_OPEN_SHARDS
) -> StoreReader:
    """Open a store for reading (format from store.json; `SchemaError` for another schema version or,
    unless `old_layout_ok`, an old layout). `max_open_shards`: shard readers kept open (LRU)."""
    return StoreReader(Path(path), old_layout_ok, max_open_shards)
