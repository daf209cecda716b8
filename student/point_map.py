"""SpatialSV's point-map objective: per pixel of the depth grid, a 3D point in frame 0's camera frame.

Prediction: the student's depth composed with its cameras, not a dense point head:
    X̂_i(u, v) = R̂_i^T (D̂_i(u, v) K̂_i^{-1} [u, v, 1]^T - t̂_i),
with (R̂_i | t̂_i) and K̂_i decoded from the predicted pose encoding at the clip's depth-grid size
(principal point at the grid centre, as every camera of the project). Why composed: VGGT's authors
find depth + cameras more accurate than their point head; the reconstruction can never disagree
with the depth and cameras `eval geometry` scores; no second dense head (about 32 M parameters at
d = 2048); and the loss gives the camera head a dense multi-view signal (a pose or field-of-view
error moves every pixel), the 2D -> 3D lifting SpatialSV describes. Costs: depth errors cannot be
corrected apart from the cameras, and the principal point is assumed centred.

Target: the cached depth unprojected with the cached cameras (the batch's `pose_enc`, relative to
frame 0, decoded the same way), i.e. VGGT's normalised units; no new cache fields.

Loss (VGGT's `regression_loss` with `gradient_loss_fn="grad"`, `valid_range=0.98`; per clip, then a
mean over the clips with at least `min_valid_points` valid points). V = valid pixels, r(p) =
min(||P̂(p) - P(p)||_2, 100) (non-finite -> 0), optional confidence c > 0, gamma = 1, alpha = 0.2:
    L_reg  = mean_{p in Q(V)} r(p)
    L_conf = mean_{p in Q(V)} [gamma c(p) r(p) - alpha log c(p)]      (only with a confidence)
    L_grad = 1/4 sum_{s in 1,2,4,8} G_s,   Δ = M ⊙ (P̂ - P) on the maps subsampled [::s, ::s],
    G_s    = [sum |Δ_{x+1} - Δ_x| M_x M_{x+1} + sum |Δ_{y+1} - Δ_y| M_y M_{y+1}] / (3 |M_s|)
             (sums over frames, pixels and the 3 channels; each difference clamped at 100; 0 when
             |M_s| = 0),
    L_point = L_reg + L_grad (+ L_conf with a confidence),
where Q keeps, when more than 1000 errors, those clamped at 100 and below the k-th smallest,
k = round(0.98 (n - 1)) + 1 (if more than 1000 remain; else all, clamped). The student has no
confidence head, so its loss is L_reg + L_grad. No extra normalisation by the mean point distance:
the cached target is already in VGGT's normalised units (mean distance 1 over the clip), and
rescaling it would make it disagree with the depth and camera targets.

Shapes: S frames, (H, W) depth grid.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from geovr.student.batch import camera_target
from geovr.teacher_cache.geometry import quat_to_mat
from geovr.teacher_cache.schema import ClipLabels

HARD_MAX = 100.0
QUANTILE = 0.98
MIN_FILTER_ELEMENTS = 1000
MIN_VALID_POINTS = 100
GRAD_SCALES = 4


def compose_points(depth: Tensor, pose_enc: Tensor) -> Tensor:
    """Depth (S, H, W) and pose encodings (S, 9) relative to frame 0 -> (S, H, W, 3) points in
    frame 0's camera frame.

    The focal lengths are never formed: x = (u - W/2) tan(fov_w / 2) / (W/2) * depth (likewise y), so a
    field of view of 0 (the camera head's ReLU) stays finite.
    """
    height, width = depth.shape[-2:]
    v, u = torch.meshgrid(
        torch.arange(height, dtype=depth.dtype, device=depth.device),
        torch.arange(width, dtype=depth.dtype, device=depth.device),
        indexing="ij",
    )
    tan_h = torch.tan(pose_enc[:, 7] / 2.0)[:, None, None]
    tan_w = torch.tan(pose_enc[:, 8] / 2.0)[:, None, None]
    x = (u - width / 2.0) * tan_w / (width / 2.0) * depth
    y = (v - height / 2.0) * tan_h / (height / 2.0) * depth
    camera = torch.stack((x, y, depth), -1)
    rotation = quat_to_mat(pose_enc[:, 3:7])[:, None, None]  # (S, 1, 1, 3, 3)
    translation = pose_enc[:, None, None, :3]
    return ((camera - translation)[..., None, :] @ rotation).squeeze(-2)


def quantile_filter(
    errors: Tensor, quantile: float = QUANTILE, min_elements: int = MIN_FILTER_ELEMENTS
) -> Tensor:
    """VGGT's `filter_by_quantile` (module docstring's Q) on (N,) errors."""
    n = errors.numel()
    if n <= min_elements:
        return errors
    errors = errors.clamp(max=HARD_MAX)
    k = round(quantile * (n - 1)) + 1
    threshold = min(float(torch.kthvalue(errors.detach(), k).values), HARD_MAX)
    kept = errors < threshold
    return errors[kept] if int(kept.sum()) > min_elements else errors


def gradient_term(diff: Tensor, valid: Tensor, scales: int = GRAD_SCALES) -> Tensor:
    """L_grad of the module docstring. diff: (S, H, W, 3) = P̂ - P; valid: (S, H, W) bool."""
    total = diff.new_zeros(())
    for scale in range(scales):
        step = 2**scale
        m = valid[:, ::step, ::step, None].to(diff.dtype)
        d = diff[:, ::step, ::step] * m
        count = 3.0 * m.sum()
        if count == 0:
            continue
        grad_x = (d[:, :, 1:] - d[:, :, :-1]).abs() * m[:, :, 1:] * m[:, :, :-1]
        grad_y = (d[:, 1:] - d[:, :-1]).abs() * m[:, 1:] * m[:, :-1]
        total = total + (grad_x.clamp(max=HARD_MAX).sum() + grad_y.clamp(max=HARD_MAX).sum()) / count
    return total / scales


def clip_point_loss(pred: Tensor, target: Tensor, valid: Tensor, conf: Tensor | None = None) -> Tensor:
    """L_point of one clip (module docstring). pred, target: (S, H, W, 3); valid: (S, H, W) bool;
    conf: (S, H, W) > 0 or None."""
    diff = torch.where(valid[..., None], pred - target.nan_to_num(0.0), 0.0)
    residual = diff[valid].norm(dim=-1)
    residual = torch.where(torch.isfinite(residual), residual, 0.0).clamp(max=HARD_MAX)
    loss = quantile_filter(residual).mean() + gradient_term(diff, valid)
    if conf is not None:
        c = conf[valid]
        loss = loss + quantile_filter(c * residual - 0.2 * torch.log(c)).mean()
    return loss


def point_map_loss(
    pred: list[Tensor], target: list[Tensor], valid: list[Tensor], min_valid_points: int = MIN_VALID_POINTS
) -> tuple[Tensor, int]:
    """Mean over clips of `clip_point_loss`, skipping clips with fewer than `min_valid_points`.

    Args:
        pred, target: per clip, (S_b, H_b, W_b, 3) points. valid: per clip, (S_b, H_b, W_b) bool.

    Returns:
        The loss (a zero still connected to `pred` when no clip counts) and the clips counted.
    """
    per_clip = [
        clip_point_loss(p, t, v)
        for p, t, v in zip(pred, target, valid, strict=True)
        if int(v.sum()) >= min_valid_points
    ]
    if not per_clip:
        return sum(p.sum() for p in pred) * 0.0, 0
    return torch.stack(per_clip).mean(), len(per_clip)


def label_points(labels: ClipLabels) -> tuple[Tensor, Tensor]:
    """A cached clip's point map: its depth unprojected with its cameras, exactly as the training
    target (`batch.camera_target` at the depth grid). Returns (S, Hd, Wd, 3) float64 points and
    the (S, Hd, Wd) bool mask of finite positive depth."""
    depth = torch.from_numpy(np.asarray(labels.depth, dtype=np.float64))
    valid = torch.isfinite(depth) & (depth > 0)
    points = compose_points(depth.nan_to_num(0.0), camera_target(labels).double())
    return points, valid
