"""Student frame conventions shared by precompute (which stores the frames) and the student (which reads them).

Qwen3-VL sees a frame as a grid of 16-pixel patches merged 2x2, so frame sides are multiples of 32.
GeoVR caps a frame at 300 merged tokens: 640x480 gives 20x15 = 300 tokens and is kept as is.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image


def student_frame_size(height: int, width: int, max_tokens: int = 300, factor: int = 32) -> tuple[int, int]:
    """(H, W) of the student frame for a source frame: sides rounded to multiples of `factor`,
    at most `max_tokens` merged tokens, aspect ratio kept as closely as the rounding allows
    (Qwen's `smart_resize` with max_pixels = max_tokens * factor**2)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"frame size must be positive, got {height}x{width}")
    max_pixels = max_tokens * factor * factor
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    return h_bar, w_bar


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
