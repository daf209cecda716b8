"""Metric scale: the per-clip fit on synthetic scenes with known scale (both fits), and the Depth
Anything V2 option (DA3-Metric, the default, is tested in `test_da3_metric.py`)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from geovr.corpus.config import SynthConfig
from geovr.corpus.synth import generate_scene, render_scene
from geovr.pipeline.config import TeacherConfig
from geovr.pipeline.labeler import TeacherLabeler, downsample_depth, preprocess_clip
from geovr.pipeline.metric_scale import clip_metric_scale
from geovr.teacher_cache.config import ConfigError
from geovr.teacher_cache.geometry import fit_scale, normalize_clip
from geovr.teachers.metric_depth import MetricDepthModel
from geovr.teachers.tiny import write_tiny_depth_anything
from geovr.teachers.vggt import VGGT
from tests.conftest import REFERENCE

TINY_VGGT = REFERENCE / "vggt" / "tiny-a"


def synthetic_clip(index: int, frames: int = 4, width: int = 112, height: int = 84):
    """A rendered synthetic clip: (rgb (S,H,W,3) uint8, depth (S,H,W) metres, extrinsic, intrinsic)."""
    scene = generate_scene(SynthConfig(scenes=1, frames=frames, width=width, height=height, seed=3), index)
    rendered = list(render_scene(scene))
    rgb = np.stack([f.rgb for f in rendered])
    depth = torch.from_numpy(np.stack([f.depth for f in rendered]).astype(np.float64))
    return rgb, depth, torch.from_numpy(scene.extrinsic), torch.from_numpy(scene.intrinsic)


@pytest.mark.parametrize("fit", ["least_squares", "robust"])
@pytest.mark.parametrize("index", [0, 1, 2])
def test_fitted_scale_equals_the_normalisation_factor(index, fit):
    """Ground-truth depth as the metric model, the normalised clip as VGGT: the scale is the factor."""
    _, depth_m, extrinsic, intrinsic = synthetic_clip(index)
    _, depth_normalised, factor = normalize_clip(extrinsic, depth_m, intrinsic)
    assert float(factor) > 0.5  # metres per normalised unit in rooms of 4 to 8 m: far from 1

    # Confidence that varies over the image; sky in the top rows, where the metric model saturates.
    generator = torch.Generator().manual_seed(index)
    conf = 1.0 + 5.0 * torch.rand(depth_m.shape, generator=generator, dtype=torch.float64)
    sky = torch.zeros(depth_m.shape, dtype=torch.bool)
    sky[:, :10] = True
    metric = depth_m.clone()
    metric[sky] = 80.0
    # Low-confidence pixels (below the median) see another scale: with the sky they are the majority,
    # so even a robust fit over all pixels follows them; the confidence and sky masks must drop them.
    unreliable = conf < conf[~sky].median()
    metric[unreliable] *= 1.3
    result = clip_metric_scale(depth_normalised, conf, metric, ~sky, fit, min_pixels=100)
    assert result.valid
    assert result.scale == pytest.approx(float(factor), rel=1e-6)
    # The masks matter: the same fit over every pixel is pulled off the true factor.
    naive, _ = fit_scale(depth_normalised, metric)
    assert abs(float(naive) / float(factor) - 1.0) > 0.1


def test_fitted_scale_after_downsampling_to_the_label_resolution():
    """The labeler fits at half resolution after the 2x2 confidence-weighted average: still exact."""
    _, depth_m, extrinsic, intrinsic = synthetic_clip(4)
    _, depth_normalised, factor = normalize_clip(extrinsic, depth_m, intrinsic)
    conf = 1.0 + torch.rand(depth_m.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    depth_half, conf_half = downsample_depth(depth_normalised, conf)
    metric_half, _ = downsample_depth(
        depth_m, conf
    )  # the same weights: metric = factor * depth holds blockwise
    result = clip_metric_scale(
        depth_half, conf_half, metric_half, torch.ones_like(depth_half, dtype=torch.bool)
    )
    assert result.valid
    assert result.scale == pytest.approx(float(factor), rel=1e-5)  # float32 pooling


@pytest.mark.parametrize("fit", ["least_squares", "robust"])
def test_too_few_pixels_or_all_sky_gives_an_invalid_scale(fit):
    depth = torch.rand(2, 8, 8) + 0.5
    conf = torch.ones_like(depth)
    result = clip_metric_scale(depth, conf, 2.0 * depth, torch.zeros_like(depth, dtype=torch.bool), fit)
    assert not result.valid and math.isnan(result.scale)
    non_sky = torch.zeros_like(depth, dtype=torch.bool)
    non_sky[0, 0, :10] = True  # 8 usable pixels < 16
    result = clip_metric_scale(depth, conf, 2.0 * depth, non_sky, fit)
    assert not result.valid and math.isnan(result.scale)
    result = clip_metric_scale(depth, conf, 2.0 * depth, torch.ones_like(non_sky), fit, min_pixels=16)
    assert result.valid and result.scale == pytest.approx(2.0, rel=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        clip_metric_scale(depth, conf[:1], depth, non_sky)


@pytest.fixture(scope="module")
def tiny_depth_anything(tmp_path_factory):
    return write_tiny_depth_anything(tmp_path_factory.mktemp("da") / "tiny-da-metric")


def test_tiny_depth_anything_loads_locally_and_predicts_metres(tiny_depth_anything):
    model = MetricDepthModel(tiny_depth_anything, "cpu", sky_fraction=0.9)
    rgb, *_ = synthetic_clip(0)
    depth = model.predict(rgb, (42, 56), autocast_dtype=None)
    assert depth.shape == (4, 42, 56) and depth.dtype == torch.float32
    assert float(depth.min()) >= 0.0 and float(depth.max()) <= model.max_depth
    assert float(depth.std()) > 0  # the tiny head is not a constant map
    sky = model.sky_mask(depth)
    assert torch.equal(sky, depth >= 0.9 * 20.0)


def test_depth_anything_relative_checkpoint_is_refused(tiny_depth_anything, tmp_path):
    config = json.loads((tiny_depth_anything / "config.json").read_text())
    config["depth_estimation_type"] = "relative"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"depth_estimation_type='metric'"):
        MetricDepthModel(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        MetricDepthModel(tmp_path / "missing")


def test_labeler_depth_anything_v2_option(tiny_depth_anything):
    """`metric_teacher: depth-anything-v2`: V2 on the source frames, resized to the teacher image,
    sky where it saturates, then GeoVR's mask and fit over VGGT's full-resolution depth."""
    cfg = TeacherConfig(
        checkpoint=TINY_VGGT,
        image_long_side=112,
        feature_layers=(3,),
        dtype="float32",
        metric_checkpoint=tiny_depth_anything,
        metric_teacher="depth-anything-v2",
        metric_min_pixels=100,
    )
    labeler = TeacherLabeler(cfg, "cpu")
    clips = [synthetic_clip(i)[0] for i in range(2)]
    labels = labeler.label(clips)

    # The same fit, recomputed from an independent run of VGGT and of the metric model.
    vggt = VGGT.from_pretrained(TINY_VGGT)
    metric = MetricDepthModel(tiny_depth_anything, "cpu")
    for clip, label in zip(clips, labels, strict=True):
        assert label.scale_valid
        with torch.inference_mode():
            out = vggt(preprocess_clip(clip, label.teacher_hw)[None])
        predicted = metric.predict(clip, label.teacher_hw, autocast_dtype=None)
        expected = clip_metric_scale(
            out["depth"][0, ..., 0],
            out["depth_conf"][0],
            predicted,
            ~metric.sky_mask(predicted),
            min_pixels=100,
        )
        assert expected.valid and label.scale == pytest.approx(expected.scale, rel=1e-5)

    parts = labeler.fingerprint_parts()
    name, _, digest = parts["metric_teacher"].partition("@sha256:")
    assert name == "tiny-da-metric" and len(digest) == 64
    rule = parts["preprocess"]["metric_scale"]
    assert rule["teacher"] == "depth-anything-v2" and rule["fit"] == "least_squares"
    assert rule["min_pixels"] == 100 and "max_depth" in rule["sky"]


def test_a_depth_anything_v2_directory_is_refused_as_da3(tiny_depth_anything):
    """The default teacher kind is DA3-Metric; a V2 directory under it is refused with the fix."""
    cfg = TeacherConfig(checkpoint=TINY_VGGT, feature_layers=(3,), metric_checkpoint=tiny_depth_anything)
    with pytest.raises(ConfigError, match="metric_teacher=depth-anything-v2"):
        TeacherLabeler(cfg, "cpu")
