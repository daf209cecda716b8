"""WebDataset backend: one tar per output shard, one sample per clip, no pickle anywhere.

Members of the sample of clip <id> (the WebDataset key is the clip id), in this order:

    <id>.json                        {"clip_id", "video", "meta", "num_frames"}
    <id>.cameras.safetensors         frame_indices, timestamps, pose_enc, extrinsic, intrinsic, scale,
                                     scale_valid (lossless, uncompressed: a few hundred bytes a frame)
    <id>.features.safetensors.zst    the encoded feature arrays (`codecs.FRAME_ARRAYS["features"]`,
                                     `codecs.CLIP_ARRAYS["features"]`) as safetensors, zstd-compressed
    <id>.depth.safetensors.zst       depth_q, depth_log_range
    <id>.depth_conf.safetensors.zst  conf_q, conf_log_range
    <id>.0000.jpg ... <id>.NNNN.jpg  the JPEG frames as given

The tar is written with `tarfile` to a temporary name chosen by `store` (WebDataset's ShardWriter
writes to the final name). Streaming uses `webdataset.WebDataset`; reading one clip by id reads
the sample's byte span, recorded in the shard's done marker, and parses its tar headers in memory.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import safetensors.numpy

from geovr.teacher_cache.codecs import CLIP_ARRAYS, FRAME_ARRAYS, EncodedClip
from geovr.teacher_cache.schema import SchemaError

COMPRESSED_FIELDS = ("features", "depth", "depth_conf")


def _field_arrays(name: str) -> tuple[str, ...]:
    return FRAME_ARRAYS[name] + CLIP_ARRAYS.get(name, ())


def _members(clip: EncodedClip, zstd: numcodecs.Zstd) -> list[tuple[str, str, bytes]]:
    """(suffix, field, payload) of every member of the clip's sample."""
    header = {"clip_id": clip.clip_id, "video": clip.video, "meta": clip.meta, "num_frames": clip.num_frames}
    members = [("json", "metadata", json.dumps(header).encode())]
    cameras = {n: clip.arrays[n] for n in _field_arrays("cameras")}
    members.append(("cameras.safetensors", "cameras", safetensors.numpy.save(cameras)))
    for name in COMPRESSED_FIELDS:
        payload = safetensors.numpy.save(
            {n: np.ascontiguousarray(clip.arrays[n]) for n in _field_arrays(name)}
        )
        members.append((f"{name}.safetensors.zst", name, bytes(zstd.encode(payload))))
    members.extend((f"{i:04d}.jpg", "frames_jpeg", frame) for i, frame in enumerate(clip.frames_jpeg))
    return members


def write_shard(path: Path, clips: list[EncodedClip], zstd_level: int) -> dict[str, Any]:
    """Write `clips` as a tar at `path` (a temporary name of the caller).

    Returns {"clips": [{"clip_id", "num_frames", "location": {"span": [start, end]}}] (the sample's
    byte range in the tar),
    "bytes": {field: bytes}}; tar headers and padding count as metadata.
    """
    zstd = numcodecs.Zstd(level=zstd_level)
    totals: dict[str, int] = {}
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for clip in clips:
            for suffix, field, payload in _members(clip, zstd):
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
    return {
        "clips": [
            {"clip_id": c.clip_id, "num_frames": c.num_frames, "location": {"span": spans[c.clip_id]}}
            for c in clips
        ],
        "bytes": totals,
    }


def decode_sample(sample: dict[str, bytes], where: str) -> EncodedClip:
    """A sample's members (suffix -> bytes) to the encoded clip; `SchemaError` names `where` on a gap."""
    try:
        header = json.loads(sample["json"])
        arrays = dict(safetensors.numpy.load(sample["cameras.safetensors"]))
        zstd = numcodecs.Zstd()
        for name in COMPRESSED_FIELDS:
            arrays.update(safetensors.numpy.load(bytes(zstd.decode(sample[f"{name}.safetensors.zst"]))))
        frames = [sample[f"{i:04d}.jpg"] for i in range(header["num_frames"])]
    except KeyError as err:
        raise SchemaError(f"{where}: sample lacks member {err}") from None
    return EncodedClip(
        clip_id=header["clip_id"],
        video=header["video"],
        meta=header["meta"],
        frames_jpeg=frames,
        arrays=arrays,
    )


class WdsShardReader:
    """Reads clips of one committed tar shard: by id through the sample spans of the done marker, or
    streamed in order with webdataset."""

    def __init__(self, path: Path, clip_rows: list[dict[str, Any]]):
        self.path = path
        self.rows = {row["clip_id"]: row for row in clip_rows}

    def clip_ids(self) -> list[str]:
        return list(self.rows)

    def read(self, clip_id: str) -> EncodedClip:
        start, end = self.rows[clip_id]["location"]["span"]
        with open(self.path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
        where = f"{self.path} clip {clip_id}"
        sample = {}
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                key, suffix = info.name.split(".", 1)
                if key != clip_id or not info.isfile():
                    raise SchemaError(f"{where}: unexpected member {info.name} in the sample's byte range")
                sample[suffix] = tar.extractfile(info).read()
        return decode_sample(sample, where)

    def __iter__(self) -> Iterator[EncodedClip]:
        import webdataset  # imports torch (~2 s); only streaming needs it

        dataset = webdataset.WebDataset(
            [str(self.path)], shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
        )
        for sample in dataset:
            yield decode_sample(sample, f"{self.path} sample {sample.get('__key__')}")
