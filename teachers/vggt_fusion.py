"""Spatial-MLLM's spatial-encoder tokens from our VGGT: one function for precompute and inference.

Spatial-MLLM (`src/qwenvl/model/connector/mlp_add_connector.py`) fuses one aggregator layer at full
width (frame-attention half, then global-attention half: 2C = 2048 channels for VGGT-1B) into the
MLLM. Its student (Qwen2.5-VL) has VGGT's 14-pixel patch, so the two patch grids coincide and the
2x2 merge window of the MLLM gathers exactly 2x2 VGGT tokens. Qwen3-VL's patch is 16 pixels.

Grid alignment (the choice made here): the fusion pass runs VGGT on the source frame resized to
7/8 of the student frame (`fusion_image_size`; student sides are multiples of 32, so these are
multiples of 28), which makes VGGT's 14-pixel grid *equal* to the student's unmerged 16-pixel grid
(640x480 -> student 640x480 -> VGGT 560x420: 40x30 tokens on both sides). The gather stays exact,
as in Spatial-MLLM, and every VGGT token sees the same image area as its student patch.
- Cost: a second aggregator pass beside GeoVR's 504-pixel teacher pass: 4.75 TFLOP per frame at
  420x560 in a 16-frame clip (7.04 in a 32-frame clip, all 24 stages; `bench/flops.py`'s
  `vggt_flops`), about 2.2x the GeoVR teacher's FLOPs per clip, paid once per clip in precompute.
- The alternative, resampling the 504-pixel pass's 28x36 grid to 30x40 (0 extra FLOPs), blends up
  to four teacher tokens per output token with a drifting phase (non-integer factors 1.07, 1.11),
  stretches the teacher image 3.7% vertically, and feeds VGGT another scale (17.8 instead of 16
  source pixels per token): a different function, not a resampled one. Rejected for fidelity.

The frames are resized from the source frames with PIL bicubic on uint8 (as the teacher's own
frames and Spatial-MLLM's processor), never from the stored student JPEGs; the online path at
inference calls the same `fusion_tokens`, so the cached features and the online ones are one
function of the frames up to the cache's quantisation. All of a clip's frames go through one pass
(global attention: a token depends on the clip's frame set).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from geovr.teacher_cache.frames import resize_frames
from geovr.teachers.vggt import VGGT
from geovr.teachers.vggt_layers import attention_kernel_context

# The student's (Qwen3-VL) patch side in pixels; VGGT's is its config's `patch_size` (14).
STUDENT_PATCH = 16


def fusion_image_size(student_hw: tuple[int, int], patch_size: int = 14) -> tuple[int, int]:
    """(h, w) of the fusion pass's image for student frames of `student_hw`: patch_size / 16 of them
    (7/8 for VGGT), so that both patch grids are equal. Raises ValueError for a side that is not a
    multiple of the student patch."""
    height, width = student_hw
    if height % STUDENT_PATCH or width % STUDENT_PATCH:
        raise ValueError(
            f"student frame {width}x{height} is not a multiple of the {STUDENT_PATCH}-pixel patch"
        )
    return height // STUDENT_PATCH * patch_size, width // STUDENT_PATCH * patch_size


def fusion_input(frames: np.ndarray, size_hw: tuple[int, int]) -> Tensor:
    """(S, H, W, 3) uint8 source frames to (S, 3, h, w) uint8 at the fusion size (PIL bicubic)."""
    if frames.shape[1:3] != tuple(size_hw):
        frames = resize_frames(frames, size_hw)
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)


def fusion_tokens(model: VGGT, images: Tensor, layers: Sequence[int]) -> Tensor:
    """The fused layers' patch tokens at full width.

    Args:
        model: our VGGT (any heads; only its aggregator runs, up to max(layers)).
        images: (B, S, 3, h, w) float in [0, 1] on the model's device; run it under the caller's
            autocast (precompute and inference use the same one).
        layers: aggregator stages to return, in order (Spatial-MLLM: the last, 23 of VGGT-1B).

    Returns:
        (B, S, Lf, h/14, w/14, 2C) float32: per frame the patch tokens (camera and register tokens
        dropped), row-major, frame-attention half first.
    """
    batch, frames, _, height, width = images.shape
    patch = model.patch_size
    with attention_kernel_context(model.attention):
        stages = model.aggregator(images, set(layers))
    start = model.patch_start_idx
    tokens = torch.stack([stages[layer][:, :, start:].float() for layer in layers], dim=2)
    return tokens.reshape(batch, frames, len(layers), height // patch, width // patch, tokens.shape[-1])


def truncated_aggregator(model: VGGT, last_layer: int) -> VGGT:
    """`model` with the aggregator stages after `last_layer` removed (in place): what inference keeps
    beside the student (Spatial-MLLM loads the whole VGGT-1B; stages past the fused one never run)."""
    model.aggregator.frame_blocks = model.aggregator.frame_blocks[: last_layer + 1]
    model.aggregator.global_blocks = model.aggregator.global_blocks[: last_layer + 1]
    return model
