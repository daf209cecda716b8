"""The trainer: GeoVR student on cached teacher labels, single process or under `torchrun`.

    torchrun --nproc-per-node 8 --no-python geovr-pipeline train --preset qwen3vl-2b-geovr \
        --store STORE --qa vsi590k.jsonl --model Qwen3-VL-2B-Instruct --out RUN [--resume]

`train()` joins the process group (`distributed`), builds the components (data: `student.data`;
model: `GeoVRStudent` wrapped in DDP or FSDP2; `optimizer`; `checkpoint`; `metrics`) and runs the
loop. One optimizer step (global batch = micro_batch x world_size x accumulation samples) is
`Trainer.train_step`: the forward/backward passes of `step.accumulate_gradients`, then the gradient
norm clipped to `grad_clip`; if it (or the loss) is not finite on any rank, the update is skipped
and logged; AdamW step; cosine schedule with linear warmup. Damaged cache data stops or is skipped
on every rank at the same step (`damage`).

`--resume` continues from the run's latest checkpoint exactly: the same samples in the same order,
the same random state, the same learning rate (every stateful part saves and loads itself:
optimizer, scheduler, counters, data loader, RNG states); `metrics.jsonl` is cut back to that step.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from geovr.student.config import DataConfig, StudentConfig
from geovr.student.data import (
    DataError,
    StudentSampleBuilder,
    TrainLoader,
    check_frame_budget,
    join_qa,
    student_collator,
)
from geovr.student.label_choice import check_label_choice
from geovr.student.model import GeoVRStudent
from geovr.student.objectives import loss_names
from geovr.student.training.checkpoint import CheckpointManager
from geovr.student.training.config import TrainConfig, TrainInputs
from geovr.student.training.damage import damage_stop_reason
from geovr.student.training.distributed import DistEnv, init_distributed, seed_everything, wrap_model
from geovr.student.training.flops import peak_flops_per_device
from geovr.student.training.metrics import MetricsLogger, StepStats, reduce_stats, step_record
from geovr.student.training.optimizer import OptimizerState, build_optimizer, build_scheduler, clip_and_check
from geovr.student.training.state import RNGState, TrainCounters
from geovr.student.training.step import accumulate_gradients
from geovr.student.unlabelled import LanguageOnlySource
from geovr.teacher_cache.config import to_dict
from geovr.teacher_cache.store import open_store


def train(
    inputs: TrainInputs,
    cfg: TrainConfig,
    data_cfg: DataConfig,
    student_cfg: StudentConfig,
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
        return Trainer(env, inputs, cfg, data_cfg, student_cfg).fit(on_step)
    finally:
        if env.distributed and not group_given and dist.is_initialized():
            dist.destroy_process_group()


class Trainer:
    """One training run: the components, built in `__init__`, and the loop (`fit`, `train_step`)."""

    def __init__(
        self,
        env: DistEnv,
        inputs: TrainInputs,
        cfg: TrainConfig,
        data_cfg: DataConfig,
        student_cfg: StudentConfig,
    ) -> None:
        self.env, self.inputs, self.cfg, self.data_cfg = env, inputs, cfg, data_cfg
        self.checkpoints = CheckpointManager(inputs.run_dir, env, cfg.keep_last)
        removed = self.checkpoints.remove_partial()
        resume_from = self._resume_point()
        self.store = open_store(inputs.store, max_open_shards=data_cfg.open_shards)
        check_label_choice(self.store.fingerprint, data_cfg.label_choice(), str(inputs.store))
        self.samples, self.report = join_qa(inputs.qa, self.store, data_cfg)
        self._plan_batches()
        self._build_model(student_cfg, resume_from)
        self._build_loader()
        self.counters = TrainCounters()
        self.checkpoints.shared = {"scheduler": self.scheduler, "counters": self.counters}
        self.checkpoints.per_rank = {"loader": self.loader, "rng": RNGState()}
        self.start_step = self._restore(resume_from)
        self._write_run_record()
        self.logger = MetricsLogger(inputs.run_dir, env, self.total_steps, cfg, self.start_step)
        if removed:
            self.logger.message(
                f"removed the partial checkpoint {', '.join(removed)} an interrupted run left in "
                f"{inputs.run_dir / 'checkpoints.tmp'}"
            )
        self.logger.message(self.report.summary())
        self.logger.message(
            f"{env.world_size} process(es) on {env.device.type}, {cfg.parallel}; global batch {cfg.global_batch} = "
            f"{data_cfg.micro_batch} x {env.world_size} x {self.accumulation} accumulation; steps "
            f"{self.start_step + 1}..{self.total_steps}"
        )

    # -- the loop ------------------------------------------------------------------------------

    def fit(self, on_step: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Run the steps after the resume point; returns the run summary (also RUN/summary.json)."""
        damaged_examples: list[str] = []
        last_record: dict[str, Any] = {}
        run_start = time.perf_counter()
        for step in range(self.start_step + 1, self.total_steps + 1):
            record, damage = self.train_step(step)
            if damage and len(damaged_examples) < 5:
                damaged_examples.append(damage)
            self.logger.log(record)
            if on_step is not None:
                on_step(record)
            last_record = record
            if step % self.cfg.checkpoint_every == 0 or step == self.total_steps:
                path = self.checkpoints.save(
                    step, self.student, self.optimizer_state, self._checkpoint_meta()
                )
                self.logger.message(f"checkpoint {path}")
        summary = {
            "steps": self.total_steps,
            "resumed_from": self.start_step,
            "last": last_record,
            "counters": self.counters.state_dict(),
            "damaged_examples": damaged_examples,
            "data": self.report.to_json(),
            "wall_s": time.perf_counter() - run_start,
        }
        if self.counters.label_fallback_samples:
            self.logger.message(
                f"{self.counters.label_fallback_samples} sample(s) trained on the teacher's labels for a "
                "field chosen gt (data.*_label): their clips had no usable ground truth in precompute"
            )
        if self.env.is_main:
            (self.inputs.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        self.logger.close()
        return summary

    def train_step(self, step: int) -> tuple[dict[str, Any], str]:
        """One optimizer step; returns its metrics record and the first damage report met ("" if none)."""
        step_start = time.perf_counter()
        stats = accumulate_gradients(
            self.model, self.student.base.config, self.loader, self.env, self.accumulation,
            self.per_rank_step, self.autocast_dtype,
        )  # fmt: skip
        means, totals = reduce_stats(stats, self.loss_names, self.env)
        self._count(stats, [float(v) for v in totals], step)
        if stats.damage.idle_ranks:  # no rank ran a forward: nothing to clip, check or apply
            means, grad_norm, finite = dict.fromkeys(means, math.nan), math.nan, False
            self.logger.message(
                f"step {step}: {stats.damage.idle_ranks} rank(s) had no usable sample; update skipped"
            )
        else:
            grad_norm, finite = clip_and_check(self.params, self.cfg.grad_clip, means["total"], self.env)
            if not finite:
                self.logger.message(
                    f"step {step}: non-finite loss or gradient norm ({grad_norm}); update skipped"
                )
        lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.env.device.type == "cuda":
            torch.cuda.synchronize(self.env.device)
        self.counters.skipped_steps += 0 if finite else 1
        record = step_record(
            step, self.loader.state().epoch, means, [float(v) for v in totals], time.perf_counter() - step_start,
            lrs=lrs, grad_norm=grad_norm, skipped=not finite, peak=self.peak_flops,
            world_size=self.env.world_size, damaged_samples=stats.damage.count,
        )  # fmt: skip
        return record, stats.damage.first

    def _count(self, stats: StepStats, totals: list[float], step: int) -> None:
        """Add the step to the counters and apply the damage policy (inputs reduced over ranks: every
        rank stops at the same step, or none does)."""
        samples, tokens, _, _, skipped, fallback = totals
        self.counters.samples += int(samples)
        self.counters.tokens += int(tokens)
        self.counters.skipped_samples += int(skipped)
        self.counters.label_fallback_samples += int(fallback)
        self.counters.damaged_samples += stats.damage.count
        # Every micro-batch holds micro_batch samples (placeholders included): a step draws global_batch.
        drawn = step * self.cfg.global_batch
        stop = damage_stop_reason(
            stats.damage, self.counters.damaged_samples, drawn, self.data_cfg, self.epoch_samples, step
        )
        if stop is not None:
            self.logger.close()
            raise DataError(stop)
        if stats.damage.count:
            self.logger.message(
                f"step {step}: skipped {stats.damage.count} damaged sample(s), "
                f"{self.counters.damaged_samples} so far: {stats.damage.first}"
            )

    # -- building the components ---------------------------------------------------------------

    def _resume_point(self) -> Path | None:
        """The checkpoint `--resume` continues from; refuses a run directory with checkpoints otherwise."""
        latest = self.checkpoints.latest()
        if latest is not None and not self.inputs.resume:
            raise ValueError(
                f"{self.inputs.run_dir} already holds checkpoints (last: {latest.name}); pass --resume to "
                "continue that run or choose a new --out"
            )
        return latest if self.inputs.resume else None

    def _plan_batches(self) -> None:
        cfg, env = self.cfg, self.env
        if cfg.global_batch % (self.data_cfg.micro_batch * env.world_size):
            raise ValueError(
                f"train.global_batch={cfg.global_batch} is not a multiple of data.micro_batch x processes = "
                f"{self.data_cfg.micro_batch} x {env.world_size}"
            )
        self.per_rank_step = cfg.global_batch // env.world_size
        self.accumulation = self.per_rank_step // self.data_cfg.micro_batch
        self.autocast_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else None
        self.peak_flops = peak_flops_per_device(cfg, env.device)
        self.loss_names = loss_names()

    def _build_model(self, student_cfg: StudentConfig, resume_from: Path | None) -> None:
        """The student (the same seed on every rank, so that new parts start identical: FSDP does not
        broadcast), wrapped for DDP / FSDP2, and its optimizer over the sharded parameters."""
        cfg, env = self.cfg, self.env
        seed_everything(cfg.seed)
        self.student_cfg = student_cfg.matched_to(self.store.fingerprint)
        source = resume_from if resume_from is not None else self.inputs.model
        student = GeoVRStudent.from_pretrained(source, self.student_cfg, dtype=torch.float32)
        if resume_from is not None:  # the processor files come from the base model, not the checkpoint
            student.source_dir = Path(self.inputs.model)
        student.to(env.device)
        if cfg.gradient_checkpointing:
            student.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        student.train()
        self.student = student
        self.model = wrap_model(student, cfg, env)
        groups = {g["name"]: g["params"] for g in student.param_groups()}
        self.optimizer = build_optimizer(groups, cfg, env.device)
        self.optimizer_state = OptimizerState(student, self.optimizer)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]

    def _build_loader(self) -> None:
        """This rank's data stream, and the schedule sized by it."""
        data_cfg, student_cfg, env, store = self.data_cfg, self.student_cfg, self.env, self.store
        check_frame_budget(store.fingerprint, student_cfg.video_max_pixels, student_cfg.video_min_pixels)
        language_only = None
        if data_cfg.missing_labels == "language_only":
            if student_cfg.fusion:
                raise DataError(
                    "a fusion student reads the cached fusion features of every clip: "
                    "data.missing_labels must be skip"
                )
            language_only = LanguageOnlySource.of_store(store.fingerprint, data_cfg.corpus_root)
        builder = StudentSampleBuilder(
            self.inputs.model,
            data_cfg.max_seq_len,
            data_cfg.on_bad_row,
            (student_cfg.video_max_pixels, student_cfg.video_min_pixels),
            language_only=language_only,
            fusion_layer=student_cfg.fusion_layer_index if student_cfg.fusion else None,
            label_choice=data_cfg.label_choice(),
        )
        self.loader = TrainLoader(
            self.samples, store, store.detached, builder,
            student_collator(builder, data_cfg.max_batch_tokens), data_cfg, env.rank, env.world_size,
            self.cfg.seed, device_is_cuda=env.device.type == "cuda",
        )  # fmt: skip
        steps_per_epoch = max(1, self.loader.batches_per_epoch // self.accumulation)
        self.total_steps = self.cfg.steps or max(1, math.ceil(self.cfg.epochs * steps_per_epoch))
        self.scheduler = build_scheduler(self.optimizer, self.cfg, self.total_steps)
        self.epoch_samples = self.loader.batches_per_epoch * data_cfg.micro_batch * env.world_size

    def _restore(self, resume_from: Path | None) -> int:
        """Load every stateful part from the checkpoint; returns its step (0 for a new run)."""
        if resume_from is None:
            # Per-rank random streams from here on (dropout and the like); restored exactly on resume.
            seed_everything(self.cfg.seed + 1 + self.env.rank)
            return 0
        trainer = self.checkpoints.load(resume_from, self.optimizer_state)
        if trainer["store_digest"] != self.store.fingerprint.digest():
            raise ValueError(
                f"{resume_from} was trained on a store with another fingerprint than {self.inputs.store}"
            )
        return int(trainer["step"])

    def _checkpoint_meta(self) -> dict[str, Any]:
        return {
            "store_digest": self.store.fingerprint.digest(),
            "config": {"train": to_dict(self.cfg), "data": to_dict(self.data_cfg)},
        }

    def _write_run_record(self) -> None:
        """RUN/data_report.json and RUN/run.json (rank 0)."""
        if not self.env.is_main:
            return
        run_dir = self.inputs.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "data_report.json").write_text(json.dumps(self.report.to_json(), indent=1))
        record = {
            "train": to_dict(self.cfg),
            "data": to_dict(self.data_cfg),
            "student": to_dict(self.student_cfg),
            "store": str(self.inputs.store),
            "store_digest": self.store.fingerprint.digest(),
            "qa": str(self.inputs.qa),
            "model": str(self.inputs.model),
            "world_size": self.env.world_size,
            "accumulation": self.accumulation,
            "total_steps": self.total_steps,
        }
        (run_dir / "run.json").write_text(json.dumps(record, indent=1))
