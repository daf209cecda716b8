"""Student video inputs and prompt expansion against transformers' Qwen3-VL processors, and the tiny checkpoint."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.video_utils import VideoMetadata

from geovr.student.tiny import write_tiny_qwen3vl
from geovr.student.vision_inputs import VideoPreprocess, build_video_prompt, video_inputs


def _torchvision_imports() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # absent, or a wheel that does not import beside this torch
        return False
    return True


HAS_TORCHVISION = _torchvision_imports()
# `make test-processor` runs these in a venv with torchvision and sets this: a skip there is a failure.
REQUIRE_TORCHVISION = os.environ.get("GEOVR_REQUIRE_TORCHVISION") == "1"


def processor_test(test):
    """Marks a test that runs transformers' Qwen3-VL video processor (it needs torchvision)."""
    skip = pytest.mark.skipif(
        not HAS_TORCHVISION and not REQUIRE_TORCHVISION,
        reason="transformers' Qwen3-VL video processor needs torchvision (make test-processor)",
    )
    return pytest.mark.processor(skip(test))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_qwen3vl(tmp_path_factory.mktemp("tiny_qwen3vl"))


def _frames(num: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (num, height, width, 3), dtype=np.uint8)


def test_tiny_checkpoint_loads_offline_without_key_problems(tiny_dir):
    model, info = Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    for token in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"):
        assert tokenizer.convert_tokens_to_ids(token) < model.config.text_config.vocab_size
    assert tokenizer.convert_tokens_to_ids("<|video_pad|>") == model.config.video_token_id
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "How many chairs?"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == (
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>How many chairs?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # Same seed, same weights; another seed, other weights.
    again = write_tiny_qwen3vl(tiny_dir.parent / "again", seed=0)
    other = write_tiny_qwen3vl(tiny_dir.parent / "other", seed=1)
    assert (again / "model.safetensors").read_bytes() == (tiny_dir / "model.safetensors").read_bytes()
    assert (other / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()


def test_preprocess_settings_come_from_the_model_dir(tiny_dir, tmp_path):
    assert VideoPreprocess.from_model_dir(tiny_dir) == VideoPreprocess()
    custom = json.loads((tiny_dir / "video_preprocessor_config.json").read_text())
    custom["image_mean"] = [0.48145466, 0.4578275, 0.40821073]
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(custom))
    assert VideoPreprocess.from_model_dir(tmp_path).image_mean == tuple(custom["image_mean"])
    with pytest.raises(FileNotFoundError, match="preprocessor_config"):
        VideoPreprocess.from_model_dir(tmp_path / "missing")


def test_patches_follow_the_processor_layout_by_hand():
    """Each row is one 16x16 patch of one frame (both temporal copies), in merge-block raster order."""
    frames = _frames(3, 64, 96)
    out = video_inputs(frames, [0.0, 0.5, 1.0])
    assert out["video_grid_thw"].tolist() == [[3, 4, 6]]
    pixels = out["pixel_values_videos"]
    assert pixels.shape == (3 * 4 * 6, 3 * 2 * 16 * 16) and pixels.dtype == torch.float32
    row = 0
    for t in range(3):
        for block_row in range(2):
            for block_col in range(3):
                for in_row in range(2):
                    for in_col in range(2):
                        y = (block_row * 2 + in_row) * 16
                        x = (block_col * 2 + in_col) * 16
                        patch = frames[t, y : y + 16, x : x + 16].astype(np.float32)  # (P, P, C)
                        expected = (patch - 127.5) / 127.5
                        # (C, T, P, P): both temporal copies are the same frame.
                        expected = np.broadcast_to(expected.transpose(2, 0, 1)[:, None], (3, 2, 16, 16))
                        np.testing.assert_array_equal(pixels[row].numpy(), expected.reshape(-1))
                        row += 1


def test_consecutive_pairing_puts_frame_pairs_in_one_temporal_token():
    frames = _frames(5, 32, 32)
    times = np.array([0.0, 0.5, 1.0, 1.5, 2.0])
    out = video_inputs(frames, times, frame_pairing="consecutive")
    assert out["video_grid_thw"].tolist() == [[3, 2, 2]]
    np.testing.assert_allclose(out["frame_timestamps"].numpy(), [0.25, 1.25, 2.0])
    pixels = out["pixel_values_videos"].reshape(3, 4, 3, 2, 16, 16)  # (t, patch, C, T, P, P)
    normalised = (frames.astype(np.float32) - 127.5) / 127.5
    for t, pair in enumerate(((0, 1), (2, 3), (4, 4))):  # an odd count repeats the last frame
        for copy, frame in enumerate(pair):
            patch = normalised[frame, :16, :16].transpose(2, 0, 1)  # the first patch row of the frame
            np.testing.assert_array_equal(pixels[t, 0, :, copy].numpy(), patch)
    repeat = video_inputs(frames, times)
    assert repeat["video_grid_thw"].tolist() == [[5, 2, 2]]
    # GeoVR's repeated-clip times (tests/test_repeat_timestamps.py): (4j + 1) / 12 s here.
    np.testing.assert_allclose(repeat["frame_timestamps"].numpy(), (4 * np.arange(5) + 1) / 12)
    with pytest.raises(ValueError, match="frame_pairing"):
        video_inputs(frames, times, frame_pairing="pairs")


def test_frames_off_the_grid_are_resized_to_the_student_size():
    out = video_inputs(_frames(2, 70, 100), [0.0, 0.5])
    # student_frame_size: 2 frames of 64 x 96 are below the clip minimum (4 * 16 * 32 * 32): 160 x 224
    assert out["video_grid_thw"].tolist() == [[2, 10, 14]]
    budget = VideoPreprocess(video_max_pixels=4 * 64 * 64, video_min_pixels=1024)
    big = video_inputs(_frames(4, 128, 128), np.arange(4.0), budget, frame_pairing="consecutive")
    assert big["video_grid_thw"].tolist() == [
        [2, 4, 4]
    ]  # multiples of 32, but above the clip budget: 64 x 64
    with pytest.raises(ValueError, match="timestamps"):
        video_inputs(_frames(2, 64, 64), [0.0])
    with pytest.raises(ValueError, match="uint8"):
        video_inputs(_frames(2, 64, 64).astype(np.float32), [0.0, 0.5])


def _processor_text_logic() -> Qwen3VLProcessor:
    """The real Qwen3VLProcessor text methods, without its image/video processors (they need torchvision)."""
    processor = object.__new__(Qwen3VLProcessor)
    processor.image_token, processor.video_token = "<|image_pad|>", "<|video_pad|>"
    processor.vision_start_token, processor.vision_end_token = "<|vision_start|>", "<|vision_end|>"
    processor.video_processor = SimpleNamespace(merge_size=2, temporal_patch_size=2)
    return processor


def test_prompt_expansion_matches_the_processor_text_logic():
    fps = 6.0
    frame_indices = np.array([0, 4, 9, 13, 20])
    timestamps = frame_indices / fps
    grid = torch.tensor([[5, 4, 6]])
    text = "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>How far?<|im_end|>\n"

    processor = _processor_text_logic()
    metadata = VideoMetadata(
        total_num_frames=42, fps=fps, frames_indices=np.repeat(frame_indices, 2).tolist()
    )
    replacement = processor.replace_video_token({"video_grid_thw": grid, "video_metadata": [metadata]}, 0)
    expected, _ = processor.get_text_with_replacements([text], videos_replacements=[replacement])

    ours = build_video_prompt(text, grid[0], timestamps)
    assert ours == expected[0]
    assert ours.count("<|video_pad|>") == 5 * 6 and ours.count("seconds>") == 5
    assert ours.startswith("<|im_start|>user\n<|vision_start|><0.0 seconds><|vision_start|>")
    with pytest.raises(ValueError, match="exactly one"):
        build_video_prompt(text + text, grid[0], timestamps)


@processor_test
@pytest.mark.parametrize("num_frames", [4, 5])
def test_consecutive_pairing_equals_the_processor_default(tiny_dir, num_frames):
    """Frames given to the processor as they are (no repetition): what lmms-eval's Qwen3-VL runs do."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_dir)
    frames = _frames(num_frames, 96, 128, seed=4)
    frame_indices = np.arange(num_frames) * 3
    fps = 6.0
    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Where?"}]}]
    text = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    reference = processor(
        text=[text],
        videos=[frames],
        video_metadata=[VideoMetadata(total_num_frames=30, fps=fps, frames_indices=frame_indices.tolist())],
        do_sample_frames=False,
        do_resize=True,
        cap_pixels_per_frame=False,
        return_tensors="pt",
    )
    ours = video_inputs(frames, frame_indices / fps, VideoPreprocess.from_model_dir(tiny_dir), "consecutive")
    assert torch.equal(ours["video_grid_thw"], reference["video_grid_thw"])
    torch.testing.assert_close(ours["pixel_values_videos"], reference["pixel_values_videos"], rtol=0, atol=0)
    prompt = build_video_prompt(text, ours["video_grid_thw"][0], ours["frame_timestamps"])
    assert torch.equal(processor.tokenizer(prompt, return_tensors="pt")["input_ids"], reference["input_ids"])


@processor_test
def test_inputs_equal_the_transformers_processor(tiny_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_dir)
    frames = _frames(4, 96, 128, seed=3)
    frame_indices = np.array([0, 3, 7, 11])
    fps = 6.0
    conversation = [
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "How many chairs?"}]}
    ]
    text = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    reference = processor(
        text=[text],
        videos=[np.repeat(frames, 2, axis=0)],
        video_metadata=[
            VideoMetadata(total_num_frames=24, fps=fps, frames_indices=np.repeat(frame_indices, 2).tolist())
        ],
        do_sample_frames=False,
        do_resize=True,
        cap_pixels_per_frame=False,
        return_tensors="pt",
    )
    ours = video_inputs(frames, frame_indices / fps, VideoPreprocess.from_model_dir(tiny_dir))
    assert torch.equal(ours["video_grid_thw"], reference["video_grid_thw"])
    torch.testing.assert_close(ours["pixel_values_videos"], reference["pixel_values_videos"], rtol=0, atol=0)
    prompt = build_video_prompt(text, ours["video_grid_thw"][0], frame_indices / fps)
    ids = processor.tokenizer(prompt, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, reference["input_ids"])
    video_id = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert torch.equal((ids == video_id).long() * 2, reference["mm_token_type_ids"].long())
