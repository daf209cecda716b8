"""Model FLOPs of a training step of the Qwen3-VL student and the device's peak, for the MFU estimate."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from geovr.student.training.config import TrainConfig


def peak_flops_per_device(cfg: TrainConfig, device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of one device, from the config or the GPU's name; None if unknown."""
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    known = (
        ("H100 PCIe", 756.0),
        ("H100 NVL", 835.0),
        ("H100", 989.0),
        ("H200", 989.0),
        ("H800", 989.0),
        ("A100", 312.0),
    )
    for key, tflops in known:
        if key in name:
            return tflops * 1e12
    return None


def qwen3vl_step_flops(
    model_config: Any, seq_lens: Sequence[int], video_grids: Sequence[Sequence[int]]
) -> float:
    """Model FLOPs of one training forward + backward for a batch (no recomputation counted).

    LLM (trained): 6 x (matmul parameters per token) x tokens + causal attention 6 x L x d_attn x
    seq^2 (the score and value products, half the square); the LM head is left out (logits are
    computed only on the few answer tokens). Vision tower (frozen): forward only, 2 x block
    parameters per patch + full attention within each frame; the merger is trained (6 x).
    Heads are not counted. `model_config` is a `Qwen3VLConfig`.
    """
    text = model_config.text_config
    d, layers = text.hidden_size, text.num_hidden_layers
    head_dim = getattr(text, "head_dim", None) or d // text.num_attention_heads
    q_width, kv_width = text.num_attention_heads * head_dim, text.num_key_value_heads * head_dim
    layer_params = d * q_width + 2 * d * kv_width + q_width * d + 3 * d * text.intermediate_size
    flops = 0.0
    for n in seq_lens:
        flops += 6 * layers * layer_params * n + 6 * layers * q_width * n * n
    vision = model_config.vision_config
    dv, ffv = vision.hidden_size, vision.intermediate_size
    block_params = 4 * dv * dv + 2 * dv * ffv
    patch_params = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2 * dv
    merge = vision.spatial_merge_size**2
    merger_params = (dv * merge) ** 2 + dv * merge * vision.out_hidden_size
    for t, h, w in video_grids:
        patches = t * h * w
        flops += 2 * (vision.depth * block_params + patch_params) * patches
        flops += 4 * vision.depth * dv * (h * w) * patches
        flops += 6 * merger_params * patches / merge
    return flops
