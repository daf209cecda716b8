"""`eval geometry`: the student's geometric heads against the cached teacher labels (and, given the
corpus root, against the clips' RGB-D ground truth, or else against the ground truth a "both" store
keeps beside the teacher's labels: the same metrics named `gt_<metric>`).

Per clip (the student sees the clip's cached frames, as in training; metrics compare with the
teacher's labels of the same clip, so they measure how well the heads learnt the teacher), the
metric of each objective of `student.objectives` the student has (computed in `student.metrics`):
- depth (AbsRel, delta<1.25 after per-frame median alignment), cameras (relative-pose errors of all
  frame pairs and AUC@30), scale (|log ratio|) and features (cosine per distilled layer), as defined
  in `student.metrics`.
- point map (SpatialSV): the mean distance between the student's points (its depth composed with
  its cameras) and the teacher's (cached depth unprojected with the cached cameras), unaligned, in
  the teacher's normalised units.
- reconstruction, for a student with depth and cameras: its cloud against the teacher's after one
  median depth ratio per clip (`eval.reconstruction`): accuracy, completeness, Chamfer, and
  precision / recall / F-score at 0.05 normalised units.

Metric names: depth_abs_rel, depth_delta1, rotation_error_deg, translation_error_deg (pair means),
pose_auc30, static_pair_fraction, scale_log_error, feature_cosine_layer<l> (l = the teacher layer), point_map_error,
recon_accuracy, recon_completeness, recon_chamfer, recon_{precision,recall,fscore}@0.05. Clip values are
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

from geovr.eval.reconstruction import reconstruction_metrics
from geovr.student.objectives import OBJECTIVES
from geovr.teacher_cache.schema import ClipLabels

EVAL_PROMPT = "Describe the layout of this room."


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
    labels: ClipLabels, feature_layers: Sequence[int] = (), **predictions: Any
) -> dict[str, Any]:
    """All metrics of one clip: each objective of `student.objectives` whose prediction is given
    (by its output name, e.g. pose_enc (S, 9) cameras relative to frame 0, depth (S, Hd, Wd), scale,
    features: per distilled layer (S, h, w, C)) reports its metric against the teacher labels.
    `feature_layers`: the teacher layer of each entry of `features` (the store's L axis)."""
    out: dict[str, Any] = {"clip_id": labels.clip_id, "num_frames": labels.num_frames}
    for objective in OBJECTIVES.values():
        pred = predictions.get(objective.output)
        if objective.metric is None or pred is None or (isinstance(pred, list) and not pred):
            continue
        out.update(objective.metric(pred, labels, feature_layers))
    if predictions.get("depth") is not None and predictions.get("pose_enc") is not None:
        out.update(reconstruction_metrics(predictions["depth"], predictions["pose_enc"], labels))
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

    from geovr.student.checkpoint import resolve_checkpoint
    from geovr.student.model import GeoVRStudent
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
    """The student's head outputs on one cached clip, by objective output name: pose_enc (S, 9),
    depth (S, Hd, Wd), scale (a float), features (per layer (S, h, w, C)), ...; None / [] for the
    objectives the student does not have."""
    from geovr.student.batch import collate_samples, make_sample

    sample = make_sample(labels, [{"from": "human", "value": EVAL_PROMPT}], tokenizer, preprocess)
    batch = collate_samples([sample], int(tokenizer.pad_token_id)).to(device)
    outputs = student.predict(batch).outputs
    predictions: dict[str, Any] = {
        o.output: [] if o.output == "features" else None for o in OBJECTIVES.values()
    }
    for name, value in outputs.items():
        predictions[name] = _first_clip(value)
    return predictions


def _first_clip(value: Any) -> Any:
    """Clip 0 of a batched prediction as numpy (a list per layer stays a list; a scalar a float)."""
    if isinstance(value, list):
        return [_first_clip(v) for v in value]
    array = value[0].float().cpu().numpy()
    return float(array) if array.ndim == 0 else array


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
    model: str | Path, store: str | Path, out: str | Path, limit: int | None = None, device: str = "cpu",
    corpus_root: str | Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Run the student over the store's first `limit` clips; write geometry.json and geometry.md.

    With `corpus_root`, clips whose video has an RGB-D folder are also scored against their ground
    truth (`eval.label_quality.predictions_against_truth`: metrics named `gt_<metric>`); without it,
    clips that hold ground truth beside the teacher's labels (label source "both") against that
    (`predictions_against_stored_truth`)."""
    from geovr.eval.label_quality import predictions_against_stored_truth, predictions_against_truth
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
        clips.append(clip_metrics(labels, layers, **pred))
        if corpus_root is not None:
            clips[-1].update(predictions_against_truth(labels, pred, corpus_root))
        else:
            clips[-1].update(predictions_against_stored_truth(labels, pred))
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
