"""Label codecs: fidelity bounds of the lossy encodings, exactness of the lossless parts."""

from __future__ import annotations

import numpy as np
import pytest

from geovr.teacher_cache.codecs import (
    CodecConfig,
    _undo_zigzag_delta,
    _zigzag_delta,
    decode_confidence,
    decode_depth,
    decode_features,
    encode_confidence,
    encode_depth,
    encode_features,
)
from geovr.teacher_cache.schema import SchemaError


def token_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    with np.errstate(invalid="ignore"):  # all-zero tokens give NaN; callers mask them
        return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def features_with_outliers(rng: np.random.Generator, shape=(4, 2, 5, 6, 64), outliers=(3, 40)) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32) * np.exp(rng.normal(0, 0.5, shape[-1])).astype(
        np.float32
    )
    x[..., list(outliers)] *= 100.0
    return x


def test_features_keep_cosine_with_outlier_channels_and_weak_tokens():
    rng = np.random.default_rng(0)
    x = features_with_outliers(rng)
    x[1, 0, 2] *= 1e-3  # a token a thousand times weaker than the rest keeps its own precision
    enc = encode_features(x, token_steps=5.0, outlier_channels=4)
    assert enc["feat_q"].dtype == np.int8 and enc["feat_outliers"].shape == (4, 2, 5, 6, 4)
    assert set(enc["feat_outlier_channels"][0].tolist()) >= {3, 40}  # the 100x channels go to float16
    y = decode_features(**enc)
    assert y.dtype == np.float32 and y.shape == x.shape
    cos = token_cosine(x, y)
    assert cos.min() >= 0.995, cos.min()
    inliers = np.setdiff1d(np.arange(64), [3, 40])
    assert token_cosine(x[..., inliers], y[..., inliers]).min() >= 0.995
    # Outlier channels are float16 of the normalised value: relative error ~ 2**-11.
    np.testing.assert_allclose(y[..., [3, 40]], x[..., [3, 40]], rtol=2e-3, atol=1e-3)


def test_features_never_clip_a_massive_value_and_handle_zero_tokens_and_channels():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 1, 3, 3, 32)).astype(np.float32)
    x[0, 0, 1, 1, 7] = 5000.0  # one massive activation inside an ordinary channel and token
    x[1, 0, 2, 2] = 0.0  # an all-zero token
    x[..., 9] = 0.0  # a dead channel
    enc = encode_features(x, token_steps=5.0, outlier_channels=0)
    y = decode_features(**enc)
    assert np.all(np.isfinite(y))
    assert abs(y[0, 0, 1, 1, 7] - 5000.0) / 5000.0 < 0.01
    assert np.all(y[1, 0, 2, 2] == 0) and np.all(y[..., 9] == 0)
    # Its channel's rms is ~1000x the others, so that channel belongs in the float16 outliers.
    y = decode_features(**encode_features(x, token_steps=5.0, outlier_channels=1))
    nonzero = np.linalg.norm(x.reshape(-1, 32), axis=1) > 0
    assert token_cosine(x, y)[nonzero].min() >= 0.995


def test_depth_log_quantisation_relative_error_bound():
    rng = np.random.default_rng(2)
    depth = np.exp(rng.uniform(np.log(0.05), np.log(80.0), (3, 12, 16))).astype(np.float32)
    step = 2.0**-10
    enc = encode_depth(depth, step)
    assert enc["depth_q"].dtype == np.uint16 and enc["depth_log_range"].shape == (3, 2)
    rel = np.abs(decode_depth(**enc) / depth - 1)
    assert rel.max() <= step / 2 * 1.01
    # A range wider than 65536 steps widens the step instead of clipping.
    wide = np.stack([np.full((4, 4), 1e-6), np.full((4, 4), 1e6), np.ones((4, 4))])[None].reshape(1, 12, 4)
    back = decode_depth(**encode_depth(wide.astype(np.float32), step))
    np.testing.assert_allclose(back, wide, rtol=1e-3)


def test_confidence_uint8_log_levels():
    rng = np.random.default_rng(3)
    conf = (1 + np.exp(rng.normal(1, 2, (2, 12, 16)))).astype(np.float32)
    enc = encode_confidence(conf)
    assert enc["conf_q"].dtype == np.uint8
    back = decode_confidence(**enc)
    log_step = enc["conf_log_range"][:, 1, None, None]
    assert np.all(np.abs(np.log(back) - np.log(conf)) <= log_step / 2 + 1e-5)
    constant = np.full((1, 3, 3), 7.0, np.float32)
    np.testing.assert_allclose(decode_confidence(**encode_confidence(constant)), constant, rtol=1e-6)


@pytest.mark.parametrize("dtype,bits", [(np.uint16, 16), (np.uint8, 8)])
def test_zigzag_delta_is_lossless_at_the_extremes(dtype, bits):
    rng = np.random.default_rng(4)
    top = (1 << bits) - 1
    q = rng.integers(0, top + 1, (3, 5, 40)).astype(dtype)
    q[0, 0, :4] = [0, top, 0, top]
    coded = _zigzag_delta(q, bits)
    assert coded.dtype == dtype
    np.testing.assert_array_equal(_undo_zigzag_delta(coded, bits), q)
    smooth = np.cumsum(np.ones((2, 3, 50), dtype=np.int64), axis=-1).astype(dtype)
    assert _zigzag_delta(smooth, bits)[..., 1:].max() == 2  # a ramp of +1 becomes zigzag 2


def test_codec_config_round_trip_and_refusals():
    config = CodecConfig(feature_token_steps=6.0, depth_log_step=2.0**-12)
    assert CodecConfig.from_dict(config.to_dict()) == config
    with pytest.raises(SchemaError, match="codec version"):
        CodecConfig.from_dict({**config.to_dict(), "version": "geovr-codecs-0"})
    with pytest.raises(SchemaError, match="unknown codec settings"):
        CodecConfig.from_dict({"bits": 4})
    with pytest.raises(ValueError, match="depth_log_step"):
        CodecConfig.from_dict({"depth_log_step": 0.5})
