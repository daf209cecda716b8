"""The exported fusion model (Spatial-MLLM's dual encoder): Qwen3-VL, its connector, and our VGGT
aggregator up to the fused stage, loaded with one call (`FusionModel.from_pretrained`).

Unlike GeoVR's export, this model carries a 3D encoder at inference: every video runs through VGGT's
aggregator (its frames at 7/8 of the student frame size, one pass per clip: `teachers.vggt_fusion`,
the very function precompute cached), then the connector adds the gathered tokens to the merged
video tokens before the prefill (the decode steps reuse the KV cache: the encoder runs once per
video, as in Spatial-MLLM).

Directory written by `export_fusion` (a plain Qwen3-VL directory plus):

    geovr_fusion.json                 {"format_version", "fused_layer", "feature_dim", "merge",
                                       "temporal_patch", "encoder_dtype", "teacher", parameter counts}
    spatial_connector.safetensors     the connector (`student.fusion.SpatialConnector`)
    spatial_encoder/config.json       the VGGT config cut to `fused_layer + 1` stages, no heads
    spatial_encoder/model.safetensors the aggregator's weights up to the fused stage only
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from geovr.student.checkpoint import HEADS_FILE, read_student_config, resolve_checkpoint
from geovr.student.export import write_plain_model
from geovr.student.fusion import SpatialConnector
from geovr.teachers.vggt import VGGT
from geovr.teachers.vggt_fusion import fusion_image_size, fusion_input, fusion_tokens

FUSION_CONFIG = "geovr_fusion.json"
CONNECTOR_WEIGHTS = "spatial_connector.safetensors"
ENCODER_DIR = "spatial_encoder"
FUSION_FORMAT_VERSION = 1


@dataclass(frozen=True)
class FusionSpec:
    """`geovr_fusion.json`: what the exported fusion model runs beside Qwen3-VL."""

    fused_layer: int
    feature_dim: int
    merge: int
    temporal_patch: int
    encoder_dtype: str
    teacher: str
    encoder_parameters: int
    connector_parameters: int
    format_version: int = FUSION_FORMAT_VERSION


def export_fusion(checkpoint_or_run: str | Path, teacher: str | Path, out_dir: str | Path) -> Path:
    """Export a fusion student (`student.fusion`) with its encoder: the plain Qwen3-VL files
    (`write_plain_model`), the connector, and `teacher`'s aggregator cut after the fused stage.

    `teacher`: the VGGT checkpoint that labelled the training store. ValueError for a student
    without a connector or a teacher whose width differs from the connector's input.
    """
    checkpoint = resolve_checkpoint(Path(checkpoint_or_run))
    config = read_student_config(checkpoint)
    if not config.fusion:
        raise ValueError(
            f"{checkpoint}: not a fusion student (student.fusion is false); export it without --teacher"
        )
    encoder = VGGT.from_pretrained(
        teacher, heads=(), ignore_prefixes=("camera_head.", "depth_head.", "point_head.", "track_head.")
    )
    layer = config.fusion_teacher_layer
    if 2 * encoder.embed_dim != config.fusion_feature_dim or layer >= encoder.config.depth:
        raise ValueError(
            f"teacher {teacher} (width {2 * encoder.embed_dim}, {encoder.config.depth} stages) is not the "
            f"one the student was trained with (width {config.fusion_feature_dim}, stage {layer})"
        )
    out = write_plain_model(checkpoint, out_dir)
    prefix = "spatial_connector."
    heads = load_file(str(checkpoint / HEADS_FILE))
    connector = {k[len(prefix) :]: v for k, v in heads.items() if k.startswith(prefix)}
    save_file(connector, str(out / CONNECTOR_WEIGHTS))
    encoder_parameters = _save_encoder(encoder, layer, out / ENCODER_DIR)
    base = json.loads((out / "config.json").read_text())
    vision = base.get("vision_config", {})
    spec = FusionSpec(
        fused_layer=layer,
        feature_dim=config.fusion_feature_dim,
        merge=int(vision.get("spatial_merge_size", 2)),
        temporal_patch=int(vision.get("temporal_patch_size", 2)),
        encoder_dtype=config.fusion_dtype,
        teacher=str(Path(teacher).resolve()),
        encoder_parameters=encoder_parameters,
        connector_parameters=sum(v.numel() for v in connector.values()),
    )
    (out / FUSION_CONFIG).write_text(json.dumps(asdict(spec), indent=2) + "\n")
    return out


def _save_encoder(encoder: VGGT, layer: int, out: Path) -> int:
    """The aggregator's stages 0..layer as a VGGT checkpoint directory; returns its parameter count."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = replace(
        encoder.config,
        depth=layer + 1,
        heads=(),
        dpt_layers=tuple(min(i, layer) for i in encoder.config.dpt_layers),  # no DPT head is built
    )
    state = {
        name: tensor.contiguous()
        for name, tensor in encoder.state_dict().items()
        if not name.startswith(("aggregator.frame_blocks.", "aggregator.global_blocks."))
        or int(name.split(".")[2]) <= layer
    }
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return sum(t.numel() for t in state.values())


class FusionModel(nn.Module):
    """Qwen3-VL (`base`) + `connector` + `encoder` (VGGT's aggregator up to the fused stage).

    `spatial_features(frames, student_hw)` runs the encoder on one clip's source frames;
    `generate(spatial, **inputs)` is Qwen3-VL's generate with the connector's tokens added to each
    video's merged tokens (`inputs` as for Qwen3-VL: input_ids, attention_mask, mm_token_type_ids,
    pixel_values_videos, video_grid_thw).
    """

    def __init__(self, base: nn.Module, connector: SpatialConnector, encoder: VGGT, spec: FusionSpec) -> None:
        super().__init__()
        self.base, self.connector, self.encoder, self.spec = base, connector, encoder, spec

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> FusionModel:
        """Load an `export_fusion` directory (local files only)."""
        from transformers import Qwen3VLForConditionalGeneration

        path = Path(path)
        if not (path / FUSION_CONFIG).is_file():
            raise FileNotFoundError(f"{path}: not a fusion model directory (no {FUSION_CONFIG})")
        spec = FusionSpec(**json.loads((path / FUSION_CONFIG).read_text()))
        base = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=dtype, local_files_only=True)
        text = base.config.text_config
        connector = SpatialConnector(spec.feature_dim, text.hidden_size, spec.merge, spec.temporal_patch)
        connector.load_state_dict(load_file(str(path / CONNECTOR_WEIGHTS)), strict=True)
        encoder = VGGT.from_pretrained(path / ENCODER_DIR, heads=(), device=device)
        return cls(base, connector.to(dtype), encoder, spec).to(device).eval()

    @torch.inference_mode()
    def spatial_features(self, frames: np.ndarray, student_hw: tuple[int, int]) -> Tensor:
        """(S, h, w, D) fused-stage tokens of one clip: `frames` (S, H, W, 3) uint8 source frames,
        resized to the fusion size of `student_hw` and run as one clip, as precompute does."""
        device = next(self.encoder.parameters()).device
        size_hw = fusion_image_size(student_hw, self.encoder.patch_size)
        images = fusion_input(frames, size_hw).to(device).float().div_(255.0)[None]
        bf16 = self.spec.encoder_dtype == "bfloat16"
        with torch.autocast(device.type, dtype=torch.bfloat16 if bf16 else torch.float32, enabled=bf16):
            tokens = fusion_tokens(self.encoder, images, [self.spec.fused_layer])
        return tokens[0, :, 0]

    def video_features(
        self, pixel_values_videos: Tensor, video_grid_thw: Tensor, spatial: list[Tensor]
    ) -> Any:
        """Qwen3-VL's video features with the connector's tokens added to each video's merged tokens."""
        model = self.base.model
        vision = model.get_video_features(
            pixel_values_videos.to(model.visual.dtype), video_grid_thw, return_dict=True
        )
        vision.pooler_output = tuple(
            self.connector(merged, features.to(merged.device), grid)
            for merged, features, grid in zip(vision.pooler_output, spatial, video_grid_thw, strict=True)
        )
        return vision

    @torch.inference_mode()
    def generate(self, spatial: list[Tensor], **inputs: Any) -> Tensor:
        """Generate with one `spatial_features` tensor per video of the batch."""
        pixels = inputs.pop("pixel_values_videos")
        vision = self.video_features(pixels, inputs["video_grid_thw"], spatial)
        return self.base.generate(**inputs, mm_encoder_outputs={"video": vision})
