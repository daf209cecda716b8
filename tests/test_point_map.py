"""SpatialSV's point-map objective: VGGT's loss on a hand-computed example, the composition of
depth and cameras against the project's unprojection, and the target read from a cached clip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geovr.student.point_map import clip_point_loss, compose_points, label_points, point_map_loss
from geovr.teacher_cache.geometry import decode_pose, quat_to_mat, relative_to_first, unproject_to_world
from tests.helpers import clip_labels

# 2x2 map, one frame: target rows (0,0,1),(1,0,1) / (0,1,1),(1,1,1); prediction = target plus
# (0,0,0),(0.3,0,0.4) / (0,0,0),(0,0,1).
TARGET = torch.tensor([[[0.0, 0, 1], [1, 0, 1]], [[0, 1, 1], [1, 1, 1]]])[None]
OFFSET = torch.tensor([[[0.0, 0, 0], [0.3, 0, 0.4]], [[0, 0, 0], [0, 0, 1]]])[None]
VALID = torch.ones(1, 2, 2, dtype=torch.bool)


def test_point_loss_matches_the_hand_computed_value_without_and_with_confidence():
    # r = 0, 0.5, 0, 1 -> L_reg = 0.375. Stride 1: x differences 0.7 + 1.0, y 0 + 0.9 -> 2.6 / (3*4);
    # strides 2, 4, 8: a single pixel, no pairs -> L_grad = 0.2166667 / 4 = 0.0541667.
    loss = clip_point_loss(TARGET + OFFSET, TARGET, VALID)
    assert loss.item() == pytest.approx(0.375 + 2.6 / 12 / 4, abs=1e-6)
    assert loss.item() == pytest.approx(0.4291667, abs=1e-6)
    # Confidence 1,2 / 1,1: L_conf = (0 + (2*0.5 - 0.2 ln 2) + 0 + 1) / 4; VGGT's regression_loss
    # on this example gives 0.8945093 in total.
    conf = torch.tensor([[[1.0, 2.0], [1.0, 1.0]]])
    with_conf = clip_point_loss(TARGET + OFFSET, TARGET, VALID, conf)
    assert with_conf.item() == pytest.approx(0.4291667 + (2.0 - 0.2 * math.log(2)) / 4, abs=1e-6)
    assert with_conf.item() == pytest.approx(0.8945093, abs=1e-6)


def test_invalid_pixels_and_small_clips_do_not_count():
    pred, target = TARGET + OFFSET, TARGET.clone()
    target[0, 1, 1] = float("nan")
    valid = VALID.clone()
    valid[0, 1, 1] = False
    # Without pixel (1,1): r = 0, 0.5, 0; gradient pairs touching (1,1) drop: x 0.7, y 0 -> 0.7 / (3*3).
    loss = clip_point_loss(pred, target, valid)
    assert loss.item() == pytest.approx(0.5 / 3 + 0.7 / 9 / 4, abs=1e-6)
    total, counted = point_map_loss([pred, pred], [target, TARGET], [valid, VALID], min_valid_points=4)
    assert counted == 1 and total.item() == pytest.approx(0.4291667, abs=1e-6)
    pred.requires_grad_(True)
    zero, counted = point_map_loss([pred], [TARGET], [VALID])  # VGGT's 100-point minimum
    assert counted == 0 and zero.item() == 0.0
    zero.backward()
    assert pred.grad is not None and not pred.grad.any()


def test_composition_equals_unprojecting_with_the_decoded_cameras():
    generator = torch.Generator().manual_seed(0)
    frames, height, width = 3, 6, 8
    depth = 0.5 + torch.rand(frames, height, width, generator=generator, dtype=torch.float64)
    quat = torch.nn.functional.normalize(
        torch.randn(frames, 4, generator=generator, dtype=torch.float64), dim=-1
    )
    pose_enc = torch.cat(
        (
            torch.randn(frames, 3, generator=generator, dtype=torch.float64),
            quat,
            torch.full((frames, 2), 1.1, dtype=torch.float64),
        ),
        -1,
    )
    extrinsic, intrinsic = decode_pose(pose_enc, (height, width))
    expected = unproject_to_world(depth, extrinsic, intrinsic)
    assert torch.allclose(compose_points(depth, pose_enc), expected, atol=1e-10)
    # A field of view of 0 (the camera head's ReLU) stays finite and puts every point on the axis.
    pose_enc[:, 7:] = 0.0
    flat = compose_points(depth, pose_enc)
    assert torch.isfinite(flat).all()


def test_label_points_are_the_cached_depth_unprojected_with_the_cached_cameras():
    generator = torch.Generator().manual_seed(1)
    quat = torch.nn.functional.normalize(torch.randn(3, 4, generator=generator, dtype=torch.float64), dim=-1)
    extrinsic = torch.cat(
        (quat_to_mat(quat), torch.randn(3, 3, 1, generator=generator, dtype=torch.float64)), -1
    )
    labels = clip_labels(3, depth_hw=(6, 8), extrinsic=extrinsic.numpy().astype(np.float32))
    points, valid = label_points(labels)
    # The teacher image is twice the depth grid: its intrinsics (f 50, principal point at the
    # centre) halve to the grid's.
    relative = relative_to_first(torch.from_numpy(np.asarray(labels.extrinsic, dtype=np.float64)))
    intrinsic = torch.from_numpy(np.asarray(labels.intrinsic, dtype=np.float64)).clone()
    intrinsic[:, :2] *= 0.5
    depth = torch.from_numpy(np.asarray(labels.depth, dtype=np.float64))
    expected = unproject_to_world(depth, relative, intrinsic)
    assert valid.all() and torch.allclose(points, expected, atol=1e-5)
    # Frame 0's points are its camera-frame points: z is the cached depth.
    assert torch.allclose(points[0, ..., 2], depth[0], atol=1e-6)
