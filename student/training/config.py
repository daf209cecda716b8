"""Section `train` of the presets (`TrainConfig`) and what a training run reads (`TrainInputs`).
Plain dataclasses, importable without torch (the CLI reads their defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from geovr.teacher_cache.config import require


@dataclass
class TrainConfig:
    """Section `train` of the presets (GeoVR recipe defaults, DESIGN.md "Stage 2").

    Attributes:
        seed: seeds model initialisation of the new parts (same on every rank) and data order.
        steps: optimizer steps; 0 = `epochs` passes over the joined QA samples.
        epochs: passes over the data when `steps` is 0.
        global_batch: samples per optimizer step over all ranks (micro_batch x world x accumulation).
        lr_llm: learning rate of the LLM and the merger.
        lr_heads: learning rate of the heads and the new token embeddings.
        weight_decay: AdamW weight decay (both groups).
        adam_betas, adam_eps: AdamW moments.
        warmup_ratio: fraction of the steps with a linear warmup from 0.
        min_lr_ratio: the cosine decays to this fraction of the peak learning rate.
        grad_clip: gradient-norm clip (0 disables clipping, not the non-finite guard).
        dtype: autocast dtype of the forward pass; parameters and optimizer state stay float32.
        gradient_checkpointing: recompute decoder-layer activations in the backward pass.
        parallel: "ddp" (replicated) or "fsdp" (FSDP2 `fully_shard`, sharded parameters and state).
        device: "auto" (CUDA when available), "cpu" or "cuda".
        checkpoint_every: steps between checkpoints (the last step always writes one).
        keep_last: complete checkpoints kept.
        log_every: steps between console lines (metrics.jsonl gets every step).
        tensorboard: also write TensorBoard event files.
        peak_tflops: per-device peak dense TFLOP/s for the MFU estimate; 0 = known GPU's bf16 peak
            (H100 SXM/H200 989, H100 PCIe 756, A100 312), none on CPU.
        find_unused_parameters: DDP option, for models with parameters a step may not reach.
    """

    seed: int = 0
    steps: int = 0
    epochs: float = 1.0
    global_batch: int = 32
    lr_llm: float = 2e-5
    lr_heads: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    gradient_checkpointing: bool = True
    parallel: Literal["ddp", "fsdp"] = "ddp"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint_every: int = 500
    keep_last: int = 2
    log_every: int = 10
    tensorboard: bool = True
    peak_tflops: float = 0.0
    find_unused_parameters: bool = False

    def validate(self) -> None:
        require(self.steps >= 0, f"train.steps must be >= 0, got {self.steps}")
        require(self.steps > 0 or self.epochs > 0, "train.epochs must be > 0 when train.steps is 0")
        require(self.global_batch >= 1, f"train.global_batch must be >= 1, got {self.global_batch}")
        require(self.lr_llm >= 0 and self.lr_heads >= 0, "train learning rates must be >= 0")
        require(0 <= self.warmup_ratio < 1, f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        require(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        require(self.grad_clip >= 0, f"train.grad_clip must be >= 0, got {self.grad_clip}")
        require(self.checkpoint_every >= 1, "train.checkpoint_every must be >= 1")
        require(self.keep_last >= 1, "train.keep_last must be >= 1")
        require(self.log_every >= 1, "train.log_every must be >= 1")
        require(self.peak_tflops >= 0, "train.peak_tflops must be >= 0")


@dataclass
class TrainInputs:
    """What a training run reads: the store, the QA file, the model to start from, the run dir."""

    store: Path
    qa: Path
    model: Path
    run_dir: Path
    resume: bool = False
