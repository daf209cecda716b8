"""Spatial-MLLM's connector: the cached spatial-encoder tokens, gathered over the merge window,
normalised, projected to the language width and added to the merged video tokens.

Spatial-MLLM (`src/qwenvl/model/connector/mlp_add_connector.py`, `MLPAddConnector`) feeds VGGT's
last aggregator layer at full width (D = 2C channels: frame half, then global half) into its MLLM.
`preprocess_spatial_embeds` gathers, for each merged visual token, the VGGT tokens of that token's
window: tau = 2 frames (the temporal patch) x m x m = 2 x 2 patches (the spatial merge). Notation:
S frames, (h, w) the unmerged patch grid (the fusion features' grid, equal to the student's 16-pixel
grid by construction: `teachers.vggt_fusion`), T = temporal tokens, N = T * h/m * w/m merged tokens.

Order (ours reproduces theirs; `tests/test_fusion.py` checks it on hand-built tensors): the merged
tokens run over temporal token, window row, window column, as the vision merger's output; inside
one (m * m * D * tau)-vector, slowest to fastest, the window position (row-major), the channel,
the frame:

    out[t * (h/m * w/m) + Y * (w/m) + X][((m * r + c) * D + d) * tau + f]
        = features[tau * t + f][m * Y + r][m * X + c][d]

The frame is the fastest index, interleaved with the channels, as Qwen's own pixel patches order
their channels before the temporal index.

Frame pairing: with "consecutive" pairs (Spatial-MLLM's; T = ceil(S / 2), an odd clip repeats its
last frame as the processor does) each temporal token holds two frames; with "repeat" (GeoVR's
training layout, T = S) both slots of a token hold the same frame, so the features are repeated
along the frames before the gather and Spatial-MLLM's shapes stay.

Forward (as `MLPAddConnector.forward`): RMSNorm over the whole gathered vector (eps 1e-6, learnable
weight, computed in float32), Linear(merged, merged) -> GELU (exact) -> Linear(merged, d_text),
then `video_embeds + mlp(...)`. Added to the merged tokens (after the vision merger), before they are
scattered into the sequence; DeepStack features are left untouched (Spatial-MLLM's Qwen2.5-VL has
none). Initialisation: as transformers gives Spatial-MLLM's connector (it sets none), normal with the
text model's `initializer_range`, zero biases, norm weight 1: it perturbs the embeddings from step 0.
For VGGT-1B (D = 2048) the connector has 302M parameters (16384^2 + 16384 * 2048 + biases + norm).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def temporal_frames(features: Tensor, grid_t: int, temporal_patch: int = 2) -> Tensor:
    """(S, h, w, D) per-frame features -> (grid_t * temporal_patch, h, w, D), frames as the vision
    tower's temporal tokens hold them: "repeat" layout (grid_t == S) repeats every frame, pairs
    (grid_t == ceil(S / temporal_patch)) keep them and pad with the last frame."""
    frames = features.shape[0]
    if grid_t == frames:
        return features.repeat_interleave(temporal_patch, dim=0)
    if grid_t == -(-frames // temporal_patch):
        pad = grid_t * temporal_patch - frames
        return torch.cat([features, features[-1:].expand(pad, *features.shape[1:])]) if pad else features
    raise ValueError(
        f"{frames} frames of fusion features do not fill {grid_t} temporal tokens "
        f"(one frame per token, or {temporal_patch} per token)"
    )


def gather_spatial_tokens(features: Tensor, grid_t: int, merge: int = 2, temporal_patch: int = 2) -> Tensor:
    """Spatial-MLLM's `preprocess_spatial_embeds` for one clip (the module docstring's order).

    Args:
        features: (S, h, w, D) the clip's fusion features, h and w multiples of `merge`.
        grid_t: the clip's temporal tokens (`video_grid_thw[0]`).

    Returns:
        (grid_t * h/m * w/m, m * m * D * tau) gathered tokens, in the merged visual tokens' order.
    """
    frames = temporal_frames(features, grid_t, temporal_patch)
    _, height, width, dim = frames.shape
    if height % merge or width % merge:
        raise ValueError(f"fusion grid {height}x{width} is not a multiple of the spatial merge {merge}")
    # (T, tau, Y, r, X, c, D) -> (T, Y, X, r, c, D, tau)
    windows = frames.reshape(grid_t, temporal_patch, height // merge, merge, width // merge, merge, dim)
    windows = windows.permute(0, 2, 4, 3, 5, 6, 1)
    return windows.reshape(
        grid_t * (height // merge) * (width // merge), merge * merge * dim * temporal_patch
    )


class SpatialRMSNorm(nn.Module):
    """RMSNorm over the last axis in float32, weight applied in the input dtype (Qwen's RMSNorm)."""

    def __init__(self, width: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class SpatialConnector(nn.Module):
    """Spatial-MLLM's `MLPAddConnector`: gather -> RMSNorm -> Linear -> GELU -> Linear, added.

    Args:
        feature_dim: D, the fusion features' width (2 x VGGT's embed_dim).
        language_dim: the text model's hidden size (the merged visual tokens' width).
        merge, temporal_patch: the vision tower's spatial merge and temporal patch (2, 2).
        init_std: std of the linear weights' normal initialisation (the text config's initializer_range).
    """

    def __init__(
        self,
        feature_dim: int,
        language_dim: int,
        merge: int = 2,
        temporal_patch: int = 2,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.merge, self.temporal_patch = merge, temporal_patch
        self.merged_dim = feature_dim * temporal_patch * merge * merge
        self.norm = SpatialRMSNorm(self.merged_dim)
        self.mlp = nn.Sequential(
            nn.Linear(self.merged_dim, self.merged_dim), nn.GELU(), nn.Linear(self.merged_dim, language_dim)
        )
        for layer in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(layer.weight, std=init_std)
            nn.init.zeros_(layer.bias)

    def forward(self, video_embeds: Tensor, features: Tensor, grid_thw: Tensor) -> Tensor:
        """video_embeds (N, d) merged visual tokens of one clip + the connector's (N, d) output.

        features: (S, h, w, D) the clip's fusion features (h, w = grid_thw[1:]); grid_thw: (3,).
        """
        grid_t, grid_h, grid_w = (int(v) for v in grid_thw)
        if tuple(features.shape[1:3]) != (grid_h, grid_w):
            raise ValueError(
                f"fusion features of grid {tuple(features.shape[1:3])} do not match the video's patch grid "
                f"{(grid_h, grid_w)}: the store's fusion features were computed for another student frame size"
            )
        gathered = gather_spatial_tokens(features, grid_t, self.merge, self.temporal_patch)
        projected = self.mlp(self.norm(gathered.to(self.mlp[0].weight.dtype)))
        if projected.shape != video_embeds.shape:
            raise ValueError(
                f"connector output {tuple(projected.shape)} != video tokens {tuple(video_embeds.shape)}"
            )
        return video_embeds + projected.to(video_embeds.dtype)


def connector_flops(merged_dim: int, language_dim: int, tokens: int, trained: bool = True) -> float:
    """Matmul FLOPs of the connector on `tokens` merged tokens: forward 2 x (merged^2 + merged * d)
    per token; trained, 3x that (weight gradients of both linears, and the input gradient of both:
    the norm's weight trains, so the first linear's input needs its gradient too)."""
    forward = 2.0 * (merged_dim * merged_dim + merged_dim * language_dim) * tokens
    return 3.0 * forward if trained else forward
