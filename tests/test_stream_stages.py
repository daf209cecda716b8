"""The streaming loader's stages (`geovr.student.stream`), each on its own, on a real WebDataset store."""

from __future__ import annotations

import random
from itertools import islice

import pytest
import webdataset as wds

from geovr.student import stream
from geovr.student.config import DataConfig
from geovr.student.data import join_qa
from geovr.teacher_cache.codecs import EncodedClip
from geovr.teacher_cache.schema import ClipLabels, DamagedClipError
from geovr.teacher_cache.store import open_store
from tests.test_data_loader import write_qa, write_test_store

SHARDS = [f"{i:06d}" for i in range(12)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream") / "store"
    videos = write_test_store(root, "wds", [2, 1, 3])
    qa = write_qa(root.parent / "qa.jsonl", videos, per_video=2)
    reader = open_store(root)
    samples, _ = join_qa(qa, reader, DataConfig())
    return reader, samples


def names(stages) -> list[str]:
    return [item["url"] for item in islice(wds.DataPipeline(*stages), 40)]


def test_seed_for_is_a_fixed_function_of_its_parts():
    assert stream.seed_for(7, 0, 1, 2) == stream.seed_for(7, 0, 1, 2)
    assert len({stream.seed_for(7, epoch, 1, 2) for epoch in range(50)}) == 50
    assert 0 <= stream.seed_for(2**70, -1) < 2**63


def test_shard_split_partitions_the_epoch_permutation_by_node_then_worker():
    world, workers, seed, epoch = 2, 3, 7, 4
    order = list(SHARDS)
    random.Random(stream.seed_for(seed, epoch)).shuffle(order)
    seen = []
    for rank in range(world):
        for worker in range(workers):
            got = names(stream.shard_stages(SHARDS, False, seed, epoch, rank, world, worker, workers))
            # Every `world`-th shard from `rank`, then every `workers`-th of those from `worker`.
            assert got == [s for i, s in enumerate(order) if i % world == rank][worker::workers]
            seen += got
    assert sorted(seen) == SHARDS  # a partition: every shard once per epoch
    other = names(stream.shard_stages(SHARDS, False, seed, epoch + 1, 0, 1, 0, 1))
    assert sorted(other) == SHARDS and other != order


def test_resampled_shards_are_a_deterministic_stream_per_rank_and_worker():
    def draw(rank: int, worker: int, epoch: int = 0) -> list[str]:
        return names(stream.shard_stages(SHARDS, True, 7, epoch, rank, 2, worker, 2))

    assert draw(0, 0) == draw(0, 0) and len(draw(0, 0)) == 40
    assert set(draw(0, 0)) <= set(SHARDS)
    assert len({tuple(draw(r, w)) for r in range(2) for w in range(2)}) == 4
    assert draw(0, 0, epoch=1) != draw(0, 0)


def test_clips_of_shards_then_samples_of_clips(store):
    reader, samples = store
    shards = [{"url": s} for s in reader.shards()]
    clips = list(stream.clips_of_shards(reader)(iter(shards)))
    assert [c.clip_id for c in clips] == reader.clip_ids() and all(isinstance(c, EncodedClip) for c in clips)
    rows_of_clip = samples.rows_of_clip()
    assert {c: [samples[r].clip_id for r in rows] for c, rows in rows_of_clip.items()} == {
        c: [c] * len(rows) for c, rows in rows_of_clip.items()
    }
    pairs = list(stream.samples_of_clips(rows_of_clip, samples)(iter(clips)))
    assert [(s.row_id, c.clip_id) for s, c in pairs] == [
        (s.row_id, c.clip_id) for c in clips for s in samples if s.clip_id == c.clip_id
    ]
    assert len(pairs) == len(samples)


def test_skip_first_skips_once_across_repetitions():
    skip = stream.SkipFirst(3)
    pipeline = wds.DataPipeline(lambda: iter(range(5)), skip).with_epoch(nbatches=9)
    assert list(pipeline) == [3, 4, 0, 1, 2, 3, 4, 0, 1]  # the second pass is not skipped again


def test_built_batches_build_every_sample_and_mark_damaged_ones(store):
    reader, samples = store
    first = samples[0]
    encoded = reader.read_encoded(first.clip_id)
    damaged = DamagedClipError(reader.root, "000000", "c", "depth", "fails its check")
    built: list[str] = []

    def build(sample, labels: ClipLabels) -> str:
        assert isinstance(labels, ClipLabels) and labels.clip_id == sample.clip_id
        built.append(sample.row_id)
        return sample.row_id

    batch = [(first, encoded), (first, encoded), (samples[1], damaged)]
    (out,) = list(stream.built_batches(build, lambda sample, error: ("damaged", str(error)))(iter([batch])))
    assert out[:2] == [first.row_id, first.row_id] and built == [first.row_id, first.row_id]
    assert out[2][0] == "damaged" and "fails its check" in out[2][1]
