"""The streaming loader's stages, webdataset style: module-level generator functions, each taking the
stream of the stage before it (curried with `webdataset.filters.pipelinefilter`, so `stage(args)` is
a pipeline stage), composed by `data.StreamingDataset` into a `webdataset.DataPipeline`:

    shard_stages(...)         shard names: resampled per (seed, epoch, rank, worker) stream, or a
                              per-epoch permutation split by node, then by worker (`wds.slice`)
    -> clips_of_shards        each shard's stored clips, or the `DamagedClipError` of one that
                              cannot be read
    -> samples_of_clips       the QA samples joined to each clip
    -> wds.shuffle            a shuffle buffer seeded by the stream
    -> wds.batched            micro-batches
    -> SkipFirst              the micro-batches a resumed run has consumed already
    -> built_batches          decode each clip once, build its samples (a damaged clip's become
                              `DamagedSample`s)

Every stream is a deterministic function of (seed, epoch, rank, worker): the rank and world come
from the trainer's own process group, and `worker` is the stream's index (a DataLoader worker runs
stream (id + consumed) % workers after a resume: `data.StreamingDataset`), so webdataset's own
`split_by_node` / `split_by_worker`, which read RANK / WORLD_SIZE or torch.distributed and the
DataLoader's worker id, would split by the wrong numbers; `wds.slice` takes them as given.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import webdataset as wds
from webdataset.filters import pipelinefilter

from geovr.teacher_cache.codecs import EncodedClip, decode_clip
from geovr.teacher_cache.schema import DamagedClipError


def seed_for(*parts: int) -> int:
    """A 63-bit seed from integers, identical in every process (no Python string hashing)."""
    seed = 0x9E3779B97F4A7C15
    for part in parts:
        seed = (seed * 6364136223846793005 + int(part) + 1442695040888963407) & 0x7FFFFFFFFFFFFFFF
    return seed


def shard_stages(
    shards: Sequence[str],
    resampled: bool,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
) -> list[Any]:
    """The first stages: the shard names (as {"url": name} items) this stream reads.

    Resampled: each (rank, worker) stream draws its own shard sequence with replacement, seeded by
    `seed_for(seed, epoch, rank, worker)` (`wds.ResampledShards`; no splitting needed). Otherwise a
    permutation of the shards per (seed, epoch), every `world_size`-th from `rank`, then every
    `num_workers`-th of those from `worker`.
    """
    stream_seed = seed_for(seed, epoch, rank, worker)
    if resampled:
        return [
            wds.ResampledShards(list(shards), seed=seed, worker_seed=lambda: stream_seed, deterministic=True)
        ]
    order = list(shards)
    random.Random(seed_for(seed, epoch)).shuffle(order)
    return [
        wds.SimpleShardList(order),
        wds.slice(rank, None, world_size),
        wds.slice(worker, None, num_workers),
    ]


def _clips_of_shards(source: Iterator[dict], store: Any) -> Iterator[EncodedClip | DamagedClipError]:
    """Each shard's stored clips in order (`StoreReader.iter_shard_checked`): the clip, or the error
    that says why it cannot be read. Clips stay encoded (quantised features) until a batch is built:
    about 4x less memory in the shuffle buffer, and skipped micro-batches are never decoded."""
    for item in source:
        yield from store.iter_shard_checked(item["url"])


def _samples_of_clips(
    source: Iterator[EncodedClip | DamagedClipError],
    rows_of_clip: dict[str, list[int]],
    samples: Sequence[Any],
) -> Iterator[tuple[Any, EncodedClip | DamagedClipError]]:
    """(QA sample, its clip) for every sample joined to each clip (`samples[row]` for each row of
    `rows_of_clip[clip_id]`); clips without samples are dropped."""
    for clip in source:
        for row in rows_of_clip.get(clip.clip_id, ()):
            yield samples[row], clip


def _built_batches(
    source: Iterator[list[tuple[Any, EncodedClip | DamagedClipError]]],
    build: Callable[[Any, Any], Any],
    damaged: Callable[[Any, DamagedClipError], Any],
) -> Iterator[list[Any]]:
    """Micro-batches of built samples: each clip decoded once, `build(sample, labels)` per sample;
    a sample of a damaged clip becomes `damaged(sample, error)`."""
    for batch in source:
        decoded = {c.clip_id: decode_clip(c) for _, c in batch if isinstance(c, EncodedClip)}
        yield [
            damaged(sample, clip)
            if isinstance(clip, DamagedClipError)
            else build(sample, decoded[sample.clip_id])
            for sample, clip in batch
        ]


clips_of_shards = pipelinefilter(_clips_of_shards)
samples_of_clips = pipelinefilter(_samples_of_clips)
built_batches = pipelinefilter(_built_batches)


class SkipFirst:
    """Stage: drop the first `count` items of the stream. The count persists across the repetitions
    `with_epoch` makes of the pipeline (a resumed stream skips once, not once per repetition)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.skipped = 0

    def __call__(self, source: Iterator[Any]) -> Iterator[Any]:
        for item in source:
            if self.skipped < self.count:
                self.skipped += 1
                continue
            yield item
