"""The work of a precompute run that Ray runs, one function or actor per kind; the driver
(`precompute`) schedules them. Each returns a status dict per clip, {"ok": True, ...} or a failure
{"ok": False, "stage", "reason"}, which the driver turns into the store's typed `ClipFailure`.

- `decode_clip` (CPU task): probe the timestamps, sample, decode (PyAV, `corpus.video`), resize and
  JPEG the student frames, resize the teacher frames.
- `TeacherActor` (GPU actor, or a CPU actor with --device cpu): the teacher loaded once, labelling
  batches of decoded clips; a clip that does not fit is split into overlapping halves (`clip_split`).
- `encode_labels` (CPU task): one clip's labels -> the store's `EncodedClip`.
- `write_shard` (task): commit one shard whole into the store.
"""

from __future__ import annotations

import threading
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
    select_space_aware,
)
from geovr.pipeline.clip_split import SplitError, labels_to_dict, merge_halves, split_point
from geovr.pipeline.config import TeacherConfig
from geovr.teacher_cache.frames import encode_jpeg, student_frame_size
from geovr.teacher_cache.records import ClipFailure
from geovr.teacher_cache.schema import ClipLabels, StoreFingerprint


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
        "student_hw": [int(student_frames.shape[1]), int(student_frames.shape[2])],
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

    def __init__(self, teacher: TeacherConfig, device: str, max_teacher_frames: int, threads: int) -> None:
        import torch

        from geovr.pipeline.labeler import TeacherLabeler

        if device == "cpu":
            torch.set_num_threads(max(1, threads))
        self.labeler = TeacherLabeler(teacher, device)
        self.max_teacher_frames = max_teacher_frames
        self.device_lock = threading.Lock()  # one batch on the device at a time

    def fingerprint_parts(self) -> dict[str, Any]:
        return self.labeler.fingerprint_parts()

    def label(self, jobs: list[dict[str, Any]], *clips: np.ndarray) -> list[Any]:
        with self.device_lock:
            return self._label_locked(jobs, clips)

    def _label_locked(self, jobs: list[dict[str, Any]], clips: tuple[np.ndarray, ...]) -> list[Any]:
        started = time.perf_counter()
        # Fusion features (when the teacher stores them) for the frames that are stored only: not for
        # the candidates of a space-aware clip, which are relabelled below.
        candidates = [
            bool(job.get("voxel_size")) and job["keep"] < len(clip)
            for job, clip in zip(jobs, clips, strict=True)
        ]
        student_sizes = [
            None if c else job.get("student_hw") for job, c in zip(jobs, candidates, strict=True)
        ]
        results = self._label_many(list(clips), student_sizes)
        # Space-aware clips: choose `keep` of the candidates from their reconstruction, then label
        # the chosen frames on their own (the teacher sees exactly the frames that are stored).
        chosen: dict[int, np.ndarray] = {}
        for i, job in enumerate(jobs):
            result = results[i]
            if candidates[i] and isinstance(result, dict):
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
            relabelled = self._label_many(
                [clips[i][chosen[i]] for i in order], [jobs[i].get("student_hw") for i in order]
            )
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

    def _label_many(
        self, clips: list[np.ndarray], student_sizes: list[Any] | None = None
    ) -> list[dict[str, Any] | Exception]:
        """Label clips in one teacher call where possible; a clip that does not fit is split.
        `student_sizes`: per clip its student frame size (fusion features) or None."""
        from geovr.pipeline.labeler import TeacherOOM

        sizes = student_sizes or [None] * len(clips)
        results: list[dict[str, Any] | Exception | None] = [None] * len(clips)
        todo = []
        for i, clip in enumerate(clips):
            if self.max_teacher_frames and len(clip) > self.max_teacher_frames:
                results[i] = self._split_or_error(clip, sizes[i])
            else:
                todo.append(i)
        while todo:
            try:
                labelled = self.labeler.label([clips[i] for i in todo], [sizes[i] for i in todo])
            except TeacherOOM as err:
                i = todo.pop(err.clip_index)
                results[i] = self._split_or_error(clips[i], sizes[i])
                continue
            except Exception as err:
                if len(todo) == 1:
                    results[todo[0]] = err
                else:  # find the clip at fault: the others still get labelled
                    for i in todo:
                        results[i] = self._label_many([clips[i]], [sizes[i]])[0]
                todo = []
                continue
            for i, labels in zip(todo, labelled, strict=True):
                results[i] = labels_to_dict(labels)
            todo = []
        return results  # type: ignore[return-value]

    def _split_or_error(self, clip: np.ndarray, student_hw: Any = None) -> dict[str, Any] | Exception:
        if student_hw is not None and self.labeler.cfg.fusion_layers:
            # Global attention: fused tokens depend on the clip's whole frame set; halves would differ
            # from what the online encoder computes at inference.
            return SplitError(
                f"a clip of {len(clip)} frames does not fit the teacher in one pass, and fusion features "
                "need the whole clip in one pass (no split); use fewer frames or a larger device"
            )
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
LABEL_OUTPUTS = ("pose_enc", "extrinsic", "intrinsic", "depth", "depth_conf", "features", "fusion")


def nonfinite_outputs(labels: dict[str, Any]) -> str:
    """The teacher outputs of one clip's labels that hold non-finite values, with the likely cause
    where it is known ("" when all are finite), e.g. "intrinsic (the camera head's field of view is 0
    in 5 of 5 frames: an infinite focal length)"."""
    names = [name for name in LABEL_OUTPUTS if name in labels and not np.isfinite(labels[name]).all()]
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
        return _failure("encode", str(err)), None
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
