"""One optimizer step's forward and backward passes over this rank's micro-batches.

    for each of the `accumulation` micro-batches of this rank (`data.TrainLoader`):
        for each chunk of the micro-batch (split to stay within the token budget):
            losses = model(chunk) under the autocast dtype   # {total, lm, <objective>...}
            (losses.total * chunk samples / samples per rank and step).backward()
            # gradients are reduced across ranks only on the last backward of the step
    every rank runs as many passes as the rank with the most chunks (`equal_pass_count`)

The trainer then clips the gradient norm, skips a non-finite update on every rank, and steps the
optimizer and the schedule (`trainer`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from geovr.student.training.damage import reduce_step_damage
from geovr.student.training.distributed import DistEnv, all_reduce, sync_gradients
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
    stats.label_fallback_samples = sum(int(chunk.label_fallback.sum()) for chunk in chunks)
    passes = equal_pass_count(len(chunks), env)
    for index in range(passes):
        real = index < len(chunks)
        chunk = chunks[min(index, len(chunks) - 1)].to(env.device, non_blocking=True)
        if before_forward is not None and real:
            before_forward(chunk)
        size = int(chunk.input_ids.shape[0])
        with sync_gradients(model, env, sync=index == passes - 1):
            with torch.autocast(
                env.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
            ):
                losses = model(chunk)
            weight = size / samples_per_rank_step if real else 0.0  # a padding pass adds no gradient
            (losses["total"] * weight).backward()
        if not real:
            continue
        stats.add_losses(losses, size)
        stats.samples += size
        seq_lens = chunk.attention_mask.sum(1).tolist()
        stats.tokens += int(sum(seq_lens))
        stats.flops += qwen3vl_step_flops(model_config, seq_lens, chunk.video_grid_thw.tolist())
    return stats


def equal_pass_count(chunks: int, env: DistEnv) -> int:
    """The forward/backward passes every rank runs this step: the most chunks any rank has.

    FSDP2 gathers the sharded parameters in every forward (a collective) and reduces gradients in the
    last backward, so the ranks must run the same number of passes; the token budget can split
    micro-batches into different numbers of chunks per rank (skipped and damaged samples make that
    likelier). A rank with fewer chunks repeats its last one with a zero loss weight.
    """
    count = torch.tensor([chunks], dtype=torch.int64, device=env.device)
    all_reduce(count, env, dist.ReduceOp.MAX)
    return int(count.item())
