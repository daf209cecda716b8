"""VGGT: conformance with the official outputs, checkpoint compatibility, loading errors, inference options."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from geovr.teacher_cache.config import ConfigError
from geovr.teachers.vggt import VGGT, CheckpointError, VGGTConfig

TINY = ("tiny-a", "tiny-b")
# Measured bf16-autocast deviation from the float32 reference on CPU (torch 2.13), as max|a-b|/max|b|:
#   tiny-a: pose_enc 6.9e-3, depth 2.3e-4, depth_conf 1.2e-4, layers 3.2e-3..3.3e-3
#   tiny-b: pose_enc 8.0e-3, depth 2.3e-4, depth_conf 1.5e-4, layers 3.4e-3..3.5e-3
# Stated tolerances (about 3x the worst measured figure):
BF16_TOLERANCE = {"pose_enc": 2.5e-2, "depth": 1e-3, "depth_conf": 1e-3, "layers": 1e-2}
# With the DPT head also under bf16 autocast (`dpt_head_autocast`), measured the same way:
#   tiny-a: depth 2.8e-3, depth_conf 1.3e-3 (per pixel |a/b - 1|: depth median 8.5e-4, max 3.4e-3)
#   tiny-b: depth 1.3e-3, depth_conf 6.8e-4 (per pixel: depth median 1.7e-4, max 1.4e-3)
BF16_HEAD_TOLERANCE = {"depth": 1e-2, "depth_conf": 5e-3}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - b| / max |b| over the finite entries of `expected` (inf entries must match exactly)."""
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(actual)), "inf/nan positions differ"
    assert torch.equal(actual[~finite], expected[~finite])
    return ((actual[finite] - expected[finite]).abs().max() / expected[finite].abs().max()).item()


@pytest.fixture(scope="module")
def vggt_dir(reference_dir: Path) -> Path:
    return reference_dir / "vggt"


@pytest.fixture(scope="module")
def references(vggt_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(vggt_dir / name / "reference.safetensors") for name in TINY}


def num_stages(reference: dict[str, torch.Tensor]) -> int:
    return sum(key.startswith("aggregated_tokens_") for key in reference)


def outputs_vs_reference(out: dict, reference: dict[str, torch.Tensor], skip=("images",)) -> dict[str, float]:
    errors = {}
    for key, expected in reference.items():
        if key in skip:
            continue
        if key.startswith("aggregated_tokens_"):
            actual = out["layers"][int(key.rsplit("_", 1)[1])]
        else:
            actual = out[key]
        assert actual.shape == expected.shape, key
        assert actual.dtype == torch.float32, key
        errors[key] = relative_error(actual, expected)
    return errors


def copy_checkpoint(
    src: Path, dst: Path, state: dict[str, torch.Tensor] | None = None, config: dict | None = None
):
    dst.mkdir(parents=True, exist_ok=True)
    if config is None:
        shutil.copy(src / "config.json", dst / "config.json")
    else:
        (dst / "config.json").write_text(json.dumps(config))
    save_file(state if state is not None else load_file(src / "model.safetensors"), dst / "model.safetensors")
    return dst


@pytest.mark.parametrize("name", TINY)
def test_reproduces_official_outputs_in_float32(name, vggt_dir, references):
    reference = references[name]
    model = VGGT.from_pretrained(vggt_dir / name)
    assert model.patch_start_idx == 5 and model.heads == ("camera", "depth")
    assert (reference["intrinsic"].isinf()).any(), "the vectors include frames with a zero field of view"
    with torch.inference_mode():
        out = model(reference["images"], return_layers=range(num_stages(reference)))
    errors = outputs_vs_reference(out, reference)
    assert max(errors.values()) < 1e-4, errors


@pytest.mark.parametrize("name", TINY)
def test_bf16_autocast_stays_within_stated_tolerance(name, vggt_dir, references):
    reference = references[name]
    model = VGGT.from_pretrained(vggt_dir / name)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(reference["images"], return_layers=range(num_stages(reference)))
    # extrinsic/intrinsic are decoded from pose_enc (a zero field of view gives an infinite focal).
    errors = outputs_vs_reference(out, reference, skip=("images", "extrinsic", "intrinsic"))
    for key, error in errors.items():
        assert error < BF16_TOLERANCE["layers" if key.startswith("aggregated_tokens_") else key], (key, error)
    # bf16 is really in use in the aggregator: the outputs are not the float32 ones.
    assert errors["aggregated_tokens_0"] > 1e-4


@pytest.mark.parametrize("name", TINY)
def test_fast_precision_options(name, vggt_dir, references):
    """bf16 matmul weights change nothing under bf16 autocast; a bf16 DPT head stays within its
    stated tolerance; cuDNN-first attention falls back to the CPU kernels with equal results."""
    reference = references[name]
    layers = range(num_stages(reference))
    outputs = {}
    for variant, options in (
        ("autocast", {}),
        ("bf16 weights", {"matmul_weights": "bfloat16"}),
        ("bf16 weights and head", {"matmul_weights": "bfloat16", "dpt_head_autocast": True}),
        ("cudnn", {"attention": "cudnn"}),
    ):
        model = VGGT.from_pretrained(vggt_dir / name)
        model.set_inference_options(**options)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            outputs[variant] = model(reference["images"], return_layers=layers)
    assert model.aggregator.frame_blocks[0].attn.qkv.weight.dtype == torch.float32

    def same(a: dict, b: dict, keys=("pose_enc", "depth", "depth_conf")) -> bool:
        return all(torch.equal(a[k], b[k]) for k in keys) and all(
            torch.equal(a["layers"][i], b["layers"][i]) for i in layers
        )

    assert same(outputs["bf16 weights"], outputs["autocast"])
    assert same(outputs["cudnn"], outputs["autocast"])
    fast = outputs["bf16 weights and head"]
    assert same(fast, outputs["autocast"], keys=("pose_enc",))  # the camera head stays float32
    errors = outputs_vs_reference(fast, reference, skip=("images", "extrinsic", "intrinsic"))
    for key, tolerance in BF16_HEAD_TOLERANCE.items():
        assert errors[key] < tolerance, (key, errors[key])
    assert not torch.equal(fast["depth"], outputs["autocast"]["depth"])  # the head really ran in bf16
    assert fast["depth"].dtype == fast["depth_conf"].dtype == torch.float32


def test_bf16_weights_need_bf16_autocast_and_are_one_way(vggt_dir, references):
    model = VGGT.from_pretrained(vggt_dir / "tiny-a")
    model.set_inference_options(matmul_weights="bfloat16", dpt_head_autocast=True)
    assert model.aggregator.frame_blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert model.depth_head.projects[0].weight.dtype == torch.bfloat16
    assert model.depth_head.scratch.output_conv2[-1].weight.dtype == torch.float32
    assert model.camera_head.trunk[0].attn.qkv.weight.dtype == torch.float32
    assert model.aggregator.frame_blocks[0].ls1.gamma.dtype == torch.float32
    with torch.inference_mode(), pytest.raises(RuntimeError, match="run it under bf16 autocast"):
        model(references["tiny-a"]["images"])
    with pytest.raises(ValueError, match="reload the model"):
        model.set_inference_options(matmul_weights="float32")
    with pytest.raises(ValueError, match="reload the model"):
        model.set_inference_options(matmul_weights="bfloat16", dpt_head_autocast=False)
    with pytest.raises(ValueError, match="matmul_weights must be"):
        VGGT.from_pretrained(vggt_dir / "tiny-a").set_inference_options(matmul_weights="float16")


def test_vggt_1b_has_exactly_the_official_tensors(vggt_dir):
    shapes = json.loads((vggt_dir / "vggt_1b_state_dict_shapes.json").read_text())
    cfg = VGGTConfig.from_json(vggt_dir / "vggt-1b.config.json")
    assert cfg == VGGTConfig.vggt_1b()
    with torch.device("meta"):
        model = VGGT(cfg, heads=cfg.heads)
    state = model.state_dict()
    assert {k: list(v.shape) for k, v in state.items()} == shapes["tensors"]
    assert sum(v.numel() for v in state.values()) == shapes["n_params"]

    # The full file loads into a camera+depth model, skipping exactly the point and track tensors.
    full = {k: torch.empty(v, device="meta") for k, v in shapes["tensors"].items()}
    teacher = VGGT.from_state_dict(full, cfg, heads=("camera", "depth"))
    kept = set(teacher.state_dict())
    assert kept == {k for k in full if not k.startswith(("point_head.", "track_head."))}
    assert teacher.point_head is None and teacher.track_head is None


def test_ignores_point_and_track_tensors_and_nothing_else(vggt_dir, references, tmp_path):
    state = load_file(vggt_dir / "tiny-a" / "model.safetensors")
    extra = {
        "point_head.norm.weight": torch.ones(128),
        "track_head.tracker.fmap_norm.weight": torch.ones(128),
    }
    ckpt = copy_checkpoint(vggt_dir / "tiny-a", tmp_path / "extra", {**state, **extra})
    model = VGGT.from_pretrained(ckpt, heads=("camera", "depth"))
    reference = references["tiny-a"]
    with torch.inference_mode():
        out = model(reference["images"])
    assert relative_error(out["depth"], reference["depth"]) < 1e-4

    with pytest.raises(CheckpointError, match=r"unexpected tensors \(2\).*point_head\.norm\.weight"):
        VGGT.from_pretrained(ckpt, ignore_prefixes=())
    other = copy_checkpoint(
        vggt_dir / "tiny-a", tmp_path / "other", {**state, "camera_head.extra": torch.ones(1)}
    )
    with pytest.raises(CheckpointError, match=r"unexpected tensors \(1\): camera_head\.extra"):
        VGGT.from_pretrained(other)


def test_checkpoint_errors_name_the_tensors(vggt_dir, tmp_path):
    src = vggt_dir / "tiny-a"
    state = load_file(src / "model.safetensors")

    missing = {k: v for k, v in state.items() if k != "depth_head.scratch.refinenet2.out_conv.bias"}
    with pytest.raises(
        CheckpointError, match=r"missing tensors \(1\): depth_head\.scratch\.refinenet2\.out_conv\.bias"
    ):
        VGGT.from_pretrained(copy_checkpoint(src, tmp_path / "missing", missing))

    reshaped = {**state, "aggregator.camera_token": torch.zeros(1, 2, 1, 32)}
    with pytest.raises(
        CheckpointError, match=r"aggregator\.camera_token \(file \(1, 2, 1, 32\), model \(1, 2, 1, 64\)\)"
    ):
        VGGT.from_pretrained(copy_checkpoint(src, tmp_path / "reshaped", reshaped))

    # A config that does not match the weights: one stage fewer than the file holds.
    config = {**json.loads((src / "config.json").read_text()), "depth": 3, "dpt_layers": [0, 1, 2, 2]}
    with pytest.raises(CheckpointError, match=r"unexpected tensors \(\d+\): aggregator\.frame_blocks\.3\."):
        VGGT.from_pretrained(copy_checkpoint(src, tmp_path / "shallow", state, config))

    # A head the checkpoint does not hold; an invalid config; a file that is not a checkpoint.
    with pytest.raises(CheckpointError, match=r"\['point'\] requested"):
        VGGT.from_pretrained(src, heads=("camera", "depth", "point"))
    bad_config = {**json.loads((src / "config.json").read_text()), "embed_dims": 64}
    with pytest.raises(ConfigError, match=r"unknown key.*embed_dims"):
        VGGT.from_pretrained(copy_checkpoint(src, tmp_path / "badcfg", state, bad_config))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pt: cannot read checkpoint"):
        VGGT.from_pretrained(junk)
    with pytest.raises(FileNotFoundError):
        VGGT.from_pretrained(tmp_path / "nowhere")


def test_bare_safetensors_and_official_pt_files(vggt_dir, references, tmp_path):
    src = vggt_dir / "tiny-b"
    state = load_file(src / "model.safetensors")
    cfg = VGGTConfig.from_json(src / "config.json")
    pt = tmp_path / "model.pt"
    torch.save(state, pt)
    reference = references["tiny-b"]
    for path in (src / "model.safetensors", pt):
        model = VGGT.from_pretrained(path, config=cfg)
        with torch.inference_mode():
            out = model(reference["images"])
        assert relative_error(out["pose_enc"], reference["pose_enc"]) < 1e-4
    # Without a config a bare file gets the VGGT-1B sizes, which a tiny file does not match.
    with pytest.raises(CheckpointError, match=r"tensors of another shape .*aggregator\.camera_token"):
        VGGT.from_pretrained(pt)


def test_return_layers_keeps_only_requested_stages_and_stops_early(vggt_dir, references):
    reference = references["tiny-a"]
    model = VGGT.from_pretrained(
        vggt_dir / "tiny-a", heads=(), ignore_prefixes=("camera_head.", "depth_head.")
    )
    calls = []
    for stage, block in enumerate(model.aggregator.global_blocks):
        block.register_forward_hook(lambda *_, stage=stage: calls.append(stage))
    with torch.inference_mode():
        out = model(reference["images"], return_layers=[1])
    assert calls == [0, 1]
    assert set(out) == {"layers"} and set(out["layers"]) == {1}
    assert relative_error(out["layers"][1], reference["aggregated_tokens_1"]) < 1e-4

    with pytest.raises(ValueError, match=r"return_layers \[4\] outside"):
        model(reference["images"], return_layers=[4])
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        model(reference["images"][..., :40, :], return_layers=[0])


def test_dpt_frame_chunks_give_the_same_depth(vggt_dir, references):
    reference = references["tiny-b"]  # 5 frames: chunks of 2 leave a remainder
    model = VGGT.from_pretrained(vggt_dir / "tiny-b")
    results = {}
    for chunk in (None, 2, 1):
        model.set_inference_options(dpt_frame_chunk=chunk)
        with torch.inference_mode():
            results[chunk] = model(reference["images"])
    for chunk in (2, 1):
        torch.testing.assert_close(results[chunk]["depth"], results[None]["depth"], rtol=1e-5, atol=0)
        torch.testing.assert_close(
            results[chunk]["depth_conf"], results[None]["depth_conf"], rtol=1e-5, atol=0
        )
    with pytest.raises(ValueError, match="dpt_frame_chunk"):
        model.set_inference_options(dpt_frame_chunk=0)


# Importing inductor (torch.compile) trips a DeprecationWarning inside torch itself.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_attention_backend_and_compile_options(vggt_dir):
    model = VGGT.from_pretrained(vggt_dir / "tiny-a")
    with pytest.raises(ValueError, match="attention must be one of"):
        model.set_inference_options(attention="flash")
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs the xformers package"):
            model.set_inference_options(attention="xformers")
    # compile wraps every transformer block in place (parameter names unchanged); running it is
    # exercised on the device (CPU inductor compilation of the tiny model takes about 70 s here).
    names = list(model.state_dict())
    model.set_inference_options(compile=True)
    blocks = model.transformer_blocks()
    assert len(blocks) == 2 + 2 * 4 + 2  # patch embed, frame + global, camera trunk
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert list(model.state_dict()) == names
    with pytest.raises(ValueError, match="already compiled"):
        model.set_inference_options(compile=False)


def test_random_model_with_point_head_and_track_parameters():
    cfg = VGGTConfig(
        embed_dim=32,
        depth=2,
        num_heads=2,
        patch_embed_depth=1,
        patch_embed_num_heads=2,
        camera_trunk_depth=1,
        camera_num_heads=2,
        dpt_features=16,
        dpt_out_channels=(8, 8, 16, 16),
        dpt_layers=(0, 1, 1, 1),
    )
    torch.manual_seed(0)
    model = VGGT(cfg, heads=("camera", "point", "track")).eval()
    images = torch.rand(1, 2, 3, 28, 42)
    with torch.inference_mode():
        out = model(images)
    assert out["world_points"].shape == (1, 2, 28, 42, 3)
    assert out["world_points_conf"].shape == (1, 2, 28, 42) and (out["world_points_conf"] >= 1).all()
    assert "depth" not in out and out["pose_enc"].shape == (1, 2, 9)
    assert (out["pose_enc"][..., 7:] >= 0).all()
    assert any(k.startswith("track_head.tracker.updateformer.virual_tracks") for k in model.state_dict())
    with pytest.raises(ConfigError, match="divisible by 4"):
        VGGTConfig(embed_dim=30, num_heads=3, patch_embed_num_heads=3, camera_num_heads=3).validate()
