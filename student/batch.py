"""The student's batch: one cached clip + one conversation -> `StudentSample`; samples -> `StudentBatch`.

A sample holds the plain Qwen3-VL inputs, token for token what `Qwen3VLProcessor` gives for the
conversation with the clip's frames as the video (each frame repeated twice; see `vision_inputs`),
and the clip's teacher labels as training targets. The geometric tokens (camera, scale) are NOT in
the sequence: `GeoVRStudent` inserts them, so the same batch feeds the plain model too.

Conversation: a list of turns `{"from" | "role": ..., "value" | "content": str}` with roles
human/user, gpt/assistant or system (LLaVA / VSI-590K style), read by the QA contract
(`teacher_cache.qa.parse_turns`, `chat_messages`: the one role map of both stages). The video goes
first in the first user turn; `<image>` / `<video>` placeholders and the "These are frames of a
video." line are removed from it (as GeoVR's data code does). Labels cover each assistant answer,
its `<|im_end|>` and the newline after it (GeoVR's masking); everything else is IGNORE_INDEX.

`StudentBatch` (right-padded, B clips, L tokens, S = most frames of a clip, Hd x Wd = largest
depth map, h x w = largest feature grid):

    input_ids          (B, L) int64        pad = tokenizer pad id
    attention_mask     (B, L) int64        1 for real tokens
    labels             (B, L) int64        IGNORE_INDEX (-100) where no loss
    mm_token_type_ids  (B, L) int64        0 text, 1 image, 2 video (required by transformers 5.x)
    pixel_values_videos (sum_b S_b * gh_b * gw_b, 3 * 2 * 16 * 16) float32
    video_grid_thw     (B, 3) int64        one video per clip: (S_b, gh_b, gw_b) in 16-pixel patches
    frame_mask         (B, S) bool         real frames
    pose_enc           (B, S, 9) float32   camera target: teacher pose relative to frame 0
    depth, depth_conf  (B, S, Hd, Wd) float32, NaN outside a clip's own (Hd_b, Wd_b)
    depth_hw           (B, 2) int64        each clip's depth map size
    features           (B, S, L_t, h, w, C) `feature_dtype` (float32 default), 0 in padding
    feature_hw         (B, 2) int64        each clip's feature grid
    scale              (B,) float32        metric scale (NaN if invalid)
    scale_valid        (B,) bool
    clip_ids           list[str]
    labelled           (B,) bool           False: a clip without teacher labels (language only);
                                           its cameras are NaN, its depth and feature grids 0 x 0
    label_fallback     (B,) bool           True: a field chosen "gt" took the teacher's labels (its
                                           clip fell back to the teacher in precompute; counted)

The geometric targets come from the labels `make_sample`'s `label_choice` picks per field
(`student.label_choice`): the teacher's, the ground truth, or whatever the store holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from geovr.student.label_choice import choose_labels
from geovr.student.losses import IGNORE_INDEX
from geovr.student.vision_inputs import VideoPreprocess, build_video_prompt, video_inputs
from geovr.teacher_cache.frames import decode_jpeg
from geovr.teacher_cache.geometry import encode_pose, relative_to_first
from geovr.teacher_cache.qa import chat_messages, parse_turns
from geovr.teacher_cache.schema import ClipLabels


class SequenceTooLong(ValueError):
    """A sample's token sequence exceeds `max_length`; the trainer skips such rows."""


@dataclass
class StudentSample:
    """One clip with one conversation, unpadded. Shapes as `StudentBatch` without the batch axis."""

    input_ids: Tensor
    labels: Tensor
    mm_token_type_ids: Tensor
    pixel_values_videos: Tensor
    video_grid_thw: Tensor  # (3,)
    pose_enc: Tensor
    depth: Tensor
    depth_conf: Tensor
    features: Tensor
    scale: float
    scale_valid: bool
    clip_id: str
    labelled: bool = True  # False: no teacher labels, language only (`student.unlabelled`)
    fusion: Tensor | None = None  # (S, h, w, D) one fusion layer, for a fusion student
    label_fallback: bool = False  # a field chosen "gt" took the teacher's labels (`student.label_choice`)


@dataclass
class StudentBatch:
    """A padded batch; field shapes in the module docstring."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    mm_token_type_ids: Tensor
    pixel_values_videos: Tensor
    video_grid_thw: Tensor
    frame_mask: Tensor
    pose_enc: Tensor
    depth: Tensor
    depth_conf: Tensor
    depth_hw: Tensor
    features: Tensor
    feature_hw: Tensor
    scale: Tensor
    scale_valid: Tensor
    clip_ids: list[str]
    labelled: Tensor
    label_fallback: Tensor
    fusion: Tensor | None = None

    def to(
        self, device: torch.device | str, dtype: torch.dtype | None = None, non_blocking: bool = False
    ) -> StudentBatch:
        """Move tensors to `device`; floating tensors to `dtype` too when given (e.g. bf16 pixels).

        `non_blocking=True` overlaps the copy with compute when the batch sits in pinned memory.
        """
        moved = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                value = value.to(
                    device,
                    dtype=dtype if dtype is not None and value.is_floating_point() else None,
                    non_blocking=non_blocking,
                )
            moved[f.name] = value
        return StudentBatch(**moved)


def assistant_labels(input_ids: Tensor, header_ids: Sequence[int], end_id: int) -> Tensor:
    """Labels for the answers: tokens after each `header_ids` (`<|im_start|>assistant\\n`) up to and
    including the next `end_id` (`<|im_end|>`) and the token after it; IGNORE_INDEX elsewhere."""
    ids = input_ids.tolist()
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    header, n = list(header_ids), len(header_ids)
    pos = 0
    while pos + n <= len(ids):
        if ids[pos : pos + n] != header:
            pos += 1
            continue
        start = end = pos + n
        while end < len(ids) and ids[end] != end_id:
            end += 1
        stop = min(end + 2, len(ids))
        labels[start:stop] = input_ids[start:stop]
        pos = stop
    return labels


def camera_target(labels: ClipLabels) -> Tensor:
    """(S, 9) pose encoding of the teacher cameras relative to frame 0 (frame 0 = identity).

    The field of view uses the teacher image size: `meta["teacher_size"]` ([W, H], as precompute
    records it), else twice the depth map (the cache holds depth at half the teacher resolution).
    """
    if "teacher_size" in labels.meta:
        width, height = labels.meta["teacher_size"]
        teacher_hw = (height, width)
    else:
        teacher_hw = (2 * labels.depth.shape[1], 2 * labels.depth.shape[2])
    extrinsic = relative_to_first(torch.from_numpy(np.asarray(labels.extrinsic, dtype=np.float64)))
    intrinsic = torch.from_numpy(np.asarray(labels.intrinsic, dtype=np.float64))
    return encode_pose(extrinsic, intrinsic, (int(teacher_hw[0]), int(teacher_hw[1]))).float()


def _conversation_inputs(
    frames: np.ndarray,
    timestamps: np.ndarray,
    conversation: Sequence[dict],
    tokenizer,
    preprocess: VideoPreprocess | None,
    max_length: int | None,
    clip_id: str,
) -> dict[str, Tensor]:
    """The plain Qwen3-VL inputs of one clip's frames (S, H, W, 3) uint8 with a conversation:
    input_ids, labels, mm_token_type_ids, pixel_values_videos, video_grid_thw (module docstring)."""
    video = video_inputs(frames, timestamps, preprocess)
    grid = video["video_grid_thw"][0]
    merge = (preprocess or VideoPreprocess()).merge_size

    text = tokenizer.apply_chat_template(chat_messages(parse_turns(conversation)), tokenize=False)
    text = build_video_prompt(text, grid, video["frame_timestamps"], merge)
    input_ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
    if max_length is not None and input_ids.numel() > max_length:
        raise SequenceTooLong(f"clip {clip_id}: {input_ids.numel()} tokens > max_length {max_length}")
    header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    token_labels = assistant_labels(input_ids, header, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    mm_types = torch.zeros_like(input_ids)
    mm_types[input_ids == tokenizer.convert_tokens_to_ids("<|image_pad|>")] = 1
    mm_types[input_ids == tokenizer.convert_tokens_to_ids("<|video_pad|>")] = 2
    return {
        "input_ids": input_ids,
        "labels": token_labels,
        "mm_token_type_ids": mm_types,
        "pixel_values_videos": video["pixel_values_videos"],
        "video_grid_thw": grid,
    }


def make_sample(
    labels: ClipLabels,
    conversation: Sequence[dict],
    tokenizer,
    preprocess: VideoPreprocess | None = None,
    max_length: int | None = None,
    feature_dtype: torch.dtype = torch.float32,
    fusion_layer: int | None = None,
    label_choice: dict[str, str] | None = None,
) -> StudentSample:
    """Build one training sample from a cached clip and a conversation about it.

    Args:
        labels: the clip's teacher labels (its JPEG frames are the video the student sees).
        conversation: turns as in the module docstring; at least one user turn.
        tokenizer: the model directory's tokenizer (with its chat template).
        preprocess: the model directory's video settings (`VideoPreprocess.from_model_dir`).
        max_length: raise `SequenceTooLong` beyond this many tokens.
        feature_dtype: dtype the teacher features are kept in (bf16 halves host memory).
        fusion_layer: for a fusion student, which of the clip's fusion layers the sample carries
            (ValueError when the clip has none, or their grid is not the video's patch grid).
        label_choice: per label field "stored", "teacher" or "gt" (`student.label_choice`; None:
            the stored labels).
    """
    labels.validate()
    labels, fell_back = choose_labels(labels, label_choice or {})
    frames = np.stack([decode_jpeg(jpeg) for jpeg in labels.frames_jpeg])
    inputs = _conversation_inputs(
        frames, labels.timestamps, conversation, tokenizer, preprocess, max_length, labels.clip_id
    )
    return StudentSample(
        **inputs,
        pose_enc=camera_target(labels),
        depth=torch.from_numpy(np.asarray(labels.depth, dtype=np.float32)),
        depth_conf=torch.from_numpy(np.asarray(labels.depth_conf, dtype=np.float32)),
        features=torch.from_numpy(np.asarray(labels.features, dtype=np.float32)).to(feature_dtype),
        scale=float(labels.scale),
        scale_valid=bool(labels.scale_valid) and bool(np.isfinite(labels.scale)),
        clip_id=labels.clip_id,
        fusion=_fusion(labels, fusion_layer, inputs["video_grid_thw"], feature_dtype),
        label_fallback=bool(fell_back),
    )


def make_language_sample(
    frames: np.ndarray,
    timestamps: np.ndarray,
    conversation: Sequence[dict],
    tokenizer,
    preprocess: VideoPreprocess | None,
    clip_id: str,
    feature_lc: tuple[int, int],
    max_length: int | None = None,
    feature_dtype: torch.dtype = torch.float32,
) -> StudentSample:
    """A sample of a clip without teacher labels (`student.unlabelled`): the conversation on its
    decoded frames (S, H, W, 3) uint8, with no geometric target: NaN cameras, 0 x 0 depth and
    feature grids (`feature_lc` = the store's (L, C), which a batch shares), no scale."""
    inputs = _conversation_inputs(
        frames, timestamps, conversation, tokenizer, preprocess, max_length, clip_id
    )
    count = len(frames)
    return StudentSample(
        **inputs,
        pose_enc=torch.full((count, 9), float("nan")),
        depth=torch.empty((count, 0, 0)),
        depth_conf=torch.empty((count, 0, 0)),
        features=torch.empty((count, feature_lc[0], 0, 0, feature_lc[1]), dtype=feature_dtype),
        scale=float("nan"),
        scale_valid=False,
        clip_id=clip_id,
        labelled=False,
    )


def _fusion(labels: ClipLabels, layer: int | None, grid_thw: Tensor, dtype: torch.dtype) -> Tensor | None:
    return None if layer is None else fusion_sample(labels, layer, grid_thw, dtype)


def fusion_sample(labels: ClipLabels, layer: int, grid_thw: Tensor, dtype: torch.dtype) -> Tensor:
    """(S, h, w, D) fusion features of one layer of the clip, checked against the video's patch grid."""
    if labels.fusion is None:
        raise ValueError(f"clip {labels.clip_id}: the store holds no fusion features for it")
    features = torch.from_numpy(np.asarray(labels.fusion[:, layer], dtype=np.float32)).to(dtype)
    if tuple(features.shape[1:3]) != (int(grid_thw[1]), int(grid_thw[2])):
        raise ValueError(
            f"clip {labels.clip_id}: fusion features of grid {tuple(features.shape[1:3])} but the video's "
            f"patch grid is {(int(grid_thw[1]), int(grid_thw[2]))}"
        )
    return features


def _pad(tensors: Sequence[Tensor], shape: Sequence[int], value: float | bool) -> Tensor:
    out = tensors[0].new_full((len(tensors), *shape), value)
    for i, t in enumerate(tensors):
        out[(i, *(slice(0, n) for n in t.shape))] = t
    return out


def collate_samples(samples: Sequence[StudentSample], pad_token_id: int) -> StudentBatch:
    """Right-pad samples into a `StudentBatch` (a DataLoader `collate_fn` with `pad_token_id` bound)."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    length = max(s.input_ids.numel() for s in samples)
    frames = max(s.pose_enc.shape[0] for s in samples)
    depth_hw = [max(s.depth.shape[i] for s in samples) for i in (1, 2)]
    feat = samples[0].features.shape
    if any(s.features.shape[1] != feat[1] or s.features.shape[-1] != feat[-1] for s in samples):
        raise ValueError("samples with different teacher layers or feature widths cannot share a batch")
    feature_hw = [max(s.features.shape[i] for s in samples) for i in (2, 3)]
    frame_counts = torch.tensor([s.pose_enc.shape[0] for s in samples])
    return StudentBatch(
        input_ids=_pad([s.input_ids for s in samples], (length,), pad_token_id),
        attention_mask=_pad([torch.ones_like(s.input_ids) for s in samples], (length,), 0),
        labels=_pad([s.labels for s in samples], (length,), IGNORE_INDEX),
        mm_token_type_ids=_pad([s.mm_token_type_ids for s in samples], (length,), 0),
        pixel_values_videos=torch.cat([s.pixel_values_videos for s in samples]),
        video_grid_thw=torch.stack([s.video_grid_thw for s in samples]),
        frame_mask=torch.arange(frames)[None] < frame_counts[:, None],
        pose_enc=_pad([s.pose_enc for s in samples], (frames, 9), 0.0),
        depth=_pad([s.depth for s in samples], (frames, *depth_hw), float("nan")),
        depth_conf=_pad([s.depth_conf for s in samples], (frames, *depth_hw), 0.0),
        depth_hw=torch.tensor([s.depth.shape[1:] for s in samples], dtype=torch.int64),
        features=_pad([s.features for s in samples], (frames, feat[1], *feature_hw, feat[-1]), 0.0),
        feature_hw=torch.tensor([s.features.shape[2:4] for s in samples], dtype=torch.int64),
        scale=torch.tensor(
            [s.scale if s.scale_valid else float("nan") for s in samples], dtype=torch.float32
        ),
        scale_valid=torch.tensor([s.scale_valid for s in samples]),
        clip_ids=[s.clip_id for s in samples],
        labelled=torch.tensor([s.labelled for s in samples]),
        label_fallback=torch.tensor([s.label_fallback for s in samples]),
        fusion=_pad_fusion(samples, frames),
    )


def _pad_fusion(samples: Sequence[StudentSample], frames: int) -> Tensor | None:
    """(B, S_max, h_max, w_max, D) zero-padded fusion features, or None when the samples carry none."""
    if samples[0].fusion is None:
        return None
    hw = [max(s.fusion.shape[i] for s in samples) for i in (1, 2)]
    return _pad([s.fusion for s in samples], (frames, *hw, samples[0].fusion.shape[-1]), 0.0)
