"""Timestamps of a repeated clip ("repeat" pairing) as GeoVR's `get_repeat_video_inputs` gets them.

GeoVR (transformers 5.5.0) prompts the plain clip first, reads its duration D back from the last
`<t seconds>` of that prompt, then gives the processor the clip with every frame twice as an array
whose fps is 2 S' / D (S' frames after padding to whole temporal patches). The expected texts below
are derived by hand from 5.5.0's `_calculate_timestamps` (unchanged in the installed 5.x).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from transformers.video_utils import VideoMetadata

from geovr.student.vision_inputs import build_video_prompt, repeated_clip_times, video_inputs
from tests.test_student_vision_inputs import _processor_text_logic, processor_test

TEXT = "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>How far?<|im_end|>\n"


def _stamps(prompt: str) -> list[str]:
    return re.findall(r"<([0-9.]+) seconds>", prompt)


def _frames(num: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (num, 64, 64, 3), dtype=np.uint8)


def test_repeated_clip_prompt_has_geovrs_timestamps_derived_by_hand():
    # 5 frames at 2 fps. Plain clip (padded to 6): tokens at 0.25, 1.25, 2.0 -> D = 2.0 s.
    # Repeated: 12 frames at 12 / 2.0 = 6 fps; token j = (2j + 2j + 1) / 2 / 6 = (4j + 1) / 12 s:
    # 0.083, 0.417, 0.75, 1.083, 1.417 -> "0.1", "0.4", "0.8" (0.75 rounds half to even), "1.1", "1.4".
    times = np.array([0.0, 0.5, 1.0, 1.5, 2.0])
    video = video_inputs(_frames(5), times)
    prompt = build_video_prompt(TEXT, video["video_grid_thw"][0], video["frame_timestamps"])
    assert _stamps(prompt) == ["0.1", "0.4", "0.8", "1.1", "1.4"]  # each frame's own time: 0.0 ... 2.0

    # 32 frames at 2 fps from 0: D = 15.25 printed "15.2"; the last token is at 15.2 * 125 / 128.
    last = repeated_clip_times(np.arange(32) / 2.0)[-1]
    assert f"{last:.1f}" == "14.8" and last == pytest.approx(15.2 * 125 / 128)
    # A clip whose plain prompt says "<0.0 seconds>": GeoVR falls back to 2 fps, token 0 at 0.25 s.
    assert repeated_clip_times(np.array([0.0])).tolist() == [0.25]


def test_consecutive_pairing_keeps_the_pair_times():
    video = video_inputs(_frames(5), np.array([0.0, 0.5, 1.0, 1.5, 2.0]), frame_pairing="consecutive")
    assert video["frame_timestamps"].tolist() == [0.25, 1.25, 2.0]


@pytest.mark.parametrize(
    ("times", "fps"),
    [(np.array([0, 3, 7, 11, 14, 18, 22]) / 6.0, 6.0), (np.linspace(0, 120, 32), 29.97)],
)
def test_repeated_clip_times_follow_the_processors_two_passes(times, fps):
    """GeoVR's two passes through transformers' own Qwen3VLProcessor text logic."""
    processor = _processor_text_logic()
    frames_indices = np.round(times * fps).astype(int)
    plain_tokens = -(-len(times) // 2)
    plain = processor.replace_video_token(
        {
            "video_grid_thw": torch.tensor([[plain_tokens, 4, 4]]),
            "video_metadata": [
                VideoMetadata(total_num_frames=10_000, fps=fps, frames_indices=frames_indices)
            ],
        },
        0,
    )
    duration = float(_stamps(plain)[-1])
    repeated = 4 * plain_tokens
    metadata = VideoMetadata(
        total_num_frames=repeated, fps=repeated / duration, frames_indices=list(range(repeated))
    )
    expected = processor.replace_video_token(
        {"video_grid_thw": torch.tensor([[2 * plain_tokens, 4, 4]]), "video_metadata": [metadata]}, 0
    )
    ours = repeated_clip_times(frames_indices / fps)
    assert [f"{t:.1f}" for t in ours] == _stamps(expected)[: len(times)]


@processor_test
def test_repeated_clip_prompt_equals_the_processor_on_geovrs_repeated_array(tmp_path):
    """The real processor (video processor included) on the repeated array with GeoVR's metadata."""
    from transformers import AutoProcessor

    from geovr.student.tiny import write_tiny_qwen3vl

    model_dir = write_tiny_qwen3vl(tmp_path / "tiny")
    processor = AutoProcessor.from_pretrained(model_dir)
    times = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    frames = _frames(len(times))
    duration = 2.2  # the plain prompt's last token: (2.0 + 2.5) / 2 = 2.25, printed "2.2"
    metadata = VideoMetadata(total_num_frames=12, fps=12 / duration, frames_indices=list(range(12)))
    reference = processor(
        text=[TEXT],
        videos=[np.repeat(frames, 2, axis=0)],
        video_metadata=[metadata],
        do_sample_frames=False,
        return_tensors="pt",
    )
    ours = video_inputs(frames, times)
    prompt = build_video_prompt(TEXT, ours["video_grid_thw"][0], ours["frame_timestamps"])
    assert torch.equal(processor.tokenizer(prompt, return_tensors="pt")["input_ids"], reference["input_ids"])
