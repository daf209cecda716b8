"""Geometry conventions shared by every stage (teacher, cache, student, eval).

Axes and units:
- Cameras follow OpenCV: x right, y down, z forward. Depth is the z coordinate in the camera
  frame, in the units of the scene (metres for ground truth, VGGT's normalised units for teacher
  labels).
- `extrinsic` (..., 3, 4) is camera-from-world `[R | t]`: `X_cam = R @ X_world + t`.
- `intrinsic` (..., 3, 3) is a pinhole `[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]` in pixels, with
  the principal point at the image centre `(W/2, H/2)` as VGGT assumes.
- Pixel (u, v) is the integer column/row index and is unprojected at coordinate (u, v), as VGGT's
  `depth_to_cam_coords_points` does; renderers in this project use the same convention.
- `pose_enc` (..., 9) is VGGT's `absT_quaR_FoV`: translation t (3), the rotation R as a unit
  quaternion in XYZW order with w >= 0 (4), and the vertical then horizontal field of view in
  radians (2): `fov_h = 2 atan(H / (2 fy))`, `fov_w = 2 atan(W / (2 fx))`.

All functions accept float32 or float64 tensors and compute in the input dtype (use float64 for
tight round trips); they broadcast over leading dimensions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def quat_to_mat(quat: Tensor) -> Tensor:
    """XYZW quaternions (..., 4), not necessarily unit, to rotation matrices (..., 3, 3)."""
    x, y, z, w = torch.unbind(quat, -1)
    two_s = 2.0 / (quat * quat).sum(-1)
    mat = torch.stack(
        (
            1 - two_s * (y * y + z * z),
            two_s * (x * y - z * w),
            two_s * (x * z + y * w),
            two_s * (x * y + z * w),
            1 - two_s * (x * x + z * z),
            two_s * (y * z - x * w),
            two_s * (x * z - y * w),
            two_s * (y * z + x * w),
            1 - two_s * (x * x + y * y),
        ),
        -1,
    )
    return mat.reshape((*quat.shape[:-1], 3, 3))


def mat_to_quat(mat: Tensor) -> Tensor:
    """Rotation matrices (..., 3, 3) to unit XYZW quaternions (..., 4) with w >= 0.

    Picks, per matrix, the best-conditioned of the four candidate formulas (largest of w, x, y, z),
    so the result is accurate for every rotation, including ones near 180 degrees.
    """
    m = mat.reshape((*mat.shape[:-2], 9))
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = torch.unbind(m, -1)
    # 4*q_i^2 for (w, x, y, z); clamp guards tiny negative values from rounding.
    q_abs = torch.sqrt(
        torch.clamp(
            torch.stack(
                (
                    1.0 + m00 + m11 + m22,
                    1.0 + m00 - m11 - m22,
                    1.0 - m00 + m11 - m22,
                    1.0 - m00 - m11 + m22,
                ),
                -1,
            ),
            min=0.0,
        )
    )
    # Row i is the quaternion (w, x, y, z) scaled by 2*q_i, computed from the formula led by q_i.
    candidates = torch.stack(
        (
            torch.stack((q_abs[..., 0] ** 2, m21 - m12, m02 - m20, m10 - m01), -1),
            torch.stack((m21 - m12, q_abs[..., 1] ** 2, m10 + m01, m02 + m20), -1),
            torch.stack((m02 - m20, m10 + m01, q_abs[..., 2] ** 2, m12 + m21), -1),
            torch.stack((m10 - m01, m20 + m02, m21 + m12, q_abs[..., 3] ** 2), -1),
        ),
        -2,
    )
    floor = torch.tensor(0.1, dtype=q_abs.dtype, device=q_abs.device)
    candidates = candidates / (2.0 * torch.maximum(q_abs[..., None], floor))
    best = q_abs.argmax(-1)
    wxyz = torch.gather(candidates, -2, best[..., None, None].expand((*best.shape, 1, 4))).squeeze(-2)
    xyzw = torch.cat((wxyz[..., 1:], wxyz[..., :1]), -1)
    xyzw = torch.where(xyzw[..., 3:4] < 0, -xyzw, xyzw)
    return xyzw / xyzw.norm(dim=-1, keepdim=True)


def encode_pose(extrinsic: Tensor, intrinsic: Tensor, image_hw: tuple[int, int]) -> Tensor:
    """Camera-from-world extrinsics (..., 3, 4) and intrinsics (..., 3, 3) to `pose_enc` (..., 9).

    `image_hw` is the (H, W) in pixels of the image the intrinsics refer to.
    """
    height, width = image_hw
    rotation = extrinsic[..., :3, :3]
    translation = extrinsic[..., :3, 3]
    fov_h = 2.0 * torch.atan((height / 2.0) / intrinsic[..., 1, 1])
    fov_w = 2.0 * torch.atan((width / 2.0) / intrinsic[..., 0, 0])
    return torch.cat((translation, mat_to_quat(rotation), fov_h[..., None], fov_w[..., None]), -1)


def decode_pose(pose_enc: Tensor, image_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """`pose_enc` (..., 9) to (extrinsic (..., 3, 4), intrinsic (..., 3, 3)) for an (H, W) image."""
    height, width = image_hw
    translation = pose_enc[..., :3]
    rotation = quat_to_mat(pose_enc[..., 3:7])
    fy = (height / 2.0) / torch.tan(pose_enc[..., 7] / 2.0)
    fx = (width / 2.0) / torch.tan(pose_enc[..., 8] / 2.0)
    extrinsic = torch.cat((rotation, translation[..., None]), -1)
    intrinsic = torch.zeros((*pose_enc.shape[:-1], 3, 3), dtype=pose_enc.dtype, device=pose_enc.device)
    intrinsic[..., 0, 0] = fx
    intrinsic[..., 1, 1] = fy
    intrinsic[..., 0, 2] = width / 2.0
    intrinsic[..., 1, 2] = height / 2.0
    intrinsic[..., 2, 2] = 1.0
    return extrinsic, intrinsic


def to_homogeneous(extrinsic: Tensor) -> Tensor:
    """(..., 3, 4) camera-from-world to (..., 4, 4)."""
    bottom = torch.zeros((*extrinsic.shape[:-2], 1, 4), dtype=extrinsic.dtype, device=extrinsic.device)
    bottom[..., 0, 3] = 1.0
    return torch.cat((extrinsic, bottom), -2)


def invert_extrinsic(extrinsic: Tensor) -> Tensor:
    """Inverse of a rigid (..., 3, 4) transform: camera-from-world <-> world-from-camera."""
    rotation_t = extrinsic[..., :3, :3].transpose(-1, -2)
    return torch.cat((rotation_t, -(rotation_t @ extrinsic[..., :3, 3:])), -1)


def relative_to_first(extrinsic: Tensor) -> Tensor:
    """Re-express camera-from-world extrinsics (..., S, 3, 4) with frame 0's camera as the world.

    Frame 0 becomes `[I | 0]`; frame i becomes `E_i @ E_0^-1`.
    """
    first_inv = to_homogeneous(invert_extrinsic(extrinsic[..., :1, :, :]))
    return extrinsic @ first_inv


def pixel_grid(height: int, width: int, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """(H, W, 2) pixel coordinates (u, v) = (column, row) at integer positions."""
    v, u = torch.meshgrid(
        torch.arange(height, dtype=dtype, device=device),
        torch.arange(width, dtype=dtype, device=device),
        indexing="ij",
    )
    return torch.stack((u, v), -1)


def unproject_to_camera(depth: Tensor, intrinsic: Tensor) -> Tensor:
    """Depth (..., H, W) and intrinsics (..., 3, 3) to camera-frame points (..., H, W, 3)."""
    height, width = depth.shape[-2:]
    uv = pixel_grid(height, width, depth.dtype, depth.device)
    fx = intrinsic[..., 0, 0, None, None]
    fy = intrinsic[..., 1, 1, None, None]
    cx = intrinsic[..., 0, 2, None, None]
    cy = intrinsic[..., 1, 2, None, None]
    x = (uv[..., 0] - cx) / fx * depth
    y = (uv[..., 1] - cy) / fy * depth
    return torch.stack((x, y, depth), -1)


def camera_to_world(points_cam: Tensor, extrinsic: Tensor) -> Tensor:
    """Camera-frame points (..., H, W, 3) to world points with camera-from-world (..., 3, 4)."""
    rotation = extrinsic[..., None, None, :3, :3]
    translation = extrinsic[..., None, None, :3, 3]
    return ((points_cam - translation)[..., None, :] @ rotation).squeeze(-2)


def unproject_to_world(depth: Tensor, extrinsic: Tensor, intrinsic: Tensor) -> Tensor:
    """Depth (..., H, W) to world points (..., H, W, 3)."""
    return camera_to_world(unproject_to_camera(depth, intrinsic), extrinsic)


def project(points_world: Tensor, extrinsic: Tensor, intrinsic: Tensor) -> tuple[Tensor, Tensor]:
    """World points (..., N, 3) into a camera: pixel coordinates (..., N, 2) and depth (..., N)."""
    cam = points_world @ extrinsic[..., :3, :3].transpose(-1, -2) + extrinsic[..., None, :3, 3]
    z = cam[..., 2]
    u = intrinsic[..., 0, 0, None] * cam[..., 0] / z + intrinsic[..., 0, 2, None]
    v = intrinsic[..., 1, 1, None] * cam[..., 1] / z + intrinsic[..., 1, 2, None]
    return torch.stack((u, v), -1), z


def normalize_clip(
    extrinsic: Tensor, depth: Tensor, intrinsic: Tensor, valid: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Express a clip in VGGT's normalised frame: camera 0 is the world, mean point distance is 1.

    Args:
        extrinsic: (S, 3, 4) camera-from-world.
        depth: (S, H, W) depth in scene units.
        intrinsic: (S, 3, 3).
        valid: optional (S, H, W) bool mask of pixels with depth.

    Returns:
        extrinsic (S, 3, 4) relative to frame 0 with translations divided by the factor, depth
        (S, H, W) divided by the factor, and the factor (scalar tensor, scene units per
        normalised unit): the mean distance of the valid points from camera 0.
    """
    relative = relative_to_first(extrinsic)
    points = unproject_to_world(depth, relative, intrinsic)
    if valid is None:
        valid = depth > 0
    factor = points.norm(dim=-1)[valid].mean()
    scaled = relative.clone()
    scaled[..., :3, 3] = scaled[..., :3, 3] / factor
    return scaled, depth / factor, factor


def fit_scale(
    source: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    iterations: int = 5,
    outlier_mads: float = 3.0,
) -> tuple[Tensor, Tensor]:
    """Robust least-squares scale s such that `target ≈ s * source` over `mask`.

    Starts from the median ratio, then alternates the closed-form least-squares fit
    `s = sum(a*b) / sum(a*a)` with rejection of pixels whose relative residual
    `|s*a - b| / b` is more than `outlier_mads` median absolute deviations above the median.

    Args:
        source, target: depth maps of the same shape, e.g. (S, H, W); positive where used.
        mask: bool of the same shape; pixels to use (non-sky, confident). Non-positive and
            non-finite depths are always excluded.

    Returns:
        (scale, valid): the scale (scalar tensor) and whether at least 16 pixels supported it.
    """
    ok = torch.isfinite(source) & torch.isfinite(target) & (source > 0) & (target > 0)
    if mask is not None:
        ok = ok & mask
    a = source[ok].double()
    b = target[ok].double()
    if a.numel() < 16:
        return torch.tensor(float("nan"), dtype=torch.float64), torch.tensor(False)
    scale = (b / a).median()
    for _ in range(iterations):
        # Reject with the current scale (at first the median ratio, which outliers barely move), then refit.
        residual = (scale * a - b).abs() / b
        median = residual.median()
        mad = (residual - median).abs().median()
        keep = residual <= median + outlier_mads * max(float(mad), 1e-12) * 1.4826
        scale = (a[keep] * b[keep]).sum() / (a[keep] * a[keep]).sum()
    return scale, torch.tensor(bool(keep.sum() >= 16))


def fov_to_focal(fov: Tensor, size: float) -> Tensor:
    """Field of view (radians) across `size` pixels to a focal length in pixels."""
    return (size / 2.0) / torch.tan(fov / 2.0)


def focal_to_fov(focal: float, size: float) -> float:
    """Focal length in pixels across `size` pixels to a field of view in radians."""
    return 2.0 * math.atan((size / 2.0) / focal)


def resize_intrinsic(intrinsic: Tensor, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> Tensor:
    """Intrinsics (..., 3, 3) of an (H, W) image resized to `dst_hw`: the coordinate x maps to
    s * x (s = dst / src per axis), so `f' = s f` and `c' = s c` (a centred principal point stays
    centred, as this module's convention has it)."""
    scale_y, scale_x = dst_hw[0] / src_hw[0], dst_hw[1] / src_hw[1]
    out = intrinsic.clone()
    out[..., 0, :] = out[..., 0, :] * scale_x
    out[..., 1, :] = out[..., 1, :] * scale_y
    return out


def resample_depth_nearest(depth: Tensor, dst_hw: tuple[int, int]) -> Tensor:
    """Depth (..., H, W) resampled to `dst_hw` by nearest neighbour under the coordinate map of
    `resize_intrinsic`: cell (i, j) takes source pixel (floor(i / s_y + 1/2), floor(j / s_x + 1/2)),
    clamped to the image. Never interpolates, so no depth is invented across an object's edge, and
    invalid pixels (NaN) stay invalid."""
    height, width = depth.shape[-2:]
    rows = torch.floor(torch.arange(dst_hw[0], dtype=torch.float64) * (height / dst_hw[0]) + 0.5)
    cols = torch.floor(torch.arange(dst_hw[1], dtype=torch.float64) * (width / dst_hw[1]) + 0.5)
    rows = rows.clamp(max=height - 1).long().to(depth.device)
    cols = cols.clamp(max=width - 1).long().to(depth.device)
    return depth[..., rows, :][..., cols]
