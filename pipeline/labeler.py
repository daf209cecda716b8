"""Teacher labels for precompute: VGGT poses, depth, pooled features and the clip's metric scale.

One `TeacherLabeler` per GPU actor loads VGGT (camera and depth heads only) and, optionally, a
monocular metric-depth model, once. `label(clips)` turns decoded clips (uint8 frames at the source
resolution) into `TeacherLabels`, several clips per forward pass.

Preprocessing (as GeoVR's `preprocess_geo_frames` with `target_size=504, patch_size=28`, which is
VGGT's `load_and_preprocess_images` "crop" mode without the crop): the longer side becomes
`image_long_side` (504), the shorter side `round(short * 504 / long / 28) * 28` (Python's round,
half to even, as theirs), aspect ratio otherwise kept, no cropping or padding. 640x480 -> 504x392,
a 36x28 grid of 14-pixel patches; the grid is even on both axes so the features pool 2x2 exactly.
Resizing: PIL bicubic on uint8 frames (PIL's bicubic antialiases when shrinking), then [0, 1]
floats; VGGT normalises with the ImageNet mean/std inside the model.

Labels per clip (S frames, teacher image Ht x Wt, patch grid gh x gw = Ht/14 x Wt/14):
- `pose_enc` (S, 9), `extrinsic` (S, 3, 4), `intrinsic` (S, 3, 3): VGGT's camera head, the first
  camera at the identity; intrinsics in pixels of the Ht x Wt teacher image.
- `depth`, `depth_conf` (S, Ht/2, Wt/2): the student's dense head predicts at the patch grid x 7
  (pixel shuffle of 7 on a 14-pixel grid), i.e. exactly one value per aligned 2x2 block of teacher
  pixels, so each label is that block's area average: depth weighted by confidence
  (sum(c * d) / sum(c)), confidence the plain mean. The weighting keeps a low-confidence pixel
  (a flying pixel on a depth edge, sky) from pulling a block's depth towards a value the teacher
  itself does not trust; among equally confident pixels it is the unbiased box average.
- `features` (S, L, gh/2, gw/2, C): for each distilled aggregator layer, the frame-attention half
  (first C = embed_dim channels) of the patch tokens, 2x2 average-pooled on the patch grid
  (36x28 -> 18x14), float32.
- `fusion` (S, Lf, gh', gw', 2C), only with `fusion_layers`: Spatial-MLLM's fused tokens, the
  patch tokens of those stages at full width from a second, aggregator-only pass on the source
  frames resized to 7/8 of the clip's student frame size (`teachers.vggt_fusion`: the alignment
  choice and its cost), so that (gh', gw') is the student's unmerged 16-pixel patch grid.
- `scale`, `scale_valid`: metres per VGGT depth unit (`metric ≈ scale * depth`), GeoVR's chain
  (`metric_scale`): DA3-Metric (`metric_teacher: da3-metric`, the default) runs on the teacher
  frames themselves, its canonical depth becomes metres with VGGT's focal length, sky pixels are
  dropped, and a plain least-squares fit (`metric_fit: least_squares`) runs over the pixels whose
  VGGT confidence is at least the clip's exact non-sky median, at the teacher image's full
  resolution with VGGT's depth and confidence before the 2x2 pooling. Named options: Depth
  Anything V2 Metric (`depth-anything-v2`, run on the source frames, sky where it saturates) and
  the robust fit (`robust`). NaN and False without a metric model or with fewer than
  `metric_min_pixels` pixels in the fit.

Precision: bf16 autocast (`dtype: bfloat16`, the GPU default) for VGGT and the metric model (on
the CPU DA3-Metric runs in float32; its DPT head always does, as the official model), with
VGGT's linear and convolution weights stored in bf16 (bit-identical under autocast; VGGT-1B's
weights take 2.56 instead of 4.31 GiB). VGGT keeps its residual stream and camera head in fp32; the DPT depth head runs under the
autocast too (`dpt_head_autocast`, default on; its last 1x1 convolution and activations in fp32:
per-pixel depth differences about 0.1% median, 0.3% worst on the tiny models) or, switched off,
in fp32 as the official model. Labels come out fp32. `dtype: float32` runs everything in fp32.

Batching and memory: clips with the same number of frames and the same teacher size are stacked
into one (B, S, 3, Ht, Wt) forward of at most `max_frames_per_call` frames (B*S); other sizes go
into separate calls. Only the `feature_layers` of the aggregator are retained, and the DPT head
runs `dpt_frame_chunk` frames at a time. On `torch.OutOfMemoryError` for a batch of several clips
the labeler frees the cache and retries those clips one at a time; a single clip that still runs
out of memory raises `TeacherOOM` (a subclass of `torch.OutOfMemoryError` naming the clip's index
in the call and its frame count), and the precompute splits that clip and labels the parts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from geovr.pipeline.config import TeacherConfig
from geovr.pipeline.metric_scale import canonical_to_metric, clip_metric_scale
from geovr.teacher_cache.config import ConfigError, to_dict
from geovr.teachers import da3_metric, metric_depth
from geovr.teachers.da3_metric import SKY_THRESHOLD, DepthAnything3Metric
from geovr.teachers.metric_depth import MetricDepthModel
from geovr.teachers.vggt_fusion import fusion_image_size, fusion_input, fusion_tokens

VGGT_CHECKPOINT_FILES = ("config.json", "model.safetensors", "model.pt")
"""The files of a VGGT checkpoint directory that determine its outputs (hashed for the fingerprint)."""


@dataclass
class TeacherLabels:
    """Labels of one clip (float32 numpy arrays; S frames, teacher image Ht x Wt).

    Attributes:
        pose_enc: (S, 9) VGGT pose encoding, first camera at the identity.
        extrinsic: (S, 3, 4) camera-from-world, OpenCV axes, VGGT's normalised units.
        intrinsic: (S, 3, 3) pinhole intrinsics in pixels of the Ht x Wt teacher image.
        depth: (S, Ht/2, Wt/2) depth, VGGT units (confidence-weighted 2x2 area average).
        depth_conf: (S, Ht/2, Wt/2) confidence (>= 1; 2x2 mean).
        features: (S, L, gh/2, gw/2, C) pooled frame-attention patch tokens of `feature_layers`.
        scale: metres per VGGT unit (metric depth ≈ scale * depth); NaN when not valid.
        scale_valid: whether `scale` was fitted from a metric model over enough pixels.
        teacher_hw: (Ht, Wt).
        fusion: (S, Lf, gh', gw', 2C) full-width tokens of `fusion_layers` at the fusion size, or None.
    """

    pose_enc: np.ndarray
    extrinsic: np.ndarray
    intrinsic: np.ndarray
    depth: np.ndarray
    depth_conf: np.ndarray
    features: np.ndarray
    scale: float
    scale_valid: bool
    teacher_hw: tuple[int, int]
    fusion: np.ndarray | None = None


class TeacherOOM(torch.OutOfMemoryError):
    """One clip alone does not fit on the device: split it into shorter clips and label those.

    Attributes:
        clip_index: the clip's index in the `label()` call.
        num_frames: its frame count.
    """

    def __init__(self, clip_index: int, num_frames: int, size_hw: tuple[int, int]) -> None:
        super().__init__(
            f"teacher ran out of device memory on clip {clip_index} alone ({num_frames} frames at "
            f"{size_hw[1]}x{size_hw[0]}); split it into shorter clips"
        )
        self.clip_index = clip_index
        self.num_frames = num_frames


def teacher_size(height: int, width: int, long_side: int = 504, multiple: int = 28) -> tuple[int, int]:
    """(Ht, Wt) of the teacher image for a (height, width) frame: GeoVR's rule.

    The longer side becomes `long_side`; the shorter one is scaled with the aspect ratio and
    rounded (Python's round) to a multiple of `multiple`, at least one multiple. Squares keep
    `long_side` on both sides. 640x480 (W x H) -> (392, 504).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"frame size must be positive, got {width}x{height}")
    if width >= height:
        return max(multiple, round(height * (long_side / width) / multiple) * multiple), long_side
    return long_side, max(multiple, round(width * (long_side / height) / multiple) * multiple)


def resize_clip(frames: np.ndarray, size_hw: tuple[int, int]) -> Tensor:
    """(S, H, W, 3) uint8 RGB to (S, 3, Ht, Wt) uint8 with PIL bicubic resizing (none if already Ht x Wt)."""
    height, width = size_hw
    if frames.shape[1:3] != (height, width):
        frames = np.stack(
            [np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.BICUBIC)) for f in frames]
        )
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)


def to_unit_range(images: Tensor) -> Tensor:
    """uint8 images to float32 in [0, 1] (on whatever device they are: the GPU converts 4x fewer bytes)."""
    return images.float().div_(255.0)


def preprocess_clip(frames: np.ndarray, size_hw: tuple[int, int]) -> Tensor:
    """(S, H, W, 3) uint8 RGB to (S, 3, Ht, Wt) float32 in [0, 1] with PIL bicubic resizing."""
    return to_unit_range(resize_clip(frames, size_hw))


def pool_patch_features(tokens: Tensor, patch_start_idx: int, width: int, grid_hw: tuple[int, int]) -> Tensor:
    """Frame-attention half of the patch tokens, 2x2 average-pooled on the patch grid.

    Args:
        tokens: (B, S, P, 2 * width) aggregator output of one layer (special tokens first).
        patch_start_idx: index of the first patch token (camera + register tokens before it).
        width: aggregator width; the first `width` channels are the frame-attention half.
        grid_hw: (gh, gw) patch grid, both even, row-major token order.

    Returns:
        (B, S, gh/2, gw/2, width) float32.
    """
    batch, frames = tokens.shape[:2]
    grid_h, grid_w = grid_hw
    patches = tokens[:, :, patch_start_idx:, :width].float()
    patches = patches.reshape(batch * frames, grid_h, grid_w, width).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(patches, kernel_size=2)
    return pooled.permute(0, 2, 3, 1).reshape(batch, frames, grid_h // 2, grid_w // 2, width)


def downsample_depth(depth: Tensor, conf: Tensor) -> tuple[Tensor, Tensor]:
    """Depth and confidence (..., H, W) (H, W even) to half resolution over aligned 2x2 blocks.

    Returns the confidence-weighted block average of depth and the block mean of confidence.
    """
    lead = depth.shape[:-2]
    depth = depth.reshape(-1, 1, *depth.shape[-2:]).float()
    conf = conf.reshape(-1, 1, *conf.shape[-2:]).float()
    conf_half = F.avg_pool2d(conf, kernel_size=2)
    depth_half = F.avg_pool2d(depth * conf, kernel_size=2) / conf_half
    return depth_half.reshape(*lead, *depth_half.shape[-2:]), conf_half.reshape(*lead, *conf_half.shape[-2:])


@cache
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """Streamed sha256 of a file, computed once per process for an unchanged (path, size, mtime)."""
    path = Path(path).resolve()
    stat = path.stat()
    return _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)


def checkpoint_sha256(path: str | Path, names: Sequence[str]) -> str:
    """sha256 of a checkpoint: a file's own hash, or for a directory a hash over the `names` present.

    A directory's digest covers each present file's name and hash, so replacing the weights or the
    config changes it; other files there (READMEs, reference outputs) do not count.
    """
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    present = [name for name in names if (path / name).is_file()]
    if not present:
        raise FileNotFoundError(f"checkpoint {path}: none of {', '.join(names)} found")
    lines = "".join(f"{name}\0{file_sha256(path / name)}\n" for name in present)
    return hashlib.sha256(lines.encode()).hexdigest()


def load_metric_model(
    cfg: TeacherConfig, device: torch.device
) -> DepthAnything3Metric | MetricDepthModel | None:
    """The metric-depth model of `cfg.metric_checkpoint` (of kind `cfg.metric_teacher`), or None."""
    if cfg.metric_checkpoint is None:
        return None
    if cfg.metric_teacher == "da3-metric":
        return DepthAnything3Metric.from_pretrained(cfg.metric_checkpoint, device)
    return MetricDepthModel(
        cfg.metric_checkpoint,
        device,
        sky_fraction=cfg.metric_sky_fraction,
        max_frames_per_call=cfg.metric_frames_per_call,
    )


def check_teacher_config(cfg: TeacherConfig) -> None:
    """Check that the teacher settings fit the checkpoint's architecture, from its config file alone
    (no weights are read), so that the precompute driver can refuse a mismatch in one line before any
    actor starts. Raises `ConfigError` (or `FileNotFoundError`) naming the setting and the checkpoint."""
    from geovr.teachers.vggt import checkpoint_config

    if cfg.checkpoint is None:
        raise ConfigError(
            "teacher.checkpoint is not set: give the VGGT checkpoint (directory, .safetensors or model.pt)"
        )
    if not Path(cfg.checkpoint).exists():
        raise FileNotFoundError(f"teacher checkpoint {cfg.checkpoint} does not exist")
    model_cfg = checkpoint_config(cfg.checkpoint)
    _check_fits(cfg, int(model_cfg.depth), int(model_cfg.patch_size))


def _check_fits(cfg: TeacherConfig, depth: int, patch_size: int) -> None:
    for name, layers in (("feature_layers", cfg.feature_layers), ("fusion_layers", cfg.fusion_layers)):
        bad = [layer for layer in layers if layer >= depth]
        if bad:
            raise ConfigError(
                f"teacher.{name} {list(layers)} do not fit the teacher checkpoint "
                f"{cfg.checkpoint}: it has {depth} aggregator layers (0 to {depth - 1}), so {bad} do not exist; "
                f"use the preset made for this teacher or set its layers (--set teacher.{name}=[...])"
            )
    if cfg.size_multiple % (2 * patch_size):
        raise ConfigError(
            f"teacher.size_multiple ({cfg.size_multiple}) must be a multiple of twice the patch size "
            f"({2 * patch_size}) of the teacher checkpoint {cfg.checkpoint}, so that the patch grid pools 2x2"
        )


class TeacherLabeler:
    """VGGT (+ optional metric depth model) loaded once on `device`; labels clips in batches."""

    def __init__(self, cfg: TeacherConfig, device: torch.device | str = "cuda") -> None:
        from geovr.teachers.vggt import VGGT

        check_teacher_config(cfg)
        self.cfg = cfg
        self.device = torch.device(device)
        self.model = VGGT.from_pretrained(cfg.checkpoint, heads=("camera", "depth"), device=self.device)
        self.model.requires_grad_(False)
        self.model.set_inference_options(
            attention=cfg.attention,
            dpt_frame_chunk=cfg.dpt_frame_chunk,
            compile=cfg.compile,
            dpt_head_autocast=cfg.dpt_head_autocast,
            matmul_weights=cfg.dtype,
        )
        model_cfg = self.model.config
        self.patch_size = int(model_cfg.patch_size)
        self.width = int(model_cfg.embed_dim)
        self.patch_start_idx = int(self.model.patch_start_idx)
        _check_fits(cfg, int(model_cfg.depth), self.patch_size)
        self.autocast_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else None
        self.metric = load_metric_model(cfg, self.device)

    def teacher_size(self, height: int, width: int) -> tuple[int, int]:
        """(Ht, Wt) the teacher sees for a (height, width) source frame (see `teacher_size`)."""
        return teacher_size(height, width, self.cfg.image_long_side, self.cfg.size_multiple)

    def label(
        self, clips: Sequence[np.ndarray], student_sizes: Sequence[tuple[int, int] | None] | None = None
    ) -> list[TeacherLabels]:
        """Label clips of uint8 RGB frames (S, H, W, 3); returns one `TeacherLabels` per clip, in order.

        `student_sizes`: per clip the (h, w) of its student frames, or None: with `fusion_layers`
        those clips also get fusion features (the frames must then be the source frames).
        Clips of equal frame count, teacher size and student size share forward passes. Raises
        `TeacherOOM` when one clip alone does not fit on the device.
        """
        sizes = list(student_sizes or [None] * len(clips))
        if not self.cfg.fusion_layers:
            sizes = [None] * len(clips)
        groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
        for index, frames in enumerate(clips):
            if not (
                isinstance(frames, np.ndarray)
                and frames.dtype == np.uint8
                and frames.ndim == 4
                and frames.shape[-1] == 3
            ):
                got = (
                    f"{frames.dtype} {frames.shape}"
                    if isinstance(frames, np.ndarray)
                    else type(frames).__name__
                )
                raise ValueError(f"clip {index}: expected uint8 frames (S, H, W, 3), got {got}")
            if frames.shape[0] == 0:
                raise ValueError(f"clip {index}: no frames")
            size_hw = self.teacher_size(frames.shape[1], frames.shape[2])
            groups[(frames.shape[0], size_hw, sizes[index] and tuple(sizes[index]))].append(index)

        results: list[TeacherLabels | None] = [None] * len(clips)
        for (num_frames, size_hw, student_hw), indices in groups.items():
            per_call = max(1, self.cfg.max_frames_per_call // num_frames)
            for start in range(0, len(indices), per_call):
                batch = indices[start : start + per_call]
                # Resized only now, batch by batch: host memory holds one call's frames at a time. They
                # travel as uint8 and become floats on the device.
                images = torch.stack([resize_clip(clips[i], tuple(size_hw)) for i in batch])
                if self.device.type == "cuda":
                    images = images.pin_memory()
                labeled = self._label_with_retry(batch, images, [clips[i] for i in batch], student_hw)
                for index, labels in zip(batch, labeled, strict=True):
                    results[index] = labels
        return results  # type: ignore[return-value]

    def _label_with_retry(
        self, batch: list[int], images: Tensor, clips: list[np.ndarray], student_hw: tuple[int, int] | None
    ) -> list[TeacherLabels]:
        """Label one batch (B, S, 3, Ht, Wt); on device OOM retry clip by clip; `batch`: clip indices."""
        try:
            return self._label_batch(images, clips, student_hw)
        except torch.OutOfMemoryError:
            if len(batch) == 1:
                raise TeacherOOM(batch[0], images.shape[1], tuple(images.shape[-2:])) from None
        # Out of the except block: the failed attempt's tensors are released before the retry.
        self._release_memory()
        labels = []
        for position, index in enumerate(batch):
            try:
                labels.extend(
                    self._label_batch(
                        images[position : position + 1], clips[position : position + 1], student_hw
                    )
                )
            except torch.OutOfMemoryError:
                raise TeacherOOM(index, images.shape[1], tuple(images.shape[-2:])) from None
        return labels

    def _release_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def _label_batch(
        self, images: Tensor, frames: list[np.ndarray], student_hw: tuple[int, int] | None = None
    ) -> list[TeacherLabels]:
        """images (B, S, 3, Ht, Wt) uint8 on the host; frames: the B source clips (for metric depth,
        and for the fusion pass when `student_hw` is given)."""
        height, width = images.shape[-2:]
        grid_hw = (height // self.patch_size, width // self.patch_size)
        images = to_unit_range(images.to(self.device, non_blocking=True))
        with torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        ):
            out = self.model(images, return_layers=self.cfg.feature_layers)
        scales = self._metric_scales(images, out, frames)
        depth, depth_conf = downsample_depth(out["depth"][..., 0], out["depth_conf"])
        features = torch.stack(
            [
                pool_patch_features(out["layers"][layer], self.patch_start_idx, self.width, grid_hw)
                for layer in self.cfg.feature_layers
            ],
            dim=2,
        )
        host = {
            **self._fusion(frames, student_hw),
            "pose_enc": out["pose_enc"].float().cpu().numpy(),
            "extrinsic": out["extrinsic"].float().cpu().numpy(),
            "intrinsic": out["intrinsic"].float().cpu().numpy(),
            "depth": depth.cpu().numpy(),
            "depth_conf": depth_conf.cpu().numpy(),
            "features": features.cpu().numpy(),
        }
        return [
            TeacherLabels(
                **{name: value[b] for name, value in host.items()},
                scale=scale,
                scale_valid=valid,
                teacher_hw=(int(height), int(width)),
            )
            for b, (scale, valid) in enumerate(scales)
        ]

    def _fusion(self, frames: list[np.ndarray], student_hw: tuple[int, int] | None) -> dict[str, np.ndarray]:
        """{"fusion": (B, S, Lf, gh', gw', 2C)} from the aggregator-only pass at the fusion size of
        `student_hw` (`teachers.vggt_fusion`), or {} without fusion features."""
        if student_hw is None:
            return {}
        size_hw = fusion_image_size(student_hw, self.patch_size)
        images = torch.stack([fusion_input(clip, size_hw) for clip in frames])
        images = to_unit_range(images.to(self.device, non_blocking=True))
        with torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        ):
            tokens = fusion_tokens(self.model, images, self.cfg.fusion_layers)
        return {"fusion": tokens.cpu().numpy()}

    def _metric_scales(
        self, images: Tensor, out: dict[str, Any], frames: list[np.ndarray]
    ) -> list[tuple[float, bool]]:
        """(scale, valid) of each clip of a batch (`metric_scale.clip_metric_scale`).

        Args:
            images: (B, S, 3, Ht, Wt) the teacher frames in [0, 1] on the device (DA3-Metric's input).
            out: VGGT's outputs for them: depth (B, S, Ht, Wt, 1), depth_conf, intrinsic (B, S, 3, 3).
            frames: the B source clips (S, H, W, 3) uint8 (Depth Anything V2's input).
        """
        if self.metric is None:
            return [(math.nan, False)] * len(frames)
        teacher_depth, teacher_conf = out["depth"][..., 0].float(), out["depth_conf"].float()
        if isinstance(self.metric, DepthAnything3Metric):
            # GeoVR runs DA3 under bf16 autocast on the GPU; on the CPU float32.
            autocast = self.autocast_dtype if self.device.type == "cuda" else None
            canonical, sky = self.metric.predict(images, self.cfg.metric_frames_per_call, autocast)
            metric = [
                canonical_to_metric(canonical[b], out["intrinsic"][b].float()) for b in range(len(frames))
            ]
            non_sky = [sky[b] < SKY_THRESHOLD for b in range(len(frames))]
        else:
            metric = [
                self.metric.predict(clip, tuple(images.shape[-2:]), self.autocast_dtype) for clip in frames
            ]
            non_sky = [~self.metric.sky_mask(m) for m in metric]
        fits = [
            clip_metric_scale(
                teacher_depth[b],
                teacher_conf[b],
                metric[b],
                non_sky[b],
                self.cfg.metric_fit,
                self.cfg.metric_min_pixels,
            )
            for b in range(len(frames))
        ]
        return [(fit.scale, fit.valid) for fit in fits]

    def fingerprint_parts(self) -> dict[str, Any]:
        """What the labels depend on, for the store fingerprint: teacher, weights, config, preprocessing."""
        cfg = self.cfg
        metric_teacher = ""
        if cfg.metric_checkpoint is not None:
            files = (
                da3_metric.CHECKPOINT_FILES
                if cfg.metric_teacher == "da3-metric"
                else metric_depth.CHECKPOINT_FILES
            )
            digest = checkpoint_sha256(cfg.metric_checkpoint, files)
            metric_teacher = f"{Path(cfg.metric_checkpoint).resolve().name}@sha256:{digest}"
        return {
            "teacher": cfg.name,
            "checkpoint_sha256": checkpoint_sha256(cfg.checkpoint, VGGT_CHECKPOINT_FILES),
            "teacher_config": _plain_config(self.model.config),
            "metric_teacher": metric_teacher,
            "preprocess": {
                "teacher_long_side": cfg.image_long_side,
                "size_multiple": cfg.size_multiple,
                "resize": "PIL bicubic from uint8, aspect kept, short side round()ed to the multiple, no crop/pad",
                "input_range": "[0, 1]",
                "features": "frame-attention half of the patch tokens, 2x2 average pooled, float32",
                "depth": "2x2 blocks: confidence-weighted mean depth, mean confidence",
                "dtype": cfg.dtype,
                "dpt_head_dtype": cfg.dtype if cfg.dpt_head_autocast else "float32",
                "metric_scale": self._metric_rule(),
                **self._fusion_rule(),
            },
        }

    def _fusion_rule(self) -> dict[str, Any]:
        """The fusion feature set (the fingerprint's `preprocess.fusion`), or {} without one: a store
        without fusion features keeps the fingerprint it had before fusion existed."""
        if not self.cfg.fusion_layers:
            return {}
        return {
            "fusion": {
                "layers": list(self.cfg.fusion_layers),
                "channels": "frame-attention half then global-attention half (2 * embed_dim), patch tokens",
                "image": "source frame, PIL bicubic from uint8, to the student frame size * patch_size / 16",
                "grid": "the student's unmerged 16-pixel patch grid (no resampling)",
                "pass": "aggregator only, the clip's frames in one pass, the labels' dtype",
            }
        }

    def _metric_rule(self) -> dict[str, Any] | None:
        """How the metric scale is computed (the fingerprint's `preprocess.metric_scale`), or None."""
        cfg = self.cfg
        if self.metric is None:
            return None
        if isinstance(self.metric, DepthAnything3Metric):
            model = {
                "input": "the teacher frames, ImageNet-normalised",
                "metric_depth": "DA3 canonical depth * ((fx + fy) / 2) / 300, VGGT intrinsics",
                "sky": f"DA3 sky output >= {SKY_THRESHOLD}",
                "dtype": "bfloat16 backbone, float32 head"
                if self.autocast_dtype and self.device.type == "cuda"
                else "float32",
            }
        else:
            model = {
                "input": "the source frames through the checkpoint's image processor",
                "metric_depth": "the prediction (metres), area-resized to the teacher image",
                "sky": f"metric depth >= {cfg.metric_sky_fraction} * max_depth ({self.metric.max_depth} m)",
                "dtype": cfg.dtype,
            }
        return {
            "teacher": cfg.metric_teacher,
            "fit": cfg.metric_fit,
            **model,
            "resolution": "the teacher image, VGGT depth and confidence before the 2x2 pooling",
            "pixels": "non-sky, VGGT confidence >= its exact median over non-sky pixels, "
            "metric depth > 0.01, VGGT depth > 0.001",
            "min_pixels": cfg.metric_min_pixels,
        }


def _plain_config(config: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(config):
        return to_dict(config)
    return dict(config)
