"""The process group and device of a training process, and the model wrapping for it.

Rendezvous through the `torchrun` environment (env://); gloo on CPU, NCCL on GPU; without `torchrun`
it runs as one process without a process group; a group a launcher made (Ray Train) is used as it
is. Parallelism: DDP (default), or FSDP2 (`fully_shard` on every decoder and vision block, then the
root), chosen by `train.parallel`.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from geovr.student.training.config import TrainConfig


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job: rank, world size, local rank, device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> DistEnv:
    """Join the `torchrun` job described by RANK / WORLD_SIZE / LOCAL_RANK (env:// rendezvous).

    Without those variables (or with WORLD_SIZE=1) this is a single process without a group.
    NCCL on CUDA, gloo on CPU. A group that already exists (made by Ray Train) is used as it is.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but CUDA is not available")
    if dist.is_available() and dist.is_initialized():  # a launcher made the group (Ray Train)
        world_size, rank = dist.get_world_size(), dist.get_rank()
    else:
        world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method="env://",
            timeout=timedelta(seconds=timeout_s),
            device_id=dev if use_cuda else None,
        )
    return DistEnv(rank, world_size, local_rank, dev)


def all_reduce(tensor: torch.Tensor, env: DistEnv, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce (a no-op in a single process); returns the tensor."""
    if env.distributed:
        dist.all_reduce(tensor, op=op)
    return tensor


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def sync_gradients(model: nn.Module, env: DistEnv, sync: bool) -> contextlib.AbstractContextManager:
    """Context for one backward: reduce gradients across ranks only when `sync` (last of the step)."""
    if not env.distributed:
        return contextlib.nullcontext()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync else model.no_sync()


def wrap_model(model: nn.Module, cfg: TrainConfig, env: DistEnv) -> nn.Module:
    """DDP or FSDP2 around the student (unchanged in a single process).

    FSDP2 shards every block named in the Qwen model's `_no_split_modules` (decoder layers and
    vision blocks), then the root; the optimizer must be built after this on the sharded parameters.
    """
    if not env.distributed:
        return model
    if cfg.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        block_names: set[str] = set()
        for module in model.modules():
            block_names.update(getattr(module, "_no_split_modules", None) or ())
        blocks = [m for m in model.modules() if type(m).__name__ in block_names]
        if not blocks:
            raise ValueError("FSDP: found no decoder or vision blocks (`_no_split_modules`) to shard")
        for block in blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=cfg.find_unused_parameters
    )
