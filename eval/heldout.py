"""Held-out measurement of a student (the demo's before / after figures) and the predictors that see
no image, set beside it.

- `measure_student`: the student's mean losses (every objective of `student.objectives` and the
  language loss) over held-out conversations on held-out clips; per held-out clip its depth
  (`eval geometry`'s prediction path) and the unweighted parts of its camera loss.
- `depth_comparison`: depth AbsRel (and delta<1.25) against the teacher for the student and for a
  per-frame constant and the training clips' mean depth map, with the per-frame median alignment
  that `eval geometry` applies, and without alignment (the training-set mean depth).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import AutoTokenizer

from geovr.eval.geometry_metrics import predict_clip
from geovr.student.batch import camera_target, collate_samples, make_sample
from geovr.student.config import DataConfig
from geovr.student.data import QASample, join_qa
from geovr.student.label_choice import check_label_choice, choose_labels
from geovr.student.losses import camera_loss
from geovr.student.metrics import depth_metrics
from geovr.student.model import GeoVRStudent
from geovr.student.vision_inputs import VideoPreprocess
from geovr.teacher_cache.schema import ClipLabels
from geovr.teacher_cache.store import open_store


@dataclass
class HeldoutSet:
    """Held-out conversations joined with their clips, and the clips' labels by clip id (as
    `data.*_label` chooses them, `student.label_choice`); `label_fallback`: the clips whose field
    chosen "gt" has the teacher's labels (no usable ground truth in precompute)."""

    samples: list[QASample]
    clips: dict[str, ClipLabels]
    label_fallback: list[str] = field(default_factory=list)


def load_heldout(qa: Path, store: Path, data_cfg: DataConfig, rows_per_clip: int) -> HeldoutSet:
    """At most `rows_per_clip` conversations per held-out clip, spread over the clip's rows; the
    clips' labels as `data_cfg` chooses them (a choice the store cannot serve is a ValueError)."""
    reader = open_store(store)
    choice = data_cfg.label_choice()
    check_label_choice(reader.fingerprint, choice, str(store))
    samples, _ = join_qa(qa, reader, data_cfg)
    by_clip: dict[str, list[QASample]] = {}
    for sample in samples:
        by_clip.setdefault(sample.clip_id, []).append(sample)
    chosen = []
    for rows in by_clip.values():
        stride = max(1, len(rows) // rows_per_clip)
        chosen.extend(rows[::stride][:rows_per_clip])
    clips, fell_back = {}, []
    for clip_id in by_clip:
        clips[clip_id], fields = choose_labels(reader.read_clip(clip_id), choice)
        fell_back += [clip_id] if fields else []
    return HeldoutSet(chosen, clips, fell_back)


@torch.no_grad()
def measure_student(
    student: GeoVRStudent,
    heldout: HeldoutSet,
    model_dir: Path,
    max_seq_len: int,
    console: Console,
    label: str,
) -> dict[str, Any]:
    """Mean losses {lm, camera, depth, scale, distill, total} of `student` over the held-out samples;
    per held-out clip (`eval geometry`'s prediction path) its depth (S, Hd, Wd), and the unweighted
    parts of its camera loss {translation, rotation, fov} averaged over the clips."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    preprocess = VideoPreprocess.from_model_dir(
        model_dir, student.config.video_max_pixels, student.config.video_min_pixels
    )
    student.eval()
    totals: dict[str, float] = {}
    with _progress(console) as progress:
        task = progress.add_task(label, total=len(heldout.samples) + len(heldout.clips))
        for sample in heldout.samples:
            built = make_sample(
                heldout.clips[sample.clip_id], sample.messages(), tokenizer, preprocess, max_seq_len
            )
            losses = student(collate_samples([built], int(tokenizer.pad_token_id)))
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + float(value)
            progress.advance(task)
        depth, camera_parts = {}, []
        for clip_id, labels in heldout.clips.items():
            pred = predict_clip(student, tokenizer, preprocess, labels)
            depth[clip_id] = pred["depth"]
            target = camera_target(labels)[None]
            _, parts = camera_loss(
                torch.from_numpy(pred["pose_enc"])[None],
                target,
                torch.ones(target.shape[:2], dtype=torch.bool),
            )
            camera_parts.append({name: float(value) for name, value in parts.items()})
            progress.advance(task)
    losses = {name: total / len(heldout.samples) for name, total in totals.items()}
    parts = {name: float(np.mean([p[name] for p in camera_parts])) for name in camera_parts[0]}
    return {"losses": losses, "depth": depth, "camera_parts": parts}


def raw_abs_rel(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean |pred - target| / target over finite positive target pixels, no alignment."""
    mask = np.isfinite(target) & (target > 0) & np.isfinite(pred)
    return float(np.mean(np.abs(pred[mask] - target[mask]) / target[mask]))


def depth_comparison(
    student_depth: dict[str, dict[str, np.ndarray]], heldout: HeldoutSet, train_depth: list[np.ndarray]
) -> dict[str, Any]:
    """Depth AbsRel (and delta<1.25) against the teacher on the held-out clips, for the student
    (before / after) and for predictors that see no image; see the module docstring.

    Args:
        student_depth: {"before"|"after": {clip id: (S, Hd, Wd)}}.
        train_depth: the teacher depth (S, Hd, Wd) of each training clip.
    """
    mean_depth = float(np.mean(np.concatenate([d[np.isfinite(d)] for d in train_depth])))
    shapes = {d.shape[1:] for d in train_depth} | {c.depth.shape[1:] for c in heldout.clips.values()}
    mean_map = np.nanmean(np.concatenate(train_depth), axis=0) if len(shapes) == 1 else None  # NaN: no depth
    targets = {clip_id: labels.depth.astype(np.float64) for clip_id, labels in heldout.clips.items()}

    def both(predict) -> dict[str, float]:
        """Clip-averaged aligned AbsRel / delta1 (as `eval geometry`) and raw AbsRel."""
        aligned = [depth_metrics(predict(cid, t), t) for cid, t in targets.items()]
        return {
            "abs_rel_aligned": float(np.mean([m["depth_abs_rel"] for m in aligned])),
            "delta1_aligned": float(np.mean([m["depth_delta1"] for m in aligned])),
            "abs_rel_raw": float(np.mean([raw_abs_rel(predict(cid, t), t) for cid, t in targets.items()])),
        }

    predictors = {
        f"student_{when}": both(lambda cid, t, d=depths: d[cid].astype(np.float64))
        for when, depths in student_depth.items()
    }
    # Any per-frame constant, median-aligned, becomes the frame's teacher median; unaligned, the
    # constant is the training clips' mean depth.
    predictors["constant_train_mean"] = both(lambda cid, t: np.full_like(t, mean_depth))
    if mean_map is not None:
        predictors["train_mean_depth_map"] = both(lambda cid, t: np.broadcast_to(mean_map, t.shape))
    return {"train_mean_depth": mean_depth, "predictors": predictors}


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
