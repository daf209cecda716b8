"""Student frame conventions shared by precompute (which stores the frames), the student and eval (which feed them).

Qwen3-VL sees a video as 16-pixel patches merged 2x2 (frame sides are multiples of 32) and pairs of
frames (temporal patch 2). Its video processor (transformers 5.5.0, the version GeoVR pins) sizes a
*whole clip* under one pixel budget, `smart_resize`: t_bar * h * w <= max_pixels, with t_bar the
frame count rounded up to the temporal patch. GeoVR's budget (`scripts/train.sh`) is
`video_max_pixels = 32 * 300 * 32 * 32` and `video_min_pixels = 4 * 16 * 32 * 32`: a 32-frame clip
gets 300 merged tokens per frame (640x480 is kept as is), a 4-frame clip up to 8 times more.

GeoVR trains on repeated frames (`utils/preprocess.py`, `get_repeat_video_inputs`): the processor
sizes the S sampled frames as above, the result is read back with the processor's temporal padding
(2 * ceil(S / 2) frames), every frame is repeated twice and the processor runs again with twice the
budget and the same minimum. `student_frame_size(..., frame_pairing="repeat")` composes exactly these
two passes; for even S the second pass changes nothing, for odd S where the budget binds it
shrinks the sides by about sqrt((S + 1) / S) (the padding frame counts against the budget: 9 frames
of 1080p get 736x1312 instead of 768x1376). "consecutive" is the plain processor.

The student's frames are stored at this size in the cache, so training feeds them without resizing.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

# GeoVR's clip budget (scripts/train.sh): 300 merged tokens per frame at 32 frames; at least 16 per frame at 4.
VIDEO_MAX_PIXELS = 32 * 300 * 32 * 32
VIDEO_MIN_PIXELS = 4 * 16 * 32 * 32
# How frames fill the temporal tokens: "repeat" (each frame twice: one frame per token, GeoVR's
# training layout) or "consecutive" (frame pairs, the plain processor).
FRAME_PAIRINGS = ("repeat", "consecutive")


def smart_resize(
    num_frames: int,
    height: int,
    width: int,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS,
    factor: int = 32,
    temporal_factor: int = 2,
) -> tuple[int, int]:
    """(h, w) the Qwen3-VL video processor (transformers 5.5.0) resizes a clip of `num_frames`
    (height x width) frames to: sides rounded to multiples of `factor`; if t_bar * h * w (t_bar =
    `num_frames` rounded up to `temporal_factor`) is above `max_pixels`, both sides are scaled by
    sqrt(num_frames * H * W / max_pixels) and floored, below `min_pixels` scaled up and ceiled.
    Raises ValueError as the processor does (a side below `factor`, aspect ratio above 200)."""
    if height < factor or width < factor:
        raise ValueError(f"frame {height}x{width} (H x W): both sides must be at least {factor} pixels")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"frame {height}x{width} (H x W): aspect ratio above 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = math.ceil(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def student_frame_size(
    num_frames: int,
    height: int,
    width: int,
    max_pixels: int = VIDEO_MAX_PIXELS,
    min_pixels: int = VIDEO_MIN_PIXELS,
    frame_pairing: str = "repeat",
    factor: int = 32,
) -> tuple[int, int]:
    """(h, w) of the student frames of a clip of `num_frames` (height x width) frames under the clip
    budget: the processor's `smart_resize`, and for "repeat" GeoVR's second pass over the padded,
    repeated clip (2 * ceil(S / 2) * 2 frames, twice the budget; see the module docstring)."""
    if num_frames < 1:
        raise ValueError(f"a clip needs at least one frame, got {num_frames}")
    h_bar, w_bar = smart_resize(num_frames, height, width, min_pixels, max_pixels, factor)
    if frame_pairing == "repeat":
        padded = 2 * math.ceil(num_frames / 2)
        h_bar, w_bar = smart_resize(2 * padded, h_bar, w_bar, min_pixels, 2 * max_pixels, factor)
    return h_bar, w_bar


def display_rotated(frame: np.ndarray, rotation: int) -> np.ndarray:
    """(H, W, C) frame as players show it: rotated `rotation` degrees counterclockwise (PyAV's
    `VideoFrame.rotation` and `set_display_rotation` convention; -90 = 270), to the nearest quarter
    turn; contiguous."""
    return np.ascontiguousarray(np.rot90(frame, round(rotation / 90) % 4))


def encode_jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    """(H, W, 3) uint8 RGB to JPEG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    """JPEG bytes to (H, W, 3) uint8 RGB."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def resize_frames(frames: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """(S, H, W, 3) uint8 to (S, h, w, 3) uint8 with bicubic resampling (PIL, as Qwen's processors)."""
    height, width = size_hw
    return np.stack(
        [np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.BICUBIC)) for f in frames]
    )
