"""Training data: QA join with a real store, both access paths, exact loader state, two ranks.

Also importable as a helper (`write_test_store`, `write_qa`) by the trainer tests, and runnable as
a `torchrun` worker script (see `_rank_main`) for the two-rank no-hang test.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from geovr.student.config import DataConfig
from geovr.student.data import (
    DataError,
    EpochBatchSampler,
    LoaderState,
    MicroBatch,
    QASample,
    TokenBudgetCollator,
    TrainLoader,
    join_qa,
)
from geovr.teacher_cache.frames import encode_jpeg
from geovr.teacher_cache.qa import QARowError, parse_conversation
from geovr.teacher_cache.records import ClipFailure
from geovr.teacher_cache.schema import ClipLabels, SchemaError, StoreFingerprint, clip_id_for
from geovr.teacher_cache.store import open_store, open_writer
from tests.helpers import clip_labels

SAMPLING = {"fps": 2.0, "min_frames": 4, "max_frames": 8, "method": "uniform"}
REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------
# A real store of synthetic labels, and QA files


def store_fingerprint(channels: int = 32) -> StoreFingerprint:
    return StoreFingerprint(
        teacher="vggt-tiny-test",
        checkpoint_sha256="0" * 64,
        teacher_config={"depth": 4, "embed_dim": channels},
        metric_teacher="",
        preprocess={"teacher_long_side": 56, "student_max_tokens": 300},
        sampling=dict(SAMPLING),
        feature_layers=(0, 1, 2, 3),
    )


def synthetic_clip(
    video: str, frames: int, size_hw: tuple[int, int], rng: np.random.Generator, channels: int = 32
) -> ClipLabels:
    """Labels of one clip with the shapes of a 56x56 teacher image (4x4 patches): depth 28x28,
    pooled features 2x2; student frames of `size_hw` (multiples of 32)."""
    h, w = size_hw
    angles = np.linspace(0, 0.3, frames)
    extrinsic = np.zeros((frames, 3, 4), np.float32)
    for i, a in enumerate(angles):
        extrinsic[i, :3, :3] = [[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]]
        extrinsic[i, :3, 3] = [0.1 * i, 0.0, 0.05 * i]
    intrinsic = np.tile(np.array([[50.0, 0, 28], [0, 50.0, 28], [0, 0, 1]], np.float32), (frames, 1, 1))
    pose = np.concatenate(
        [extrinsic[:, :, 3], np.tile([0, 0, 0, 1.0], (frames, 1)), np.full((frames, 2), 1.0)], 1
    ).astype(np.float32)
    return clip_labels(
        frames,
        clip_id=clip_id_for(video, SAMPLING),
        video=video,
        frame_indices=np.arange(frames, dtype=np.int64) * 15,
        timestamps=np.arange(frames, dtype=np.float64) * 0.5,
        frames_jpeg=[encode_jpeg(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for _ in range(frames)],
        pose_enc=pose,
        extrinsic=extrinsic,
        intrinsic=intrinsic,
        depth=rng.uniform(0.5, 3.0, (frames, 28, 28)).astype(np.float32),
        depth_conf=rng.uniform(1.0, 5.0, (frames, 28, 28)).astype(np.float32),
        scale=1.7,
        scale_valid=True,
        features=rng.normal(size=(frames, 4, 2, 2, channels)).astype(np.float32),
        meta={"teacher_hw": [56, 56], "source_hw": [h, w]},
    )


def write_test_store(
    root: Path,
    store_format: str,
    shard_sizes: list[int],
    frames: int = 4,
    size_hw: tuple[int, int] = (64, 64),
    failed_videos: tuple[str, ...] = (),
    seed: int = 0,
) -> list[str]:
    """A committed store with `shard_sizes[i]` clips in shard i (videos scene_000.mp4, ...), plus
    one failure row per `failed_videos` in the first shard. Returns the cached videos in order."""
    rng = np.random.default_rng(seed)
    writer = open_writer(root, store_fingerprint(), store_format)
    videos: list[str] = []
    for index, count in enumerate(shard_sizes):
        names = [f"scene_{len(videos) + i:03d}.mp4" for i in range(count)]
        videos += names
        failures = [
            ClipFailure(clip_id_for(v, SAMPLING), v, "teacher", "decode error")
            for v in (failed_videos if index == 0 else ())
        ]
        writer.write_shard(f"{index:06d}", [synthetic_clip(v, frames, size_hw, rng) for v in names], failures)
    return videos


def qa_row(video: str, question: str, answer: str, row_id: str) -> dict:
    return {
        "id": row_id,
        "video": video,
        "conversations": [
            {"from": "human", "value": f"<video>\n{question}"},
            {"from": "gpt", "value": answer},
        ],
    }


def write_qa(path: Path, videos: list[str], per_video: int = 2, extra_rows: list | None = None) -> Path:
    """JSON Lines QA file: `per_video` questions per video, then `extra_rows` (dicts or raw lines)."""
    lines = [
        json.dumps(qa_row(v, f"How many chairs are in this room? {q}", str(q + 2), f"{v}#{q}"))
        for v in videos
        for q in range(per_video)
    ]
    for row in extra_rows or []:
        lines.append(row if isinstance(row, str) else json.dumps(row))
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------------------------
# A trivial builder: the data path without the model (built samples are their row ids)


class RowIdSample:
    def __init__(self, row_id: str, clip_id: str, tokens: int):
        self.row_id, self.clip_id, self.tokens = row_id, clip_id, tokens


def build_row_id(sample: QASample, labels: ClipLabels) -> RowIdSample:
    assert labels.clip_id == sample.clip_id
    return RowIdSample(sample.row_id, labels.clip_id, 10 + len(sample.turns[-1].text))


def ids_collate(samples: list[RowIdSample]) -> list[str]:
    return [s.row_id for s in samples]


def make_loader(store_dir: Path, qa: Path, config: DataConfig, rank: int = 0, world: int = 1, state=None):
    store = open_store(store_dir)
    samples, report = join_qa(qa, store, config)
    collator = TokenBudgetCollator(ids_collate, lambda s: s.tokens, config.max_batch_tokens)
    opener = functools.partial(open_store, store_dir)
    loader = TrainLoader(
        samples, store, opener, build_row_id, collator, config, rank, world, seed=7, state=state
    )
    return loader, report


def row_ids(batch: MicroBatch) -> list[str]:
    return sorted(i for chunk in batch.chunks for i in chunk)


# ----------------------------------------------------------------------------------------------
# Tests


@pytest.fixture(scope="module")
def zarr_store(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("data") / "store_zarr"
    return root, write_test_store(root, "zarr", [3, 2], failed_videos=("scene_broken.mp4",))


@pytest.fixture(scope="module")
def wds_store(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("data") / "store_wds"
    return root, write_test_store(root, "wds", [1, 2, 4])


def test_parse_conversation_rules():
    turns = parse_conversation([{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A"}])
    assert turns[0].text == "<video>\nQ?" and turns[1].role == "assistant"
    bad = [
        [],
        [{"from": "gpt", "value": "A"}],
        [{"from": "human", "value": "<video>Q"}, {"from": "human", "value": "Q2"}],
        [{"from": "human", "value": "<video>Q"}],
        [{"from": "human", "value": "<video><video>Q"}, {"from": "gpt", "value": "A"}],
        [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "<video>A"}],
        [{"from": "robot", "value": "Q"}, {"from": "gpt", "value": "A"}],
        [{"from": "human", "value": 3}, {"from": "gpt", "value": "A"}],
        [{"from": "human", "value": "Q"}, {"from": "gpt", "value": " "}],
    ]
    for conversation in bad:
        with pytest.raises(QARowError):
            parse_conversation(conversation)


def test_join_counts_missing_failed_and_malformed_rows(zarr_store, tmp_path):
    root, videos = zarr_store
    extra = [
        qa_row("scene_999.mp4", "Q", "A", "missing"),
        qa_row("scene_broken.mp4", "Q", "A", "failed"),
        {"id": "roles", "video": videos[0], "conversations": [{"from": "gpt", "value": "A"}]},
        "{not json",
        {"id": "image", "image": "a.jpg", "conversations": []},
        {
            "id": "text-only",
            "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "A"}],
        },
    ]
    qa = write_qa(tmp_path / "qa.jsonl", videos, per_video=2, extra_rows=extra)
    store = open_store(root)
    samples, report = join_qa(qa, store, DataConfig())
    assert report.rows == 2 * len(videos) + len(extra)
    assert (report.joined, report.clips) == (2 * len(videos), len(videos))
    assert (report.missing_clip, report.failed_clip, report.malformed, report.not_video) == (1, 1, 2, 2)
    assert "decode error" in report.examples["failed_clip"][0]
    assert {s.clip_id for s in samples} == set(store.clip_ids())

    with pytest.raises(DataError, match=r"qa.jsonl:\d+: clip .* scene_999.mp4 is not in the cache"):
        join_qa(qa, store, DataConfig(on_missing_clip="error"))
    with pytest.raises(DataError, match=r"f.jsonl:\d+: .*failed in precompute: decode error"):
        join_qa(
            write_qa(tmp_path / "f.jsonl", videos, 1, extra[1:2]), store, DataConfig(on_missing_clip="error")
        )
    with pytest.raises(DataError, match=r"qa.jsonl:\d+: row roles: turn 0 is a assistant turn"):
        join_qa(qa, store, DataConfig(on_bad_row="error"))
    with pytest.raises(DataError, match="no QA row could be used"):
        join_qa(write_qa(tmp_path / "none.jsonl", [], 0, extra[:1]), store, DataConfig())


def test_store_of_another_schema_version_is_refused(zarr_store, tmp_path):
    import shutil

    root, _ = zarr_store
    copy = tmp_path / "old_store"
    shutil.copytree(root, copy)
    meta = json.loads((copy / "store.json").read_text())
    meta["fingerprint"]["schema_version"] = 99
    (copy / "store.json").write_text(json.dumps(meta))
    with pytest.raises(SchemaError, match="schema version 99"):
        open_store(copy)


def test_epoch_sampler_covers_every_sample_with_equal_rank_lengths():
    n, world, micro = 11, 3, 2
    ranks = [EpochBatchSampler(n, micro, r, world, seed=5) for r in range(world)]
    batches = [list(s) for s in ranks]
    assert len({len(b) for b in batches}) == 1 and len(batches[0]) == len(ranks[0]) == 2
    seen = [i for b in batches for batch in b for i in batch]
    assert set(seen) == set(range(n)) and len(seen) == 12  # padded by one repeat
    again = EpochBatchSampler(n, micro, 1, world, seed=5)
    assert list(again) == batches[1]
    again.set_position(epoch=1, start=0)
    assert list(again) != batches[1]  # a new order each epoch


def test_token_budget_splits_micro_batch_deterministically():
    collator = TokenBudgetCollator(lambda s: [x.row_id for x in s], lambda s: s.tokens, max_batch_tokens=100)
    built = [RowIdSample(f"r{i}", "c", t) for i, t in enumerate([30, 60, 20, 30])]
    batch = collator(built)
    assert batch.chunks == [["r1"], ["r0", "r3", "r2"]] and batch.num_samples == 4
    assert all(len(c) * max(int(built[int(r[1:])].tokens) for r in c) <= 100 for c in batch.chunks)


@pytest.mark.parametrize("access", ["random", "stream"])
def test_loader_state_restores_the_exact_stream(zarr_store, wds_store, tmp_path, access):
    root, videos = zarr_store if access == "random" else wds_store
    qa = write_qa(tmp_path / "qa.jsonl", videos, per_video=3)
    config = DataConfig(access=access, micro_batch=2, num_workers=2, shuffle_buffer=8, shuffle_initial=4)
    loader, _ = make_loader(root, qa, config)
    stream, states = [], []
    for _ in range(loader.batches_per_epoch + 3):  # crosses an epoch boundary
        stream.append(loader.next())
        states.append(json.loads(json.dumps(loader.state().to_json())))
    epochs = [e for e, _ in stream]
    assert epochs[0] == 0 and epochs[-1] == 1
    first_epoch = [i for e, b in stream if e == 0 for i in row_ids(b)]
    if access == "random":  # one epoch of random access is a permutation (padded) of the samples
        assert set(first_epoch) == _all_row_ids(videos, 3)
    assert all(b.num_samples == 2 for _, b in stream)
    for k in (1, loader.batches_per_epoch):
        restored, _ = make_loader(root, qa, config, state=LoaderState.from_json(states[k - 1]))
        rest = [restored.next() for _ in range(len(stream) - k)]
        assert [(e, row_ids(b)) for e, b in rest] == [(e, row_ids(b)) for e, b in stream[k:]], k


def _all_row_ids(videos: list[str], per_video: int) -> set[str]:
    return {f"{v}#{q}" for v in videos for q in range(per_video)}


def test_streaming_without_resampling_needs_enough_shards(wds_store, tmp_path):
    root, videos = wds_store
    qa = write_qa(tmp_path / "qa.jsonl", videos)
    with pytest.raises(DataError, match="at least ranks x workers = 4 shards"):
        make_loader(root, qa, DataConfig(access="stream", resampled=False, num_workers=2), rank=0, world=2)


def test_two_ranks_with_unequal_shards_finish_the_same_steps(wds_store, tmp_path):
    """torchrun, 2 gloo ranks, an all-reduce per step: a rank that ran out early would hang it."""
    root, videos = wds_store
    qa = write_qa(tmp_path / "qa.jsonl", videos, per_video=2)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         __file__, "--store", str(root), "--qa", str(qa), "--out", str(tmp_path), "--steps", "9"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},  # the script imports tests.helpers
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for resampled in ("true", "false"):
        results = [json.loads((tmp_path / f"{resampled}_rank{r}.json").read_text()) for r in range(2)]
        assert [r["steps"] for r in results] == [9, 9]
        assert all(r["all_reduced"] == list(range(2, 20, 2)) for r in results)
        if resampled == "false":
            # The epoch's 3 shards (1, 2 and 4 clips) split by node: two shards on one rank, one on the
            # other, so the ranks stream different clips and different numbers of them.
            first, second = (set(r["clips_epoch0"]) for r in results)
            assert not first & second and len(first) != len(second)


def _rank_main() -> None:
    """torchrun worker: iterate the loader for --steps micro-batches with an all-reduce per step."""
    import torch
    import torch.distributed as dist

    parser = argparse.ArgumentParser()
    for name in ("--store", "--qa", "--out"):
        parser.add_argument(name, required=True)
    parser.add_argument("--steps", type=int, required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for resampled in (True, False):
        config = DataConfig(access="stream", micro_batch=1, num_workers=0, resampled=resampled)
        loader, _ = make_loader(Path(args.store), Path(args.qa), config, rank=rank, world=world)
        reduced, clips = [], set()
        for _ in range(args.steps):
            epoch, batch = loader.next()
            if epoch == 0:
                clips.update(i.split("#")[0] for i in row_ids(batch))
            value = torch.tensor([len(reduced) + 1.0])
            dist.all_reduce(value)
            reduced.append(int(value.item()))
        result = {"steps": len(reduced), "all_reduced": reduced, "clips_epoch0": sorted(clips)}
        (Path(args.out) / f"{str(resampled).lower()}_rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    _rank_main()
