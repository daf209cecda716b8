"""VGGT prediction heads: camera (trunk + adaLN iterative refinement), DPT dense heads (depth, points),
and the tracking head's parameters.

`VGGT.forward` runs the heads in float32 with autocast disabled, as the official model does; the DPT
heads may instead run under bf16 autocast (`dpt_head_autocast`), in which case their last 1x1
convolution and the activations are still computed in float32.
Parameter names follow the official checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geovr.teachers.vggt_layers import Block, Mlp

# F.interpolate indexes its output with 32-bit integers; the official head splits larger batches.
_INTERPOLATE_MAX_ELEMENTS = 1_610_612_736

TokensByLayer = Mapping[int, Tensor] | Sequence[Tensor]


# ---------------------------------------------------------------------------------------------------
# Camera head
# ---------------------------------------------------------------------------------------------------


def activate_pose(raw: Tensor) -> Tensor:
    """Raw (..., 9) -> pose_enc: translation and quaternion linear, the two fields of view ReLU'd."""
    return torch.cat((raw[..., :7], F.relu(raw[..., 7:])), dim=-1)


class CameraHead(nn.Module):
    """Camera tokens of the last aggregator stage -> `pose_enc` (B, S, 9) by iterative refinement.

    Each iteration embeds the current estimate (a learned empty pose at first), turns it into a
    shift, scale and gate (adaLN, as in DiT) that modulate the LayerNorm'd camera tokens, adds the
    tokens back, runs the trunk (self-attention across the S frames) and predicts a delta of the raw
    encoding. The activation (ReLU on the fields of view) is applied to each running sum.
    """

    pose_dim = 9

    def __init__(self, dim_in: int, trunk_depth: int, num_heads: int, num_iterations: int = 4) -> None:
        super().__init__()
        self.num_iterations = num_iterations
        self.trunk = nn.Sequential(*(Block(dim_in, num_heads, mlp_ratio=4) for _ in range(trunk_depth)))
        self.token_norm = nn.LayerNorm(dim_in)
        self.trunk_norm = nn.LayerNorm(dim_in)
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, self.pose_dim))
        self.embed_pose = nn.Linear(self.pose_dim, dim_in)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim_in, 3 * dim_in))
        self.adaln_norm = nn.LayerNorm(dim_in, elementwise_affine=False, eps=1e-6)
        self.pose_branch = Mlp(dim_in, dim_in // 2, self.pose_dim)

    def forward(self, last_stage_tokens: Tensor) -> Tensor:
        """last_stage_tokens (B, S, P, 2C) -> pose_enc (B, S, 9) of the last iteration."""
        tokens = self.token_norm(last_stage_tokens[:, :, 0])
        batch, frames, _ = tokens.shape
        raw = None
        pose_enc = None
        for _ in range(self.num_iterations):
            previous = self.empty_pose_tokens.expand(batch, frames, -1) if raw is None else raw
            shift, scale, gate = self.poseLN_modulation(self.embed_pose(previous)).chunk(3, dim=-1)
            modulated = gate * (self.adaln_norm(tokens) * (1 + scale) + shift) + tokens
            delta = self.pose_branch(self.trunk_norm(self.trunk(modulated)))
            raw = delta if raw is None else raw + delta
            pose_enc = activate_pose(raw)
        return pose_enc


# ---------------------------------------------------------------------------------------------------
# DPT head
# ---------------------------------------------------------------------------------------------------


def chunked_interpolate(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear (align_corners=True) resize of (N, C, h, w) to `size`, split along N when the output
    would exceed the 32-bit index range of the kernel."""
    elements = size[0] * size[1] * x.shape[0] * x.shape[1]
    if elements <= _INTERPOLATE_MAX_ELEMENTS:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    chunks = x.chunk(elements // _INTERPOLATE_MAX_ELEMENTS + 1, dim=0)
    return torch.cat([F.interpolate(c, size=size, mode="bilinear", align_corners=True) for c in chunks])


def uv_position_embedding(
    channels: int, height: int, width: int, aspect_ratio: float, device: torch.device | None = None
) -> Tensor:
    """(channels, height, width) float32 sinusoidal embedding of a normalised UV grid.

    The grid spans (-sx, -sy) .. (sx, sy) at pixel centres, with sx, sy the half extents of an image of
    the given aspect ratio (width / height) whose half-diagonal is 1. Channels: the u embedding then the
    v embedding, each [sin, cos] over frequencies 100**(-k / (channels / 4)); computed in float64.
    """
    diagonal = (aspect_ratio**2 + 1.0) ** 0.5
    span_x, span_y = aspect_ratio / diagonal, 1.0 / diagonal
    u = torch.linspace(-span_x * (width - 1) / width, span_x * (width - 1) / width, width, device=device)
    v = torch.linspace(-span_y * (height - 1) / height, span_y * (height - 1) / height, height, device=device)
    uu, vv = torch.meshgrid(u, v, indexing="xy")  # (height, width) each

    quarter = channels // 4
    omega = 1.0 / 100.0 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)

    def embed(coords: Tensor) -> Tensor:
        angles = coords.reshape(-1, 1).double() * omega
        return torch.cat((angles.sin(), angles.cos()), dim=-1).float()

    emb = torch.cat((embed(uu), embed(vv)), dim=-1).reshape(height, width, channels)
    return emb.permute(2, 0, 1)


class ResidualConvUnit(nn.Module):
    """skip + conv2(relu(conv1(relu(x)))), where skip is relu(x) (`activated_skip`) or x.

    VGGT's official unit applies an in-place ReLU to its input, so its skip connection carries
    relu(x), not x; the checkpoint was trained that way, so it is reproduced here. Depth Anything 3's
    DPT builds the same unit with a ReLU that is not in place: its skip carries x.
    """

    def __init__(self, features: int, activated_skip: bool = True) -> None:
        super().__init__()
        self.activated_skip = activated_skip
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        activated = F.relu(x)
        return self.conv2(F.relu(self.conv1(activated))) + (activated if self.activated_skip else x)


class FusionBlock(nn.Module):
    """RefineNet fusion: (x + rcu1(skip)) -> rcu2 -> bilinear resize (x2 or to `size`) -> 1x1 conv."""

    def __init__(self, features: int, has_residual: bool = True, activated_skip: bool = True) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, kernel_size=1)
        self.resConfUnit1 = ResidualConvUnit(features, activated_skip) if has_residual else None
        self.resConfUnit2 = ResidualConvUnit(features, activated_skip)

    def forward(self, x: Tensor, skip: Tensor | None = None, size: tuple[int, int] | None = None) -> Tensor:
        if self.resConfUnit1 is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        if size is None:
            size = (int(x.shape[-2] * 2), int(x.shape[-1] * 2))
        return self.out_conv(chunked_interpolate(x, size))


def dpt_reassemble_layers(dim_in: int, out_channels: Sequence[int]) -> tuple[nn.ModuleList, nn.ModuleList]:
    """DPT's per-stage 1x1 projections (dim_in -> out_channels[i]) and resizes relative to the patch
    grid (x4 and x2 transposed convolutions, identity, stride-2 convolution): (projects, resize_layers)."""
    projects = nn.ModuleList(nn.Conv2d(dim_in, oc, kernel_size=1) for oc in out_channels)
    resize_layers = nn.ModuleList(
        [
            nn.ConvTranspose2d(out_channels[0], out_channels[0], kernel_size=4, stride=4),
            nn.ConvTranspose2d(out_channels[1], out_channels[1], kernel_size=2, stride=2),
            nn.Identity(),
            nn.Conv2d(out_channels[3], out_channels[3], kernel_size=3, stride=2, padding=1),
        ]
    )
    return projects, resize_layers


def dpt_fusion_scratch(out_channels: Sequence[int], features: int, activated_skip: bool = True) -> nn.Module:
    """DPT's `scratch` module: `layer{i}_rn` 3x3 convolutions (out_channels[i-1] -> features, no bias)
    and the RefineNet fusion blocks `refinenet1..4` (the coarsest, 4, without a lateral input). The
    caller adds its output convolutions to it."""
    scratch = nn.Module()
    for i, oc in enumerate(out_channels, start=1):
        setattr(scratch, f"layer{i}_rn", nn.Conv2d(oc, features, kernel_size=3, padding=1, bias=False))
    for i in (1, 2, 3, 4):
        setattr(
            scratch, f"refinenet{i}", FusionBlock(features, has_residual=i < 4, activated_skip=activated_skip)
        )
    return scratch


def dpt_fuse(scratch: nn.Module, levels: Sequence[Tensor]) -> Tensor:
    """Four resized stages (finest first) -> (N, features, h1, w1): RefineNet fusion from the
    coarsest level up, each step resized to the next finer level, the last one doubled."""
    rn = [getattr(scratch, f"layer{i}_rn")(level) for i, level in enumerate(levels, start=1)]
    out = scratch.refinenet4(rn[3], size=rn[2].shape[2:])
    out = scratch.refinenet3(out, rn[2], size=rn[1].shape[2:])
    out = scratch.refinenet2(out, rn[1], size=rn[0].shape[2:])
    return scratch.refinenet1(out, rn[0])


class DPTHead(nn.Module):
    """Dense prediction from four aggregator stages (Vision Transformers for Dense Prediction).

    Per stage: patch tokens -> LayerNorm -> (N, 2C, h, w) -> 1x1 projection -> + UV embedding ->
    resize (x4 and x2 transposed convs, identity, stride-2 conv). RefineNet fusion from the coarsest
    level, a 3x3 conv to features/2, bilinear resize to the image (divided by `down_ratio`), + UV
    embedding, then (unless `feature_only`) conv-ReLU-conv to `output_dim` channels whose last channel
    is the confidence.

    Activations: "exp" (depth), "inv_log" (points: sign(y) (exp|y| - 1)); confidence "expp1" (1 + exp).
    """

    def __init__(
        self,
        dim_in: int,
        patch_size: int,
        layers: Sequence[int],
        features: int,
        out_channels: Sequence[int],
        output_dim: int = 2,
        activation: str = "exp",
        feature_only: bool = False,
        pos_embed: bool = True,
        down_ratio: int = 1,
    ) -> None:
        super().__init__()
        if activation not in ("exp", "inv_log"):
            raise ValueError(f"unknown DPT activation {activation!r}")
        self.patch_size = patch_size
        self.layers = tuple(layers)
        self.activation = activation
        self.feature_only = feature_only
        self.use_pos_embed = pos_embed
        self.down_ratio = down_ratio

        self.norm = nn.LayerNorm(dim_in)
        self.projects, self.resize_layers = dpt_reassemble_layers(dim_in, out_channels)
        self.scratch = dpt_fusion_scratch(out_channels, features)
        if feature_only:
            self.scratch.output_conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1)
        else:
            self.scratch.output_conv1 = nn.Conv2d(features, features // 2, kernel_size=3, padding=1)
            self.scratch.output_conv2 = nn.Sequential(
                nn.Conv2d(features // 2, 32, kernel_size=3, padding=1),
                nn.ReLU(),
                nn.Conv2d(32, output_dim, kernel_size=1),
            )

    def forward(
        self,
        tokens: TokensByLayer,
        image_hw: tuple[int, int],
        patch_start_idx: int,
        frame_chunk: int | None = 8,
    ) -> tuple[Tensor, Tensor]:
        """tokens[l] (B, S, P, 2C) for each l in `self.layers` -> (pred (B, S, H, W, output_dim - 1),
        conf (B, S, H, W)), processing `frame_chunk` frames (of every batch item) at a time."""
        if self.feature_only:
            raise RuntimeError(
                "a feature-only DPT head (the tracking head's extractor) is not run by this model"
            )
        frames = tokens[self.layers[0]].shape[1]
        chunk = frames if frame_chunk is None or frame_chunk >= frames else frame_chunk
        preds, confs = [], []
        for start in range(0, frames, chunk):
            stage_tokens = [tokens[layer][:, start : start + chunk] for layer in self.layers]
            pred, conf = self._predict(stage_tokens, image_hw, patch_start_idx)
            preds.append(pred)
            confs.append(conf)
        if len(preds) == 1:
            return preds[0], confs[0]
        return torch.cat(preds, dim=1), torch.cat(confs, dim=1)

    def _add_pos_embed(self, x: Tensor, image_hw: tuple[int, int]) -> Tensor:
        height, width = image_hw
        emb = uv_position_embedding(x.shape[1], x.shape[-2], x.shape[-1], width / height, x.device)
        return x + 0.1 * emb.to(x.dtype)

    def _predict(
        self, stage_tokens: list[Tensor], image_hw: tuple[int, int], patch_start_idx: int
    ) -> tuple[Tensor, Tensor]:
        batch, frames = stage_tokens[0].shape[:2]
        height, width = image_hw
        grid_h, grid_w = height // self.patch_size, width // self.patch_size

        levels = []
        for tokens, project, resize in zip(stage_tokens, self.projects, self.resize_layers, strict=True):
            x = self.norm(tokens[:, :, patch_start_idx:].reshape(batch * frames, grid_h * grid_w, -1))
            x = x.transpose(1, 2).reshape(batch * frames, -1, grid_h, grid_w)
            x = project(x)
            if self.use_pos_embed:
                x = self._add_pos_embed(x, image_hw)
            levels.append(resize(x))

        scratch = self.scratch
        out = scratch.output_conv1(dpt_fuse(scratch, levels))

        out_size = (
            int(grid_h * self.patch_size / self.down_ratio),
            int(grid_w * self.patch_size / self.down_ratio),
        )
        out = chunked_interpolate(out, out_size)
        if self.use_pos_embed:
            out = self._add_pos_embed(out, image_hw)
        hidden = scratch.output_conv2[:-1](out)  # conv, ReLU; the last 1x1 conv in float32 below
        with torch.autocast(hidden.device.type, enabled=False):
            out = scratch.output_conv2[-1](hidden.float()).permute(0, 2, 3, 1)  # (N, H, W, output_dim)

        values, conf = out[..., :-1], out[..., -1]
        if self.activation == "exp":
            values = values.exp()
        else:
            values = torch.sign(values) * torch.expm1(values.abs())
        conf = 1 + conf.exp()
        return values.reshape(batch, frames, *values.shape[1:]), conf.reshape(batch, frames, *conf.shape[1:])


# ---------------------------------------------------------------------------------------------------
# Tracking head: parameters only
# ---------------------------------------------------------------------------------------------------


class _SelfAttentionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)


class _CrossAttentionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)


class _UpdateFormer(nn.Module):
    def __init__(self, input_dim: int, hidden: int, output_dim: int, depth: int, virtual_tracks: int) -> None:
        super().__init__()
        heads = 8
        # (sic) the checkpoint spells it "virual_tracks".
        self.virual_tracks = nn.Parameter(torch.zeros(1, virtual_tracks, 1, hidden))
        self.input_norm = nn.LayerNorm(input_dim)
        self.input_transform = nn.Linear(input_dim, hidden)
        self.output_norm = nn.LayerNorm(hidden)
        self.flow_head = nn.Linear(hidden, output_dim)
        self.time_blocks = nn.ModuleList(_SelfAttentionBlock(hidden, heads) for _ in range(depth))
        self.space_virtual_blocks = nn.ModuleList(_SelfAttentionBlock(hidden, heads) for _ in range(depth))
        self.space_point2virtual_blocks = nn.ModuleList(
            _CrossAttentionBlock(hidden, heads) for _ in range(depth)
        )
        self.space_virtual2point_blocks = nn.ModuleList(
            _CrossAttentionBlock(hidden, heads) for _ in range(depth)
        )


class _TrackerParameters(nn.Module):
    def __init__(
        self, latent: int = 128, hidden: int = 384, depth: int = 6, virtual_tracks: int = 64
    ) -> None:
        super().__init__()
        corr_inputs = 7 * (2 * 4 + 1) ** 2  # 7 correlation levels, radius 4
        token_dim = 3 * latent + 4  # correlations, features, flow embedding, plus 4
        self.query_ref_token = nn.Parameter(torch.zeros(1, 2, token_dim))
        self.corr_mlp = Mlp(corr_inputs, hidden, latent)
        self.updateformer = _UpdateFormer(token_dim, hidden, latent + 2, depth, virtual_tracks)
        self.fmap_norm = nn.LayerNorm(latent)
        self.ffeat_norm = nn.LayerNorm(latent)
        self.ffeat_updater = nn.Sequential(nn.Linear(latent, latent), nn.GELU())
        self.vis_predictor = nn.Sequential(nn.Linear(latent, 1))
        self.conf_predictor = nn.Sequential(nn.Linear(latent, 1))


class TrackHeadParameters(nn.Module):
    """The official tracking head's parameters, with its names and shapes, and no forward.

    Built only so that a model with every head has exactly the checkpoint's tensors (the VGGT-1B
    state-dict check). The teacher never tracks points; calling this module raises, as nn.Module does
    for a module without `forward`.
    """

    def __init__(
        self, dim_in: int, patch_size: int, layers: Sequence[int], out_channels: Sequence[int]
    ) -> None:
        super().__init__()
        self.feature_extractor = DPTHead(
            dim_in,
            patch_size,
            layers,
            features=128,
            out_channels=out_channels,
            feature_only=True,
            pos_embed=False,
            down_ratio=2,
        )
        self.tracker = _TrackerParameters()
