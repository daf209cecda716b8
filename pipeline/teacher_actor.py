"""The teacher as a Ray actor (a GPU actor, or a CPU actor with --device cpu): the teacher loaded
once, labelling batches of decoded clips (`tasks.decode_clip`); a clip that does not fit is split
into overlapping halves (`clip_split`). Its labels go to `tasks.encode_labels`.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import torch

from geovr.corpus.video import select_space_aware
from geovr.pipeline.clip_split import SplitError, labels_to_dict, merge_halves, split_point
from geovr.pipeline.config import TeacherConfig
from geovr.pipeline.tasks import failure_status


class TeacherActor:
    """One teacher per actor, loaded once; `label` labels a batch of decoded clips.

    `label(jobs, *clips)` returns `[statuses, labels_0, ..., labels_{n-1}]` (call it with
    `num_returns = n + 1`): statuses[i] is {"ok", "frames", "split", ...} or a failure, labels_i the
    clip's `clip_split.labels_to_dict` dict (plus "selected" for space-aware clips) or None.
    """

    def __init__(self, teacher: TeacherConfig, device: str, max_teacher_frames: int, threads: int) -> None:
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
                    {**failure_status("teacher", f"non-finite teacher output {nonfinite}"), "nonfinite": True}
                )
                labels.append(None)
            else:
                statuses.append(failure_status("teacher", f"{type(result).__name__}: {result}"))
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
