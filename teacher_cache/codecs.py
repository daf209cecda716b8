"""Label codecs: how one clip's float32 labels become the compact arrays both store backends hold.

The encoded form (`EncodedClip`) is backend-independent: Zarr and WebDataset store the very same
arrays (each with lossless zstd on top), so converting a store copies encoded payloads bit for bit
and never compounds quantisation error. Decoding needs only the stored arrays, never the
`CodecConfig` that produced them.

Encodings (chosen by measurement, see `bench/cache_footprint.py`; S frames, L layers, (h, w) grid,
C channels, K = min(`feature_outlier_channels`, C), (Hd, Wd) depth size):

- features: per layer and channel the rms over the clip, `feat_channel_rms` (L, C) float32, divides
  the channels out, so that no channel dominates another. The K channels of largest rms per layer
  (ViT outlier channels, ~100x the rest) are kept as float16 of the normalised values,
  `feat_outliers` (S, L, h, w, K) at indices `feat_outlier_channels` (L, K) int16. The other
  channels are rounded to int8 `feat_q` (S, L, h, w, C; the outlier slots hold 0) with one step per
  token, `feat_token_step` (S, L, h, w) float32 = max(token rms / `feature_token_steps`,
  token absmax / 127): a fixed relative precision per token, so the cosine fidelity holds for
  weak tokens too, and no value is ever clipped. Typical int8 values are small, so zstd's entropy
  coder brings them to about 4.4 bits (cosine >= 0.998 per token on the quantised channels).
- depth: log-depth rounded to steps of `depth_log_step` (relative error at most step / 2) from a
  per-frame minimum, as uint16 values 0..65534; `depth_log_range` (S, 2) float32 holds (minimum,
  step). Stored as zigzag-coded differences along the width (`depth_q`), which zstd compresses to
  about a third. 65535 (`NO_DEPTH`) marks a pixel without depth (NaN: ground truth without a
  measurement there, `corpus.ground_truth`); teacher depth is always finite.
- depth_conf: log-confidence over 256 levels per frame (`conf_q` uint8, same zigzag differences),
  `conf_log_range` (S, 2) float32; relative error at most half a level (1.4% for a 1..1000 range).
- fusion (optional, Spatial-MLLM's fused tokens; `schema.ClipLabels.fusion`): the features codec
  above on (S, Lf, h, w, Cf), arrays `fuse_*`, with `fusion_outlier_channels` float16 channels.
  A clip either has all `fuse_*` arrays or none; one store may hold both feature sets.
- ground truth beside the teacher's labels (optional, `schema.ClipLabels.ground_truth`): per label
  field the codecs of its main arrays, arrays `gt_<name>` (`GROUND_TRUTH_ARRAYS`): depth `gt_depth_q`,
  `gt_depth_log_range`, `gt_conf_q`, `gt_conf_log_range`; camera `gt_pose_enc`, `gt_extrinsic`,
  `gt_intrinsic`; scale `gt_scale`, `gt_scale_valid`. A clip has all arrays of a label field or none.
- cameras (frame indices, timestamps, pose_enc, extrinsic, intrinsic, scale, scale_valid): lossless.
- frames_jpeg: the JPEG bytes as given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from geovr.teacher_cache.config import require
from geovr.teacher_cache.schema import LABEL_FIELDS, ClipLabels, SchemaError

CODEC_VERSION = "geovr-codecs-1"
NO_DEPTH = (1 << 16) - 1  # depth_q of a pixel without depth

# Encoded arrays by stored field; the first axis of a per-frame array is the clip's frames.
FRAME_ARRAYS: dict[str, tuple[str, ...]] = {
    "cameras": ("frame_indices", "timestamps", "pose_enc", "extrinsic", "intrinsic"),
    "features": ("feat_q", "feat_token_step", "feat_outliers"),
    "depth": ("depth_q", "depth_log_range"),
    "depth_conf": ("conf_q", "conf_log_range"),
    "fusion": ("fuse_q", "fuse_token_step", "fuse_outliers"),
    "ground_truth": ("gt_pose_enc", "gt_extrinsic", "gt_intrinsic", "gt_depth_q", "gt_depth_log_range",
                     "gt_conf_q", "gt_conf_log_range"),
}  # fmt: skip
# Per-clip arrays (no frame axis).
CLIP_ARRAYS: dict[str, tuple[str, ...]] = {
    "cameras": ("scale", "scale_valid"),
    "features": ("feat_channel_rms", "feat_outlier_channels"),
    "fusion": ("fuse_channel_rms", "fuse_outlier_channels"),
    "ground_truth": ("gt_scale", "gt_scale_valid"),
}
# Fields a clip may lack (fusion: all of its arrays or none; ground_truth: per label field).
OPTIONAL_FIELDS = ("fusion", "ground_truth")
# The ground-truth arrays of each label field (`schema.LABEL_FIELDS`).
GROUND_TRUTH_ARRAYS: dict[str, tuple[str, ...]] = {
    "depth": ("gt_depth_q", "gt_depth_log_range", "gt_conf_q", "gt_conf_log_range"),
    "camera": ("gt_pose_enc", "gt_extrinsic", "gt_intrinsic"),
    "scale": ("gt_scale", "gt_scale_valid"),
}
ARRAY_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(dtype)
    for name, dtype in {
        "frame_indices": "int64",
        "timestamps": "float64",
        "pose_enc": "float32",
        "extrinsic": "float32",
        "intrinsic": "float32",
        "scale": "float64",
        "scale_valid": "bool",
        "feat_q": "int8",
        "feat_token_step": "float32",
        "feat_outliers": "float16",
        "feat_channel_rms": "float32",
        "feat_outlier_channels": "int16",
        "depth_q": "uint16",
        "depth_log_range": "float32",
        "conf_q": "uint8",
        "conf_log_range": "float32",
        "fuse_q": "int8",
        "fuse_token_step": "float32",
        "fuse_outliers": "float16",
        "fuse_channel_rms": "float32",
        "fuse_outlier_channels": "int16",
    }.items()
}
# A ground-truth array has the dtype of the main array it stands beside.
ARRAY_DTYPES |= {
    n: ARRAY_DTYPES[n.removeprefix("gt_")] for group in GROUND_TRUTH_ARRAYS.values() for n in group
}
# Fields as reported in byte counts: the array groups above plus the JPEG frames.
FIELDS = ("frames_jpeg", "features", "depth", "depth_conf", "cameras", "fusion", "ground_truth")


def field_of(array_name: str) -> str:
    """The stored field an encoded array belongs to."""
    for groups in (FRAME_ARRAYS, CLIP_ARRAYS):
        for name, arrays in groups.items():
            if array_name in arrays:
                return name
    raise KeyError(array_name)


@dataclass(frozen=True)
class CodecConfig:
    """Precision knobs of the encoders (recorded in `store.json`; decoding does not need them).

    Attributes:
        feature_token_steps: int8 steps per token rms; 5 gives cosine >= 0.998 on the quantised
            channels (error rms / signal rms = 1 / (sqrt(12) * 5)).
        feature_outlier_channels: channels per layer kept in float16 (the largest rms).
        fusion_outlier_channels: the same for the fusion features (2048 channels of VGGT-1B's raw
            residual stream, frame and global halves: 8 per half, each may have its own).
        depth_log_step: log-depth step; relative error at most half of it (2**-10: <= 0.05%).
        zstd_level: level of the lossless zstd applied by both backends. Level 2 was measured best on
            int8 features: levels >= 3 search for matches that cost entropy-coding efficiency there
            (level 3: 2% larger and 4x slower to encode; level 5: 5% larger, 10x slower).
    """

    feature_token_steps: float = 5.0
    feature_outlier_channels: int = 8
    fusion_outlier_channels: int = 16
    depth_log_step: float = 2.0**-10
    zstd_level: int = 2

    def validate(self) -> None:
        require(self.feature_token_steps > 0, "codecs.feature_token_steps must be > 0")
        require(self.feature_outlier_channels >= 0, "codecs.feature_outlier_channels must be >= 0")
        require(self.fusion_outlier_channels >= 0, "codecs.fusion_outlier_channels must be >= 0")
        require(0 < self.depth_log_step <= 0.01, "codecs.depth_log_step must be in (0, 0.01]")
        require(1 <= self.zstd_level <= 22, "codecs.zstd_level must be in 1..22")

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": CODEC_VERSION,
            "feature_token_steps": self.feature_token_steps,
            "feature_outlier_channels": self.feature_outlier_channels,
            "fusion_outlier_channels": self.fusion_outlier_channels,
            "depth_log_step": self.depth_log_step,
            "zstd_level": self.zstd_level,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "codecs") -> CodecConfig:
        version = data.get("version", CODEC_VERSION)
        if version != CODEC_VERSION:
            raise SchemaError(f"{where}: codec version {version!r}, this code reads {CODEC_VERSION!r}")
        unknown = sorted(set(data) - {"version", *cls.__dataclass_fields__})
        if unknown:
            raise SchemaError(f"{where}: unknown codec settings {', '.join(unknown)}")
        config = cls(**{k: v for k, v in data.items() if k != "version"})
        config.validate()
        return config


@dataclass
class EncodedClip:
    """One clip in stored form: what a backend writes and reads back, bit for bit.

    Attributes:
        clip_id, video, meta: as in `ClipLabels`.
        frames_jpeg: S JPEG frames.
        arrays: every name of `FRAME_ARRAYS` (leading axis S) and `CLIP_ARRAYS`, dtypes `ARRAY_DTYPES`;
            the fusion arrays all or none, the ground-truth arrays of a label field all or none.
    """

    clip_id: str
    video: str
    meta: dict[str, Any]
    frames_jpeg: list[bytes]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return len(self.frames_jpeg)

    @property
    def has_fusion(self) -> bool:
        return "fuse_q" in self.arrays

    @property
    def ground_truth_fields(self) -> tuple[str, ...]:
        """The label fields whose ground truth the clip holds (`GROUND_TRUTH_ARRAYS`)."""
        return tuple(name for name in LABEL_FIELDS if GROUND_TRUTH_ARRAYS[name][0] in self.arrays)

    def geometry(self) -> str:
        """Key of the label shapes (depth and feature grids) and of the optional arrays the clip holds
        (`_u...`: fusion; `_gt` + initials of the label fields: ground truth, e.g. `_gtdcs`); clips of
        one key stack along frames."""
        _, hd, wd = self.arrays["depth_q"].shape
        _, layers, h, w, channels = self.arrays["feat_q"].shape
        outliers = self.arrays["feat_outliers"].shape[-1]
        key = f"d{hd}x{wd}_f{layers}x{h}x{w}x{channels}k{outliers}"
        if self.has_fusion:
            _, layers, h, w, channels = self.arrays["fuse_q"].shape
            key += f"_u{layers}x{h}x{w}x{channels}k{self.arrays['fuse_outliers'].shape[-1]}"
        if self.ground_truth_fields:
            key += "_gt" + "".join(name[0] for name in self.ground_truth_fields)
        return key

    def validate(self) -> None:
        """Check names, dtypes and frame counts; raise `SchemaError` naming the clip and array."""
        expected = {
            n
            for groups in (FRAME_ARRAYS, CLIP_ARRAYS)
            for name, group in groups.items()
            if name not in OPTIONAL_FIELDS or (name == "fusion" and self.has_fusion)
            for n in group
        }
        expected |= {n for name in self.ground_truth_fields for n in GROUND_TRUTH_ARRAYS[name]}
        if set(self.arrays) != expected:
            raise SchemaError(
                f"clip {self.clip_id}: encoded arrays {sorted(self.arrays)} != expected {sorted(expected)}"
            )
        for name, array in self.arrays.items():
            if array.dtype != ARRAY_DTYPES[name]:
                raise SchemaError(
                    f"clip {self.clip_id}: {name} is {array.dtype}, expected {ARRAY_DTYPES[name]}"
                )
        for arrays in FRAME_ARRAYS.values():
            for name in (n for n in arrays if n in self.arrays):
                if self.arrays[name].shape[0] != self.num_frames:
                    raise SchemaError(
                        f"clip {self.clip_id}: {name} has {self.arrays[name].shape[0]} frames, "
                        f"expected {self.num_frames}"
                    )


def zstd_failure(err: Exception) -> str | None:
    """zstd's reason when `err` is a failed zstd decompression (a damaged frame, or one whose content
    checksum does not match), e.g. "Restored data doesn't match checksum"; else None."""
    _, found, reason = str(err).partition("Zstd decompression error: ")
    return reason.strip().removeprefix("b").strip("'\"") if found else None


def _check_finite(clip_id: str, name: str, array: np.ndarray) -> None:
    if not np.all(np.isfinite(array)):
        raise SchemaError(f"clip {clip_id}: field {name} has non-finite values")


# ---------------------------------------------------------------------------------------------
# features


def encode_features(features: np.ndarray, token_steps: float, outlier_channels: int) -> dict[str, np.ndarray]:
    """(S, L, h, w, C) float32 -> feat_q, feat_token_step, feat_outliers, feat_channel_rms,
    feat_outlier_channels (see the module docstring)."""
    x = np.asarray(features, dtype=np.float32)
    channels = x.shape[-1]
    k = min(outlier_channels, channels)
    sum_sq = np.einsum("slhwc,slhwc->lc", x, x, dtype=np.float64)
    channel_rms = np.sqrt(sum_sq / (x.size // (x.shape[1] * channels))).astype(np.float32)
    channel_rms[channel_rms == 0] = 1.0  # a dead channel: any positive scale decodes its zeros
    z = x / channel_rms[None, :, None, None, :]

    # The k largest-rms channels of each layer, ascending indices, (L, k).
    top = np.sort(np.argsort(-channel_rms, axis=-1, kind="stable")[:, :k], axis=-1)
    top_index = np.broadcast_to(top[None, :, None, None, :], (*z.shape[:-1], k))
    outliers = np.take_along_axis(z, top_index, axis=-1).astype(np.float16)
    np.put_along_axis(z, top_index, 0.0, axis=-1)

    quantised = max(channels - k, 1)
    token_rms = np.sqrt(np.einsum("...c,...c->...", z, z) / quantised)
    absmax = np.maximum(z.max(axis=-1), -z.min(axis=-1))
    step = np.maximum(token_rms / token_steps, absmax / 127.0)
    step[step == 0] = 1.0  # an all-zero token
    z /= step[..., None]  # in place: z is our own copy (132 MB for a 32-frame GeoVR clip)
    np.rint(z, out=z)
    q = np.clip(z, -127, 127, out=z).astype(np.int8)
    return {
        "feat_q": q,
        "feat_token_step": step.astype(np.float32),
        "feat_outliers": outliers,
        "feat_channel_rms": channel_rms,
        "feat_outlier_channels": top.astype(np.int16),
    }


def decode_features(
    feat_q: np.ndarray,
    feat_token_step: np.ndarray,
    feat_outliers: np.ndarray,
    feat_channel_rms: np.ndarray,
    feat_outlier_channels: np.ndarray,
) -> np.ndarray:
    """Inverse of `encode_features`: (S, L, h, w, C) float32."""
    out = np.multiply(feat_q, feat_token_step[..., None], dtype=np.float32)
    if feat_outliers.shape[-1]:
        index = np.broadcast_to(
            feat_outlier_channels.astype(np.int64)[None, :, None, None, :], feat_outliers.shape
        )
        np.put_along_axis(out, index, feat_outliers.astype(np.float32), axis=-1)
    out *= feat_channel_rms[None, :, None, None, :]
    return out


# ---------------------------------------------------------------------------------------------
# depth and confidence: log-quantised, zigzag differences along the width


def _zigzag_delta(q: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned `bits`-bit (..., W) -> zigzag-coded differences along W (modulo 2**bits), same dtype."""
    mask = (1 << bits) - 1
    d = np.diff(q.astype(np.int64), axis=-1, prepend=0)
    d = ((d + (1 << (bits - 1))) & mask) - (1 << (bits - 1))  # wrap to signed bits-bit
    return (((d << 1) ^ (d >> 63)) & mask).astype(q.dtype)


def _undo_zigzag_delta(u: np.ndarray, bits: int) -> np.ndarray:
    mask = (1 << bits) - 1
    # Partial sums are bounded by W * 2**bits: int32 holds them for any W below 2**(31 - bits).
    wide = np.int32 if u.shape[-1] < (1 << (31 - bits)) else np.int64
    v = u.astype(wide)
    d = (v >> 1) ^ -(v & 1)
    return (np.cumsum(d, axis=-1, dtype=wide) & mask).astype(u.dtype)


def _log_quantise(x: np.ndarray, levels: int, min_step: float) -> tuple[np.ndarray, np.ndarray]:
    """(S, H, W) positive -> (q in [0, levels), (S, 2) float32 [log minimum, step] per frame).
    NaN pixels are left out of the range and come out as NaN in q."""
    log_x = np.log(np.maximum(x, np.finfo(np.float32).tiny)).astype(np.float32)
    empty = np.isnan(log_x).all(axis=(1, 2))  # a frame without any value: any range will do
    ranged = np.where(empty[:, None, None], 0.0, log_x) if empty.any() else log_x
    low = np.nanmin(ranged, axis=(1, 2)).astype(np.float32)
    span = np.nanmax(ranged, axis=(1, 2)) - low
    step = np.maximum(span / (levels - 1), min_step).astype(np.float32)
    step[step == 0] = 1.0  # a constant frame
    q = np.rint((log_x - low[:, None, None]) / step[:, None, None])
    return np.clip(q, 0, levels - 1), np.stack([low, step], axis=1)


def _log_dequantise(q: np.ndarray, log_range: np.ndarray) -> np.ndarray:
    low, step = log_range[:, 0, None, None], log_range[:, 1, None, None]
    return np.exp(q.astype(np.float32) * step + low)


def encode_depth(depth: np.ndarray, log_step: float) -> dict[str, np.ndarray]:
    """(S, Hd, Wd) positive float32, NaN where there is no depth -> depth_q uint16, depth_log_range (S, 2)."""
    q, log_range = _log_quantise(depth, NO_DEPTH, log_step)
    q = np.where(np.isnan(q), NO_DEPTH, q)
    return {"depth_q": _zigzag_delta(q.astype(np.uint16), 16), "depth_log_range": log_range}


def decode_depth(depth_q: np.ndarray, depth_log_range: np.ndarray) -> np.ndarray:
    q = _undo_zigzag_delta(depth_q, 16)
    depth = _log_dequantise(q, depth_log_range)
    depth[q == NO_DEPTH] = np.nan
    return depth


def encode_confidence(conf: np.ndarray) -> dict[str, np.ndarray]:
    """(S, Hd, Wd) positive float32 -> conf_q uint8, conf_log_range (S, 2)."""
    q, log_range = _log_quantise(conf, 1 << 8, 0.0)
    return {"conf_q": _zigzag_delta(q.astype(np.uint8), 8), "conf_log_range": log_range}


def decode_confidence(conf_q: np.ndarray, conf_log_range: np.ndarray) -> np.ndarray:
    return _log_dequantise(_undo_zigzag_delta(conf_q, 8), conf_log_range)


# ---------------------------------------------------------------------------------------------
# whole clips


def encode_clip(clip: ClipLabels, config: CodecConfig) -> EncodedClip:
    """Validate and encode one clip; raises `SchemaError` naming the clip and field on bad input."""
    clip.validate()
    for name in ("pose_enc", "extrinsic", "intrinsic", "features", "depth_conf"):
        _check_finite(clip.clip_id, name, getattr(clip, name))
    # Ground-truth depth has pixels without a measurement (NaN); the teacher's never does.
    ground_truth = clip.meta.get("label_sources", {}).get("depth") == "gt"
    _check_finite(clip.clip_id, "depth", np.nan_to_num(clip.depth, nan=1.0) if ground_truth else clip.depth)
    arrays: dict[str, np.ndarray] = {
        "frame_indices": np.asarray(clip.frame_indices, dtype=np.int64),
        "timestamps": np.asarray(clip.timestamps, dtype=np.float64),
        "pose_enc": np.asarray(clip.pose_enc, dtype=np.float32),
        "extrinsic": np.asarray(clip.extrinsic, dtype=np.float32),
        "intrinsic": np.asarray(clip.intrinsic, dtype=np.float32),
        "scale": np.asarray(clip.scale, dtype=np.float64),
        "scale_valid": np.asarray(bool(clip.scale_valid)),
    }
    arrays.update(encode_features(clip.features, config.feature_token_steps, config.feature_outlier_channels))
    if clip.fusion is not None:
        _check_finite(clip.clip_id, "fusion", clip.fusion)
        fused = encode_features(clip.fusion, config.feature_token_steps, config.fusion_outlier_channels)
        arrays.update({"fuse_" + name.removeprefix("feat_"): value for name, value in fused.items()})
    arrays.update(encode_depth(clip.depth, config.depth_log_step))
    arrays.update(encode_confidence(clip.depth_conf))
    arrays.update(encode_ground_truth(clip, config.depth_log_step))
    return EncodedClip(
        clip_id=clip.clip_id,
        video=clip.video,
        meta=dict(clip.meta),
        frames_jpeg=[bytes(f) for f in clip.frames_jpeg],
        arrays=arrays,
    )


def decode_clip(encoded: EncodedClip) -> ClipLabels:
    """Encoded arrays back to float32 `ClipLabels` (`ClipLabels.validate` passes on the result)."""
    encoded.validate()
    a = encoded.arrays
    return ClipLabels(
        clip_id=encoded.clip_id,
        video=encoded.video,
        frame_indices=a["frame_indices"],
        timestamps=a["timestamps"],
        frames_jpeg=list(encoded.frames_jpeg),
        pose_enc=a["pose_enc"],
        extrinsic=a["extrinsic"],
        intrinsic=a["intrinsic"],
        depth=decode_depth(a["depth_q"], a["depth_log_range"]),
        depth_conf=decode_confidence(a["conf_q"], a["conf_log_range"]),
        scale=float(a["scale"]),
        scale_valid=bool(a["scale_valid"]),
        features=decode_features(
            a["feat_q"],
            a["feat_token_step"],
            a["feat_outliers"],
            a["feat_channel_rms"],
            a["feat_outlier_channels"],
        ),
        meta=dict(encoded.meta),
        fusion=_decode_fusion(a) if encoded.has_fusion else None,
        ground_truth=_decode_ground_truth(encoded),
    )


def _decode_fusion(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """(S, Lf, h, w, Cf) float32 fusion features from the `fuse_*` arrays."""
    names = ("q", "token_step", "outliers", "channel_rms", "outlier_channels")
    return decode_features(*(arrays[f"fuse_{name}"] for name in names))


def encode_ground_truth(clip: ClipLabels, depth_log_step: float) -> dict[str, np.ndarray]:
    """The `gt_*` arrays of the clip's ground-truth group (`GROUND_TRUTH_ARRAYS`; none without one):
    each label field in the codec of its main arrays."""
    truth, arrays = clip.ground_truth or {}, {}
    if "depth" in truth:  # no measurement (NaN) is kept; the confidence is finite
        depth = np.asarray(truth["depth"], dtype=np.float32)
        _check_finite(clip.clip_id, "ground_truth.depth", np.nan_to_num(depth, nan=1.0))
        _check_finite(clip.clip_id, "ground_truth.depth_conf", truth["depth_conf"])
        arrays |= encode_depth(depth, depth_log_step)
        arrays |= encode_confidence(np.asarray(truth["depth_conf"], dtype=np.float32))
    if "pose_enc" in truth:
        for name in ("pose_enc", "extrinsic", "intrinsic"):
            _check_finite(clip.clip_id, f"ground_truth.{name}", truth[name])
            arrays[name] = np.asarray(truth[name], dtype=np.float32)
    if "scale" in truth:
        arrays["scale"] = np.asarray(truth["scale"], dtype=np.float64)
        arrays["scale_valid"] = np.asarray(bool(truth["scale_valid"]))
    return {f"gt_{name}": value for name, value in arrays.items()}


def _decode_ground_truth(encoded: EncodedClip) -> dict[str, Any] | None:
    """`ClipLabels.ground_truth` from the `gt_*` arrays; None when the clip holds none."""
    fields = encoded.ground_truth_fields
    if not fields:
        return None
    a = {name.removeprefix("gt_"): value for name, value in encoded.arrays.items() if name.startswith("gt_")}
    truth: dict[str, Any] = {}
    if "depth" in fields:
        truth["depth"] = decode_depth(a["depth_q"], a["depth_log_range"])
        truth["depth_conf"] = decode_confidence(a["conf_q"], a["conf_log_range"])
    if "camera" in fields:
        truth |= {name: a[name] for name in ("pose_enc", "extrinsic", "intrinsic")}
    if "scale" in fields:
        truth |= {"scale": float(a["scale"]), "scale_valid": bool(a["scale_valid"])}
    return truth
