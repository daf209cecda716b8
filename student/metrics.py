"""Metrics of the heads' predictions against the teacher labels of a clip (numpy / float64), one
per objective (`student.objectives`), reported by `eval geometry`.

- depth: the student's depth map (S, Hd, Wd) aligned to the teacher's per frame by the ratio of
  medians (monocular-depth convention), over pixels where the teacher depth is finite and positive;
  AbsRel = mean |aligned - teacher| / teacher, delta<1.25 = fraction with
  max(aligned / teacher, teacher / aligned) < 1.25.
- cameras: both pose sets relative to frame 0 (camera-from-world); for every frame pair (i < j) the
  relative pose E_j E_i^-1 of the student against the teacher's: rotation error = angle of
  R_teacher^T R_student, translation error = angle between the two relative translation directions,
  folded to [0, 90] deg (the sign is not identifiable at small baselines, as VGGT's evaluation does).
  A pair whose reference baseline is shorter than `MIN_BASELINE` (a camera that stood still) has no
  translation direction: its translation error is NaN, left out of the mean, and the pair counts by
  its rotation error alone; `static_pair_fraction` reports how many pairs that was.
  AUC@30 = mean over thresholds 1..30 deg of the fraction of pairs whose larger error is below it.
- features: the mean cosine between projected student features and teacher features.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from geovr.teacher_cache.geometry import to_homogeneous

# Reference baselines below this (VGGT's normalised units: the mean scene depth is about 1) are a
# camera that stood still; 1e-3 is about 3 mm in a room 3 m deep, under a depth sensor's noise.
MIN_BASELINE = 1e-3


def median_align(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`pred` (H, W) scaled so that its median over `mask` equals the target's."""
    return pred * (np.median(target[mask]) / np.median(pred[mask]))


def depth_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """AbsRel and delta<1.25 of (S, H, W) depth after per-frame median alignment (see module doc)."""
    abs_rel, within, count = 0.0, 0, 0
    for p, t in zip(pred, target, strict=True):
        mask = np.isfinite(t) & (t > 0) & np.isfinite(p) & (p > 0)
        if mask.sum() == 0:
            continue
        aligned = median_align(p, t, mask)[mask]
        truth = t[mask]
        abs_rel += float(np.sum(np.abs(aligned - truth) / truth))
        within += int(np.sum(np.maximum(aligned / truth, truth / aligned) < 1.25))
        count += int(mask.sum())
    if count == 0:
        return {"depth_abs_rel": math.nan, "depth_delta1": math.nan}
    return {"depth_abs_rel": abs_rel / count, "depth_delta1": within / count}


def _rotation_angle(rotation: torch.Tensor) -> torch.Tensor:
    """Angle in degrees of rotation matrices (..., 3, 3)."""
    cos = ((rotation.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.acos(cos))


def relative_pose_errors(pred: torch.Tensor, target: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Rotation and translation-direction errors (degrees) of all frame pairs i < j.

    Args:
        pred, target: (S, 3, 4) camera-from-world extrinsics.

    Returns:
        (P,) rotation errors and (P,) translation angle errors folded to [0, 90], P = S (S - 1) / 2;
        NaN for the pairs whose target baseline is below `MIN_BASELINE`.
    """
    pred, target = to_homogeneous(pred.double()), to_homogeneous(target.double())
    i, j = torch.triu_indices(pred.shape[0], pred.shape[0], offset=1)
    rel_pred = pred[j] @ torch.linalg.inv(pred[i])
    rel_target = target[j] @ torch.linalg.inv(target[i])
    rot_err = _rotation_angle(rel_target[:, :3, :3].transpose(-1, -2) @ rel_pred[:, :3, :3])
    tp, tt = rel_pred[:, :3, 3], rel_target[:, :3, 3]
    cos = (tp * tt).sum(-1) / (tp.norm(dim=-1) * tt.norm(dim=-1)).clamp_min(1e-12)
    trans_err = torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))
    trans_err = torch.minimum(trans_err, 180.0 - trans_err)
    trans_err[tt.norm(dim=-1) < MIN_BASELINE] = math.nan
    return rot_err.numpy(), trans_err.numpy()


def pose_auc(rot_err: np.ndarray, trans_err: np.ndarray, max_threshold: int = 30) -> float:
    """Mean over integer thresholds 1..max of the fraction of pairs with max(rot, trans) below it
    (rot alone where trans is NaN: a static pair)."""
    errors = np.fmax(rot_err, trans_err)
    histogram, _ = np.histogram(errors, bins=np.arange(max_threshold + 1))
    return float(np.mean(np.cumsum(histogram / len(errors))))


def feature_cosine(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean cosine similarity of (..., C) feature vectors."""
    p = pred.reshape(-1, pred.shape[-1]).astype(np.float64)
    t = target.reshape(-1, target.shape[-1]).astype(np.float64)
    cos = (p * t).sum(-1) / np.maximum(np.linalg.norm(p, axis=-1) * np.linalg.norm(t, axis=-1), 1e-12)
    return float(cos.mean())
