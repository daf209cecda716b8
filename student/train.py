"""The trainer: GeoVR student on cached teacher labels, single process or under `torchrun`.

    torchrun --nproc-per-node 8 --no-python geovr-pipeline train --preset qwen3vl-2b-geovr \\
        --store STORE --qa vsi590k.jsonl --model Qwen3-VL-2B-Instruct --out RUN [--resume]

One optimizer step (global batch = micro_batch x world_size x accumulation samples):

    for each of the `accumulation` micro-batches of this rank (`data.TrainLoader`):
        for each chunk of the micro-batch (split to stay within the token budget):
            losses = model(chunk) under bf16 autocast       # {lm, camera, depth, scale, distill, total}
            (losses.total * chunk samples / samples per rank and step).backward()
            # gradients are reduced across ranks only on the last backward of the step
    clip the gradient norm to `grad_clip`; if it (or the loss) is not finite on any rank, skip the
    update and log it; AdamW step; cosine schedule with linear warmup.

Damaged cache data never hangs or silently skews a run: a sample whose cached clip is missing or
damaged reaches the trainer as a `DamagedSample` (the one-line report naming store, shard, clip and
field). Each step takes its micro-batches first and all-reduces the damaged counts before any
forward; under `data.on_damaged_clip=error`, or once the damaged samples exceed
`data.max_damaged_ratio`, every rank stops at the same step with the same one-line error. A rank
left without any sample in a step makes every rank skip that step's update (a rank that skipped
its backward alone would hang the others in the gradient all-reduce).

Parallelism: DDP (default), or FSDP2 (`fully_shard` on every decoder and vision block, then the
root), chosen by `train.parallel`. Rendezvous through the `torchrun` environment (env://); gloo on
CPU, NCCL on GPU; without `torchrun` it runs as one process without a process group.

Checkpoints `RUN/checkpoints/step_NNNNNNNN/`, written under `RUN/checkpoints.tmp/` then renamed, last
`keep_last` kept. A checkpoint that does not fit on the disk is removed at once and reported in one
line (every rank stops, none waits in a barrier); a partial one left by a killed run is removed at
the next start:

    config.json, model*.safetensors, student_config.json, geovr_heads.safetensors, processor files
                               the student checkpoint format (`GeoVRStudent.save_pretrained`), so
                               `GeoVRStudent.from_pretrained(RUN)` and `geovr-pipeline export RUN` read it
    optimizer.safetensors      AdamW state, "<param name>::<exp_avg|exp_avg_sq|step>"
    optimizer.json             the param groups (hyper-parameters, parameter names) and non-tensor state
    trainer.json               step, scheduler state, world size, counters, configs, store digest
    rank_R.json / rank_R.safetensors   per rank: data-loader position and RNG states (python, numpy, torch, cuda)

`--resume` loads the newest complete checkpoint and continues exactly: the same samples in the same
order, the same random state, the same learning rate; `metrics.jsonl` is cut back to that step.

Logging (rank 0): `RUN/metrics.jsonl` (one JSON object per step: step, loss, every loss term, the
learning rate of each group, grad_norm, skipped, samples/s, tokens/s, MFU, data-wait fraction,
skipped and damaged samples),
TensorBoard under `RUN/tensorboard/`, and console progress (rich).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from geovr.teacher_cache.config import require, to_dict

CHECKPOINT_DIR_PATTERN = re.compile(r"^step_(\d{8})$")


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


# ----------------------------------------------------------------------------------------------
# Processes and devices


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


# ----------------------------------------------------------------------------------------------
# Optimizer and schedule


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


# ----------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, path), oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = CHECKPOINT_DIR_PATTERN.match(path.name)
        if match and (path / "trainer.json").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def _optimizer_to_files(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A full optimizer state dict {"state": {fqn: {name: value}}, "param_groups": [...]} as
    safetensors tensors keyed "fqn::name" and a JSON part (non-tensor entries, param groups)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for fqn, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{fqn}::{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{fqn}::{name}"] = value
    groups = [
        {k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state["param_groups"]
    ]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *info["scalars"].items()]:
        fqn, name = key.rsplit("::", 1)
        state.setdefault(fqn, {})[name] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in info["param_groups"]]
    return {"state": state, "param_groups": groups}


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied embeddings): copy the repeats."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for key, tensor in state.items():
        tensor = tensor.detach().to("cpu").contiguous()
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        out[key] = tensor.clone() if ident in seen else tensor
        seen.add(ident)
    return out


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's random states: tensors (torch, cuda, numpy key) and JSON (python, numpy scalars)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    py_version, py_state, py_gauss = random.getstate()
    info = {
        "numpy": {
            "kind": kind,
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }
    return tensors, info


def set_rng_state(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    n = info["numpy"]
    keys = tensors["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = info["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def save_checkpoint(
    run_dir: Path,
    step: int,
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    rank_state: dict[str, Any],
    env: DistEnv,
    keep_last: int,
) -> Path:
    """Write checkpoint `step` atomically (every rank calls this; rank 0 writes the shared files).

    Everything goes to `RUN/checkpoints.tmp/step_N/`; once every rank has written its part rank 0
    renames it into `RUN/checkpoints/` (so readers listing checkpoints never see a partial one) and
    deletes the oldest beyond `keep_last`. A crash at any point leaves the previous checkpoint intact.
    A failed write (disk full: `OSError(ENOSPC)` with a one-line message) stops every rank, and the
    partial checkpoint is deleted (`_check_written`).
    """
    name = f"step_{step:08d}"
    final = run_dir / "checkpoints" / name
    tmp = run_dir / "checkpoints.tmp" / name
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    # Collective under FSDP2: every rank takes part, rank 0 receives the full tensors.
    model_state = get_model_state_dict(student, options=options)
    optim_state = get_optimizer_state_dict(student, optimizer, options=options)

    def write_shared(model_state: dict[str, torch.Tensor], optim_state: dict[str, Any]) -> None:
        if tmp.parent.exists():  # leftovers of a run killed while writing a checkpoint
            shutil.rmtree(tmp.parent)
        tmp.mkdir(parents=True)
        _write_checkpoint_model(student, model_state, tmp)
        tensors, info = _optimizer_to_files(optim_state)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(info))

    def write_rank() -> None:
        rng_tensors, rng_info = rng_state()
        save_file(rng_tensors, str(tmp / f"rank_{env.rank}.safetensors"))
        (tmp / f"rank_{env.rank}.json").write_text(json.dumps({**rank_state, "rng": rng_info}))

    def commit() -> None:
        (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=1))
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        tmp.parent.rmdir()
        for _, old in checkpoint_dirs(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    # Each check replaces a barrier: every rank learns whether any rank failed.
    shared = partial(write_shared, model_state, optim_state)
    _check_written(_attempt(shared) if env.is_main else None, env, run_dir, name)
    del model_state, optim_state, shared
    _check_written(_attempt(write_rank), env, run_dir, name)
    _check_written(_attempt(commit) if env.is_main else None, env, run_dir, name)
    return final


def _attempt(write: Callable[[], None]) -> Exception | None:
    try:
        write()
    except Exception as err:  # safetensors reports I/O errors with its own exception type
        return err
    return None


def _is_disk_full(err: BaseException) -> bool:
    """ENOSPC or EDQUOT, as Python's OSError or as safetensors' Rust I/O error (in its message)."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    return any(f"(os error {code})" in str(err) for code in (errno.ENOSPC, errno.EDQUOT))


def _check_written(failure: Exception | None, env: DistEnv, run_dir: Path, name: str) -> None:
    """Collective: if writing checkpoint `name` failed on any rank, rank 0 deletes the partial
    checkpoint and every rank raises; a full disk as `OSError(ENOSPC)` with a one-line message."""
    code = 0 if failure is None else 1 if _is_disk_full(failure) else 2
    code = int(all_reduce(torch.tensor([code], device=env.device), env, op=dist.ReduceOp.MAX).item())
    if code == 0:
        return
    if env.is_main:
        shutil.rmtree(run_dir / "checkpoints.tmp", ignore_errors=True)
    if code == 1:
        complete = checkpoint_dirs(run_dir)
        kept = (
            f"the last complete one, {complete[-1][1].name}, is kept"
            if complete
            else "there is no complete one"
        )
        free = shutil.disk_usage(run_dir).free
        raise OSError(
            errno.ENOSPC,
            f"disk full: checkpoint {name} did not fit in {run_dir} ({free / 2**20:.1f} MiB free after removing "
            f"the partial checkpoint; {kept}); free space, then continue with --resume",
        ) from None
    if failure is not None:
        raise failure
    raise RuntimeError(f"checkpoint {name} was not written: it failed on another rank")


def load_training_state(
    path: Path, student: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Optimizer state and this rank's RNG from checkpoint `path` (the model itself is built from
    the checkpoint directory); returns (trainer state, this rank's state)."""
    trainer_state = json.loads((path / "trainer.json").read_text())
    if trainer_state["world_size"] != env.world_size:
        raise ValueError(
            f"checkpoint {path} was written by {trainer_state['world_size']} processes, this job has "
            f"{env.world_size}; resume with the same number of processes (the data position is per rank)"
        )
    optim_state = _optimizer_from_files(
        load_file(str(path / "optimizer.safetensors")), json.loads((path / "optimizer.json").read_text())
    )
    set_optimizer_state_dict(student, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))
    rank_state = json.loads((path / f"rank_{env.rank}.json").read_text())
    set_rng_state(load_file(str(path / f"rank_{env.rank}.safetensors")), rank_state.pop("rng"))
    return trainer_state, rank_state


# ----------------------------------------------------------------------------------------------
# Throughput: FLOPs of the student and MFU


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


# ----------------------------------------------------------------------------------------------
# Metrics


class MetricsLogger:
    """Rank 0: one JSON object per step to RUN/metrics.jsonl, TensorBoard scalars, console lines
    (and a progress bar on a terminal)."""

    def __init__(self, run_dir: Path, env: DistEnv, total_steps: int, cfg: TrainConfig, resume_step: int):
        self.enabled = env.is_main
        self.total_steps = total_steps
        self.log_every = cfg.log_every
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        self.console = None
        self.progress = None
        if not self.enabled:
            return
        from rich.console import Console

        self.console = Console(stderr=True)
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"), console=self.console,
            )  # fmt: skip
            self.task = self.progress.add_task("train", total=total_steps, completed=resume_step, status="")
            self.progress.start()
        self._truncate(resume_step)
        self.file = self.path.open("a")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)

    def _truncate(self, step: int) -> None:
        """Drop lines of steps after `step` (written by a run that died after its last checkpoint)."""
        if not self.path.exists():
            return
        kept = [
            line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step
        ]
        self.path.write_text("".join(f"{line}\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record["step"]
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.tb.add_scalar(key.replace(".", "/"), value, step)
        if self.progress is not None:
            status = f"loss {record['loss']:.4f}  {record['samples_per_s']:.2f} samples/s"
            self.progress.update(self.task, completed=step, status=status)
        if step % self.log_every == 0 or step == self.total_steps:
            mfu = record.get("mfu")
            self.console.print(
                f"step {step}/{self.total_steps}  loss {record['loss']:.4f}  "
                + "  ".join(
                    f"{k[5:]} {v:.4f}" for k, v in record.items() if k.startswith("loss.") and v is not None
                )
                + f"  lr {record['lr.llm']:.2e}/{record['lr.heads']:.2e}  {record['samples_per_s']:.2f} samples/s"
                + f"  {record['tokens_per_s']:.0f} tok/s  data-wait {100 * record['data_wait']:.1f}%"
                + (f"  MFU {100 * mfu:.1f}%" if mfu is not None else "")
                + ("  [yellow]update skipped[/]" if record["skipped"] else ""),
                highlight=False,
            )

    def message(self, text: str) -> None:
        """One plain line (no markup: reports quote file names and errors; not wrapped: one line each)."""
        if self.enabled:
            self.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.progress is not None:
                self.progress.stop()
            if self.tb is not None:
                self.tb.close()


# ----------------------------------------------------------------------------------------------
# The training loop


def _sync_gradients(model: nn.Module, env: DistEnv, sync: bool) -> contextlib.AbstractContextManager:
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
    damage: StepDamage, damaged: int, drawn: int, data_cfg: Any, epoch_samples: int, step: int
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


@dataclass
class StepStats:
    """Sums over one optimizer step of one rank (reduced across ranks before logging); `damage` is
    already reduced."""

    loss_sums: dict[str, float] = field(default_factory=dict)
    samples: int = 0
    tokens: int = 0
    flops: float = 0.0
    data_wait: float = 0.0
    skipped_samples: int = 0
    damage: StepDamage = field(default_factory=StepDamage)

    def add_losses(self, losses: dict[str, torch.Tensor], weight: int) -> None:
        for name, value in losses.items():
            if value is not None:
                self.loss_sums[name] = self.loss_sums.get(name, 0.0) + float(value.detach()) * weight


def _reduce_stats(stats: StepStats, names: list[str], env: DistEnv) -> tuple[dict[str, float], torch.Tensor]:
    """Global sample-weighted mean of each loss term, and the summed [samples, tokens, flops, wait,
    skipped samples] over ranks."""
    values = torch.tensor(
        [stats.loss_sums.get(n, 0.0) for n in names]
        + [stats.samples, stats.tokens, stats.flops, stats.data_wait, stats.skipped_samples],
        dtype=torch.float64,
        device=env.device,  # NCCL reduces device tensors only
    )
    all_reduce(values, env)
    values = values.cpu()
    totals = values[len(names) :]
    means = {n: float(values[i] / max(1.0, float(totals[0]))) for i, n in enumerate(names)}
    return means, totals


@dataclass
class TrainInputs:
    """What a training run reads: the store, the QA file, the model to start from, the run dir."""

    store: Path
    qa: Path
    model: Path
    run_dir: Path
    resume: bool = False


def _write_checkpoint_model(student: nn.Module, state: dict[str, torch.Tensor], out: Path) -> None:
    """The student's checkpoint format (`GeoVRStudent.save_pretrained`) from a full state dict, so
    that FSDP-sharded models are written the same way as replicated ones (rank 0 only)."""
    from geovr.student.model import CHECKPOINT_FORMAT_VERSION, CONFIG_FILE, HEADS_FILE, copy_processor_files

    base = {k[len("base.") :]: v for k, v in state.items() if k.startswith("base.")}
    heads = {k: v for k, v in state.items() if not k.startswith("base.")}
    student.base.save_pretrained(out, state_dict=base, safe_serialization=True)
    save_file(
        _untie(heads), str(out / HEADS_FILE), metadata={"format_version": str(CHECKPOINT_FORMAT_VERSION)}
    )
    record = {"format_version": CHECKPOINT_FORMAT_VERSION, "student": to_dict(student.config)}
    (out / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
    if student.source_dir is not None:
        copy_processor_files(student.source_dir, out)


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
        with _sync_gradients(model, env, sync=last):
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


def train(
    inputs: TrainInputs,
    cfg: TrainConfig,
    data_cfg: Any,
    student_cfg: Any,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train the student; returns the run summary (also in RUN/summary.json).

    Joins the process group when launched by `torchrun` (or uses the one Ray Train made). Every
    rank calls this with the same arguments. `on_step` (optional) receives each step's metrics
    record on every rank (Ray Train reports them).
    """
    group_given = dist.is_available() and dist.is_initialized()
    env = init_distributed(cfg.device)
    try:
        return _train(env, inputs, cfg, data_cfg, student_cfg, on_step)
    finally:
        if env.distributed and not group_given and dist.is_initialized():
            dist.destroy_process_group()


def _train(
    env: DistEnv,
    inputs: TrainInputs,
    cfg: TrainConfig,
    data_cfg: Any,
    student_cfg: Any,
    on_step: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    from geovr.student.data import (
        DataError,
        LoaderState,
        StudentSampleBuilder,
        TrainLoader,
        check_frame_budget,
        join_qa,
        student_collator,
    )
    from geovr.student.model import GeoVRStudent
    from geovr.teacher_cache.store import open_store

    run_dir = inputs.run_dir
    leftover = run_dir / "checkpoints.tmp"
    removed = sorted(p.name for p in leftover.iterdir()) if env.is_main and leftover.is_dir() else []
    if env.is_main and leftover.exists():  # a checkpoint a killed or out-of-disk run did not finish
        shutil.rmtree(leftover)
    existing = checkpoint_dirs(run_dir)
    if existing and not inputs.resume:
        raise ValueError(
            f"{run_dir} already holds checkpoints (last: step {existing[-1][0]}); pass --resume to continue "
            "that run or choose a new --out"
        )
    resume_from = existing[-1][1] if inputs.resume and existing else None

    # Data: join the QA rows with the cache (every rank does the same, deterministic work).
    store = open_store(inputs.store)
    samples, report = join_qa(inputs.qa, store, data_cfg)
    per_rank_step = cfg.global_batch // env.world_size
    if cfg.global_batch % (data_cfg.micro_batch * env.world_size):
        raise ValueError(
            f"train.global_batch={cfg.global_batch} is not a multiple of data.micro_batch x processes = "
            f"{data_cfg.micro_batch} x {env.world_size}"
        )
    accumulation = per_rank_step // data_cfg.micro_batch

    # Model: the same seed on every rank, so that new parts start identical (FSDP does not broadcast).
    seed_everything(cfg.seed)
    student_cfg = student_cfg.matched_to(store.fingerprint)
    source = resume_from if resume_from is not None else inputs.model
    student = GeoVRStudent.from_pretrained(source, student_cfg, dtype=torch.float32)
    if resume_from is not None:
        student.source_dir = inputs.model
    student.to(env.device)
    if cfg.gradient_checkpointing:
        student.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    model = wrap_model(student, cfg, env)
    groups = {g["name"]: g["params"] for g in student.param_groups()}
    optimizer = build_optimizer(groups, cfg, env.device)
    param_list = [p for g in optimizer.param_groups for p in g["params"]]

    check_frame_budget(store.fingerprint, student_cfg.video_max_pixels, student_cfg.video_min_pixels)
    builder = StudentSampleBuilder(
        inputs.model,
        data_cfg.max_seq_len,
        data_cfg.on_bad_row,
        (student_cfg.video_max_pixels, student_cfg.video_min_pixels),
    )
    loader_state = None
    if resume_from is not None:
        rank_file = resume_from / f"rank_{env.rank}.json"
        if not rank_file.is_file():
            raise ValueError(
                f"{resume_from} has no state for rank {env.rank}; resume with the same number of processes"
            )
        loader_state = LoaderState.from_json(json.loads(rank_file.read_text())["loader"])
    loader = TrainLoader(
        samples, store, partial(open_store, inputs.store), builder, student_collator(builder, data_cfg.max_batch_tokens),
        data_cfg, env.rank, env.world_size, cfg.seed, device_is_cuda=env.device.type == "cuda", state=loader_state,
    )  # fmt: skip
    steps_per_epoch = max(1, loader.batches_per_epoch // accumulation)
    total_steps = cfg.steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup_steps = round(cfg.warmup_ratio * total_steps)
    schedule = cosine_with_warmup(total_steps, warmup_steps, cfg.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [schedule, schedule])

    start_step = 0
    counters = {"samples": 0, "tokens": 0, "skipped_steps": 0, "skipped_samples": 0, "damaged_samples": 0}
    if resume_from is not None:
        trainer_state, _ = load_training_state(resume_from, student, optimizer, env)
        if trainer_state["store_digest"] != store.fingerprint.digest():
            raise ValueError(
                f"{resume_from} was trained on a store with another fingerprint than {inputs.store}"
            )
        scheduler.load_state_dict(trainer_state["scheduler"])
        start_step = int(trainer_state["step"])
        counters = {"damaged_samples": 0, **trainer_state["counters"]}
    else:
        # Per-rank random streams from here on (dropout and the like); restored exactly on resume.
        seed_everything(cfg.seed + 1 + env.rank)

    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "data_report.json").write_text(json.dumps(report.to_json(), indent=1))
        run_record = {
            "train": to_dict(cfg),
            "data": to_dict(data_cfg),
            "student": to_dict(student_cfg),
            "store": str(inputs.store),
            "store_digest": store.fingerprint.digest(),
            "qa": str(inputs.qa),
            "model": str(inputs.model),
            "world_size": env.world_size,
            "accumulation": accumulation,
            "total_steps": total_steps,
        }
        (run_dir / "run.json").write_text(json.dumps(run_record, indent=1))
    logger = MetricsLogger(run_dir, env, total_steps, cfg, start_step)
    if removed:
        logger.message(
            f"removed the partial checkpoint {', '.join(removed)} an interrupted run left in {leftover}"
        )
    logger.message(report.summary())
    logger.message(
        f"{env.world_size} process(es) on {env.device.type}, {cfg.parallel}; global batch {cfg.global_batch} = "
        f"{data_cfg.micro_batch} x {env.world_size} x {accumulation} accumulation; steps {start_step + 1}..{total_steps}"
    )

    peak = peak_flops_per_device(cfg, env.device)
    autocast_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else None
    loss_names = ["total", "lm", "camera", "depth", "scale", "distill"]
    epoch_samples = loader.batches_per_epoch * data_cfg.micro_batch * env.world_size
    damaged_examples: list[str] = []
    last_record: dict[str, Any] = {}
    run_start = time.perf_counter()
    for step in range(start_step + 1, total_steps + 1):
        step_start = time.perf_counter()
        stats = accumulate_gradients(
            model, student.base.config, loader, env, accumulation, per_rank_step, autocast_dtype
        )
        means, totals = _reduce_stats(stats, loss_names, env)
        samples, tokens, flops, wait, skipped = (float(v) for v in totals)
        counters["samples"] += int(samples)
        counters["tokens"] += int(tokens)
        counters["skipped_samples"] += int(skipped)
        counters["damaged_samples"] += stats.damage.count
        # Every input here is reduced across ranks: every rank stops at the same step, or none does.
        # Every micro-batch holds micro_batch samples (placeholders included): a step draws global_batch.
        drawn = step * cfg.global_batch
        stop = damage_stop_reason(
            stats.damage, counters["damaged_samples"], drawn, data_cfg, epoch_samples, step
        )
        if stop is not None:
            logger.close()
            raise DataError(stop)
        if stats.damage.count:
            logger.message(
                f"step {step}: skipped {stats.damage.count} damaged sample(s), {counters['damaged_samples']} "
                f"so far: {stats.damage.first}"
            )
            if len(damaged_examples) < 5:
                damaged_examples.append(stats.damage.first)
        idle = stats.damage.idle_ranks > 0
        if idle:  # no rank ran a forward: nothing to clip, check or apply
            means, (grad_norm, finite) = dict.fromkeys(means, math.nan), (math.nan, False)
            logger.message(
                f"step {step}: {stats.damage.idle_ranks} rank(s) had no usable sample; update skipped"
            )
        else:
            grad_norm, finite = clip_and_check(param_list, cfg.grad_clip, means["total"], env)
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
        if finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
        step_time = time.perf_counter() - step_start
        counters["skipped_steps"] += 0 if finite else 1
        record = {
            "step": step,
            "epoch": loader.state().epoch,
            "loss": means["total"],
            **{f"loss.{n}": means[n] for n in loss_names[1:]},
            "lr.llm": lrs["llm"],
            "lr.heads": lrs["heads"],
            "grad_norm": grad_norm,
            "skipped": not finite,
            "samples_per_s": samples / step_time,
            "tokens_per_s": tokens / step_time,
            "mfu": flops / step_time / (peak * env.world_size) if peak else None,
            "data_wait": wait / env.world_size / step_time,
            "step_time_s": step_time,
            "skipped_samples": int(skipped),
            "damaged_samples": stats.damage.count,
        }
        if not finite and not idle:
            logger.message(f"step {step}: non-finite loss or gradient norm ({grad_norm}); update skipped")
        logger.log(record)
        if on_step is not None:
            on_step(record)
        last_record = record
        if step % cfg.checkpoint_every == 0 or step == total_steps:
            trainer_state = {
                "step": step,
                "world_size": env.world_size,
                "scheduler": scheduler.state_dict(),
                "counters": counters,
                "store_digest": store.fingerprint.digest(),
                "config": {"train": to_dict(cfg), "data": to_dict(data_cfg)},
            }
            rank_state = {"loader": loader.state().to_json()}
            path = save_checkpoint(
                run_dir, step, student, optimizer, trainer_state, rank_state, env, cfg.keep_last
            )
            logger.message(f"checkpoint {path}")

    summary = {
        "steps": total_steps,
        "resumed_from": start_step,
        "last": last_record,
        "counters": counters,
        "damaged_examples": damaged_examples,
        "data": report.to_json(),
        "wall_s": time.perf_counter() - run_start,
    }
    if env.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    logger.close()
    return summary
