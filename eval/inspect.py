"""`inspect`: pictures of what the teacher labels (and, given a model, the student) say about a clip.

Writes under OUT:
- `depth_panels.png`: up to 8 frames of the clip (columns); rows: the frame, the teacher depth, and
  with a model the student depth (median-aligned to the teacher per frame, same colour scale) and
  its relative error |aligned - teacher| / teacher (0 to 50 %).
- `trajectory.png`: top-down view of the camera centres in frame 0's camera coordinates (x right,
  z forward; y, the camera's down axis, is dropped), with each camera's viewing direction; teacher,
  and student when a model is given. Units: metres when the clip has a valid metric scale, else the
  teacher's normalised units.
- `points_teacher.ply` (and `points_student.ply` with a model): coloured point clouds unprojected
  from the depth maps with the cameras (binary little-endian PLY, x y z float32 + red green blue
  uint8), in the same units as the trajectory; the least confident quarter of teacher pixels and
  non-finite depths are dropped, at most `max_points` points are kept. A student with depth and
  cameras: its cloud is its depth composed with its own cameras, aligned by one median depth ratio
  per clip (`eval.reconstruction`, what `eval geometry` scores), over the pixels with teacher depth.
- `reconstruction.png` (a model with depth and cameras): the teacher's and the student's clouds
  (same pixels) rendered from one viewpoint behind and above frame 0's camera, and both overlaid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from geovr.eval.geometry_metrics import load_student, predict_clip, teacher_image_hw
from geovr.eval.reconstruction import aligned_clouds, cloud_metrics, render_clouds
from geovr.teacher_cache.frames import decode_jpeg, resize_frames
from geovr.teacher_cache.geometry import decode_pose, invert_extrinsic, relative_to_first, unproject_to_world

MAX_PANEL_FRAMES = 8


def depth_intrinsic(
    intrinsic: np.ndarray, image_hw: tuple[int, int], depth_hw: tuple[int, int]
) -> np.ndarray:
    """(S, 3, 3) intrinsics of the teacher image rescaled to the depth map (principal point at centre)."""
    out = np.array(intrinsic, dtype=np.float64, copy=True)
    out[:, 0, 0] *= depth_hw[1] / image_hw[1]
    out[:, 1, 1] *= depth_hw[0] / image_hw[0]
    out[:, 0, 2] = depth_hw[1] / 2
    out[:, 1, 2] = depth_hw[0] / 2
    return out


def camera_centers(extrinsic: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centres (S, 3) and viewing directions (S, 3) of camera-from-world extrinsics (S, 3, 4)."""
    world_from_camera = invert_extrinsic(torch.from_numpy(np.asarray(extrinsic, dtype=np.float64))).numpy()
    return world_from_camera[:, :, 3], world_from_camera[:, :, 2]


def point_cloud(
    depth: np.ndarray,
    extrinsic: np.ndarray,
    intrinsic: np.ndarray,
    colors: np.ndarray,
    keep: np.ndarray,
    max_points: int,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """World points (N, 3) float32 and colours (N, 3) uint8 of the pixels in `keep` (S, H, W)."""
    points = unproject_to_world(
        torch.from_numpy(depth.astype(np.float64)),
        torch.from_numpy(np.asarray(extrinsic, dtype=np.float64)),
        torch.from_numpy(intrinsic),
    ).numpy()
    keep = keep & np.isfinite(depth) & (depth > 0)
    points, colors = points[keep], colors[keep]
    if len(points) > max_points:
        choice = np.sort(np.random.default_rng(seed).choice(len(points), max_points, replace=False))
        points, colors = points[choice], colors[choice]
    return points.astype(np.float32), colors.astype(np.uint8)


def write_ply(path: Path, points: np.ndarray, colors: np.ndarray, comment: str = "") -> None:
    """Binary little-endian PLY with float32 x y z and uint8 red green blue per vertex."""
    vertex = np.empty(
        len(points),
        dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")],
    )
    for i, axis in enumerate("xyz"):
        vertex[axis] = points[:, i]
    for i, channel in enumerate(("red", "green", "blue")):
        vertex[channel] = colors[:, i]
    header = ["ply", "format binary_little_endian 1.0"]
    header += [f"comment {comment}"] if comment else []
    header += [f"element vertex {len(points)}"]
    header += [f"property float {a}" for a in "xyz"] + [
        f"property uchar {c}" for c in ("red", "green", "blue")
    ]
    header += ["end_header"]
    with path.open("wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(vertex.tobytes())


def read_ply(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Points (N, 3) and colours (N, 3) of a PLY written by `write_ply`."""
    data = path.read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    count = next(
        int(line.split()[-1])
        for line in data[:end].decode().splitlines()
        if line.startswith("element vertex")
    )
    dtype = [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")]
    vertex = np.frombuffer(data[end:], dtype=dtype, count=count)
    return np.stack([vertex[a] for a in "xyz"], -1), np.stack(
        [vertex[c] for c in ("red", "green", "blue")], -1
    )


def _aligned(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-frame median alignment of (S, H, W) `pred` to `target` (NaN where either is invalid)."""
    out = np.full_like(pred, np.nan, dtype=np.float64)
    for i, (p, t) in enumerate(zip(pred, target, strict=True)):
        mask = np.isfinite(p) & (p > 0) & np.isfinite(t) & (t > 0)
        if mask.any():
            out[i] = np.where(mask, p * np.median(t[mask]) / np.median(p[mask]), np.nan)
    return out


def depth_panels(
    path: Path, frames: np.ndarray, teacher: np.ndarray, student: np.ndarray | None, title: str, units: str,
    label: str = "teacher depth",
) -> None:  # fmt: skip
    """The panel PNG: frames (S, H, W, 3), the stored depth (S, Hd, Wd) (row name `label`: "true
    depth" for ground-truth labels), optional aligned student depth."""
    count = min(MAX_PANEL_FRAMES, len(frames))
    picks = np.unique(np.round(np.linspace(0, len(frames) - 1, count)).astype(int))
    rows = [("frame", None), (f"{label} ({units})", "teacher")]
    if student is not None:
        rows += [(f"student depth ({units}, aligned)", "student"), ("relative error", "error")]
    finite = teacher[np.isfinite(teacher) & (teacher > 0)]
    vmin, vmax = np.percentile(finite, [2, 98]) if finite.size else (0.0, 1.0)
    size = (2.0 * len(picks) + 1.2, 1.8 * len(rows))
    fig, axes = plt.subplots(len(rows), len(picks), figsize=size, squeeze=False, layout="constrained")
    for r, (label, kind) in enumerate(rows):
        for c, i in enumerate(picks):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if kind is None:
                ax.imshow(frames[i])
                ax.set_title(f"frame {i}", fontsize=8)
            elif kind == "error":
                error = np.abs(student[i] - teacher[i]) / teacher[i]
                image = ax.imshow(error, cmap="magma", vmin=0.0, vmax=0.5)
            else:
                depth = teacher[i] if kind == "teacher" else student[i]
                image = ax.imshow(depth, cmap="turbo", vmin=vmin, vmax=vmax)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
        if kind is not None:
            bar_label = "|err| / depth" if kind == "error" else units
            fig.colorbar(image, ax=axes[r, :].tolist(), shrink=0.9, label=bar_label)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def trajectory_plot(path: Path, cameras: dict[str, np.ndarray], title: str, units: str) -> None:
    """Top-down (x, z) plot of camera centres with viewing directions, one line per source."""
    fig, ax = plt.subplots(figsize=(5.5, 5.0))
    styles = {"teacher": ("#1f77b4", "o"), "student": ("#d62728", "^")}
    tracks = {name: camera_centers(extrinsic) for name, extrinsic in cameras.items()}
    extent = np.concatenate([centers[:, [0, 2]] for centers, _ in tracks.values()])
    length = 0.15 * max(float(np.ptp(extent, axis=0).max()), 1e-3)
    for name, (centers, directions) in tracks.items():
        color, marker = styles.get(name, ("#2ca02c", "s"))
        x, z, dx, dz = centers[:, 0], centers[:, 2], directions[:, 0] * length, directions[:, 2] * length
        ax.plot(x, z, color=color, marker=marker, markersize=3, linewidth=1, label=name)
        ax.quiver(x, z, dx, dz, color=color, angles="xy", scale_units="xy", scale=1, width=0.004, alpha=0.7)
        ax.annotate("start", (x[0], z[0]), fontsize=7, color=color)
        extent = np.concatenate([extent, np.stack([x + dx, z + dz], -1)])
    low, high = extent.min(0), extent.max(0)
    margin = 0.1 * max(float((high - low).max()), 1e-3)
    ax.set_xlim(low[0] - margin, high[0] + margin)
    ax.set_ylim(low[1] - margin, high[1] + margin)
    ax.set_xlabel(f"x (right of frame 0), {units}")
    ax.set_ylabel(f"z (forward of frame 0), {units}")
    ax.set_aspect("equal", adjustable="box")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def inspect_clip(
    store: str | Path,
    clip_id: str,
    out: str | Path,
    model: str | Path | None = None,
    device: str = "cpu",
    max_points: int = 200_000,
) -> dict[str, Path]:
    """Write the pictures and point clouds of the module docstring; returns their paths by name."""
    from geovr.teacher_cache.store import open_store

    reader = open_store(store)
    if clip_id not in set(reader.clip_ids()):
        raise ValueError(f"{store}: no clip {clip_id!r} (the store has {len(reader.clip_ids())} clips)")
    labels = reader.read_clip(clip_id)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    metric = bool(labels.scale_valid) and bool(np.isfinite(labels.scale)) and labels.scale > 0
    factor, units = (float(labels.scale), "m") if metric else (1.0, "teacher units")
    depth_hw = labels.depth.shape[1:]
    frames = np.stack([decode_jpeg(j) for j in labels.frames_jpeg])
    colors = resize_frames(frames, depth_hw)
    intrinsic = depth_intrinsic(labels.intrinsic, teacher_image_hw(labels), depth_hw)
    teacher_ext = relative_to_first(torch.from_numpy(np.asarray(labels.extrinsic, dtype=np.float64))).numpy()
    teacher_ext[:, :, 3] *= factor
    teacher_depth = labels.depth.astype(np.float64) * factor

    student_depth = student_ext = pred = None
    if model is not None:
        pred = predict_clip(*load_student(model, device), labels, device)
        if pred["depth"] is not None:
            student_depth = _aligned(pred["depth"].astype(np.float64), teacher_depth)
        if pred["pose_enc"] is not None:
            ext, _ = decode_pose(torch.from_numpy(pred["pose_enc"]).double(), teacher_image_hw(labels))
            student_ext = ext.numpy()
            student_ext[:, :, 3] *= factor

    title = f"clip {clip_id} ({labels.video}), {labels.num_frames} frames"
    paths = {"depth_panels": out / "depth_panels.png", "trajectory": out / "trajectory.png"}
    label = "true depth" if labels.meta.get("label_sources", {}).get("depth") == "gt" else "teacher depth"
    depth_panels(paths["depth_panels"], frames, teacher_depth, student_depth, title, units, label)
    cameras = {"teacher": teacher_ext} | ({"student": student_ext} if student_ext is not None else {})
    trajectory_plot(paths["trajectory"], cameras, title, units)

    confident = labels.depth_conf >= np.quantile(labels.depth_conf, 0.25)
    points, rgb = point_cloud(teacher_depth, teacher_ext, intrinsic, colors, confident, max_points)
    paths["points_teacher"] = out / "points_teacher.ply"
    write_ply(paths["points_teacher"], points, rgb, f"geovr teacher clip {clip_id} units {units}")
    if pred is not None and pred["depth"] is not None and pred["pose_enc"] is not None:
        paths |= write_reconstruction(out, pred, labels, colors, factor, units, max_points, title)
    elif student_depth is not None:
        ext = student_ext if student_ext is not None else teacher_ext
        points, rgb = point_cloud(
            student_depth, ext, intrinsic, colors, np.isfinite(student_depth), max_points
        )
        paths["points_student"] = out / "points_student.ply"
        write_ply(paths["points_student"], points, rgb, f"geovr student clip {clip_id} units {units}")
    return paths


def write_reconstruction(
    out: Path,
    pred: dict[str, Any],
    labels: Any,
    colors: np.ndarray,
    factor: float,
    units: str,
    max_points: int,
    title: str,
) -> dict[str, Path]:
    """The student's point cloud (its depth composed with its cameras, one median ratio per clip:
    `eval.reconstruction`) as `points_student.ply`, and `reconstruction.png`: the teacher's and the
    student's clouds over the same pixels, from one viewpoint, with the clip's Chamfer distance."""
    student, teacher, valid = aligned_clouds(pred["depth"], pred["pose_enc"], labels)
    rgb = colors[valid]
    metrics = cloud_metrics(student, teacher)
    paths = {"points_student": out / "points_student.ply", "reconstruction": out / "reconstruction.png"}
    keep = np.arange(len(student))
    if len(keep) > max_points:
        keep = np.sort(np.random.default_rng(0).choice(len(keep), max_points, replace=False))
    comment = f"geovr student clip {labels.clip_id} units {units} (depth and cameras, clip-median aligned)"
    write_ply(paths["points_student"], (student[keep] * factor).astype(np.float32), rgb[keep], comment)
    chamfer = metrics.get("recon_chamfer", float("nan"))
    clouds = {"teacher": (teacher[keep] * factor, rgb[keep]), "student": (student[keep] * factor, rgb[keep])}
    render_clouds(paths["reconstruction"], clouds, f"{title}; Chamfer {chamfer:.4f} (teacher units)")
    return paths


def describe(paths: dict[str, Any]) -> str:
    """One line per written file, for the CLI."""
    return "\n".join(f"{name:<16} {path}" for name, path in paths.items())
