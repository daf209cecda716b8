"""GeoVRStudent on a tiny Qwen3-VL and a real Zarr cache: losses, gradients, token layout, masking."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from geovr.app.presets import load_section
from geovr.student.batch import StudentBatch, collate_samples, make_sample
from geovr.student.config import StudentConfig
from geovr.student.heads import DenseHead, dense_target_grid
from geovr.student.model import GeoVRStudent, map_teacher_layers
from geovr.student.objectives import depth_valid
from geovr.student.tiny import tiny_clip_labels, write_tiny_qwen3vl
from geovr.student.vision_inputs import VideoPreprocess, video_inputs
from geovr.teacher_cache.schema import StoreFingerprint
from geovr.teacher_cache.store import open_store, open_writer

FINGERPRINT = StoreFingerprint(
    teacher="vggt-tiny",
    checkpoint_sha256="cd" * 32,
    teacher_config={"depth": 4, "embed_dim": 32},
    metric_teacher="tiny-metric",
    preprocess={"teacher_long_side": 84},
    sampling={"fps": 2.0, "min_frames": 3, "max_frames": 4},
    feature_layers=(0, 1, 2, 3),
)
CONVERSATION = [
    {"from": "human", "value": "<image>\nThese are frames of a video.\nHow many chairs are in this room?"},
    {"from": "gpt", "value": "Two."},
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_qwen3vl(tmp_path_factory.mktemp("tiny_student"))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache") / "store"
    writer = open_writer(root, FINGERPRINT, format="zarr")
    writer.write_shard(
        "000000",
        [
            tiny_clip_labels(1, 4),
            tiny_clip_labels(2, 3, frame_hw=(64, 64), teacher_hw=(56, 56), scale_valid=False),
        ],
        [],
    )
    return open_store(root)


@pytest.fixture(scope="module")
def student(tiny_dir):
    torch.manual_seed(0)
    config = load_section(StudentConfig, "student", "tiny").matched_to(FINGERPRINT)
    return GeoVRStudent.from_base(tiny_dir, config).eval()


@pytest.fixture(scope="module")
def batch(tiny_dir, store) -> StudentBatch:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    preprocess = VideoPreprocess.from_model_dir(tiny_dir)
    samples = [make_sample(store.read_clip(c), CONVERSATION, tokenizer, preprocess) for c in store.clip_ids()]
    return collate_samples(samples, tokenizer.pad_token_id)


def test_layer_mapping():
    assert map_teacher_layers((4, 11, 17, 23), 24, 28) == [6, 14, 21, 28]
    assert map_teacher_layers((4, 11, 17, 23), 24, 4) == [1, 2, 3, 4]
    assert map_teacher_layers((0, 1, 2, 3), 4, 4) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="repeated"):
        map_teacher_layers((4, 11, 17, 23), 24, 2)


def test_config_matches_the_store(student):
    assert student.config.teacher_feature_dim == 32 and student.layer_indices == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="embed_dim"):
        StudentConfig().matched_to(dataclasses.replace(FINGERPRINT, teacher_config={"depth": 4}))


def test_dense_head_lands_on_the_cached_depth_grid():
    """480x640 student frames -> 15x20 merged tokens; VGGT at 392x504 -> a 28x36 patch grid and
    196x252 cached depth; the dense head resizes to 28x36 and pixel-shuffles by 7 onto 196x252."""
    grid = video_inputs(np.zeros((1, 480, 640, 3), np.uint8), [0.0])["video_grid_thw"][0].tolist()
    assert [grid[1] // 2, grid[2] // 2] == [15, 20]
    assert dense_target_grid((196, 252)) == (28, 36)
    with pytest.raises(ValueError, match="multiple"):
        dense_target_grid((196, 250))
    head = DenseHead(16, features=8, channels=(4, 8, 8, 8))
    levels = [torch.randn(2, 15, 20, 16) for _ in range(4)]
    depth = head(levels, (196, 252), 640 / 480)
    assert depth.shape == (2, 196, 252) and (depth > 0).all()
    assert head(levels, (56, 84), 640 / 480).shape == (2, 56, 84)  # any cached size divisible by 7


def test_batch_from_the_cache(batch, tiny_dir):
    assert batch.clip_ids == ["clip001", "clip002"]
    assert batch.video_grid_thw.tolist() == [[4, 4, 6], [3, 4, 4]]
    assert batch.frame_mask.tolist() == [[True] * 4, [True, True, True, False]]
    assert batch.pose_enc.shape == (2, 4, 9) and batch.depth.shape == (2, 4, 28, 42)
    assert batch.features.shape == (2, 4, 4, 2, 3, 32) and batch.feature_hw.tolist() == [[2, 3], [2, 2]]
    assert batch.depth_hw.tolist() == [[28, 42], [28, 28]] and torch.isnan(batch.depth[1, :, :, 28:]).all()
    # camera targets are relative to frame 0: identity rotation, zero translation there
    torch.testing.assert_close(
        batch.pose_enc[:, 0, :7], torch.tensor([[0.0, 0, 0, 0, 0, 0, 1]] * 2), atol=1e-5, rtol=0
    )
    assert batch.scale_valid.tolist() == [True, False] and torch.isnan(batch.scale[1])
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    text = tokenizer.decode(batch.input_ids[0][batch.attention_mask[0].bool()])
    assert "These are frames" not in text and "<image>" not in text
    # Frames at 0, 0.5, 1, 1.5 s, repeated as GeoVR does: D = "1.2", token j at (4j + 1) * 1.2 / 16 s.
    assert re.findall(r"<([0-9.]+) seconds>", text) == ["0.1", "0.4", "0.7", "1.0"]
    answer = tokenizer.decode(batch.labels[0][batch.labels[0] >= 0])
    assert answer == "Two.<|im_end|>\n"
    assert int((batch.mm_token_type_ids[0] == 2).sum()) == 4 * 6


def test_forward_backward_gives_five_finite_losses_and_freezes_vision(student, batch):
    student.zero_grad(set_to_none=True)
    losses = student(batch)
    # Every objective of the table has a loss; the point map (SpatialSV) is off in GeoVR's recipe.
    assert set(losses) == {"lm", "camera", "depth", "scale", "distill", "point_map", "total"}
    assert losses.pop("point_map").item() == 0.0
    for name, value in losses.items():
        assert torch.isfinite(value) and value.item() > 0, name
    cfg = student.config
    expected = losses["lm"] + 2.5 * losses["camera"] + losses["depth"] + losses["distill"] + losses["scale"]
    assert cfg.camera_weight == 2.5 and losses["total"].item() == pytest.approx(expected.item(), rel=1e-6)
    losses["total"].backward()
    visual = student.base.model.visual
    frozen = [p for n, p in visual.named_parameters() if not n.startswith("merger.")]
    assert frozen and all(p.grad is None and not p.requires_grad for p in frozen)
    assert visual.merger.linear_fc2.weight.grad.abs().sum() > 0
    student.zero_grad(set_to_none=True)


LAYER_PARAMS = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "self_attn.q_norm.weight",
    "self_attn.k_norm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)
MERGER_PARAMS = (
    "norm.weight",
    "norm.bias",
    "linear_fc1.weight",
    "linear_fc1.bias",
    "linear_fc2.weight",
    "linear_fc2.bias",
)


def test_trainable_parameters_are_geovrs(tiny_dir):
    """GeoVR's `set_model`: the vision tower frozen except `visual.merger`; the DeepStack mergers train
    only with `student.train_deepstack_mergers`. The tied LM head is the embedding (listed once)."""
    llm = {"base.model.language_model.embed_tokens.weight", "base.model.language_model.norm.weight"} | {
        f"base.model.language_model.layers.{i}.{name}" for i in range(4) for name in LAYER_PARAMS
    }
    merger = {f"base.model.visual.merger.{name}" for name in MERGER_PARAMS}
    deepstack = {f"base.model.visual.deepstack_merger_list.0.{name}" for name in MERGER_PARAMS}
    for train_deepstack, expected_visual in ((False, merger), (True, merger | deepstack)):
        config = load_section(
            StudentConfig, "student", "tiny", train_deepstack_mergers=train_deepstack
        ).matched_to(FINGERPRINT)
        student = GeoVRStudent.from_base(tiny_dir, config)
        heads = {
            f"{prefix}.{name}"
            for prefix, module in student.geometry_modules().items()
            for name, _ in module.named_parameters()
        }
        assert heads and all(
            name.split(".")[0]
            in {"camera_token", "camera_head", "scale_token", "scale_head", "dense_head", "distill_heads"}
            for name in heads
        )
        trainable = {name for name, p in student.named_parameters() if p.requires_grad}
        assert trainable == llm | expected_visual | heads
        groups = {g["name"]: {id(p) for p in g["params"]} for g in student.param_groups()}
        ds_param = student.base.model.visual.deepstack_merger_list[0].linear_fc1.weight
        assert (id(ds_param) in groups["llm"]) is train_deepstack


def test_each_geometric_loss_reaches_its_head_and_the_llm(student, batch):
    losses = student(batch)
    heads = {
        "camera": [student.camera_head, student.camera_token],
        "depth": [student.dense_head],
        "scale": [student.scale_head, student.scale_token],
        "distill": [student.distill_heads],
    }
    llm = student.base.model.language_model.layers[0].mlp.down_proj.weight
    merger = student.base.model.visual.merger.linear_fc2.weight
    vision = student.base.model.visual.blocks[0].attn.qkv.weight
    assert not vision.requires_grad
    for name, own in heads.items():
        own_params = [p for m in own for p in m.parameters()]
        # other heads get nothing; the new tokens are in the sequence, so every loss may reach them
        other = [p for other_name, ms in heads.items() if other_name != name for p in ms[0].parameters()]
        grads = torch.autograd.grad(
            losses[name], own_params + other + [llm, merger], retain_graph=True, allow_unused=True
        )
        own_grads, rest = grads[: len(own_params)], grads[len(own_params) :]
        other_grads, (llm_grad, merger_grad) = rest[: len(other)], rest[len(other) :]
        assert all(g is not None for g in own_grads), name
        assert sum(g.abs().sum() for g in own_grads) > 0, name
        assert all(g is None or g.abs().sum() == 0 for g in other_grads), name
        assert llm_grad is not None and llm_grad.abs().sum() > 0, name
        assert merger_grad is not None and merger_grad.abs().sum() > 0, name


def test_camera_token_follows_each_frame(student, batch, tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    vision_end = tokenizer.convert_tokens_to_ids("<|vision_end|>")
    video = student.base.config.video_token_id
    layout = student._layout(batch)
    embeds, _ = student._input_embeddings(batch, layout)
    vision = student.base.model.get_video_features(
        batch.pixel_values_videos, batch.video_grid_thw
    ).pooler_output
    for b in range(2):
        frames = int(batch.video_grid_thw[b, 0])
        patches, cameras = layout.patch_positions[b], layout.camera_positions[b]
        scale = int(layout.scale_positions[b])
        assert patches.shape == (frames, int(batch.video_grid_thw[b, 1] * batch.video_grid_thw[b, 2]) // 4)
        for i in range(frames):
            # camera token i sits right after frame i's visual tokens, before its <|vision_end|>
            assert int(cameras[i]) == int(patches[i, -1]) + 1
            assert torch.equal(
                patches[i], torch.arange(int(patches[i, 0]), int(patches[i, 0]) + patches.shape[1])
            )
            after = scale + 1 if i == frames - 1 else int(cameras[i]) + 1
            assert int(layout.input_ids[b, after]) == vision_end
            torch.testing.assert_close(embeds[b, cameras[i]], student.camera_token.weight[0 if i == 0 else 1])
            # the inserted token takes the 3D position of its frame's last patch
            assert torch.equal(
                layout.position_ids[:, b, cameras[i]], layout.position_ids[:, b, patches[i, -1]]
            )
        assert scale == int(cameras[-1]) + 1
        torch.testing.assert_close(embeds[b, scale], student.scale_token.weight[0])
        torch.testing.assert_close(embeds[b, patches.reshape(-1)], vision[b])
        slots = torch.cat((cameras, torch.tensor([scale])))
        assert (layout.input_ids[b, slots] == video).all() and (layout.mm_token_type_ids[b, slots] == 2).all()
        assert (layout.labels[b, slots] == -100).all() and not layout.visual_mask[b, slots].any()
        assert int(layout.attention_mask[b].sum()) == int(batch.attention_mask[b].sum()) + frames + 1
    # text after the video keeps its positions: the last token's position is unchanged
    plain, _ = student.base.model.get_rope_index(
        batch.input_ids,
        batch.mm_token_type_ids,
        video_grid_thw=batch.video_grid_thw,
        attention_mask=batch.attention_mask,
    )
    for b in range(2):
        n_old, n_new = int(batch.attention_mask[b].sum()), int(layout.attention_mask[b].sum())
        assert torch.equal(plain[:, b, n_old - 1], layout.position_ids[:, b, n_new - 1])


def test_permuting_teacher_labels_across_frames_changes_pose_and_depth_losses(student, batch):
    """With the student's own predictions as labels the pose and depth losses vanish; the same labels
    permuted across frames do not: frame i's prediction meets frame i's label."""
    pred = student.predict(batch)
    valid = depth_valid(batch)
    aligned = dataclasses.replace(
        batch, pose_enc=pred.pose_enc.nan_to_num(0.0), depth=torch.where(valid, pred.depth, batch.depth)
    )
    order = [2, 0, 3, 1]
    permuted = dataclasses.replace(aligned, pose_enc=aligned.pose_enc.clone(), depth=aligned.depth.clone())
    permuted.pose_enc[0], permuted.depth[0] = aligned.pose_enc[0, order], aligned.depth[0, order]
    with torch.no_grad():
        same, moved = student(aligned), student(permuted)
    assert same["camera"].item() < 1e-6 and same["depth"].item() < 1e-6
    assert moved["camera"].item() > 1e-4 and moved["depth"].item() > 1e-4
    assert moved["lm"].item() == pytest.approx(same["lm"].item(), rel=1e-6)


def test_invalid_labels_contribute_nothing(student, batch):
    """Changing what is flagged invalid or padded leaves every loss unchanged."""
    changed = dataclasses.replace(
        batch,
        scale=torch.tensor([batch.scale[0].item(), 1e6]),  # clip 1: no metric scale
        pose_enc=batch.pose_enc.clone(),
        depth=batch.depth.clone(),
        features=batch.features.clone(),
    )
    changed.pose_enc[1, 3] = 1e4  # clip 1 has 3 frames: frame 3 is padding
    changed.depth[1, 3] = 1e4
    changed.depth[1, :, :, 28:] = 1e4  # outside clip 1's 28x28 depth map
    changed.features[1, 3] = -1.0
    changed.features[1, :, :, :, 2] = 5.0  # outside clip 1's 2x2 feature grid
    holed = dataclasses.replace(batch, depth=batch.depth.clone())
    holed.depth[0, 0, :5, :5] = float("nan")  # a label hole: masked, not zero-filled
    with torch.no_grad():
        base, other, with_hole = student(batch), student(changed), student(holed)
    for name in ("lm", "camera", "depth", "scale", "distill", "total"):
        assert other[name].item() == pytest.approx(base[name].item(), rel=1e-6), name
    assert torch.isfinite(with_hole["depth"]) and with_hole["depth"].item() != base["depth"].item()
    no_scale = dataclasses.replace(batch, scale_valid=torch.tensor([False, False]))
    with torch.no_grad():
        assert student(no_scale)["scale"].item() == 0.0


def test_predictions_are_padded_with_nan(student, batch):
    pred = student.predict(batch)
    assert pred.pose_enc.shape == (2, 4, 9) and torch.isnan(pred.pose_enc[1, 3]).all()
    assert (
        torch.isfinite(pred.pose_enc[batch.frame_mask]).all()
        and (pred.pose_enc[..., 7:][batch.frame_mask] >= 0).all()
    )
    assert (
        pred.depth.shape == batch.depth.shape
        and (pred.depth[0] > 0).all()
        and torch.isnan(pred.depth[1, 3]).all()
    )
    assert pred.scale.shape == (2,) and (pred.scale > 0).all()


def test_language_loss_equals_plain_qwen3vl_with_geometry_off(tiny_dir, batch):
    off = load_section(
        StudentConfig, "student", "tiny", camera=False, depth=False, scale=False, distill=False
    )
    plain_student = GeoVRStudent.from_base(tiny_dir, off).eval()
    assert not plain_student.geometry_modules()
    with torch.no_grad():
        ours = plain_student(batch)
        reference = plain_student.base(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            labels=batch.labels,
            pixel_values_videos=batch.pixel_values_videos,
            video_grid_thw=batch.video_grid_thw,
            mm_token_type_ids=batch.mm_token_type_ids,
        ).loss
    assert ours["lm"].item() == pytest.approx(reference.item(), rel=1e-5)
    assert ours["total"].item() == pytest.approx(reference.item(), rel=1e-5)


def test_hidden_states_and_head_inputs_follow_transformers_5_5(tiny_dir, batch):
    """Checks the student's hidden states against transformers' own `Qwen3VLTextModel.forward` with
    `output_hidden_states=True` on the same embeddings, positions and DeepStack features. Under
    `capture_outputs` (5.5.0, as GeoVR runs it; the installed 5.x records the same) entry 0 is the
    input of layer 0, entry k the output of decoder layer k before the DeepStack addition, and entry
    N the final-norm output. Asserted: indices 0 and N, and every index above the D DeepStack levels,
    equal transformers'; indices 1..D are transformers' plus the DeepStack addition (the student's
    kept convention). Then: the camera and scale heads read index N, and the dense head's and the
    distillation head's deepest level (index N of N) is index N, the normed state."""
    student = GeoVRStudent.from_base(
        tiny_dir, load_section(StudentConfig, "student", "tiny").matched_to(FINGERPRINT)
    ).eval()
    lm = student.base.model.language_model
    layers = len(lm.layers)
    with torch.no_grad():
        layout = student._layout(batch)
        embeds, deepstack = student._input_embeddings(batch, layout)
        _, ours = student._decoder(embeds, layout, deepstack, set(range(layers + 1)))
        hf = lm(
            inputs_embeds=embeds,
            attention_mask=layout.attention_mask,
            position_ids=layout.position_ids,
            visual_pos_masks=layout.visual_mask,
            deepstack_visual_embeds=deepstack,
            output_hidden_states=True,
        )
    real = layout.attention_mask.bool()
    assert len(hf.hidden_states) == layers + 1 and len(deepstack) == 1  # the tiny model: D = 1
    torch.testing.assert_close(hf.hidden_states[layers], hf.last_hidden_state)
    for k in (0, layers, *range(len(deepstack) + 1, layers)):
        torch.testing.assert_close(ours[k][real], hf.hidden_states[k][real])
    with_deepstack = hf.hidden_states[1].clone()
    with_deepstack[layout.visual_mask] += deepstack[0]
    torch.testing.assert_close(ours[1][real], with_deepstack[real])

    seen = {}
    heads = {"camera": student.camera_head, "scale": student.scale_head, "dense": student.dense_head}
    heads["distill"] = student.distill_heads[student.layer_indices.index(layers)]
    hooks = [
        module.register_forward_pre_hook(lambda _, args, name=name: seen.setdefault(name, []).append(args[0]))
        for name, module in heads.items()
    ]
    with torch.no_grad():
        student(batch)
    for hook in hooks:
        hook.remove()
    normed = hf.last_hidden_state
    merge = student.base.config.vision_config.spatial_merge_size
    for b, grid in enumerate(batch.video_grid_thw.tolist()):
        torch.testing.assert_close(seen["camera"][b], normed[b, layout.camera_positions[b]])
        video = normed[b, layout.patch_positions[b]].unflatten(1, (grid[1] // merge, grid[2] // merge))
        torch.testing.assert_close(seen["dense"][b][-1], video)
        torch.testing.assert_close(seen["distill"][b], video)
    rows = torch.arange(len(batch.clip_ids))
    torch.testing.assert_close(seen["scale"][0], normed[rows, layout.scale_positions])


def test_param_groups(student):
    groups = student.param_groups()
    assert [(g["name"], g["lr"]) for g in groups] == [("llm", 2e-5), ("heads", 1e-4)]
    ids = [{id(p) for p in g["params"]} for g in groups]
    assert not ids[0] & ids[1]
    trainable = {id(p) for p in student.parameters() if p.requires_grad}
    assert ids[0] | ids[1] == trainable
    assert (
        id(student.camera_token.weight) in ids[1]
        and id(student.base.model.visual.merger.linear_fc1.weight) in ids[0]
    )
    assert id(student.base.model.visual.blocks[0].attn.qkv.weight) not in trainable
