"""The student's configuration sections: `student` (the model, its heads and objectives) and `data`
(how QA rows become micro-batches). Plain dataclasses, importable without torch (the CLI reads
their defaults).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from geovr.teacher_cache.config import require
from geovr.teacher_cache.schema import StoreFingerprint


@dataclass
class StudentConfig:
    """Section `student` of the presets. Defaults: GeoVR on Qwen3-VL-2B with VGGT-1B as teacher.

    Attributes:
        base_model: local directory of the Qwen3-VL checkpoint to start from.
        teacher_layers / teacher_depth: the distilled teacher layers (the cache's L axis) and the
            teacher's number of layers, for the hidden-state mapping.
        teacher_feature_dim: C of the cached features (1024: VGGT's frame-attention half).
        camera / depth / scale / distill: which of GeoVR's objectives (`student.objectives`) exist
            (their heads) and train.
        camera_hidden, scale_hidden, dense_features, dense_channels: head widths.
        depth_shuffle: pixel-shuffle factor from the teacher patch grid to the cached depth.
        *_weight: weights of the five losses in `total`.
        objective_weights: weights of objectives registered in `student.objectives` beyond GeoVR's
            four, by their weight key ({name: weight}); such an objective trains when listed here.
        camera_part_weights: translation, rotation, FoV weights inside the camera loss.
        video_max_pixels, video_min_pixels: the clip pixel budget of the student frames, as the
            Qwen3-VL video processor applies it to a whole clip (`teacher_cache.frames.student_frame_size`;
            GeoVR: 32 * 300 * 32 * 32 and 4 * 16 * 32 * 32). Must equal the store's (precompute's).
        train_deepstack_mergers: also train the vision tower's DeepStack mergers (GeoVR freezes
            them: it unfreezes only `visual.merger`); they then train at the LLM rate.
        fusion: Spatial-MLLM's dual encoder: its connector (`student.fusion`) adds the cached fusion
            features (the store's `fusion` feature set) to the merged video tokens. The connector
            and `visual.merger` then train at `train.lr_heads` (Spatial-MLLM's mm_projector_lr), the
            LLM at `train.lr_llm`.
        fusion_layer_index: which of the store's fusion layers feeds the connector (Spatial-MLLM's
            `spatial_embeds_layer_idx`: -1, the last).
        fusion_feature_dim: width D of the fusion features (2 x the teacher's embed_dim; `matched_to`
            sets it from the store).
        fusion_teacher_layer, fusion_dtype: the aggregator stage behind `fusion_layer_index` and the
            precision the store's fusion pass ran in (`matched_to` sets both from the store): the
            online encoder at inference runs that stage in that precision (`student.fusion_model`).
        train_llm, train_merger: whether the language model (with its embeddings) and `visual.merger`
            train (GeoVR and Spatial-MLLM: both).
        train_vision_tower: also train the rest of the vision tower (patch embedding, position
            embedding, blocks) at `train.lr_llm`. A departure from GeoVR and Spatial-MLLM, which freeze
            it (a pretrained ViT); for a randomly initialised tower (the tiny demo) it lets the
            student learn image features at all. The mergers keep their own switches.
    """

    base_model: str = ""
    teacher_layers: tuple[int, ...] = (4, 11, 17, 23)
    teacher_depth: int = 24
    teacher_feature_dim: int = 1024
    camera: bool = True
    depth: bool = True
    scale: bool = True
    distill: bool = True
    camera_hidden: int = 1536
    scale_hidden: int = 512
    dense_features: int = 256
    dense_channels: tuple[int, ...] = (256, 512, 1024, 1024)
    depth_shuffle: int = 7
    lm_weight: float = 1.0
    camera_weight: float = 2.5
    depth_weight: float = 1.0
    distill_weight: float = 1.0
    scale_weight: float = 1.0
    objective_weights: dict[str, float] = dataclasses.field(default_factory=dict)
    camera_part_weights: tuple[float, ...] = (1.0, 1.0, 0.5)
    translation_clamp: float = 100.0
    depth_quantile: float = 0.98
    depth_quantile_min_elements: int = 1000
    depth_grad_scales: int = 4
    depth_grad_clamp: float = 100.0
    video_max_pixels: int = 32 * 300 * 32 * 32
    video_min_pixels: int = 4 * 16 * 32 * 32
    train_deepstack_mergers: bool = False
    fusion: bool = False
    fusion_layer_index: int = -1
    fusion_feature_dim: int = 2048
    fusion_teacher_layer: int = 23
    fusion_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    train_llm: bool = True
    train_merger: bool = True
    train_vision_tower: bool = False

    def validate(self) -> None:
        require(len(self.teacher_layers) > 0, "student.teacher_layers: at least one layer")
        require(
            all(0 <= layer < self.teacher_depth for layer in self.teacher_layers),
            f"student.teacher_layers {self.teacher_layers} must lie in [0, teacher_depth={self.teacher_depth})",
        )
        require(
            not self.depth or len(self.teacher_layers) == 4, "student.depth: the dense head needs 4 layers"
        )
        require(len(self.dense_channels) == 4, "student.dense_channels: 4 values")
        require(len(self.camera_part_weights) == 3, "student.camera_part_weights: 3 values (T, q, FoV)")
        require(0.0 < self.depth_quantile <= 1.0, "student.depth_quantile must lie in (0, 1]")
        require(self.depth_shuffle > 0, "student: sizes must be positive")
        require(
            0 < self.video_min_pixels <= self.video_max_pixels,
            "student.video_min_pixels must be in (0, student.video_max_pixels]",
        )

    def matched_to(self, fingerprint: StoreFingerprint) -> StudentConfig:
        """This config with the teacher fields taken from a cache store's fingerprint: the stored
        layers (the features' L axis), the teacher's depth and feature width (its `embed_dim`)."""
        teacher = fingerprint.teacher_config
        missing = [k for k in ("depth", "embed_dim") if k not in teacher]
        if missing:
            raise ValueError(
                f"store fingerprint teacher_config lacks {missing}; cannot size the student's heads"
            )
        matched = dataclasses.replace(
            self,
            teacher_layers=tuple(fingerprint.feature_layers),
            teacher_depth=int(teacher["depth"]),
            teacher_feature_dim=int(teacher["embed_dim"]),
        )
        if self.fusion:
            matched = _matched_fusion(matched, fingerprint)
        matched.validate()
        return matched


def _matched_fusion(config: StudentConfig, fingerprint: StoreFingerprint) -> StudentConfig:
    """`config` with the fusion width of the store; ValueError when the store has no fusion features
    or no layer at `fusion_layer_index`."""
    fusion = fingerprint.preprocess.get("fusion")
    if fusion is None:
        raise ValueError(
            "student.fusion needs a store with fusion features: precompute it with teacher.fusion_layers "
            "(the fusion preset stores [23])"
        )
    layers = len(fusion["layers"])
    if not -layers <= config.fusion_layer_index < layers:
        raise ValueError(
            f"student.fusion_layer_index {config.fusion_layer_index} does not index the store's "
            f"{layers} fusion layer(s) {fusion['layers']}"
        )
    width = 2 * int(fingerprint.teacher_config["embed_dim"])
    return dataclasses.replace(
        config,
        fusion_feature_dim=width,
        fusion_teacher_layer=int(fusion["layers"][config.fusion_layer_index]),
        fusion_dtype=fingerprint.preprocess.get("dtype", "float32"),
    )


@dataclass
class DataConfig:
    """Section `data` of the presets: how QA rows become micro-batches.

    Attributes:
        access: "random" (map-style, `read_clip`), "stream" (WebDataset pipeline over shards), or
            "auto": stream for WebDataset stores, random access for Zarr stores.
        micro_batch: samples per rank per forward/backward (GeoVR: 2 per GPU).
        max_seq_len: longest sample in tokens (GeoVR: 16k); a longer one is a bad row (`on_bad_row`).
        max_batch_tokens: padded tokens (batch x longest) per forward chunk; a micro-batch above it
            is split into chunks run one after another.
        shuffle_buffer: samples held by the streaming shuffle buffer (per worker).
        shuffle_initial: samples buffered before the first one is yielded.
        resampled: streaming draws shards with replacement (`wds.ResampledShards`); False walks a
            deterministic per-epoch shard permutation split by node and worker, repeated as needed.
        samples_per_epoch: streaming: samples per epoch over all ranks; 0 = the number of joined QA
            samples (random access always covers each joined sample once per epoch).
        num_workers: DataLoader worker processes per rank (0 = load in the training process).
        prefetch_factor: micro-batches prefetched per worker.
        open_shards: shard readers each loading process keeps open (LRU; a Zarr reader costs about
            100 KB, so the bound, not the store's size, sets a worker's memory).
        pin_memory: pin batches in page-locked memory (only used with a CUDA device).
        on_missing_clip: "skip" (count) or "error" for rows whose clip is absent or failed in the store
            (and, under `missing_labels: language_only`, whose video file is absent too).
        missing_labels: what a row whose clip has no labels in the store (not precomputed, or
            failed) does: "skip" (`on_missing_clip`) or "language_only": it trains on its
            conversation, its frames decoded from the video (`student.unlabelled`, random access
            only), its geometric losses masked (SpatialSV's semi-supervised mode).
        on_bad_row: "skip" (count) or "error" for malformed rows and conversations.
        corpus_root: the folder `index` took video paths relative to (its `--corpus-root`); needed
            only for rows that name their video by an absolute path.
        on_damaged_clip: a sample whose cached clip is damaged on disk (an absent chunk, a failed
            checksum, a broken tar): "skip" (count, bounded by `max_damaged_ratio`) or "error"
            (every rank stops at that step with the one-line report naming store, shard, clip, field).
        max_damaged_ratio: under "skip", every rank stops once the damaged samples exceed this
            fraction of the samples drawn, counted over at least one epoch's samples (so that an
            early damaged sample does not stop a run on its own).
        depth_label, camera_label, scale_label: which labels each geometric target comes from, for
            a store that may hold the teacher's, the ground truth or both (`student.label_choice`):
            "stored" (the clip's main arrays, the teacher's in a "both" store), "gt" (the ground
            truth; a clip that fell back to the teacher in precompute trains on the teacher's and
            is counted) or "teacher". A choice the store cannot serve is refused at startup.
    """

    access: Literal["auto", "random", "stream"] = "auto"
    micro_batch: int = 2
    max_seq_len: int = 16384
    max_batch_tokens: int = 32768
    shuffle_buffer: int = 1000
    shuffle_initial: int = 100
    resampled: bool = True
    samples_per_epoch: int = 0
    num_workers: int = 4
    prefetch_factor: int = 4
    open_shards: int = 64
    pin_memory: bool = True
    on_missing_clip: Literal["skip", "error"] = "skip"
    missing_labels: Literal["skip", "language_only"] = "skip"
    on_bad_row: Literal["skip", "error"] = "skip"
    corpus_root: str = ""
    on_damaged_clip: Literal["skip", "error"] = "skip"
    max_damaged_ratio: float = 0.01
    depth_label: Literal["stored", "teacher", "gt"] = "stored"
    camera_label: Literal["stored", "teacher", "gt"] = "stored"
    scale_label: Literal["stored", "teacher", "gt"] = "stored"

    def label_choice(self) -> dict[str, str]:
        """{"depth", "camera", "scale"}: the labels each geometric target comes from."""
        return {"depth": self.depth_label, "camera": self.camera_label, "scale": self.scale_label}

    def validate(self) -> None:
        require(self.micro_batch >= 1, f"data.micro_batch must be >= 1, got {self.micro_batch}")
        require(self.max_seq_len >= 1, f"data.max_seq_len must be >= 1, got {self.max_seq_len}")
        require(
            self.max_batch_tokens >= self.max_seq_len,
            f"data.max_batch_tokens ({self.max_batch_tokens}) must hold one sample of data.max_seq_len "
            f"({self.max_seq_len})",
        )
        require(self.shuffle_buffer >= 1, f"data.shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        require(
            0 <= self.shuffle_initial <= self.shuffle_buffer,
            f"data.shuffle_initial must be in [0, shuffle_buffer], got {self.shuffle_initial}",
        )
        require(self.samples_per_epoch >= 0, "data.samples_per_epoch must be >= 0")
        require(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        require(self.prefetch_factor >= 1, f"data.prefetch_factor must be >= 1, got {self.prefetch_factor}")
        require(self.open_shards >= 1, f"data.open_shards must be >= 1, got {self.open_shards}")
        require(
            0.0 <= self.max_damaged_ratio <= 1.0,
            f"data.max_damaged_ratio must be in [0, 1], got {self.max_damaged_ratio}",
        )
        for name, choice in self.label_choice().items():
            require(
                choice in ("stored", "teacher", "gt"),
                f"data.{name}_label must be stored, teacher or gt, got {choice!r}",
            )
