"""The label schema: what the cache holds for one clip, and the store-level fingerprint.

This is the contract between precompute (writer) and training/eval (readers). Shapes use
S = sampled frames of the clip, L = distilled teacher layers, (Ht, Wt) = teacher image size
(e.g. 392x504 for a 640x480 video), (Hd, Wd) = depth resolution (half the teacher's, 196x252),
(h, w) = pooled feature grid (teacher patch grid / 2, 14x18), C = feature channels (1024 for
VGGT-1B: the frame-attention half of the aggregator tokens). Optional, Spatial-MLLM's fusion
features (`ClipLabels.fusion`): Lf fused layers at full width (2C) on the student's patch grid.
Optional, the ground truth stored beside the teacher's labels (`ClipLabels.ground_truth`, a store
whose label source is "both" for a field): the same keys and shapes as the label fields they stand
for (`LABEL_FIELD_KEYS`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SCHEMA_VERSION = 1

# The label fields a store can take from the teacher, the ground truth or both
# (`pipeline.config.PrecomputeConfig.depth_source` ...), and the `ClipLabels` keys each one covers.
LABEL_FIELDS = ("depth", "camera", "scale")
LABEL_FIELD_KEYS = {
    "depth": ("depth", "depth_conf"),
    "camera": ("pose_enc", "extrinsic", "intrinsic"),
    "scale": ("scale", "scale_valid"),
}


class SchemaError(ValueError):
    """A clip or a store does not follow this schema; the message names the clip or store and field."""


class DamagedClipError(SchemaError):
    """The stored data of one clip is missing or damaged (a missing chunk, a failed checksum, a broken tar).

    The message is one line naming the store, the shard, the clip, the field and the problem, e.g.
    `store /data/cache: shard 000003 clip 9f2c1e0a5b7d3c68: field extrinsic: chunk file missing (...)`.
    """

    def __init__(self, store: str, shard: str, clip_id: str, field: str, problem: str):
        self.store, self.shard, self.clip_id, self.field = str(store), shard, clip_id, field
        self.problem = " ".join(str(problem).split())  # one line, whatever the underlying error printed
        super().__init__(f"store {self.store}: shard {shard} clip {clip_id}: field {field}: {self.problem}")

    def __reduce__(self) -> tuple[type, tuple[str, str, str, str, str]]:
        return type(self), (self.store, self.shard, self.clip_id, self.field, self.problem)


class DamagedShardError(SchemaError):
    """A committed shard cannot be opened at all (its data is missing, its metadata is damaged): every
    clip of it is damaged; `for_clip` gives the error of one of them."""

    def __init__(self, store: str, shard: str, field: str, problem: str):
        self.store, self.shard, self.field = str(store), shard, field
        self.problem = " ".join(str(problem).split())
        super().__init__(f"store {self.store}: shard {shard}: field {field}: {self.problem}")

    def __reduce__(self) -> tuple[type, tuple[str, str, str, str]]:
        return type(self), (self.store, self.shard, self.field, self.problem)

    def for_clip(self, clip_id: str) -> DamagedClipError:
        return DamagedClipError(self.store, self.shard, clip_id, self.field, self.problem)


@dataclass
class ClipLabels:
    """Teacher labels of one clip, decoded (float32 arrays), as the student reads them.

    Attributes:
        clip_id: stable id, a hash of (video path relative to the corpus root, sampling policy).
        video: the video path relative to the corpus root.
        frame_indices: (S,) int64 indices of the sampled frames in the decoded video.
        timestamps: (S,) float64 presentation times of the sampled frames, seconds.
        frames_jpeg: S JPEG-encoded RGB frames at the student's resolution.
        pose_enc: (S, 9) float32 VGGT pose encoding (see `geometry`), first camera = identity.
        extrinsic: (S, 3, 4) float32 camera-from-world, OpenCV axes.
        intrinsic: (S, 3, 3) float32 pinhole intrinsics in pixels of the teacher image.
        depth: (S, Hd, Wd) float32 teacher depth (VGGT's normalised units).
        depth_conf: (S, Hd, Wd) float32 teacher confidence (>= 1).
        scale: metric scale, metres per VGGT unit (metric_depth ≈ scale * depth); NaN if invalid.
        scale_valid: whether `scale` is usable (enough non-sky confident pixels, metric model run).
        features: (S, L, h, w, C) float32 pooled frame-attention features of the distilled layers.
        meta: JSON-able clip metadata. Precompute writes `source_size` [W, H], `rotation`,
            `source_frames`, `source_fps`, `student_size` [W, H] (of `frames_jpeg`), `teacher_size`
            [W, H] (the image `intrinsic` refers to), and when they apply `space_aware` (candidate and
            selected frame indices) and `split` (how a clip too long for the teacher was labelled in
            halves). Orientation: every frame, size and label is of the video *as players show it*:
            `rotation` is the counterclockwise angle in degrees (0, 90, 180 or 270, PyAV's
            `VideoFrame.rotation` convention) by which the stream's display matrix rotates the stored
            frames, already applied at decode; `source_size` is the displayed size (a phone's
            portrait 1920x1080 stream with rotation 270 has source_size [1080, 1920]).
        fusion: (S, Lf, h, w, Cf) float32 Spatial-MLLM fusion features, or None when the store holds
            none: the full-width (frame and global halves, Cf = 2 * C) patch tokens of the fused
            aggregator layers, from a teacher pass at 7/8 of the student frame size, so that (h, w)
            is the student's unmerged 16-pixel patch grid (`pipeline.labeler`'s docstring).
        ground_truth: the clip's ground-truth labels stored beside the teacher's (whose they are in
            the fields above), or None: keys = the `LABEL_FIELD_KEYS` of the label fields whose
            source is "both" (`meta["label_sources"]`), values as the fields of the same name
            (ground-truth depth is NaN where the sensor measured none). A clip that fell back to the
            teacher in precompute has none.
    """

    clip_id: str
    video: str
    frame_indices: np.ndarray
    timestamps: np.ndarray
    frames_jpeg: list[bytes]
    pose_enc: np.ndarray
    extrinsic: np.ndarray
    intrinsic: np.ndarray
    depth: np.ndarray
    depth_conf: np.ndarray
    scale: float
    scale_valid: bool
    features: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    fusion: np.ndarray | None = None
    ground_truth: dict[str, Any] | None = None

    @property
    def num_frames(self) -> int:
        return int(self.frame_indices.shape[0])

    def validate(self) -> None:
        """Check shapes and dtypes against each other; raise `SchemaError` naming the field."""
        s = self.num_frames

        def check(name: str, ok: bool, expected: str) -> None:
            if not ok:
                value = getattr(self, name)
                got = value.shape if isinstance(value, np.ndarray) else type(value).__name__
                raise SchemaError(f"clip {self.clip_id}: field {name} has shape {got}, expected {expected}")

        check("frame_indices", self.frame_indices.ndim == 1 and s > 0, "(S,) with S > 0")
        check("timestamps", self.timestamps.shape == (s,), f"({s},)")
        if len(self.frames_jpeg) != s:
            raise SchemaError(
                f"clip {self.clip_id}: {len(self.frames_jpeg)} JPEG frames for {s} sampled frames"
            )
        check("pose_enc", self.pose_enc.shape == (s, 9), f"({s}, 9)")
        check("extrinsic", self.extrinsic.shape == (s, 3, 4), f"({s}, 3, 4)")
        check("intrinsic", self.intrinsic.shape == (s, 3, 3), f"({s}, 3, 3)")
        check("depth", self.depth.ndim == 3 and self.depth.shape[0] == s, f"({s}, Hd, Wd)")
        check("depth_conf", self.depth_conf.shape == self.depth.shape, str(self.depth.shape))
        check("features", self.features.ndim == 5 and self.features.shape[0] == s, f"({s}, L, h, w, C)")
        if self.fusion is not None:
            check("fusion", self.fusion.ndim == 5 and self.fusion.shape[0] == s, f"({s}, Lf, h, w, Cf)")
        if self.ground_truth is not None:
            self._validate_ground_truth()

    @property
    def ground_truth_fields(self) -> tuple[str, ...]:
        """The label fields (`LABEL_FIELDS`) whose ground truth the clip holds in `ground_truth`."""
        truth = self.ground_truth or {}
        return tuple(name for name in LABEL_FIELDS if LABEL_FIELD_KEYS[name][0] in truth)

    def _validate_ground_truth(self) -> None:
        """The ground-truth group: whole label fields, each array shaped as its main field."""
        truth = self.ground_truth or {}
        keys = {key for name in self.ground_truth_fields for key in LABEL_FIELD_KEYS[name]}
        if not keys or set(truth) != keys:
            raise SchemaError(
                f"clip {self.clip_id}: field ground_truth holds {sorted(truth)}, expected the keys of "
                f"whole label fields ({LABEL_FIELD_KEYS})"
            )
        for key, value in truth.items():
            main = getattr(self, key)
            if isinstance(main, np.ndarray) and np.shape(value) != main.shape:
                raise SchemaError(
                    f"clip {self.clip_id}: field ground_truth.{key} has shape {np.shape(value)}, "
                    f"expected {main.shape}"
                )


@dataclass(frozen=True)
class StoreFingerprint:
    """Everything the labels depend on; a store refuses writes (resume) under another fingerprint.

    Attributes:
        teacher: teacher model name, e.g. "vggt-1b".
        checkpoint_sha256: hash of the teacher checkpoint file(s).
        teacher_config: the teacher's architecture config (the `config.json` schema).
        metric_teacher: metric-depth model name and hash, or "" when no metric scale is computed.
        preprocess: teacher and student preprocessing (teacher long side, student frame size,
            JPEG quality, feature pooling, depth resolution, codecs).
        sampling: the frame sampling policy (fps, min/max frames, method).
        feature_layers: the aggregator layers whose features are stored, in order (the L axis).
        schema_version: `SCHEMA_VERSION` of the writer.
        code_version: the geovr-pipeline version that wrote the store.
    """

    teacher: str
    checkpoint_sha256: str
    teacher_config: dict[str, Any]
    metric_teacher: str
    preprocess: dict[str, Any]
    sampling: dict[str, Any]
    feature_layers: tuple[int, ...]
    schema_version: int = SCHEMA_VERSION
    code_version: str = ""

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["feature_layers"] = list(self.feature_layers)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "store") -> StoreFingerprint:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise SchemaError(
                f"{where}: written with label schema version {version}, this code reads version "
                f"{SCHEMA_VERSION}; re-run precompute or convert the store with a matching geovr-pipeline"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - set(data))
        if missing:
            raise SchemaError(f"{where}: fingerprint lacks {', '.join(missing)}")
        values = {k: data[k] for k in names}
        values["feature_layers"] = tuple(values["feature_layers"])
        return cls(**values)

    def digest(self) -> str:
        """Short hash of the fields that determine the labels (not `code_version`)."""
        data = self.to_json()
        data.pop("code_version")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def differences(self, other: StoreFingerprint) -> list[str]:
        """The differing keys (ignoring `code_version`) as `key: ours != theirs`, nested keys as dotted
        paths (`preprocess.teacher_long_side: 504 != 518`), for error messages."""
        ours, theirs = self.to_json(), other.to_json()
        ours.pop("code_version")
        theirs.pop("code_version")
        return dict_differences(ours, theirs)


_ABSENT = object()


def dict_differences(ours: dict[str, Any], theirs: dict[str, Any], prefix: str = "") -> list[str]:
    """Every key whose values differ, as `path: ours != theirs`; dicts are compared key by key
    (dotted paths), other values whole; a key missing on one side shows as (absent)."""
    lines = []
    for key in [*ours, *(k for k in theirs if k not in ours)]:
        a, b = ours.get(key, _ABSENT), theirs.get(key, _ABSENT)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += dict_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: {_show(a)} != {_show(b)}")
    return lines


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else repr(value)


def clip_id_for(video: str, sampling: dict[str, Any]) -> str:
    """Stable clip id: 16 hex digits of sha256 over the relative video path and the sampling policy."""
    key = json.dumps({"video": video, "sampling": sampling}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]
