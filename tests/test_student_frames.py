"""The student's clip-level frame budget (teacher_cache/frames.py): equal to transformers' Qwen3-VL
video processor sizing, GeoVR's repeated clips, and the cache's frames at the size the student feeds.

transformers 5.5.0 (GeoVR's pin) rounds a clip's frame count up to the temporal patch (t_bar =
2 * ceil(S / 2)); later 5.x releases round half to even, which differs for S = 1 mod 4. The installed
`smart_resize` is the reference wherever the two agree; the other cases are checked against values
of 5.5.0's function.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import transformers
from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as hf_smart_resize

from geovr.corpus.config import SamplingConfig
from geovr.pipeline.tasks import decode_clip
from geovr.student.data import DataError, check_frame_budget
from geovr.student.vision_inputs import VideoPreprocess, video_inputs
from geovr.teacher_cache.frames import (
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    decode_jpeg,
    smart_resize,
    student_frame_size,
)
from geovr.teacher_cache.schema import StoreFingerprint
from tests.test_precompute_video import smooth_frames, write_video

SIZES = [(32, 32), (48, 64), (120, 160), (360, 640), (480, 640), (720, 1280), (1080, 1920), (1344, 1344)]
SIZES += [(1920, 1080), (2160, 3840), (3024, 4032), (100, 3000)]


def _agrees_with_5_5_0(num_frames: int) -> bool:
    return transformers.__version__ == "5.5.0" or (num_frames >= 2 and num_frames % 4 != 1)


def hf(num_frames: int, height: int, width: int, max_pixels: int = VIDEO_MAX_PIXELS) -> tuple[int, int]:
    """The installed processor's sizing with GeoVR's budget (patch 16, merge 2, temporal patch 2)."""
    return tuple(hf_smart_resize(num_frames, height, width, 2, 32, VIDEO_MIN_PIXELS, max_pixels))


def test_clip_size_equals_the_processors_smart_resize() -> None:
    checked = 0
    for num_frames in range(1, 65):
        for height, width in SIZES:
            if _agrees_with_5_5_0(num_frames):
                ours = student_frame_size(num_frames, height, width, frame_pairing="consecutive")
                assert ours == hf(num_frames, height, width), (num_frames, height, width)
                checked += 1
    assert checked > 500
    # 5.5.0 counts 5 frames as 6 (t_bar rounded up): values of its smart_resize, where later 5.x keep
    # (1088, 1920) and (1344, 1344).
    assert smart_resize(5, 1080, 1920) == (1024, 1856)
    assert smart_resize(5, 1344, 1344) == (1376, 1376)
    with pytest.raises(ValueError, match="at least 32"):
        smart_resize(4, 31, 640)


def test_repeat_pairing_sizes_the_repeated_clip_as_geovr() -> None:
    """GeoVR's get_repeat_video_inputs: the processor's output is read back with its temporal padding
    (2 * ceil(S / 2) frames), every frame is repeated, and the processor runs again with twice the
    budget: the repeated clip's t_bar is 4 * ceil(S / 2)."""
    for num_frames in range(2, 33):
        if not _agrees_with_5_5_0(num_frames):
            continue
        for height, width in SIZES:
            first = hf(num_frames, height, width)
            repeated = 2 * (2 * math.ceil(num_frames / 2))
            expected = hf(repeated, *first, max_pixels=2 * VIDEO_MAX_PIXELS)
            assert student_frame_size(num_frames, height, width) == expected, (num_frames, height, width)
    # Even S: the second pass keeps the size; odd S: the padding frame counts against the budget.
    assert student_frame_size(8, 1080, 1920) == student_frame_size(8, 1080, 1920, frame_pairing="consecutive")
    assert student_frame_size(7, 1080, 1920, frame_pairing="consecutive") == (864, 1568)
    assert student_frame_size(7, 1080, 1920) == (800, 1472)


def test_a_short_clip_gets_larger_frames_than_a_long_one() -> None:
    def tokens(num_frames: int, height: int, width: int) -> int:
        h, w = student_frame_size(num_frames, height, width)
        return h * w // (32 * 32)

    assert tokens(32, 1080, 1920) <= 300 < tokens(16, 1080, 1920) < tokens(8, 1080, 1920)
    assert tokens(4, 1080, 1920) == (1088 // 32) * (1920 // 32)  # 2040: the source size, rounded
    assert student_frame_size(4, 480, 640) == student_frame_size(32, 480, 640) == (480, 640)


def test_the_cache_stores_a_short_clip_at_the_size_the_student_feeds(tmp_path: Path) -> None:
    """A 2 s 720p clip keeps 4 frames: the cache's JPEGs are 704x1280 (880 tokens a frame, where the
    old per-frame cap gave 384x736), and the student feeds them as they are."""
    write_video(tmp_path / "short.mp4", smooth_frames(8, 720, 1280), fps=4)
    policy = SamplingConfig(fps=2.0, min_frames=4, max_frames=32).policy()
    status, _, info = decode_clip(
        "short.mp4", str(tmp_path), policy, VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS, 90, teacher_resize=(112, 28)
    )
    assert status["ok"] and status["keep"] == 4
    frames = np.stack([decode_jpeg(jpeg) for jpeg in info["frames_jpeg"]])
    assert frames.shape == (4, 704, 1280, 3) and info["meta"]["student_size"] == [1280, 704]
    assert student_frame_size(32, 720, 1280) == (384, 736)  # a 32-frame clip of the same video
    inputs = video_inputs(frames, info["timestamps"], VideoPreprocess())
    assert inputs["video_grid_thw"].tolist() == [[4, 44, 80]]  # 704 / 16, 1280 / 16: no resize


def _fingerprint(student_frames: dict | None) -> StoreFingerprint:
    preprocess = {"teacher_long_side": 112}
    if student_frames is not None:
        preprocess["student_frames"] = student_frames
    return StoreFingerprint(
        teacher="t", checkpoint_sha256="0" * 64, teacher_config={}, metric_teacher="",
        preprocess=preprocess, sampling={"fps": 2.0}, feature_layers=(0, 1, 2, 3),
    )  # fmt: skip


def test_training_refuses_a_store_sized_for_another_budget() -> None:
    same = {"video_max_pixels": VIDEO_MAX_PIXELS, "video_min_pixels": VIDEO_MIN_PIXELS}
    check_frame_budget(_fingerprint(same), VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS)
    check_frame_budget(_fingerprint(None), VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS)  # synthetic store: no policy
    with pytest.raises(DataError, match="sized for video_max_pixels/video_min_pixels 9830400/65536") as err:
        check_frame_budget(_fingerprint(same), 2 * VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS)
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="per-frame cap"):
        check_frame_budget(_fingerprint({"max_tokens": 300}), VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS)
