"""DA3-Metric (GeoVR's scale teacher) against the official code's conformance vectors, its checkpoint
loading, DA3's sky handling, GeoVR's scale chain, and the labeler with it."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from geovr.corpus.config import SynthConfig
from geovr.corpus.synth import generate_scene, render_probe, render_scene
from geovr.pipeline.config import TeacherConfig
from geovr.pipeline.labeler import TeacherLabeler, preprocess_clip
from geovr.pipeline.metric_scale import canonical_to_metric, clip_metric_scale
from geovr.teacher_cache.config import ConfigError
from geovr.teachers.da3_metric import (
    SKY_THRESHOLD,
    DA3MetricConfig,
    DepthAnything3Metric,
    exact_quantile,
    fill_sky_depth,
)
from geovr.teachers.tiny import write_tiny_da3_metric, write_tiny_vggt
from geovr.teachers.vggt import VGGT, CheckpointError
from tests.conftest import REFERENCE

DA3 = REFERENCE / "da3metric"
TINY = DA3 / "tiny"
TINY_VGGT = REFERENCE / "vggt" / "tiny-a"


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (the reference README's measure)."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(str(TINY / "reference.safetensors"))


@pytest.fixture(scope="module")
def tiny_model() -> DepthAnything3Metric:
    return DepthAnything3Metric.from_pretrained(TINY)


def test_reproduces_official_depth_and_sky_in_float32(tiny_model, reference):
    """The tiny reference model, loaded strictly, gives the official `depth` (after DA3's own sky
    handling) and `sky` on the reference frames, within 1e-4 relative error."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the reference was produced
    try:
        depth, sky = tiny_model.predict(reference["images"])
    finally:
        torch.set_num_threads(threads)
    assert depth.dtype == sky.dtype == torch.float32 and depth.shape == reference["depth"].shape
    assert relative_error(sky, reference["sky"]) < 1e-4
    assert relative_error(depth, reference["depth"]) < 1e-4
    # The reference clip has sky: the filled pixels all hold one value, the non-sky depth's 0.99 quantile.
    is_sky = reference["sky"] >= SKY_THRESHOLD
    assert 10 < int(is_sky.sum()) < is_sky.numel() - 10
    assert torch.unique(depth[is_sky]).numel() == 1


def test_predict_splits_frames_and_fills_sky_per_clip(tiny_model, reference):
    """Frames per call do not change the outputs; the sky of each clip is filled from its own depth."""
    images = reference["images"]
    depth, sky = tiny_model.predict(images, frames_per_call=16)
    split_depth, split_sky = tiny_model.predict(images, frames_per_call=3)
    assert relative_error(split_depth, depth) < 1e-6 and relative_error(split_sky, sky) < 1e-6

    # Two clips in one call: the second is the first's last two frames; each gets its own fill value.
    pair = torch.cat([images[:, :2], images[:, 2:]])
    pair_depth, _ = tiny_model.predict(pair)
    for clip in range(2):
        alone, _ = tiny_model.predict(pair[clip : clip + 1])
        assert relative_error(pair_depth[clip], alone[0]) < 1e-6


def test_exact_quantile_is_torch_quantile_without_sampling():
    generator = torch.Generator().manual_seed(0)
    for size in (1, 2, 7, 10, 1001):
        values = torch.rand(size, generator=generator)
        for q in (0.0, 0.5, 0.99, 1.0):
            expected = torch.quantile(values.double(), q)
            assert float(exact_quantile(values, q)) == pytest.approx(float(expected), rel=1e-12)


def test_sky_fill_needs_more_than_ten_sky_and_non_sky_pixels():
    depth = torch.arange(1.0, 1 + 2 * 8 * 8).reshape(2, 8, 8)
    sky = torch.zeros_like(depth)
    sky.view(-1)[:10] = 1.0  # 10 sky pixels: left alone, as the official code
    assert torch.equal(fill_sky_depth(depth, sky), depth)
    sky.view(-1)[:11] = 1.0
    filled = fill_sky_depth(depth, sky)
    far = torch.quantile(depth[sky < SKY_THRESHOLD], 0.99)
    assert torch.allclose(filled[sky >= SKY_THRESHOLD], far.expand(11))
    assert torch.equal(filled[sky < SKY_THRESHOLD], depth[sky < SKY_THRESHOLD])
    assert torch.equal(fill_sky_depth(depth, torch.ones_like(depth)), depth)  # all sky: left alone


def test_scale_chain_reproduces_geovr_on_the_reference(reference):
    """From the official depth, sky and intrinsics and the VGGT stand-ins, GeoVR's chain gives the
    reference's metric depth, masks, confidence median and least-squares scale."""
    metric = canonical_to_metric(reference["depth"][0], reference["intrinsics"][0])
    assert relative_error(metric, reference["metric_depth"]) < 1e-6
    non_sky = reference["sky"][0] < SKY_THRESHOLD
    assert torch.equal(non_sky, reference["non_sky_mask"].bool())

    fit = clip_metric_scale(reference["teacher_depth"], reference["teacher_conf"], metric, non_sky)
    assert fit.valid
    assert fit.median_conf == pytest.approx(float(reference["median_conf"]), rel=1e-6)
    expected = reference["align_mask"].bool()
    differ = fit.align_mask != expected
    near_threshold = (
        ((reference["teacher_conf"] - fit.median_conf).abs() < 1e-5)
        | ((metric - 0.01).abs() < 1e-5)
        | ((reference["teacher_depth"] - 1e-3).abs() < 1e-5)
    )
    assert not bool((differ & ~near_threshold).any())
    assert 0 < fit.pixels < non_sky.sum()  # the mask is a real selection
    assert fit.scale == pytest.approx(float(reference["scale"]), rel=1e-5)

    # The named robust option fits the same pixels with outlier rejection: close, not identical.
    robust = clip_metric_scale(
        reference["teacher_depth"], reference["teacher_conf"], metric, non_sky, "robust"
    )
    assert robust.valid and robust.scale != fit.scale
    assert robust.scale == pytest.approx(fit.scale, rel=0.05)


def test_too_few_pixels_gives_an_invalid_scale(reference):
    metric = canonical_to_metric(reference["depth"][0], reference["intrinsics"][0])
    non_sky = reference["sky"][0] < SKY_THRESHOLD
    conf, depth = reference["teacher_conf"], reference["teacher_depth"]
    fit = clip_metric_scale(depth, conf, metric, non_sky, min_pixels=10**6)
    assert not fit.valid and math.isnan(fit.scale)
    all_sky = clip_metric_scale(depth, conf, metric, torch.zeros_like(non_sky))
    assert not all_sky.valid and math.isnan(all_sky.median_conf) and all_sky.pixels == 0
    # Non-finite pixels are left out instead of turning the scale into NaN.
    spoiled = depth.clone()
    spoiled[0, 0, 0] = float("nan")
    assert clip_metric_scale(spoiled, conf, metric, non_sky).valid
    with pytest.raises(ValueError, match="same shape"):
        clip_metric_scale(depth[:1], conf, metric, non_sky)
    with pytest.raises(ValueError, match="unknown scale fit"):
        clip_metric_scale(depth, conf, metric, non_sky, fit="median")


def test_da3metric_large_has_exactly_the_official_tensors():
    manifest = json.loads((DA3 / "da3metric-large_state_dict_shapes.json").read_text())
    with torch.device("meta"):
        model = DepthAnything3Metric(DA3MetricConfig())
    names = {"model." + name: list(t.shape) for name, t in model.state_dict().items()}
    assert names == manifest["shapes"]
    assert len(names) == manifest["tensors"] == 406
    assert sum(p.numel() for p in model.parameters()) == manifest["parameters"] == 334_171_394


def test_hub_layout_and_plain_keys_load(tmp_path, reference, tiny_model):
    """The Hub layout: `model.`-prefixed keys with a config naming the preset and the sizes; the same
    weights without the prefix also load; both predict as the reference directory does."""
    state = load_file(str(TINY / "model.safetensors"))
    assert all(key.startswith("model.") for key in state)
    sizes = json.loads((TINY / "config.json").read_text())
    expected, _ = tiny_model.predict(reference["images"])
    for name, keys, config in (
        ("hub", state, {"model_name": "da3metric-large", **sizes}),
        ("plain", {k.removeprefix("model."): v for k, v in state.items()}, sizes),
    ):
        directory = tmp_path / name
        directory.mkdir()
        save_file(keys, str(directory / "model.safetensors"))
        (directory / "config.json").write_text(json.dumps(config))
        model = DepthAnything3Metric.from_pretrained(directory)
        assert not any(p.requires_grad for p in model.parameters()) and not model.training
        assert torch.equal(model.predict(reference["images"])[0], expected)


def test_a_config_naming_only_the_preset_gets_the_large_sizes(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_name": "da3metric-large"}))
    assert DA3MetricConfig.from_json(tmp_path / "config.json") == DA3MetricConfig()
    # So the tiny weights under it are refused, by name, against the large sizes.
    shutil.copy(TINY / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        DepthAnything3Metric.from_pretrained(tmp_path)
    message = str(err.value)
    assert "missing tensors (280): backbone.pretrained.blocks.10.attn.proj.bias" in message  # blocks 4..23
    assert "backbone.pretrained.blocks.0.attn.qkv.weight (file (192, 64), model (3072, 1024))" in message


def test_checkpoint_errors_name_the_problem(tmp_path):
    state = load_file(str(TINY / "model.safetensors"))
    wrong = dict(state)
    wrong["model.head.scratch.sky_output_conv2.2.wieght"] = wrong.pop(
        "model.head.scratch.sky_output_conv2.2.weight"
    )
    save_file(wrong, str(tmp_path / "model.safetensors"))
    shutil.copy(TINY / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError) as err:
        DepthAnything3Metric.from_pretrained(tmp_path)
    assert "missing tensors (1): head.scratch.sky_output_conv2.2.weight" in str(err.value)
    assert "unexpected tensors (1): head.scratch.sky_output_conv2.2.wieght" in str(err.value)

    config = json.loads((TINY / "config.json").read_text())
    for bad, named in (
        ({**config, "num_register_tokens": 4}, "num_register_tokens"),
        ({**config, "model_name": "da3-large"}, "da3-large"),
        ({**config, "sky_head": False}, "sky_head"),
        ({**config, "embed_dimension": 64}, "embed_dimension"),
        (
            {"model_type": "depth_anything", "depth_estimation_type": "metric"},
            "metric_teacher=depth-anything-v2",
        ),
    ):
        (tmp_path / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=named):
            DepthAnything3Metric.from_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        DepthAnything3Metric.from_pretrained(tmp_path)


def synthetic_clip(index: int, frames: int = 4) -> np.ndarray:
    scene = generate_scene(SynthConfig(scenes=1, frames=frames, width=112, height=84, seed=3), index)
    return np.stack([frame.rgb for frame in render_scene(scene)])


@pytest.fixture(scope="module")
def tiny_da3(tmp_path_factory):
    return write_tiny_da3_metric(tmp_path_factory.mktemp("da3") / "tiny-da3-metric", render_probe(0), seed=0)


@pytest.fixture(scope="module")
def demo_vggt(tmp_path_factory):
    """The demo's tiny VGGT: random, with fields of view kept positive (finite focal lengths)."""
    return write_tiny_vggt(tmp_path_factory.mktemp("vggt") / "vggt-tiny", seed=0)


def test_tiny_writer_is_seeded_and_its_outputs_vary(tiny_da3, tmp_path):
    again = write_tiny_da3_metric(tmp_path / "again", render_probe(0), seed=0)
    assert (again / "model.safetensors").read_bytes() == (tiny_da3 / "model.safetensors").read_bytes()
    other = write_tiny_da3_metric(tmp_path / "other", render_probe(1), seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny_da3 / "model.safetensors").read_bytes()
    model = DepthAnything3Metric.from_pretrained(tiny_da3)
    images = torch.stack([preprocess_clip(synthetic_clip(i), (84, 112)) for i in range(2)])
    depth, sky = model.predict(images)
    sky_fraction = float((sky >= SKY_THRESHOLD).float().mean())
    assert 0.01 < sky_fraction < 0.3  # some sky, mostly not
    assert 5.0 < float(depth.mean()) < 30.0  # 12 on the writer's probe
    assert float((depth.std(dim=(-2, -1)) / depth.mean(dim=(-2, -1))).mean()) > 0.02  # not a constant map


def test_labeler_fits_geovr_scale_with_tiny_da3(tiny_da3, demo_vggt):
    cfg = TeacherConfig(
        checkpoint=demo_vggt,
        image_long_side=112,
        feature_layers=(3,),
        dtype="float32",
        metric_checkpoint=tiny_da3,
        metric_min_pixels=100,
        metric_frames_per_call=3,
    )
    labeler = TeacherLabeler(cfg, "cpu")
    clips = [synthetic_clip(i) for i in range(2)]
    labels = labeler.label(clips)

    # The same chain recomputed independently: VGGT's full-resolution depth, DA3 on the teacher frames.
    vggt = VGGT.from_pretrained(demo_vggt)
    da3 = DepthAnything3Metric.from_pretrained(tiny_da3)
    for clip, label in zip(clips, labels, strict=True):
        images = preprocess_clip(clip, (84, 112))[None]
        with torch.inference_mode():
            out = vggt(images)
        canonical, sky = da3.predict(images)
        expected = clip_metric_scale(
            out["depth"][0, ..., 0],
            out["depth_conf"][0],
            canonical_to_metric(canonical[0], out["intrinsic"][0]),
            sky[0] < SKY_THRESHOLD,
            "least_squares",
            100,
        )
        assert label.scale_valid and expected.valid
        assert label.scale == pytest.approx(expected.scale, rel=1e-5)
        assert 0.5 < label.scale < 20.0  # metres per VGGT unit of a room-sized random teacher

    parts = labeler.fingerprint_parts()
    name, _, digest = parts["metric_teacher"].partition("@sha256:")
    assert name == "tiny-da3-metric" and len(digest) == 64
    rule = parts["preprocess"]["metric_scale"]
    assert rule["teacher"] == "da3-metric" and rule["fit"] == "least_squares" and rule["min_pixels"] == 100

    # The robust fit (tested on the reference above) is a named option; the fingerprint says so.
    # Too few pixels: no scale, no error.
    robust = TeacherLabeler(TeacherConfig(**{**cfg.__dict__, "metric_fit": "robust"}), "cpu")
    assert robust.fingerprint_parts()["preprocess"]["metric_scale"]["fit"] == "robust"
    strict = TeacherLabeler(TeacherConfig(**{**cfg.__dict__, "metric_min_pixels": 10**6}), "cpu")
    assert [(math.isnan(x.scale), x.scale_valid) for x in strict.label(clips)] == [(True, False)] * 2
    # The reference tiny-a VGGT predicts zero fields of view (infinite focal lengths) on most of these
    # frames: those frames' metric depth is not finite and drops out; no error, no infinite scale.
    infinite = TeacherLabeler(TeacherConfig(**{**cfg.__dict__, "checkpoint": TINY_VGGT}), "cpu")
    for label in infinite.label(clips):
        assert not np.isfinite(label.intrinsic[:, 0, 0]).all()
        assert (label.scale_valid and 0 < label.scale < np.inf) or (
            math.isnan(label.scale) and not label.scale_valid
        )
