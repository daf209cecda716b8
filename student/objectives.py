"""The student's geometric objectives as data: one `Objective` per objective, in `OBJECTIVES`.

An objective is a head on the student's hidden states, trained against labels the cache holds:
what it reads, how its head is built, what it predicts, its loss, its weight in the total and the
metric `eval geometry` reports for it. `GeoVRStudent` builds the heads of the enabled objectives
and its `forward` computes their losses, the trainer logs each as `loss.<name>`, `eval geometry`
reports each metric and the demo measures each loss before and after training, all by iterating
over `OBJECTIVES` (GeoVR's four, below, in the order their heads run, then SpatialSV's point map,
which composes the depth and camera predictions and so comes after them).

Adding an objective on labels the cache already holds touches this module and the presets: an
`Objective` row (build, predict, loss, metric) passed to `register`, and its weight in the presets'
`student.objective_weights` (`{name: weight}`; an objective without a `switch` field trains when
its weight is given there). A new objective whose head must be in a checkpoint before the module is
imported is registered at import time here; a toy one can be registered by any code that runs
before the student is built (tests/test_objectives.py).

Shapes: B clips, S frames (padded), d = LLM width, (hq, wq) merged token grid of a frame, (Hd, Wd)
depth map, (h, w) teacher feature grid, C teacher feature width.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geovr.student.batch import StudentBatch
from geovr.student.config import StudentConfig
from geovr.student.heads import CameraHead, DenseHead, DistillHead, ScaleHead
from geovr.student.losses import camera_loss, depth_loss, distill_loss, scale_loss
from geovr.student.metrics import depth_metrics, feature_cosine, pose_auc, relative_pose_errors
from geovr.student.point_map import compose_points, label_points, point_map_loss
from geovr.teacher_cache.geometry import decode_pose, relative_to_first
from geovr.teacher_cache.schema import ClipLabels


@dataclass
class HiddenStates:
    """What a head reads: the decoder's hidden states of a batch and where the tokens sit.

    Attributes:
        states: hidden-state index -> (B, L', d); `last_index` (the final norm's output) always,
            the distilled `levels` when an enabled objective reads them.
        last_index: N, the number of decoder layers.
        levels: the hidden-state index of each distilled teacher layer (`map_teacher_layers`).
        layout: the sequence with geometric tokens (`model.GeometryLayout`): camera_positions,
            scale_positions, patch_positions.
        grids: (B, 3) video grid per clip (t, h, w in 16-pixel patches); merge: spatial merge size.
        outputs: the predictions of the objectives before this one in table order, by output
            name (an objective that composes others' outputs, like the point map, reads them here).
    """

    states: dict[int, Tensor]
    last_index: int
    levels: list[int]
    layout: Any
    grids: Tensor
    merge: int
    outputs: dict[str, Any] = field(default_factory=dict)

    @property
    def last(self) -> Tensor:
        return self.states[self.last_index]

    def video_states(self, index: int, b: int, dtype: torch.dtype) -> Tensor:
        """(S_b, hq, wq, d) states of clip b's visual tokens at hidden state `index`, in `dtype`."""
        _, h, w = (int(v) for v in self.grids[b])
        x = self.states[index][b, self.layout.patch_positions[b]]
        return x.unflatten(1, (h // self.merge, w // self.merge)).to(dtype)


@dataclass(frozen=True)
class Objective:
    """One objective of the table (module docstring).

    Attributes:
        name: the loss key: `losses[name]`, `loss.<name>` in metrics.jsonl.
        output: the name of its prediction in `GeometryPredictions` (e.g. "pose_enc").
        label_fields: the `ClipLabels` fields it learns from (the batch's targets of the same names).
        weight_key: its weight in the total loss: a `StudentConfig` field, else a key of
            `StudentConfig.objective_weights`.
        switch: the `StudentConfig` bool field that turns it on (its head exists only then); None:
            on when `weight_key` is in `objective_weights`.
        module: the attribute of its head on the student, the head's checkpoint prefix.
        reads: the tokens its head reads: "camera_tokens" (one per frame, inserted after the frame),
            "scale_token" (one per clip, after the video), "video" (the frames' visual tokens), or
            "outputs": no tokens, the predictions of the objectives before it (`HiddenStates.outputs`).
        levels: it also reads the distilled hidden-state levels (not only the last).
        build_head: (d, config) -> the head module.
        predict: (head, hidden states, batch) -> its prediction, float32, padded like the batch.
        loss: (prediction, batch, config) -> scalar loss (0, still connected, without a valid label).
        metric: (one clip's prediction as numpy, its labels, the store's feature layers) ->
            {metric name: value} for `eval geometry`; None when it reports none.
    """

    name: str
    output: str
    label_fields: tuple[str, ...]
    weight_key: str
    switch: str | None
    module: str
    reads: Literal["camera_tokens", "scale_token", "video", "outputs"]
    build_head: Callable[[int, StudentConfig], nn.Module]
    predict: Callable[[nn.Module, HiddenStates, StudentBatch], Any]
    loss: Callable[[Any, StudentBatch, StudentConfig], Tensor]
    metric: Callable[[Any, ClipLabels, Sequence[int]], dict[str, float]] | None = None
    levels: bool = False

    def enabled(self, config: StudentConfig) -> bool:
        if self.switch is not None:
            return bool(getattr(config, self.switch))
        return self.weight_key in config.objective_weights

    def weight(self, config: StudentConfig) -> float:
        if hasattr(config, self.weight_key):
            return float(getattr(config, self.weight_key))
        return float(config.objective_weights.get(self.weight_key, 0.0))


OBJECTIVES: dict[str, Objective] = {}


def register(objective: Objective) -> Objective:
    """Add `objective` to the table (after the ones already there); a name is registered once."""
    if objective.name in OBJECTIVES or objective.name in ("lm", "total"):
        raise ValueError(f"objective {objective.name!r} is already registered")
    OBJECTIVES[objective.name] = objective
    return objective


def enabled_objectives(config: StudentConfig) -> list[Objective]:
    """The objectives `config` turns on, in table order."""
    return [o for o in OBJECTIVES.values() if o.enabled(config)]


def loss_names() -> list[str]:
    """The loss terms every forward returns, in logging order: total, lm, then the table's."""
    return ["total", "lm", *OBJECTIVES]


# ----------------------------------------------------------------------------------------------
# Masks and padding shared by the objectives


def pad_to(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Zero-pad `x` at the end of each dimension up to `shape`."""
    pads = []
    for have, want in zip(reversed(x.shape), reversed(shape), strict=True):
        pads += [0, want - have]
    return F.pad(x, pads)


def dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def depth_inside(batch: StudentBatch) -> Tensor:
    """(B, S, Hd, Wd) bool: real frames, inside the clip's own depth map."""
    _, _, height, width = batch.depth.shape
    rows = torch.arange(height, device=batch.depth.device)[None, :, None] < batch.depth_hw[:, 0, None, None]
    cols = torch.arange(width, device=batch.depth.device)[None, None, :] < batch.depth_hw[:, 1, None, None]
    return batch.frame_mask[:, :, None, None] & (rows & cols)[:, None]


def depth_valid(batch: StudentBatch) -> Tensor:
    """(B, S, Hd, Wd) bool: `depth_inside` with a finite positive target, in labelled clips."""
    labelled = batch.labelled[:, None, None, None]
    return depth_inside(batch) & torch.isfinite(batch.depth) & (batch.depth > 0) & labelled


def feature_valid(batch: StudentBatch) -> Tensor:
    """(B, S, h, w) bool: feature tokens of real frames inside the clip's own feature grid, in
    labelled clips."""
    _, _, _, height, width, _ = batch.features.shape
    device = batch.features.device
    rows = torch.arange(height, device=device)[None, :, None] < batch.feature_hw[:, 0, None, None]
    cols = torch.arange(width, device=device)[None, None, :] < batch.feature_hw[:, 1, None, None]
    frames = batch.frame_mask & batch.labelled[:, None]
    return frames[:, :, None, None] & (rows & cols)[:, None]


def head_grid(hw: tuple[int, int], smallest: tuple[int, int]) -> tuple[int, int]:
    """The grid a dense head runs at for a clip: its own, or for a clip without labels (0 x 0,
    `student.unlabelled`) the smallest the head takes. That output is cropped to nothing, yet the head
    stays in the graph, so every rank's backward and gradient all-reduce see the same parameters."""
    return hw if hw[0] > 0 and hw[1] > 0 else smallest


# ----------------------------------------------------------------------------------------------
# Camera: pose encoding relative to the first frame, from each frame's camera token


def _predict_camera(head: nn.Module, hidden: HiddenStates, batch: StudentBatch) -> Tensor:
    """(B, S, 9) pose encodings."""
    frames = batch.frame_mask.shape[1]
    last = hidden.last
    return torch.stack(
        [
            pad_to(head(last[b, positions].to(dtype_of(head))).float(), (frames, 9))
            for b, positions in enumerate(hidden.layout.camera_positions)
        ]
    )


def _camera_loss(pred: Tensor, batch: StudentBatch, cfg: StudentConfig) -> Tensor:
    weights = tuple(cfg.camera_part_weights)
    frames = batch.frame_mask & batch.labelled[:, None]
    loss, _ = camera_loss(pred, batch.pose_enc.float(), frames, weights, cfg.translation_clamp)
    return loss


def _camera_metric(pose_enc: np.ndarray, labels: ClipLabels, _: Sequence[int]) -> dict[str, float]:
    """Relative-pose errors of all frame pairs and AUC@30 (`metrics.relative_pose_errors`)."""
    if labels.num_frames < 2:
        return {}
    # The image size only sets the intrinsics, which this metric does not use.
    pred_ext, _ = decode_pose(torch.from_numpy(pose_enc).double(), (1, 1))
    target = relative_to_first(torch.from_numpy(np.asarray(labels.extrinsic, dtype=np.float64)))
    rot, trans = relative_pose_errors(pred_ext, target)
    static = np.isnan(trans)
    return {
        "rotation_error_deg": float(rot.mean()),
        "translation_error_deg": float(trans[~static].mean()) if not static.all() else math.nan,
        "pose_auc30": pose_auc(rot, trans),
        "static_pair_fraction": float(static.mean()),
    }


# ----------------------------------------------------------------------------------------------
# Scale: the clip's metric scale, from its scale token


def _predict_scale(head: nn.Module, hidden: HiddenStates, batch: StudentBatch) -> Tensor:
    """(B,) metric scales."""
    last = hidden.last
    rows = torch.arange(len(hidden.grids), device=last.device)
    return head(last[rows, hidden.layout.scale_positions].to(dtype_of(head))).float()


def _scale_loss(pred: Tensor, batch: StudentBatch, cfg: StudentConfig) -> Tensor:
    return scale_loss(pred, batch.scale.float(), batch.scale_valid & batch.labelled)


def _scale_metric(scale: np.ndarray, labels: ClipLabels, _: Sequence[int]) -> dict[str, float]:
    """|log(student scale) - log(teacher scale)| on clips whose teacher scale is valid."""
    value = float(np.asarray(scale).reshape(-1)[0])
    if not (labels.scale_valid and np.isfinite(labels.scale) and labels.scale > 0):
        return {}
    return {"scale_log_error": abs(math.log(max(value, 1e-12)) - math.log(labels.scale))}


# ----------------------------------------------------------------------------------------------
# Depth: the dense head over the distilled levels


def _predict_depth(head: nn.Module, hidden: HiddenStates, batch: StudentBatch) -> Tensor:
    """(B, S, Hd, Wd) depth, zero outside each clip's frames and depth map."""
    frames = batch.frame_mask.shape[1]
    maps = []
    for b in range(len(hidden.grids)):
        levels = [hidden.video_states(i, b, dtype_of(head)) for i in hidden.levels]
        depth_hw = (int(batch.depth_hw[b, 0]), int(batch.depth_hw[b, 1]))
        aspect = int(hidden.grids[b, 2]) / int(hidden.grids[b, 1])
        depth = head(levels, head_grid(depth_hw, (head.shuffle, head.shuffle)), aspect)
        maps.append(pad_to(depth[:, : depth_hw[0], : depth_hw[1]].float(), (frames, *batch.depth.shape[2:])))
    return torch.stack(maps)


def _depth_loss(pred: Tensor, batch: StudentBatch, cfg: StudentConfig) -> Tensor:
    loss, _ = depth_loss(
        pred,
        batch.depth.float(),
        depth_valid(batch),
        cfg.depth_quantile,
        cfg.depth_quantile_min_elements,
        grad_scales=cfg.depth_grad_scales,
        grad_clamp=cfg.depth_grad_clamp,
    )
    return loss


def _depth_metric(depth: np.ndarray, labels: ClipLabels, _: Sequence[int]) -> dict[str, float]:
    return depth_metrics(depth, labels.depth)


# ----------------------------------------------------------------------------------------------
# Feature distillation: one head per distilled layer


def _build_distill(width: int, cfg: StudentConfig) -> nn.Module:
    return nn.ModuleList(DistillHead(width, cfg.teacher_feature_dim) for _ in cfg.teacher_layers)


def _predict_features(heads: nn.Module, hidden: HiddenStates, batch: StudentBatch) -> list[Tensor]:
    """Per distilled layer, (B, S, h, w, C) projected student features, zero in padding."""
    frames, grid_hw = batch.frame_mask.shape[1], batch.features.shape[3:5]
    features = []
    for head, index in zip(heads, hidden.levels, strict=True):
        per_clip = []
        for b in range(len(hidden.grids)):
            feature_hw = (int(batch.feature_hw[b, 0]), int(batch.feature_hw[b, 1]))
            pred = head(hidden.video_states(index, b, dtype_of(head)), head_grid(feature_hw, (1, 1)))
            pred = pred[:, : feature_hw[0], : feature_hw[1]]
            per_clip.append(pad_to(pred.float(), (frames, *grid_hw, pred.shape[-1])))
        features.append(torch.stack(per_clip))
    return features


def _distill_loss(features: list[Tensor], batch: StudentBatch, cfg: StudentConfig) -> Tensor:
    return distill_loss(features, batch.features, feature_valid(batch))


def _feature_metric(
    features: list[np.ndarray], labels: ClipLabels, feature_layers: Sequence[int]
) -> dict[str, float]:
    """Per distilled layer l, `feature_cosine_layer<l>`: mean cosine to the teacher's features."""
    out = {}
    for index, (layer, pred) in enumerate(zip(feature_layers, features, strict=True)):
        target = labels.features[:, index]
        if pred.shape != target.shape:
            raise ValueError(
                f"clip {labels.clip_id}: student features of layer {layer} have shape {pred.shape}, "
                f"the store's {target.shape}; was the student trained on this store's teacher?"
            )
        out[f"feature_cosine_layer{layer}"] = feature_cosine(pred, target)
    return out


# ----------------------------------------------------------------------------------------------
# GeoVR's four objectives, in the order their heads run (the order the heads are built in, so that
# a given seed initialises the same weights).

register(
    Objective(
        name="camera",
        output="pose_enc",
        label_fields=("pose_enc",),
        weight_key="camera_weight",
        switch="camera",
        module="camera_head",
        reads="camera_tokens",
        build_head=lambda width, cfg: CameraHead(width, cfg.camera_hidden),
        predict=_predict_camera,
        loss=_camera_loss,
        metric=_camera_metric,
    )
)
register(
    Objective(
        name="scale",
        output="scale",
        label_fields=("scale", "scale_valid"),
        weight_key="scale_weight",
        switch="scale",
        module="scale_head",
        reads="scale_token",
        build_head=lambda width, cfg: ScaleHead(width, cfg.scale_hidden),
        predict=_predict_scale,
        loss=_scale_loss,
        metric=_scale_metric,
    )
)
register(
    Objective(
        name="depth",
        output="depth",
        label_fields=("depth",),
        weight_key="depth_weight",
        switch="depth",
        module="dense_head",
        reads="video",
        build_head=lambda width, cfg: DenseHead(
            width, cfg.dense_features, cfg.dense_channels, cfg.depth_shuffle
        ),
        predict=_predict_depth,
        loss=_depth_loss,
        metric=_depth_metric,
        levels=True,
    )
)
register(
    Objective(
        name="distill",
        output="features",
        label_fields=("features",),
        weight_key="distill_weight",
        switch="distill",
        module="distill_heads",
        reads="video",
        build_head=_build_distill,
        predict=_predict_features,
        loss=_distill_loss,
        metric=_feature_metric,
        levels=True,
    )
)


# ----------------------------------------------------------------------------------------------
# SpatialSV's point map: the depth composed with the cameras (`student.point_map`), in frame 0's
# camera frame; needs the depth and camera objectives, whose predictions come before it.


class ComposedPointMap(nn.Module):
    """The point-map "head": no parameters, it composes the depth and camera heads' outputs."""

    def forward(self, depth: Tensor, pose_enc: Tensor) -> Tensor:
        """depth (S, H, W), pose_enc (S, 9) -> (S, H, W, 3) points (`point_map.compose_points`)."""
        return compose_points(depth, pose_enc)


def _build_point_map(width: int, cfg: StudentConfig) -> nn.Module:
    if not (cfg.depth and cfg.camera):
        raise ValueError(
            "student: the point map composes the depth and camera heads; enable student.depth and student.camera"
        )
    return ComposedPointMap()


def _clip_extent(batch: StudentBatch, b: int) -> tuple[int, int, int]:
    """(frames, Hd_b, Wd_b) of clip b."""
    return int(batch.frame_mask[b].sum()), int(batch.depth_hw[b, 0]), int(batch.depth_hw[b, 1])


def _predict_points(head: nn.Module, hidden: HiddenStates, batch: StudentBatch) -> Tensor:
    """(B, S, Hd, Wd, 3) points in frame 0's camera frame, zero outside each clip's frames and map."""
    depth, pose_enc = hidden.outputs["depth"], hidden.outputs["pose_enc"]
    maps = []
    for b in range(depth.shape[0]):
        frames, height, width = _clip_extent(batch, b)
        points = head(depth[b, :frames, :height, :width], pose_enc[b, :frames])
        maps.append(pad_to(points, (*depth.shape[1:], 3)))
    return torch.stack(maps)


def _point_map_loss(pred: Tensor, batch: StudentBatch, cfg: StudentConfig) -> Tensor:
    """`point_map.point_map_loss` against the cached depth unprojected with the cached cameras."""
    valid_all = depth_valid(batch)
    preds, targets, valid = [], [], []
    for b in range(pred.shape[0]):
        frames, height, width = _clip_extent(batch, b)
        depth = batch.depth[b, :frames, :height, :width].float()
        targets.append(compose_points(depth, batch.pose_enc[b, :frames].float()))
        preds.append(pred[b, :frames, :height, :width])
        valid.append(valid_all[b, :frames, :height, :width])
    loss, _ = point_map_loss(preds, targets, valid)
    return loss


def _point_map_metric(points: np.ndarray, labels: ClipLabels, _: Sequence[int]) -> dict[str, float]:
    """point_map_error: mean ||X̂ - X̃|| over valid pixels, in the teacher's normalised units."""
    target, valid = label_points(labels)
    pred = torch.from_numpy(np.asarray(points, dtype=np.float64))
    error = (pred - target)[valid].norm(dim=-1)
    return {"point_map_error": float(error.mean())} if error.numel() else {}


register(
    Objective(
        name="point_map",
        output="points",
        label_fields=("depth", "extrinsic", "intrinsic"),
        weight_key="point_map_weight",
        switch=None,
        module="point_map_head",
        reads="outputs",
        build_head=_build_point_map,
        predict=_predict_points,
        loss=_point_map_loss,
        metric=_point_map_metric,
    )
)
