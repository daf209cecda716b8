"""Damaged cache data never hangs or silently skews a run.

A sample whose cached clip is missing or damaged reaches the trainer as a `DamagedSample` (the
one-line report naming store, shard, clip and field). Each step takes its micro-batches first and
reduces the damaged counts over all ranks before any forward (`reduce_step_damage`); under
`data.on_damaged_clip=error`, or once the damaged samples exceed `data.max_damaged_ratio`, every
rank stops at the same step with the same one-line error (`damage_stop_reason`). A rank left
without any sample in a step makes every rank skip that step's update (a rank that skipped its
backward alone would hang the others in the gradient all-reduce).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from geovr.student.config import DataConfig
from geovr.student.training.distributed import DistEnv, all_reduce


@dataclass
class StepDamage:
    """Damaged samples of one step over all ranks, identical on every rank (`reduce_step_damage`).

    Attributes:
        count: damaged samples drawn by all ranks in the step.
        first: the one-line report of the first damaged sample of the lowest rank that met one.
        idle_ranks: ranks left without a sample to train on (every sample skipped or damaged).
    """

    count: int = 0
    first: str = ""
    idle_ranks: int = 0


REPORT_BYTES = 2048  # a damage report broadcast between ranks (one line; longer ones are cut)


def reduce_step_damage(micro_batches: Sequence[Any], env: DistEnv) -> StepDamage:
    """Count the step's damaged samples and idle ranks over all ranks: one all-reduce, plus one
    broadcast of the first report when any rank met damage (every rank takes both, so none waits)."""
    counts = torch.zeros(env.world_size + 1, dtype=torch.float64, device=env.device)
    counts[env.rank] = sum(len(batch.damaged) for batch in micro_batches)
    counts[-1] = 0.0 if any(batch.chunks for batch in micro_batches) else 1.0
    all_reduce(counts, env)
    per_rank = counts[:-1].tolist()
    damage = StepDamage(count=int(sum(per_rank)), idle_ranks=int(counts[-1].item()))
    if damage.count:
        source = next(rank for rank, n in enumerate(per_rank) if n)
        report = torch.zeros(REPORT_BYTES, dtype=torch.uint8, device=env.device)
        if env.rank == source:
            mine = next(d.reason for batch in micro_batches for d in batch.damaged)
            data = mine.encode()[:REPORT_BYTES]
            report[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if env.distributed:
            dist.broadcast(report, src=source)
        damage.first = bytes(report.cpu().tolist()).rstrip(b"\0").decode(errors="replace")
    return damage


def damage_stop_reason(
    damage: StepDamage, damaged: int, drawn: int, data_cfg: DataConfig, epoch_samples: int, step: int
) -> str | None:
    """The one-line error that stops every rank at `step` under the damage policy, or None.

    `damaged`, `drawn`: damaged and all samples drawn by the run up to this step, over all ranks;
    `epoch_samples`: samples drawn per epoch over all ranks.
    """
    if not damage.count:
        return None
    if data_cfg.on_damaged_clip == "error":
        return f"{damage.first} (at step {step}; data.on_damaged_clip=error)"
    if damaged > data_cfg.max_damaged_ratio * max(drawn, epoch_samples):
        return (
            f"{damaged} of {drawn} samples drawn are damaged: more than data.max_damaged_ratio="
            f"{data_cfg.max_damaged_ratio} of {max(drawn, epoch_samples)} (at least one epoch) at step "
            f"{step}; last: {damage.first}"
        )
    return None
