"""FLOPs of one training sample of the fusion recipe (Spatial-MLLM's dual encoder on Qwen3-VL-2B),
from the cache against online as Spatial-MLLM runs it (VGGT inside every step), and the encoder's
cost at inference. Analytic (matmul FLOPs, `bench/flops.py`'s counting rules): no device needed.

Sample: a 640x480 video, S frames (16: Spatial-MLLM's training frames; 32: GeoVR's), student frames
640x480 (a 30x40 grid of 16-pixel patches, 300 merged tokens per temporal token), text of 100 + 8 per
temporal token, both frame layouts (consecutive pairs: Spatial-MLLM's; repeat: each frame twice).
- student: `student.training.flops.qwen3vl_step_flops` (trained LLM and merger 6x, frozen ViT 2x);
- connector: `student.fusion.connector_flops` (trained: 6x its parameters per merged token);
- VGGT online: its aggregator at 420x560 (7/8 of the student frame: the grid the cache stores),
  frozen forward, all stages up to the fused one (the last): `bench/flops.py`'s `vggt_flops`.
Both columns use the same student, so they differ by the VGGT pass alone.

    python bench/fusion_flops.py [--out bench/results/fusion_flops.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from typing import Any

import torch

from geovr.student.fusion import connector_flops
from geovr.student.tiny import build_tiny_tokenizer
from geovr.student.training.flops import qwen3vl_step_flops
from geovr.teachers.vggt import VGGT, VGGTConfig

BENCH = Path(__file__).resolve().parent


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sample_flops(frames: int, pairing: str, student: Any, vggt: VGGTConfig) -> dict[str, float]:
    """One 640x480 sample of `frames` frames: FLOPs from the cache and online, by part."""
    grid_h, grid_w = 30, 40  # 480x640 student frames, 16-pixel patches
    grid_t = frames if pairing == "repeat" else -(-frames // 2)
    merged = grid_t * grid_h * grid_w // 4
    text = 100 + 8 * grid_t
    student_flops = qwen3vl_step_flops(student, [merged + text], [(grid_t, grid_h, grid_w)])
    merged_dim = 2 * 2 * 2 * (2 * vggt.embed_dim)
    connector = connector_flops(merged_dim, student.text_config.hidden_size, merged)
    flops = _load("flops")
    encoder = flops.vggt_flops(vggt, frames, grid_h * 14, grid_w * 14, heads=())["aggregator"]
    cached = student_flops + connector
    return {
        "sequence": merged + text,
        "student": student_flops,
        "connector": connector,
        "from_cache": cached,
        "vggt_online": encoder,
        "online": cached + encoder,
        "online_over_cache": (cached + encoder) / cached,
    }


def inference_cost(student: Any, vggt: VGGTConfig, frames: int) -> dict[str, float]:
    """Per frame at inference (consecutive pairs): encoder and connector FLOPs and parameters."""
    flops = _load("flops")
    encoder = flops.vggt_flops(vggt, frames, 420, 560, heads=())["aggregator"] / frames
    merged_dim = 2 * 2 * 2 * (2 * vggt.embed_dim)
    width = student.text_config.hidden_size
    per_frame_tokens = 300 / 2  # 300 merged tokens per temporal token of two frames
    with torch.device("meta"):
        model = VGGT(vggt, heads=())
    return {
        "encoder_parameters": float(sum(p.numel() for p in model.aggregator.parameters())),
        "connector_parameters": float(merged_dim * merged_dim + merged_dim * width + 2 * merged_dim + width),
        "encoder_flops_per_frame": encoder,
        "connector_flops_per_frame": connector_flops(merged_dim, width, 1, trained=False) * per_frame_tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "fusion_flops.json")
    args = parser.parse_args()
    student = _load("train_throughput").qwen3vl_2b_config(build_tiny_tokenizer())
    vggt = VGGTConfig.vggt_1b()
    result = {
        "what": "analytic matmul FLOPs of one training sample (forward + backward), 640x480 video, "
        "Qwen3-VL-2B + Spatial-MLLM connector, VGGT-1B aggregator at 420x560",
        "samples": {
            f"{frames}_frames_{pairing}": sample_flops(frames, pairing, student, vggt)
            for frames in (16, 32)
            for pairing in ("consecutive", "repeat")
        },
        "inference": {f"{frames}_frame_clip": inference_cost(student, vggt, frames) for frames in (16, 32)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, sample in result["samples"].items():
        print(
            f"{name:<26} seq {sample['sequence']:>6}  from cache {sample['from_cache'] / 1e12:7.1f} TF  "
            f"online {sample['online'] / 1e12:7.1f} TF  ({sample['online_over_cache']:.2f}x)"
        )
    for name, cost in result["inference"].items():
        print(
            f"inference, {name}: encoder {cost['encoder_parameters'] / 1e9:.2f}B params, "
            f"{cost['encoder_flops_per_frame'] / 1e12:.2f} TF/frame; connector "
            f"{cost['connector_parameters'] / 1e6:.0f}M params, {cost['connector_flops_per_frame'] / 1e12:.3f} TF/frame"
        )


if __name__ == "__main__":
    main()
