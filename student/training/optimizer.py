"""AdamW over the student's two parameter groups, the learning-rate schedule and gradient clipping.

Groups: "llm" (the LLM and the trained mergers, `train.lr_llm`) and "heads" (the heads and the new
token embeddings, `train.lr_heads`); the schedule is a linear warmup over `warmup_ratio` of the
steps, then a half cosine down to `min_lr_ratio` of the peak (GeoVR's recipe). The optimizer and the
scheduler save and load themselves (`state_dict()` / `load_state_dict()`), the optimizer through
`OptimizerState` so that FSDP2's sharded state is gathered to and restored from full tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from geovr.student.training.config import TrainConfig
from geovr.student.training.distributed import DistEnv, all_reduce


def cosine_with_warmup(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Multiplier of the peak learning rate after `step` scheduler steps: linear warmup from 0 over
    `warmup_steps`, then a half cosine down to `min_ratio` at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_optimizer(
    groups: dict[str, list[nn.Parameter]], cfg: TrainConfig, device: torch.device
) -> torch.optim.AdamW:
    """AdamW over the two parameter groups "llm" (LLM and merger) and "heads" (heads and new tokens)."""
    lrs = {"llm": cfg.lr_llm, "heads": cfg.lr_heads}
    if set(groups) != set(lrs):
        raise ValueError(f"the student's parameter groups are {sorted(groups)}, expected {sorted(lrs)}")
    param_groups = [
        {"params": [p for p in groups[name] if p.requires_grad], "lr": lrs[name], "name": name}
        for name in lrs
    ]
    return torch.optim.AdamW(
        param_groups,
        betas=cfg.adam_betas,
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
        foreach=device.type == "cuda",
    )


def clip_and_check(
    parameters: Sequence[nn.Parameter], max_norm: float, loss: float, env: DistEnv
) -> tuple[float, bool]:
    """Global gradient norm (clipped to `max_norm` when > 0) and whether the step is finite on every rank.

    The norm covers all ranks (DDP gradients are already averaged; FSDP2 shards are combined). A
    non-finite norm or loss on any rank makes every rank skip the update.
    """
    grads = [p for p in parameters if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(grads, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in grads])
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    bad = torch.tensor(
        0.0 if (torch.isfinite(norm).item() and math.isfinite(loss)) else 1.0, device=env.device
    )
    all_reduce(bad, env, dist.ReduceOp.MAX)
    return float(norm), bad.item() == 0.0


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The warmup + cosine schedule of both groups over `total_steps` optimizer steps."""
    schedule = cosine_with_warmup(total_steps, round(cfg.warmup_ratio * total_steps), cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [schedule] * len(optimizer.param_groups))


class OptimizerState:
    """The optimizer's state as a full (unsharded) state dict on the CPU: `state_dict()` gathers it
    (collective under FSDP2: every rank calls it, each receives the full tensors), and
    `load_state_dict()` puts a full state dict back into the (possibly sharded) optimizer."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.model, self.optimizer, options=options)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(self.model, self.optimizer, state, options=options)
