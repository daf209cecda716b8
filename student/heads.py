"""The student's auxiliary heads (GeoVR's architecture); all of them are dropped at export.

Notation: d = LLM width, (hq, wq) = the Qwen3-VL merged token grid of a frame (e.g. 15 x 20 for
a 480 x 640 frame), (ht, wt) = the teacher patch grid (28 x 36 for a 392 x 504 teacher image),
(h, w) = the teacher's pooled feature grid (14 x 18), (Hd, Wd) = the cached depth resolution, half
the teacher image (196 x 252). N = frames processed together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CameraHead(nn.Module):
    """Camera token state (..., d) -> pose encoding (..., 9): translation, XYZW quaternion, FoV (ReLU)."""

    def __init__(self, dim: int, hidden: int = 1536) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU()
        )
        self.translation = nn.Linear(hidden, 3)
        self.rotation = nn.Linear(hidden, 4)
        self.fov = nn.Linear(hidden, 2)
        # Start the fields of view near a typical camera's (1 rad): at a zero bias about half of the
        # ReLU outputs start dead and never learn.
        nn.init.constant_(self.fov.bias, 1.0)

    def forward(self, x: Tensor) -> Tensor:
        x = self.backbone(x)
        return torch.cat((self.translation(x), self.rotation(x), F.relu(self.fov(x))), -1)


class ScaleHead(nn.Module):
    """Scale token state (..., d) -> metric scale (...,) > 0 (metres per teacher unit)."""

    def __init__(self, dim: int, hidden: int = 512) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.exp(self.backbone(x).squeeze(-1))


class DistillHead(nn.Module):
    """Video-token states (N, hq, wq, d) -> (N, h, w, C): bilinear resize to the teacher's pooled
    grid first (align_corners=False), then LayerNorm, Linear(d, C), GELU, Linear(C, C)."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        if tuple(x.shape[1:3]) != tuple(grid_hw):
            x = F.interpolate(x.permute(0, 3, 1, 2), size=grid_hw, mode="bilinear", align_corners=False)
            x = x.permute(0, 2, 3, 1)
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


def dense_target_grid(depth_hw: tuple[int, int], shuffle: int = 7) -> tuple[int, int]:
    """The grid the dense head's fused features are resized to, so that pixel-shuffle by `shuffle`
    lands exactly on the cached depth map.

    The student sees a frame as the Qwen3-VL merged token grid (hq, wq) (32-pixel tokens: 15 x 20
    for 480 x 640); the teacher saw it as the patch grid (ht, wt) of 14-pixel patches of its own
    image (28 x 36 for 392 x 504), and the cache holds depth at half the teacher image,
    (Hd, Wd) = (7 ht, 7 wt) (196 x 252). The dense head fuses its four levels at 4x the token grid
    (60 x 80), resizes bilinearly to (ht, wt) = (Hd / 7, Wd / 7), predicts 7 x 7 = 49 values per cell
    and pixel-shuffles them to (Hd, Wd): as GeoVR, whose head predicts full teacher resolution from
    4x the 28-pixel grid, here at the cached half resolution.

    Args:
        depth_hw: (Hd, Wd) of the cached depth; both must be multiples of `shuffle`.

    Returns:
        (ht, wt) = (Hd // shuffle, Wd // shuffle).
    """
    hd, wd = depth_hw
    if hd % shuffle or wd % shuffle:
        raise ValueError(f"depth map {hd}x{wd} is not a multiple of the pixel-shuffle factor {shuffle}")
    return hd // shuffle, wd // shuffle


def _uv_grid(height: int, width: int, aspect: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(H, W, 2) coordinates spanning the image plane normalised by its diagonal (VGGT's UV grid)."""
    diag = math.sqrt(aspect**2 + 1.0)
    span_x, span_y = aspect / diag, 1.0 / diag
    xs = torch.linspace(
        -span_x * (width - 1) / width, span_x * (width - 1) / width, width, dtype=dtype, device=device
    )
    ys = torch.linspace(
        -span_y * (height - 1) / height, span_y * (height - 1) / height, height, dtype=dtype, device=device
    )
    v, u = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((u, v), -1)


def _sincos(positions: Tensor, dim: int, omega_0: float = 100.0) -> Tensor:
    """(M,) positions -> (M, dim) [sin | cos] embedding with frequencies omega_0^(-2i/dim)."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2.0)
    angles = positions.double()[:, None] * (1.0 / omega_0**omega)[None]
    return torch.cat((angles.sin(), angles.cos()), -1).float()


def add_position_embedding(x: Tensor, aspect: float, ratio: float = 0.1) -> Tensor:
    """x (N, C, H, W) + ratio * sinusoidal embedding of the UV grid (C/2 channels for u, C/2 for v)."""
    _, channels, height, width = x.shape
    uv = _uv_grid(height, width, aspect, torch.float64, x.device).reshape(-1, 2)
    embed = torch.cat((_sincos(uv[:, 0], channels // 2), _sincos(uv[:, 1], channels // 2)), -1)
    embed = embed.reshape(height, width, channels).permute(2, 0, 1).to(x.dtype)
    return x + ratio * embed[None]


class _ResidualConvUnit(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class _FusionBlock(nn.Module):
    """RefineNet fusion: (+ residual unit of the skip), residual unit, bilinear resize, 1x1 conv."""

    def __init__(self, features: int, has_skip: bool = True) -> None:
        super().__init__()
        self.skip_unit = _ResidualConvUnit(features) if has_skip else None
        self.unit = _ResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, 1)

    def forward(self, x: Tensor, skip: Tensor | None, size: Sequence[int]) -> Tensor:
        if self.skip_unit is not None:
            x = x + self.skip_unit(skip)
        x = self.unit(x)
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)
        return self.out_conv(x)


def _resize_layer(channels: int, factor: float) -> nn.Module:
    if factor == 1.0:
        return nn.Identity()
    if factor == 0.5:
        return nn.Conv2d(channels, channels, 3, stride=2, padding=1)
    return nn.ConvTranspose2d(channels, channels, int(factor), stride=int(factor))


class DenseHead(nn.Module):
    """DPT-style depth head over four LLM hidden states of a frame's video tokens.

    Per level: shared LayerNorm, 1x1 projection to `channels[i]`, UV position embedding, resize by
    x4, x2, x1, x0.5 (transposed conv / identity / strided conv), 3x3 conv to `features`; RefineNet
    fusion from the coarsest level up to 4x the token grid; bilinear resize to the teacher patch grid
    (`dense_target_grid`), position embedding, 1x1 conv to shuffle^2 channels, pixel-shuffle, exp.
    """

    def __init__(
        self,
        dim: int,
        features: int = 256,
        channels: Sequence[int] = (256, 512, 1024, 1024),
        shuffle: int = 7,
    ) -> None:
        super().__init__()
        if len(channels) != 4 or any(c % 4 for c in (*channels, features)):
            raise ValueError(
                f"dense head needs 4 levels with channels divisible by 4, got {channels}, {features}"
            )
        self.shuffle = shuffle
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.projects = nn.ModuleList(nn.Conv2d(dim, c, 1) for c in channels)
        self.resize = nn.ModuleList(
            _resize_layer(c, f) for c, f in zip(channels, (4.0, 2.0, 1.0, 0.5), strict=True)
        )
        self.layer_rn = nn.ModuleList(nn.Conv2d(c, features, 3, padding=1, bias=False) for c in channels)
        self.refine = nn.ModuleList(_FusionBlock(features, has_skip=i < 3) for i in range(4))
        self.proj = nn.Conv2d(features, shuffle * shuffle, 1)

    def forward(self, levels: Sequence[Tensor], depth_hw: tuple[int, int], frame_aspect: float) -> Tensor:
        """levels: four (N, hq, wq, d) states; depth_hw: the cached (Hd, Wd); frame_aspect: W / H of the
        student frame. Returns depth (N, Hd, Wd) > 0."""
        maps = []
        for i, x in enumerate(levels):
            x = self.projects[i](self.norm(x).permute(0, 3, 1, 2))
            x = self.resize[i](add_position_embedding(x, frame_aspect))
            maps.append(self.layer_rn[i](x))
        fused = self.refine[3](maps[3], None, maps[2].shape[-2:])
        fused = self.refine[2](fused, maps[2], maps[1].shape[-2:])
        fused = self.refine[1](fused, maps[1], maps[0].shape[-2:])
        fused = self.refine[0](fused, maps[0], maps[0].shape[-2:])
        grid = dense_target_grid(depth_hw, self.shuffle)
        if tuple(fused.shape[-2:]) != grid:
            fused = F.interpolate(fused, size=grid, mode="bilinear", align_corners=True)
        fused = add_position_embedding(fused, depth_hw[1] / depth_hw[0])
        logits = F.pixel_shuffle(self.proj(fused), self.shuffle)  # (N, 1, Hd, Wd)
        return torch.exp(logits[:, 0])
