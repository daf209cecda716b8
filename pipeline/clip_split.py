"""Labelling a clip that does not fit the teacher in one call: two overlapping halves, merged back.

VGGT expresses a clip in its own frame of reference: camera 0 is the world and the scene is scaled
to VGGT's normalised units, both chosen per call. Labelling frames [0..m] and [m..S-1] separately
therefore gives two reconstructions that differ by a rigid transform *and* a scale. The shared
frame m ties them together:

- Rotation and translation: in the second half frame m is the identity camera, so its extrinsics
  are camera_j-from-camera_m; composing with the first half's camera_m-from-world gives
  camera_j-from-world in the first half's world (camera 0): `R = R_j R_m`, `t = R_j t_m + s t_j`.
- Scale: `s` is the robust least-squares fit (`geometry.fit_scale`) of the first half's depth of
  frame m against the second half's depth of frame m, over pixels confident in both (above each
  half's median confidence). Second-half translations and depths are multiplied by `s`.
- The overlap frame's labels come from the first half; `pose_enc` of second-half frames is
  re-encoded from the merged extrinsics and intrinsics; features and confidences are concatenated
  (a split clip's features saw half the clip in global attention: the clip is flagged in its
  metadata so readers can exclude split clips from feature distillation if they wish).
- Metric scale: the first half's if valid, else the second half's converted by `1/s`.

If the overlap frame has too few confident pixels to fit `s` the halves cannot be joined
faithfully and `merge_halves` raises `SplitError`: the clip is recorded as failed rather than
stored with an inconsistent geometry.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from geovr.teacher_cache.geometry import encode_pose, fit_scale

# The per-clip teacher outputs, as numpy arrays (TeacherLabels fields).
LABEL_FIELDS = ("pose_enc", "extrinsic", "intrinsic", "depth", "depth_conf", "features")


class SplitError(RuntimeError):
    """A clip could not be split or its halves could not be joined faithfully."""


def split_point(num_frames: int) -> int:
    """Index m of the overlap frame: halves [0..m] and [m..S-1], each shorter than the clip."""
    if num_frames < 3:
        raise SplitError(f"a clip of {num_frames} frames cannot be split into two shorter overlapping halves")
    return (num_frames - 1) // 2


def labels_to_dict(labels: Any) -> dict[str, Any]:
    """A `TeacherLabels` (or a dict of its fields) as a plain dict of numpy arrays and scalars."""
    get = labels.get if isinstance(labels, dict) else lambda name: getattr(labels, name)
    out = {name: np.asarray(get(name)) for name in LABEL_FIELDS}
    out["scale"] = float(get("scale"))
    out["scale_valid"] = bool(get("scale_valid"))
    out["teacher_hw"] = tuple(int(v) for v in get("teacher_hw"))
    if get("fusion") is not None:
        out["fusion"] = np.asarray(get("fusion"))
    return out


def merge_halves(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Join the labels of frames [0..m] (`first`) and [m..S-1] (`second`) into labels of [0..S-1].

    Both are `labels_to_dict` outputs; the result has the same keys plus `split`, a JSON-able
    list of records {"overlap_frame": m, "scale_second_to_first": s}, one per join, this one first
    (records of halves that were split again follow; their frame numbers count within that half).
    """
    m = first["extrinsic"].shape[0] - 1
    conf_a, conf_b = first["depth_conf"][m], second["depth_conf"][0]
    mask = (conf_a > np.median(conf_a)) & (conf_b > np.median(conf_b))
    scale, valid = fit_scale(
        torch.from_numpy(second["depth"][0]).double(),
        torch.from_numpy(first["depth"][m]).double(),
        torch.from_numpy(mask),
    )
    s = float(scale)
    if not bool(valid) or not np.isfinite(s) or s <= 0:
        raise SplitError(
            f"the overlap frame {m} has too few confident pixels to align the two halves of the clip"
        )

    cam_m = first["extrinsic"][m].astype(np.float64)
    rot_m, trans_m = cam_m[:, :3], cam_m[:, 3]
    ext_b = second["extrinsic"][1:].astype(np.float64)
    rot = ext_b[:, :, :3] @ rot_m
    trans = np.einsum("sij,j->si", ext_b[:, :, :3], trans_m) + s * ext_b[:, :, 3]
    extrinsic_b = np.concatenate([rot, trans[:, :, None]], axis=-1)
    intrinsic_b = second["intrinsic"][1:]
    pose_b = encode_pose(
        torch.from_numpy(extrinsic_b), torch.from_numpy(intrinsic_b.astype(np.float64)), first["teacher_hw"]
    ).numpy()

    if first["scale_valid"]:
        metric, metric_valid = first["scale"], True
    elif second["scale_valid"]:
        metric, metric_valid = second["scale"] / s, True
    else:
        metric, metric_valid = float("nan"), False

    def cat(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.concatenate([a, b.astype(a.dtype)], axis=0)

    records = [{"overlap_frame": m, "scale_second_to_first": s}]
    return {
        "pose_enc": cat(first["pose_enc"], pose_b),
        "extrinsic": cat(first["extrinsic"], extrinsic_b),
        "intrinsic": cat(first["intrinsic"], intrinsic_b),
        "depth": cat(first["depth"], s * second["depth"][1:]),
        "depth_conf": cat(first["depth_conf"], second["depth_conf"][1:]),
        "features": cat(first["features"], second["features"][1:]),
        "scale": float(metric),
        "scale_valid": metric_valid,
        "teacher_hw": first["teacher_hw"],
        "split": records + first.get("split", []) + second.get("split", []),
    }
