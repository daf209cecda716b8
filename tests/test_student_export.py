"""Student checkpoints and the export to a plain Qwen3-VL model directory."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration
from typer.testing import CliRunner

from geovr.app.cli import _register_commands, app
from geovr.app.presets import load_section
from geovr.student.batch import collate_samples, make_sample
from geovr.student.checkpoint import CONFIG_FILE, HEADS_FILE
from geovr.student.config import StudentConfig
from geovr.student.export import export_plain
from geovr.student.model import GeoVRStudent
from geovr.student.tiny import tiny_clip_labels, write_tiny_qwen3vl
from geovr.student.vision_inputs import VideoPreprocess, build_video_prompt, video_inputs
from geovr.teacher_cache.schema import StoreFingerprint

FINGERPRINT = StoreFingerprint(
    teacher="vggt-tiny",
    checkpoint_sha256="ef" * 32,
    teacher_config={"depth": 4, "embed_dim": 32},
    metric_teacher="",
    preprocess={},
    sampling={},
    feature_layers=(0, 1, 2, 3),
)
CONVERSATION = [
    {"from": "human", "value": "<image>\nWhat is the room size?"},
    {"from": "gpt", "value": "12.5"},
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run directory with two checkpoints of a tiny student: step-9 (fresh) and step-10 (after one step)."""
    tiny_dir = write_tiny_qwen3vl(tmp_path_factory.mktemp("tiny_export"))
    torch.manual_seed(0)
    student = GeoVRStudent.from_base(
        tiny_dir, load_section(StudentConfig, "student", "tiny").matched_to(FINGERPRINT)
    )
    run = tmp_path_factory.mktemp("run")
    student.save_pretrained(run / "checkpoints" / "step-9")
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    preprocess = VideoPreprocess.from_model_dir(tiny_dir)
    batch = collate_samples(
        [make_sample(tiny_clip_labels(5, 3), CONVERSATION, tokenizer, preprocess)], tokenizer.pad_token_id
    )
    optimizer = torch.optim.AdamW(student.param_groups(lr_llm=1e-2, lr_heads=1e-2))
    student.train()
    student(batch)["total"].backward()
    optimizer.step()
    student.eval()
    student.save_pretrained(run / "checkpoints" / "step-10")
    return tiny_dir, run, student, batch


def test_checkpoint_round_trip(trained_run):
    _, run, student, batch = trained_run
    checkpoint = run / "checkpoints" / "step-10"
    assert {HEADS_FILE, CONFIG_FILE, "config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in checkpoint.iterdir()
    }
    assert json.loads((checkpoint / CONFIG_FILE).read_text())["format_version"] == 1
    loaded = GeoVRStudent.from_pretrained(run).eval()  # the run's last checkpoint: step-10, not step-9
    assert loaded.config == student.config
    for (name, ours), (other, theirs) in zip(
        student.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert name == other and torch.equal(ours, theirs), name
    with torch.no_grad():
        assert loaded(batch)["total"].item() == pytest.approx(student(batch)["total"].item(), rel=1e-6)
    with safe_open(checkpoint / HEADS_FILE, "pt") as heads:
        prefixes = {key.split(".")[0] for key in heads.keys()}  # noqa: SIM118 (no __iter__)
    assert prefixes == {
        "camera_token",
        "camera_head",
        "scale_token",
        "scale_head",
        "dense_head",
        "distill_heads",
    }


def test_export_loads_as_plain_qwen3vl_and_generates_like_the_student(trained_run, tmp_path, capfd):
    tiny_dir, run, student, _ = trained_run
    _register_commands()
    result = CliRunner().invoke(app, ["export", str(run), "--out", str(tmp_path / "plain")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "plain"
    assert (
        HEADS_FILE not in {p.name for p in out.iterdir()}
        and (out / "video_preprocessor_config.json").is_file()
    )

    capfd.readouterr()
    plain, info = Qwen3VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    logged = capfd.readouterr().err.lower()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for word in ("missing", "unexpected", "newly initialized", "not used", "not initialized"):
        assert word not in logged, logged
    base = Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir)
    assert plain.num_parameters() == base.num_parameters() < sum(p.numel() for p in student.parameters())
    trained = student.base.state_dict()
    assert all(torch.equal(value, trained[name]) for name, value in plain.state_dict().items())
    assert any(not torch.equal(value, base.state_dict()[name]) for name, value in plain.state_dict().items())

    tokenizer = AutoTokenizer.from_pretrained(out)
    frames = np.random.default_rng(7).integers(0, 256, (3, 64, 96, 3), dtype=np.uint8)
    video = video_inputs(frames, [0.0, 0.5, 1.0], VideoPreprocess.from_model_dir(out))
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "How many chairs?"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer(
        build_video_prompt(text, video["video_grid_thw"][0], [0.0, 0.5, 1.0]), return_tensors="pt"
    )
    inputs = {
        "input_ids": ids["input_ids"],
        "attention_mask": ids["attention_mask"],
        "mm_token_type_ids": (ids["input_ids"] == plain.config.video_token_id).long() * 2,
        "pixel_values_videos": video["pixel_values_videos"],
        "video_grid_thw": video["video_grid_thw"],
    }
    settings = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}
    ours = student.generate(**inputs, **settings)
    theirs = plain.eval().generate(**inputs, **settings)
    assert ours.shape[1] == ids["input_ids"].shape[1] + 8
    assert torch.equal(ours, theirs)


def test_export_refuses_bad_targets(trained_run, tmp_path):
    tiny_dir, run, _, _ = trained_run
    with pytest.raises(FileNotFoundError, match="student checkpoint"):
        export_plain(tiny_dir, tmp_path / "x")  # a plain model is not a student checkpoint
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("")
    with pytest.raises(ValueError, match="not empty"):
        export_plain(run, tmp_path / "busy")


def test_trained_vision_tower_reaches_the_checkpoint_and_the_export(trained_run, tmp_path):
    """`student.train_vision_tower` (the demo's random ViT): the tower's blocks and patch embedding
    train in the "llm" group, and the checkpoint, its reload and the plain export carry the trained
    weights (the export writes the whole base model, not only the GeoVR-trained parts)."""
    tiny_dir, _, _, batch = trained_run
    config = load_section(StudentConfig, "student", "tiny", train_vision_tower=True).matched_to(FINGERPRINT)
    student = GeoVRStudent.from_base(tiny_dir, config)
    visual = student.base.model.visual
    groups = {g["name"]: {id(p) for p in g["params"]} for g in student.param_groups(1e-2, 1e-2)}
    tower = {id(p) for name, p in visual.named_parameters() if not name.startswith("deepstack_merger_list")}
    assert tower <= groups["llm"]  # the DeepStack mergers keep their own switch (off here)
    watched = {
        "model.visual.blocks.0.attn.qkv.weight": visual.blocks[0].attn.qkv.weight,
        "model.visual.patch_embed.proj.weight": visual.patch_embed.proj.weight,
    }
    before = {name: p.detach().clone() for name, p in watched.items()}
    optimizer = torch.optim.AdamW(student.param_groups(lr_llm=1e-2, lr_heads=1e-2))
    student(batch)["total"].backward()
    optimizer.step()
    assert all(not torch.equal(before[name], p) for name, p in watched.items())

    student.save_pretrained(tmp_path / "checkpoint")
    loaded = GeoVRStudent.from_pretrained(tmp_path / "checkpoint")
    assert (
        loaded.config.train_vision_tower and loaded.base.model.visual.blocks[0].attn.qkv.weight.requires_grad
    )
    plain = Qwen3VLForConditionalGeneration.from_pretrained(
        export_plain(tmp_path / "checkpoint", tmp_path / "plain")
    )
    for name, trained in watched.items():
        assert torch.equal(loaded.base.state_dict()[name], trained), name
        assert torch.equal(plain.state_dict()[name], trained), name
