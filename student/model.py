"""GeoVRStudent: Qwen3-VL with GeoVR's geometric tokens, heads and losses (DESIGN.md, "Stage 2").

Sequence: the batch holds the plain Qwen3-VL sequence; the student inserts, per clip, one camera
token right after each frame's visual tokens (embedding row 0 for the first frame, row 1 for the
others) and one scale token after the last camera token, all as video-type tokens (before the
frame's `<|vision_end|>`). Each inserted token takes the 3D (M-RoPE) position of the token before
it (the camera token: its frame's last patch), so text positions are unchanged. DeepStack adds
nothing at the inserted tokens.

Hidden states (the student runs the decoder layers itself): index 0 is the input embeddings, index
k (0 < k < N, N = number of layers) the residual stream after decoder layer k including the
DeepStack addition of that layer, index N the output of the final norm (`last_hidden_state`).
GeoVR reads transformers 5.5.0's `output_hidden_states`, recorded by `capture_outputs`: entry 0 is
the input of layer 0, entry k the output of decoder layer k taken by a hook on the layer, so before
the DeepStack addition the text model applies after layers 0..D-1 (D = DeepStack levels: 3 in
Qwen3-VL-2B, 1 in the tiny model), and the last entry is replaced by `last_hidden_state`, after the
norm. So index N and every index above D are GeoVR's exactly; indices 1..D hold the DeepStack
addition here (transformers 4.57's and GeoVR's own loop's convention), which no level of the recipe
reads (6, 14, 21 of 28). The installed transformers 5.x records the same for
`output_hidden_states=True` (it adds index selection and a per-config `tie_last_hidden_states`).
Teacher layer l maps to index round((l + 1) / teacher_depth * N): [4, 11, 17, 23] of 24 ->
[6, 14, 21, 28] for 28 layers, [1, 2, 3, 4] for the tiny 4-layer model. The camera and scale heads
read index N, and so do the depth and distillation heads at their deepest level, as in GeoVR.

Checkpoint format (`save_pretrained` / `from_pretrained`), one directory:
    config.json, model.safetensors (or shards), generation_config.json   the base Qwen3-VL, plain
    tokenizer / chat template / processor json files                      copied from the base dir
    geovr_heads.safetensors   camera_token.*, scale_token.*, camera_head.*, dense_head.*,
                              scale_head.*, distill_heads.<i>.* (only the enabled parts)
    student_config.json       {"format_version": 1, "student": StudentConfig as a dict}
A run directory may hold several as RUN/checkpoints/<name>/; the last in natural sort order is used
(names containing ".tmp", checkpoints still being written, are skipped).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import Qwen3VLForConditionalGeneration
from transformers.masking_utils import create_causal_mask

from geovr.student.batch import StudentBatch
from geovr.student.heads import CameraHead, DenseHead, DistillHead, ScaleHead
from geovr.student.losses import (
    IGNORE_INDEX,
    camera_loss,
    causal_lm_loss,
    depth_loss,
    distill_loss,
    scale_loss,
)
from geovr.teacher_cache.config import from_dict, require, to_dict
from geovr.teacher_cache.schema import StoreFingerprint

CHECKPOINT_FORMAT_VERSION = 1
HEADS_FILE = "geovr_heads.safetensors"
CONFIG_FILE = "student_config.json"
# Files of a model directory besides the weights that a plain Qwen3-VL checkpoint needs.
PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
)


@dataclass
class StudentConfig:
    """Section `student` of the presets. Defaults: GeoVR on Qwen3-VL-2B with VGGT-1B as teacher.

    Attributes:
        base_model: local directory of the Qwen3-VL checkpoint to start from.
        teacher_layers / teacher_depth: the distilled teacher layers (the cache's L axis) and the
            teacher's number of layers, for the hidden-state mapping.
        teacher_feature_dim: C of the cached features (1024: VGGT's frame-attention half).
        camera / depth / scale / distill: which geometric parts exist (and train).
        camera_hidden, scale_hidden, dense_features, dense_channels: head widths.
        depth_shuffle: pixel-shuffle factor from the teacher patch grid to the cached depth.
        *_weight: weights of the five losses in `total`.
        camera_part_weights: translation, rotation, FoV weights inside the camera loss.
        video_max_pixels, video_min_pixels: the clip pixel budget of the student frames, as the
            Qwen3-VL video processor applies it to a whole clip (`teacher_cache.frames.student_frame_size`;
            GeoVR: 32 * 300 * 32 * 32 and 4 * 16 * 32 * 32). Must equal the store's (precompute's).
        train_deepstack_mergers: also train the vision tower's DeepStack mergers (GeoVR freezes
            them: it unfreezes only `visual.merger`); they then train at the LLM rate.
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
    camera_part_weights: tuple[float, ...] = (1.0, 1.0, 0.5)
    translation_clamp: float = 100.0
    depth_quantile: float = 0.98
    depth_quantile_min_elements: int = 1000
    depth_grad_scales: int = 4
    depth_grad_clamp: float = 100.0
    video_max_pixels: int = 32 * 300 * 32 * 32
    video_min_pixels: int = 4 * 16 * 32 * 32
    train_deepstack_mergers: bool = False

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
        matched.validate()
        return matched


def map_teacher_layers(teacher_layers: tuple[int, ...], teacher_depth: int, num_layers: int) -> list[int]:
    """Hidden-state index for each teacher layer: round((l + 1) / teacher_depth * num_layers)."""
    indices = [round((layer + 1) / teacher_depth * num_layers) for layer in teacher_layers]
    if len(set(indices)) != len(indices):
        raise ValueError(
            f"teacher layers {list(teacher_layers)} of {teacher_depth} map to repeated hidden states {indices} "
            f"of a {num_layers}-layer student; use a deeper student or other teacher layers"
        )
    return indices


@dataclass
class GeometryLayout:
    """The sequence with geometric tokens inserted, and where everything sits (row b of the batch).

    Attributes:
        input_ids, attention_mask, labels, mm_token_type_ids: (B, L') the extended sequence.
        position_ids: (3, B, L') M-RoPE positions.
        patch_positions: per clip, (S_b, hq * wq) positions of its visual tokens, frame-major.
        camera_positions: per clip, (S_b,) positions of its camera tokens (empty without camera).
        scale_positions: (B,) position of each clip's scale token (-1 without scale).
        visual_mask: (B, L') True at visual tokens (not at inserted ones): where DeepStack adds.
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    mm_token_type_ids: Tensor
    position_ids: Tensor
    patch_positions: list[Tensor]
    camera_positions: list[Tensor]
    scale_positions: Tensor
    visual_mask: Tensor = field(repr=False)


def insert_geometry_tokens(
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    mm_token_type_ids: Tensor,
    position_ids: Tensor,
    video_grid_thw: Tensor,
    video_token_id: int,
    merge_size: int,
    pad_token_id: int,
    camera: bool = True,
    scale: bool = True,
) -> GeometryLayout:
    """Insert a camera token after each frame's visual tokens and a scale token after the video.

    Inserted tokens carry `video_token_id`, attention 1, type 2 (video), label IGNORE_INDEX, and
    the 3D position of the token before them. Padding (attention 0) is dropped and the result is
    right-padded again.

    Args:
        input_ids, attention_mask, labels, mm_token_type_ids: (B, L) the plain sequence, one video per row.
        position_ids: (3, B, L) its M-RoPE positions (`get_rope_index`).
        video_grid_thw: (B, 3) patch grid per clip; S_b = grid_t frames of grid_h * grid_w / merge^2 tokens.
    """
    batch = input_ids.shape[0]
    if video_grid_thw.shape[0] != batch:
        raise ValueError(f"one video per sample expected: {batch} rows but {video_grid_thw.shape[0]} videos")
    rows = []
    for b in range(batch):
        kept = attention_mask[b].bool().nonzero().squeeze(1)
        ids = input_ids[b, kept]
        t, h, w = (int(v) for v in video_grid_thw[b])
        per_frame = h * w // (merge_size * merge_size)
        video_pos = (ids == video_token_id).nonzero().squeeze(1)
        if video_pos.numel() != t * per_frame:
            raise ValueError(
                f"sample {b}: {video_pos.numel()} video tokens, grid {t}x{h}x{w} needs {t * per_frame} "
                "(the batch must hold the plain processor sequence, without geometric tokens)"
            )
        frame_last = video_pos.view(t, per_frame)[:, -1]
        inserted = torch.zeros_like(ids)
        if camera:
            inserted[frame_last] += 1
        if scale:
            inserted[frame_last[-1]] += 1
        new_index = torch.arange(ids.numel(), device=ids.device) + torch.cumsum(inserted, 0) - inserted
        camera_pos = new_index[frame_last] + 1 if camera else frame_last[:0]
        scale_pos = new_index[frame_last[-1]] + 1 + int(camera) if scale else new_index.new_tensor(-1)
        patches = new_index[video_pos].view(t, per_frame)
        rows.append((kept, new_index, patches, camera_pos, scale_pos, ids.numel() + int(inserted.sum())))

    length = max(r[-1] for r in rows)
    full = input_ids.new_full
    out_ids, out_mask = full((batch, length), pad_token_id), full((batch, length), 0)
    out_labels, out_types = full((batch, length), IGNORE_INDEX), full((batch, length), 0)
    out_pos = position_ids.new_zeros((3, batch, length))
    visual_mask = torch.zeros((batch, length), dtype=torch.bool, device=input_ids.device)
    patch_positions, camera_positions, scale_positions = [], [], []
    for b, (kept, new_index, patches, camera_pos, scale_pos, _) in enumerate(rows):
        out_ids[b, new_index] = input_ids[b, kept]
        out_mask[b, new_index] = 1
        out_labels[b, new_index] = labels[b, kept]
        out_types[b, new_index] = mm_token_type_ids[b, kept]
        out_pos[:, b, new_index] = position_ids[:, b, kept]
        slots = torch.cat((camera_pos, scale_pos.view(-1)[scale_pos.view(-1) >= 0]))
        out_ids[b, slots] = video_token_id
        out_mask[b, slots] = 1
        out_types[b, slots] = 2
        for slot in slots.tolist():  # in order, so the scale token copies the camera token's position
            out_pos[:, b, slot] = out_pos[:, b, slot - 1]
        visual_mask[b, patches.reshape(-1)] = True
        patch_positions.append(patches)
        camera_positions.append(camera_pos)
        scale_positions.append(scale_pos)
    return GeometryLayout(
        input_ids=out_ids,
        attention_mask=out_mask,
        labels=out_labels,
        mm_token_type_ids=out_types,
        position_ids=out_pos,
        patch_positions=patch_positions,
        camera_positions=camera_positions,
        scale_positions=torch.stack(scale_positions),
        visual_mask=visual_mask,
    )


@dataclass
class GeometryPredictions:
    """The heads' outputs for a batch (padded like the batch; NaN where a clip has no value).

    Attributes:
        pose_enc: (B, S, 9) cameras relative to frame 0. depth: (B, S, Hd, Wd). scale: (B,).
        frame_mask: (B, S) bool. features: per distilled layer (B, S, h, w, C), the distillation
        heads' outputs on the teacher's pooled grid (empty without feature distillation).
    """

    pose_enc: Tensor | None
    depth: Tensor | None
    scale: Tensor | None
    frame_mask: Tensor
    features: list[Tensor] = field(default_factory=list)


class GeoVRStudent(nn.Module):
    """A Qwen3-VL (`self.base`) with GeoVR's geometric tokens and heads.

    `forward(batch)` returns the losses {lm, camera, depth, scale, distill, total} (the ones of
    disabled parts are zero); `predict(batch)` the heads' outputs; `generate(**inputs)` is the plain
    model's (no geometric tokens), which is what `export_plain` keeps.
    """

    def __init__(
        self,
        base: Qwen3VLForConditionalGeneration,
        config: StudentConfig,
        source_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        config.validate()
        self.base = base
        self.config = config
        self.source_dir = Path(source_dir) if source_dir is not None else None
        text = base.config.text_config
        width = text.hidden_size
        self.num_layers = text.num_hidden_layers
        self.layer_indices = map_teacher_layers(config.teacher_layers, config.teacher_depth, self.num_layers)
        if config.camera:
            self.camera_token = nn.Embedding(2, width)
            self.camera_head = CameraHead(width, config.camera_hidden)
        if config.scale:
            self.scale_token = nn.Embedding(1, width)
            self.scale_head = ScaleHead(width, config.scale_hidden)
        if config.depth:
            self.dense_head = DenseHead(
                width, config.dense_features, config.dense_channels, config.depth_shuffle
            )
        if config.distill:
            self.distill_heads = nn.ModuleList(
                DistillHead(width, config.teacher_feature_dim) for _ in config.teacher_layers
            )
        self.freeze_vision_tower()

    # ----------------------------------------------------------------- parameters

    def freeze_vision_tower(self) -> None:
        """Freeze the vision tower except its merger (GeoVR's `set_model`); the DeepStack mergers
        train only with `train_deepstack_mergers`."""
        visual = self.base.model.visual
        visual.requires_grad_(False)
        visual.merger.requires_grad_(True)
        visual.deepstack_merger_list.requires_grad_(self.config.train_deepstack_mergers)

    def geometry_modules(self) -> dict[str, nn.Module]:
        """The parts added to Qwen3-VL (dropped at export), by state-dict prefix."""
        names = ("camera_token", "camera_head", "scale_token", "scale_head", "dense_head", "distill_heads")
        return {name: getattr(self, name) for name in names if hasattr(self, name)}

    def param_groups(
        self, lr_llm: float = 2e-5, lr_heads: float = 1e-4, weight_decay: float = 0.0
    ) -> list[dict]:
        """Optimizer groups: {"name": "llm"} LLM + trained mergers at `lr_llm`, {"name": "heads"} heads and
        new tokens at `lr_heads` (DESIGN defaults). Frozen and tied (shared) parameters appear once."""
        seen: set[int] = set()

        def take(modules) -> list[nn.Parameter]:
            params = []
            for module in modules:
                for p in module.parameters():
                    if p.requires_grad and id(p) not in seen:
                        seen.add(id(p))
                        params.append(p)
            return params

        visual = self.base.model.visual
        llm = take(
            [self.base.model.language_model, self.base.lm_head, visual.merger, visual.deepstack_merger_list]
        )
        heads = take(self.geometry_modules().values())
        leftover = [n for n, p in self.named_parameters() if p.requires_grad and id(p) not in seen]
        if leftover:
            raise RuntimeError(f"trainable parameters in no group: {leftover[:5]}")
        return [
            {"name": "llm", "params": llm, "lr": lr_llm, "weight_decay": weight_decay},
            {"name": "heads", "params": heads, "lr": lr_heads, "weight_decay": weight_decay},
        ]

    # ----------------------------------------------------------------- forward

    def _layout(self, batch: StudentBatch) -> GeometryLayout:
        cfg = self.base.config
        position_ids, _ = self.base.model.get_rope_index(
            batch.input_ids,
            mm_token_type_ids=batch.mm_token_type_ids,
            video_grid_thw=batch.video_grid_thw,
            attention_mask=batch.attention_mask,
        )
        pad = cfg.text_config.pad_token_id
        return insert_geometry_tokens(
            batch.input_ids,
            batch.attention_mask,
            batch.labels,
            batch.mm_token_type_ids,
            position_ids,
            batch.video_grid_thw,
            video_token_id=cfg.video_token_id,
            merge_size=cfg.vision_config.spatial_merge_size,
            pad_token_id=pad if pad is not None else 0,
            camera=self.config.camera,
            scale=self.config.scale,
        )

    def _input_embeddings(self, batch: StudentBatch, layout: GeometryLayout) -> tuple[Tensor, list[Tensor]]:
        """(B, L', d) embeddings with visual features and geometric tokens; DeepStack features per level."""
        vision = self.base.model.get_video_features(batch.pixel_values_videos, batch.video_grid_thw)
        embeds = self.base.get_input_embeddings()(layout.input_ids)
        rows, cols, values = [], [], []
        for b, patches in enumerate(layout.patch_positions):
            rows.append(torch.full((patches.numel(),), b, device=embeds.device))
            cols.append(patches.reshape(-1))
            values.append(vision.pooler_output[b].to(embeds.dtype))
            if self.config.camera:
                frames = layout.camera_positions[b].numel()
                # embedding row 0 for the first frame, row 1 for the others
                which = (torch.arange(frames, device=embeds.device) > 0).long()
                rows.append(torch.full((frames,), b, device=embeds.device))
                cols.append(layout.camera_positions[b])
                values.append(self.camera_token(which).to(embeds.dtype))
            if self.config.scale:
                rows.append(torch.full((1,), b, device=embeds.device))
                cols.append(layout.scale_positions[b].view(1))
                values.append(self.scale_token.weight.to(embeds.dtype))
        embeds = embeds.index_put((torch.cat(rows), torch.cat(cols)), torch.cat(values))
        deepstack = [torch.cat(level).to(embeds.dtype) for level in vision.deepstack_features]
        return embeds, deepstack

    def _decoder(
        self, embeds: Tensor, layout: GeometryLayout, deepstack: list[Tensor], wanted: set[int]
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """Run the text decoder; returns the normed last hidden state and the hidden states in
        `wanted` (index N is the normed state itself; see the module docstring)."""
        lm = self.base.model.language_model
        mask = create_causal_mask(
            config=lm.config,
            inputs_embeds=embeds,
            attention_mask=layout.attention_mask,
            past_key_values=None,
            position_ids=None,
        )
        rope = lm.rotary_emb(embeds, layout.position_ids)
        hidden = embeds
        kept = {0: hidden} if 0 in wanted else {}
        for i, layer in enumerate(lm.layers):
            hidden = layer(hidden, position_embeddings=rope, attention_mask=mask)
            if i < len(deepstack):
                hidden = lm._deepstack_process(hidden, layout.visual_mask, deepstack[i])
            if i + 1 in wanted:
                kept[i + 1] = hidden
        last = lm.norm(hidden)
        if len(lm.layers) in wanted:
            kept[len(lm.layers)] = last
        return last, kept

    def _run(self, batch: StudentBatch) -> tuple[Tensor, GeometryLayout, list[Tensor], GeometryPredictions]:
        """Normed last hidden state, layout, distilled features per layer (B, S, h, w, C) and the
        head predictions, zero-padded like the batch."""
        layout = self._layout(batch)
        embeds, deepstack = self._input_embeddings(batch, layout)
        wanted = {self.num_layers}
        if self.config.depth or self.config.distill:
            wanted |= set(self.layer_indices)
        last, states = self._decoder(embeds, layout, deepstack, wanted)
        grids, merge = batch.video_grid_thw, self.base.config.vision_config.spatial_merge_size
        frames = [int(t) for t in grids[:, 0]]
        if frames != [int(n) for n in batch.frame_mask.sum(1)]:
            raise ValueError(
                f"video frames {frames} differ from labelled frames {batch.frame_mask.sum(1).tolist()}"
            )
        num_frames = batch.frame_mask.shape[1]

        def video_states(index: int, b: int, head: nn.Module) -> Tensor:
            """(S_b, hq, wq, d) states of clip b's visual tokens at hidden state `index`, in `head`'s dtype."""
            _, h, w = (int(v) for v in grids[b])
            x = states[index][b, layout.patch_positions[b]].unflatten(1, (h // merge, w // merge))
            return x.to(_dtype_of(head))

        last_states = states[self.num_layers]
        pose = scale = depth = None
        features: list[Tensor] = []
        if self.config.camera:
            pose = torch.stack(
                [
                    _pad_to(
                        self.camera_head(last_states[b, pos].to(_dtype_of(self.camera_head))).float(),
                        (num_frames, 9),
                    )
                    for b, pos in enumerate(layout.camera_positions)
                ]
            )
        if self.config.scale:
            rows = torch.arange(len(grids), device=last_states.device)
            scale = self.scale_head(
                last_states[rows, layout.scale_positions].to(_dtype_of(self.scale_head))
            ).float()
        if self.config.depth:
            maps = []
            for b in range(len(grids)):
                levels = [video_states(i, b, self.dense_head) for i in self.layer_indices]
                depth_hw = (int(batch.depth_hw[b, 0]), int(batch.depth_hw[b, 1]))
                pred = self.dense_head(levels, depth_hw, int(grids[b, 2]) / int(grids[b, 1])).float()
                maps.append(_pad_to(pred, (num_frames, *batch.depth.shape[2:])))
            depth = torch.stack(maps)
        if self.config.distill:
            grid_hw = batch.features.shape[3:5]
            for head, index in zip(self.distill_heads, self.layer_indices, strict=True):
                per_clip = []
                for b in range(len(grids)):
                    pred = head(
                        video_states(index, b, head),
                        (int(batch.feature_hw[b, 0]), int(batch.feature_hw[b, 1])),
                    )
                    per_clip.append(_pad_to(pred.float(), (num_frames, *grid_hw, pred.shape[-1])))
                features.append(torch.stack(per_clip))
        return last, layout, features, GeometryPredictions(pose, depth, scale, batch.frame_mask)

    def forward(self, batch: StudentBatch) -> dict[str, Tensor]:
        """Losses {lm, camera, depth, scale, distill, total} for a `StudentBatch` (float32 scalars)."""
        cfg = self.config
        last, layout, features, pred = self._run(batch)
        losses = {"lm": causal_lm_loss(last, layout.labels, self.base.lm_head)}
        zero = losses["lm"].new_zeros(())
        losses["camera"] = zero
        if pred.pose_enc is not None:
            losses["camera"], _ = camera_loss(
                pred.pose_enc,
                batch.pose_enc.float(),
                batch.frame_mask,
                tuple(cfg.camera_part_weights),
                cfg.translation_clamp,
            )
        losses["depth"] = zero
        if pred.depth is not None:
            losses["depth"], _ = depth_loss(
                pred.depth,
                batch.depth.float(),
                self.depth_valid(batch),
                cfg.depth_quantile,
                cfg.depth_quantile_min_elements,
                grad_scales=cfg.depth_grad_scales,
                grad_clamp=cfg.depth_grad_clamp,
            )
        losses["scale"] = zero
        if pred.scale is not None:
            losses["scale"] = scale_loss(pred.scale, batch.scale.float(), batch.scale_valid)
        losses["distill"] = zero
        if features:
            losses["distill"] = distill_loss(features, batch.features, self.feature_valid(batch))
        losses["total"] = (
            cfg.lm_weight * losses["lm"]
            + cfg.camera_weight * losses["camera"]
            + cfg.depth_weight * losses["depth"]
            + cfg.distill_weight * losses["distill"]
            + cfg.scale_weight * losses["scale"]
        )
        return losses

    @staticmethod
    def depth_inside(batch: StudentBatch) -> Tensor:
        """(B, S, Hd, Wd) bool: real frames, inside the clip's own depth map."""
        _, _, height, width = batch.depth.shape
        rows = (
            torch.arange(height, device=batch.depth.device)[None, :, None] < batch.depth_hw[:, 0, None, None]
        )
        cols = (
            torch.arange(width, device=batch.depth.device)[None, None, :] < batch.depth_hw[:, 1, None, None]
        )
        return batch.frame_mask[:, :, None, None] & (rows & cols)[:, None]

    @staticmethod
    def feature_valid(batch: StudentBatch) -> Tensor:
        """(B, S, h, w) bool: feature tokens of real frames inside the clip's own feature grid."""
        _, _, _, height, width, _ = batch.features.shape
        rows = (
            torch.arange(height, device=batch.features.device)[None, :, None]
            < batch.feature_hw[:, 0, None, None]
        )
        cols = (
            torch.arange(width, device=batch.features.device)[None, None, :]
            < batch.feature_hw[:, 1, None, None]
        )
        return batch.frame_mask[:, :, None, None] & (rows & cols)[:, None]

    @classmethod
    def depth_valid(cls, batch: StudentBatch) -> Tensor:
        """(B, S, Hd, Wd) bool: `depth_inside` with a finite positive target."""
        return cls.depth_inside(batch) & torch.isfinite(batch.depth) & (batch.depth > 0)

    @torch.no_grad()
    def predict(self, batch: StudentBatch) -> GeometryPredictions:
        """The heads' predictions (camera poses relative to frame 0, depth, metric scale, distilled
        features), NaN in padding."""
        _, _, features, pred = self._run(batch)
        pred.features = features
        frames = batch.frame_mask
        if pred.pose_enc is not None:
            pred.pose_enc = pred.pose_enc.masked_fill(~frames[..., None], float("nan"))
        if pred.depth is not None:
            pred.depth = pred.depth.masked_fill(~self.depth_inside(batch), float("nan"))
        return pred

    def generate(self, **inputs):
        """Plain Qwen3-VL generation (no geometric tokens): what the exported model does."""
        return self.base.generate(**inputs)

    # ----------------------------------------------------------------- persistence

    @classmethod
    def from_base(
        cls, model_dir: str | Path, config: StudentConfig | None = None, dtype: torch.dtype | str = "auto"
    ) -> GeoVRStudent:
        """A student with fresh heads around the Qwen3-VL checkpoint in `model_dir` (local only)."""
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir}: not a model directory (no config.json)")
        base = Qwen3VLForConditionalGeneration.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
        return cls(base, config or StudentConfig(base_model=str(model_dir)), source_dir=model_dir)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, config: StudentConfig | None = None, dtype: torch.dtype | str = "auto"
    ) -> GeoVRStudent:
        """Load a student checkpoint, the last checkpoint of a run, or start from a plain Qwen3-VL dir
        (then with `config`, fresh heads)."""
        path = Path(path)
        checkpoint = resolve_checkpoint(path, allow_plain=True)
        if not (checkpoint / CONFIG_FILE).is_file():
            return cls.from_base(checkpoint, config, dtype)
        student_config = read_student_config(checkpoint)
        student = cls.from_base(checkpoint, student_config, dtype)
        heads = load_file(checkpoint / HEADS_FILE)
        expected = {
            f"{name}.{key}"
            for name, module in student.geometry_modules().items()
            for key in module.state_dict()
        }
        if set(heads) != expected:
            missing, unexpected = sorted(expected - set(heads)), sorted(set(heads) - expected)
            raise ValueError(f"{checkpoint / HEADS_FILE}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, module in student.geometry_modules().items():
            prefix = name + "."
            module.load_state_dict({k[len(prefix) :]: v for k, v in heads.items() if k.startswith(prefix)})
        return student

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write the checkpoint format of the module docstring to `out_dir`."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.base.save_pretrained(out, safe_serialization=True)
        heads = {
            f"{name}.{key}": value.detach().contiguous().cpu()
            for name, module in self.geometry_modules().items()
            for key, value in module.state_dict().items()
        }
        save_file(heads, out / HEADS_FILE, metadata={"format_version": str(CHECKPOINT_FORMAT_VERSION)})
        record = {"format_version": CHECKPOINT_FORMAT_VERSION, "student": to_dict(self.config)}
        (out / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if self.source_dir is not None and self.source_dir.resolve() != out.resolve():
            copy_processor_files(self.source_dir, out)
        return out


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _pad_to(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Zero-pad `x` at the end of each dimension up to `shape`."""
    pads = []
    for have, want in zip(reversed(x.shape), reversed(shape), strict=True):
        pads += [0, want - have]
    return F.pad(x, pads)


def read_student_config(checkpoint: Path) -> StudentConfig:
    """The `StudentConfig` recorded in a checkpoint directory."""
    path = checkpoint / CONFIG_FILE
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if record.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format {record.get('format_version')}, this code reads {CHECKPOINT_FORMAT_VERSION}"
        )
    return from_dict(StudentConfig, record["student"], where=str(path))


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def resolve_checkpoint(path: Path, allow_plain: bool = False) -> Path:
    """A student checkpoint dir itself, or the last of RUN/checkpoints/*/ (natural sort); with
    `allow_plain`, also a plain model dir (config.json only)."""
    if (path / CONFIG_FILE).is_file():
        return path
    complete = (
        p.parent for p in (path / "checkpoints").glob(f"*/{CONFIG_FILE}") if ".tmp" not in p.parent.name
    )
    candidates = sorted(complete, key=lambda p: _natural_key(p.name))
    if candidates:
        return candidates[-1]
    if allow_plain and (path / "config.json").is_file():
        return path
    raise FileNotFoundError(
        f"{path}: neither a student checkpoint ({CONFIG_FILE}) nor a run with checkpoints/*/"
    )


def copy_processor_files(source: Path, out: Path) -> list[str]:
    """Copy the tokenizer, chat template and processor files a model directory has; returns their names."""
    copied = []
    for name in PROCESSOR_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
            copied.append(name)
    return copied
