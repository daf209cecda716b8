"""Objectives as data: a sixth objective on labels the cache already holds, defined here, registered
through `student.objectives` and weighted in the preset's `student.objective_weights`, trains and is
logged with no other source file touched."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer

from geovr.app.presets import load_section
from geovr.student import objectives
from geovr.student.batch import StudentBatch, collate_samples, make_sample
from geovr.student.checkpoint import HEADS_FILE
from geovr.student.config import DataConfig, StudentConfig
from geovr.student.model import GeoVRStudent
from geovr.student.objectives import HiddenStates, Objective, depth_valid
from geovr.student.tiny import write_tiny_qwen3vl
from geovr.student.training.config import TrainConfig, TrainInputs
from geovr.student.training.trainer import train
from geovr.student.vision_inputs import VideoPreprocess
from geovr.teacher_cache.store import open_store
from tests.test_data_loader import write_qa, write_test_store

STEPS = 3


def predict_mean_depth(head: nn.Module, hidden: HiddenStates, batch: StudentBatch) -> torch.Tensor:
    """(B, S) log of each frame's mean depth, from the mean of its visual tokens' last states."""
    frames = batch.frame_mask.shape[1]
    per_clip = []
    for b in range(len(hidden.grids)):
        states = hidden.video_states(hidden.last_index, b, head.weight.dtype)  # (S_b, hq, wq, d)
        pred = head(states.mean(dim=(1, 2))).squeeze(-1).float()
        per_clip.append(objectives.pad_to(pred, (frames,)))
    return torch.stack(per_clip)


def mean_depth_loss(pred: torch.Tensor, batch: StudentBatch, cfg: StudentConfig) -> torch.Tensor:
    """L1 between the predicted and the teacher's log mean depth, over real frames."""
    valid = depth_valid(batch)
    depth = torch.where(valid, batch.depth.float(), 0.0)
    target = (depth.sum((2, 3)) / valid.sum((2, 3)).clamp(min=1)).clamp(min=1e-6).log()
    frames = batch.frame_mask & valid.any((2, 3))
    return (pred - target).abs()[frames].mean()


MEAN_DEPTH = Objective(
    name="mean_depth",
    output="mean_depth",
    label_fields=("depth",),
    weight_key="mean_depth_weight",
    switch=None,
    module="mean_depth_head",
    reads="video",
    build_head=lambda width, cfg: nn.Linear(width, 1),
    predict=predict_mean_depth,
    loss=mean_depth_loss,
)


@pytest.fixture
def registered():
    objectives.register(MEAN_DEPTH)
    yield MEAN_DEPTH
    del objectives.OBJECTIVES[MEAN_DEPTH.name]


def test_a_sixth_objective_registered_in_a_test_trains_and_is_logged(registered, tmp_path):
    model = write_tiny_qwen3vl(tmp_path / "model")
    videos = write_test_store(tmp_path / "store", "zarr", [2, 2])
    qa = write_qa(tmp_path / "qa.jsonl", videos, per_video=2)
    settings = [
        f"train.steps={STEPS}", f"train.checkpoint_every={STEPS}", "train.global_batch=2", "train.warmup_ratio=0",
        "train.tensorboard=false", "data.micro_batch=2", "data.num_workers=0",
        "student.objective_weights={mean_depth_weight: 0.5}",
    ]  # fmt: skip
    student_cfg = load_section(StudentConfig, "student", "tiny", settings, base_model=str(model))
    assert student_cfg.objective_weights == {"mean_depth_weight": 0.5}
    run = tmp_path / "run"
    summary = train(
        TrainInputs(tmp_path / "store", qa, model, run),
        load_section(TrainConfig, "train", "tiny", settings),
        load_section(DataConfig, "data", "tiny", settings),
        student_cfg,
    )
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)) and summary["steps"] == STEPS
    toy = [r["loss.mean_depth"] for r in records]
    assert all(math.isfinite(v) and v > 0 for v in toy), toy
    assert all(r[f"loss.{name}"] > 0 for r in records for name in ("camera", "depth", "scale", "distill"))

    # The head is part of the student and of its checkpoint, and the loss enters the total.
    student = GeoVRStudent.from_pretrained(run, dtype=torch.float32)
    assert "mean_depth_head" in student.geometry_modules()
    assert (run / "checkpoints" / f"step_{STEPS:08d}" / HEADS_FILE).is_file()
    store = open_store(tmp_path / "store")
    tokenizer = AutoTokenizer.from_pretrained(model)
    preprocess = VideoPreprocess.from_model_dir(model)
    conversation = [{"from": "human", "value": "How far?"}, {"from": "gpt", "value": "2"}]
    samples = [make_sample(store.read_clip(c), conversation, tokenizer, preprocess) for c in store.clip_ids()]
    batch = collate_samples(samples, tokenizer.pad_token_id)
    losses = student(batch)
    weights = {o.name: o.weight(student.config) for o in objectives.OBJECTIVES.values()}
    expected = student.config.lm_weight * losses["lm"] + sum(weights[n] * losses[n] for n in weights)
    assert weights["mean_depth"] == 0.5 and losses["total"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_an_unregistered_weight_key_is_refused(tmp_path):
    model = write_tiny_qwen3vl(tmp_path / "model")
    cfg = load_section(StudentConfig, "student", "tiny", ["student.objective_weights={nothing: 1.0}"])
    with pytest.raises(ValueError, match="no registered objective has the weight key"):
        GeoVRStudent.from_base(model, cfg)
