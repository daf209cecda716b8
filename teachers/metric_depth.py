"""Monocular metric depth (Depth Anything V2 Metric through transformers) for the per-clip scale.

The named option `teacher.metric_teacher: depth-anything-v2`; the default metric teacher is
DA3-Metric (`da3_metric`), GeoVR's. The teacher (VGGT) predicts depth in a normalised, scale-free
unit. One monocular metric-depth model run on the same clip gives depth in metres; the
least-squares ratio between the two over trustworthy pixels (`metric_scale.clip_metric_scale`) is
the clip's metric scale, metres per VGGT unit.

Loading: `DepthAnythingForDepthEstimation` and its image processor from a local directory only
(`local_files_only=True`), e.g. a snapshot of `depth-anything/Depth-Anything-V2-Metric-Indoor-Large-hf`.
The processor follows the checkpoint's own `preprocessor_config.json` (Depth Anything V2: the
shorter side to at least 518, aspect ratio kept, both sides multiples of 14, bicubic, ImageNet
normalisation).

Sky: Depth Anything V2 Metric has no sky output. Its metric head ends in `sigmoid * max_depth`
(20 m indoor, 80 m outdoor), so sky and anything beyond the trained range saturate at the far
clip. `sky_mask` marks pixels predicted at or beyond `sky_fraction * max_depth` as sky: these carry
no usable metric information whatever they are, so excluding them is right even for a distant wall.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

CHECKPOINT_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
"""The files of a metric checkpoint directory that determine its predictions (hashed for the fingerprint)."""


class MetricDepthModel:
    """A Depth Anything (V2) metric-depth model and its image processor, loaded once.

    Args:
        path: local directory with `config.json`, `model.safetensors` and `preprocessor_config.json`.
        device: where the model runs.
        sky_fraction: pixels at or beyond `sky_fraction * max_depth` are treated as sky.
        max_frames_per_call: frames per forward pass (memory bound).
    """

    def __init__(
        self,
        path: str | Path,
        device: torch.device | str = "cpu",
        sky_fraction: float = 0.95,
        max_frames_per_call: int = 16,
    ) -> None:
        from transformers import AutoImageProcessor, DepthAnythingForDepthEstimation

        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(
                f"metric depth checkpoint {self.path}: no config.json (expected a local model directory)"
            )
        try:
            config = json.loads((self.path / "config.json").read_text())
        except json.JSONDecodeError as err:
            raise ValueError(
                f"metric depth checkpoint {self.path}: config.json is not valid JSON: {err}"
            ) from None
        if config.get("model_type") != "depth_anything" or config.get("depth_estimation_type") != "metric":
            raise ValueError(
                f"metric depth checkpoint {self.path}: model_type={config.get('model_type')!r}, "
                f"depth_estimation_type={config.get('depth_estimation_type')!r}; expected a Depth Anything "
                "model with depth_estimation_type='metric'"
            )
        self.device = torch.device(device)
        self.processor = AutoImageProcessor.from_pretrained(self.path, local_files_only=True)
        self.model = DepthAnythingForDepthEstimation.from_pretrained(self.path, local_files_only=True)
        self.model.eval().requires_grad_(False).to(self.device)
        self.max_depth = float(self.model.config.max_depth)
        self.sky_fraction = sky_fraction
        self.max_frames_per_call = max_frames_per_call

    @property
    def name(self) -> str:
        """The checkpoint directory's name, e.g. `Depth-Anything-V2-Metric-Indoor-Large-hf`."""
        return self.path.resolve().name

    @torch.inference_mode()
    def predict(
        self, frames: np.ndarray, out_hw: tuple[int, int], autocast_dtype: torch.dtype | None
    ) -> Tensor:
        """Metric depth of a clip, resized to `out_hw`.

        Args:
            frames: (S, H, W, 3) uint8 RGB.
            out_hw: (Ho, Wo) output size (the teacher's depth resolution).
            autocast_dtype: bf16 autocast for the forward, or None for the model's fp32.

        Returns:
            (S, Ho, Wo) float32 depth in metres on `self.device` (area-antialiased bilinear resize
            of the prediction at the processor's resolution).
        """
        outputs = []
        for start in range(0, len(frames), self.max_frames_per_call):
            chunk = frames[start : start + self.max_frames_per_call]
            pixel_values = self.processor(images=list(chunk), return_tensors="pt")["pixel_values"].to(
                self.device
            )
            with torch.autocast(
                self.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
            ):
                depth = self.model(pixel_values=pixel_values).predicted_depth
            depth = F.interpolate(
                depth.float()[:, None], size=out_hw, mode="bilinear", antialias=True, align_corners=False
            )
            outputs.append(depth[:, 0])
        return torch.cat(outputs)

    def sky_mask(self, depth: Tensor) -> Tensor:
        """(…) bool: pixels of a metric prediction at the far clip (sky, or beyond the trained range)."""
        return depth >= self.sky_fraction * self.max_depth
