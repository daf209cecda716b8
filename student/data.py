"""Training data: QA conversations joined with the teacher cache, batched for the student.

A QA file holds rows in the VSI-590K / LLaVA conversation style, or VLM-3R rows; how files are
read, which video a row names and how it becomes a clip id is the QA contract of both stages,
`geovr.teacher_cache.qa` (the same as `index` uses):

    {"id": "scene0000_00_q17", "video": "scannet/scene0000_00.mp4",
     "conversations": [{"from": "human", "value": "<video>\\nHow many chairs are in the room?"},
                       {"from": "gpt", "value": "4"}]}
    {"data_source": "scannetpp", "scene_name": "0a5c013435", "conversations": [...]}   (VLM-3R)

Only video rows are used (rows without a video, image or text only, are counted as `not_video`).
Each row is joined with the cache by clip id: `qa.clip_id_of(video, store.fingerprint.sampling,
data.corpus_root)`, so many rows share one cached clip; absolute video paths need
`data.corpus_root` (the `--corpus-root` that `index` used). Rows whose clip is missing from the
store, whose clip failed in precompute, or whose row or conversation is malformed are counted in a
`JoinReport` and skipped, or raise `DataError` naming the file and line (`DataConfig.on_missing_clip`,
`on_bad_row`).

Two access paths give the trainer the same stream of micro-batches per rank:

- random access (`access="random"`, default for Zarr stores): a map-style dataset reading one
  clip per sample with `StoreReader.read_clip`, ordered by `EpochBatchSampler` (a permutation per
  (seed, epoch), padded by repetition so that every rank gets the same number of micro-batches).
- streaming (`access="stream"`, default for stores whose backend streams, e.g. WebDataset): a
  `webdataset.DataPipeline` of the stages in `student.stream` over the store's shards: resampled
  shards (or a deterministic shard shuffle split by node and worker), each shard expanded to its
  clips' QA samples, a shuffle buffer, and `with_epoch` so that every rank and worker yields the
  same number of micro-batches whatever the shard counts (ranks that run out at different steps
  hang DDP).

Both streams are deterministic functions of (seed, epoch, rank, worker), so the loader state is
two integers per rank (`LoaderState`: epoch and micro-batches consumed in it), and a `TrainLoader`
built with that state continues at exactly the next micro-batch (the stream path re-reads and
discards the consumed part of the epoch without building it).

Samples are built in the DataLoader workers (`StudentSampleBuilder`: cached JPEG frames and the
conversation through the model directory's tokenizer and video settings, `student.batch.make_sample`).
A sample whose cached clip is missing or damaged on disk (the store's readers check every chunk or
tar member, `teacher_cache.schema.DamagedClipError`) becomes a `DamagedSample` carrying the
one-line report instead of raising in a worker: the trainer counts them across ranks and applies
`DataConfig.on_damaged_clip` / `max_damaged_ratio` on every rank at the same step.
A micro-batch becomes a `MicroBatch` (`TokenBudgetCollator`): sorted by length and split into padded
chunks of at most `max_batch_tokens` (batch x longest), which the trainer runs forward/backward one
after another; samples above `max_seq_len` are an error or are dropped and counted (`on_bad_row`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from geovr.student import stream
from geovr.student.config import DataConfig
from geovr.student.unlabelled import LanguageOnlySource, decode_student_frames
from geovr.teacher_cache.backends import get_backend
from geovr.teacher_cache.codecs import EncodedClip
from geovr.teacher_cache.frames import VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS
from geovr.teacher_cache.qa import (
    QAFileError,
    QARowError,
    Turn,
    clip_id_of,
    normalise_video,
    parse_conversation,
    read_rows,
    video_of,
)
from geovr.teacher_cache.schema import ClipLabels, DamagedClipError, StoreFingerprint


class DataError(ValueError):
    """A QA row or a clip cannot be used; the message names the file, the line and the problem."""


# ----------------------------------------------------------------------------------------------
# QA rows and the join with the cache


@dataclass(frozen=True)
class QASample:
    """One usable QA row: its conversation and the cached clip it is joined with."""

    row_id: str
    where: str
    video: str
    clip_id: str
    turns: tuple[Turn, ...]
    labelled: bool = True  # False: no labels in the store, language only (`student.unlabelled`)

    def messages(self) -> list[dict[str, str]]:
        """The conversation as chat turns [{"role", "content"}] (`make_sample` places the video)."""
        return [{"role": t.role, "content": t.text} for t in self.turns]


class SampleTable(Sequence[QASample]):
    """The joined QA samples, packed: each one's fields as UTF-8 JSON in one byte array, with offsets.

    A list of 600k `QASample`s costs about 0.8 KB of Python objects per row, and every loader worker
    ends up with its own copy of all of it: a spawned worker unpickles one, and a forked worker's
    shared pages are copied one by one as reading each object writes its reference count. Two numpy
    arrays cost about the JSON's size, stay shared after a fork, and pickle as two buffers.
    """

    def __init__(self, samples: Iterable[QASample]):
        blob, offsets, clip_codes, labelled = bytearray(), [0], [], []
        code_of: dict[str, int] = {}
        for s in samples:
            turns = [[t.role, t.text] for t in s.turns]
            blob += json.dumps([s.row_id, s.where, s.video, s.clip_id, turns, s.labelled]).encode()
            offsets.append(len(blob))
            clip_codes.append(code_of.setdefault(s.clip_id, len(code_of)))
            labelled.append(s.labelled)
        self._blob = np.frombuffer(bytes(blob), dtype=np.uint8)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._clip_codes = np.asarray(clip_codes, dtype=np.int64)
        self.clip_ids = list(code_of)  # distinct, in first-use order
        self.labelled = np.asarray(labelled, dtype=bool)  # (N,) per sample

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> QASample:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        index %= len(self)
        start, end = self._offsets[index], self._offsets[index + 1]
        row_id, where, video, clip_id, turns, labelled = json.loads(self._blob[start:end].tobytes())
        return QASample(row_id, where, video, clip_id, tuple(Turn(r, t) for r, t in turns), labelled)

    def rows_of_clip(self) -> dict[str, list[int]]:
        """The sample rows of each clip, in order."""
        order = np.argsort(self._clip_codes, kind="stable")
        bounds = np.searchsorted(self._clip_codes[order], np.arange(len(self.clip_ids) + 1))
        return {
            clip: order[a:b].tolist()
            for clip, a, b in zip(self.clip_ids, bounds[:-1], bounds[1:], strict=True)
        }


@dataclass
class JoinReport:
    """Counts of what happened to each QA row, with the first few reasons per category."""

    qa_file: str = ""
    rows: int = 0
    joined: int = 0
    clips: int = 0
    not_video: int = 0
    malformed: int = 0
    missing_clip: int = 0
    failed_clip: int = 0
    language_only: int = 0
    language_only_clips: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)

    MAX_EXAMPLES = 5

    def note(self, category: str, message: str) -> None:
        setattr(self, category, getattr(self, category) + 1)
        bucket = self.examples.setdefault(category, [])
        if len(bucket) < self.MAX_EXAMPLES:
            bucket.append(message)

    @property
    def skipped(self) -> int:
        return self.malformed + self.missing_clip + self.failed_clip

    def to_json(self) -> dict[str, Any]:
        return {
            "qa_file": self.qa_file,
            "rows": self.rows,
            "joined": self.joined,
            "clips": self.clips,
            "not_video": self.not_video,
            "malformed": self.malformed,
            "missing_clip": self.missing_clip,
            "failed_clip": self.failed_clip,
            "language_only": self.language_only,
            "language_only_clips": self.language_only_clips,
            "examples": self.examples,
        }

    def summary(self) -> str:
        unlabelled = (
            f" ({self.language_only} of them language only, on {self.language_only_clips} clips without labels)"
            if self.language_only
            else ""
        )
        return (
            f"{self.qa_file}: {self.rows} rows, {self.joined} joined with {self.clips} clips{unlabelled}; "
            f"skipped {self.missing_clip} missing clip, {self.failed_clip} failed clip, "
            f"{self.malformed} malformed, {self.not_video} not video"
        )


class StoreLike(Protocol):
    """The part of `teacher_cache.store.StoreReader` the data pipeline uses."""

    @property
    def fingerprint(self) -> Any: ...
    @property
    def format(self) -> str: ...
    def shards(self) -> list[str]: ...
    def clip_ids(self) -> list[str]: ...
    def read_clip(self, clip_id: str) -> ClipLabels: ...
    def iter_shard_checked(self, shard_id: str) -> Iterator[EncodedClip | DamagedClipError]: ...
    def failures(self) -> list[dict]: ...


def join_qa(qa_path: str | Path, store: StoreLike, config: DataConfig) -> tuple[SampleTable, JoinReport]:
    """Parse `qa_path` and keep the video rows whose clip is in `store`, in file order.

    Raises `DataError` at the first bad row when the matching policy is "error"; otherwise the row
    is counted in the report. A file with no usable row at all, or one that cannot be read, is an error.
    """
    report = JoinReport(qa_file=str(qa_path))
    sampling = store.fingerprint.sampling
    cached = set(store.clip_ids())
    failed = {row.get("clip_id"): row.get("reason", "") for row in store.failures()}
    samples: list[QASample] = []

    def reject(category: str, policy: str, where: str, message: str) -> None:
        if policy == "error":
            raise DataError(f"{where}: {message}")
        report.note(category, f"{where}: {message}")

    try:
        for row in read_rows(qa_path):
            report.rows += 1
            try:
                video = _row_video(row.value, row.error)
                if video is None:
                    report.note("not_video", f"{row.where}: no video (image or text-only row)")
                    continue
                clip_id = clip_id_of(video, sampling, config.corpus_root)
                turns = parse_conversation(row.value.get("conversations"))
            except QARowError as err:
                name = row.value.get("id", "?") if isinstance(row.value, dict) else "?"
                reject("malformed", config.on_bad_row, row.where, f"row {name}: {err}")
                continue
            if clip_id not in cached:
                if not _language_only(row, video, clip_id, turns, failed, config, samples, report):
                    category, policy, why = _missing_reason(video, clip_id, failed, config)
                    reject(category, policy, row.where, why)
                continue
            row_id = row.value.get("id", row.number)
            samples.append(QASample(str(row_id), row.where, video, clip_id, turns))
    except QAFileError as err:
        raise DataError(str(err)) from None
    report.joined = len(samples)
    report.clips = len({s.clip_id for s in samples})
    report.language_only_clips = len({s.clip_id for s in samples if not s.labelled})
    if not samples:
        raise DataError(f"{qa_path}: no QA row could be used ({report.summary()})")
    return SampleTable(samples), report


def _missing_reason(
    video: str, clip_id: str, failed: dict[str, str], config: DataConfig
) -> tuple[str, str, str]:
    """(category, policy, message) for a row whose clip is not in the store and is not joined."""
    if clip_id in failed:
        why = f"clip {clip_id} of video {video} failed in precompute: {failed[clip_id]}"
        category = "failed_clip"
    else:
        why = f"clip {clip_id} of video {video} is not in the cache (wrong corpus root or sampling?)"
        category = "missing_clip"
    if config.missing_labels == "language_only":
        why += f"; language only needs the video, {_video_file(video, config)} does not exist"
    return category, config.on_missing_clip, why


def _video_file(video: str, config: DataConfig) -> Path:
    return Path(config.corpus_root or ".") / normalise_video(video, config.corpus_root)


def _language_only(
    row: Any,
    video: str,
    clip_id: str,
    turns: tuple[Turn, ...],
    failed: dict[str, str],
    config: DataConfig,
    samples: list[QASample],
    report: JoinReport,
) -> bool:
    """Under `missing_labels: language_only`, join a row whose clip has no labels (its video file
    exists) as a language-only sample; False when it is not joined."""
    if config.missing_labels != "language_only" or not _video_file(video, config).is_file():
        return False
    why = "failed in precompute" if clip_id in failed else "not in the cache"
    report.note("language_only", f"{row.where}: clip {clip_id} of video {video} {why}: language only")
    row_id = row.value.get("id", row.number)
    samples.append(QASample(str(row_id), row.where, video, clip_id, turns, labelled=False))
    return True


def _row_video(value: object, error: str | None) -> str | None:
    """The row's video (None: not a video row); `QARowError` for an unreadable or malformed row."""
    if error is not None:
        raise QARowError(error)
    return video_of(value)


# ----------------------------------------------------------------------------------------------
# Loader state and the two access paths


@dataclass
class LoaderState:
    """Where one rank is in its data stream: epoch and micro-batches consumed in that epoch."""

    epoch: int = 0
    batches: int = 0

    def to_json(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.batches}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoaderState:
        return cls(epoch=int(data["epoch"]), batches=int(data["batches"]))


SampleBuilder = Callable[[QASample, ClipLabels], Any]
"""(QA sample, its clip's labels) -> one built student sample (tokenised, vision inputs, targets)."""


class EpochBatchSampler:
    """Micro-batches of sample indices for one rank, deterministic per (seed, epoch).

    The epoch's permutation of the N samples is extended by wrapping around until it divides into
    world_size x micro_batch, so every rank gets the same number of micro-batches (as
    `DistributedSampler(drop_last=False)`); rank r takes positions r, r + world, ... in order.
    """

    def __init__(self, num_samples: int, micro_batch: int, rank: int, world_size: int, seed: int):
        self.num_samples = num_samples
        self.micro_batch = micro_batch
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        per_rank = -(-self.num_samples // self.world_size)
        return -(-per_rank // self.micro_batch)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(stream.seed_for(self.seed, self.epoch))
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        total = len(self) * self.micro_batch * self.world_size
        order = (order * (-(-total // self.num_samples)))[:total]
        mine = order[self.rank :: self.world_size]
        for b in range(self.start, len(self)):
            yield mine[b * self.micro_batch : (b + 1) * self.micro_batch]


class RandomAccessDataset(Dataset):
    """Map-style dataset: sample i is `build(samples[i], store.read_clip(samples[i].clip_id))`, or a
    `DamagedSample` when the clip's stored data is damaged.

    The store is opened lazily in each process (DataLoader workers do not share file handles).
    """

    def __init__(
        self, samples: Sequence[QASample], open_store: Callable[[], StoreLike], build: SampleBuilder
    ):
        self.samples = samples
        self.open_store = open_store
        self.build = build
        self._store: StoreLike | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Any:
        if self._store is None:
            self._store = self.open_store()
        sample = self.samples[index]
        if not sample.labelled:
            return self.build(sample, None)
        try:
            labels = self._store.read_clip(sample.clip_id)
        except DamagedClipError as err:
            return DamagedSample(sample.row_id, str(err))
        return self.build(sample, labels)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_store": None}


class StreamingDataset(IterableDataset):
    """WebDataset pipeline over the store's shards yielding micro-batches (lists of built samples).

    Per worker and epoch, the stages of `student.stream`: shard ids (resampled with replacement, or
    a deterministic permutation split by node, then by worker) -> encoded clips of each shard (or the
    `DamagedClipError` of a clip that cannot be read) -> the QA samples of each clip -> shuffle
    buffer -> groups of `micro_batch` -> skip the micro-batches consumed before a resume -> decode
    and build (a damaged clip's samples become `DamagedSample`s); `with_epoch` cuts every worker at
    the same number of micro-batches and repeats the shard stream when a worker's shards run out.
    """

    def __init__(
        self,
        samples: SampleTable,
        shards: Sequence[str],
        open_store: Callable[[], StoreLike],
        build: SampleBuilder,
        config: DataConfig,
        rank: int,
        world_size: int,
        seed: int,
        batches_per_worker: int,
    ):
        self.samples = samples
        self.rows_of_clip = samples.rows_of_clip()
        self.shards = list(shards)
        self.open_store = open_store
        self.build = build
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.batches_per_worker = batches_per_worker
        self.epoch = 0
        self.consumed = 0

    def set_position(self, epoch: int, consumed: int) -> None:
        """Start in `epoch` after `consumed` micro-batches of it (over all workers of this rank)."""
        self.epoch, self.consumed = epoch, consumed

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def __iter__(self) -> Iterator[list[Any]]:
        loader_worker, num_workers = self._worker()
        # The DataLoader takes micro-batches from its workers 0, 1, ..., W-1 in turn and always starts
        # with worker 0; micro-batch j of the epoch belongs to stream j % W. After `consumed` of them,
        # DataLoader worker w runs stream (w + consumed) % W, which has delivered consumed // W of
        # its micro-batches (one more if it comes before consumed % W).
        worker = (loader_worker + self.consumed) % num_workers
        skip = self.consumed // num_workers + (1 if worker < self.consumed % num_workers else 0)
        cfg = self.config
        shards = stream.shard_stages(
            self.shards, cfg.resampled, self.seed, self.epoch, self.rank, self.world_size, worker, num_workers
        )
        rng = random.Random(stream.seed_for(self.seed, self.epoch, self.rank, worker))
        expected = self.batches_per_worker - skip
        pipeline = wds.DataPipeline(
            *shards,
            stream.clips_of_shards(self.open_store()),
            stream.samples_of_clips(self.rows_of_clip, self.samples),
            wds.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_initial, rng=rng),
            wds.batched(cfg.micro_batch, collation_fn=list, partial=False),
            stream.SkipFirst(skip),
            stream.built_batches(self.build, _damaged_sample),
        ).with_epoch(nbatches=expected)
        produced = 0
        for batch in pipeline:
            produced += 1
            yield batch
        if produced < expected:
            raise DataError(
                f"rank {self.rank} worker {worker}: the data stream ended after {produced} of {expected} "
                "micro-batches (its shards hold no joined QA sample); use data.resampled=true or more shards"
            )


def _damaged_sample(sample: QASample, error: DamagedClipError) -> DamagedSample:
    return DamagedSample(sample.row_id, str(error))


# ----------------------------------------------------------------------------------------------
# Building samples and collating them under a token budget


def check_frame_budget(fingerprint: StoreFingerprint, max_pixels: int, min_pixels: int) -> None:
    """Refuse a store whose student frames were sized under another clip budget than the student's
    (the student would feed frames of another size than the processor gives, without a word).
    A store whose fingerprint records no student frame policy (synthetic test stores) is not checked."""
    frames = fingerprint.preprocess.get("student_frames")
    if frames is None:
        return
    stored = (frames.get("video_max_pixels"), frames.get("video_min_pixels"))
    if stored != (max_pixels, min_pixels):
        budget = (
            f"{stored[0]}/{stored[1]}"
            if None not in stored
            else f"a per-frame cap of {frames.get('max_tokens')} tokens"
        )
        raise DataError(
            f"the store's student frames were sized for video_max_pixels/video_min_pixels {budget}, the "
            f"student's are {max_pixels}/{min_pixels}: set student.video_max_pixels/video_min_pixels to the "
            "store's or precompute the store with the student's"
        )


@dataclass(frozen=True)
class SkippedSample:
    """Placeholder for a sample the builder refused under the "skip" policy (e.g. too long)."""

    row_id: str
    reason: str


@dataclass(frozen=True)
class DamagedSample:
    """Placeholder for a sample whose cached clip is missing or damaged on disk; `reason` is the
    one-line `DamagedClipError` report (store, shard, clip, field, problem)."""

    row_id: str
    reason: str


class StudentSampleBuilder:
    """(QA sample, clip labels) -> `StudentSample`, with the tokenizer and video settings of the model
    directory (loaded lazily in each process, so the builder pickles into DataLoader workers).

    A sample above `max_seq_len` tokens raises `DataError` under `on_bad_row="error"`, else becomes a
    `SkippedSample` that the collator drops and counts. A language-only QA sample (labels None)
    decodes its frames from the video (`language_only`, `student.unlabelled`); a video that does not
    decode becomes a `DamagedSample`. `label_choice`: which labels the geometric targets come from
    (`DataConfig.label_choice`, `student.label_choice`; None: the stored ones).
    """

    def __init__(
        self,
        model_dir: str | Path,
        max_seq_len: int,
        on_bad_row: str,
        video_pixels: tuple[int, int] = (VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS),
        language_only: LanguageOnlySource | None = None,
        fusion_layer: int | None = None,
        label_choice: dict[str, str] | None = None,
    ):
        self.model_dir = str(model_dir)
        self.label_choice = label_choice
        self.fusion_layer = fusion_layer  # a fusion student's layer of the cached fusion features
        self.max_seq_len = max_seq_len
        self.on_bad_row = on_bad_row
        self.video_pixels = video_pixels  # (max, min) pixels of a clip: the student's frame budget
        self.language_only = language_only
        self._tokenizer: Any = None
        self._preprocess: Any = None

    def _load(self) -> None:
        from transformers import AutoTokenizer

        from geovr.student.vision_inputs import VideoPreprocess

        self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        self._preprocess = VideoPreprocess.from_model_dir(self.model_dir, *self.video_pixels)

    @property
    def pad_token_id(self) -> int:
        if self._tokenizer is None:
            self._load()
        return int(self._tokenizer.pad_token_id)

    def __call__(self, sample: QASample, labels: ClipLabels | None) -> Any:
        from geovr.student.batch import SequenceTooLong, make_sample

        if self._tokenizer is None:
            self._load()
        try:
            if labels is None:
                return self._language_sample(sample)
            return make_sample(
                labels, sample.messages(), self._tokenizer, self._preprocess, self.max_seq_len,
                fusion_layer=self.fusion_layer, label_choice=self.label_choice,
            )  # fmt: skip
        except SequenceTooLong as err:
            if self.on_bad_row == "error":
                raise DataError(f"QA row {sample.row_id} ({sample.where}): {err}") from None
            return SkippedSample(sample.row_id, str(err))

    def _language_sample(self, sample: QASample) -> Any:
        """A QA sample without labels: frames from its video, no geometric target."""
        from geovr.corpus.video import VideoError
        from geovr.student.batch import make_language_sample

        source = self.language_only
        if source is None:
            raise DataError(f"QA row {sample.row_id}: its clip has no labels and language_only is off")
        path = source.video_path(normalise_video(sample.video, source.corpus_root))
        try:
            frames, seconds = decode_student_frames(
                path, source.sampling, self.video_pixels, source.jpeg_quality
            )
        except VideoError as err:
            return DamagedSample(sample.row_id, f"language-only clip {sample.clip_id}: {err}")
        return make_language_sample(
            frames, seconds, sample.messages(), self._tokenizer, self._preprocess, sample.clip_id,
            (source.feature_layers, source.feature_dim), self.max_seq_len,
        )  # fmt: skip

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokenizer": None, "_preprocess": None}


@dataclass
class MicroBatch:
    """One rank's micro-batch: padded chunks within the token budget, and what was dropped from it
    (`skipped`: refused by the builder; `damaged`: the clip's stored data is damaged)."""

    chunks: list[Any]
    num_samples: int
    skipped: list[SkippedSample]
    damaged: list[DamagedSample] = field(default_factory=list)

    def pin_memory(self) -> MicroBatch:
        """Page-locked copies of every tensor (called by the DataLoader's pinning thread)."""
        import dataclasses

        def pin(chunk: Any) -> Any:
            if not dataclasses.is_dataclass(chunk):
                return chunk
            values = {f.name: getattr(chunk, f.name) for f in dataclasses.fields(chunk)}
            return type(chunk)(**{k: v.pin_memory() if torch.is_tensor(v) else v for k, v in values.items()})

        return MicroBatch([pin(c) for c in self.chunks], self.num_samples, self.skipped, self.damaged)


class TokenBudgetCollator:
    """Micro-batch (list of built samples) -> `MicroBatch` of padded chunks within the token budget.

    `SkippedSample`s and `DamagedSample`s are set aside. The rest are sorted by length (longest
    first) and packed greedily while `len(chunk) * longest <= max_batch_tokens`; the order is
    deterministic. `collate` pads one chunk; `length_of` gives a sample's token count.
    """

    def __init__(
        self, collate: Callable[[list[Any]], Any], length_of: Callable[[Any], int], max_batch_tokens: int
    ):
        self.collate = collate
        self.length_of = length_of
        self.max_batch_tokens = max_batch_tokens

    def chunks(self, lengths: Sequence[int]) -> list[list[int]]:
        """Index groups of a micro-batch with the given sample lengths."""
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        groups: list[list[int]] = []
        for i in order:
            if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= self.max_batch_tokens:
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups

    def __call__(self, built: list[Any]) -> MicroBatch:
        skipped = [s for s in built if isinstance(s, SkippedSample)]
        damaged = [s for s in built if isinstance(s, DamagedSample)]
        samples = [s for s in built if not isinstance(s, (SkippedSample, DamagedSample))]
        lengths = [self.length_of(s) for s in samples]
        chunks = [self.collate([samples[i] for i in group]) for group in self.chunks(lengths)]
        return MicroBatch(chunks, len(samples), skipped, damaged)


def student_collator(builder: StudentSampleBuilder, max_batch_tokens: int) -> TokenBudgetCollator:
    """The collator for `StudentSample`s: right padding with the tokenizer's pad id."""
    from functools import partial

    from geovr.student.batch import collate_samples

    return TokenBudgetCollator(
        partial(collate_samples, pad_token_id=builder.pad_token_id), _sample_length, max_batch_tokens
    )


def _sample_length(sample: Any) -> int:
    return int(sample.input_ids.numel())


# ----------------------------------------------------------------------------------------------
# The loader a rank trains from


class TrainLoader:
    """An endless, checkpointable stream of micro-batches for one rank.

    `next()` returns (epoch, `MicroBatch`); epochs roll over by themselves. `state()`
    is the position after the last returned micro-batch; a new `TrainLoader` given that state
    continues with the very next micro-batch.
    """

    def __init__(
        self,
        samples: SampleTable,
        store: StoreLike,
        open_store: Callable[[], StoreLike],
        build: SampleBuilder,
        collator: TokenBudgetCollator,
        config: DataConfig,
        rank: int,
        world_size: int,
        seed: int,
        device_is_cuda: bool = False,
        state: LoaderState | None = None,
    ):
        self.config = config
        self.access = config.access
        if self.access == "auto":
            self.access = "stream" if get_backend(store.format).streams else "random"
        self.collator = collator
        self.rank, self.world_size = rank, world_size
        self.pin_memory = config.pin_memory and device_is_cuda
        samples_per_epoch = config.samples_per_epoch or len(samples)
        per_rank = -(-samples_per_epoch // world_size)
        if self.access == "random":
            self.sampler = EpochBatchSampler(len(samples), config.micro_batch, rank, world_size, seed)
            self.dataset: Dataset | IterableDataset = RandomAccessDataset(samples, open_store, build)
            self.batches_per_epoch = len(self.sampler)
        else:
            if not samples.labelled.all():
                raise DataError(
                    "data.missing_labels=language_only needs random access (data.access=random): the "
                    "streaming path reads clips from the store's shards, where clips without labels are not"
                )
            workers = max(1, config.num_workers)
            batches_per_worker = max(1, -(-per_rank // (config.micro_batch * workers)))
            shards = store.shards()
            if not config.resampled and len(shards) < world_size * workers:
                raise DataError(
                    f"streaming without resampling needs at least ranks x workers = {world_size * workers} "
                    f"shards, the store has {len(shards)}; set data.resampled=true"
                )
            self.dataset = StreamingDataset(
                samples, shards, open_store, build, config, rank, world_size, seed, batches_per_worker
            )
            self.batches_per_epoch = batches_per_worker * workers
        self.position = state or LoaderState()
        self._iterator: Iterator[MicroBatch] | None = None
        self._random_loader: DataLoader | None = None

    def state(self) -> LoaderState:
        return LoaderState(self.position.epoch, self.position.batches)

    def state_dict(self) -> dict[str, int]:
        """The position after the last returned micro-batch (a checkpoint's per-rank "loader")."""
        return self.position.to_json()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue with the micro-batch after the position `state` (from `state_dict`)."""
        self.position = LoaderState.from_json(state)
        self._iterator = None

    def _open_epoch(self) -> Iterator[MicroBatch]:
        epoch, done = self.position.epoch, self.position.batches
        workers = self.config.num_workers
        loader_args: dict[str, Any] = {
            "num_workers": workers,
            "pin_memory": self.pin_memory,
            "collate_fn": self.collator,
        }
        if workers > 0:
            loader_args["prefetch_factor"] = self.config.prefetch_factor
        if self.access == "random":
            self.sampler.set_position(epoch, done)
            if self._random_loader is None:
                # Workers persist across epochs: each opens the store once (the sampler runs here).
                self._random_loader = DataLoader(
                    self.dataset, batch_sampler=self.sampler, persistent_workers=workers > 0, **loader_args
                )
            return iter(self._random_loader)
        self.dataset.set_position(epoch, done)
        return iter(DataLoader(self.dataset, batch_size=None, **loader_args))

    def next(self) -> tuple[int, MicroBatch]:
        if self.position.batches >= self.batches_per_epoch:
            self.position = LoaderState(self.position.epoch + 1, 0)
            self._iterator = None
        if self._iterator is None:
            self._iterator = self._open_epoch()
        try:
            chunks = next(self._iterator)
        except StopIteration:
            raise DataError(
                f"rank {self.rank}: epoch {self.position.epoch} ended after {self.position.batches} of "
                f"{self.batches_per_epoch} micro-batches"
            ) from None
        epoch = self.position.epoch
        self.position = LoaderState(epoch, self.position.batches + 1)
        return epoch, chunks
