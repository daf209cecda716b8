"""WebDataset backend: one tar per output shard, one sample per clip, no pickle anywhere.

Members of the sample of clip <id> (the WebDataset key is the clip id), in this order:

    <id>.json                        {"clip_id", "video", "meta", "num_frames", "crc32c": {suffix: crc32c}
                                     of every uncompressed member}
    <id>.cameras.safetensors         frame_indices, timestamps, pose_enc, extrinsic, intrinsic, scale,
                                     scale_valid (lossless, uncompressed: a few hundred bytes a frame)
    <id>.features.safetensors.zst    the encoded feature arrays (`codecs.FRAME_ARRAYS["features"]`,
                                     `codecs.CLIP_ARRAYS["features"]`) as safetensors, zstd-compressed
                                     with zstd's content checksum
    <id>.depth.safetensors.zst       depth_q, depth_log_range
    <id>.depth_conf.safetensors.zst  conf_q, conf_log_range
    <id>.fusion.safetensors.zst      the fusion arrays (`fuse_*`), only in a clip with fusion
                                     features (its header then holds "fusion": true)
    <id>.ground_truth.safetensors.zst  the ground-truth arrays the clip holds (`gt_*`), only in a clip
                                     with ground truth beside the teacher's labels (its header then
                                     holds "ground_truth": true)
    <id>.0000.jpg ... <id>.NNNN.jpg  the JPEG frames as given

The tar is written with `tarfile` to a temporary name chosen by `store` (WebDataset's ShardWriter
writes to the final name). Streaming uses `webdataset.WebDataset`; reading one clip by id reads
the sample's byte span, recorded in the shard's done marker, and parses its tar headers in memory.

Integrity (store layout 2): the sample header (`.json`) holds the crc32c of every uncompressed member
(cameras, JPEG frames), and the clip's row in the done marker holds the crc32c of the header
(`location.header_crc32c`): one number per clip in the marker (which every reader holds in memory),
while a damaged member is still named exactly. The zstd members carry zstd's content checksum
(XXH64 of the decompressed bytes, verified while decompressing: about a third of the cost of a
crc32c pass over the compressed bytes). Both read paths check every member, and a tar that breaks
off (or a sample that is not in it) reports each clip it did not deliver; every failure is a
`DamagedClipError` naming the store, shard, clip and field. Layout-1 shards (no checksums) are read
with `integrity=False`, only to convert them.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import google_crc32c
import numcodecs
import numpy as np
import safetensors.numpy

from geovr.teacher_cache.codecs import CLIP_ARRAYS, FRAME_ARRAYS, EncodedClip, zstd_failure
from geovr.teacher_cache.schema import DamagedClipError

COMPRESSED_FIELDS = ("features", "depth", "depth_conf")


def _compressed_fields(fusion: bool, ground_truth: bool) -> tuple[str, ...]:
    """The zstd members of a sample, in write order; the fusion and ground-truth members only in a
    clip that holds them."""
    return (
        *COMPRESSED_FIELDS,
        *(("fusion",) if fusion else ()),
        *(("ground_truth",) if ground_truth else ()),
    )


def _field_arrays(name: str) -> tuple[str, ...]:
    return FRAME_ARRAYS[name] + CLIP_ARRAYS.get(name, ())


def _field_of_member(suffix: str) -> str:
    """The stored field of a member suffix ("json" -> metadata, "0003.jpg" -> frames_jpeg, ...)."""
    if suffix == "json":
        return "metadata"
    if suffix.endswith(".jpg"):
        return "frames_jpeg"
    return suffix.split(".", 1)[0]


def _members(clip: EncodedClip, zstd: numcodecs.Zstd, integrity: bool) -> list[tuple[str, str, bytes]]:
    """(suffix, field, payload) of every member of the clip's sample, the header first."""
    cameras = {n: clip.arrays[n] for n in _field_arrays("cameras")}
    # In the order of `_suffixes`.
    members = [("cameras.safetensors", "cameras", safetensors.numpy.save(cameras))]
    for name in _compressed_fields(clip.has_fusion, bool(clip.ground_truth_fields)):
        # The ground-truth member holds the arrays of the label fields the clip has.
        payload = safetensors.numpy.save(
            {n: np.require(clip.arrays[n], requirements="C") for n in _field_arrays(name) if n in clip.arrays}
        )
        members.append((f"{name}.safetensors.zst", name, bytes(zstd.encode(payload))))
    members.extend((f"{i:04d}.jpg", "frames_jpeg", frame) for i, frame in enumerate(clip.frames_jpeg))
    header = {"clip_id": clip.clip_id, "video": clip.video, "meta": clip.meta, "num_frames": clip.num_frames}
    if clip.has_fusion:
        header["fusion"] = True
    if clip.ground_truth_fields:
        header["ground_truth"] = True
    if integrity:
        header["crc32c"] = {s: google_crc32c.value(p) for s, _, p in members if not s.endswith(".zst")}
    return [("json", "metadata", json.dumps(header).encode()), *members]


def write_shard(
    path: Path, clips: list[EncodedClip], zstd_level: int, integrity: bool = True
) -> dict[str, Any]:
    """Write `clips` as a tar at `path` (a temporary name of the caller).

    `integrity=False` writes the layout-1 form (no checksums): only the tests of old stores and the
    benchmark's baseline use it.

    Returns {"clips": [{"clip_id", "num_frames", "location": {"span": [start, end], "header_crc32c"}}]
    (the sample's byte range in the tar, the crc32c of its `.json` member; no crc in layout 1),
    "bytes": {field: bytes}}; tar headers and padding count as metadata.
    """
    zstd = numcodecs.Zstd(level=zstd_level, checksum=integrity)
    totals: dict[str, int] = {}
    header_crcs: dict[str, int] = {}
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for clip in clips:
            for suffix, field, payload in _members(clip, zstd, integrity):
                if suffix == "json" and integrity:
                    header_crcs[clip.clip_id] = google_crc32c.value(payload)
                info = tarfile.TarInfo(f"{clip.clip_id}.{suffix}")
                info.size, info.mode, info.mtime = len(payload), 0o444, 0
                tar.addfile(info, io.BytesIO(payload))
                totals[field] = totals.get(field, 0) + len(payload)

    # Each sample's members are contiguous: its byte span [first header, end of last member's
    # padded data) is all a read by id needs (two numbers per clip in the done marker).
    spans: dict[str, list[int]] = {}
    with tarfile.open(path, "r") as tar:
        for info in tar:
            clip_id = info.name.split(".", 1)[0]
            end = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            spans.setdefault(clip_id, [info.offset, end])[1] = end
    totals["metadata"] = totals.get("metadata", 0) + path.stat().st_size - sum(totals.values())
    locations = {c.clip_id: {"span": spans[c.clip_id]} for c in clips}
    for clip_id, crc in header_crcs.items():
        locations[clip_id]["header_crc32c"] = crc
    return {
        "clips": [
            {"clip_id": c.clip_id, "num_frames": c.num_frames, "location": locations[c.clip_id]}
            for c in clips
        ],
        "bytes": totals,
    }


Damaged = Callable[[str, str], DamagedClipError]
"""(field, problem) -> the error naming the store, shard and clip."""


def _suffixes(num_frames: int, fusion: bool = False, ground_truth: bool = False) -> list[str]:
    """Suffixes of a sample's members after its `.json` header, in the order they are written."""
    compressed = [f"{name}.safetensors.zst" for name in _compressed_fields(fusion, ground_truth)]
    return ["cameras.safetensors", *compressed, *(f"{i:04d}.jpg" for i in range(num_frames))]


def _check_members(sample: dict[str, bytes], clip_id: str, header_crc32c: int, damaged: Damaged) -> None:
    """Every member present, the uncompressed ones equal to their crc32c, nothing else in the sample
    (the zstd members are checked as they are decompressed)."""
    if "json" not in sample:
        raise damaged("metadata", f"member {clip_id}.json is missing")
    if google_crc32c.value(sample["json"]) != header_crc32c:
        raise damaged("metadata", f"member {clip_id}.json fails its crc32c checksum")
    header = json.loads(sample["json"])
    suffixes = _suffixes(header["num_frames"], bool(header.get("fusion")), bool(header.get("ground_truth")))
    for suffix in suffixes:
        if suffix not in sample:
            raise damaged(_field_of_member(suffix), f"member {clip_id}.{suffix} is missing")
    for suffix, crc in header["crc32c"].items():
        if google_crc32c.value(sample[suffix]) != crc:
            raise damaged(_field_of_member(suffix), f"member {clip_id}.{suffix} fails its crc32c checksum")
    unexpected = sorted(set(sample) - {"json", *suffixes})
    if unexpected:
        raise damaged("metadata", f"unexpected members {', '.join(unexpected)} in the sample")


def decode_sample(
    sample: dict[str, bytes], clip_id: str, header_crc32c: int | None, damaged: Damaged
) -> EncodedClip:
    """A sample's members (suffix -> bytes) to the encoded clip, every member checked first unless
    `header_crc32c` is None (layout 1). Raises `damaged(field, problem)` (`DamagedClipError`)."""
    sample = {k: v for k, v in sample.items() if not k.startswith("__")}  # webdataset's __key__, __url__
    if header_crc32c is not None:
        _check_members(sample, clip_id, header_crc32c, damaged)
    suffix = "json"
    try:
        header = json.loads(sample[suffix])
        suffix = "cameras.safetensors"
        arrays = dict(safetensors.numpy.load(sample[suffix]))
        zstd = numcodecs.Zstd()
        for name in _compressed_fields(bool(header.get("fusion")), bool(header.get("ground_truth"))):
            suffix = f"{name}.safetensors.zst"
            arrays.update(safetensors.numpy.load(bytes(zstd.decode(sample[suffix]))))
        frames = []
        for i in range(header["num_frames"]):
            suffix = f"{i:04d}.jpg"
            frames.append(sample[suffix])
    except KeyError:
        raise damaged(_field_of_member(suffix), f"member {clip_id}.{suffix} is missing") from None
    except Exception as err:  # a damaged zstd member, or (layout 1) a member that nothing checked
        if (reason := zstd_failure(err)) is not None:
            problem = f"member {clip_id}.{suffix} fails its zstd check ({reason})"
        else:
            problem = f"member {clip_id}.{suffix} cannot be decoded ({type(err).__name__}: {err})"
        raise damaged(_field_of_member(suffix), problem) from None
    return EncodedClip(
        clip_id=header["clip_id"],
        video=header["video"],
        meta=header["meta"],
        frames_jpeg=frames,
        arrays=arrays,
    )


class WdsShardReader:
    """Reads clips of one committed tar shard: by id through the sample spans of the done marker, or
    streamed in order with webdataset.

    Args:
        path: the tar.
        clip_rows: the marker rows of the shard's stored clips ({"clip_id", "location"}).
        store, shard_id: named in `DamagedClipError`.
        integrity: layout 2 (every member checked); False only for layout 1.
    """

    def __init__(
        self, path: Path, clip_rows: list[dict[str, Any]], store: str, shard_id: str, integrity: bool = True
    ):
        self.path = path
        self.rows = {row["clip_id"]: row for row in clip_rows}
        self.store, self.shard_id = store, shard_id
        self.integrity = integrity

    def clip_ids(self) -> list[str]:
        return list(self.rows)

    def _damaged(self, clip_id: str) -> Damaged:
        return lambda field, problem: DamagedClipError(self.store, self.shard_id, clip_id, field, problem)

    def _decode(self, sample: dict[str, bytes], clip_id: str) -> EncodedClip:
        header_crc = self.rows[clip_id]["location"].get("header_crc32c") if self.integrity else None
        if self.integrity and header_crc is None:
            raise self._damaged(clip_id)("metadata", "the done marker has no crc32c of the sample header")
        return decode_sample(sample, clip_id, header_crc, self._damaged(clip_id))

    def read(self, clip_id: str) -> EncodedClip:
        """One clip by its byte span; `DamagedClipError` when the span or a member is damaged."""
        damaged = self._damaged(clip_id)
        start, end = self.rows[clip_id]["location"]["span"]
        try:
            with open(self.path, "rb") as f:
                f.seek(start)
                data = f.read(end - start)
        except OSError as err:
            raise damaged("tar", f"cannot be read ({err})") from None
        if len(data) != end - start:
            raise damaged("tar", f"the tar ends inside the sample's bytes {start}-{end} (truncated)")
        sample = {}
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                for info in tar:
                    key, _, suffix = info.name.partition(".")
                    if key != clip_id or not info.isfile():
                        raise damaged("tar", f"unexpected member {info.name} in the sample's byte range")
                    sample[suffix] = tar.extractfile(info).read()
        except tarfile.TarError as err:
            raise damaged("tar", f"the sample's tar headers cannot be read ({err})") from None
        return self._decode(sample, clip_id)

    def iter_checked(self) -> Iterator[EncodedClip | DamagedClipError]:
        """Stream the tar: every clip of the marker in tar order, or the error that says why it cannot
        be read. A tar that breaks off (truncated, a garbled header) reports each clip not delivered."""
        import webdataset  # imports torch (~2 s); only streaming needs it

        pending = dict(self.rows)
        problem = "the sample is not in the tar"
        dataset = webdataset.WebDataset(
            [str(self.path)], shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
        )
        try:
            for sample in dataset:
                clip_id = sample.get("__key__")
                if pending.pop(clip_id, None) is None:
                    continue  # a key no marker row names: its clip is reported missing below
                try:
                    yield self._decode(sample, clip_id)
                except DamagedClipError as err:
                    yield err
        except (tarfile.TarError, OSError, ValueError) as err:
            # webdataset adds the stream and url to the arguments: keep tarfile's own words
            reason = str(err.args[0]).split(" @ ")[0] if err.args else str(err)
            problem = f"the tar breaks off before the sample ({type(err).__name__}: {reason})"
        for clip_id in pending:
            yield self._damaged(clip_id)("tar", problem)

    def __iter__(self) -> Iterator[EncodedClip]:
        for item in self.iter_checked():
            if isinstance(item, DamagedClipError):
                raise item
            yield item


class WdsBackend:
    """The WebDataset format (`base.StoreBackend`): a shard is one tar, read front to back."""

    name = "wds"
    suffix = ".tar"
    streams = True

    def create_store(self, root: Path, attributes: dict[str, Any]) -> None:
        """Nothing beside store.json."""

    def is_shard(self, entry: Path) -> bool:
        return entry.suffix == ".tar"

    def write_shard(
        self, path: Path, clips: list[EncodedClip], zstd_level: int, integrity: bool = True
    ) -> dict[str, Any]:
        return write_shard(path, clips, zstd_level, integrity)

    def reader_marker(self, marker: dict[str, Any]) -> dict[str, Any]:
        """The stored clips' rows: each sample's byte span and header crc32c."""
        return {
            "clips": [
                {"clip_id": r["clip_id"], "status": "ok", "location": r["location"]}
                for r in marker["clips"]
                if r["status"] == "ok"
            ]
        }

    def open_reader(
        self, path: Path, store: str, shard_id: str, marker: dict[str, Any], integrity: bool
    ) -> WdsShardReader:
        rows = [r for r in marker["clips"] if r["status"] == "ok"]
        return WdsShardReader(path, rows, store, shard_id, integrity)


BACKEND = WdsBackend()
