"""The per-clip metric scale (metres per VGGT depth unit): GeoVR's chain, and the named options.

GeoVR's chain (`models/qwen3vl_geo.py`, `get_gt_scale`, with Depth Anything 3's alignment
utilities), for one clip of S frames at the teacher image's resolution Ht x Wt (the frames VGGT
sees, which DA3-Metric also sees):
1. Metric depth = DA3's canonical depth * ((fx + fy) / 2) / 300, with VGGT's intrinsics of each
   frame (`canonical_to_metric`; 300 is DA3's canonical focal length).
2. Non-sky pixels: DA3's sky output below 0.3.
3. `median_conf`: the median of VGGT's depth confidence over the non-sky pixels, as
   `torch.quantile(., 0.5)` (the mean of the two middle values for an even count).
4. Alignment mask: confidence >= median_conf, non-sky, metric depth > 0.01, VGGT depth > 0.001.
5. Plain least squares over the mask: `scale = <metric, vggt> / <vggt, vggt>`, so that
   `metric ≈ scale * vggt` (the "least_squares" fit).

Differences from GeoVR's code, kept on purpose:
- The median is exact. GeoVR takes it from 100,000 pixels drawn at random when a clip has more (a
  32-frame 504x378 clip has 6.1 million), so its scale target changes from run to run and machine
  to machine; the exact median gives the same labels every time, and a cache written once must be
  reproducible (a resumed or re-run shard must not change a clip's target).
- Pixels where any input is not finite are left out (in GeoVR one NaN makes the clip's scale NaN).
- Too few pixels: GeoVR asserts more than 10 non-sky pixels and stops training. Here, fewer than
  `min_pixels` pixels in the alignment mask, or a scale that is not finite and positive, gives
  `valid=False` and a NaN scale: the clip is stored without a scale (the scale loss skips it) and
  precompute counts such clips ("clips without a metric scale" in its summary).
- The dot products run in float64 (GeoVR: float32; they differ by about 1e-6 relative).

Named options (`TeacherConfig.metric_teacher`, `TeacherConfig.metric_fit`):
- fit "robust": `geometry.fit_scale` over the same mask (median-ratio start, then least squares with
  outlier rejection): the fit this pipeline used before it followed GeoVR.
- teacher "depth-anything-v2": Depth Anything V2 Metric's depth is already in metres (no focal
  conversion) and it has no sky output; its sky is where the prediction saturates at its far clip
  (`metric_depth.MetricDepthModel.sky_mask`). The same mask and fit follow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from geovr.teacher_cache.geometry import fit_scale
from geovr.teachers.da3_metric import exact_quantile

SCALE_FITS = ("least_squares", "robust")
CANONICAL_FOCAL = 300.0
"""DA3-Metric's canonical focal length in pixels: metric depth = canonical depth * focal / 300."""
MIN_METRIC_DEPTH = 0.01
"""Metres; pixels with metric depth at or below this are not used (DA3's alignment mask)."""
MIN_TEACHER_DEPTH = 1e-3
"""VGGT units; pixels with teacher depth at or below this are not used (DA3's alignment mask)."""


@dataclass
class ClipScale:
    """The metric scale of one clip and what it was fitted on.

    Attributes:
        scale: metres per VGGT depth unit (`metric ≈ scale * vggt`); NaN when not valid.
        valid: fitted over at least `min_pixels` pixels, finite and positive.
        median_conf: median teacher confidence over the usable non-sky pixels (NaN if none).
        align_mask: (S, H, W) bool, the pixels of the fit.
    """

    scale: float
    valid: bool
    median_conf: float
    align_mask: Tensor

    @property
    def pixels(self) -> int:
        return int(self.align_mask.sum())


def canonical_to_metric(depth: Tensor, intrinsic: Tensor) -> Tensor:
    """DA3 canonical depth (S, H, W) to metres with intrinsics (S, 3, 3) in pixels of the same image:
    `depth * ((fx + fy) / 2) / 300` per frame."""
    focal = (intrinsic[:, 0, 0] + intrinsic[:, 1, 1]) / 2
    return depth * (focal[:, None, None] / CANONICAL_FOCAL)


def alignment_mask(
    teacher_depth: Tensor, teacher_conf: Tensor, metric_depth: Tensor, non_sky: Tensor
) -> tuple[Tensor, float]:
    """GeoVR's alignment mask and the confidence median it uses (steps 3 and 4 of the module docstring).

    Args:
        teacher_depth, teacher_conf: (S, H, W) VGGT depth and confidence.
        metric_depth: (S, H, W) metric depth in metres.
        non_sky: (S, H, W) bool, True where the metric model sees no sky.

    Returns:
        (mask (S, H, W) bool, median_conf): median_conf is NaN and the mask empty when no non-sky
        pixel has finite inputs.
    """
    if not (teacher_depth.shape == teacher_conf.shape == metric_depth.shape == non_sky.shape):
        raise ValueError(
            f"teacher depth {tuple(teacher_depth.shape)}, confidence {tuple(teacher_conf.shape)}, metric "
            f"depth {tuple(metric_depth.shape)} and sky mask {tuple(non_sky.shape)} must have the same shape"
        )
    usable = (
        non_sky & torch.isfinite(teacher_depth) & torch.isfinite(teacher_conf) & torch.isfinite(metric_depth)
    )
    if not bool(usable.any()):
        return usable, math.nan
    median_conf = exact_quantile(teacher_conf[usable], 0.5)
    mask = (
        usable
        & (teacher_conf >= median_conf)
        & (metric_depth > MIN_METRIC_DEPTH)
        & (teacher_depth > MIN_TEACHER_DEPTH)
    )
    return mask, float(median_conf)


def clip_metric_scale(
    teacher_depth: Tensor,
    teacher_conf: Tensor,
    metric_depth: Tensor,
    non_sky: Tensor,
    fit: str = "least_squares",
    min_pixels: int = 16,
) -> ClipScale:
    """Metric scale of one clip: GeoVR's mask, then the `fit` ("least_squares" or "robust").

    Args:
        teacher_depth, teacher_conf: (S, H, W) VGGT depth (VGGT units) and confidence.
        metric_depth: (S, H, W) metric depth in metres on the same pixels.
        non_sky: (S, H, W) bool, True where the metric model sees no sky.
        fit: "least_squares" (GeoVR) or "robust" (`geometry.fit_scale`).
        min_pixels: fewer pixels in the alignment mask than this gives an invalid scale.
    """
    if fit not in SCALE_FITS:
        raise ValueError(f"unknown scale fit {fit!r}; known: {', '.join(SCALE_FITS)}")
    mask, median_conf = alignment_mask(teacher_depth, teacher_conf, metric_depth, non_sky)
    if int(mask.sum()) < min_pixels:
        return ClipScale(math.nan, False, median_conf, mask)
    if fit == "robust":
        scale_tensor, robust_ok = fit_scale(teacher_depth, metric_depth, mask)
        scale = float(scale_tensor) if bool(robust_ok) else math.nan
    else:
        vggt = teacher_depth[mask].double()
        scale = float((metric_depth[mask].double() * vggt).sum() / (vggt * vggt).sum())
    if not (math.isfinite(scale) and scale > 0):
        return ClipScale(math.nan, False, median_conf, mask)
    return ClipScale(scale, True, median_conf, mask)
