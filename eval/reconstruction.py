"""The student's 3D reconstruction of a clip against the teacher's, as numbers and as a picture.

Both clouds are in frame 0's camera frame: the teacher's is its cached depth unprojected with its
cached cameras (`student.point_map.label_points`, the point-map target); the student's is its depth
composed with its own cameras (`point_map.compose_points`, what the point-map objective trains),
over the pixels where the teacher depth is finite and positive. The student's cloud is aligned to
the teacher's by one median ratio per clip, s = median(teacher depth) / median(student depth) over
those pixels, applied to its depth and translations, i.e. to its points (per-frame factors, as the
depth metric uses, would tear a multi-view cloud apart). Units: the teacher's normalised ones (mean
point distance 1 over the clip).

Metrics (DTU / Spann3R convention; P the student's points, G the teacher's, d(x, Y) = min_y ||x - y||,
at most `MAX_POINTS` random points per cloud, exact nearest neighbours from a k-d tree):
    recon_accuracy     = mean_{p in P} d(p, G)          (prediction -> reference)
    recon_completeness = mean_{g in G} d(g, P)          (reference -> prediction)
    recon_chamfer      = (accuracy + completeness) / 2
    recon_precision@τ  = frac_{p in P} d(p, G) < τ,  recon_recall@τ = frac_{g in G} d(g, P) < τ,
    recon_fscore@τ     = 2 P R / (P + R),  τ = `THRESHOLD` = 0.05 normalised units.

`render_clouds` draws both clouds from one viewpoint (a numpy z-buffer splat, shown with matplotlib,
which `inspect` already uses), so that no external viewer is needed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree

from geovr.student.point_map import compose_points, label_points
from geovr.teacher_cache.schema import ClipLabels

THRESHOLD = 0.05
MAX_POINTS = 20_000


def aligned_clouds(
    depth: np.ndarray, pose_enc: np.ndarray, labels: ClipLabels
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The student's aligned cloud and the teacher's, over the same pixels (module docstring).

    Args:
        depth: (S, Hd, Wd) student depth; pose_enc: (S, 9) student cameras relative to frame 0.

    Returns:
        student points (N, 3), teacher points (N, 3) float64, and the (S, Hd, Wd) bool mask of the
        N pixels (teacher depth finite positive, student depth finite positive).
    """
    teacher, valid = label_points(labels)
    student_depth = torch.from_numpy(np.asarray(depth, dtype=np.float64))
    valid = valid & torch.isfinite(student_depth) & (student_depth > 0)
    if not valid.any():
        return np.zeros((0, 3)), np.zeros((0, 3)), valid.numpy()
    teacher_depth = torch.from_numpy(np.asarray(labels.depth, dtype=np.float64))
    ratio = teacher_depth[valid].median() / student_depth[valid].median()
    student = compose_points(student_depth.nan_to_num(0.0), torch.from_numpy(pose_enc).double()) * ratio
    return student[valid].numpy(), teacher[valid].numpy(), valid.numpy()


def nearest_distances(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(N,) distance of each source point (N, 3) to its nearest target point (M, 3), exact.

    A k-d tree: a chunked float64 `cdist` was over 100x slower at `MAX_POINTS` per cloud and made
    label quality and `eval geometry` take seconds per clip."""
    distances, _ = cKDTree(np.asarray(target, dtype=np.float64)).query(np.asarray(source, dtype=np.float64))
    return distances


def subsample(points: np.ndarray, limit: int = MAX_POINTS, seed: int = 0) -> np.ndarray:
    """At most `limit` of the (N, 3) points, drawn without replacement (a fixed seed)."""
    if len(points) <= limit:
        return points
    return points[np.sort(np.random.default_rng(seed).choice(len(points), limit, replace=False))]


def cloud_metrics(student: np.ndarray, teacher: np.ndarray, threshold: float = THRESHOLD) -> dict[str, float]:
    """The reconstruction metrics of the module docstring for two (N, 3), (M, 3) clouds."""
    if len(student) == 0 or len(teacher) == 0:
        return {}
    student, teacher = subsample(student, seed=0), subsample(teacher, seed=1)
    to_teacher = nearest_distances(student, teacher)
    to_student = nearest_distances(teacher, student)
    precision = float((to_teacher < threshold).mean())
    recall = float((to_student < threshold).mean())
    accuracy, completeness = float(to_teacher.mean()), float(to_student.mean())
    at = f"@{threshold:g}"
    return {
        "recon_accuracy": accuracy,
        "recon_completeness": completeness,
        "recon_chamfer": (accuracy + completeness) / 2,
        f"recon_precision{at}": precision,
        f"recon_recall{at}": recall,
        f"recon_fscore{at}": 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0,
    }


def reconstruction_metrics(depth: np.ndarray, pose_enc: np.ndarray, labels: ClipLabels) -> dict[str, float]:
    """One clip's reconstruction metrics from the student's depth (S, Hd, Wd) and cameras (S, 9)."""
    student, teacher, _ = aligned_clouds(depth, pose_enc, labels)
    return cloud_metrics(student, teacher)


# ----------------------------------------------------------------------------------------------
# A picture of both clouds from one viewpoint

RENDER_HW = (240, 320)
RENDER_FOV = math.radians(60.0)


def common_view(reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A viewpoint that frames `reference` (N, 3): behind and above frame 0's camera, looking at the
    cloud's median point. Returns (eye (3,), rotation (3, 3): rows = the view's x right, y down,
    z forward, in frame 0's coordinates)."""
    center = np.median(reference, axis=0)
    radius = float(np.median(np.linalg.norm(reference - center, axis=1))) or 1.0
    eye = np.array([0.0, -0.8 * radius, -1.2 * radius])
    forward = (center - eye) / np.linalg.norm(center - eye)
    down = np.array([0.0, 1.0, 0.0]) - forward[1] * forward
    down /= np.linalg.norm(down)
    return eye, np.stack((np.cross(down, forward), down, forward))


def splat(
    points: np.ndarray, colors: np.ndarray, eye: np.ndarray, rotation: np.ndarray, size: int = 2
) -> np.ndarray:
    """(H, W, 3) uint8 image of coloured points (N, 3), (N, 3) seen from (eye, rotation) with a
    `RENDER_FOV` pinhole: each point covers size x size pixels, the nearest point wins (z-buffer)."""
    height, width = RENDER_HW
    image = np.full((height, width, 3), 255, dtype=np.uint8)
    camera = (points - eye) @ rotation.T
    front = camera[:, 2] > 1e-6
    camera, colors = camera[front], colors[front]
    focal = (width / 2) / math.tan(RENDER_FOV / 2)
    u = np.floor(focal * camera[:, 0] / camera[:, 2] + width / 2).astype(np.int64)
    v = np.floor(focal * camera[:, 1] / camera[:, 2] + height / 2).astype(np.int64)
    offsets = [(du, dv) for du in range(size) for dv in range(size)]
    us = np.concatenate([u + du for du, _ in offsets])
    vs = np.concatenate([v + dv for _, dv in offsets])
    depth = np.tile(camera[:, 2], len(offsets))
    rgb = np.tile(colors, (len(offsets), 1))
    inside = (us >= 0) & (us < width) & (vs >= 0) & (vs < height)
    pixel, depth, rgb = vs[inside] * width + us[inside], depth[inside], rgb[inside]
    order = np.lexsort((depth, pixel))  # by pixel, nearest first
    first = order[np.unique(pixel[order], return_index=True)[1]]
    image.reshape(-1, 3)[pixel[first]] = rgb[first]
    return image


def render_clouds(path: Path, clouds: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> None:
    """PNG of each named cloud ((N, 3) points, (N, 3) uint8 colours) from the common view of the
    first one, plus an overlay of the first two (first blue, second red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(clouds)
    eye, rotation = common_view(clouds[names[0]][0])
    panels = [(name, splat(*clouds[name], eye, rotation)) for name in names]
    if len(names) >= 2:
        tints = [
            np.full_like(clouds[n][1], c)
            for n, c in zip(names[:2], ((31, 119, 180), (214, 39, 40)), strict=True)
        ]
        points = np.concatenate([clouds[n][0] for n in names[:2]])
        panels.append(
            (f"{names[0]} (blue) and {names[1]} (red)", splat(points, np.concatenate(tints), eye, rotation))
        )
    fig, axes = plt.subplots(
        1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False, layout="constrained"
    )
    for ax, (name, image) in zip(axes[0], panels, strict=True):
        ax.imshow(image)
        ax.set_title(name, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=90)
    plt.close(fig)
