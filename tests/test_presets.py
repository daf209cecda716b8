"""Every shipped preset's student builds on the tiny models and trains one step: its enabled
objectives (GeoVR's four, SpatialSV's point map) give finite positive losses that move their heads,
the others give none; a fusion preset's student (no geometric objective) trains on fusion features."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer

from geovr.app.presets import load_section, preset_names
from geovr.student.batch import collate_samples, make_sample
from geovr.student.config import StudentConfig
from geovr.student.model import GeoVRStudent
from geovr.student.objectives import OBJECTIVES
from geovr.student.tiny import write_tiny_qwen3vl
from geovr.student.vision_inputs import VideoPreprocess
from geovr.teacher_cache.store import open_store
from tests.test_data_loader import write_test_store
from tests.test_fusion_student import FINGERPRINT as FUSION_FINGERPRINT
from tests.test_fusion_student import build_batch as build_fusion_batch
from tests.test_fusion_student import fusion_labels

RECIPES = {
    "qwen3vl-2b-geovr": {"camera", "scale", "depth", "distill"},
    "qwen3vl-2b-spatialsv": {"camera", "depth", "point_map"},
    "qwen3vl-2b-geovr-spatialsv": {"camera", "scale", "depth", "distill", "point_map"},
    "tiny": {"camera", "scale", "depth", "distill"},
    "tiny-spatialsv": {"camera", "depth", "point_map"},
    "tiny-geovr-spatialsv": {"camera", "scale", "depth", "distill", "point_map"},
    "fusion": set(),  # Spatial-MLLM trains the language loss only, through its connector
    "tiny-fusion": set(),
}


@pytest.fixture(scope="module")
def tiny_batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("presets")
    model = write_tiny_qwen3vl(root / "model")
    write_test_store(root / "store", "zarr", [2])
    store = open_store(root / "store")
    tokenizer = AutoTokenizer.from_pretrained(model)
    conversation = [{"from": "human", "value": "How far?"}, {"from": "gpt", "value": "2"}]
    preprocess = VideoPreprocess.from_model_dir(model)
    samples = [make_sample(store.read_clip(c), conversation, tokenizer, preprocess) for c in store.clip_ids()]
    fusion_batch = build_fusion_batch(model, [fusion_labels(0, 4), fusion_labels(1, 2)])
    return (
        model,
        (store.fingerprint, collate_samples(samples, tokenizer.pad_token_id)),
        (FUSION_FINGERPRINT, fusion_batch),
    )


def test_the_recipes_are_shipped():
    assert set(RECIPES) <= set(preset_names())


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_builds_its_student_and_trains_one_step(preset, tiny_batch):
    model, plain, fusion = tiny_batch
    config = load_section(StudentConfig, "student", preset, base_model=str(model))
    fingerprint, batch = (
        fusion if config.fusion else plain
    )  # a fusion student reads a store with fusion features
    config = config.matched_to(fingerprint)
    torch.manual_seed(0)
    student = GeoVRStudent.from_base(model, config, dtype=torch.float32)
    enabled = {o.name for o in student.objectives}
    if preset in RECIPES:
        assert enabled == RECIPES[preset]
    heads = {
        name: [p.detach().clone() for p in module.parameters()]
        for name, module in student.geometry_modules().items()
    }
    optimizer = torch.optim.AdamW(student.param_groups(lr_llm=1e-4, lr_heads=1e-3))
    losses = student(batch)
    losses["total"].backward()
    optimizer.step()
    assert math.isfinite(losses["lm"].item()) and losses["lm"].item() > 0, preset
    for name in OBJECTIVES:
        value = losses[name].item()
        assert (math.isfinite(value) and value > 0) if name in enabled else value == 0.0, (
            preset,
            name,
            value,
        )
    for name, before in heads.items():
        after = list(student.geometry_modules()[name].parameters())
        assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True)) or not before, name
