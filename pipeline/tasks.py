"""The CPU tasks of a precompute run, which Ray runs; the driver (`precompute`) schedules them, and
the teacher actor (`teacher_actor`) labels between decode and encode. Each returns a status dict per
clip, {"ok": True, ...} or a failure {"ok": False, "stage", "reason"}, which the driver turns into
the store's typed `ClipFailure`.

This module does not import torch: every Ray worker that runs one of these tasks imports it, one
worker per CPU of the node (torch would add about 180 MB and a second to each).

- `decode_clip` (CPU task): probe the timestamps, sample, decode (PyAV, `corpus.video`), resize and
  JPEG the student frames, resize the teacher frames.
- `encode_labels` (CPU task): one clip's labels -> the store's `EncodedClip`.
- `write_shard` (task): commit one shard whole into the store.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import ray

from geovr.corpus.config import SamplingConfig
from geovr.corpus.video import (
    VideoError,
    decode_frames,
    duration_of,
    num_sampled_frames,
    read_timestamps,
    sample_indices,
)
from geovr.teacher_cache.frames import encode_jpeg, student_frame_size
from geovr.teacher_cache.records import ClipFailure
from geovr.teacher_cache.schema import ClipLabels, StoreFingerprint


def failure_status(stage: str, reason: str) -> dict[str, Any]:
    return {"ok": False, "stage": stage, "reason": reason}


def decode_clip(
    video: str,
    corpus_root: str,
    policy: dict[str, Any],
    video_max_pixels: int,
    video_min_pixels: int,
    jpeg_quality: int,
    teacher_resize: tuple[int, int] | None = None,
    decode_threads: int = 0,
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

    `decode_threads`: the FFmpeg decoder's threads (`decode_frames`; 0: one per core of the node).

    Returns (status, frames, info):
        status: {"ok": True, "frames": S decoded, "keep": frames to keep, "student_hw", "decode_s"} or a failure
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
        decoded = decode_frames(path, indices, (pts, seconds), output_sizes, decode_threads)
    except VideoError as err:
        return failure_status(err.stage, str(err)), None, None
    except Exception as err:  # an unexpected decoder error must not stop the run
        return failure_status("decode", f"{type(err).__name__}: {err}"), None, None
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
        "student_hw": [int(student_frames.shape[1]), int(student_frames.shape[2])],
        "decode_s": time.perf_counter() - started,
    }
    return status, frames, info


# ----------------------------------------------------------------------------------------------
# Shard writer (CPU task)


def assemble_clip(row: dict[str, Any], info: dict[str, Any], labels: dict[str, Any]) -> ClipLabels:
    """ClipLabels of one clip from its decode `info` and teacher `labels` (see `teacher_actor.TeacherActor.label`)."""
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
    fusion = labels.get("fusion")
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
        fusion=None if fusion is None else fusion.astype(np.float32),
        ground_truth=labels.get("ground_truth"),
    )
    clip.validate()
    return clip


def encode_labels(
    row: dict[str, Any], info: dict[str, Any], labels: dict[str, Any], codecs: Any,
    ground_truth: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], Any]:  # fmt: skip
    """Body of the `encode_labels` Ray task: one labelled clip -> its stored form (`EncodedClip`).

    Encoding per clip, on CPU workers, as soon as the teacher is done: the float32 labels (about
    4 MB of features per VGGT-1B frame) leave the object store early and the shard writer only
    concatenates ~7x smaller encoded clips. Returns (status, encoded clip or None); labels the
    store's codecs refuse (non-finite values, bad shapes) fail at stage "encode".

    `ground_truth` ({"corpus_root", "sources"}, None for teacher labels only): the fields whose
    source is "gt" come from the clip's RGB-D folder, those whose source is "both" are stored
    beside the teacher's (`ground_truth_labels`); status "gt_fallback"
    says why a clip kept the teacher's ("" when it did not), "gt_problem" whether that is a damaged
    folder rather than none.
    """
    from geovr.teacher_cache.codecs import encode_clip

    started = time.perf_counter()
    fallback = {"gt_fallback": "", "gt_problem": False}
    try:
        if ground_truth is not None:
            info, labels, fallback = ground_truth_labels(row, info, labels, ground_truth)
        encoded = encode_clip(assemble_clip(row, info, labels), codecs)
    except ValueError as err:  # SchemaError names the clip and the field
        return failure_status("encode", str(err)), None
    status = {
        "ok": True,
        "frames": int(encoded.num_frames),
        "split": bool(labels.get("split")),
        "scale_valid": bool(labels["scale_valid"]),
        "encode_s": time.perf_counter() - started,
        **fallback,
    }
    return status, encoded


def ground_truth_labels(
    row: dict[str, Any], info: dict[str, Any], labels: dict[str, Any], ground_truth: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(info, labels, fallback status) of one clip under the ground-truth choice
    (`pipeline.ground_truth.with_ground_truth`); the clip's meta records `label_sources`."""
    from geovr.corpus.ground_truth import clip_frames
    from geovr.pipeline.ground_truth import with_ground_truth

    indices, times = info["frame_indices"], info["timestamps"]
    if labels.get("selected") is not None:
        indices, times = indices[labels["selected"]], times[labels["selected"]]
    meta = {**info["meta"], "teacher_size": [int(labels["teacher_hw"][1]), int(labels["teacher_hw"][0])]}
    frames = clip_frames(meta, indices, times, labels["depth"].shape[1:])
    result = with_ground_truth(
        ground_truth["corpus_root"], ground_truth["sources"], row["video"], row.get("rgbd"), frames, labels
    )  # fmt: skip
    paired = {"rgbd": row["rgbd"]} if row.get("rgbd") is not None else {}  # index's pairing, for eval
    info = {**info, "meta": {**info["meta"], "label_sources": result.sources, **paired}}
    return info, result.labels, {"gt_fallback": result.fallback, "gt_problem": result.problem}


def write_shard(
    store: str,
    fingerprint: dict[str, Any],
    store_format: str,
    shard: str,
    encoded_refs: list[Any],
    failures: list[ClipFailure],
    keep_stored: bool,
    lease_token: str,
) -> dict[str, Any]:
    """Body of the `write_shard` Ray task: commit one shard whole, clips in clip-id (manifest) order.

    `encoded_refs`: object refs of the shard's `EncodedClip`s, fetched here, not by the driver.
    `keep_stored` (retry-failed): the clips the store already holds for this shard are kept as
    stored bytes (rewritten bit for bit) beside the newly labelled ones. `lease_token`: the run's
    store lease (held by the driver), checked before the commit.
    """
    from geovr.teacher_cache.store import iter_committed_shard, open_writer

    started = time.perf_counter()
    encoded = {clip.clip_id: clip for clip in ray.get(list(encoded_refs))}
    writer = open_writer(
        Path(store), StoreFingerprint.from_json(fingerprint), store_format, lease_token=lease_token
    )
    committed = writer.is_committed(shard)
    if committed and not keep_stored:  # a retried task whose first try committed
        return {"shard": shard, "clips": len(encoded), "write_s": time.perf_counter() - started}
    if keep_stored:
        for clip in iter_committed_shard(Path(store), shard):
            encoded.setdefault(clip.clip_id, clip)
    # keep_stored: the new version replaces the committed one atomically (the store's commit protocol).
    record = writer.write_encoded_shard(
        shard, [encoded[k] for k in sorted(encoded)], failures, replace=keep_stored
    )
    return {"shard": shard, "clips": record["num_clips"], "write_s": time.perf_counter() - started}
