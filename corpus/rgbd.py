"""RGB-D scene folders: the layout of ScanNet's frame export (SensReader), read and written.

A video with ground-truth geometry has an RGB-D folder; by the naming rule it sits beside the video
and is named by the video's stem (`scannet/scene0000_00.mp4` -> `scannet/scene0000_00/`), or a
manifest names it explicitly. Layout (frame `i` = the video's i-th decoded frame, no zero padding):

    <scene>/depth/<i>.png                 uint16 PNG, depth in millimetres (camera z), 0 = no depth
    <scene>/pose/<i>.txt                  4x4 camera-to-world, metres, OpenCV camera axes (x right,
                                          y down, z forward), 4 whitespace-separated rows; a
                                          non-finite matrix (`-inf`, ScanNet's lost tracking) marks
                                          a frame without a pose
    <scene>/intrinsic/intrinsic_depth.txt 4x4 `[K 0; 0 1]` of the depth images, pixels
    <scene>/intrinsic/intrinsic_color.txt 4x4 `[K 0; 0 1]` of the colour images = the video frames
    <scene>/timestamps.txt                optional: one presentation time per frame, seconds
    <scene>/color/<i>.jpg                 optional (ScanNet has it; the video is what is read)

Depth and colour are registered (same viewpoint, ScanNet's `extrinsic_*.txt` are not applied):
only the intrinsics differ. Without `timestamps.txt` frame i is at i / fps of the paired video.
Mapping ARKitScenes and ScanNet++ exports onto this layout: `docs/rgbd_layout.md`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

DEPTH_UNIT_M = 0.001  # one PNG step is a millimetre
_INDEX = re.compile(r"^(\d+)\.(png|txt)$")


class RGBDError(ValueError):
    """An RGB-D folder is missing or damaged; the message names the file and the problem."""


def rgbd_dir_for(video: str | Path) -> Path:
    """The naming rule: the RGB-D folder of `video` is the sibling folder named by its stem."""
    video = Path(video)
    return video.with_name(video.stem)


def is_rgbd_dir(path: str | Path) -> bool:
    """Whether `path` looks like an RGB-D folder (has `depth/` and `pose/`)."""
    path = Path(path)
    return (path / "depth").is_dir() and (path / "pose").is_dir()


def _indexed(folder: Path, suffix: str) -> list[int]:
    if not folder.is_dir():
        raise RGBDError(f"{folder}: missing")
    found = [_INDEX.match(p.name) for p in folder.iterdir()]
    return sorted(int(m.group(1)) for m in found if m and m.group(2) == suffix)


def read_matrix(path: Path) -> np.ndarray:
    """A 4x4 text matrix as float64 (non-finite values kept: they mark a lost pose)."""
    try:
        matrix = np.loadtxt(path, dtype=np.float64)
    except (OSError, ValueError) as err:
        raise RGBDError(f"{path}: unreadable matrix ({err})") from None
    if matrix.shape != (4, 4):
        raise RGBDError(f"{path}: expected a 4x4 matrix, found shape {matrix.shape}")
    return matrix


@dataclass
class RGBDScene:
    """One RGB-D folder (see the module docstring), frames read on demand.

    Attributes:
        root: the folder.
        num_frames: N, the frames of `depth/` and `pose/` (numbered 0..N-1).
        depth_intrinsic, color_intrinsic: (3, 3) float64 pinholes of the depth and colour images.
        depth_hw: (H, W) of the depth PNGs.
        timestamps: (N,) float64 seconds, or None without `timestamps.txt`.
    """

    root: Path
    num_frames: int
    depth_intrinsic: np.ndarray
    color_intrinsic: np.ndarray
    depth_hw: tuple[int, int]
    timestamps: np.ndarray | None

    def depth(self, index: int) -> np.ndarray:
        """(H, W) float32 metres of frame `index`; NaN where the PNG holds 0 (no depth)."""
        path = self.root / "depth" / f"{index}.png"
        try:
            with Image.open(path) as image:
                raw = np.asarray(image)
        except OSError as err:
            raise RGBDError(f"{path}: unreadable depth PNG ({err})") from None
        if raw.dtype != np.uint16 or raw.shape != self.depth_hw:
            raise RGBDError(f"{path}: expected uint16 {self.depth_hw}, found {raw.dtype} {raw.shape}")
        depth = raw.astype(np.float32) * np.float32(DEPTH_UNIT_M)
        depth[raw == 0] = np.nan
        return depth

    def camera_to_world(self, index: int) -> np.ndarray:
        """(4, 4) float64 camera-to-world of frame `index` (non-finite when the pose was lost)."""
        return read_matrix(self.root / "pose" / f"{index}.txt")


def read_rgbd(root: str | Path) -> RGBDScene:
    """Open an RGB-D folder; raises `RGBDError` naming the file when it is incomplete."""
    root = Path(root)
    depth_ids, pose_ids = _indexed(root / "depth", "png"), _indexed(root / "pose", "txt")
    if not depth_ids or depth_ids != list(range(len(depth_ids))):
        raise RGBDError(f"{root / 'depth'}: frames must be 0.png .. N-1.png without gaps")
    if pose_ids != depth_ids:
        raise RGBDError(f"{root / 'pose'}: {len(pose_ids)} poses for {len(depth_ids)} depth frames")
    intrinsics = [read_matrix(root / "intrinsic" / f"intrinsic_{k}.txt")[:3, :3] for k in ("depth", "color")]
    timestamps = None
    stamps_path = root / "timestamps.txt"
    if stamps_path.is_file():
        timestamps = np.loadtxt(stamps_path, dtype=np.float64, ndmin=1)
        if timestamps.shape != (len(depth_ids),):
            raise RGBDError(f"{stamps_path}: {timestamps.shape[0]} times for {len(depth_ids)} frames")
    with Image.open(root / "depth" / "0.png") as first:
        depth_hw = (first.height, first.width)
    return RGBDScene(root, len(depth_ids), intrinsics[0], intrinsics[1], depth_hw, timestamps)


def _homogeneous_intrinsic(intrinsic: np.ndarray) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = intrinsic
    return matrix


def write_rgbd(
    root: str | Path,
    depth_m: np.ndarray,
    extrinsic: np.ndarray,
    intrinsic: np.ndarray,
    timestamps: np.ndarray | None = None,
) -> None:
    """Write frames in the layout (depth and colour registered, one pinhole for both).

    Args:
        depth_m: (N, H, W) metres; non-finite or non-positive values are written as 0 (no depth);
            rounded to the millimetre (at most 0.5 mm error), at most 65.535 m.
        extrinsic: (N, 3, 4) camera-from-world (the geometry convention); written inverted, as
            camera-to-world, with 17 significant digits.
        intrinsic: (3, 3) pinhole of the depth images, which are also the colour images.
        timestamps: (N,) seconds, or None.
    """
    root = Path(root)
    for name in ("depth", "pose", "intrinsic"):
        (root / name).mkdir(parents=True, exist_ok=True)
    valid = np.isfinite(depth_m) & (depth_m > 0)
    millimetres = np.where(valid, np.rint(np.where(valid, depth_m, 0) / DEPTH_UNIT_M), 0)
    if millimetres.max() > np.iinfo(np.uint16).max:
        raise RGBDError(f"{root}: depth beyond 65.535 m cannot be written as 16-bit millimetres")
    for index, frame in enumerate(millimetres.astype(np.uint16)):
        Image.fromarray(frame).save(root / "depth" / f"{index}.png")
    for index, cam_from_world in enumerate(np.asarray(extrinsic, dtype=np.float64)):
        rotation_t = cam_from_world[:3, :3].T
        pose = np.eye(4)
        pose[:3, :3], pose[:3, 3] = rotation_t, -rotation_t @ cam_from_world[:3, 3]
        np.savetxt(root / "pose" / f"{index}.txt", pose, fmt="%.17g")
    for name in ("depth", "color"):
        np.savetxt(
            root / "intrinsic" / f"intrinsic_{name}.txt", _homogeneous_intrinsic(intrinsic), fmt="%.17g"
        )
    if timestamps is not None:
        np.savetxt(root / "timestamps.txt", np.asarray(timestamps, dtype=np.float64), fmt="%.17g")
