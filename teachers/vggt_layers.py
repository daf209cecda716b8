"""Transformer building blocks of VGGT: attention with qk-norm and 2D RoPE, LayerScale blocks, and the
DINOv2-with-registers patch embedding. The DINOv2 parts (`Block` without qk-norm and RoPE,
`ConvPatchEmbed`, `resize_position_embedding`) are also DA3-Metric's backbone (`da3_metric`).

Parameter names follow the official VGGT checkpoint (`qkv`, `q_norm`, `proj`, `ls1.gamma`, `mlp.fc1`,
`cls_token`, `pos_embed`, `register_tokens`, `patch_embed.proj`, ...), so its state_dict loads as is.

Precision: under bf16 autocast the linear layers and attention run in bf16, while LayerNorm outputs
float32 and `LayerScale` multiplies the bf16 branch output by a float32 `gamma`; the residual stream
`x + ls(branch(x))` therefore stays float32 from the first to the last block, as in the official code.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

ATTENTION_BACKENDS = ("sdpa", "cudnn", "xformers")

# "cudnn": cuDNN's fused attention first (the fastest SDPA kernel on Hopper for VGGT's head size 64),
# then PyTorch's usual order, so that shapes or devices cuDNN does not take still run.
_CUDNN_FIRST = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def attention_kernel_context(attention: str) -> AbstractContextManager:
    """The SDPA kernel context for an attention choice of `ATTENTION_BACKENDS` (a no-op but for "cudnn")."""
    if attention == "cudnn":
        return sdpa_kernel(_CUDNN_FIRST, set_priority=True)
    return nullcontext()


def xformers_available() -> bool:
    """Whether `xformers.ops.memory_efficient_attention` can be imported."""
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        return False
    return True


class RotaryEmbedding2D:
    """2D rotary position embedding: the first half of each head's channels rotates with the row
    (y) position, the second half with the column (x) position.

    Within each half of `d` channels, channel pairs (j, j + d/2) rotate by angle `pos * base**(-2j/d)`
    (the rotate-half layout, not interleaved pairs). Positions are integers; VGGT gives its special
    tokens position (0, 0) and patch (row, col) position (row + 1, col + 1).
    """

    def __init__(self, base_frequency: float = 100.0) -> None:
        self.base_frequency = base_frequency

    def tables(self, positions: Tensor, head_dim: int, num_positions: int) -> tuple[Tensor, Tensor]:
        """(cos, sin), each (N, head_dim) float32, for integer positions (N, 2) given as (y, x), all
        below `num_positions`."""
        if head_dim % 4:
            raise ValueError(f"2D RoPE needs a head dimension divisible by 4, got {head_dim}")
        half = head_dim // 2
        exponents = torch.arange(0, half, 2, device=positions.device).float() / half
        inv_freq = 1.0 / (self.base_frequency**exponents)
        angles = torch.outer(
            torch.arange(num_positions, device=positions.device, dtype=torch.float32), inv_freq
        )
        angles = torch.cat((angles, angles), dim=-1)  # (num_positions, half)
        cos_table, sin_table = angles.cos(), angles.sin()
        y, x = positions[:, 0], positions[:, 1]
        cos = torch.cat((cos_table[y], cos_table[x]), dim=-1)
        sin = torch.cat((sin_table[y], sin_table[x]), dim=-1)
        return cos, sin

    @staticmethod
    def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Rotate `x` (..., N, head_dim) with tables (N, head_dim) from `tables`."""
        a, b, c, d = x.chunk(4, dim=-1)
        rotated = torch.cat((-b, a, -d, c), dim=-1)
        return x * cos + rotated * sin


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch: `x * gamma`."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention with optional per-head LayerNorm on q and k (qk-norm) and 2D RoPE.

    `backend` ("sdpa" or "xformers") picks the kernel; both compute softmax(q k^T / sqrt(d)) v. Which
    SDPA kernel runs is chosen by the caller's `sdpa_kernel` context (`attention_kernel_context`).
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else None
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else None
        self.proj = nn.Linear(dim, dim)
        self.backend = "sdpa"

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x (B, N, C) -> (B, N, C); rope: (cos, sin) tables (N, head_dim) or None."""
        batch, tokens, width = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q = RotaryEmbedding2D.rotate(q, *rope)
            k = RotaryEmbedding2D.rotate(k, *rope)
        # Under autocast q/k leave the LayerNorm in float32 while v is bf16; the kernels want one dtype
        # (autocast would cast q/k down for SDPA anyway).
        q, k = q.to(v.dtype), k.to(v.dtype)
        if self.backend == "xformers":
            from xformers.ops import memory_efficient_attention

            out = memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            out = out.reshape(batch, tokens, width)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
            out = out.transpose(1, 2).reshape(batch, tokens, width)
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        layer_scale_init: float = 0.01,
        qk_norm: bool = False,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qk_norm=qk_norm)
        self.ls1 = LayerScale(dim, layer_scale_init)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale_init)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


class ConvPatchEmbed(nn.Module):
    """Non-overlapping patches by a strided convolution: (N, 3, H, W) -> (N, H/p * W/p, C), row-major."""

    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


def resize_position_embedding(
    pos_embed: Tensor, grid_hw: tuple[int, int], offset: float, antialias: bool
) -> Tensor:
    """DINOv2's learned position embedding for a (grid_h, grid_w) patch grid, in float32.

    Args:
        pos_embed: (1, 1 + M * M, C): the class token's row, then a square M x M patch grid.
        grid_hw: (grid_h, grid_w) patch grid of the input.
        offset: DINOv2's `interpolate_offset`. 0: bicubic resize to exactly (grid_h, grid_w).
            Otherwise the resize is given by the scale factors ((grid_h + offset) / M,
            (grid_w + offset) / M), which also set where the output samples fall (DINOv2's historical
            kludge: the output size is the floor of M times the factor, the sampling grid differs).
        antialias: antialiased bicubic (VGGT's patch embedding) or plain bicubic (DA3).

    Returns:
        (1, 1 + grid_h * grid_w, C) float32; `pos_embed` itself (as float32) for the M x M grid.
    """
    pos = pos_embed.float()
    side = math.isqrt(pos.shape[1] - 1)
    grid_h, grid_w = grid_hw
    if (grid_h, grid_w) == (side, side):
        return pos
    dim = pos.shape[-1]
    grid = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if offset:
        factors = ((grid_h + offset) / side, (grid_w + offset) / side)
        grid = F.interpolate(grid, scale_factor=factors, mode="bicubic", antialias=antialias)
    else:
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", antialias=antialias)
    if grid.shape[-2:] != (grid_h, grid_w):
        raise ValueError(f"position embedding resized to {tuple(grid.shape[-2:])}, expected {grid_hw}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
    return torch.cat((pos[:, :1], grid), dim=1)


class DinoPatchEmbed(nn.Module):
    """DINOv2 ViT with register tokens, used as VGGT's patch embedding; returns the normalised patch tokens.

    Sequence: [cls, registers, patches]; the position embedding (learned for a square `img_size` grid,
    plus one row for cls) is added to cls and patches only. For another grid it is resized with
    antialiased bicubic interpolation to exactly (H/p, W/p) (DINOv2 with interpolate_offset 0, so by
    output size, not by scale factor), computed in float32. Blocks use LayerNorm eps 1e-6, LayerScale
    init 1.0, no qk-norm, no RoPE. The `mask_token` is kept only because the checkpoint has it.
    """

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        num_register_tokens: int,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.num_register_tokens = num_register_tokens
        self.patch_embed = ConvPatchEmbed(patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid_size**2, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, layer_scale_init=1.0, norm_eps=1e-6) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.normal_(self.register_tokens, std=1e-6)

    def position_embedding(self, grid_h: int, grid_w: int) -> Tensor:
        """(1, 1 + grid_h * grid_w, C) float32: cls row, then the patch grid resized to (grid_h, grid_w)."""
        return resize_position_embedding(self.pos_embed, (grid_h, grid_w), offset=0.0, antialias=True)

    def forward(self, images: Tensor) -> Tensor:
        """Normalised images (N, 3, H, W), H and W multiples of the patch size -> (N, H/p * W/p, C)."""
        n, _, height, width = images.shape
        patches = self.patch_embed(images)
        x = torch.cat((self.cls_token.expand(n, -1, -1), patches), dim=1)
        x = x + self.position_embedding(height // self.patch_size, width // self.patch_size).to(x.dtype)
        x = torch.cat((x[:, :1], self.register_tokens.expand(n, -1, -1), x[:, 1:]), dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1 + self.num_register_tokens :]
