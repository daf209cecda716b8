"""Stage 1's configuration sections: `teacher` (what labels, and how: `TeacherConfig`, typed from the
preset to the teacher actors) and `precompute` (how the run is scheduled and what the store keeps:
`PrecomputeConfig`). Plain dataclasses, importable without torch or Ray (the CLI reads their defaults).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from geovr.teacher_cache.backends import StoreFormat
from geovr.teacher_cache.config import require
from geovr.teacher_cache.frames import VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS

# Where a label field comes from (`pipeline.ground_truth`; the conventions: `corpus.ground_truth`).
LabelSource = Literal["teacher", "gt", "both"]

CLIPS_PER_SHARD = 64  # `index`: clips per output shard
MAX_PROBE_WORKERS = 16  # `index`: probe processes at most (default: the CPU count)


@dataclass
class TeacherConfig:
    """Section `teacher` of the presets.

    Attributes:
        checkpoint: VGGT checkpoint: a directory (config.json + model.safetensors), a bare
            model.safetensors, or the official model.pt. Required to build a labeler.
        name: teacher name recorded in the store fingerprint.
        image_long_side: the teacher image's longer side in pixels (GeoVR: 504).
        size_multiple: the shorter side is rounded to a multiple of this (2 patches, so the
            patch grid pools 2x2 exactly).
        feature_layers: aggregator layers whose frame-attention patch tokens are stored.
        dtype: "bfloat16" (autocast) or "float32".
        attention: "sdpa" (PyTorch's kernel choice), "cudnn" (SDPA with cuDNN's fused attention
            first) or "xformers" (when installed).
        dpt_head_autocast: run the DPT depth head under the bf16 autocast (True) or in fp32.
        compile: `torch.compile` the model (GPU runs with many calls of one shape).
        dpt_frame_chunk: frames per DPT-head chunk (None: all at once).
        max_frames_per_call: at most this many frames (clips x frames) per forward pass.
        metric_checkpoint: local metric-depth checkpoint directory, or None for no metric scale.
        metric_teacher: what `metric_checkpoint` holds: "da3-metric" (DA3METRIC-LARGE, GeoVR's
            scale teacher) or "depth-anything-v2" (a Depth Anything V2 Metric directory).
        metric_fit: "least_squares" (GeoVR's plain fit) or "robust" (`geometry.fit_scale`).
        metric_sky_fraction: Depth Anything V2 only: metric depth at or beyond this fraction of the
            model's max depth is sky (DA3-Metric has a sky output).
        metric_min_pixels: fewer pixels in the scale fit (non-sky, confident, positive depths) than
            this: scale invalid.
        metric_frames_per_call: frames per metric-depth forward pass.
        fusion_layers: aggregator stages stored at full width for Spatial-MLLM-style fusion, from a
            second aggregator pass at 7/8 of the student frame size (`teachers.vggt_fusion`); empty:
            no fusion features (Spatial-MLLM: [23], the last stage of VGGT-1B).
    """

    checkpoint: Path | None = None
    name: str = "vggt-1b"
    image_long_side: int = 504
    size_multiple: int = 28
    feature_layers: tuple[int, ...] = (4, 11, 17, 23)
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    attention: Literal["sdpa", "cudnn", "xformers"] = "sdpa"
    dpt_head_autocast: bool = True
    compile: bool = False
    dpt_frame_chunk: int | None = 8
    max_frames_per_call: int = 64
    metric_checkpoint: Path | None = None
    metric_teacher: Literal["da3-metric", "depth-anything-v2"] = "da3-metric"
    metric_fit: Literal["least_squares", "robust"] = "least_squares"
    metric_sky_fraction: float = 0.95
    metric_min_pixels: int = 1000
    metric_frames_per_call: int = 16
    fusion_layers: tuple[int, ...] = ()

    def validate(self) -> None:
        require(
            self.size_multiple > 0 and self.size_multiple % 2 == 0,
            "teacher.size_multiple must be a positive even number",
        )
        require(
            self.image_long_side > 0 and self.image_long_side % self.size_multiple == 0,
            f"teacher.image_long_side ({self.image_long_side}) must be a positive multiple of "
            f"teacher.size_multiple ({self.size_multiple})",
        )
        require(len(self.feature_layers) > 0, "teacher.feature_layers must name at least one layer")
        require(all(layer >= 0 for layer in self.feature_layers), "teacher.feature_layers must be >= 0")
        require(
            self.dpt_frame_chunk is None or self.dpt_frame_chunk > 0,
            "teacher.dpt_frame_chunk must be positive",
        )
        require(self.max_frames_per_call > 0, "teacher.max_frames_per_call must be positive")
        require(0.0 < self.metric_sky_fraction <= 1.0, "teacher.metric_sky_fraction must be in (0, 1]")
        require(self.metric_min_pixels >= 16, "teacher.metric_min_pixels must be at least 16")
        require(self.metric_frames_per_call > 0, "teacher.metric_frames_per_call must be positive")
        require(all(layer >= 0 for layer in self.fusion_layers), "teacher.fusion_layers must be >= 0")


@dataclass
class PrecomputeConfig:
    """Section `precompute` of the presets (CLI options override it).

    Attributes:
        format: store format, one of `teacher_cache.backends.FORMATS` ("zarr", "wds").
        device: "cuda" (one GPU per teacher actor) or "cpu" (tests, demo).
        num_actors: teacher actors; 0 = one per GPU of the cluster (cuda) or 1 (cpu).
        clips_per_batch: clips per teacher call.
        decode_workers: decode tasks in flight at most; 0 = the cluster's CPUs not held by actors.
        decode_cpus: CPUs reserved per decode task, and its FFmpeg decoder threads (`decode_threads`).
        actor_cpus: CPUs reserved per teacher actor (its torch threads on --device cpu).
        write_cpus: CPUs reserved per shard write task (it checksums and fsyncs the shard; > 0 so
            that the cluster's CPUs bound how many run at once, e.g. in --retry-failed).
        max_inflight_shards: shards open at once; 0 = enough to queue two batches on every actor,
            plus two shards being encoded and written.
        max_failure_ratio: exit non-zero when failed / all clips of the store is above this.
        max_teacher_frames: clips with more frames are labelled as overlapping halves (0: never;
            out-of-memory splits happen regardless).
        video_max_pixels, video_min_pixels: the student frames' clip pixel budget, as the Qwen3-VL video
            processor applies it (`frames.student_frame_size`; GeoVR: 32 * 300 * 32 * 32 and
            4 * 16 * 32 * 32): the cache stores the frames at the size the student feeds.
        jpeg_quality: quality of the stored student frames.
        max_actor_restarts: Ray restarts of a crashed teacher actor before its batches fail.
        depth_source, camera_source, scale_source: where each label field comes from: "teacher",
            "gt" (the clip's RGB-D ground truth in the teacher's conventions,
            `corpus.ground_truth`; clips without it fall back to the teacher and are counted), or
            "both" (the teacher's labels in the field, the ground truth stored beside them,
            `ClipLabels.ground_truth`; the trainer chooses by `data.<field>_label`; clips without
            ground truth hold the teacher's only, counted). Features always come from the teacher.
            Recorded in the store fingerprint and each clip's meta (`label_sources`). Ground-truth
            translations and scale are in the ground truth's normalisation: mixed with teacher depth
            they do not share its units (take depth, camera and scale from one source to train).
    """

    format: StoreFormat = "zarr"
    device: Literal["cuda", "cpu"] = "cuda"
    num_actors: int = 0
    clips_per_batch: int = 4
    decode_workers: int = 0
    decode_cpus: float = 1.0
    actor_cpus: float = 1.0
    write_cpus: float = 1.0
    max_inflight_shards: int = 0
    max_failure_ratio: float = 0.01
    max_teacher_frames: int = 0
    video_max_pixels: int = VIDEO_MAX_PIXELS
    video_min_pixels: int = VIDEO_MIN_PIXELS
    jpeg_quality: int = 90
    max_actor_restarts: int = 2
    depth_source: LabelSource = "teacher"
    camera_source: LabelSource = "teacher"
    scale_source: LabelSource = "teacher"

    def label_sources(self) -> dict[str, str]:
        """{"depth", "camera", "scale"}: the source of each label field."""
        return {"depth": self.depth_source, "camera": self.camera_source, "scale": self.scale_source}

    def decode_threads(self) -> int:
        """FFmpeg threads of a decode task: its reserved CPUs, at least one. Left to itself FFmpeg
        starts one thread per core of the node in every task, and a node runs one task per CPU."""
        return max(1, round(self.decode_cpus))

    def validate(self) -> None:
        for name, source in self.label_sources().items():
            require(
                source in ("teacher", "gt", "both"),
                f"precompute.{name}_source must be teacher, gt or both, got {source!r}",
            )
        require(self.num_actors >= 0, f"precompute.num_actors must be >= 0, got {self.num_actors}")
        require(
            self.clips_per_batch >= 1, f"precompute.clips_per_batch must be >= 1, got {self.clips_per_batch}"
        )
        require(
            self.decode_workers >= 0, f"precompute.decode_workers must be >= 0, got {self.decode_workers}"
        )
        require(self.decode_cpus > 0 and self.actor_cpus > 0, "precompute.decode_cpus/actor_cpus must be > 0")
        require(self.write_cpus > 0, f"precompute.write_cpus must be > 0, got {self.write_cpus}")
        require(self.max_inflight_shards >= 0, "precompute.max_inflight_shards must be >= 0")
        require(
            0.0 <= self.max_failure_ratio <= 1.0,
            f"precompute.max_failure_ratio must be in [0, 1], got {self.max_failure_ratio}",
        )
        require(
            self.max_teacher_frames == 0 or self.max_teacher_frames >= 3,
            "precompute.max_teacher_frames must be 0 (no limit) or at least 3",
        )
        require(
            0 < self.video_min_pixels <= self.video_max_pixels,
            f"precompute.video_min_pixels ({self.video_min_pixels}) must be in (0, video_max_pixels "
            f"({self.video_max_pixels})]",
        )
        require(
            1 <= self.jpeg_quality <= 100,
            f"precompute.jpeg_quality must be in [1, 100], got {self.jpeg_quality}",
        )
