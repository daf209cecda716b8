"""`convert_store`: copy a store into the other backend without re-quantising anything.

The encoded arrays (int8 features with their scales, log-quantised depth and confidence, lossless
cameras, JPEG bytes) are read and written as they are; only the lossless zstd layer is redone. So a
converted store decodes to exactly the same float32 labels as its source, and converting back and
forth never compounds error. Shards keep their ids and failure rows; a shard already committed in
the destination is skipped, so an interrupted conversion resumes. The conversion holds the
destination's store lease (`lease`): it is refused while another run writes there. A source of an
old store layout (no checksums) is read as it is and written in the current layout: the way to
upgrade a store without re-running precompute. A damaged source clip stops the conversion with its
one-line `DamagedClipError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from geovr.teacher_cache.records import ClipFailure
from geovr.teacher_cache.store import open_store, open_writer


def convert_store(src: str | Path, dst: str | Path, format: str) -> dict[str, Any]:
    """Write every committed shard of `src` into the store `dst` in `format` ("zarr" or "wds").

    Returns {"shards_written", "shards_skipped", "clips"}.
    """
    if Path(src).resolve() == Path(dst).resolve():
        raise ValueError(f"convert: source and destination are the same store ({src})")
    reader = open_store(src, old_layout_ok=True)
    summary = {"shards_written": 0, "shards_skipped": 0, "clips": 0}
    # The writer holds the destination's store lease until the end: one writer run per store.
    with open_writer(dst, reader.fingerprint, format, codecs=reader.codecs) as writer:
        done = writer.committed_shards()
        for shard_id in reader.shards():
            if shard_id in done:
                summary["shards_skipped"] += 1
                continue
            clips = list(reader.iter_shard_encoded(shard_id))
            failures = [
                ClipFailure.from_row(row)
                for row in reader.read_marker(shard_id)["clips"]
                if row["status"] == "failed"
            ]
            writer.write_encoded_shard(shard_id, clips, failures)
            summary["shards_written"] += 1
            summary["clips"] += len(clips)
    return summary


def copy_clips(src: str | Path, dst: str | Path, clip_ids: list[str], clips_per_shard: int) -> int:
    """Copy the clips `clip_ids` of `src` into a new store `dst` of the same format, fingerprint and
    codecs, as encoded (no re-quantisation: the copy decodes to exactly the same labels),
    `clips_per_shard` per shard in the given order, shards "000000", "000001", ...: a subset of a
    store (the demo's held-out clips for `eval geometry`). Returns the number of clips copied."""
    if Path(src).resolve() == Path(dst).resolve():
        raise ValueError(f"copy: source and destination are the same store ({src})")
    reader = open_store(src)
    with open_writer(dst, reader.fingerprint, reader.format, codecs=reader.codecs) as writer:
        for index in range(0, len(clip_ids), clips_per_shard):
            encoded = [reader.read_encoded(c) for c in clip_ids[index : index + clips_per_shard]]
            writer.write_encoded_shard(f"{index // clips_per_shard:06d}", encoded, [])
    return len(clip_ids)
