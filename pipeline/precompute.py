"""`geovr-pipeline precompute`: manifest -> decode -> teacher -> committed cache shards, on Ray.

Why Ray core (tasks + actors) and not Ray Data with a custom datasink:
- A shard must be written whole and committed by exactly one task, and resume works at shard
  granularity. Ray Data re-partitions blocks as it likes; mapping its blocks back onto our fixed
  shards (and knowing when a shard is complete) would mean fighting its scheduler. Here the driver
  owns the shard -> clips mapping and submits one writer task per shard when its last clip is done.
- Per-clip failures must be recorded and the run must go on. In Ray Data one failed block aborts the
  job (`max_errored_blocks=0`) or is silently dropped; here every decode task and every teacher call
  returns a status per clip, and failures travel with their shard into the store's commit record.
- The teacher must be loaded once per GPU and fed batches of clips of a deterministic composition
  (so a resumed run writes byte-identical labels). An explicit actor pool gives that directly.

Data flow (all large data stays in the object store; the driver only sees small status dicts):

    driver ──decode_clip(row)──▶ CPU task: probe timestamps, sample, decode (PyAV), resize + JPEG the
       │                          student frames, resize the teacher frames
       │                          ──▶ (status, frames (S,Ht,Wt,3) uint8, info)
       │◀─ status ───────────────────────────┘
       ├─ TeacherActor.label(jobs, *frames) ──▶ GPU actor (num_gpus=1; CPU actor with --device cpu):
       │                                         [statuses, labels clip 0, labels clip 1, ...]
       │◀─ statuses ─────────────────────────────┘
       ├─ encode_labels(row, info, labels) ──▶ CPU task: ClipLabels -> the store's EncodedClip
       │◀─ status ───────────────────────────┘
       └─ write_shard(shard, encoded refs, failures) ──▶ one task per shard, when its last clip is
                                         done: store.open_writer(...).write_encoded_shard(...)

Batches are consecutive successfully-decoded clips of one shard in manifest order, `clips_per_batch`
at a time, so a batch's composition does not depend on task timing.

Backpressure (memory stays bounded whatever the corpus size): at most `max_inflight_shards` shards
are open at once (their encoded clips wait in the object store until the shard's writer runs; the
float32 labels live only between the teacher and the clip's encode task), at most
`decode_workers` decode tasks run at once, decoding pauses while `2 * clips_per_batch * actors`
decoded clips wait for a teacher, and each actor has at most `ACTOR_QUEUE` (2) batches queued (the
next batch's frames arrive while the current one runs, so the GPU does not wait on the driver).
An actor runs its queued calls in `ACTOR_QUEUE` threads with one on the device at a time: a
finished batch's labels (about 130 MB per 32-frame clip) are put into the object store while the
next batch already runs.
The driver holds references and status dicts only, never frames or labels: at 100,000 videos it
holds the manifest rows (~1 KB each) and a few shards' worth of small records.

Resume and drift: the store's fingerprint (teacher name, checkpoint hash, teacher config, metric
teacher, preprocessing, sampling policy, feature layers) is built from the first actor's labeler and
the manifest; `open_writer` refuses a store written under another fingerprint and says what
differs. Committed shards are skipped. `--retry-failed` re-runs only the clips a committed shard
recorded as failed and rewrites that shard with the stored clips unchanged plus those now labelled.

One run per store: `run_precompute` takes the store's lease (`teacher_cache.lease`) before it
connects to Ray and gives it up at the end; another run on the store is refused with one line naming
the holder, a lease whose run is gone is taken over with a warning, and the write tasks commit only
while this run holds the lease (they check its token). The teacher settings are checked against the
checkpoint's config in the driver, before any actor starts; an actor that still fails to start is
reported in one line. `--ray-address local`: the in-process cluster ends with the driver, however it
ends (`driver_watchdog`).

Failures: a clip that cannot be used is recorded with its stage (`index`, `probe`, `sample`,
`decode`, `teacher`, `encode`) and reason; the run goes on. Non-finite teacher output (e.g. a zero
field of view) is said once, at the first clip; the run stops when the teacher's first clips all have
it (`Precompute._check_teacher_output` says why). `STORE/failures.jsonl` is rebuilt at the end of
every run from the committed shards; the command exits non-zero only when failed / all clips of
the store exceeds `max_failure_ratio`.

Teacher out of memory (`TeacherOOM` from the labeler) or a clip longer than `max_teacher_frames`:
the clip is labelled as two overlapping halves and merged (`clip_split`), recursively; the clip's
metadata records the split.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import ray
from rich.console import Console
from rich.markup import escape

from geovr.corpus.video import (
    SamplingConfig,
    VideoError,
    decode_frames,
    duration_of,
    num_sampled_frames,
    read_timestamps,
    sample_indices,
    select_space_aware,
)
from geovr.pipeline.clip_split import SplitError, labels_to_dict, merge_halves, split_point
from geovr.pipeline.driver_watchdog import start_watchdog, stop_watchdog
from geovr.pipeline.index import Manifest, read_manifest
from geovr.pipeline.progress import PrecomputeProgress, RunCounts, summary_table
from geovr.teacher_cache import __version__
from geovr.teacher_cache.config import from_dict, require, to_dict
from geovr.teacher_cache.frames import (
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    encode_jpeg,
    student_frame_size,
)
from geovr.teacher_cache.lease import StoreLease, acquire_lease
from geovr.teacher_cache.schema import ClipLabels, StoreFingerprint

# Batches queued per teacher actor (and its threads): the next batch's frames are fetched, and the
# last batch's labels stored, while the current one runs.
ACTOR_QUEUE = 2
# The run stops when this many clips (or all, when fewer) come out of the teacher non-finite before
# any comes out finite (`Precompute._check_teacher_output` says why).
NONFINITE_STOP_CLIPS = 4


@dataclass
class PrecomputeConfig:
    """Section `precompute` of the presets (CLI options override it).

    Attributes:
        format: store format, "zarr" or "wds".
        device: "cuda" (one GPU per teacher actor) or "cpu" (tests, demo).
        num_actors: teacher actors; 0 = one per GPU of the cluster (cuda) or 1 (cpu).
        clips_per_batch: clips per teacher call.
        decode_workers: decode tasks in flight at most; 0 = the cluster's CPUs not held by actors.
        decode_cpus: CPUs reserved per decode task.
        actor_cpus: CPUs reserved per teacher actor (its torch threads on --device cpu).
        max_inflight_shards: shards open at once; 0 = enough to queue two batches on every actor,
            plus two shards being encoded and written.
        max_failure_ratio: exit non-zero when failed / all clips of the store is above this.
        max_teacher_frames: clips with more frames are labelled as overlapping halves (0: never;
            out-of-memory splits happen regardless).
        video_max_pixels, video_min_pixels: the student frames' clip pixel budget, as the Qwen3-VL video
            processor applies it (`frames.student_frame_size`; GeoVR: 32 * 300 * 32 * 32 and
            4 * 16 * 32 * 32): the cache stores the frames at the size the student feeds.
        jpeg_quality: quality of the stored student frames.
        max_actor_restarts: Ray restarts of a crashed teacher actor before its batches fail.
    """

    format: Literal["zarr", "wds"] = "zarr"
    device: Literal["cuda", "cpu"] = "cuda"
    num_actors: int = 0
    clips_per_batch: int = 4
    decode_workers: int = 0
    decode_cpus: float = 1.0
    actor_cpus: float = 1.0
    max_inflight_shards: int = 0
    max_failure_ratio: float = 0.01
    max_teacher_frames: int = 0
    video_max_pixels: int = VIDEO_MAX_PIXELS
    video_min_pixels: int = VIDEO_MIN_PIXELS
    jpeg_quality: int = 90
    max_actor_restarts: int = 2

    def validate(self) -> None:
        require(self.num_actors >= 0, f"precompute.num_actors must be >= 0, got {self.num_actors}")
        require(
            self.clips_per_batch >= 1, f"precompute.clips_per_batch must be >= 1, got {self.clips_per_batch}"
        )
        require(
            self.decode_workers >= 0, f"precompute.decode_workers must be >= 0, got {self.decode_workers}"
        )
        require(self.decode_cpus > 0 and self.actor_cpus > 0, "precompute.decode_cpus/actor_cpus must be > 0")
        require(self.max_inflight_shards >= 0, "precompute.max_inflight_shards must be >= 0")
        require(
            0.0 <= self.max_failure_ratio <= 1.0,
            f"precompute.max_failure_ratio must be in [0, 1], got {self.max_failure_ratio}",
        )
        require(
            self.max_teacher_frames == 0 or self.max_teacher_frames >= 3,
            "precompute.max_teacher_frames must be 0 (no limit) or at least 3",
        )
        require(
            0 < self.video_min_pixels <= self.video_max_pixels,
            f"precompute.video_min_pixels ({self.video_min_pixels}) must be in (0, video_max_pixels "
            f"({self.video_max_pixels})]",
        )
        require(
            1 <= self.jpeg_quality <= 100,
            f"precompute.jpeg_quality must be in [1, 100], got {self.jpeg_quality}",
        )


# ----------------------------------------------------------------------------------------------
# Decode (CPU task)


def _failure(stage: str, reason: str) -> dict[str, Any]:
    return {"ok": False, "stage": stage, "reason": reason}


def decode_clip(
    video: str,
    corpus_root: str,
    policy: dict[str, Any],
    video_max_pixels: int,
    video_min_pixels: int,
    jpeg_quality: int,
    teacher_resize: tuple[int, int] | None = None,
) -> tuple[dict[str, Any], np.ndarray | None, dict[str, Any] | None]:
    """Sample and decode one clip; the body of the `decode_clip` Ray task.

    Every frame is resized as it is decoded (`video.decode_frames`), to the student size and the
    teacher size, so the task's memory follows those sizes (bound in `decode_frames`): the student
    frames at `frames.student_frame_size` of the clip's kept frames under the clip budget
    (`video_max_pixels`, `video_min_pixels`: GeoVR's processor settings), PIL bicubic, JPEG-encoded.

    `teacher_resize` = (long side, multiple): the teacher's frames at the teacher size, with the
    labeler's own rule and resampling (`teacher_size`, PIL bicubic from uint8). The labeler then finds
    them at its size and PIL leaves same-size images untouched, so the labels are bit-identical, the
    GPU actor skips the resize, and the object store carries teacher-size frames instead of
    source-size ones (10x less for 1080p). Not used with the Depth Anything V2 metric teacher, which
    reads the source frames (DA3-Metric reads the teacher's): then the task also holds the S
    source-size frames.

    Returns (status, frames, info):
        status: {"ok": True, "frames": S decoded, "keep": frames to keep, "decode_s"} or a failure
            {"ok": False, "stage", "reason"}.
        frames: (S, H, W, 3) uint8 RGB for the teacher (the candidates for space-aware sampling),
            at the displayed source size or at the teacher size (`teacher_resize`).
        info: frame_indices (S,) int64, timestamps (S,) float64, frames_jpeg (S student JPEGs), meta.
    """
    started = time.perf_counter()
    path = Path(corpus_root) / video
    cfg = SamplingConfig.from_policy(policy)

    def output_sizes(height: int, width: int) -> list[tuple[int, int]]:
        teacher_hw = (height, width)
        if teacher_resize is not None:
            from geovr.pipeline.labeler import teacher_size

            teacher_hw = teacher_size(height, width, *teacher_resize)
        return [teacher_hw, student_frame_size(keep, height, width, video_max_pixels, video_min_pixels)]

    try:
        pts, seconds = read_timestamps(path)
        indices = sample_indices(seconds, cfg, video)
        keep = len(indices)
        if cfg.method == "space_aware":
            keep = num_sampled_frames(duration_of(seconds), len(seconds), cfg)
        decoded = decode_frames(path, indices, (pts, seconds), output_sizes)
    except VideoError as err:
        return _failure(err.stage, str(err)), None, None
    except Exception as err:  # an unexpected decoder error must not stop the run
        return _failure("decode", f"{type(err).__name__}: {err}"), None, None
    frames, student_frames = decoded.outputs
    height, width = decoded.source_hw
    info = {
        "frame_indices": indices.astype(np.int64),
        "timestamps": decoded.seconds.astype(np.float64),
        "frames_jpeg": [encode_jpeg(f, jpeg_quality) for f in student_frames],
        "meta": {
            "source_size": [int(width), int(height)],
            "rotation": decoded.rotation,
            "source_frames": len(seconds),
            "source_fps": (len(seconds) - 1) / float(seconds[-1]) if seconds[-1] > 0 else 0.0,
            "student_size": [int(student_frames.shape[2]), int(student_frames.shape[1])],
        },
    }
    status = {
        "ok": True,
        "frames": len(indices),
        "keep": int(keep),
        "decode_s": time.perf_counter() - started,
    }
    return status, frames, info


# ----------------------------------------------------------------------------------------------
# Teacher (GPU actor)


class TeacherActor:
    """One teacher per actor, loaded once; `label` labels a batch of decoded clips.

    `label(jobs, *clips)` returns `[statuses, labels_0, ..., labels_{n-1}]` (call it with
    `num_returns = n + 1`): statuses[i] is {"ok", "frames", "split", ...} or a failure, labels_i the
    clip's `clip_split.labels_to_dict` dict (plus "selected" for space-aware clips) or None.
    """

    def __init__(self, teacher: dict[str, Any], device: str, max_teacher_frames: int, threads: int) -> None:
        import torch

        from geovr.pipeline.labeler import TeacherConfig, TeacherLabeler

        if device == "cpu":
            torch.set_num_threads(max(1, threads))
        self.labeler = TeacherLabeler(from_dict(TeacherConfig, teacher, where="teacher"), device)
        self.max_teacher_frames = max_teacher_frames
        self.device_lock = threading.Lock()  # one batch on the device at a time

    def fingerprint_parts(self) -> dict[str, Any]:
        return self.labeler.fingerprint_parts()

    def label(self, jobs: list[dict[str, Any]], *clips: np.ndarray) -> list[Any]:
        with self.device_lock:
            return self._label_locked(jobs, clips)

    def _label_locked(self, jobs: list[dict[str, Any]], clips: tuple[np.ndarray, ...]) -> list[Any]:
        started = time.perf_counter()
        results = self._label_many(list(clips))
        # Space-aware clips: choose `keep` of the candidates from their reconstruction, then label
        # the chosen frames on their own (the teacher sees exactly the frames that are stored).
        chosen: dict[int, np.ndarray] = {}
        for i, job in enumerate(jobs):
            result = results[i]
            if job.get("voxel_size") and isinstance(result, dict) and job["keep"] < len(clips[i]):
                chosen[i] = select_space_aware(
                    result["depth"],
                    result["depth_conf"],
                    result["extrinsic"],
                    result["intrinsic"],
                    result["teacher_hw"],
                    job["keep"],
                    job["voxel_size"],
                )
        if chosen:
            order = sorted(chosen)
            relabelled = self._label_many([clips[i][chosen[i]] for i in order])
            for i, result in zip(order, relabelled, strict=True):
                if isinstance(result, dict):
                    result["selected"] = chosen[i]
                results[i] = result
        elapsed = time.perf_counter() - started
        statuses: list[dict[str, Any]] = []
        labels: list[dict[str, Any] | None] = []
        for result in results:
            nonfinite = nonfinite_outputs(result) if isinstance(result, dict) else None
            if isinstance(result, dict) and not nonfinite:
                frames = int(result["extrinsic"].shape[0])
                statuses.append({"ok": True, "frames": frames, "split": bool(result.get("split"))})
                labels.append(result)
            elif nonfinite:
                statuses.append(
                    {**_failure("teacher", f"non-finite teacher output {nonfinite}"), "nonfinite": True}
                )
                labels.append(None)
            else:
                statuses.append(_failure("teacher", f"{type(result).__name__}: {result}"))
                labels.append(None)
        statuses[0]["teacher_s"] = elapsed  # the batch's busy time, reported once
        return [statuses, *labels]

    def _label_many(self, clips: list[np.ndarray]) -> list[dict[str, Any] | Exception]:
        """Label clips in one teacher call where possible; a clip that does not fit is split."""
        from geovr.pipeline.labeler import TeacherOOM

        results: list[dict[str, Any] | Exception | None] = [None] * len(clips)
        todo = []
        for i, clip in enumerate(clips):
            if self.max_teacher_frames and len(clip) > self.max_teacher_frames:
                results[i] = self._split_or_error(clip)
            else:
                todo.append(i)
        while todo:
            try:
                labelled = self.labeler.label([clips[i] for i in todo])
            except TeacherOOM as err:
                results[todo[err.clip_index]] = self._split_or_error(clips[todo[err.clip_index]])
                del todo[err.clip_index]
                continue
            except Exception as err:
                if len(todo) == 1:
                    results[todo[0]] = err
                else:  # find the clip at fault: the others still get labelled
                    for i in todo:
                        results[i] = self._label_many([clips[i]])[0]
                todo = []
                continue
            for i, labels in zip(todo, labelled, strict=True):
                results[i] = labels_to_dict(labels)
            todo = []
        return results  # type: ignore[return-value]

    def _split_or_error(self, clip: np.ndarray) -> dict[str, Any] | Exception:
        try:
            m = split_point(len(clip))
            first, second = self._label_many([clip[: m + 1], clip[m:]])
            for part in (first, second):
                if isinstance(part, Exception):
                    return part
            return merge_halves(first, second)  # type: ignore[arg-type]
        except SplitError as err:
            return err


# Teacher outputs that must be finite for a clip to be stored (the scale may be NaN: not valid).
LABEL_OUTPUTS = ("pose_enc", "extrinsic", "intrinsic", "depth", "depth_conf", "features")


def nonfinite_outputs(labels: dict[str, Any]) -> str:
    """The teacher outputs of one clip's labels that hold non-finite values, with the likely cause
    where it is known ("" when all are finite), e.g. "intrinsic (the camera head's field of view is 0
    in 5 of 5 frames: an infinite focal length)"."""
    names = [name for name in LABEL_OUTPUTS if not np.isfinite(labels[name]).all()]
    if not names:
        return ""
    zero_fov = int((labels["pose_enc"][:, 7:9] <= 0).any(axis=1).sum())
    if "intrinsic" in names and zero_fov:
        frames = len(labels["pose_enc"])
        return (
            f"{', '.join(names)} (the camera head's field of view is 0 in {zero_fov} of {frames} frames: "
            "an infinite focal length)"
        )
    return ", ".join(names)


# ----------------------------------------------------------------------------------------------
# Shard writer (CPU task)


def assemble_clip(row: dict[str, Any], info: dict[str, Any], labels: dict[str, Any]) -> ClipLabels:
    """ClipLabels of one clip from its decode `info` and teacher `labels` (see `TeacherActor.label`)."""
    indices, times, jpegs = info["frame_indices"], info["timestamps"], info["frames_jpeg"]
    meta = dict(info["meta"])
    meta["teacher_size"] = [int(labels["teacher_hw"][1]), int(labels["teacher_hw"][0])]
    selected = labels.get("selected")
    if selected is not None:
        meta["space_aware"] = {
            "candidate_frame_indices": [int(i) for i in indices],
            "selected": [int(i) for i in selected],
        }
        indices, times, jpegs = indices[selected], times[selected], [jpegs[int(i)] for i in selected]
    if labels.get("split"):
        meta["split"] = labels["split"]
    clip = ClipLabels(
        clip_id=row["clip_id"],
        video=row["video"],
        frame_indices=np.asarray(indices, dtype=np.int64),
        timestamps=np.asarray(times, dtype=np.float64),
        frames_jpeg=list(jpegs),
        pose_enc=labels["pose_enc"].astype(np.float32),
        extrinsic=labels["extrinsic"].astype(np.float32),
        intrinsic=labels["intrinsic"].astype(np.float32),
        depth=labels["depth"].astype(np.float32),
        depth_conf=labels["depth_conf"].astype(np.float32),
        scale=float(labels["scale"]),
        scale_valid=bool(labels["scale_valid"]),
        features=labels["features"].astype(np.float32),
        meta=meta,
    )
    clip.validate()
    return clip


def encode_labels(
    row: dict[str, Any], info: dict[str, Any], labels: dict[str, Any], codecs: Any
) -> tuple[dict[str, Any], Any]:
    """Body of the `encode_labels` Ray task: one labelled clip -> its stored form (`EncodedClip`).

    Encoding per clip, on CPU workers, as soon as the teacher is done: the float32 labels (about
    4 MB of features per VGGT-1B frame) leave the object store early and the shard writer only
    concatenates ~7x smaller encoded clips. Returns (status, encoded clip or None); labels the
    store's codecs refuse (non-finite values, bad shapes) fail at stage "encode".
    """
    from geovr.teacher_cache.codecs import encode_clip

    started = time.perf_counter()
    try:
        encoded = encode_clip(assemble_clip(row, info, labels), codecs)
    except ValueError as err:  # SchemaError names the clip and the field
        return _failure("encode", str(err)), None
    status = {
        "ok": True,
        "frames": int(encoded.num_frames),
        "split": bool(labels.get("split")),
        "scale_valid": bool(labels["scale_valid"]),
        "encode_s": time.perf_counter() - started,
    }
    return status, encoded


def write_shard(
    store: str,
    fingerprint: dict[str, Any],
    store_format: str,
    shard: str,
    encoded_refs: list[Any],
    failures: list[dict[str, Any]],
    keep_stored: bool,
    lease_token: str,
) -> dict[str, Any]:
    """Body of the `write_shard` Ray task: commit one shard whole, clips in clip-id (manifest) order.

    `encoded_refs`: object refs of the shard's `EncodedClip`s, fetched here, not by the driver.
    `keep_stored` (retry-failed): the clips the store already holds for this shard are kept as
    stored bytes (rewritten bit for bit) beside the newly labelled ones. `lease_token`: the run's
    store lease (held by the driver), checked before the commit.
    """
    from geovr.teacher_cache.store import open_store, open_writer

    started = time.perf_counter()
    encoded = {clip.clip_id: clip for clip in ray.get(list(encoded_refs))}
    writer = open_writer(
        Path(store), StoreFingerprint.from_json(fingerprint), store_format, lease_token=lease_token
    )
    committed = writer.is_committed(shard)
    if committed and not keep_stored:  # a retried task whose first try committed
        return {"shard": shard, "clips": len(encoded), "write_s": time.perf_counter() - started}
    if keep_stored:
        for clip in open_store(store).iter_shard_encoded(shard):
            encoded.setdefault(clip.clip_id, clip)
    # keep_stored: the new version replaces the committed one atomically (the store's commit protocol).
    record = writer.write_encoded_shard(
        shard, [encoded[k] for k in sorted(encoded)], failures, replace=keep_stored
    )
    return {"shard": shard, "clips": record["num_clips"], "write_s": time.perf_counter() - started}


# ----------------------------------------------------------------------------------------------
# Driver


@dataclass
class _Clip:
    row: dict[str, Any]
    state: str = "pending"  # pending -> decoding -> decoded -> labelling -> encoding -> done | failed
    frames_ref: Any = None
    info_ref: Any = None
    encoded_ref: Any = None
    keep: int = 0


@dataclass
class _Shard:
    shard_id: str
    clips: list[_Clip]
    keep_stored: bool = False
    failures: list[dict[str, Any]] = field(default_factory=list)
    next_to_batch: int = 0  # clips before this index are resolved (decoded or failed) and batched
    forming: list[_Clip] = field(default_factory=list)
    writing: bool = False

    def complete(self) -> bool:
        return all(c.state in ("done", "failed") for c in self.clips)


@dataclass
class _Batch:
    shard: _Shard
    clips: list[_Clip]
    attempts: int = 0


def check_committed_shards(
    by_shard: dict[str, list[dict[str, Any]]], markers: dict[str, dict[str, Any]], store: Path
) -> None:
    """Refuse to resume when a committed shard holds other clips than the manifest puts in it.

    That happens when the corpus was re-indexed from scratch after videos were added (shards are
    packed by sorted clip id): resuming would skip committed shards whose clip lists no longer
    match and silently leave clips unlabelled. `index --extend OLD_MANIFEST` keeps the old layout.
    """
    for shard_id, marker in sorted(markers.items()):
        stored = {row["clip_id"] for row in marker["clips"]}
        wanted = {row["clip_id"] for row in by_shard.get(shard_id, [])}
        if stored != wanted:
            raise ValueError(
                f"{store}: committed shard {shard_id} holds {len(stored)} clips, the manifest assigns it "
                f"{len(wanted)} ({len(stored - wanted)} not in the manifest's shard, {len(wanted - stored)} "
                "missing): the manifest's shard layout changed since the store was written; re-index with "
                "`geovr-pipeline index ... --extend OLD_MANIFEST` so that committed shards keep their clips"
            )


@dataclass
class RunResult:
    counts: RunCounts
    timings: dict[str, float]
    failure_ratio: float
    store_clips: int
    store_failures: int
    exit_code: int


def connect_ray(address: str | None, cpus: int | None = None) -> bool:
    """Connect to the cluster at `address` ("local": start one in-process; None: Ray's default).

    Every Ray process stays on loopback for a local cluster, and a watchdog (`driver_watchdog`) ends
    the local cluster's processes within about a second of this driver's end, however it ends
    (SIGKILL included). Returns whether this call started Ray.
    """
    if ray.is_initialized():
        return False
    if address == "local" or (address or "").split(":")[0] in ("127.0.0.1", "localhost"):
        # Otherwise Ray rewrites 127.0.0.1 to the host's external address. Not for real clusters:
        # there the driver must advertise an address the other nodes can reach.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if address == "local":
        start_watchdog()
        ray.init(
            address="local",
            num_cpus=cpus,
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            logging_level="WARNING",
            log_to_driver=False,
        )
    else:
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    return True


class Precompute:
    """One precompute run: builds the actors, schedules decode/label/write, writes run.json."""

    def __init__(
        self,
        manifest: Manifest,
        store: Path,
        teacher: dict[str, Any],
        cfg: PrecomputeConfig,
        console: Console,
        lease: StoreLease,
        retry_failed: bool = False,
        config_record: dict[str, Any] | None = None,
    ) -> None:
        """`lease`: the store lease this run holds (`run_precompute` takes it)."""
        self.manifest = manifest
        self.store = Path(store)
        self.lease = lease
        self.teacher = teacher
        self.cfg = cfg
        self.console = console
        self.retry_failed = retry_failed
        self.config_record = config_record or {}
        self.sampling = SamplingConfig.from_policy(manifest.sampling)
        self.counts = RunCounts()
        self.timings: dict[str, float] = {"decode_s": 0.0, "teacher_s": 0.0, "encode_s": 0.0, "write_s": 0.0}
        self.teacher_clips = {"finite": 0, "nonfinite": 0}  # clips the teacher returned, by output

    # -- setup ---------------------------------------------------------------------------------

    def _num_actors(self) -> int:
        if self.cfg.num_actors:
            return self.cfg.num_actors
        if self.cfg.device == "cpu":
            return 1
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpus == 0:
            raise ValueError(
                "--device cuda but the Ray cluster has no GPUs; pass --device cpu or a GPU cluster"
            )
        return gpus

    def _start_actors(self, count: int) -> list[Any]:
        gpu = self.cfg.device == "cuda"
        actor_cls = ray.remote(TeacherActor).options(
            num_gpus=1 if gpu else 0,
            num_cpus=self.cfg.actor_cpus,
            max_restarts=self.cfg.max_actor_restarts,
            max_concurrency=ACTOR_QUEUE,
        )
        threads = max(1, int(self.cfg.actor_cpus))
        return [
            actor_cls.remote(self.teacher, self.cfg.device, self.cfg.max_teacher_frames, threads)
            for _ in range(count)
        ]

    def fingerprint(self, parts: dict[str, Any]) -> StoreFingerprint:
        preprocess = dict(parts["preprocess"])
        preprocess["student_frames"] = {
            "video_max_pixels": self.cfg.video_max_pixels,
            "video_min_pixels": self.cfg.video_min_pixels,
            "rule": "frames.student_frame_size of the kept frames (clip budget, repeat pairing), "
            "displayed orientation, PIL bicubic at decode, JPEG",
            "jpeg_quality": self.cfg.jpeg_quality,
        }
        return StoreFingerprint(
            teacher=parts["teacher"],
            checkpoint_sha256=parts["checkpoint_sha256"],
            teacher_config=parts["teacher_config"],
            metric_teacher=parts["metric_teacher"],
            preprocess=preprocess,
            sampling=self.manifest.sampling,
            feature_layers=tuple(int(x) for x in self.teacher["feature_layers"]),
            code_version=__version__,
        )

    def _plan(self, writer: Any) -> list[_Shard]:
        """The shards this run labels: uncommitted ones, or with --retry-failed the failed clips of committed ones."""
        from geovr.teacher_cache.store import open_store

        committed = set(writer.committed_shards())
        by_shard = self.manifest.shards()
        self.counts.shards_total = len(by_shard)
        reader = open_store(self.store)
        check_committed_shards(by_shard, reader.markers, self.store)
        shards: list[_Shard] = []
        if self.retry_failed:
            failed = {f["clip_id"] for f in reader.failures()}
            for shard_id, rows in by_shard.items():
                if shard_id not in committed:
                    shards.append(_Shard(shard_id, [_Clip(r) for r in rows]))
                    continue
                retry = [r for r in rows if r["clip_id"] in failed]
                if retry:
                    shards.append(_Shard(shard_id, [_Clip(r) for r in retry], keep_stored=True))
                else:
                    self.counts.shards_skipped += 1
        else:
            for shard_id, rows in by_shard.items():
                if shard_id in committed:
                    self.counts.shards_skipped += 1
                else:
                    shards.append(_Shard(shard_id, [_Clip(r) for r in rows]))
        self.counts.clips_todo = sum(len(s.clips) for s in shards)
        return shards

    # -- run -----------------------------------------------------------------------------------

    def run(self) -> RunResult:
        started = time.perf_counter()
        actors = self._start_actors(self._num_actors())
        try:
            return self._run(actors, started)
        finally:  # also on errors (e.g. a refused fingerprint): free the GPUs of a shared cluster
            for actor in actors:
                ray.kill(actor)

    def _warn(self, message: str) -> None:
        warn_line(self.console, message)

    def _run(self, actors: list[Any], started: float) -> RunResult:
        from geovr.teacher_cache.store import open_writer

        cfg = self.cfg
        num_actors = len(actors)
        try:
            parts = ray.get(actors[0].fingerprint_parts.remote())
        except ray.exceptions.RayActorError as err:
            if not getattr(err, "actor_init_failed", False):
                raise
            # The error's last line is the exception the teacher raised; the rest is Ray's traceback.
            raise ValueError(
                f"the teacher actor failed to start: {str(err).strip().splitlines()[-1]}"
            ) from None
        self.timings["actor_startup_s"] = time.perf_counter() - started
        fingerprint = self.fingerprint(parts)
        # Refuses a different fingerprint; removes what killed writers left (under the run's lease).
        writer = open_writer(self.store, fingerprint, cfg.format, lease=self.lease)
        shards = self._plan(writer)

        cpus = int(ray.cluster_resources().get("CPU", 1))
        decode_workers = cfg.decode_workers or max(
            1, int((cpus - num_actors * cfg.actor_cpus) // cfg.decode_cpus)
        )
        # Enough open shards to queue two batches per actor, plus two being encoded and written.
        max_shards = cfg.max_inflight_shards or (
            math.ceil(2 * num_actors * cfg.clips_per_batch / max(self.manifest.clips_per_shard, 1)) + 2
        )
        max_waiting = 2 * cfg.clips_per_batch * num_actors
        decode_task = ray.remote(decode_clip).options(num_returns=3, num_cpus=cfg.decode_cpus, max_retries=1)
        encode_task = ray.remote(encode_labels).options(
            num_returns=2, num_cpus=cfg.decode_cpus, max_retries=1
        )
        write_task = ray.remote(write_shard).options(num_cpus=0, max_retries=2)
        fingerprint_json = fingerprint.to_json()

        queue = deque(shards)
        active: list[_Shard] = []
        batches: deque[_Batch] = deque()
        load = [0] * num_actors  # batches queued on each actor (at most ACTOR_QUEUE)
        pending: dict[Any, tuple[str, Any]] = {}  # ref -> (kind, payload)
        decoding = 0
        waiting = 0  # decoded clips whose frames wait for a teacher
        space_aware = self.sampling.method == "space_aware"
        # Depth Anything V2 reads the source frames; VGGT and DA3-Metric read the teacher-size ones.
        teacher_resize = (
            None
            if self.teacher.get("metric_checkpoint")
            and self.teacher.get("metric_teacher") == "depth-anything-v2"
            else (int(self.teacher["image_long_side"]), int(self.teacher["size_multiple"]))
        )

        def fail(shard: _Shard, clip: _Clip, stage: str, reason: str) -> None:
            clip.state = "failed"
            clip.frames_ref = clip.info_ref = clip.encoded_ref = None
            shard.failures.append(
                {"clip_id": clip.row["clip_id"], "video": clip.row["video"], "stage": stage, "reason": reason}
            )
            self.counts.clips_failed += 1
            self.counts.failures_by_stage[stage] = self.counts.failures_by_stage.get(stage, 0) + 1

        def form_batches(shard: _Shard) -> None:
            """Batch the shard's decoded clips in manifest order once every earlier clip is resolved."""
            while shard.next_to_batch < len(shard.clips):
                clip = shard.clips[shard.next_to_batch]
                if clip.state in ("pending", "decoding"):
                    break
                if clip.state == "decoded":
                    shard.forming.append(clip)
                shard.next_to_batch += 1
                if len(shard.forming) == cfg.clips_per_batch:
                    batches.append(_Batch(shard, shard.forming))
                    shard.forming = []
            if shard.next_to_batch == len(shard.clips) and shard.forming:
                batches.append(_Batch(shard, shard.forming))
                shard.forming = []

        def submit_decodes() -> None:
            nonlocal decoding
            while queue and len(active) < max_shards:
                shard = queue.popleft()
                active.append(shard)
                for clip in shard.clips:
                    if clip.row["status"] != "ok":
                        fail(shard, clip, "index", clip.row["reason"] or clip.row["status"])
                form_batches(shard)
            for shard in active:
                for clip in shard.clips:
                    if decoding >= decode_workers or waiting + decoding >= max_waiting:
                        return
                    if clip.state != "pending":
                        continue
                    status, frames, info = decode_task.remote(
                        clip.row["video"],
                        str(self.manifest.corpus_root),
                        self.manifest.sampling,
                        cfg.video_max_pixels,
                        cfg.video_min_pixels,
                        cfg.jpeg_quality,
                        teacher_resize,
                    )
                    clip.state, clip.frames_ref, clip.info_ref = "decoding", frames, info
                    pending[status] = ("decode", (shard, clip))
                    decoding += 1

        def dispatch_batches() -> None:
            nonlocal waiting
            while batches and min(load) < ACTOR_QUEUE:
                batch = batches.popleft()
                actor = load.index(min(load))
                load[actor] += 1
                jobs = [
                    {
                        "clip_id": c.row["clip_id"],
                        "keep": c.keep,
                        "voxel_size": self.sampling.voxel_size if space_aware else 0.0,
                    }
                    for c in batch.clips
                ]
                refs = (
                    actors[actor]
                    .label.options(num_returns=len(batch.clips) + 1)
                    .remote(jobs, *[c.frames_ref for c in batch.clips])
                )
                for c in batch.clips:
                    c.state = "labelling"
                pending[refs[0]] = ("label", (batch, actor, refs[1:]))

        def submit_writes() -> None:
            for shard in list(active):
                if shard.writing or not shard.complete():
                    continue
                ref = write_task.remote(
                    str(self.store),
                    fingerprint_json,
                    cfg.format,
                    shard.shard_id,
                    [c.encoded_ref for c in shard.clips if c.state == "done"],
                    shard.failures,
                    shard.keep_stored,
                    self.lease.token,
                )
                shard.writing = True
                pending[ref] = ("write", shard)

        progress = PrecomputeProgress(self.console, self.counts, num_actors)
        with progress:
            submit_decodes()
            submit_writes()  # shards whose clips all failed at indexing
            while pending or batches or queue:
                self.lease.check()  # a run whose lease was taken over stops
                dispatch_batches()
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                for ref in ready:
                    kind, payload = pending.pop(ref)
                    if kind == "decode":
                        decoding -= 1
                        self._on_decoded(ref, *payload, fail)
                        if payload[1].state == "decoded":
                            waiting += 1
                        form_batches(payload[0])
                    elif kind == "label":
                        batch, actor, label_refs = payload
                        waiting -= self._on_labelled(ref, batch, fail, batches)
                        load[actor] -= 1
                        for clip, label_ref in zip(batch.clips, label_refs, strict=True):
                            if clip.state == "encoding":
                                status, clip.encoded_ref = encode_task.remote(
                                    clip.row, clip.info_ref, label_ref, writer.codecs
                                )
                                clip.info_ref = None  # the encode task holds it until it has run
                                pending[status] = ("encode", (batch.shard, clip))
                    elif kind == "encode":
                        self._on_encoded(ref, *payload, fail)
                    else:
                        self._on_written(ref, payload)
                        active.remove(payload)
                submit_decodes()
                submit_writes()
                progress.update(sum(1 for n in load if n))

        self.timings["wall_s"] = time.perf_counter() - started
        return self._finish(decode_workers, max_shards, num_actors)

    # -- event handlers ------------------------------------------------------------------------

    def _on_decoded(self, ref: Any, shard: _Shard, clip: _Clip, fail: Any) -> None:
        try:
            status = ray.get(ref)
        except ray.exceptions.RayError as err:  # the worker died (e.g. a decoder crash)
            fail(shard, clip, "decode", f"decode task failed: {type(err).__name__}: {str(err)[:300]}")
            return
        if not status["ok"]:
            fail(shard, clip, status["stage"], status["reason"])
            return
        self.timings["decode_s"] += status["decode_s"]
        clip.state, clip.keep = "decoded", status["keep"]

    def _on_labelled(self, ref: Any, batch: _Batch, fail: Any, batches: deque) -> int:
        """Handle a finished teacher call; returns how many decoded clips left the waiting set."""
        try:
            statuses = ray.get(ref)
        except ray.exceptions.RayActorError as err:
            batch.attempts += 1
            if batch.attempts <= self.cfg.max_actor_restarts:
                for c in batch.clips:
                    c.state = "decoded"
                batches.appendleft(batch)
                return 0
            for c in batch.clips:
                fail(batch.shard, c, "teacher", f"teacher actor died: {str(err)[:300]}")
            return len(batch.clips)
        except ray.exceptions.RayError as err:
            for c in batch.clips:
                fail(batch.shard, c, "teacher", f"{type(err).__name__}: {str(err)[:300]}")
            return len(batch.clips)
        self.timings["teacher_s"] += statuses[0].get("teacher_s", 0.0)
        for clip, status in zip(batch.clips, statuses, strict=True):
            clip.frames_ref = None  # the frames are no longer needed: let the object store free them
            self._check_teacher_output(clip, status)
            if status["ok"]:
                clip.state = "encoding"
            else:
                fail(batch.shard, clip, status["stage"], status["reason"])
        return len(batch.clips)

    def _check_teacher_output(self, clip: _Clip, status: dict[str, Any]) -> None:
        """Non-finite teacher output is said once, at the first clip that has it; the run stops when
        the first `NONFINITE_STOP_CLIPS` clips the teacher returned all have it.

        Why stop: non-finite output from the start almost always means a broken or mismatched
        checkpoint (e.g. a camera head whose field of view is 0), and every clip would fail the same
        way: on a corpus of 100,000 videos that is hours of GPU time spent on failure rows. Why not
        at the first such clip: one pathological video must not stop a run, so a few clips must agree
        (and once any clip came out finite, the run goes on and counts the others as failures).
        """
        counts = self.teacher_clips
        if not status.get("nonfinite"):
            counts["finite"] += int(status["ok"])
            return
        counts["nonfinite"] += 1
        checkpoint = self.teacher.get("checkpoint")
        if counts["nonfinite"] == 1:
            self._warn(
                f"clip {clip.row['clip_id']} ({clip.row['video']}): {status['reason']}; the teacher checkpoint "
                f"{checkpoint} is the likely cause (further clips like this are counted, not reported)"
            )
        if counts["finite"] == 0 and counts["nonfinite"] >= min(NONFINITE_STOP_CLIPS, self.counts.clips_todo):
            raise ValueError(
                f"the teacher's first {counts['nonfinite']} clips all have {status['reason']}; the teacher "
                f"checkpoint {checkpoint} is the likely cause: stopping before labelling the other "
                f"{self.counts.clips_todo - counts['nonfinite']} clips"
            )

    def _on_encoded(self, ref: Any, shard: _Shard, clip: _Clip, fail: Any) -> None:
        try:
            status = ray.get(ref)
        except ray.exceptions.RayError as err:
            fail(shard, clip, "encode", f"encode task failed: {type(err).__name__}: {str(err)[:300]}")
            return
        if not status["ok"]:
            fail(shard, clip, status["stage"], status["reason"])
            return
        clip.state = "done"
        self.timings["encode_s"] += status["encode_s"]
        self.counts.clips_ok += 1
        self.counts.frames += status["frames"]
        self.counts.clips_split += int(status["split"])
        self.counts.clips_without_scale += int(not status["scale_valid"])

    def _on_written(self, ref: Any, shard: _Shard) -> None:
        try:
            result = ray.get(ref)
        except ray.exceptions.RayError as err:
            self.lease.check()  # a lost lease is the cause to report
            raise RuntimeError(f"shard {shard.shard_id} could not be written to {self.store}: {err}") from err
        self.timings["write_s"] += result["write_s"]
        self.counts.shards_written += 1
        for clip in shard.clips:
            clip.encoded_ref = None

    # -- end of run ----------------------------------------------------------------------------

    def _finish(self, decode_workers: int, max_shards: int, num_actors: int) -> RunResult:
        from geovr.teacher_cache.store import open_store

        reader = open_store(self.store)
        failures = reader.failures()
        stored = len(reader.clip_ids())
        total = stored + len(failures)
        ratio = len(failures) / total if total else 0.0
        tmp = self.store / "failures.jsonl.tmp"
        tmp.write_text("".join(json.dumps(f, sort_keys=True) + "\n" for f in failures))
        tmp.replace(self.store / "failures.jsonl")
        exit_code = 1 if ratio > self.cfg.max_failure_ratio else 0
        record = {
            "config": {
                **self.config_record,
                "precompute": to_dict(self.cfg),
                "teacher": {k: str(v) if isinstance(v, Path) else v for k, v in self.teacher.items()},
                "sampling": self.manifest.sampling,
                "resolved": {
                    "num_actors": num_actors,
                    "decode_workers": decode_workers,
                    "max_inflight_shards": max_shards,
                },
                "retry_failed": self.retry_failed,
            },
            "timings": self.timings,
            "counts": {
                "shards_total": self.counts.shards_total,
                "shards_skipped": self.counts.shards_skipped,
                "shards_written": self.counts.shards_written,
                "clips_todo": self.counts.clips_todo,
                "clips_ok": self.counts.clips_ok,
                "clips_failed": self.counts.clips_failed,
                "clips_split": self.counts.clips_split,
                "clips_without_scale": self.counts.clips_without_scale,
                "frames": self.counts.frames,
                "failures_by_stage": self.counts.failures_by_stage,
                "store_clips": stored,
                "store_failures": len(failures),
                "store_failure_ratio": ratio,
            },
            "exit_code": exit_code,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        tmp = self.store / "run.json.tmp"
        tmp.write_text(json.dumps(record, indent=1, default=str))
        tmp.replace(self.store / "run.json")
        self.console.print(summary_table(self.counts, self.timings, ratio))
        return RunResult(self.counts, self.timings, ratio, stored, len(failures), exit_code)


def run_precompute(
    manifest_path: Path,
    store: Path,
    teacher: dict[str, Any],
    cfg: PrecomputeConfig,
    ray_address: str | None,
    console: Console,
    retry_failed: bool = False,
    config_record: dict[str, Any] | None = None,
) -> RunResult:
    """Read the manifest, check the teacher settings against the checkpoint, take the store's lease
    (refused while another run writes the store), connect to Ray, run, disconnect (if this call
    connected), give the lease up."""
    from geovr.pipeline.labeler import TeacherConfig, check_teacher_config

    manifest = read_manifest(manifest_path)
    check_teacher_config(from_dict(TeacherConfig, teacher, where="teacher"))  # before any actor starts
    what = "precompute --retry-failed" if retry_failed else "precompute"
    with acquire_lease(store, what, warn=lambda message: warn_line(console, message)) as lease:
        started_ray = connect_ray(ray_address)
        try:
            return Precompute(
                manifest, store, teacher, cfg, console, lease, retry_failed, config_record
            ).run()
        finally:
            if started_ray:
                ray.shutdown()
                stop_watchdog()


def warn_line(console: Console, message: str) -> None:
    """One `warning:` line (never wrapped: it is read and matched by line)."""
    console.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True, highlight=False)
