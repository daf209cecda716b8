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

Fusion (`student.fusion`: Spatial-MLLM's dual encoder): the connector (`student.fusion`) adds the
batch's cached fusion features to each clip's merged video tokens before they enter the sequence
(DeepStack features unchanged). It is stored with the heads (`spatial_connector.*`) but, unlike
them, it is part of the model at inference: `export` keeps it (`student.fusion_export`).

Checkpoints: `save_pretrained` / `from_pretrained` write and read the format of `student.checkpoint`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Qwen3VLForConditionalGeneration
from transformers.masking_utils import create_causal_mask

from geovr.student.batch import StudentBatch
from geovr.student.checkpoint import (
    CONFIG_FILE,
    load_heads,
    read_student_config,
    resolve_checkpoint,
    write_checkpoint,
)
from geovr.student.config import StudentConfig
from geovr.student.fusion import SpatialConnector
from geovr.student.losses import IGNORE_INDEX, causal_lm_loss
from geovr.student.objectives import OBJECTIVES, HiddenStates, depth_inside, enabled_objectives


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
    rows = [
        _row_insertion(b, input_ids[b], attention_mask[b], video_grid_thw[b], video_token_id, merge_size, camera, scale)
        for b in range(batch)
    ]  # fmt: skip
    length = max(row.length for row in rows)
    full = input_ids.new_full
    out_ids, out_mask = full((batch, length), pad_token_id), full((batch, length), 0)
    out_labels, out_types = full((batch, length), IGNORE_INDEX), full((batch, length), 0)
    out_pos = position_ids.new_zeros((3, batch, length))
    visual_mask = torch.zeros((batch, length), dtype=torch.bool, device=input_ids.device)
    for b, row in enumerate(rows):
        new_index, kept = row.new_index, row.kept
        out_ids[b, new_index] = input_ids[b, kept]
        out_mask[b, new_index] = 1
        out_labels[b, new_index] = labels[b, kept]
        out_types[b, new_index] = mm_token_type_ids[b, kept]
        out_pos[:, b, new_index] = position_ids[:, b, kept]
        slots = torch.cat((row.camera_pos, row.scale_pos.view(-1)[row.scale_pos.view(-1) >= 0]))
        out_ids[b, slots] = video_token_id
        out_mask[b, slots] = 1
        out_types[b, slots] = 2
        for slot in slots.tolist():  # in order, so the scale token copies the camera token's position
            out_pos[:, b, slot] = out_pos[:, b, slot - 1]
        visual_mask[b, row.patches.reshape(-1)] = True
    return GeometryLayout(
        input_ids=out_ids,
        attention_mask=out_mask,
        labels=out_labels,
        mm_token_type_ids=out_types,
        position_ids=out_pos,
        patch_positions=[row.patches for row in rows],
        camera_positions=[row.camera_pos for row in rows],
        scale_positions=torch.stack([row.scale_pos for row in rows]),
        visual_mask=visual_mask,
    )


@dataclass
class _RowInsertion:
    """Where one row's tokens go once the geometric tokens are inserted (padding dropped).

    kept: (n,) positions of the row's real tokens; new_index: (n,) their new positions; patches:
    (t, per_frame) new positions of the visual tokens; camera_pos: (t,) or (0,); scale_pos: () or -1.
    """

    kept: Tensor
    new_index: Tensor
    patches: Tensor
    camera_pos: Tensor
    scale_pos: Tensor
    length: int


def _row_insertion(
    b: int,
    input_ids: Tensor,
    attention_mask: Tensor,
    grid_thw: Tensor,
    video_token_id: int,
    merge_size: int,
    camera: bool,
    scale: bool,
) -> _RowInsertion:
    """The insertion plan of row `b` (input_ids, attention_mask: (L,); grid_thw: (3,))."""
    kept = attention_mask.bool().nonzero().squeeze(1)
    ids = input_ids[kept]
    t, h, w = (int(v) for v in grid_thw)
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
    return _RowInsertion(kept, new_index, patches, camera_pos, scale_pos, ids.numel() + int(inserted.sum()))


@dataclass
class GeometryPredictions:
    """The heads' outputs for a batch (padded like the batch; NaN where a clip has no value).

    Attributes:
        frame_mask: (B, S) bool.
        outputs: by `Objective.output`, for the enabled objectives: "pose_enc" (B, S, 9) cameras
            relative to frame 0, "depth" (B, S, Hd, Wd), "scale" (B,), "features" per distilled
            layer (B, S, h, w, C) on the teacher's pooled grid. Also readable as attributes
            (`pred.pose_enc`); an objective that is off has no entry.
    """

    frame_mask: Tensor
    outputs: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        outputs = self.__dict__.get("outputs", {})
        if name in outputs:
            return outputs[name]
        raise AttributeError(f"no prediction {name!r} (its objective is off or unknown)")


# The inserted tokens each kind of reader needs (created right before the first head that reads them).
_TOKENS = {"camera_tokens": ("camera_token",), "scale_token": ("scale_token",)}


class GeoVRStudent(nn.Module):
    """A Qwen3-VL (`self.base`) with GeoVR's geometric tokens and heads.

    `forward(batch)` returns the losses {total, lm, and one per objective of `student.objectives`}
    (the ones of disabled objectives are zero); `predict(batch)` the heads' outputs; `generate(**inputs)` is the plain
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
        self.objectives = enabled_objectives(config)
        unknown = sorted(set(config.objective_weights) - {o.weight_key for o in OBJECTIVES.values()})
        if unknown:
            raise ValueError(
                f"student.objective_weights: no registered objective has the weight key(s) {unknown}"
            )
        # In table order, each token right before the first head that reads it: a seed gives the same weights.
        for objective in self.objectives:
            if objective.reads == "camera_tokens" and not hasattr(self, "camera_token"):
                self.camera_token = nn.Embedding(2, width)  # row 0: the first frame, row 1: the others
            if objective.reads == "scale_token" and not hasattr(self, "scale_token"):
                self.scale_token = nn.Embedding(1, width)
            setattr(self, objective.module, objective.build_head(width, config))
        if config.fusion:
            vision = base.config.vision_config
            self.spatial_connector = SpatialConnector(
                config.fusion_feature_dim,
                width,
                vision.spatial_merge_size,
                vision.temporal_patch_size,
                getattr(text, "initializer_range", 0.02),
            )
        self.freeze_vision_tower()

    # ----------------------------------------------------------------- parameters

    def freeze_vision_tower(self) -> None:
        """Freeze the vision tower except its merger (GeoVR's `set_model`); the DeepStack mergers
        train only with `train_deepstack_mergers`, the rest of the tower only with `train_vision_tower`."""
        visual = self.base.model.visual
        visual.requires_grad_(self.config.train_vision_tower)
        visual.merger.requires_grad_(self.config.train_merger)
        visual.deepstack_merger_list.requires_grad_(self.config.train_deepstack_mergers)
        if not self.config.train_llm:
            self.base.model.language_model.requires_grad_(False)
            self.base.lm_head.requires_grad_(False)

    def geometry_modules(self) -> dict[str, nn.Module]:
        """The parts added to Qwen3-VL (dropped at export), by state-dict prefix."""
        names = [
            name
            for objective in self.objectives
            for name in (*_TOKENS.get(objective.reads, ()), objective.module)
        ]
        names.append("spatial_connector")
        return {name: getattr(self, name) for name in dict.fromkeys(names) if hasattr(self, name)}

    def param_groups(
        self, lr_llm: float = 2e-5, lr_heads: float = 1e-4, weight_decay: float = 0.0
    ) -> list[dict]:
        """Optimizer groups: {"name": "llm"} LLM + trained mergers (and the vision tower with
        `train_vision_tower`) at `lr_llm`, {"name": "heads"} heads and
        new tokens at `lr_heads` (DESIGN defaults); a fusion student puts `visual.merger` with its
        connector at `lr_heads` (Spatial-MLLM's mm_projector_lr). Frozen and tied (shared)
        parameters appear once."""
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
        projector = [visual.merger] if self.config.fusion else []
        heads = take([*self.geometry_modules().values(), *projector])
        llm = take(
            [
                self.base.model.language_model,
                self.base.lm_head,
                visual.merger,
                visual.deepstack_merger_list,
                visual,
            ]
        )
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
            camera=hasattr(self, "camera_token"),
            scale=hasattr(self, "scale_token"),
        )

    def _input_embeddings(self, batch: StudentBatch, layout: GeometryLayout) -> tuple[Tensor, list[Tensor]]:
        """(B, L', d) embeddings with visual features and geometric tokens; DeepStack features per level."""
        vision = self.base.model.get_video_features(batch.pixel_values_videos, batch.video_grid_thw)
        embeds = self.base.get_input_embeddings()(layout.input_ids)
        rows, cols, values = [], [], []
        for b, patches in enumerate(layout.patch_positions):
            rows.append(torch.full((patches.numel(),), b, device=embeds.device))
            cols.append(patches.reshape(-1))
            values.append(self._video_tokens(vision.pooler_output[b], batch, b).to(embeds.dtype))
            if hasattr(self, "camera_token"):
                frames = layout.camera_positions[b].numel()
                # embedding row 0 for the first frame, row 1 for the others
                which = (torch.arange(frames, device=embeds.device) > 0).long()
                rows.append(torch.full((frames,), b, device=embeds.device))
                cols.append(layout.camera_positions[b])
                values.append(self.camera_token(which).to(embeds.dtype))
            if hasattr(self, "scale_token"):
                rows.append(torch.full((1,), b, device=embeds.device))
                cols.append(layout.scale_positions[b].view(1))
                values.append(self.scale_token.weight.to(embeds.dtype))
        embeds = embeds.index_put((torch.cat(rows), torch.cat(cols)), torch.cat(values))
        deepstack = [torch.cat(level).to(embeds.dtype) for level in vision.deepstack_features]
        return embeds, deepstack

    def _video_tokens(self, merged: Tensor, batch: StudentBatch, b: int) -> Tensor:
        """Clip b's (N, d) merged visual tokens, plus the connector's fusion tokens for a fusion student."""
        if not hasattr(self, "spatial_connector"):
            return merged
        if batch.fusion is None:
            raise ValueError(
                "a fusion student needs batches with fusion features (make_sample's fusion_layer)"
            )
        grid = batch.video_grid_thw[b]
        frames = int(batch.frame_mask[b].sum())
        features = batch.fusion[b, :frames, : int(grid[1]), : int(grid[2])]
        return self.spatial_connector(merged, features, grid)

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

    def _run(self, batch: StudentBatch) -> tuple[Tensor, GeometryLayout, dict[str, Any]]:
        """Normed last hidden state, layout, and each enabled objective's prediction by its output
        name (zero-padded like the batch)."""
        layout = self._layout(batch)
        embeds, deepstack = self._input_embeddings(batch, layout)
        wanted = {self.num_layers}
        if any(objective.levels for objective in self.objectives):
            wanted |= set(self.layer_indices)
        last, states = self._decoder(embeds, layout, deepstack, wanted)
        frames = [int(t) for t in batch.video_grid_thw[:, 0]]
        if frames != [int(n) for n in batch.frame_mask.sum(1)]:
            raise ValueError(
                f"video frames {frames} differ from labelled frames {batch.frame_mask.sum(1).tolist()}"
            )
        merge = self.base.config.vision_config.spatial_merge_size
        hidden = HiddenStates(
            states, self.num_layers, self.layer_indices, layout, batch.video_grid_thw, merge
        )
        for o in self.objectives:  # in table order; `hidden.outputs` holds the ones before
            hidden.outputs[o.output] = o.predict(getattr(self, o.module), hidden, batch)
        return last, layout, hidden.outputs

    def forward(self, batch: StudentBatch) -> dict[str, Tensor]:
        """Losses {total, lm, <objective>...} for a `StudentBatch` (float32 scalars), one per objective of
        the table (`student.objectives`; zero for the ones this student does not have).
        total = lm_weight * lm + the sum of each objective's weight times its loss."""
        cfg = self.config
        last, layout, outputs = self._run(batch)
        losses = {"lm": causal_lm_loss(last, layout.labels, self.base.lm_head)}
        zero = losses["lm"].new_zeros(())
        total = cfg.lm_weight * losses["lm"]
        for objective in OBJECTIVES.values():
            losses[objective.name] = zero
            if objective.output in outputs:
                losses[objective.name] = objective.loss(outputs[objective.output], batch, cfg)
                total = total + objective.weight(cfg) * losses[objective.name]
        losses["total"] = total
        return losses

    @torch.no_grad()
    def predict(self, batch: StudentBatch) -> GeometryPredictions:
        """The heads' predictions (camera poses relative to frame 0, depth, metric scale, distilled
        features, ...), NaN in padded frames and outside a clip's depth map."""
        _, _, outputs = self._run(batch)
        frames = batch.frame_mask
        if "pose_enc" in outputs:
            outputs["pose_enc"] = outputs["pose_enc"].masked_fill(~frames[..., None], float("nan"))
        if "depth" in outputs:
            outputs["depth"] = outputs["depth"].masked_fill(~depth_inside(batch), float("nan"))
        if "points" in outputs:
            outputs["points"] = outputs["points"].masked_fill(~depth_inside(batch)[..., None], float("nan"))
        return GeometryPredictions(frames, outputs)

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
        checkpoint = resolve_checkpoint(Path(path), allow_plain=True)
        if not (checkpoint / CONFIG_FILE).is_file():
            return cls.from_base(checkpoint, config, dtype)
        student = cls.from_base(checkpoint, read_student_config(checkpoint), dtype)
        load_heads(checkpoint, student.geometry_modules())
        return student

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write the checkpoint format of `student.checkpoint` to `out_dir`."""
        return write_checkpoint(out_dir, self)
