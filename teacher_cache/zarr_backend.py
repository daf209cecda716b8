"""Zarr v3 backend: one group per output shard, arrays stacked along frames, one Zarr shard per array.

Layout of one output shard (a directory, written whole by one writer under a temporary name; the
commit logic is in `store`):

    <shard>/zarr.json                 group; attributes["geovr_clips"] = the clip index, one row per
                                      clip in write order: {clip_id, video, meta, geometry,
                                      clip_index, frame_offset, num_frames}; consolidated metadata
    <shard>/<geometry>/               one subgroup per label geometry (`EncodedClip.geometry`, e.g.
                                      "d196x252_f4x14x18x1024k8"; a corpus of one video size has one)
        <frame array>                 (F, ...) every per-frame array of `codecs.FRAME_ARRAYS`, the F
                                      frames of the subgroup's clips stacked in order; inner chunks
                                      of `ROWS_PER_CHUNK` frames, zstd
        <clip array>                  (N, ...) every per-clip array of `codecs.CLIP_ARRAYS`
        frame_offsets                 (N + 1,) int64: clip n holds frames [offsets[n], offsets[n+1])
        jpeg_bytes, jpeg_offsets      (B,) uint8 concatenated JPEG frames (no compression), and
                                      (F + 1,) int64 byte offsets of each frame

Every array uses the sharding codec with a shard covering the whole array, so each array is one
file (plus its zarr.json) written in a single call: Zarr loses data silently when two writers share
a shard, and a shard interrupted mid-write has no index; whole-shard writes by one writer avoid both.
Reading one clip reads the shard index and the inner chunks that overlap the clip only.
"""

from __future__ import annotations

import asyncio
import itertools
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs
from zarr.core.sync import sync
from zarr.storage import LocalStore

from geovr.teacher_cache.codecs import CLIP_ARRAYS, FRAME_ARRAYS, EncodedClip, field_of
from geovr.teacher_cache.schema import SchemaError

CLIP_INDEX_ATTR = "geovr_clips"
JPEG_CHUNK_BYTES = 1 << 20
# Inner chunk of 8 frames: a 32-frame clip reads 4-5 chunks; one-frame chunks cost twice the CPU
# per clip read in zarr's per-chunk overhead (measured with bench/cache_footprint.py).
ROWS_PER_CHUNK = 8

_FRAME_ARRAY_NAMES = tuple(n for group in FRAME_ARRAYS.values() for n in group)
_CLIP_ARRAY_NAMES = tuple(n for group in CLIP_ARRAYS.values() for n in group)


def _consolidate(store: LocalStore) -> None:
    with warnings.catch_warnings():
        # zarr warns that consolidated metadata is not (yet) in the v3 spec; we read it back ourselves.
        warnings.simplefilter("ignore", UserWarning)
        zarr.consolidate_metadata(store)


def _write_array(group: zarr.Group, name: str, data: np.ndarray, compress: bool, zstd_level: int) -> None:
    """One array as one Zarr shard, inner chunks of `ROWS_PER_CHUNK` rows along the first axis."""
    rows = min(ROWS_PER_CHUNK, max(1, data.shape[0]))
    chunks = (rows, *(max(1, d) for d in data.shape[1:]))
    shards = (-(-max(1, data.shape[0]) // rows) * rows, *chunks[1:])
    compressors = zarr.codecs.ZstdCodec(level=zstd_level) if compress else None
    group.create_array(name, data=data, chunks=chunks, shards=shards, compressors=compressors, fill_value=0)


def write_shard(path: Path, clips: list[EncodedClip], zstd_level: int) -> dict[str, Any]:
    """Write `clips` as a new Zarr group at `path` (a temporary directory of the caller).

    Returns {"clips": [{"clip_id", "num_frames", "location": {geometry, clip_index, frame_offset}}],
    "bytes": {field: bytes on disk}} with fields as `codecs.FIELDS` plus "metadata".
    """
    store = LocalStore(path)
    root = zarr.create_group(store=store, zarr_format=3)
    by_geometry: dict[str, list[EncodedClip]] = {}
    for clip in clips:
        by_geometry.setdefault(clip.geometry(), []).append(clip)

    index: list[dict[str, Any]] = []
    for geometry, members in by_geometry.items():
        group = root.create_group(geometry)
        frame_counts = [c.num_frames for c in members]
        frame_offsets = np.concatenate([[0], np.cumsum(frame_counts)]).astype(np.int64)
        for name in _FRAME_ARRAY_NAMES:
            _write_array(group, name, np.concatenate([c.arrays[name] for c in members]), True, zstd_level)
        for name in _CLIP_ARRAY_NAMES:
            _write_array(group, name, np.stack([c.arrays[name] for c in members]), True, zstd_level)
        _write_array(group, "frame_offsets", frame_offsets, True, zstd_level)

        frames = [f for c in members for f in c.frames_jpeg]
        jpeg_offsets = np.concatenate([[0], np.cumsum([len(f) for f in frames])]).astype(np.int64)
        jpeg_bytes = np.frombuffer(b"".join(frames), dtype=np.uint8)
        # Equal chunks of at most JPEG_CHUNK_BYTES: the last one is padded by a few bytes only.
        num_chunks = -(-len(jpeg_bytes) // JPEG_CHUNK_BYTES)
        chunk = -(-len(jpeg_bytes) // num_chunks)
        group.create_array(
            "jpeg_bytes",
            data=jpeg_bytes,
            chunks=(chunk,),
            shards=(num_chunks * chunk,),
            compressors=None,
            fill_value=0,
        )
        _write_array(group, "jpeg_offsets", jpeg_offsets, True, zstd_level)

        for n, clip in enumerate(members):
            index.append(
                {
                    "clip_id": clip.clip_id,
                    "video": clip.video,
                    "meta": clip.meta,
                    "num_frames": clip.num_frames,
                    "geometry": geometry,
                    "clip_index": n,
                    "frame_offset": int(frame_offsets[n]),
                }
            )
    order = {c.clip_id: i for i, c in enumerate(clips)}
    index.sort(key=lambda row: order[row["clip_id"]])
    root.attrs[CLIP_INDEX_ATTR] = index
    _consolidate(store)

    return {
        "clips": [
            {
                "clip_id": row["clip_id"],
                "num_frames": row["num_frames"],
                "location": {k: row[k] for k in ("geometry", "clip_index", "frame_offset")},
            }
            for row in index
        ],
        "bytes": _bytes_by_field(path),
    }


def _bytes_by_field(path: Path) -> dict[str, int]:
    """Bytes on disk of the shard by field; zarr.json files and offset arrays count as metadata."""
    totals: dict[str, int] = {}
    for file in path.rglob("*"):
        if not file.is_file():
            continue
        parts = file.relative_to(path).parts
        if file.name == "zarr.json" or len(parts) < 3:
            name = "metadata"
        elif parts[1] in ("jpeg_bytes", "jpeg_offsets"):
            name = "frames_jpeg"
        elif parts[1] == "frame_offsets":
            name = "metadata"
        else:
            name = field_of(parts[1])
        totals[name] = totals.get(name, 0) + file.stat().st_size
    return totals


async def _read_clip_arrays(
    group: dict[str, zarr.Array], start: int, stop: int, clip_index: int
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Frames [start, stop) of the per-frame arrays, row `clip_index` of the per-clip arrays, the
    JPEG offsets, then the JPEG bytes they delimit."""
    reads = [group[name].async_array.getitem(slice(start, stop)) for name in _FRAME_ARRAY_NAMES]
    reads += [group[name].async_array.getitem(clip_index) for name in _CLIP_ARRAY_NAMES]
    reads.append(group["jpeg_offsets"].async_array.getitem(slice(start, stop + 1)))
    *values, offsets = await asyncio.gather(*reads)
    data = await group["jpeg_bytes"].async_array.getitem(slice(int(offsets[0]), int(offsets[-1])))
    arrays = dict(zip(_FRAME_ARRAY_NAMES + _CLIP_ARRAY_NAMES, (np.asarray(v) for v in values), strict=True))
    return arrays, offsets, data


class ZarrShardReader:
    """Reads clips of one committed shard by index row or in order."""

    def __init__(self, path: Path):
        self.path = path
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self.root = zarr.open_group(
                store=LocalStore(path, read_only=True), mode="r", zarr_format=3, use_consolidated=True
            )
        try:
            rows = self.root.attrs[CLIP_INDEX_ATTR]
        except KeyError:
            raise SchemaError(
                f"{path}: Zarr shard without the clip index attribute {CLIP_INDEX_ATTR!r}"
            ) from None
        self.rows: dict[str, dict[str, Any]] = {row["clip_id"]: row for row in rows}
        self._arrays: dict[str, dict[str, zarr.Array]] = {}

    def _geometry_arrays(self, geometry: str) -> dict[str, zarr.Array]:
        """The arrays of one geometry subgroup, opened once (opening costs a few ms each)."""
        if geometry not in self._arrays:
            group = self.root[geometry]
            self._arrays[geometry] = {name: array for name, array in group.arrays()}
        return self._arrays[geometry]

    def clip_ids(self) -> list[str]:
        return list(self.rows)

    def read(self, clip_id: str) -> EncodedClip:
        row = self.rows[clip_id]
        group = self._geometry_arrays(row["geometry"])
        start, stop = row["frame_offset"], row["frame_offset"] + row["num_frames"]
        # One round trip into zarr's event loop for all arrays of the clip instead of one per array:
        # about a quarter less time per clip read (bench/cache_footprint.py).
        arrays, offsets, data = sync(_read_clip_arrays(group, start, stop, row["clip_index"]))
        data = data.tobytes()
        base = int(offsets[0])
        frames = [data[int(a) - base : int(b) - base] for a, b in itertools.pairwise(offsets)]
        return EncodedClip(
            clip_id=clip_id, video=row["video"], meta=row["meta"], frames_jpeg=frames, arrays=arrays
        )

    def __iter__(self) -> Iterator[EncodedClip]:
        for clip_id in self.rows:
            yield self.read(clip_id)
