"""Per-step statistics, their reduction over ranks, and the run's logs (rank 0).

`RUN/metrics.jsonl`: one JSON object per step: step, epoch, loss (the total), `loss.<name>` for the
language loss and every objective of `student.objectives`, the learning rate of each group,
grad_norm, skipped, samples/s, tokens/s, MFU, data-wait fraction, step time, skipped and damaged
samples, and the samples whose field chosen "gt" took the teacher's labels (`label_fallback_samples`,
`student.label_choice`). TensorBoard scalars under `RUN/tensorboard/`, and console progress (rich).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from geovr.student.training.config import TrainConfig
from geovr.student.training.damage import StepDamage
from geovr.student.training.distributed import DistEnv, all_reduce


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
    label_fallback_samples: int = 0
    damage: StepDamage = field(default_factory=StepDamage)

    def add_losses(self, losses: dict[str, torch.Tensor], weight: int) -> None:
        for name, value in losses.items():
            if value is not None:
                self.loss_sums[name] = self.loss_sums.get(name, 0.0) + float(value.detach()) * weight


def reduce_stats(stats: StepStats, names: list[str], env: DistEnv) -> tuple[dict[str, float], torch.Tensor]:
    """Global sample-weighted mean of each loss term, and the summed [samples, tokens, flops, wait,
    skipped samples, label-fallback samples] over ranks."""
    values = torch.tensor(
        [stats.loss_sums.get(n, 0.0) for n in names]
        + [stats.samples, stats.tokens, stats.flops, stats.data_wait, stats.skipped_samples]
        + [stats.label_fallback_samples],
        dtype=torch.float64,
        device=env.device,  # NCCL reduces device tensors only
    )
    all_reduce(values, env)
    values = values.cpu()
    totals = values[len(names) :]
    means = {n: float(values[i] / max(1.0, float(totals[0]))) for i, n in enumerate(names)}
    return means, totals


def step_record(
    step: int, epoch: int, means: dict[str, float], totals: list[float], step_time: float, **facts: Any
) -> dict[str, Any]:
    """The metrics.jsonl row of a step: `means` of the loss terms ("total" first), `totals` over ranks
    (samples, tokens, flops, data wait, skipped samples, label-fallback samples); `facts`: lr,
    grad_norm, skipped, peak (FLOP/s per device, or None), world_size, damaged_samples."""
    samples, tokens, flops, wait, skipped, fallback = totals
    peak, world = facts.pop("peak"), facts.pop("world_size")
    lrs = facts.pop("lrs")
    return {
        "step": step,
        "epoch": epoch,
        "loss": means["total"],
        **{f"loss.{name}": value for name, value in means.items() if name != "total"},
        "lr.llm": lrs["llm"],
        "lr.heads": lrs["heads"],
        "grad_norm": facts.pop("grad_norm"),
        "skipped": facts.pop("skipped"),
        "samples_per_s": samples / step_time,
        "tokens_per_s": tokens / step_time,
        "mfu": flops / step_time / (peak * world) if peak else None,
        "data_wait": wait / world / step_time,
        "step_time_s": step_time,
        "skipped_samples": int(skipped),
        "label_fallback_samples": int(fallback),
        **facts,
    }


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
