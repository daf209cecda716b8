"""Analytic FLOP count of a VGGT forward pass, from the architecture (`VGGTConfig`).

Counts the matrix products only, as `torch.utils.flop_counter` does: linear layers, convolutions
(transposed ones by their input size), and the two attention products q k^T and (softmax) v.
One multiply-add is 2 FLOPs. LayerNorm, softmax, activations, RoPE, interpolation and other
element-wise work are not counted (they are a few percent of the time and none of the FLOPs that a
matmul rate measures).

Per frame of an H x W image with a gh x gw = H/14 x W/14 patch grid (P = gh * gw patches, T = 1 +
registers + P tokens in the patch embedding and in the aggregator, width C, S frames per clip):
- patch embedding: a 14x14 stride-14 conv, then `patch_embed_depth` ViT blocks on T tokens;
- aggregator: `depth` frame blocks (attention within each frame: T tokens) and `depth` global
  blocks (attention across the clip: S * T tokens, so their attention grows with S);
- camera head: 4 refinement iterations over the S camera tokens (width 2C: adaLN modulation, a
  `camera_trunk_depth`-block trunk, the pose MLP);
- DPT heads (depth: 2 output channels, point: 4): 1x1 projections of 4 stages, resize convs,
  RefineNet fusion at 4x, 2x, 1x, 1/2x the patch grid, output convs at 8x the grid and at H x W.
"""

from __future__ import annotations

import math
from typing import Any


def block_flops(tokens: int, sequence: int, dim: int, mlp_ratio: float) -> float:
    """One pre-norm transformer block over `tokens` tokens, attention within sequences of `sequence`."""
    hidden = int(dim * mlp_ratio)
    linear = 2 * tokens * (3 * dim * dim + dim * dim + 2 * dim * hidden)
    attention = 2 * 2 * tokens * sequence * dim  # q k^T and attn v, each tokens x sequence x dim
    return float(linear + attention)


def conv_flops(in_channels: int, out_channels: int, kernel: int, positions: int) -> float:
    """A convolution evaluated at `positions` (output positions; input positions if transposed)."""
    return float(2 * in_channels * out_channels * kernel * kernel * positions)


def dpt_head_flops(cfg: Any, height: int, width: int, output_dim: int) -> float:
    """One DPT head on one frame."""
    grid_h, grid_w = height // cfg.patch_size, width // cfg.patch_size
    grid = grid_h * grid_w
    dim_in = 2 * cfg.embed_dim
    features = cfg.dpt_features
    c1, c2, c3, c4 = cfg.dpt_out_channels
    level1 = 16 * grid  # transposed conv x4
    level2 = 4 * grid  # transposed conv x2
    level3 = grid
    level4 = math.ceil(grid_h / 2) * math.ceil(grid_w / 2)  # 3x3 stride-2 conv
    total = sum(conv_flops(dim_in, c, 1, grid) for c in cfg.dpt_out_channels)
    total += conv_flops(c1, c1, 4, grid) + conv_flops(c2, c2, 2, grid) + conv_flops(c4, c4, 3, level4)
    total += sum(
        conv_flops(c, features, 3, level)
        for c, level in zip((c1, c2, c3, c4), (level1, level2, level3, level4), strict=True)
    )
    rcu = 2 * conv_flops(features, features, 3, 1)  # a residual conv unit, per position
    # refinenet4: one RCU at level 4, out conv at level 3; refinenets 3, 2, 1: two RCUs at their
    # level, out conv at the next finer level (refinenet1: twice level 1).
    total += rcu * level4 + conv_flops(features, features, 1, level3)
    total += 2 * rcu * level3 + conv_flops(features, features, 1, level2)
    total += 2 * rcu * level2 + conv_flops(features, features, 1, level1)
    total += 2 * rcu * level1 + conv_flops(features, features, 1, 4 * level1)
    total += conv_flops(features, features // 2, 3, 4 * level1)
    total += conv_flops(features // 2, 32, 3, height * width) + conv_flops(32, output_dim, 1, height * width)
    return total


def camera_head_flops(cfg: Any, frames: int, iterations: int = 4) -> float:
    """The camera head on one clip of `frames` frames."""
    dim = 2 * cfg.embed_dim
    per_iteration = 2 * frames * (9 * dim + dim * 3 * dim)  # pose embedding, adaLN modulation
    per_iteration += cfg.camera_trunk_depth * block_flops(frames, frames, dim, 4.0)
    per_iteration += 2 * frames * (dim * (dim // 2) + (dim // 2) * 9)  # pose MLP
    return float(iterations * per_iteration)


def vggt_flops(
    cfg: Any, frames: int, height: int, width: int, heads: tuple[str, ...] = ("camera", "depth")
) -> dict:
    """FLOPs of one clip (S = `frames` frames of height x width) through VGGT, by part.

    Returns a dict of floats: patch_embed, frame_blocks, global_blocks, aggregator (their sum),
    camera_head, depth_head, point_head (0 when the head is not in `heads`), total.
    """
    grid = (height // cfg.patch_size) * (width // cfg.patch_size)
    tokens = 1 + cfg.num_register_tokens + grid
    dim = cfg.embed_dim
    patch_embed = frames * (
        conv_flops(3, dim, cfg.patch_size, grid)
        + cfg.patch_embed_depth * block_flops(tokens, tokens, dim, cfg.mlp_ratio)
    )
    frame_blocks = frames * cfg.depth * block_flops(tokens, tokens, dim, cfg.mlp_ratio)
    global_blocks = cfg.depth * block_flops(frames * tokens, frames * tokens, dim, cfg.mlp_ratio)
    parts = {
        "patch_embed": patch_embed,
        "frame_blocks": frame_blocks,
        "global_blocks": global_blocks,
        "aggregator": patch_embed + frame_blocks + global_blocks,
        "camera_head": camera_head_flops(cfg, frames) if "camera" in heads else 0.0,
        "depth_head": frames * dpt_head_flops(cfg, height, width, 2) if "depth" in heads else 0.0,
        "point_head": frames * dpt_head_flops(cfg, height, width, 4) if "point" in heads else 0.0,
    }
    parts["total"] = parts["aggregator"] + parts["camera_head"] + parts["depth_head"] + parts["point_head"]
    return parts
