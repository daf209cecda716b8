"""Language-only samples: QA rows whose clip has no teacher labels in the store (`data.missing_labels:
language_only`), the semi-supervised mode of SpatialSV (geometry on part of the data, language on all).

Such a row trains on its conversation only: its frames come from the video itself, decoded exactly as
precompute decodes the student frames of a cached clip (`pipeline.tasks.decode_clip`): the store's
sampling policy (`corpus.video.sample_indices`), each sampled frame resized at decode from the
displayed source frame to `frames.student_frame_size` of the clip's kept frames under the clip
budget (PIL bicubic), then JPEG-encoded and decoded at the store's JPEG quality. The student frame
size depends on the clip's number of frames and on the clip budget (`video_max_pixels`,
`video_min_pixels`); `data.check_frame_budget` already requires the student's budget to be the
store's, so a clip gives the student the same pixels whether it was cached or not. Space-aware
sampling keeps frames chosen from the teacher's depth, which an unlabelled clip lacks: refused.

Its geometric targets are absent, not zero: NaN cameras, no depth or feature grid (0 x 0), no
scale, and `labelled=False`; every geometric loss masks the clip out (`student.objectives`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from geovr.corpus.config import SamplingConfig
from geovr.corpus.video import decode_frames, read_timestamps, sample_indices
from geovr.teacher_cache.frames import decode_jpeg, encode_jpeg, student_frame_size
from geovr.teacher_cache.schema import StoreFingerprint


@dataclass(frozen=True)
class LanguageOnlySource:
    """What a language-only sample needs from the store: how its clips were sampled and stored.

    Attributes:
        corpus_root: the folder the QA rows' video paths are relative to (`data.corpus_root`).
        sampling: the store's sampling policy (fingerprint).
        jpeg_quality: the store's student-frame JPEG quality (fingerprint; 90 when not recorded).
        feature_layers, feature_dim: L and C of the store's features (the shape a batch shares).
    """

    corpus_root: str
    sampling: dict[str, Any]
    jpeg_quality: int
    feature_layers: int
    feature_dim: int

    @classmethod
    def of_store(cls, fingerprint: StoreFingerprint, corpus_root: str) -> LanguageOnlySource:
        if fingerprint.sampling.get("method", "uniform") != "uniform":
            raise ValueError(
                "data.missing_labels=language_only needs a store sampled uniformly: space-aware sampling "
                "chooses frames from the teacher's depth, which a clip without labels lacks"
            )
        frames = fingerprint.preprocess.get("student_frames") or {}
        return cls(
            corpus_root=corpus_root,
            sampling=dict(fingerprint.sampling),
            jpeg_quality=int(frames.get("jpeg_quality", 90)),
            feature_layers=len(fingerprint.feature_layers),
            feature_dim=int(fingerprint.teacher_config.get("embed_dim", 0)),
        )

    def video_path(self, video: str) -> Path:
        """The file of a corpus-relative video path."""
        return Path(self.corpus_root or ".") / video


def decode_student_frames(
    path: str | Path, sampling: dict[str, Any], video_pixels: tuple[int, int], jpeg_quality: int
) -> tuple[np.ndarray, np.ndarray]:
    """The student frames of a clip decoded from its video, as precompute stores them (module
    docstring). Returns (S, h, w, 3) uint8 frames and (S,) float64 timestamps in seconds.
    Raises `corpus.video.VideoError` for an unreadable video."""
    max_pixels, min_pixels = video_pixels
    pts, seconds = read_timestamps(path)
    indices = sample_indices(seconds, SamplingConfig.from_policy(sampling), str(path))

    def sizes(height: int, width: int) -> list[tuple[int, int]]:
        return [student_frame_size(len(indices), height, width, max_pixels, min_pixels)]

    decoded = decode_frames(path, indices, (pts, seconds), sizes)
    frames = np.stack([decode_jpeg(encode_jpeg(f, jpeg_quality)) for f in decoded.outputs[0]])
    return frames, decoded.seconds.astype(np.float64)
