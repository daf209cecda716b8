"""Ground-truth labels from RGB-D folders (`corpus.rgbd`), brought into the teacher's conventions.

For a clip whose video has an RGB-D folder, precompute can take depth, cameras and the metric scale
from the ground truth instead of the teacher (per field, `PrecomputeConfig.depth_source`,
`camera_source`, `scale_source`); features always come from the teacher. The stored labels are then
exactly what VGGT is trained to output (its trainer's `normalize_camera_extrinsics_and_points_batch`).
With S sampled frames k_0..k_{S-1}, the teacher image (Ht, Wt) and the cached depth grid (Hd, Wd):

- `E_s` = inverse of `pose/<k_s>.txt` (camera-from-world, metres). Relative to the first sampled
  frame: `E'_s = E_s E_0^-1`, so `E'_0 = [I | 0]`.
- Depth `D_s` = `depth/<k_s>.png` in metres, resampled to (Hd, Wd) by nearest neighbour
  (`geometry.resample_depth_nearest`); no depth (PNG 0) stays NaN (no label for that pixel).
- The factor `f` = the mean Euclidean distance from camera 0's centre of the points of every valid
  cell of every frame, unprojected with the depth intrinsics resized to (Hd, Wd)
  (`geometry.resize_intrinsic`, `geometry.normalize_clip`): VGGT's normalisation, on the cached grid.
- Stored: `extrinsic` = `E'_s` with its translation divided by f; `depth` = `D_s / f`; `depth_conf`
  = 1; `scale` = f (metres per normalised unit: metric depth = scale * depth), `scale_valid` true;
  `intrinsic` = the colour intrinsics resized from the video frame size to (Ht, Wt); `pose_enc` =
  `geometry.encode_pose(extrinsic, intrinsic, (Ht, Wt))`: translation, XYZW quaternion with w >= 0,
  fov_h, fov_w. So frame 0's pose_enc is (0, 0, 0, 0, 0, 0, 1, fov_h, fov_w).

Precompute's use of it (the per-field choice, the fallback): `pipeline.ground_truth`. A clip falls
back to the teacher (counted by precompute) when its video has no RGB-D folder, the
folder is damaged, its frame count differs from the video's, its timestamps differ from the video's
by more than half a frame, the video is rotated, a sampled frame has no pose, or no pixel has depth.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geovr.corpus.rgbd import RGBDError, RGBDScene, is_rgbd_dir, read_rgbd, rgbd_dir_for
from geovr.teacher_cache.geometry import (
    encode_pose,
    invert_extrinsic,
    normalize_clip,
    resample_depth_nearest,
    resize_intrinsic,
)
from geovr.teacher_cache.schema import LABEL_FIELD_KEYS, LABEL_FIELDS, ClipLabels

# The fields of the teacher's label dict each choice replaces (or stores beside them: "both").
REPLACED = LABEL_FIELD_KEYS
CONVENTIONS = "vggt-normalised-v1"  # the rule of the module docstring (recorded in the fingerprint)


class GroundTruthError(ValueError):
    """A clip's ground truth cannot be used; the message names the file or frame and the problem."""


@dataclass(frozen=True)
class ClipFrames:
    """What the ground truth of one clip is computed for.

    Attributes:
        frame_indices: (S,) indices of the sampled frames in the decoded video.
        timestamps: (S,) their presentation times, seconds.
        source_frames, source_fps, rotation: the video's frame count, mean frame rate and display
            rotation (precompute's clip meta).
        teacher_hw: (Ht, Wt) of the teacher image; depth_hw: (Hd, Wd) of the cached depth.
        source_hw: (H, W) of the video frames the colour intrinsics refer to.
    """

    frame_indices: np.ndarray
    timestamps: np.ndarray
    source_frames: int
    source_fps: float
    rotation: int
    teacher_hw: tuple[int, int]
    depth_hw: tuple[int, int]
    source_hw: tuple[int, int]


def find_rgbd(corpus_root: str | Path, video: str, explicit: str | None = None) -> Path | None:
    """The RGB-D folder of `video` (relative to `corpus_root`): `explicit` (the manifest's `rgbd`
    column: relative to the root, or absolute; "" = none) when given, else the naming rule
    (`corpus.rgbd.rgbd_dir_for`, for manifests without the column); None when there is none."""
    if explicit == "":
        return None
    root = Path(corpus_root)
    path = root / explicit if explicit is not None else rgbd_dir_for(root / video)
    return path if is_rgbd_dir(path) else None


def check_pairing(scene: RGBDScene, frames: ClipFrames) -> None:
    """Raise `GroundTruthError` unless the RGB-D frames are the video's frames."""
    if frames.rotation:
        raise GroundTruthError(f"{scene.root}: the video is rotated by {frames.rotation} deg at display")
    if scene.num_frames != frames.source_frames:
        raise GroundTruthError(
            f"{scene.root}: {scene.num_frames} RGB-D frames for {frames.source_frames} video frames"
        )
    if scene.timestamps is not None and frames.source_fps > 0:
        gap = np.abs(scene.timestamps[frames.frame_indices] - frames.timestamps).max()
        if gap > 0.5 / frames.source_fps:
            raise GroundTruthError(
                f"{scene.root / 'timestamps.txt'}: differs from the video's timestamps by {gap:.3f} s"
            )


def _read_frames(scene: RGBDScene, frames: ClipFrames) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, 3, 4) camera-from-world and (S, Hd, Wd) metres (NaN: no depth), float64."""
    poses, depths = [], []
    for k in frames.frame_indices.tolist():
        pose = scene.camera_to_world(k)
        if not np.isfinite(pose).all():
            raise GroundTruthError(f"{scene.root / 'pose' / f'{k}.txt'}: no pose (tracking lost)")
        poses.append(pose[:3])
        depths.append(scene.depth(k))
    extrinsic = invert_extrinsic(torch.from_numpy(np.stack(poses)))
    depth = torch.from_numpy(np.stack(depths)).double()
    return extrinsic, resample_depth_nearest(depth, frames.depth_hw)


def ground_truth_labels(scene: RGBDScene, frames: ClipFrames) -> dict[str, Any]:
    """The clip's labels from its RGB-D folder in the conventions of the module docstring:
    pose_enc (S, 9), extrinsic (S, 3, 4), intrinsic (S, 3, 3), depth and depth_conf (S, Hd, Wd)
    float32, scale (float), scale_valid. Raises `GroundTruthError` (see the module docstring)."""
    check_pairing(scene, frames)
    extrinsic, depth = _read_frames(scene, frames)
    count = len(frames.frame_indices)
    depth_k = resize_intrinsic(torch.from_numpy(scene.depth_intrinsic), scene.depth_hw, frames.depth_hw)
    valid = torch.isfinite(depth) & (depth > 0)
    if not valid.any():
        raise GroundTruthError(f"{scene.root / 'depth'}: no sampled frame has any depth")
    normalised, depth, factor = normalize_clip(extrinsic, depth, depth_k.expand(count, 3, 3), valid)
    color_k = resize_intrinsic(torch.from_numpy(scene.color_intrinsic), frames.source_hw, frames.teacher_hw)
    intrinsic = color_k.expand(count, 3, 3)
    return {
        "pose_enc": encode_pose(normalised, intrinsic, frames.teacher_hw).float().numpy(),
        "extrinsic": normalised.float().numpy(),
        "intrinsic": intrinsic.float().numpy(),
        "depth": torch.where(valid, depth, torch.nan).float().numpy(),
        "depth_conf": np.ones(depth.shape, dtype=np.float32),
        "scale": float(factor),
        "scale_valid": True,
    }


def apply_ground_truth(
    labels: dict[str, Any], truth: dict[str, Any], sources: dict[str, str]
) -> dict[str, Any]:
    """The teacher's label dict with the fields whose source is "gt" replaced by `truth`'s, and
    under "ground_truth" those of the fields whose source is "both" (`ClipLabels.ground_truth`;
    absent when none is "both")."""
    out = dict(labels)
    beside = {}
    for name, source in sources.items():
        if source in ("gt", "both"):
            (out if source == "gt" else beside).update({key: truth[key] for key in REPLACED[name]})
    if beside:
        out["ground_truth"] = beside
    return out


def clip_ground_truth(rgbd: Path, frames: ClipFrames) -> dict[str, Any]:
    """`ground_truth_labels` of the RGB-D folder `rgbd`; a damaged folder is a `GroundTruthError`."""
    try:
        return ground_truth_labels(read_rgbd(rgbd), frames)
    except RGBDError as err:
        raise GroundTruthError(str(err)) from None


def clip_frames(
    meta: dict[str, Any], frame_indices: np.ndarray, timestamps: np.ndarray, depth_hw: tuple[int, int]
) -> ClipFrames:
    """`ClipFrames` of a clip from its precompute meta (`source_size`, `source_frames`,
    `source_fps`, `rotation`, `teacher_size`), its sampled frames and its depth grid."""
    source_w, source_h = meta["source_size"]
    teacher_w, teacher_h = meta["teacher_size"]
    return ClipFrames(
        frame_indices=np.asarray(frame_indices, dtype=np.int64),
        timestamps=np.asarray(timestamps, dtype=np.float64),
        source_frames=int(meta["source_frames"]),
        source_fps=float(meta["source_fps"]),
        rotation=int(meta.get("rotation", 0)),
        teacher_hw=(int(teacher_h), int(teacher_w)),
        depth_hw=(int(depth_hw[0]), int(depth_hw[1])),
        source_hw=(int(source_h), int(source_w)),
    )


def ground_truth_clip(labels: ClipLabels, corpus_root: str | Path) -> ClipLabels | None:
    """A stored clip with its depth, cameras and scale replaced by its ground truth, in the same
    conventions (for comparisons: `eval label-quality`, `eval geometry --corpus-root`); None when its
    video has no RGB-D folder; `GroundTruthError` when the folder is unusable."""
    folder = find_rgbd(corpus_root, labels.video, labels.meta.get("rgbd"))
    if folder is None:
        return None
    frames = clip_frames(labels.meta, labels.frame_indices, labels.timestamps, labels.depth.shape[1:])
    truth = clip_ground_truth(folder, frames)
    fields = {key: truth[key] for name in LABEL_FIELDS for key in REPLACED[name]}
    return dataclasses.replace(
        labels, **fields, meta={**labels.meta, "label_sources": dict.fromkeys(LABEL_FIELDS, "gt")}
    )
