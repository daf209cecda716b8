"""Geometry conventions: pose encoding, relative poses, unprojection, clip normalisation, scale fitting.

Multi-view checks run on the synthetic corpus, whose depth and cameras are exact.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from geovr.corpus.synth import load_scene_gt, read_corpus
from geovr.teacher_cache.geometry import (
    decode_pose,
    encode_pose,
    fit_scale,
    invert_extrinsic,
    mat_to_quat,
    normalize_clip,
    pixel_grid,
    project,
    quat_to_mat,
    relative_to_first,
    to_homogeneous,
    unproject_to_camera,
    unproject_to_world,
)

F64 = torch.float64


def axis_angle_to_matrix(axis: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula, (N, 3) axes and (N,) angles to (N, 3, 3): independent of the quaternion code."""
    axis = axis / axis.norm(dim=-1, keepdim=True)
    x, y, z = axis.unbind(-1)
    zero = torch.zeros_like(x)
    skew = torch.stack((zero, -z, y, z, zero, -x, -y, x, zero), -1).reshape(-1, 3, 3)
    eye = torch.eye(3, dtype=axis.dtype).expand_as(skew)
    s, c = torch.sin(angle)[:, None, None], torch.cos(angle)[:, None, None]
    return eye + s * skew + (1 - c) * (skew @ skew)


def random_cameras(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Extrinsics (n, 3, 4) with rotations of every angle, including within 1e-9 of and at 180 degrees,
    and pinhole intrinsics (n, 3, 3) with the principal point at the centre of a 480x640 image."""
    g = torch.Generator().manual_seed(seed)
    axes = torch.randn(n, 3, generator=g, dtype=F64)
    angles = torch.rand(n, generator=g, dtype=F64) * math.pi
    special = torch.tensor(
        [math.pi, math.pi - 1e-9, math.pi - 1e-6, math.pi - 1e-3, 0.0, 1e-9, 1e-4, math.pi / 2]
    )
    angles[: min(n, 8)] = special[: min(n, 8)]
    rotation = axis_angle_to_matrix(axes, angles)
    translation = torch.randn(n, 3, 1, generator=g, dtype=F64) * 3
    height, width = 480, 640
    intrinsic = torch.zeros(n, 3, 3, dtype=F64)
    intrinsic[:, 0, 0] = 200 + 600 * torch.rand(n, generator=g, dtype=F64)
    intrinsic[:, 1, 1] = 200 + 600 * torch.rand(n, generator=g, dtype=F64)
    intrinsic[:, 0, 2], intrinsic[:, 1, 2], intrinsic[:, 2, 2] = width / 2, height / 2, 1.0
    return torch.cat((rotation, translation), -1), intrinsic, (height, width)


def test_pose_encoding_round_trip_below_1e_5() -> None:
    extrinsic, intrinsic, hw = random_cameras(256)
    pose_enc = encode_pose(extrinsic, intrinsic, hw)
    assert pose_enc.shape == (256, 9)
    quat = pose_enc[:, 3:7]
    assert torch.all(quat[:, 3] >= 0)
    torch.testing.assert_close(quat.norm(dim=-1), torch.ones(256, dtype=F64), rtol=0, atol=1e-12)
    decoded_extrinsic, decoded_intrinsic = decode_pose(pose_enc, hw)
    assert (decoded_extrinsic - extrinsic).abs().max() < 1e-5
    assert ((decoded_intrinsic - intrinsic).abs() / intrinsic.abs().clamp(min=1)).max() < 1e-5
    # Near and at 180 degrees (the first rows) the tolerance is far tighter than the requirement.
    assert (decoded_extrinsic[:4] - extrinsic[:4]).abs().max() < 1e-9
    # And back: the encoding of the decoded cameras is the same encoding.
    torch.testing.assert_close(
        encode_pose(decoded_extrinsic, decoded_intrinsic, hw), pose_enc, rtol=0, atol=1e-9
    )


def test_quaternions_follow_vggt_xyzw_order() -> None:
    # A rotation of +90 degrees about z: q = (0, 0, sin 45, cos 45) in XYZW.
    rotation = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=F64)
    half = math.sqrt(0.5)
    torch.testing.assert_close(mat_to_quat(rotation), torch.tensor([0.0, 0.0, half, half], dtype=F64))
    # Non-unit quaternions decode to the same rotation as their normalised version.
    torch.testing.assert_close(quat_to_mat(torch.tensor([0.0, 0.0, 3 * half, 3 * half], dtype=F64)), rotation)


@pytest.mark.parametrize("name", ["tiny-a", "tiny-b"])
def test_decoding_reference_pose_enc_matches_the_official_cameras(reference_dir: Path, name: str) -> None:
    ref = load_file(str(reference_dir / "vggt" / name / "reference.safetensors"))
    height, width = ref["images"].shape[-2:]
    extrinsic, intrinsic = decode_pose(ref["pose_enc"].double(), (height, width))
    expected_extrinsic, expected_intrinsic = ref["extrinsic"].double(), ref["intrinsic"].double()
    assert (extrinsic - expected_extrinsic).abs().max() < 1e-5
    # The random tiny heads give some fields of view of 0: infinite focal lengths, in the same places.
    infinite = torch.isinf(expected_intrinsic)
    assert torch.equal(torch.isinf(intrinsic), infinite)
    assert torch.equal(intrinsic[infinite], expected_intrinsic[infinite])
    finite = ~infinite
    error = (intrinsic[finite] - expected_intrinsic[finite]).abs() / expected_intrinsic[finite].abs().clamp(
        min=1
    )
    assert error.max() < 1e-5


def test_relative_to_first_removes_the_world_frame() -> None:
    extrinsic, _, _ = random_cameras(6, seed=1)
    relative = relative_to_first(extrinsic)
    torch.testing.assert_close(relative[0], torch.eye(3, 4, dtype=F64), rtol=0, atol=1e-12)
    # E_i = relative_i @ E_0, and any other world frame (a rigid change T) gives the same relative poses.
    torch.testing.assert_close(relative @ to_homogeneous(extrinsic[0]), extrinsic, rtol=0, atol=1e-12)
    world_change, _, _ = random_cameras(1, seed=2)
    moved = extrinsic @ to_homogeneous(world_change[0])
    torch.testing.assert_close(relative_to_first(moved), relative, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        to_homogeneous(invert_extrinsic(extrinsic)) @ to_homogeneous(extrinsic),
        torch.eye(4, dtype=F64).expand(6, 4, 4),
        rtol=0,
        atol=1e-12,
    )


def gt_tensors(corpus: Path, scene_id: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gt = load_scene_gt(corpus, scene_id)
    return (
        torch.from_numpy(gt.extrinsic),
        torch.from_numpy(gt.intrinsic),
        torch.from_numpy(gt.depth.astype(np.float64)),
    )


def test_unprojection_and_projection_are_inverse(synth_corpus: Path) -> None:
    extrinsic, intrinsic, depth = gt_tensors(synth_corpus, "scene_0000")
    points = unproject_to_world(depth[3], extrinsic[3], intrinsic[3])
    uv, z = project(points.reshape(-1, 3), extrinsic[3], intrinsic[3])
    height, width = depth.shape[-2:]
    torch.testing.assert_close(uv, pixel_grid(height, width, F64).reshape(-1, 2), rtol=0, atol=1e-9)
    torch.testing.assert_close(z, depth[3].reshape(-1), rtol=1e-12, atol=0)
    # Pixel (u, v) unprojects at integer coordinates: the centre pixel lies on the optical axis.
    camera = unproject_to_camera(depth[3], intrinsic[3])
    cx, cy = int(intrinsic[3, 0, 2]), int(intrinsic[3, 1, 2])
    assert camera[cy, cx, 0] == 0 and camera[cy, cx, 1] == 0


def sample_bilinear(image: torch.Tensor, uv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear samples (N,) of image (H, W) at uv (N, 2), and the planarity defect of each 2x2 cell."""
    height, width = image.shape
    u0 = uv[:, 0].floor().clamp(0, width - 2).long()
    v0 = uv[:, 1].floor().clamp(0, height - 2).long()
    du, dv = uv[:, 0] - u0, uv[:, 1] - v0
    i00, i01 = image[v0, u0], image[v0, u0 + 1]
    i10, i11 = image[v0 + 1, u0], image[v0 + 1, u0 + 1]
    value = (i00 * (1 - du) + i01 * du) * (1 - dv) + (i10 * (1 - du) + i11 * du) * dv
    return value, (i00 + i11 - i01 - i10).abs() / i00


@pytest.mark.parametrize("scene_id", ["scene_0000", "scene_0001"])
def test_pixels_of_one_frame_land_on_the_depth_of_another(synth_corpus: Path, scene_id: str) -> None:
    """Unproject frame i with its depth and camera, project into frame j, compare with j's depth.

    Inverse depth is affine in pixel coordinates on a plane, so bilinear interpolation of 1/depth is
    exact wherever the 2x2 cell around the projection lies on one plane (away from depth edges).
    """
    extrinsic, intrinsic, depth = gt_tensors(synth_corpus, scene_id)
    height, width = depth.shape[-2:]
    medians = []
    for i in range(0, depth.shape[0] - 1):
        j = i + 1
        points = unproject_to_world(depth[i], extrinsic[i], intrinsic[i]).reshape(-1, 3)
        uv, z = project(points, extrinsic[j], intrinsic[j])
        inside = (
            (z > 0.1) & (uv[:, 0] >= 0) & (uv[:, 0] <= width - 1) & (uv[:, 1] >= 0) & (uv[:, 1] <= height - 1)
        )
        inverse, defect = sample_bilinear(1.0 / depth[j], uv[inside])
        smooth = defect < 1e-6
        error = (z[inside][smooth] * inverse[smooth] - 1.0).abs()
        assert smooth.sum() > 0.2 * height * width, f"frames {i},{j} share too few pixels"
        medians.append(float(error.median()))
        # Most shared pixels are co-visible (the rest are hidden in frame j by something nearer).
        assert (error < 1e-3).float().mean() > 0.8
    assert max(medians) < 1e-3, medians
    print(f"{scene_id}: median relative depth error between consecutive frames <= {max(medians):.2e}")


def test_normalize_clip_puts_camera_0_at_the_origin_and_the_mean_distance_at_1(synth_corpus: Path) -> None:
    extrinsic, intrinsic, depth = gt_tensors(synth_corpus, "scene_0001")
    normalized, normalized_depth, factor = normalize_clip(extrinsic, depth, intrinsic)
    torch.testing.assert_close(normalized[0], torch.eye(3, 4, dtype=F64), rtol=0, atol=1e-12)
    points = unproject_to_world(normalized_depth, normalized, intrinsic)
    assert float(points.norm(dim=-1).mean()) == pytest.approx(1.0, abs=1e-9)
    # The factor is the mean distance in metres of the scene points from camera 0's centre.
    metric = unproject_to_world(depth, extrinsic, intrinsic)
    center0 = -extrinsic[0, :, :3].T @ extrinsic[0, :, 3]
    assert float(factor) == pytest.approx(float((metric - center0).norm(dim=-1).mean()), rel=1e-9)
    # Rotations are untouched; translations scale with the depth.
    torch.testing.assert_close(normalized[..., :3], relative_to_first(extrinsic)[..., :3], rtol=0, atol=1e-12)
    torch.testing.assert_close(
        normalized[..., 3] * factor, relative_to_first(extrinsic)[..., 3], rtol=1e-12, atol=1e-12
    )


def test_fit_scale_is_exact_on_clean_depth(synth_corpus: Path) -> None:
    depth = gt_tensors(synth_corpus, "scene_0000")[2][::3]
    for scale in (0.37, 1.0, 4.2):
        fitted, valid = fit_scale(depth, scale * depth)
        assert bool(valid)
        assert float(fitted) == pytest.approx(scale, rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_scale_is_robust_to_noise_and_outliers(synth_corpus: Path, seed: int) -> None:
    """5% multiplicative noise and 10% outliers: the scale is still within 1%."""
    depth = gt_tensors(synth_corpus, "scene_0001")[2][::3]
    g = torch.Generator().manual_seed(seed)
    scale = 2.7
    target = scale * depth * (1 + 0.05 * torch.randn(depth.shape, generator=g, dtype=F64))
    outliers = torch.rand(depth.shape, generator=g) < 0.1
    target[outliers] = 0.1 + 30 * torch.rand(int(outliers.sum()), generator=g, dtype=F64)
    fitted, valid = fit_scale(depth, target)
    assert bool(valid)
    assert abs(float(fitted) / scale - 1) < 0.01
    # Plain least squares over every pixel is far off: the robust fit is what holds it.
    naive = float((depth * target).sum() / (depth * depth).sum())
    assert abs(naive / scale - 1) > 0.05


def test_fit_scale_honours_the_mask_and_reports_too_little_support() -> None:
    source = torch.linspace(1, 5, 400, dtype=F64).reshape(20, 20)
    target = 3.0 * source
    target[:, :10] = 100.0  # wrong everywhere outside the mask
    mask = torch.zeros(20, 20, dtype=torch.bool)
    mask[:, 10:] = True
    fitted, valid = fit_scale(source, target, mask)
    assert bool(valid) and float(fitted) == pytest.approx(3.0, rel=1e-12)
    few = torch.zeros_like(mask)
    few[0, :10] = True
    target[0, :] = 3.0 * source[0, :]
    _, valid = fit_scale(source, target, few)
    assert not bool(valid)
    # Non-positive and non-finite depths never count.
    bad = source.clone()
    bad[:, :10] = float("nan")
    fitted, valid = fit_scale(bad, target, None)
    assert bool(valid) and float(fitted) == pytest.approx(3.0, rel=1e-12)


def test_corpus_fixture_has_the_expected_scenes(synth_corpus: Path) -> None:
    assert read_corpus(synth_corpus)["scenes"] == ["scene_0000", "scene_0001"]
