"""Teacher labeler on the tiny VGGT (CPU, float32): sizes, shapes, batching, pooling, OOM retry, fingerprint."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

from geovr.app.presets import load_section
from geovr.pipeline.config import TeacherConfig
from geovr.pipeline.labeler import (
    VGGT_CHECKPOINT_FILES,
    TeacherLabeler,
    TeacherOOM,
    checkpoint_sha256,
    preprocess_clip,
    teacher_size,
)
from geovr.teacher_cache.config import ConfigError
from tests.conftest import REFERENCE

TINY_VGGT = REFERENCE / "vggt" / "tiny-a"  # width 64, 4 stages, patch 14
LAYERS = (1, 3)


def tiny_config(**values) -> TeacherConfig:
    return TeacherConfig(
        **{
            "checkpoint": TINY_VGGT,
            "image_long_side": 112,
            "feature_layers": LAYERS,
            "dtype": "float32",
            **values,
        }
    )


@pytest.fixture(scope="module")
def labeler() -> TeacherLabeler:
    return TeacherLabeler(tiny_config(max_frames_per_call=16), "cpu")


def random_clips(shapes, seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for shape in shapes]


@pytest.fixture
def forward_calls(labeler):
    """Batch sizes (B, S) of every VGGT forward pass during the test."""
    calls: list[tuple[int, int]] = []
    handle = labeler.model.register_forward_pre_hook(lambda _, args: calls.append(tuple(args[0].shape[:2])))
    yield calls
    handle.remove()


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [
        (480, 640, (392, 504)),  # GeoVR: 640x480 -> 504x392
        (640, 480, (504, 392)),  # portrait
        (1080, 1920, (280, 504)),  # 283.5 -> 280
        (720, 1280, (280, 504)),  # 283.5 (10.125 multiples) -> 10 multiples
        (481, 641, (392, 504)),  # odd sides
        (500, 500, (504, 504)),  # square
        (5, 1000, (28, 504)),  # never below one multiple
        (1000, 3, (504, 28)),
    ],
)
def test_teacher_size_rule(height, width, expected):
    assert teacher_size(height, width) == expected


def test_teacher_size_tiny_preset_and_errors():
    cfg = load_section(TeacherConfig, "teacher", "tiny")
    assert teacher_size(480, 640, cfg.image_long_side, cfg.size_multiple) == (84, 112)
    assert teacher_size(640, 480, cfg.image_long_side, cfg.size_multiple) == (112, 84)
    with pytest.raises(ValueError, match="must be positive"):
        teacher_size(0, 640)


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="image_long_side"):
        TeacherConfig(image_long_side=500).validate()
    with pytest.raises(ConfigError, match="feature_layers"):
        load_section(TeacherConfig, "teacher", "vggt-1b", overrides=["teacher.feature_layers=[]"])
    with pytest.raises(ConfigError, match="dtype"):
        load_section(TeacherConfig, "teacher", "vggt-1b", overrides=["teacher.dtype=float16"])
    with pytest.raises(
        ConfigError, match=r"feature_layers \[1, 7\] do not fit .* 4 aggregator layers .* \[7\]"
    ):
        TeacherLabeler(tiny_config(feature_layers=(1, 7)), "cpu")
    with pytest.raises(ConfigError, match="checkpoint is not set"):
        TeacherLabeler(tiny_config(checkpoint=None), "cpu")


def test_preprocess_resizes_to_unit_range():
    (clip,) = random_clips([(2, 480, 640, 3)])
    images = preprocess_clip(clip, (84, 112))
    assert images.shape == (2, 3, 84, 112) and images.dtype == torch.float32
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    # A constant frame stays that constant (bicubic weights sum to one).
    flat = np.full((1, 480, 640, 3), 200, dtype=np.uint8)
    assert torch.allclose(preprocess_clip(flat, (84, 112)), torch.full((1, 3, 84, 112), 200 / 255))


def test_label_shapes_and_dtypes(labeler):
    clips = random_clips([(4, 480, 640, 3), (3, 640, 480, 3)])
    landscape, portrait = labeler.label(clips)
    assert landscape.teacher_hw == (84, 112) and portrait.teacher_hw == (112, 84)
    for labels, frames, (hd, wd) in ((landscape, 4, (42, 56)), (portrait, 3, (56, 42))):
        assert labels.pose_enc.shape == (frames, 9)
        assert labels.extrinsic.shape == (frames, 3, 4)
        assert labels.intrinsic.shape == (frames, 3, 3)
        assert labels.depth.shape == labels.depth_conf.shape == (frames, hd, wd)
        # 8x6 (or 6x8) patch grid pooled 2x2 to 4x3 (3x4); width 64.
        assert labels.features.shape == (frames, len(LAYERS), hd // 14, wd // 14, 64)
        for name in ("pose_enc", "extrinsic", "intrinsic", "depth", "depth_conf", "features"):
            value = getattr(labels, name)
            # The random tiny camera head may predict a zero field of view (an infinite focal length).
            assert value.dtype == np.float32 and (name == "intrinsic" or np.isfinite(value).all()), name
        assert float(labels.depth_conf.min()) >= 1.0
        assert math.isnan(labels.scale) and labels.scale_valid is False  # no metric model
        # Intrinsics for the teacher image (principal point at its centre).
        np.testing.assert_allclose(labels.intrinsic[:, :2, 2], np.tile([wd, hd], (frames, 1)), rtol=1e-6)


def test_batching_several_clips_equals_one_at_a_time(labeler, forward_calls):
    clips = random_clips(
        [(4, 480, 640, 3)] * 3 + [(2, 480, 640, 3), (4, 240, 320, 3), (4, 640, 480, 3)], seed=1
    )
    batched = labeler.label(clips)
    # Equal S and teacher size share one call (256x192 also becomes 112x84); others get their own.
    assert sorted(forward_calls) == sorted([(4, 4), (1, 2), (1, 4)])
    forward_calls.clear()
    single = [labeler.label([clip])[0] for clip in clips]
    assert forward_calls == [(1, c.shape[0]) for c in clips]
    for a, b in zip(batched, single, strict=True):
        assert a.teacher_hw == b.teacher_hw
        for name in ("pose_enc", "extrinsic", "intrinsic", "depth", "depth_conf", "features"):
            np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-4, atol=1e-5, err_msg=name)


def test_max_frames_per_call_splits_groups(forward_calls):
    labeler = TeacherLabeler(tiny_config(max_frames_per_call=8), "cpu")
    handle = labeler.model.register_forward_pre_hook(
        lambda _, args: forward_calls.append(tuple(args[0].shape[:2]))
    )
    try:
        labels = labeler.label(random_clips([(3, 96, 128, 3)] * 5))
    finally:
        handle.remove()
    assert forward_calls == [(2, 3), (2, 3), (1, 3)]
    assert len(labels) == 5


def test_features_and_depth_equal_a_hand_computation(labeler):
    (clip,) = random_clips([(3, 480, 640, 3)], seed=2)
    (labels,) = labeler.label([clip])
    with torch.no_grad():
        out = labeler.model(preprocess_clip(clip, (84, 112))[None], return_layers=LAYERS)
    # Features: tokens after the 5 special tokens, first 64 channels, 6x8 grid, mean of each 2x2 block.
    for li, layer in enumerate(LAYERS):
        grid = out["layers"][layer][0, :, 5:, :64].numpy().reshape(3, 6, 8, 64)
        for i in range(3):
            for j in range(4):
                block = grid[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].reshape(3, 4, 64).mean(1)
                np.testing.assert_allclose(labels.features[:, li, i, j], block, rtol=1e-5, atol=1e-6)
    # Depth: confidence-weighted 2x2 means; confidence: plain 2x2 means.
    depth = out["depth"][0, ..., 0].numpy().reshape(3, 42, 2, 56, 2)
    conf = out["depth_conf"][0].numpy().reshape(3, 42, 2, 56, 2)
    expected_depth = (depth * conf).sum((2, 4)) / conf.sum((2, 4))
    np.testing.assert_allclose(labels.depth, expected_depth, rtol=1e-5)
    np.testing.assert_allclose(labels.depth_conf, conf.mean((2, 4)), rtol=1e-5)
    np.testing.assert_allclose(labels.pose_enc, out["pose_enc"][0].numpy(), rtol=1e-5, atol=1e-6)


def test_out_of_memory_retries_clip_by_clip_then_raises_teacher_oom(labeler, forward_calls):
    """Device OOM cannot happen on this CPU box: a pre-hook raises it for batches larger than a limit."""
    limit = {"frames": 4}

    def fail_if_too_large(_, args):
        if args[0].shape[0] * args[0].shape[1] > limit["frames"]:
            raise torch.OutOfMemoryError("injected: CUDA out of memory")

    clips = random_clips([(2, 96, 128, 3)] * 3 + [(4, 96, 128, 3)], seed=3)
    expected = [labeler.label([clip])[0] for clip in clips]
    handle = labeler.model.register_forward_pre_hook(fail_if_too_large)
    try:
        forward_calls.clear()
        labels = labeler.label(clips)
        # The 3-clip batch failed, then ran clip by clip; the 4-frame clip fit alone.
        assert forward_calls == [(3, 2), (1, 2), (1, 2), (1, 2), (1, 4)]
        for a, b in zip(labels, expected, strict=True):
            np.testing.assert_allclose(a.depth, b.depth, rtol=1e-4, atol=1e-5)
        limit["frames"] = 3
        with pytest.raises(TeacherOOM, match="clip 3 alone \\(4 frames at 112x84\\)") as info:
            labeler.label(clips)
        assert info.value.clip_index == 3 and info.value.num_frames == 4
        assert isinstance(info.value, torch.OutOfMemoryError)
    finally:
        handle.remove()


def test_bad_clips_are_named(labeler):
    with pytest.raises(ValueError, match=r"clip 1: expected uint8 frames \(S, H, W, 3\), got float32"):
        labeler.label([random_clips([(2, 96, 128, 3)])[0], np.zeros((2, 96, 128, 3), np.float32)])
    with pytest.raises(ValueError, match="clip 0: no frames"):
        labeler.label([np.zeros((0, 96, 128, 3), np.uint8)])
    assert labeler.label([]) == []


def test_fingerprint_parts(labeler):
    parts = labeler.fingerprint_parts()
    assert set(parts) == {"teacher", "checkpoint_sha256", "teacher_config", "metric_teacher", "preprocess"}
    files = "".join(
        f"{name}\0{hashlib.sha256((TINY_VGGT / name).read_bytes()).hexdigest()}\n"
        for name in ("config.json", "model.safetensors")
    )
    assert parts["checkpoint_sha256"] == hashlib.sha256(files.encode()).hexdigest()
    assert parts["teacher_config"]["embed_dim"] == 64 and parts["teacher_config"]["dpt_layers"] == [
        0,
        1,
        2,
        3,
    ]
    assert parts["metric_teacher"] == ""
    assert parts["preprocess"]["teacher_long_side"] == 112 and parts["preprocess"]["dtype"] == "float32"
    # Stable across labelers; another dtype or long side is another fingerprint.
    other = TeacherLabeler(tiny_config(dtype="bfloat16", image_long_side=140), "cpu").fingerprint_parts()
    assert other["checkpoint_sha256"] == parts["checkpoint_sha256"]
    assert other["preprocess"]["dtype"] == "bfloat16" and other["preprocess"]["teacher_long_side"] == 140
    # A bare weights file is hashed as itself.
    expected = hashlib.sha256((TINY_VGGT / "model.safetensors").read_bytes()).hexdigest()
    assert checkpoint_sha256(TINY_VGGT / "model.safetensors", VGGT_CHECKPOINT_FILES) == expected


def test_bfloat16_autocast_gives_float32_labels_close_to_float32(labeler):
    (clip,) = random_clips([(3, 96, 128, 3)], seed=5)
    (reference,) = labeler.label([clip])
    fast = TeacherLabeler(tiny_config(dtype="bfloat16"), "cpu")
    assert fast.fingerprint_parts()["preprocess"]["dpt_head_dtype"] == "bfloat16"
    (labels,) = fast.label([clip])
    for name in ("pose_enc", "depth", "depth_conf", "features"):
        value, expected = getattr(labels, name), getattr(reference, name)
        assert value.dtype == np.float32, name
        # Measured on tiny-a, max |a - b| / max |b|: 4.5e-3 (pose), 3.0e-3 (depth, bf16 DPT head;
        # 4e-4 with it in fp32), 3.6e-3 (features).
        assert 0 < np.abs(value - expected).max() <= 0.02 * np.abs(expected).max(), name
