"""Test helpers shared by the test modules.

`clip_labels` builds a valid `ClipLabels` (the cache's per-clip schema): the one place tests make
one by hand, so that a new label field is added here once. Fixtures pass the fields they care
about; every other field gets a deterministic valid value of the right shape.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from geovr.teacher_cache.frames import encode_jpeg
from geovr.teacher_cache.schema import ClipLabels


def clip_labels(
    frames: int = 4,
    *,
    clip_id: str = "0000000000000000",
    video: str = "scene.mp4",
    depth_hw: tuple[int, int] = (28, 28),
    feature_shape: tuple[int, int, int, int] = (4, 2, 2, 32),
    student_hw: tuple[int, int] = (32, 32),
    seed: int = 0,
    **fields: Any,
) -> ClipLabels:
    """A valid clip of `frames` frames; `fields` are `ClipLabels` fields given as they are.

    Defaults for the fields not given (drawn from `seed`, so the same call gives the same clip):
    frame indices 0, 15, 30, ...; timestamps 0, 0.5, ...; random student JPEG frames of
    `student_hw`; identity cameras with a 50-pixel pinhole (`pose_enc` = translation 0, quaternion
    (0, 0, 0, 1), fields of view 1 rad); depth in [0.5, 3] and confidence in [1, 5] of `depth_hw`;
    scale 1.5 (valid); features (S, L, h, w, C) of `feature_shape` = (L, h, w, C), standard normal;
    meta {"teacher_size": [2 * Wd, 2 * Hd]}; no fusion features, no ground truth.
    """
    rng = np.random.default_rng(seed)
    height, width = depth_hw
    defaults = {
        "frame_indices": lambda: np.arange(frames, dtype=np.int64) * 15,
        "timestamps": lambda: np.arange(frames, dtype=np.float64) * 0.5,
        "frames_jpeg": lambda: [
            encode_jpeg(rng.integers(0, 256, (*student_hw, 3), dtype=np.uint8)) for _ in range(frames)
        ],
        "pose_enc": lambda: np.tile(np.array([0, 0, 0, 0, 0, 0, 1, 1, 1], np.float32), (frames, 1)),
        "extrinsic": lambda: np.tile(np.eye(3, 4, dtype=np.float32), (frames, 1, 1)),
        "intrinsic": lambda: np.tile(
            np.array([[50.0, 0, width], [0, 50.0, height], [0, 0, 1]], np.float32), (frames, 1, 1)
        ),
        "depth": lambda: rng.uniform(0.5, 3.0, (frames, *depth_hw)).astype(np.float32),
        "depth_conf": lambda: rng.uniform(1.0, 5.0, (frames, *depth_hw)).astype(np.float32),
        "scale": lambda: 1.5,
        "scale_valid": lambda: True,
        "features": lambda: rng.standard_normal((frames, *feature_shape)).astype(np.float32),
        "meta": lambda: {"teacher_size": [2 * width, 2 * height]},
        "fusion": lambda: None,
        "ground_truth": lambda: None,
    }
    values = {name: fields[name] if name in fields else make() for name, make in defaults.items()}
    unknown = sorted(set(fields) - set(defaults))
    if unknown:
        raise TypeError(f"clip_labels: unknown ClipLabels field(s) {unknown}")
    clip = ClipLabels(clip_id=clip_id, video=video, **values)
    clip.validate()
    return clip


def label_synthetic_clip(
    corpus: Any, reference_dir: Any, video: str = "videos/scene_0001.mp4"
) -> tuple[dict, dict]:
    """(decode info, teacher label dict) of one synthetic-corpus video: decoded as precompute decodes
    it (2 fps, 4 to 8 frames) and labelled by the tiny VGGT `tiny-a` on CPU."""
    from geovr.corpus.config import SamplingConfig
    from geovr.pipeline.config import TeacherConfig
    from geovr.pipeline.labeler import TeacherLabeler
    from geovr.pipeline.tasks import decode_clip
    from geovr.teacher_cache.frames import VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS

    policy = SamplingConfig(fps=2.0, min_frames=4, max_frames=8).policy()
    _, frames, info = decode_clip(
        video, str(corpus), policy, VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS, 90, teacher_resize=(112, 28)
    )
    cfg = TeacherConfig(
        checkpoint=reference_dir / "vggt" / "tiny-a", name="vggt-tiny", image_long_side=112,
        feature_layers=(0, 1, 2, 3), dtype="float32",
    )  # fmt: skip
    (teacher,) = TeacherLabeler(cfg, "cpu").label([frames])
    return info, {name: getattr(teacher, name) for name in teacher.__dataclass_fields__}
