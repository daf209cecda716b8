"""The student's losses against hand-computed values on small tensors, and their masking."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from geovr.student.losses import (
    IGNORE_INDEX,
    camera_loss,
    causal_lm_loss,
    depth_loss,
    distill_loss,
    gradient_matching,
    quantile_filter,
    scale_loss,
)


def test_camera_loss_by_hand():
    target = torch.zeros(2, 3, 9)
    # clip 0: frame 0 and 1 labelled, frame 2 padding (garbage must not count)
    target[0, 0] = torch.tensor([1, 2, 3, 0, 0, 0, 1, 0.5, 0.5])
    target[0, 1] = torch.tensor([200, 0, 0, 0.1, 0.2, 0.3, 0.4, 1, 1])  # |T| error 200 clamps to 100
    target[0, 2] = 1e6
    # clip 1: frame 0 labelled, frames 1-2 padding
    target[1, 0] = torch.tensor([0, 0, 0, 0, 0, 0, 1, 0, 0])
    target[1, 1:] = -1e6
    mask = torch.tensor([[True, True, False], [True, False, False]])
    pred = torch.zeros(2, 3, 9, requires_grad=True)
    loss, parts = camera_loss(pred, target, mask)
    clip0 = (1 + 2 + 3 + 100) / 6 + (1 + 0.1 + 0.2 + 0.3 + 0.4) / 8 + 0.5 * (0.5 + 0.5 + 1 + 1) / 4
    clip1 = 1 / 4
    assert loss.item() == pytest.approx((clip0 + clip1) / 2, rel=1e-6)
    assert parts["translation"].item() == pytest.approx((106 / 6 + 0) / 2, rel=1e-6)
    loss.backward()
    assert pred.grad[~mask].abs().sum() == 0  # padding frames get no gradient


def test_camera_loss_without_labels_is_a_connected_zero():
    pred = torch.randn(1, 2, 9, requires_grad=True)
    loss, _ = camera_loss(pred, torch.zeros(1, 2, 9), torch.zeros(1, 2, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert pred.grad is not None and pred.grad.abs().sum() == 0


def test_quantile_filter_by_hand():
    errors = torch.arange(1.0, 11.0)
    # k = ceil(0.8 * 9) + 1 = 9: the 9th smallest (9) is the threshold
    assert quantile_filter(errors, 0.8, min_elements=2).tolist() == list(range(1, 10))
    assert quantile_filter(errors, 0.8, min_elements=10).tolist() == errors.tolist()  # too few to filter
    spiky = torch.tensor([1.0, 2.0, 3.0, 1000.0])
    assert quantile_filter(spiky, 0.5, min_elements=3).tolist() == [1.0, 2.0, 3.0]  # k = 3, threshold 3
    # k = 2 keeps two, fewer than min_elements: nothing dropped, clamped at hard_max instead
    assert quantile_filter(spiky, 0.2, min_elements=3).tolist() == [1.0, 2.0, 3.0, 100.0]


def _ramp(height: int = 8, width: int = 8) -> torch.Tensor:
    rows = torch.arange(height, dtype=torch.float32)[:, None]
    cols = torch.arange(width, dtype=torch.float32)[None, :]
    return (cols + 60.0 * rows)[None]  # (1, H, W): x steps of 1, y steps of 60


def test_gradient_matching_by_hand():
    valid = torch.ones(1, 8, 8, dtype=torch.bool)
    # stride 1: |dx| = 1, |dy| = 60 -> 61; stride 2: |dx| = 2, |dy| = 120 clamped to 100 -> 102;
    # strides 4 and 8 leave fewer than 10 pixels and are skipped
    assert gradient_matching(_ramp(), valid).item() == pytest.approx((61 + 102) / 2)
    assert gradient_matching(_ramp(), valid, scales=1).item() == pytest.approx(61)
    # pairs touching an invalid pixel do not count: invalidate column 7 -> stride 1 x pairs all still 1
    valid[..., 7] = False
    assert gradient_matching(_ramp(), valid, scales=1).item() == pytest.approx(61)


def test_depth_loss_by_hand_and_padding_ignored():
    target = torch.rand(1, 2, 8, 8) + 1.0
    pred = target.clone()
    pred[0, 0] += _ramp()[0]
    pred[0, 1] = 123.0  # frame 1 is padding
    target[0, 1] = float("nan")
    valid = torch.zeros(1, 2, 8, 8, dtype=torch.bool)
    valid[0, 0] = True
    pred.requires_grad_(True)
    loss, parts = depth_loss(pred, target, valid)
    l1 = 3.5 + 60 * 3.5  # mean of |x + 60 y| over the 8x8 grid (64 <= 1000 elements: no filtering)
    assert parts["l1"].item() == pytest.approx(l1, rel=1e-5)
    assert parts["gradient"].item() == pytest.approx(81.5, rel=1e-5)
    assert loss.item() == pytest.approx(l1 + 81.5, rel=1e-5)
    loss.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad[0, 1].abs().sum() == 0


def test_depth_loss_drops_the_top_errors():
    target = torch.ones(1, 1, 10, 10)
    pred = target.clone()
    pred[0, 0, 0, :5] += 50.0  # 5 of 100 pixels off by 50: below the 98th percentile, kept
    pred[0, 0, 9, 9] += 1000.0  # 1 pixel: dropped by the 98% filter
    valid = torch.ones_like(target, dtype=torch.bool)
    _, parts = depth_loss(pred, target, valid, quantile=0.98, min_elements=10)
    # k = ceil(0.98 * 99) + 1 = 99: threshold = 50, keeps 99 errors (94 zeros, 5 x 50)
    assert parts["l1"].item() == pytest.approx(250 / 99, rel=1e-6)


def test_scale_loss_by_hand_and_invalid_masked():
    pred = torch.tensor([1.0, 3.0], requires_grad=True)
    target = torch.tensor([math.e - 1.0, 1e6])
    loss = scale_loss(pred, target, torch.tensor([True, False]))
    assert loss.item() == pytest.approx(abs(1.0 - math.log(2.0)), rel=1e-6)
    loss.backward()
    assert pred.grad[1] == 0
    none_valid = scale_loss(pred, target, torch.tensor([False, False]))
    assert none_valid.item() == 0.0 and none_valid.requires_grad
    nan_target = scale_loss(pred, torch.tensor([float("nan"), 1.0]), torch.tensor([True, True]))
    assert nan_target.item() == pytest.approx(abs(math.log(2.0) - math.log(4.0)), rel=1e-6)


def test_distill_loss_by_hand():
    target = torch.zeros(1, 2, 2, 1, 2, 2)  # (B, S, L, h, w, C)
    target[0, 0, :, 0, 0] = torch.tensor([1.0, 0.0])
    target[0, 0, :, 0, 1] = torch.tensor([1.0, 0.0])
    layer0 = torch.zeros(1, 2, 1, 2, 2)
    layer0[0, 0, 0, 0] = torch.tensor([2.0, 0.0])  # cosine 1
    layer0[0, 0, 0, 1] = torch.tensor([0.0, 3.0])  # cosine 0
    layer0[0, 1] = 7.0  # padding frame
    layer1 = target[:, :, 1].clone()  # equal: loss 0
    valid = torch.zeros(1, 2, 1, 2, dtype=torch.bool)
    valid[0, 0] = True  # frame 1 is padding
    assert distill_loss([layer0, layer1], target, valid).item() == pytest.approx((0.5 + 0.0) / 2)
    valid[0, 0, 0, 1] = False  # token (0, 1) outside the clip's grid: only the cosine-1 token is left
    assert distill_loss([layer0, layer1], target, valid).item() == pytest.approx(0.0, abs=1e-7)


def test_lm_loss_uses_only_labelled_positions_and_matches_full_logits():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(2, 6, 8)
    labels = torch.full((2, 6), IGNORE_INDEX)
    labels[0, 3:5] = torch.tensor([4, 7])
    labels[1, 5] = 2
    ours = causal_lm_loss(hidden, labels, head)
    logits = head(hidden)[:, :-1].reshape(-1, 11)
    reference = F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-6)
    no_labels = causal_lm_loss(hidden, torch.full((2, 6), IGNORE_INDEX), head)
    assert no_labels.item() == 0.0
