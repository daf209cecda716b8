"""One optimizer step's forward and backward passes over this rank's micro-batches.

    for each of the `accumulation` micro-batches of this rank (`data.TrainLoader`):
        for each chunk of the micro-batch (split to stay within the token budget):
            losses = model(chunk) under the autocast dtype   # {total, lm, <objective>...}
            (losses.total * chunk samples / samples per rank and step).backward()
            # gradients are reduced across ranks only on the last backward of the step

The trainer then clips the gradient norm, skips a non-finite update on every rank, and steps the
optimizer and the schedule (`trainer`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from geovr.student.training.damage import reduce_step_damage
from geovr.student.training.distributed import DistEnv, sync_gradients
from geovr.student.training.flops import qwen3vl_step_flops
from geovr.student.training.metrics import StepStats


def accumulate_gradients(
    model: nn.Module,
    model_config: Any,
    loader: Any,
    env: DistEnv,
    accumulation: int,
    samples_per_rank_step: int,
    autocast_dtype: torch.dtype | None,
    before_forward: Callable[[Any], None] | None = None,
) -> StepStats:
    """Forward and backward over one step's `accumulation` micro-batches of this rank.

    The micro-batches are taken from the loader first and their damaged samples reduced across
    ranks (`StepStats.damage`, see `reduce_step_damage`); when any rank is left without a sample, no
    rank runs a forward (the trainer skips the update). Each chunk's total loss is weighted by its
    share of the rank's samples in the step, so the accumulated gradient is the mean over the step's
    samples (DDP / FSDP then average over ranks). Gradients are reduced across ranks on the last
    backward only. `before_forward(chunk)` runs before each chunk's forward (the benchmark's online
    teacher). Returns this rank's sums.
    """
    stats = StepStats()
    wait_start = time.perf_counter()
    micro_batches = [loader.next()[1] for _ in range(accumulation)]
    stats.data_wait = time.perf_counter() - wait_start
    stats.skipped_samples = sum(len(batch.skipped) for batch in micro_batches)
    stats.damage = reduce_step_damage(micro_batches, env)
    if stats.damage.idle_ranks:
        return stats
    chunks = [chunk for batch in micro_batches for chunk in batch.chunks]
    for index, chunk in enumerate(chunks):
        last = index == len(chunks) - 1
        chunk = chunk.to(env.device, non_blocking=True)
        if before_forward is not None:
            before_forward(chunk)
        size = int(chunk.input_ids.shape[0])
        with sync_gradients(model, env, sync=last):
            with torch.autocast(
                env.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
            ):
                losses = model(chunk)
            (losses["total"] * (size / samples_per_rank_step)).backward()
        stats.add_losses(losses, size)
        stats.samples += size
        seq_lens = chunk.attention_mask.sum(1).tolist()
        stats.tokens += int(sum(seq_lens))
        stats.flops += qwen3vl_step_flops(model_config, seq_lens, chunk.video_grid_thw.tolist())
    return stats
