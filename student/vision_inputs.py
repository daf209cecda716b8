"""Qwen3-VL video inputs built here, without torchvision: pixel patches and the expanded prompt.

Equal to what `Qwen3VLVideoProcessor` and `Qwen3VLProcessor` (transformers 5.x) produce for the
same frames (proved in tests/test_student_vision_inputs.py where torchvision is installed):

1. Frames: the cached frames are already at the student's size (`teacher_cache.frames.student_frame_size`:
   the processor's clip-level pixel budget `video_max_pixels` over the clip's frames, sides multiples
   of patch_size * merge_size = 32), so no resize happens; frames of another size, or above the
   budget, are resized there first (bicubic, PIL).
2. Frame pairing (`frame_pairing`): "repeat" (GeoVR's training convention, the default here)
   repeats each sampled frame twice, so that with temporal_patch_size = 2 one temporal token is one
   frame: S frames give grid_t = S. "consecutive" (what the processor itself does, and what GeoVR's
   `eval_vsi.py` and lmms-eval's Qwen3-VL runs feed) puts consecutive pairs of frames into one
   temporal token, the last frame repeated when S is odd: grid_t = ceil(S / 2).
3. Rescale and normalise in float32 exactly as the processor's fused path: (x - 255 mean) / (255 std),
   mean/std read from the model directory's `video_preprocessor_config.json`.
4. Patchify into (grid_t * grid_h * grid_w, C * T * P * P) rows in the processor's order: temporal
   index, then merge blocks in raster order, then the 2x2 patches inside a block; within a row the
   values run over channel, temporal, patch row, patch column.

The prompt: the chat template renders a video as `<|vision_start|><|video_pad|><|vision_end|>`; the
processor replaces the inner `<|video_pad|>` by, per frame, `<{t:.1f} seconds>` + `<|vision_start|>`
+ grid_h * grid_w / merge^2 `<|video_pad|>` + `<|vision_end|>` (the outer wrapper stays, as in
transformers 5.x). The timestamp of a temporal token is the mean of its first and last frame's times
(the processor's rule, `_calculate_timestamps`, the same in transformers 5.5.0 and the installed 5.x).

With "consecutive" that is the pair's mean presentation time. With "repeat" the times are the ones
GeoVR's `get_repeat_video_inputs` gets (`repeated_clip_times`), not the frames' own: it reads the
clip's duration D back from the plain clip's prompt (its last `<t seconds>`, rounded to 0.1 s, the
plain clip padded to whole temporal patches), then gives the processor the 2 * S' repeated frames
(S' = S rounded up to even) as an array with fps 2 * S' / D (2 when D = 0), so token j is at
D * (j + 0.25) / S'. This spreads the clip over [D / (4 S'), D (S' - 0.75) / S'] instead of its
frames' times: 32 frames at 2 fps from t = 0 end at "14.8 seconds" instead of "15.5 seconds"; 32
frames over a 120 s video, at 115.3 instead of 120.0.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from geovr.teacher_cache.frames import (
    FRAME_PAIRINGS,
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    resize_frames,
    student_frame_size,
)

VIDEO_TOKEN = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"


@dataclass(frozen=True)
class VideoPreprocess:
    """The video processor settings of a Qwen3-VL checkpoint (defaults: Qwen3-VL-2B-Instruct), with the
    clip pixel budget (the processor's `size`: longest_edge = video_max_pixels, shortest_edge =
    video_min_pixels; GeoVR's by default)."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    video_max_pixels: int = VIDEO_MAX_PIXELS
    video_min_pixels: int = VIDEO_MIN_PIXELS

    @classmethod
    def from_model_dir(
        cls,
        model_dir: str | Path,
        video_max_pixels: int = VIDEO_MAX_PIXELS,
        video_min_pixels: int = VIDEO_MIN_PIXELS,
    ) -> VideoPreprocess:
        """Read `video_preprocessor_config.json` (or `preprocessor_config.json`) of a model directory."""
        model_dir = Path(model_dir)
        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            path = model_dir / name
            if path.is_file():
                break
        else:
            raise FileNotFoundError(
                f"{model_dir}: no video_preprocessor_config.json or preprocessor_config.json; "
                "load the processor settings from the model directory"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        if data.get("temporal_patch_size", 2) != 2:
            raise ValueError(
                f"{path}: temporal_patch_size {data['temporal_patch_size']}, the student needs 2"
            )
        return cls(
            patch_size=int(data.get("patch_size", cls.patch_size)),
            temporal_patch_size=2,
            merge_size=int(data.get("merge_size", cls.merge_size)),
            image_mean=tuple(float(v) for v in data.get("image_mean", cls.image_mean)),
            image_std=tuple(float(v) for v in data.get("image_std", cls.image_std)),
            rescale_factor=float(data.get("rescale_factor", cls.rescale_factor)),
            video_max_pixels=video_max_pixels,
            video_min_pixels=video_min_pixels,
        )

    @property
    def factor(self) -> int:
        """Frame sides must be multiples of this (one merged token covers factor x factor pixels)."""
        return self.patch_size * self.merge_size


def video_inputs(
    frames: np.ndarray,
    timestamps: Sequence[float] | np.ndarray | None = None,
    preprocess: VideoPreprocess | None = None,
    frame_pairing: Literal["repeat", "consecutive"] = "repeat",
) -> dict[str, torch.Tensor]:
    """Qwen3-VL video inputs for one clip.

    Args:
        frames: (S, H, W, 3) uint8 RGB, normally already at the student size (sides multiples of 32,
            S * H * W within the budget); otherwise resized to `student_frame_size` for S frames.
        timestamps: (S,) presentation times in seconds (checked against S).
        preprocess: processor settings; default Qwen3-VL's (read yours with `VideoPreprocess.from_model_dir`).
        frame_pairing: "repeat" (each frame twice: one temporal token per frame, GeoVR) or
            "consecutive" (pairs of consecutive frames per temporal token, the processor's default).

    Returns:
        pixel_values_videos: (grid_t * grid_h * grid_w, 3 * 2 * P * P) float32,
        video_grid_thw: (1, 3) int64 = [[grid_t, grid_h, grid_w]] (grid in patches, before merging;
            grid_t = S for "repeat", ceil(S / 2) for "consecutive"),
        frame_timestamps: (grid_t,) float64 seconds of the temporal tokens, for the prompt.
    """
    cfg = preprocess or VideoPreprocess()
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (S, H, W, 3), got {frames.dtype} {frames.shape}")
    num_frames, height, width = frames.shape[:3]
    if timestamps is None:
        timestamps = np.zeros(num_frames)
    timestamps = np.asarray(timestamps, dtype=np.float64)
    if timestamps.shape != (num_frames,):
        raise ValueError(f"{num_frames} frames but timestamps of shape {timestamps.shape}")
    if frame_pairing not in FRAME_PAIRINGS:
        raise ValueError(f"frame_pairing must be one of {FRAME_PAIRINGS}, got {frame_pairing!r}")
    if height % cfg.factor or width % cfg.factor or num_frames * height * width > cfg.video_max_pixels:
        size_hw = student_frame_size(
            num_frames, height, width, cfg.video_max_pixels, cfg.video_min_pixels, frame_pairing, cfg.factor
        )
        frames = resize_frames(frames, size_hw)
        height, width = frames.shape[1:3]

    tp = cfg.temporal_patch_size
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (S, C, H, W)
    if frame_pairing == "repeat":
        video = video.repeat_interleave(tp, dim=0)
        token_times = repeated_clip_times(timestamps, tp)
    else:
        if num_frames % tp:
            video = torch.cat((video, video[-1:].expand(tp - num_frames % tp, -1, -1, -1)))
        token_times = pair_times(timestamps, tp)
    grid_t = video.shape[0] // tp
    mean = torch.tensor(cfg.image_mean) * (1.0 / cfg.rescale_factor)
    std = torch.tensor(cfg.image_std) * (1.0 / cfg.rescale_factor)
    video = (video.to(torch.float32) - mean[:, None, None]) / std[:, None, None]

    p, m = cfg.patch_size, cfg.merge_size
    grid_h, grid_w = height // p, width // p
    patches = video.view(grid_t, tp, 3, grid_h // m, m, p, grid_w // m, m, p)
    # -> (t, block row, block col, row in block, col in block, channel, temporal, pixel row, pixel col)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixel_values = patches.reshape(grid_t * grid_h * grid_w, 3 * tp * p * p)
    return {
        "pixel_values_videos": pixel_values,
        "video_grid_thw": torch.tensor([[grid_t, grid_h, grid_w]], dtype=torch.int64),
        "frame_timestamps": torch.from_numpy(token_times),
    }


def pair_times(timestamps: np.ndarray, temporal_patch_size: int = 2) -> np.ndarray:
    """(ceil(S / tp),) seconds of the temporal tokens of a plain clip: the mean of each token's first
    and last frame, the last frame repeated up to a whole token (the processor's rule)."""
    pad = -len(timestamps) % temporal_patch_size
    padded = np.concatenate((timestamps, np.full(pad, timestamps[-1])))
    return (padded[::temporal_patch_size] + padded[temporal_patch_size - 1 :: temporal_patch_size]) / 2


def repeated_clip_times(timestamps: np.ndarray, temporal_patch_size: int = 2) -> np.ndarray:
    """(S,) seconds of the temporal tokens of a clip of S frames each repeated twice, as GeoVR's
    `get_repeat_video_inputs` makes transformers 5.5.0's processor compute them (module docstring).

    Args:
        timestamps: (S,) presentation times of the frames in seconds.
    """
    plain = pair_times(timestamps, temporal_patch_size)
    duration = float(f"{plain[-1]:.1f}")  # GeoVR parses the last "<t seconds>" of the plain prompt
    repeated = 2 * len(plain) * temporal_patch_size  # the recovered (padded) clip, each frame twice
    fps = repeated / duration if duration != 0 else 2.0
    frame_times = np.arange(repeated) / fps
    token_times = (
        frame_times[::temporal_patch_size] + frame_times[temporal_patch_size - 1 :: temporal_patch_size]
    ) / 2
    return token_times[: len(timestamps)]


def video_placeholder(grid_thw: Sequence[int], timestamps: Sequence[float], merge_size: int = 2) -> str:
    """The text that replaces one `<|video_pad|>`: per frame `<t seconds>` + start + pads + end."""
    grid_t, grid_h, grid_w = (int(v) for v in grid_thw)
    if len(timestamps) != grid_t:
        raise ValueError(f"video of {grid_t} temporal tokens but {len(timestamps)} timestamps")
    frame_tokens = grid_h * grid_w // (merge_size * merge_size)
    return "".join(
        f"<{float(t):.1f} seconds>{VISION_START}{VIDEO_TOKEN * frame_tokens}{VISION_END}" for t in timestamps
    )


def build_video_prompt(
    text: str,
    grid_thw: Sequence[int] | torch.Tensor,
    timestamps: Sequence[float] | np.ndarray | torch.Tensor,
    merge_size: int = 2,
) -> str:
    """Expand the one `<|video_pad|>` of a rendered chat `text` the way `Qwen3VLProcessor` does.

    Args:
        text: the chat-template output holding exactly one `<|vision_start|><|video_pad|><|vision_end|>`.
        grid_thw: the video's (grid_t, grid_h, grid_w) from `video_inputs` (one row).
        timestamps: (grid_t,) seconds of the temporal tokens (`video_inputs`' frame_timestamps).
    """
    count = text.count(VIDEO_TOKEN)
    if count != 1:
        raise ValueError(f"the prompt must hold exactly one {VIDEO_TOKEN}, found {count}")
    grid = [int(v) for v in torch.as_tensor(grid_thw).reshape(-1).tolist()]
    stamps = [float(t) for t in np.asarray(timestamps, dtype=np.float64).reshape(-1)]
    return text.replace(VIDEO_TOKEN, video_placeholder(grid, stamps, merge_size), 1)
