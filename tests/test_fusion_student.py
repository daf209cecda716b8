"""The fusion student (Qwen3-VL + Spatial-MLLM's connector) on the tiny model: the cached fusion
features reach the loss through the connector, what trains (Spatial-MLLM's defaults and the
switches), the optimizer groups, refusals of misaligned or missing features, and a store without
fusion features."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from geovr.app.presets import load_section
from geovr.student.batch import collate_samples, make_sample
from geovr.student.config import StudentConfig
from geovr.student.model import GeoVRStudent
from geovr.student.tiny import tiny_clip_labels, write_tiny_qwen3vl
from geovr.student.vision_inputs import VideoPreprocess
from geovr.teacher_cache.schema import StoreFingerprint

CONVERSATION = [{"from": "human", "value": "<video>\nHow many chairs?"}, {"from": "gpt", "value": "3"}]
WIDTH = 16  # fusion feature width D of these tests
FINGERPRINT = StoreFingerprint(
    teacher="vggt-tiny",
    checkpoint_sha256="0" * 64,
    teacher_config={"depth": 4, "embed_dim": WIDTH // 2},
    metric_teacher="",
    preprocess={"dtype": "float32", "fusion": {"layers": [2, 3]}},
    sampling={},
    feature_layers=(0, 1, 2, 3),
)


def fusion_labels(seed: int, frames: int, frame_hw=(64, 96)):
    """Tiny labels with (S, 2, h, w, D) fusion features on the student's 16-pixel grid."""
    labels = tiny_clip_labels(seed, frames, frame_hw=frame_hw)
    rng = np.random.default_rng(seed)
    fusion = rng.standard_normal((frames, 2, frame_hw[0] // 16, frame_hw[1] // 16, WIDTH)).astype(np.float32)
    return dataclasses.replace(labels, fusion=fusion)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_qwen3vl(tmp_path_factory.mktemp("tiny_fusion_student"))


@pytest.fixture(scope="module")
def config() -> StudentConfig:
    return load_section(StudentConfig, "student", "tiny-fusion").matched_to(FINGERPRINT)


def build_batch(tiny_dir, clips, layer: int = -1):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    preprocess = VideoPreprocess.from_model_dir(tiny_dir)
    samples = [make_sample(c, CONVERSATION, tokenizer, preprocess, fusion_layer=layer) for c in clips]
    return collate_samples(samples, tokenizer.pad_token_id)


def test_config_from_the_store(config: StudentConfig) -> None:
    assert (config.fusion_feature_dim, config.fusion_teacher_layer, config.fusion_dtype) == (
        WIDTH,
        3,
        "float32",
    )
    first = dataclasses.replace(config, fusion_layer_index=0).matched_to(FINGERPRINT)
    assert first.fusion_teacher_layer == 2
    with pytest.raises(ValueError, match="does not index the store's 2 fusion layer"):
        dataclasses.replace(config, fusion_layer_index=2).matched_to(FINGERPRINT)
    plain = dataclasses.replace(FINGERPRINT, preprocess={"dtype": "float32"})
    with pytest.raises(ValueError, match="needs a store with fusion features"):
        config.matched_to(plain)


def test_fusion_features_reach_the_loss_and_what_trains(tiny_dir, config: StudentConfig) -> None:
    torch.manual_seed(0)
    student = GeoVRStudent.from_base(tiny_dir, config, dtype=torch.float32)
    batch = build_batch(tiny_dir, [fusion_labels(1, 4), fusion_labels(2, 3, frame_hw=(64, 64))])
    assert tuple(batch.fusion.shape) == (2, 4, 4, 6, WIDTH)
    losses = student(batch)
    assert torch.isfinite(losses["total"]) and losses["total"] == losses["lm"]
    changed = dataclasses.replace(batch, fusion=batch.fusion * 3.0 + 1.0)
    assert not torch.allclose(student(changed)["lm"], losses["lm"])
    losses["total"].backward()
    connector = student.spatial_connector
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in connector.parameters())
    visual = student.base.model.visual
    assert all(p.grad is not None for p in visual.merger.parameters())
    assert all(p.grad is None for p in visual.blocks.parameters())
    groups = {g["name"]: {id(p) for p in g["params"]} for g in student.param_groups()}
    assert {id(p) for p in connector.parameters()} <= groups["heads"]
    assert {id(p) for p in visual.merger.parameters()} <= groups["heads"]  # Spatial-MLLM's mm_projector_lr
    assert {id(p) for p in student.base.model.language_model.parameters()} <= groups["llm"]
    assert set(student.geometry_modules()) == {"spatial_connector"}


def test_frozen_llm_and_merger(tiny_dir, config: StudentConfig) -> None:
    frozen = dataclasses.replace(config, train_llm=False, train_merger=False)
    student = GeoVRStudent.from_base(tiny_dir, frozen, dtype=torch.float32)
    trainable = {n.split(".")[0] for n, p in student.named_parameters() if p.requires_grad}
    assert trainable == {"spatial_connector"}
    groups = {g["name"]: g["params"] for g in student.param_groups()}
    assert groups["llm"] == []


def test_misaligned_or_missing_fusion_features_are_refused(tiny_dir) -> None:
    labels = fusion_labels(3, 4)
    wrong = dataclasses.replace(labels, fusion=labels.fusion[:, :, :3])
    with pytest.raises(
        ValueError, match=r"fusion features of grid \(3, 6\) but the video's patch grid is \(4, 6\)"
    ):
        build_batch(tiny_dir, [wrong])
    with pytest.raises(ValueError, match="the store holds no fusion features"):
        build_batch(tiny_dir, [dataclasses.replace(labels, fusion=None)])
