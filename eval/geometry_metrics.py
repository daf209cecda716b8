"""`eval geometry`: the student's geometric heads against the cached teacher labels.

Per clip (the student sees the clip's cached frames, as in training; metrics compare with the
teacher's labels of the same clip, so they measure how well the heads learnt the teacher):
- depth: the student's depth map (S, Hd, Wd) aligned to the teacher's per frame by the ratio of
  medians (monocular-depth convention), over pixels where the teacher depth is finite and positive;
  AbsRel = mean |aligned - teacher| / teacher, delta<1.25 = fraction with
  max(aligned / teacher, teacher / aligned) < 1.25.
- cameras: both pose sets relative to frame 0 (camera-from-world); for every frame pair (i < j) the
  relative pose E_j E_i^-1 of the student against the teacher's: rotation error = angle of
  R_teacher^T R_student, translation error = angle between the two relative translation directions,
  folded to [0, 90] deg (the sign is not identifiable at small baselines, as VGGT's evaluation does).
  AUC@30 = mean over thresholds 1..30 deg of the fraction of pairs whose larger error is below it.
- scale: |log(student scale) - log(teacher scale)| on clips whose teacher scale is valid.
- features: per distilled layer, the mean cosine between the projected student features and the
  teacher features over all tokens of the clip.

Metric names: depth_abs_rel, depth_delta1, rotation_error_deg, translation_error_deg (pair means),
pose_auc30, scale_log_error, feature_cosine_layer<l> (l = the teacher layer). Clip values are
averaged over the clips that have them. Output: `geometry.json` ({"model", "store", "num_clips",
"metrics": {name: mean}, "clips": [per-clip metrics, non-finite values as null]}) and `geometry.md`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geovr.teacher_cache.geometry import decode_pose, relative_to_first, to_homogeneous
from geovr.teacher_cache.schema import ClipLabels

EVAL_PROMPT = "Describe the layout of this room."


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
        (P,) rotation errors and (P,) translation angle errors folded to [0, 90], P = S (S - 1) / 2.
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
    return rot_err.numpy(), trans_err.numpy()


def pose_auc(rot_err: np.ndarray, trans_err: np.ndarray, max_threshold: int = 30) -> float:
    """Mean over integer thresholds 1..max of the fraction of pairs with max(rot, trans) below it."""
    errors = np.maximum(rot_err, trans_err)
    histogram, _ = np.histogram(errors, bins=np.arange(max_threshold + 1))
    return float(np.mean(np.cumsum(histogram / len(errors))))


def feature_cosine(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean cosine similarity of (..., C) feature vectors."""
    p = pred.reshape(-1, pred.shape[-1]).astype(np.float64)
    t = target.reshape(-1, target.shape[-1]).astype(np.float64)
    cos = (p * t).sum(-1) / np.maximum(np.linalg.norm(p, axis=-1) * np.linalg.norm(t, axis=-1), 1e-12)
    return float(cos.mean())


def teacher_image_hw(labels: ClipLabels) -> tuple[int, int]:
    """(H, W) of the teacher image the clip's intrinsics refer to.

    From `meta["teacher_size"]` ([W, H], as precompute writes it) or `meta["teacher_hw"]` ([H, W]),
    else twice the depth map (the cache holds depth at half the teacher resolution).
    """
    if "teacher_size" in labels.meta:
        width, height = labels.meta["teacher_size"]
        return int(height), int(width)
    if "teacher_hw" in labels.meta:
        height, width = labels.meta["teacher_hw"]
        return int(height), int(width)
    return 2 * labels.depth.shape[1], 2 * labels.depth.shape[2]


def clip_metrics(
    labels: ClipLabels,
    pose_enc: np.ndarray | None,
    depth: np.ndarray | None,
    scale: float | None,
    features: list[np.ndarray],
    feature_layers: Sequence[int],
) -> dict[str, Any]:
    """All metrics of one clip from the student's predictions.

    Args:
        labels: the teacher labels of the clip.
        pose_enc: (S, 9) student cameras relative to frame 0, or None without a camera head.
        depth: (S, Hd, Wd) student depth, or None. scale: student metric scale, or None.
        features: per distilled layer (S, h, w, C) projected student features (empty without).
        feature_layers: the teacher layer of each entry of `features` (the store's L axis).
    """
    out: dict[str, Any] = {"clip_id": labels.clip_id, "num_frames": labels.num_frames}
    if depth is not None:
        out.update(depth_metrics(depth, labels.depth))
    if pose_enc is not None and labels.num_frames > 1:
        teacher_hw = labels.meta.get("teacher_hw") or (2 * labels.depth.shape[1], 2 * labels.depth.shape[2])
        pred_ext, _ = decode_pose(
            torch.from_numpy(pose_enc).double(), (int(teacher_hw[0]), int(teacher_hw[1]))
        )
        target = relative_to_first(torch.from_numpy(np.asarray(labels.extrinsic, dtype=np.float64)))
        rot, trans = relative_pose_errors(pred_ext, target)
        out.update(
            rotation_error_deg=float(rot.mean()),
            translation_error_deg=float(trans.mean()),
            pose_auc30=pose_auc(rot, trans),
        )
    if scale is not None and labels.scale_valid and np.isfinite(labels.scale) and labels.scale > 0:
        out["scale_log_error"] = abs(math.log(max(scale, 1e-12)) - math.log(labels.scale))
    for index, (layer, pred) in enumerate(zip(feature_layers, features, strict=True)):
        target = labels.features[:, index]
        if pred.shape != target.shape:
            raise ValueError(
                f"clip {labels.clip_id}: student features of layer {layer} have shape {pred.shape}, "
                f"the store's {target.shape}; was the student trained on this store's teacher?"
            )
        out[f"feature_cosine_layer{layer}"] = feature_cosine(pred, target)
    return out


def summarize(clips: list[dict[str, Any]]) -> dict[str, float]:
    """Mean of each metric over the clips that have it (NaN-free values only)."""
    names = sorted({k for c in clips for k, v in c.items() if isinstance(v, float)})
    means = {}
    for name in names:
        values = [c[name] for c in clips if isinstance(c.get(name), float) and math.isfinite(c[name])]
        if values:
            means[name] = float(np.mean(values))
    return means


# ---------------------------------------------------------------------------------------------
# The student on cached clips


def load_student(model: str | Path, device: str = "cpu"):
    """(student, tokenizer, video preprocess) of a student checkpoint or run directory."""
    from transformers import AutoTokenizer

    from geovr.student.model import GeoVRStudent, resolve_checkpoint
    from geovr.student.vision_inputs import VideoPreprocess

    checkpoint = resolve_checkpoint(Path(model))
    student = GeoVRStudent.from_pretrained(checkpoint, dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    preprocess = VideoPreprocess.from_model_dir(
        checkpoint, student.config.video_max_pixels, student.config.video_min_pixels
    )
    return student, tokenizer, preprocess


@torch.no_grad()
def predict_clip(student, tokenizer, preprocess, labels: ClipLabels, device: str = "cpu") -> dict[str, Any]:
    """The student's head outputs on one cached clip: pose_enc (S, 9), depth (S, Hd, Wd), scale,
    features (per layer (S, h, w, C)); None / [] for parts the student does not have."""
    from geovr.student.batch import collate_samples, make_sample

    sample = make_sample(labels, [{"from": "human", "value": EVAL_PROMPT}], tokenizer, preprocess)
    batch = collate_samples([sample], int(tokenizer.pad_token_id)).to(device)
    pred = student.predict(batch)
    return {
        "pose_enc": None if pred.pose_enc is None else pred.pose_enc[0].float().cpu().numpy(),
        "depth": None if pred.depth is None else pred.depth[0].float().cpu().numpy(),
        "scale": None if pred.scale is None else float(pred.scale.reshape(-1)[0]),
        "features": [f[0].float().cpu().numpy() for f in pred.features],
    }


def geometry_table(report: dict[str, Any]) -> str:
    """Markdown table of the metric means."""
    lines = [
        f"# Geometry of {report['model']} on {report['store']} ({report['num_clips']} clips)",
        "",
        "| metric | value |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {value:.4f} |" for name, value in report["metrics"].items()]
    return "\n".join(lines) + "\n"


def evaluate_geometry(
    model: str | Path, store: str | Path, out: str | Path, limit: int | None = None, device: str = "cpu"
) -> dict[str, Any]:
    """Run the student over the store's first `limit` clips; write geometry.json and geometry.md."""
    from geovr.teacher_cache.store import open_store

    reader = open_store(store)
    clip_ids = reader.clip_ids()[: limit if limit is not None else None]
    if not clip_ids:
        raise ValueError(f"{store}: no clips to evaluate")
    student, tokenizer, preprocess = load_student(model, device)
    layers = list(reader.fingerprint.feature_layers)
    clips = []
    for clip_id in clip_ids:
        labels = reader.read_clip(clip_id)
        pred = predict_clip(student, tokenizer, preprocess, labels, device)
        clips.append(
            clip_metrics(labels, pred["pose_enc"], pred["depth"], pred["scale"], pred["features"], layers)
        )
    report = {
        "model": str(model),
        "store": str(store),
        "num_clips": len(clips),
        "metrics": summarize(clips),
        "clips": clips,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clean = [
        {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in c.items()} for c in clips
    ]
    (out / "geometry.json").write_text(json.dumps({**report, "clips": clean}, indent=1) + "\n")
    (out / "geometry.md").write_text(geometry_table(report))
    return report
