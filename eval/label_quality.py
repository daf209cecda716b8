"""`eval label-quality`: how good a store's labels are against the clips' RGB-D ground truth.

Before spending GPU-weeks training on a teacher's labels, compare them with ground truth where the
corpus has it (ScanNet, ScanNet++, ARKitScenes exports in the `corpus.rgbd` layout; the synthetic
corpus). For every clip of the store whose video has an RGB-D folder, the ground truth is brought
into the teacher's conventions for the clip's own sampled frames (`corpus.ground_truth`) and the
stored labels are scored against it with `eval geometry`'s metrics (`student.metrics`):

- depth: AbsRel and delta<1.25 after per-frame median alignment, over pixels with ground-truth depth;
- cameras: relative-pose rotation and translation-direction errors of all frame pairs, AUC@30;
- scale: |log(stored scale) - log(ground-truth factor)| (metres per normalised unit), on clips whose
  stored scale is valid.

Reported per clip, per dataset (the first folder of the video path, e.g. `scannet`) and overall.
Clips without an RGB-D folder are counted; an unusable folder is counted and named. Output:
`label_quality.json`, `label_quality.md` and `label_quality.png`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from geovr.corpus.ground_truth import GroundTruthError, ground_truth_clip
from geovr.eval.geometry_metrics import clip_metrics, summarize
from geovr.teacher_cache.schema import ClipLabels

METRICS = (
    "depth_abs_rel",
    "depth_delta1",
    "rotation_error_deg",
    "translation_error_deg",
    "pose_auc30",
    "static_pair_fraction",
    "scale_log_error",
)


def dataset_of(video: str) -> str:
    """The dataset of a corpus-relative video path: its first folder ("." for a top-level video)."""
    parts = Path(video).parts
    return parts[0] if len(parts) > 1 else "."


def labels_against_truth(labels: ClipLabels, truth: ClipLabels) -> dict[str, Any]:
    """The metrics of the module docstring of one clip's stored labels against its ground truth."""
    scale = labels.scale if labels.scale_valid else None
    metrics = clip_metrics(truth, pose_enc=labels.pose_enc, depth=labels.depth, scale=scale)
    return {"video": labels.video, "dataset": dataset_of(labels.video), **metrics}


def label_quality(
    store: str | Path, corpus_root: str | Path, out: str | Path, limit: int | None = None
) -> dict[str, Any]:
    """Score the store's labels against ground truth (module docstring); writes the three files."""
    from geovr.teacher_cache.store import open_store

    reader = open_store(store)
    clips, without, unusable = [], 0, []
    for clip_id in reader.clip_ids()[: limit if limit is not None else None]:
        labels = reader.read_clip(clip_id)
        try:
            truth = ground_truth_clip(labels, corpus_root)
        except GroundTruthError as err:
            unusable.append({"clip_id": clip_id, "video": labels.video, "problem": str(err)})
            continue
        if truth is None:
            without += 1
            continue
        clips.append(
            {**labels_against_truth(labels, truth), "label_sources": labels.meta.get("label_sources")}
        )
    if not clips:
        raise ValueError(f"{store}: no clip has usable ground truth under {corpus_root}")
    datasets = sorted({c["dataset"] for c in clips})
    report = {
        "store": str(store),
        "corpus_root": str(corpus_root),
        "num_clips": len(clips),
        "clips_without_ground_truth": without,
        "clips_with_unusable_ground_truth": unusable,
        "metrics": summarize(clips),
        "datasets": {name: summarize([c for c in clips if c["dataset"] == name]) for name in datasets},
        "clips": clips,
    }
    write_report(report, Path(out))
    return report


def write_report(report: dict[str, Any], out: Path) -> None:
    """label_quality.json (non-finite values as null), label_quality.md and label_quality.png."""
    out.mkdir(parents=True, exist_ok=True)
    clean = [
        {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in c.items()}
        for c in report["clips"]
    ]
    (out / "label_quality.json").write_text(json.dumps({**report, "clips": clean}, indent=1) + "\n")
    (out / "label_quality.md").write_text(quality_table(report))
    quality_figure(report, out / "label_quality.png")


def quality_table(report: dict[str, Any]) -> str:
    """Markdown: one row per dataset and overall, one column per metric."""
    lines = [
        f"# Labels of {report['store']} against ground truth ({report['num_clips']} clips; "
        f"{report['clips_without_ground_truth']} without ground truth, "
        f"{len(report['clips_with_unusable_ground_truth'])} with unusable ground truth)",
        "",
        "| dataset | " + " | ".join(METRICS) + " |",
        "|---|" + "---:|" * len(METRICS),
    ]
    rows = [*report["datasets"].items(), ("all", report["metrics"])]
    for name, values in rows:
        lines.append(f"| {name} | " + " | ".join(_cell(values.get(m)) for m in METRICS) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def quality_figure(report: dict[str, Any], path: Path) -> None:
    """One panel per metric: each clip's value (dots) and the dataset mean (bar), by dataset."""
    datasets = list(report["datasets"])
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.0 * len(METRICS), 3.2), layout="constrained")
    for ax, metric in zip(axes, METRICS, strict=True):
        for x, name in enumerate(datasets):
            values = [
                c[metric]
                for c in report["clips"]
                if c["dataset"] == name and isinstance(c.get(metric), float)
            ]
            ax.bar(x, report["datasets"][name].get(metric, 0.0), color="#9ecae1")
            ax.scatter([x] * len(values), values, s=10, color="#08519c", zorder=3)
        ax.set_xticks(range(len(datasets)), datasets, fontsize=8)
        ax.set_title(metric, fontsize=9)
    fig.suptitle(
        f"labels of {Path(report['store']).name} against ground truth ({report['num_clips']} clips)",
        fontsize=10,
    )
    fig.savefig(path, dpi=90)
    plt.close(fig)


def predictions_against_truth(
    labels: ClipLabels, predictions: dict[str, Any], corpus_root: str | Path
) -> dict[str, Any]:
    """`eval geometry --corpus-root`: a student's depth, cameras and scale on a stored clip against the
    clip's ground truth, as `gt_<metric>` (empty when the video has none; `gt_problem` when unusable)."""
    try:
        truth = ground_truth_clip(labels, corpus_root)
    except GroundTruthError as err:
        return {"gt_problem": str(err)}
    if truth is None:
        return {}
    geometric = {k: v for k, v in predictions.items() if k in ("pose_enc", "depth", "scale")}
    metrics = clip_metrics(truth, **geometric)
    return {f"gt_{k}": v for k, v in metrics.items() if k not in ("clip_id", "num_frames")}


# The student output that predicts each label field (`schema.LABEL_FIELDS`).
FIELD_OUTPUTS = {"depth": "depth", "camera": "pose_enc", "scale": "scale"}


def predictions_against_stored_truth(labels: ClipLabels, predictions: dict[str, Any]) -> dict[str, Any]:
    """`eval geometry` on a store that keeps ground truth beside the teacher's labels (source "both",
    `ClipLabels.ground_truth`): the student's predictions of the fields the clip holds ground truth
    for, against it, as `gt_<metric>` (empty for a clip without: it fell back to the teacher)."""
    if labels.ground_truth is None:
        return {}
    truth = dataclasses.replace(labels, **labels.ground_truth)
    outputs = [FIELD_OUTPUTS[name] for name in labels.ground_truth_fields]
    metrics = clip_metrics(truth, **{name: predictions.get(name) for name in outputs})
    return {f"gt_{k}": v for k, v in metrics.items() if k not in ("clip_id", "num_frames")}
