"""Reconstruction diagnostics: accuracy / completeness / Chamfer on hand-computed clouds, the per-clip
median alignment, and the z-buffer splat of the rendered picture."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geovr.eval.reconstruction import (
    RENDER_HW,
    aligned_clouds,
    cloud_metrics,
    nearest_distances,
    reconstruction_metrics,
    splat,
)
from geovr.teacher_cache.geometry import encode_pose, quat_to_mat
from tests.helpers import clip_labels


def test_cloud_metrics_match_the_hand_computed_values():
    student = np.array([[0.0, 0, 0], [1, 0, 0]])
    teacher = np.array([[0.0, 0, 0], [0, 0.03, 0], [3, 0, 0]])
    # student -> teacher: 0 and 1; teacher -> student: 0, 0.03 and 2.
    metrics = cloud_metrics(student, teacher)
    assert metrics["recon_accuracy"] == pytest.approx(0.5)
    assert metrics["recon_completeness"] == pytest.approx(2.03 / 3)
    assert metrics["recon_chamfer"] == pytest.approx((0.5 + 2.03 / 3) / 2)
    assert metrics["recon_precision@0.05"] == 0.5 and metrics["recon_recall@0.05"] == pytest.approx(2 / 3)
    assert metrics["recon_fscore@0.05"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert cloud_metrics(student[:0], teacher) == {}


def test_nearest_distances_are_exact():
    rng = np.random.default_rng(0)
    source, target = rng.normal(size=(9000, 3)), rng.normal(size=(700, 3))
    brute = np.sqrt(((source[:, None] - target[None]) ** 2).sum(-1)).min(1)
    assert np.allclose(nearest_distances(source, target), brute)


def test_one_median_ratio_per_clip_aligns_a_scaled_student():
    generator = torch.Generator().manual_seed(0)
    quat = torch.nn.functional.normalize(torch.randn(3, 4, generator=generator, dtype=torch.float64), dim=-1)
    extrinsic = torch.cat(
        (quat_to_mat(quat), 0.3 * torch.randn(3, 3, 1, generator=generator, dtype=torch.float64)), -1
    )
    extrinsic[0] = torch.eye(3, 4, dtype=torch.float64)
    labels = clip_labels(3, depth_hw=(6, 8), extrinsic=extrinsic.float().numpy())
    intrinsic = torch.from_numpy(labels.intrinsic).double()
    pose_enc = encode_pose(extrinsic, intrinsic, (12, 16)).numpy()
    # A student at 3x the teacher's scale (depth and translations) is the teacher after alignment.
    scaled = pose_enc.copy()
    scaled[:, :3] *= 3.0
    student, teacher, valid = aligned_clouds(labels.depth * 3.0, scaled, labels)
    assert valid.all() and len(student) == 3 * 6 * 8
    assert np.allclose(student, teacher, atol=1e-5)
    assert reconstruction_metrics(labels.depth * 3.0, scaled, labels)["recon_chamfer"] == pytest.approx(
        0, abs=1e-5
    )
    # Scaling one frame alone is not a similarity of the clip: the clouds then differ.
    torn = labels.depth.copy()
    torn[1] *= 2.0
    assert reconstruction_metrics(torn, pose_enc, labels)["recon_chamfer"] > 0.01


def test_splat_keeps_the_nearest_point_of_each_pixel():
    eye, rotation = np.zeros(3), np.eye(3)
    points = np.array([[0.0, 0, 2], [0.0, 0, 1], [0.5, 0, 1]])  # two on the optical axis, the near one red
    colors = np.array([[0, 0, 255], [255, 0, 0], [0, 255, 0]], dtype=np.uint8)
    image = splat(points, colors, eye, rotation, size=1)
    height, width = RENDER_HW
    assert tuple(image[height // 2, width // 2]) == (255, 0, 0)
    assert (image == [0, 255, 0]).all(-1).sum() == 1 and not (image == [0, 0, 255]).all(-1).any()
    assert (image == 255).all(-1).sum() == height * width - 2
    behind = splat(-points, colors, eye, rotation)
    assert (behind == 255).all()
