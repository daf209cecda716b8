"""The student's five objectives (GeoVR's definitions), on padded batches with validity masks.

Every geometric loss is computed per clip, then averaged over the clips that have a valid label;
padded frames, padded pixels, non-finite targets and clips flagged invalid (e.g. no metric scale)
are masked out, never zero-filled. A batch with no valid label gives a zero loss that is still
connected to the prediction (so backward and gradient all-reduce see the same graph everywhere).

Shapes: B clips, S frames (padded to the longest clip), (H, W) depth map, (h, w) feature grid,
C feature channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100


def _zero_like(pred: Tensor) -> Tensor:
    """A zero that keeps `pred` in the graph."""
    return pred.sum() * 0.0


def _mean_over_clips(per_clip: list[Tensor], pred: Tensor) -> Tensor:
    return torch.stack(per_clip).mean() if per_clip else _zero_like(pred)


def camera_loss(
    pred: Tensor,
    target: Tensor,
    frame_mask: Tensor,
    weights: tuple[float, float, float] = (1.0, 1.0, 0.5),
    translation_clamp: float = 100.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L1 on the pose encoding parts: w_T |T| (clamped) + w_q |q| + w_fov |FoV|.

    Args:
        pred, target: (B, S, 9) pose encodings (translation 3, quaternion 4, field of view 2), the
            target relative to the clip's first frame.
        frame_mask: (B, S) bool, True for real frames with a label.

    Returns:
        The loss (each part a mean over the clip's valid frames and components, then a mean over
        clips), and the unweighted parts {"translation", "rotation", "fov"}.
    """
    err = (pred - target).abs()
    parts: dict[str, list[Tensor]] = {"translation": [], "rotation": [], "fov": []}
    for b in range(pred.shape[0]):
        valid = frame_mask[b] & torch.isfinite(target[b]).all(-1)
        if not valid.any():
            continue
        e = err[b][valid]
        parts["translation"].append(e[:, :3].clamp(max=translation_clamp).mean())
        parts["rotation"].append(e[:, 3:7].mean())
        parts["fov"].append(e[:, 7:].mean())
    means = {name: _mean_over_clips(values, pred) for name, values in parts.items()}
    w_t, w_q, w_fov = weights
    total = w_t * means["translation"] + w_q * means["rotation"] + w_fov * means["fov"]
    return total, means


def quantile_filter(
    errors: Tensor, quantile: float = 0.98, min_elements: int = 1000, hard_max: float = 100.0
) -> Tensor:
    """Drop the errors above the `quantile` (GeoVR's `filter_by_quantile`).

    The threshold is the k-th smallest of the errors clamped at `hard_max`, k = ceil(q (n - 1)) + 1,
    itself capped at `hard_max`. With `min_elements` or fewer errors, or fewer than that kept, no
    filtering happens (the latter clamps at `hard_max` instead).

    Args:
        errors: (N,) non-negative errors.

    Returns:
        (M,) the kept errors.
    """
    n = errors.numel()
    if n <= min_elements:
        return errors
    k = math.ceil(quantile * (n - 1)) + 1
    threshold = min(float(torch.kthvalue(errors.detach().clamp(max=hard_max), k).values), hard_max)
    kept = errors <= threshold
    if int(kept.sum()) < min_elements:
        return errors.clamp(max=hard_max)
    return errors[kept]


def gradient_matching(diff: Tensor, valid: Tensor, scales: int = 4, clamp: float = 100.0) -> Tensor:
    """Multi-scale gradient matching on `diff` = pred - target, for one clip.

    At strides 1, 2, 4, ... (`scales` of them) take the absolute finite differences of `diff`
    along x and y between valid neighbours (clamped at `clamp`); a stride contributes the mean over x
    plus the mean over y; strides with fewer than 10 valid pixels are skipped; the result is the mean
    over the strides used.

    Args:
        diff: (S, H, W). valid: (S, H, W) bool.
    """
    total = []
    for scale in range(scales):
        step = 2**scale
        d = diff[..., ::step, ::step]
        m = valid[..., ::step, ::step]
        if int(m.sum()) < 10:
            continue
        term = diff.new_zeros(())
        mask_x = m[..., :, 1:] & m[..., :, :-1]
        if mask_x.any():
            term = term + (d[..., :, 1:] - d[..., :, :-1]).abs().clamp(max=clamp)[mask_x].mean()
        mask_y = m[..., 1:, :] & m[..., :-1, :]
        if mask_y.any():
            term = term + (d[..., 1:, :] - d[..., :-1, :]).abs().clamp(max=clamp)[mask_y].mean()
        total.append(term)
    return torch.stack(total).mean() if total else _zero_like(diff)


def depth_loss(
    pred: Tensor,
    target: Tensor,
    valid: Tensor,
    quantile: float = 0.98,
    min_elements: int = 1000,
    hard_max: float = 100.0,
    grad_scales: int = 4,
    grad_clamp: float = 100.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per clip: mean L1 over valid pixels after `quantile_filter`, plus `gradient_matching`.

    Args:
        pred, target: (B, S, H, W) depth. valid: (B, S, H, W) bool (real frames, inside the clip's
            depth map, finite positive target).

    Returns:
        The loss (mean over clips with a valid pixel) and its parts {"l1", "gradient"}.
    """
    l1, grad = [], []
    for b in range(pred.shape[0]):
        v = valid[b]
        if not v.any():
            continue
        diff = torch.where(v, pred[b] - target[b].nan_to_num(0.0), 0.0)
        l1.append(quantile_filter(diff[v].abs(), quantile, min_elements, hard_max).mean())
        grad.append(gradient_matching(diff, v, grad_scales, grad_clamp))
    parts = {"l1": _mean_over_clips(l1, pred), "gradient": _mean_over_clips(grad, pred)}
    return parts["l1"] + parts["gradient"], parts


def scale_loss(pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Mean over valid clips of |log1p(target) - log1p(pred)|. pred, target: (B,); valid: (B,) bool."""
    valid = valid & torch.isfinite(target) & (target > 0)
    if not valid.any():
        return _zero_like(pred)
    return F.l1_loss(torch.log1p(pred[valid]), torch.log1p(target[valid]))


def distill_loss(preds: list[Tensor], target: Tensor, valid: Tensor) -> Tensor:
    """1 - cosine between projected student states and teacher features, mean over tokens, layers, clips.

    Args:
        preds: per distilled layer, (B, S, h, w, C) student features projected to the teacher width.
        target: (B, S, L, h, w, C) teacher features, L = len(preds).
        valid: (B, S, h, w) bool, the tokens with a label (real frames, inside the clip's own grid).
    """
    per_clip_layer = []
    for layer, pred in enumerate(preds):
        for b in range(pred.shape[0]):
            if not valid[b].any():
                continue
            p = pred[b][valid[b]]
            t = target[b, :, layer][valid[b]].to(p.dtype)
            cosine = (F.normalize(p, dim=-1) * F.normalize(t, dim=-1)).sum(-1)
            per_clip_layer.append((1.0 - cosine).mean())
    return _mean_over_clips(per_clip_layer, preds[0])


def causal_lm_loss(hidden: Tensor, labels: Tensor, lm_head: nn.Module) -> Tensor:
    """Next-token cross entropy, computing logits only where a label is (not the whole sequence).

    Args:
        hidden: (B, L, D) final (normed) hidden states. labels: (B, L), IGNORE_INDEX where none.

    Returns:
        The mean over labelled positions (HF's `ForCausalLMLoss` with reduction mean), in float32.
    """
    shift_labels = labels[:, 1:]
    where = shift_labels != IGNORE_INDEX
    if not where.any():
        return _zero_like(lm_head(hidden[:, :1, :]).float())
    logits = lm_head(hidden[:, :-1][where]).float()
    return F.cross_entropy(logits, shift_labels[where])
