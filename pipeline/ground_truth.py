"""Precompute's ground-truth label source: per label field (depth, camera, scale) the teacher's
output or the clip's RGB-D ground truth in the teacher's conventions (`corpus.ground_truth`, which
states them), with the fallback to the teacher for clips without usable ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from geovr.corpus.ground_truth import (
    LABEL_FIELDS,
    ClipFrames,
    GroundTruthError,
    apply_ground_truth,
    clip_ground_truth,
    find_rgbd,
)


@dataclass
class GroundTruthResult:
    """Labels of one clip after the ground-truth choice.

    Attributes:
        labels: the teacher's label dict with the "gt" fields replaced, and the "both" fields'
            ground truth under "ground_truth" (`corpus.ground_truth.apply_ground_truth`).
        sources: per field (depth, camera, scale) where the stored value came from: "gt",
            "teacher" or "both" (recorded in the clip's meta as `label_sources`).
        fallback: "" when every field asked for came from the ground truth; else why the clip fell
            back to the teacher ("no RGB-D folder" or the problem of its folder).
        problem: whether the fallback is a problem with an existing folder (reported) rather than
            a video without ground truth (counted only).
    """

    labels: dict[str, Any]
    sources: dict[str, str]
    fallback: str = ""
    problem: bool = False


def with_ground_truth(
    corpus_root: str, sources: dict[str, str], video: str, rgbd: str | None, frames: ClipFrames,
    labels: dict[str, Any],
) -> GroundTruthResult:  # fmt: skip
    """Replace the fields whose source is "gt" by the clip's ground truth and add that of the fields
    whose source is "both", or fall back to the teacher (every field "teacher", no ground truth)."""
    teacher = dict.fromkeys(LABEL_FIELDS, "teacher")
    if all(source == "teacher" for source in sources.values()):
        return GroundTruthResult(labels, teacher)
    folder = find_rgbd(corpus_root, video, rgbd)
    if folder is None:
        return GroundTruthResult(labels, teacher, "no RGB-D folder")
    try:
        truth = clip_ground_truth(folder, frames)
    except GroundTruthError as err:
        return GroundTruthResult(labels, teacher, str(err), problem=True)
    chosen = {name: sources.get(name, "teacher") for name in LABEL_FIELDS}
    return GroundTruthResult(apply_ground_truth(labels, truth, chosen), chosen)
