"""The fusion feature set in the store: encoded with the features codec beside the distillation
features (one store holds both), in both backends, read back bit for bit after a conversion; a clip
without it reads back without it; a partial set of fusion arrays is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from geovr.teacher_cache.codecs import CodecConfig, decode_clip, encode_clip
from geovr.teacher_cache.convert import convert_store
from geovr.teacher_cache.schema import SchemaError
from geovr.teacher_cache.store import open_store, open_writer
from geovr.teacher_cache.verify import store_stats, verify_store
from tests.helpers import clip_labels
from tests.test_cache_store import FINGERPRINT


def fusion_clip(index: int, fusion: bool = True, frames: int = 4):
    """A clip with (S, 1, 4, 6, 64) fusion features (two 50x outlier channels, one per half)."""
    rng = np.random.default_rng(index)
    features = rng.standard_normal((frames, 1, 4, 6, 64)).astype(np.float32)
    features[..., 3] *= 50.0
    features[..., 40] *= 50.0
    return clip_labels(
        frames,
        clip_id=f"{index:016x}",
        video=f"scene_{index}.mp4",
        seed=index,
        fusion=features if fusion else None,
    )


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_codec_round_trip_and_refusals() -> None:
    clip = fusion_clip(1)
    encoded = encode_clip(clip, CodecConfig(fusion_outlier_channels=4))
    assert encoded.has_fusion and encoded.arrays["fuse_q"].dtype == np.int8
    assert encoded.arrays["fuse_outlier_channels"].tolist() == [
        sorted(encoded.arrays["fuse_outlier_channels"][0])
    ]
    assert {3, 40} <= set(encoded.arrays["fuse_outlier_channels"][0].tolist())
    assert encoded.geometry().endswith("_u1x4x6x64k4")
    decoded = decode_clip(encoded)
    assert decoded.fusion.shape == clip.fusion.shape
    assert cosine(decoded.fusion, clip.fusion).min() > 0.998
    np.testing.assert_allclose(
        decoded.features, decode_clip(encode_clip(fusion_clip(1, False), CodecConfig())).features
    )
    plain = encode_clip(fusion_clip(2, fusion=False), CodecConfig())
    assert not plain.has_fusion and decode_clip(plain).fusion is None
    del encoded.arrays["fuse_outliers"]
    with pytest.raises(SchemaError, match="encoded arrays"):
        encoded.validate()
    bad = fusion_clip(3)
    bad.fusion[0, 0, 0, 0, 0] = np.nan
    with pytest.raises(SchemaError, match="field fusion has non-finite values"):
        encode_clip(bad, CodecConfig())


@pytest.mark.parametrize("store_format", ["zarr", "wds"])
def test_store_holds_both_feature_sets(tmp_path: Path, store_format: str) -> None:
    """Clips with and without fusion features in one shard; read by id, streamed, verified, counted,
    converted to the other backend bit for bit."""
    store = tmp_path / "store"
    clips = [fusion_clip(1), fusion_clip(2, fusion=False), fusion_clip(3)]
    open_writer(store, FINGERPRINT, store_format).write_shard("000000", clips, [])
    reader = open_store(store)
    for clip in clips:
        back = reader.read_clip(clip.clip_id)
        assert back.features.shape == clip.features.shape
        if clip.fusion is None:
            assert back.fusion is None
        else:
            assert cosine(back.fusion, clip.fusion).min() > 0.998
    streamed = {c.clip_id: c for c in reader.iter_shard_encoded("000000")}
    assert [streamed[c.clip_id].has_fusion for c in clips] == [True, False, True]
    assert verify_store(store).ok
    stats = store_stats(store)
    assert stats["bytes"]["fusion"] > 0 and stats["bytes"]["features"] > 0
    other = "wds" if store_format == "zarr" else "zarr"
    convert_store(store, tmp_path / "converted", other)
    converted = open_store(tmp_path / "converted")
    for clip in clips:
        a, b = reader.read_encoded(clip.clip_id), converted.read_encoded(clip.clip_id)
        assert set(a.arrays) == set(b.arrays)
        assert all(np.array_equal(a.arrays[name], b.arrays[name]) for name in a.arrays)
