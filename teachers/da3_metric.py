"""Depth Anything 3 Metric (DA3METRIC-LARGE): monocular canonical depth and sky, GeoVR's scale teacher.

Our implementation, checkpoint-compatible with the official code (`ByteDance-Seed/Depth-Anything-3`,
PyPI `depth-anything-3==0.1.1`, preset `da3metric-large`) and proven equal to it on the conformance
vectors in `shared/reference/da3metric/`.

Architecture, for frames (B, S, 3, H, W) ImageNet-normalised, H and W multiples of the 14-pixel patch
(every frame on its own: the metric model has no cross-frame attention):
1. A DINOv2 ViT (ViT-L structure: patch 14, a class token, no registers, a learned position
   embedding for a 518x518 image resized by plain bicubic with DINOv2's `interpolate_offset` 0.1,
   pre-norm blocks with LayerNorm eps 1e-6, LayerScale, MLP ratio 4, exact GELU). The outputs of the
   blocks `out_layers` (4, 11, 17, 23 in the large model) go through the final LayerNorm, whose eps is
   PyTorch's default 1e-5 (not the blocks' 1e-6), and lose their class token: (N, H/14 * W/14, C).
2. A DPT head without token norm and without position embedding: per stage a 1x1 projection and a
   resize (x4, x2, x1, /2), RefineNet fusion (residual units whose skip carries the unactivated
   input), a 3x3 convolution to features/2, a bilinear (align_corners) resize to H x W, then two
   branches of conv 3x3 -> ReLU -> conv 1x1: `depth = exp(.)` and `sky = relu(.)`. The head runs in
   float32 with autocast disabled, as the official model does.

`depth` is canonical: metric depth in metres is `depth * focal / 300` for a camera of focal length
`focal` pixels (`metric_scale.canonical_to_metric`). `sky >= SKY_THRESHOLD` (0.3) marks sky.

DA3's own sky handling (`DepthAnything3Metric.predict`, as `DepthAnything3Net` does after every
forward): when a clip has more than 10 sky and more than 10 non-sky pixels, its sky pixels get the
0.99 quantile of its non-sky depth. The official code estimates that quantile from 100,000 pixels
drawn at random (with replacement) when there are more; here it is exact, so the output does not
depend on a random state. With GeoVR's batch of one clip per call, "the clip" and the official
"the batch" are the same pixels.

Precision: `predict` runs the backbone under the caller's autocast (GeoVR: bf16 on the GPU) and the
head in float32; on the CPU it is float32 throughout.

Checkpoints (`DepthAnything3Metric.from_pretrained`): a local directory with `model.safetensors` and
`config.json`. The Hub layout (`depth-anything/DA3METRIC-LARGE`) stores the official API wrapper's
state_dict, every key under `model.`, and a `config.json` naming the preset
(`{"model_name": "da3metric-large"}`) without sizes, which gives the DA3METRIC-LARGE sizes; a
`config.json` with sizes (the reference's tiny model) overrides them. Loading is strict: a missing,
unexpected or mis-shaped tensor raises `CheckpointError` naming it. Nothing is ever downloaded.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from geovr.teacher_cache.config import ConfigError, from_dict, require
from geovr.teachers.vggt import IMAGENET_MEAN, IMAGENET_STD, CheckpointError, _check_state_dict
from geovr.teachers.vggt_heads import (
    chunked_interpolate,
    dpt_fuse,
    dpt_fusion_scratch,
    dpt_reassemble_layers,
)
from geovr.teachers.vggt_layers import Block, ConvPatchEmbed, resize_position_embedding

PRESET = "da3metric-large"
CHECKPOINT_PREFIX = "model."
"""Every key of the Hub checkpoint starts with this (the API wrapper's submodule `model`)."""
CHECKPOINT_FILES = ("config.json", "model.safetensors")
"""The files of a checkpoint directory that determine its predictions (hashed for the fingerprint)."""
SKY_THRESHOLD = 0.3
"""Pixels whose sky output is at least this are sky (DA3's `compute_sky_mask`)."""
SKY_MIN_PIXELS = 10
"""DA3 fills the sky only when a clip has more than this many sky and non-sky pixels each."""
SKY_FILL_QUANTILE = 0.99
INTERPOLATE_OFFSET = 0.1


@dataclass
class DA3MetricConfig:
    """Sizes of a DA3-Metric model: the `config.json` schema (defaults: DA3METRIC-LARGE).

    Attributes:
        model_name: the official preset whose architecture this is; only "da3metric-large".
        embed_dim, depth, num_heads: the ViT's width, blocks and attention heads.
        out_layers: the four blocks the DPT head reads, ascending.
        patch_size, img_size: patch side and the square image the position embedding is learnt for.
        num_register_tokens: must be 0 (DA3METRIC-LARGE has none).
        dpt_features: the DPT fusion width; dpt_out_channels: its four per-stage widths.
        sky_head: must be true (the scale chain needs the sky output).
    """

    model_name: str = PRESET
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    out_layers: tuple[int, ...] = (4, 11, 17, 23)
    patch_size: int = 14
    img_size: int = 518
    num_register_tokens: int = 0
    dpt_features: int = 256
    dpt_out_channels: tuple[int, ...] = (256, 512, 1024, 1024)
    sky_head: bool = True

    @classmethod
    def from_json(cls, path: str | Path) -> DA3MetricConfig:
        """Read and validate a `config.json`; ConfigError names the file and the bad key."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: cannot read DA3-Metric config: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a DA3-Metric config must be a JSON object")
        if raw.get("model_type") == "depth_anything":
            raise ConfigError(
                f"{path}: a Depth Anything V2 checkpoint (model_type depth_anything), not DA3-Metric; "
                "set teacher.metric_teacher=depth-anything-v2 for it"
            )
        return from_dict(cls, raw, where=str(path))

    def validate(self) -> None:
        require(
            self.model_name == PRESET,
            f"model_name {self.model_name!r}: only the {PRESET!r} preset (monocular metric depth and sky) "
            "is supported",
        )
        require(self.num_register_tokens == 0, "num_register_tokens must be 0 (DA3-Metric has no registers)")
        require(self.sky_head, "sky_head must be true: the metric scale needs DA3's sky output")
        require(
            self.patch_size > 0 and self.img_size % self.patch_size == 0,
            "img_size must be a multiple of patch_size",
        )
        for name in ("embed_dim", "depth", "num_heads"):
            require(getattr(self, name) > 0, f"{name} must be positive")
        require(self.embed_dim % self.num_heads == 0, "embed_dim must divide by num_heads")
        require(
            len(self.out_layers) == 4 and list(self.out_layers) == sorted(set(self.out_layers)),
            "out_layers needs 4 ascending block indices",
        )
        require(
            all(0 <= i < self.depth for i in self.out_layers), f"out_layers must lie in [0, {self.depth})"
        )
        require(len(self.dpt_out_channels) == 4, "dpt_out_channels needs 4 values")
        require(all(c > 0 for c in self.dpt_out_channels), "dpt_out_channels must be positive")
        require(self.dpt_features >= 2 and self.dpt_features % 2 == 0, "dpt_features must be even")


class DinoV2Encoder(nn.Module):
    """DA3's DINOv2 ViT: images (N, 3, H, W) -> normalised patch tokens of the `out_layers` blocks.

    Tensor names as the official `backbone.pretrained` module: `patch_embed.proj`, `cls_token`,
    `pos_embed`, `blocks.{i}.(norm1|attn.qkv|attn.proj|ls1|norm2|mlp.fc1|mlp.fc2|ls2)`, `norm`.
    """

    def __init__(self, cfg: DA3MetricConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.out_layers = tuple(cfg.out_layers)
        grid = cfg.img_size // cfg.patch_size
        self.patch_embed = ConvPatchEmbed(cfg.patch_size, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, cfg.embed_dim))
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, mlp_ratio=4.0, layer_scale_init=1.0, norm_eps=1e-6)
            for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.embed_dim)  # eps 1e-5, unlike the blocks: as the official model

    def forward(self, images: Tensor) -> list[Tensor]:
        """images (N, 3, H, W) normalised -> one (N, H/p * W/p, C) tensor per out layer, in order.

        The blocks after the last out layer are not run (their output is not used).
        """
        n, _, height, width = images.shape
        grid_hw = (height // self.patch_size, width // self.patch_size)
        x = torch.cat((self.cls_token.expand(n, -1, -1), self.patch_embed(images)), dim=1)
        x = x + resize_position_embedding(
            self.pos_embed, grid_hw, offset=INTERPOLATE_OFFSET, antialias=False
        ).to(x.dtype)
        outputs = []
        for index, block in enumerate(self.blocks[: self.out_layers[-1] + 1]):
            x = block(x)
            if index in self.out_layers:
                outputs.append(self.norm(x)[:, 1:])
        return outputs


class DA3DPTHead(nn.Module):
    """DA3's DPT head with the sky branch: four stages of patch tokens -> (depth, sky) at H x W.

    Tensor names as the official `head` module: `projects`, `resize_layers`, `scratch.layer{i}_rn`,
    `scratch.refinenet{i}`, `scratch.output_conv1`, `scratch.output_conv2`, `scratch.sky_output_conv2`.
    """

    def __init__(self, cfg: DA3MetricConfig) -> None:
        super().__init__()
        features = cfg.dpt_features
        self.patch_size = cfg.patch_size
        self.projects, self.resize_layers = dpt_reassemble_layers(cfg.embed_dim, cfg.dpt_out_channels)
        self.scratch = dpt_fusion_scratch(cfg.dpt_out_channels, features, activated_skip=False)
        self.scratch.output_conv1 = nn.Conv2d(features, features // 2, kernel_size=3, padding=1)
        self.scratch.output_conv2 = self._output_branch(features // 2)
        self.scratch.sky_output_conv2 = self._output_branch(features // 2)

    @staticmethod
    def _output_branch(channels: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(channels, 32, kernel_size=3, padding=1), nn.ReLU(), nn.Conv2d(32, 1, kernel_size=1)
        )

    def forward(self, stage_tokens: Sequence[Tensor], image_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """stage_tokens: four (N, h * w, C) float32 -> (depth (N, H, W) > 0, sky (N, H, W) >= 0)."""
        grid_h, grid_w = image_hw[0] // self.patch_size, image_hw[1] // self.patch_size
        levels = []
        for tokens, project, resize in zip(stage_tokens, self.projects, self.resize_layers, strict=True):
            x = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, grid_h, grid_w)
            levels.append(resize(project(x)))
        fused = self.scratch.output_conv1(dpt_fuse(self.scratch, levels))
        fused = chunked_interpolate(fused, (grid_h * self.patch_size, grid_w * self.patch_size))
        depth = self.scratch.output_conv2(fused).exp()
        sky = F.relu(self.scratch.sky_output_conv2(fused))
        return depth[:, 0], sky[:, 0]


class DepthAnything3Metric(nn.Module):
    """DA3-Metric: ImageNet-normalised frames -> canonical depth and sky (see the module docstring).

    Tensor names are the official network's (`backbone.pretrained.*`, `head.*`); the Hub file adds
    `CHECKPOINT_PREFIX` in front of each.
    """

    def __init__(self, cfg: DA3MetricConfig) -> None:
        super().__init__()
        self.config = cfg
        self.backbone = nn.ModuleDict({"pretrained": DinoV2Encoder(cfg)})
        self.head = DA3DPTHead(cfg)

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """pixel_values (B, S, 3, H, W) ImageNet-normalised -> (depth (B, S, H, W), sky (B, S, H, W)).

        No sky handling (see `predict`). The backbone runs under the caller's autocast, the head in
        float32 with autocast disabled.
        """
        batch, frames, _, height, width = pixel_values.shape
        patch = self.config.patch_size
        if height % patch or width % patch:
            raise ValueError(f"image size {height}x{width} is not a multiple of the {patch}-pixel patch")
        tokens = self.backbone["pretrained"](pixel_values.reshape(batch * frames, 3, height, width))
        with torch.autocast(pixel_values.device.type, enabled=False):
            depth, sky = self.head([t.float() for t in tokens], (height, width))
        return depth.reshape(batch, frames, height, width), sky.reshape(batch, frames, height, width)

    @torch.inference_mode()
    def predict(
        self, images: Tensor, frames_per_call: int = 16, autocast_dtype: torch.dtype | None = None
    ) -> tuple[Tensor, Tensor]:
        """Depth with DA3's sky handling, and sky, for clips of frames in [0, 1].

        Args:
            images: (B, S, 3, H, W) float in [0, 1] on the model's device: B clips of S frames
                (GeoVR: the frames VGGT sees).
            frames_per_call: at most this many frames per forward pass (memory bound; the frames
                are independent, so the split does not change the outputs).
            autocast_dtype: autocast dtype of the backbone (bf16 on the GPU), or None for float32.

        Returns:
            depth (B, S, H, W) float32 canonical depth, each clip's sky filled (`fill_sky_depth`);
            sky (B, S, H, W) float32.
        """
        batch, frames, _, height, width = images.shape
        flat = images.reshape(batch * frames, 1, 3, height, width)
        mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 1, 3, 1, 1)
        depths, skies = [], []
        for start in range(0, len(flat), max(1, frames_per_call)):
            chunk = (flat[start : start + frames_per_call].float() - mean) / std
            with torch.autocast(
                images.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
            ):
                depth, sky = self(chunk.transpose(0, 1))
            depths.append(depth[0])
            skies.append(sky[0])
        depth = torch.cat(depths).reshape(batch, frames, height, width)
        sky = torch.cat(skies).reshape(batch, frames, height, width)
        return torch.stack([fill_sky_depth(depth[b], sky[b]) for b in range(batch)]), sky

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> DepthAnything3Metric:
        """Load a local checkpoint directory strictly, in float32, in eval mode, without gradients.

        `path` holds `model.safetensors` (keys with or without the Hub's `model.` prefix) and
        `config.json` (the preset name, or sizes). Raises FileNotFoundError for a missing file,
        ConfigError for a bad config and CheckpointError naming every missing, unexpected or
        mis-shaped tensor.
        """
        path = Path(path)
        weights = path / "model.safetensors"
        for needed in (path / "config.json", weights):
            if not needed.is_file():
                raise FileNotFoundError(
                    f"DA3-Metric checkpoint {path}: no {needed.name} (expected a local directory with "
                    "config.json and model.safetensors)"
                )
        cfg = DA3MetricConfig.from_json(path / "config.json")
        try:
            state = load_file(str(weights))
        except Exception as err:  # corrupt or foreign file: report it by name
            raise CheckpointError(f"{weights}: cannot read checkpoint: {err}") from None
        if state and all(key.startswith(CHECKPOINT_PREFIX) for key in state):
            state = {key[len(CHECKPOINT_PREFIX) :]: value for key, value in state.items()}
        with torch.device("meta"):
            model = cls(cfg)
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        _check_state_dict(str(weights), state, expected, ignore_prefixes=(), model_name="DA3-Metric")
        model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True, assign=True)
        return model.to(device).eval().requires_grad_(False)


def exact_quantile(values: Tensor, q: float) -> Tensor:
    """`torch.quantile(values, q)` (linear interpolation between the two nearest ranks) over every
    element, without torch.quantile's 16M-element limit and without subsampling.

    Returns a float64 scalar tensor on `values`' device. `values` must not be empty.
    """
    flat = values.reshape(-1).double()
    position = q * (flat.numel() - 1)
    low = math.floor(position)
    below = torch.kthvalue(flat, low + 1).values
    if position == low:
        return below
    above = torch.kthvalue(flat, low + 2).values
    return below + (above - below) * (position - low)


def fill_sky_depth(depth: Tensor, sky: Tensor, threshold: float = SKY_THRESHOLD) -> Tensor:
    """DA3's sky handling for one clip: sky pixels get the exact 0.99 quantile of the non-sky depth.

    Args:
        depth, sky: (S, H, W) canonical depth and sky output of one clip.
        threshold: sky where `sky >= threshold`.

    Returns:
        (S, H, W): a copy with the sky filled, or `depth` itself when the clip has at most
        `SKY_MIN_PIXELS` sky or non-sky pixels (as the official model).
    """
    non_sky = sky < threshold
    sky_pixels = int((~non_sky).sum())
    if sky_pixels <= SKY_MIN_PIXELS or non_sky.numel() - sky_pixels <= SKY_MIN_PIXELS:
        return depth
    far = exact_quantile(depth[non_sky], SKY_FILL_QUANTILE).to(depth.dtype)
    return torch.where(non_sky, depth, far)


__all__ = [
    "CHECKPOINT_FILES",
    "SKY_THRESHOLD",
    "DA3MetricConfig",
    "DepthAnything3Metric",
    "exact_quantile",
    "fill_sky_depth",
]
