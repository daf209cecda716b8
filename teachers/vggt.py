"""VGGT (Visual Geometry Grounded Transformer), our implementation, checkpoint-compatible with the
official code (facebookresearch/vggt, last upstream commit 2025-10-11) and proven equal to it on the
conformance vectors in `shared/reference/vggt/`.

Architecture, for images (B, S, 3, H, W) in [0, 1], H and W multiples of the 14-pixel patch:
1. Normalise with the ImageNet mean/std; a DINOv2-with-registers ViT embeds each frame into
   (H/14 * W/14) patch tokens of width C.
2. Prepend 1 camera and 4 register tokens per frame (learned pairs: slot 0 for the first frame,
   slot 1 for every other frame), so P = 5 + H/14 * W/14 and patch tokens start at index 5.
3. `depth` stages, each a frame-attention block (tokens of one frame, (B*S, P, C)) followed by a
   global-attention block (all frames, (B, S*P, C)); blocks use qk-norm, LayerScale and 2D RoPE
   (base 100; special tokens at position (0, 0), patch (row, col) at (row + 1, col + 1)).
   The output of stage i is concat(frame-block output, global-block output): (B, S, P, 2C).
4. Heads, in float32 with autocast disabled: the camera head reads the camera token of the last
   stage; the DPT depth head reads four stages (`dpt_layers`).

Outputs of `VGGT.forward`: pose_enc (B, S, 9) = translation, XYZW quaternion, fields of view
(vertical, horizontal) in radians (see `geovr.teacher_cache.geometry`); extrinsic (B, S, 3, 4)
camera-from-world and intrinsic (B, S, 3, 3) decoded from it for the input size (the first frame's
camera is the world; units are VGGT's normalised scene units); depth (B, S, H, W, 1); depth_conf
(B, S, H, W) >= 1; layers {i: (B, S, P, 2C)} for the requested stages only.

Inference efficiency (`set_inference_options`): only the stages that a head or the caller needs are
kept (the official forward keeps all of them), the aggregator stops after the last needed stage, the
DPT head runs `dpt_frame_chunk` frames at a time, attention goes through SDPA (PyTorch's kernel
choice, or cuDNN's fused attention first) or xformers, and the transformer blocks can be compiled.
Under bf16 autocast the residual stream stays float32 (LayerScale), so the returned tokens are
float32. Two precision options go beyond the official model, for bf16 autocast only:
- `matmul_weights="bfloat16"` stores the weights of the linear and convolution layers that run under
  autocast in bf16. Autocast casts them to bf16 for every product anyway, so the outputs are
  bit-identical; what changes is the weight memory (VGGT-1B with camera and depth heads: 2.56
  instead of 4.31 GiB) and no cast kernels per call.
- `dpt_head_autocast=True` runs the DPT heads under the caller's autocast instead of in float32;
  their last 1x1 convolution and the activations stay float32 (tested tolerance in `tests/test_vggt.py`).

The tracking head is built only as parameters (`TrackHeadParameters`, for the state-dict check); it
has no forward. The point head is a DPT head with 4 channels (inv_log points, 1+exp confidence).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from geovr.teacher_cache.config import ConfigError, from_dict, require, to_dict
from geovr.teacher_cache.geometry import decode_pose
from geovr.teachers.vggt_heads import CameraHead, DPTHead, TrackHeadParameters
from geovr.teachers.vggt_layers import (
    ATTENTION_BACKENDS,
    Block,
    DinoPatchEmbed,
    RotaryEmbedding2D,
    attention_kernel_context,
    xformers_available,
)

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEADS = ("camera", "depth", "point", "track")
DEFAULT_IGNORE_PREFIXES = ("point_head.", "track_head.")
# Heads built when `from_pretrained` is given heads=None: the ones the teacher runs.
DEFAULT_HEADS = ("camera", "depth")


class CheckpointError(ValueError):
    """A checkpoint does not match the model: the message names the missing, unexpected or
    mis-shaped tensors (or the unreadable file)."""


@dataclass
class VGGTConfig:
    """Sizes of a VGGT model: the `config.json` schema of `shared/reference/vggt/README.md`.

    Defaults are VGGT-1B. `depth` counts the aggregator stages (each one frame and one global block);
    `dpt_layers` are the stages the DPT heads read; `heads` lists the heads the checkpoint holds.
    """

    img_size: int = 518
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    patch_embed_depth: int = 24
    patch_embed_num_heads: int = 16
    camera_trunk_depth: int = 4
    camera_num_heads: int = 16
    dpt_features: int = 256
    dpt_out_channels: tuple[int, ...] = (256, 512, 1024, 1024)
    dpt_layers: tuple[int, ...] = (4, 11, 17, 23)
    heads: tuple[str, ...] = HEADS

    @classmethod
    def vggt_1b(cls) -> VGGTConfig:
        """The sizes of the official VGGT-1B checkpoint (which ships no config file)."""
        return cls()

    @classmethod
    def tiny(cls) -> VGGTConfig:
        """The sizes of the `tiny-a` reference model (width 64, 4+4 blocks): CPU tests, demo, smoke runs."""
        return cls(
            embed_dim=64,
            depth=4,
            num_heads=4,
            patch_embed_depth=2,
            patch_embed_num_heads=4,
            camera_trunk_depth=2,
            camera_num_heads=4,
            dpt_features=16,
            dpt_out_channels=(8, 16, 32, 32),
            dpt_layers=(0, 1, 2, 3),
            heads=("camera", "depth"),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> VGGTConfig:
        """Read and validate a `config.json`; ConfigError names the file and the bad key."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: cannot read VGGT config: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a VGGT config must be a JSON object")
        return from_dict(cls, raw, where=str(path))

    def to_dict(self) -> dict:
        return to_dict(self)

    def validate(self) -> None:
        require(
            self.patch_size > 0 and self.img_size % self.patch_size == 0,
            "img_size must be a multiple of patch_size",
        )
        for name in (
            "embed_dim",
            "depth",
            "num_heads",
            "patch_embed_depth",
            "patch_embed_num_heads",
            "dpt_features",
        ):
            require(getattr(self, name) > 0, f"{name} must be positive")
        require(
            self.camera_trunk_depth >= 0 and self.camera_num_heads > 0, "camera trunk sizes must be positive"
        )
        head_dim, remainder = divmod(self.embed_dim, self.num_heads)
        require(
            remainder == 0 and head_dim % 4 == 0,
            "embed_dim / num_heads must be an integer divisible by 4 (2D RoPE)",
        )
        require(
            self.embed_dim % self.patch_embed_num_heads == 0, "embed_dim must divide by patch_embed_num_heads"
        )
        require(
            (2 * self.embed_dim) % self.camera_num_heads == 0, "2 * embed_dim must divide by camera_num_heads"
        )
        require(self.num_register_tokens >= 0, "num_register_tokens must be >= 0")
        require(len(self.dpt_out_channels) == 4, "dpt_out_channels needs 4 values")
        require(len(self.dpt_layers) == 4, "dpt_layers needs 4 stage indices")
        require(
            all(0 <= i < self.depth for i in self.dpt_layers), f"dpt_layers must lie in [0, {self.depth})"
        )
        require(self.dpt_features % 4 == 0 and self.dpt_features >= 4, "dpt_features must be a multiple of 4")
        require(
            all(c % 4 == 0 and c > 0 for c in self.dpt_out_channels),
            "dpt_out_channels must be multiples of 4",
        )
        unknown = sorted(set(self.heads) - set(HEADS))
        require(not unknown, f"heads: unknown head(s) {unknown}; known: {list(HEADS)}")


class Aggregator(nn.Module):
    """Patch embedding, camera/register tokens and the alternating frame/global attention stages."""

    def __init__(self, cfg: VGGTConfig) -> None:
        super().__init__()
        width = cfg.embed_dim
        self.patch_size = cfg.patch_size
        self.num_heads = cfg.num_heads
        self.patch_start_idx = 1 + cfg.num_register_tokens
        self.patch_embed = DinoPatchEmbed(
            cfg.img_size,
            cfg.patch_size,
            width,
            cfg.patch_embed_depth,
            cfg.patch_embed_num_heads,
            cfg.mlp_ratio,
            cfg.num_register_tokens,
        )
        self.rope = RotaryEmbedding2D(base_frequency=100.0)
        self.frame_blocks = nn.ModuleList(
            Block(width, cfg.num_heads, cfg.mlp_ratio, layer_scale_init=0.01, qk_norm=True)
            for _ in range(cfg.depth)
        )
        self.global_blocks = nn.ModuleList(
            Block(width, cfg.num_heads, cfg.mlp_ratio, layer_scale_init=0.01, qk_norm=True)
            for _ in range(cfg.depth)
        )
        # Slot 0: the first frame of each clip; slot 1: all other frames.
        self.camera_token = nn.Parameter(torch.zeros(1, 2, 1, width))
        self.register_token = nn.Parameter(torch.zeros(1, 2, cfg.num_register_tokens, width))
        nn.init.normal_(self.camera_token, std=1e-6)
        nn.init.normal_(self.register_token, std=1e-6)

    def _special_tokens(self, batch: int, frames: int) -> Tensor:
        """(B*S, 1 + registers, C): camera then register tokens, slot 0 for frame 0, slot 1 after."""
        special = torch.cat((self.camera_token, self.register_token), dim=2)  # (1, 2, 1 + R, C)
        per_frame = torch.cat((special[:, :1], special[:, 1:].expand(1, frames - 1, -1, -1)), dim=1)
        return per_frame.expand(batch, -1, -1, -1).reshape(batch * frames, *special.shape[2:])

    def _rope_tables(self, grid_h: int, grid_w: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(cos, sin) (P, head_dim) for one frame's tokens: specials at (0, 0), patches at (row+1, col+1)."""
        rows = torch.arange(grid_h, device=device).repeat_interleave(grid_w)
        cols = torch.arange(grid_w, device=device).repeat(grid_h)
        patches = torch.stack((rows, cols), dim=-1) + 1
        specials = torch.zeros(self.patch_start_idx, 2, dtype=patches.dtype, device=device)
        positions = torch.cat((specials, patches), dim=0)
        return self.rope.tables(positions, self.frame_blocks[0].attn.head_dim, max(grid_h, grid_w) + 1)

    def forward(self, images: Tensor, keep: Collection[int]) -> dict[int, Tensor]:
        """images (B, S, 3, H, W) in [0, 1] -> {stage i: (B, S, P, 2C)} for each i in `keep`.

        Stages after max(keep) are not computed.
        """
        batch, frames, _, height, width = images.shape
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        mean = images.new_tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1)
        std = images.new_tensor(IMAGENET_STD).view(1, 1, 3, 1, 1)
        normalised = ((images - mean) / std).reshape(batch * frames, 3, height, width)

        patch_tokens = self.patch_embed(normalised)  # (B*S, grid_h*grid_w, C)
        tokens = torch.cat((self._special_tokens(batch, frames).to(patch_tokens.dtype), patch_tokens), dim=1)
        num_tokens, dim = tokens.shape[1:]

        frame_rope = self._rope_tables(grid_h, grid_w, images.device)
        global_rope = (frame_rope[0].repeat(frames, 1), frame_rope[1].repeat(frames, 1))

        outputs: dict[int, Tensor] = {}
        last = max(keep)
        for stage in range(last + 1):
            tokens = self.frame_blocks[stage](tokens.reshape(batch * frames, num_tokens, dim), frame_rope)
            frame_out = tokens
            tokens = self.global_blocks[stage](tokens.reshape(batch, frames * num_tokens, dim), global_rope)
            if stage in keep:
                outputs[stage] = torch.cat(
                    (
                        frame_out.reshape(batch, frames, num_tokens, dim),
                        tokens.reshape(batch, frames, num_tokens, dim),
                    ),
                    dim=-1,
                )
        return outputs


class VGGT(nn.Module):
    """VGGT with the chosen heads. Build with random weights via `VGGT(cfg, heads)`, or load with
    `VGGT.from_pretrained(path)`. Construct under `torch.device("meta")` to inspect shapes for free."""

    def __init__(self, cfg: VGGTConfig, heads: Iterable[str] = DEFAULT_HEADS) -> None:
        super().__init__()
        cfg.validate()
        heads = tuple(heads)
        unknown = sorted(set(heads) - set(HEADS))
        if unknown:
            raise ValueError(f"unknown head(s) {unknown}; known: {list(HEADS)}")
        self.config = cfg
        self.heads = tuple(h for h in HEADS if h in heads)
        self.patch_size = cfg.patch_size
        self.dpt_frame_chunk: int | None = 8
        self.attention = "sdpa"
        self.dpt_head_autocast = False
        self.matmul_weights = "float32"
        self._compiled = False

        dim_in = 2 * cfg.embed_dim
        self.aggregator = Aggregator(cfg)
        self.camera_head = (
            CameraHead(dim_in, cfg.camera_trunk_depth, cfg.camera_num_heads)
            if "camera" in self.heads
            else None
        )

        def dpt(output_dim: int, activation: str) -> DPTHead:
            return DPTHead(
                dim_in,
                cfg.patch_size,
                cfg.dpt_layers,
                cfg.dpt_features,
                cfg.dpt_out_channels,
                output_dim=output_dim,
                activation=activation,
            )

        self.depth_head = dpt(2, "exp") if "depth" in self.heads else None
        self.point_head = dpt(4, "inv_log") if "point" in self.heads else None
        # The official tracking head uses the DPT defaults, which equal VGGT-1B's dpt_layers/out_channels.
        self.track_head = (
            TrackHeadParameters(dim_in, cfg.patch_size, cfg.dpt_layers, cfg.dpt_out_channels)
            if "track" in self.heads
            else None
        )

    @property
    def patch_start_idx(self) -> int:
        """Index of the first patch token in each frame's P tokens (1 camera + registers)."""
        return self.aggregator.patch_start_idx

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    # ------------------------------------------------------------------------------------------------
    # Inference options
    # ------------------------------------------------------------------------------------------------

    def transformer_blocks(self) -> list[Block]:
        """Every attention block: patch embedding, frame, global and camera-trunk blocks."""
        return [m for m in self.modules() if isinstance(m, Block)]

    def set_inference_options(
        self,
        attention: str = "sdpa",
        dpt_frame_chunk: int | None = 8,
        compile: bool = False,
        dpt_head_autocast: bool = False,
        matmul_weights: str = "float32",
    ) -> None:
        """Inference-only choices; the defaults reproduce the official model's numerics.

        attention: "sdpa" (PyTorch's kernel choice), "cudnn" (SDPA with cuDNN's fused attention
            first where it runs, else PyTorch's choice) or "xformers" (needs the xformers package).
        dpt_frame_chunk: frames the DPT heads process at once (None: all).
        compile: `torch.compile` each transformer block (once compiled, a model stays compiled).
        dpt_head_autocast: run the DPT heads under the caller's autocast (their last 1x1 convolution
            and activations stay float32); False runs them in float32, as the official model.
        matmul_weights: "float32", or "bfloat16" to store the linear/convolution weights of the
            aggregator (and of the DPT heads when they run under autocast) in bf16: outputs identical
            to float32 weights under bf16 autocast, less weight memory; the forward then requires bf16
            autocast. One way: reload the model to change the precision options afterwards.
        """
        if attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {attention!r}")
        if attention == "xformers" and not xformers_available():
            raise ValueError("attention='xformers' needs the xformers package (pip install xformers)")
        if dpt_frame_chunk is not None and dpt_frame_chunk < 1:
            raise ValueError(
                f"dpt_frame_chunk must be a positive number of frames or None, got {dpt_frame_chunk}"
            )
        if matmul_weights not in ("float32", "bfloat16"):
            raise ValueError(f"matmul_weights must be 'float32' or 'bfloat16', got {matmul_weights!r}")
        if self._compiled and not compile:
            raise ValueError("the transformer blocks are already compiled; reload the model to run eagerly")
        if self.matmul_weights == "bfloat16" and (matmul_weights, dpt_head_autocast) != (
            self.matmul_weights,
            self.dpt_head_autocast,
        ):
            raise ValueError(
                "the weights were cast to bf16 for these precision options; reload the model to change them"
            )
        for block in self.transformer_blocks():
            block.attn.backend = "xformers" if attention == "xformers" else "sdpa"
            if compile and not self._compiled:
                block.compile(dynamic=True)
        if matmul_weights == "bfloat16" and self.matmul_weights == "float32":
            self._cast_matmul_weights(torch.bfloat16, include_dpt_heads=dpt_head_autocast)
        self._compiled = self._compiled or compile
        self.attention = attention
        self.dpt_frame_chunk = dpt_frame_chunk
        self.dpt_head_autocast = dpt_head_autocast
        self.matmul_weights = matmul_weights

    def _cast_matmul_weights(self, dtype: torch.dtype, include_dpt_heads: bool) -> None:
        """Weights and biases of the linear and convolution layers of the aggregator (and of the DPT
        heads but for their last convolution, if `include_dpt_heads`) to `dtype`. The camera head
        always runs in float32 and keeps its weights."""
        modules = list(self.aggregator.modules())
        for head in (self.depth_head, self.point_head):
            if head is not None and include_dpt_heads:
                last_conv = head.scratch.output_conv2[-1]
                modules += [m for m in head.modules() if m is not last_conv]
        for module in modules:
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                module.to(dtype)

    # ------------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------------

    def forward(self, images: Tensor, return_layers: Sequence[int] = ()) -> dict:
        """images (B, S, 3, H, W) in [0, 1], H and W multiples of the patch size.

        Returns a dict with, per built head: pose_enc (B, S, 9), extrinsic (B, S, 3, 4), intrinsic
        (B, S, 3, 3) [camera]; depth (B, S, H, W, 1), depth_conf (B, S, H, W) [depth];
        world_points (B, S, H, W, 3), world_points_conf (B, S, H, W) [point]; and layers
        {i: (B, S, P, 2C) float32} for each i in `return_layers` (all P tokens: camera, registers,
        patches; the frame-attention half first).
        """
        if images.ndim != 5 or images.shape[2] != 3:
            raise ValueError(f"images must be (B, S, 3, H, W), got shape {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}"
            )
        depth = self.config.depth
        return_layers = tuple(int(i) for i in return_layers)
        bad = [i for i in return_layers if not 0 <= i < depth]
        if bad:
            raise ValueError(f"return_layers {bad} outside the {depth} aggregator stages [0, {depth - 1}]")

        keep = set(return_layers)
        if self.camera_head is not None:
            keep.add(depth - 1)
        if self.depth_head is not None or self.point_head is not None:
            keep.update(self.config.dpt_layers)
        if not keep:
            raise ValueError("nothing to compute: no camera/depth/point head and no return_layers")
        device_type = images.device.type
        if self.matmul_weights == "bfloat16" and not (
            torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.bfloat16
        ):
            raise RuntimeError("this model's weights were cast to bf16: run it under bf16 autocast")
        with attention_kernel_context(self.attention):
            stages = self.aggregator(images, keep)

        outputs: dict = {}
        stages32 = {i: t.float() for i, t in stages.items()}
        with torch.autocast(device_type, enabled=False):
            if self.camera_head is not None:
                pose_enc = self.camera_head(stages32[depth - 1])
                extrinsic, intrinsic = decode_pose(pose_enc, (height, width))
                outputs.update(pose_enc=pose_enc, extrinsic=extrinsic, intrinsic=intrinsic)
        head_precision = (
            nullcontext() if self.dpt_head_autocast else torch.autocast(device_type, enabled=False)
        )
        with head_precision:
            for name, head in (("depth", self.depth_head), ("world_points", self.point_head)):
                if head is not None:
                    values, conf = head(stages32, (height, width), self.patch_start_idx, self.dpt_frame_chunk)
                    outputs[name] = values
                    outputs[f"{name}_conf"] = conf
        outputs["layers"] = {i: stages32[i] for i in return_layers}
        return outputs

    # ------------------------------------------------------------------------------------------------
    # Loading
    # ------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        heads: Iterable[str] | None = None,
        ignore_prefixes: Sequence[str] = DEFAULT_IGNORE_PREFIXES,
        config: VGGTConfig | None = None,
        device: str | torch.device = "cpu",
    ) -> VGGT:
        """Load a checkpoint strictly, in float32, in eval mode.

        `path`: a directory with `config.json` and `model.safetensors` (or `model.pt`); or a bare
        `.safetensors` file or official `.pt` state_dict (read with weights_only=True), which gets
        the VGGT-1B sizes unless `config` is given. `config` overrides a directory's config.json.
        `heads`: the heads to build (default: camera and depth, those the checkpoint holds); each must
        be listed in the config's `heads`. Tensors whose names start with one of `ignore_prefixes` and
        that the model does not have are skipped; any other difference (missing tensor, unexpected
        tensor, other shape) raises CheckpointError naming the tensors.
        """
        path = Path(path)
        weights_file, file_config = _resolve_checkpoint(path)
        cfg = config or file_config or VGGTConfig.vggt_1b()
        model = cls.from_state_dict(
            _read_state_dict(weights_file), cfg, heads, ignore_prefixes, source=str(weights_file)
        )
        return model.to(device).eval()

    @classmethod
    def from_state_dict(
        cls,
        state: dict[str, Tensor],
        config: VGGTConfig,
        heads: Iterable[str] | None = None,
        ignore_prefixes: Sequence[str] = DEFAULT_IGNORE_PREFIXES,
        source: str = "state_dict",
    ) -> VGGT:
        """Build the model on the meta device and take over the tensors of `state` (no copy for float32
        tensors; the model ends up on their device). Same rules and errors as `from_pretrained`;
        `source` names the checkpoint in error messages."""
        if heads is None:
            heads = tuple(h for h in DEFAULT_HEADS if h in config.heads)
        heads = tuple(heads)
        not_held = [h for h in heads if h not in config.heads]
        if not_held:
            raise CheckpointError(
                f"{source}: head(s) {not_held} requested but the config lists only {list(config.heads)}"
            )
        with torch.device("meta"):
            model = cls(config, heads)
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        _check_state_dict(source, state, expected, ignore_prefixes)
        model.load_state_dict({k: state[k].to(torch.float32) for k in expected}, strict=True, assign=True)
        ignored = len(state) - len(expected)
        if ignored:
            logger.info("%s: ignored %d tensors under %s", source, ignored, list(ignore_prefixes))
        return model


def checkpoint_config(path: str | Path) -> VGGTConfig:
    """The sizes `VGGT.from_pretrained(path)` builds, from the config file alone (no weights read)."""
    return _resolve_checkpoint(Path(path))[1] or VGGTConfig.vggt_1b()


def _resolve_checkpoint(path: Path) -> tuple[Path, VGGTConfig | None]:
    """(weights file, config from config.json or None) for a directory or a weights file."""
    if path.is_dir():
        config_file = path / "config.json"
        config = VGGTConfig.from_json(config_file) if config_file.is_file() else None
        for name in ("model.safetensors", "model.pt"):
            if (path / name).is_file():
                return path / name, config
        raise FileNotFoundError(f"{path}: no model.safetensors or model.pt in the checkpoint directory")
    if path.is_file():
        return path, None
    raise FileNotFoundError(f"VGGT checkpoint {path} does not exist")


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors of a safetensors file or a plain state_dict saved with torch.save (no pickled code)."""
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # corrupt or foreign file: report it by name
        raise CheckpointError(f"{path}: cannot read checkpoint: {err}") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state_dict (a mapping of tensor names to tensors)")
    return state


def _check_state_dict(
    source: str,
    state: dict[str, Tensor],
    expected: dict[str, tuple[int, ...]],
    ignore_prefixes: Sequence[str],
    model_name: str = "VGGT",
) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(k for k in set(state) - set(expected) if not k.startswith(tuple(ignore_prefixes)))
    mis_shaped = sorted(
        f"{k} (file {tuple(state[k].shape)}, model {expected[k]})"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != expected[k]
    )
    not_float = sorted(k for k in set(expected) & set(state) if not state[k].is_floating_point())
    problems = [
        f"{label} ({len(names)}): {_name_list(names)}"
        for label, names in (
            ("missing tensors", missing),
            ("unexpected tensors", unexpected),
            ("tensors of another shape", mis_shaped),
            ("tensors that are not floating point", not_float),
        )
        if names
    ]
    if problems:
        raise CheckpointError(f"{source} does not match the {model_name} config: " + "; ".join(problems))


def _name_list(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... and {len(names) - limit} more"


__all__ = [
    "DEFAULT_HEADS",
    "DEFAULT_IGNORE_PREFIXES",
    "HEADS",
    "VGGT",
    "Aggregator",
    "CheckpointError",
    "VGGTConfig",
    "checkpoint_config",
]
