"""A tiny random Qwen3-VL checkpoint written locally, for CPU tests and the demo.

`write_tiny_qwen3vl(dir)` writes a directory laid out like a real Qwen3-VL checkpoint
(`Qwen/Qwen3-VL-2B-Instruct`), with the real conventions kept where they matter to the pipeline
(16-pixel patches, 2x2 spatial merge, temporal patch 2, DeepStack, M-RoPE, tied embeddings,
the Qwen special tokens and chat template) and every size shrunk:

    config.json                       Qwen3VLConfig: text 4 layers x 64, vision 2 blocks x 32 (DeepStack at block 0)
    model.safetensors                 random weights (seeded)
    generation_config.json
    tokenizer.json, tokenizer_config.json, chat_template.jinja
                                      byte-level BPE trained here on a small built-in corpus (about 700 tokens)
                                      plus the Qwen special tokens <|endoftext|>, <|im_start|>, <|im_end|>,
                                      <|vision_start|>, <|vision_end|>, <|image_pad|>, <|video_pad|>
    preprocessor_config.json          image processor settings (patch 16, merge 2, mean/std 0.5)
    video_preprocessor_config.json    video processor settings (same, fps 2)
    processor_config.json             {"processor_class": "Qwen3VLProcessor"}

Nothing is downloaded: `Qwen3VLForConditionalGeneration.from_pretrained(dir)` and
`AutoTokenizer.from_pretrained(dir)` load it offline with no missing or unexpected keys.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3VLConfig, Qwen3VLForConditionalGeneration

from geovr.teacher_cache.frames import encode_jpeg
from geovr.teacher_cache.geometry import encode_pose
from geovr.teacher_cache.schema import ClipLabels

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen-style chat template: string content or a list of {"type": "video"|"image"|"text"} items; the
# video item renders as <|vision_start|><|video_pad|><|vision_end|> as in Qwen3-VL's own template.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_CORPUS_LINES = (
    "These are frames of a video.",
    "Please answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "Options: A. B. C. D.",
    "How many chairs are in this room? What is the length of the longest dimension of the table?",
    "What is the size of this room in square meters? Measuring from the closest point of each object,",
    "which of these objects is the closest to the sofa? If I am standing by the bed and facing the door,",
    "is the lamp to my left, right, or back? What will be the first-time appearance order of the following",
    "categories in the video: chair, table, sofa, bed, lamp, door, window, cabinet, shelf, tv, desk, box?",
    "How far is the couch from the refrigerator in meters? The answer is yes no left right front back.",
    "the a an of to in on at by for with from and or not is are was were be this that these those it",
    "one two three four five six seven eight nine ten zero meter meters centimeters cm m room object",
    "user assistant system question answer video frame frames seconds second camera depth scale size",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 0.5 1.0 1.5 2.0 2.5 3.0 <0.0 seconds> <0.5 seconds> <12.5 seconds>",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ . , ; : ! ? ' \" ( ) [ ] - + * / = % < >",
)


def build_tiny_tokenizer(vocab_size: int = 640) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `_CORPUS_LINES` (deterministic), with Qwen's special tokens
    after the learned vocabulary, `<|im_end|>` as eos and `<|endoftext|>` as pad (as Qwen3-VL-Instruct)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(list(_CORPUS_LINES) * 4, trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def tiny_qwen3vl_config(tokenizer: PreTrainedTokenizerFast) -> Qwen3VLConfig:
    """Qwen3-VL-2B's architecture with every size shrunk; token ids taken from `tokenizer`.

    Text: 4 layers of width 64 (4 heads of 16, 2 KV heads, M-RoPE sections [4, 2, 2] interleaved).
    Vision: 2 blocks of width 32, patch 16, spatial merge 2, temporal patch 2, DeepStack after block 0.
    Four text layers map the teacher layers [4, 11, 17, 23] to the distinct hidden states [1, 2, 3, 4].
    """
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "mrope_section": [4, 2, 2],
            "mrope_interleaved": True,
        },
        "tie_word_embeddings": True,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision_config = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "in_channels": 3,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": 64,
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": [0],
        "hidden_act": "gelu_pytorch_tanh",
    }
    return Qwen3VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def _processor_files(mean_std: float = 0.5) -> dict[str, dict]:
    """The processor json files of a Qwen3-VL checkpoint (values as in Qwen3-VL-2B-Instruct)."""
    common = {
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [mean_std] * 3,
        "image_std": [mean_std] * 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "resample": 3,
        "processor_class": "Qwen3VLProcessor",
    }
    return {
        "preprocessor_config.json": {
            **common,
            "size": {"longest_edge": 16777216, "shortest_edge": 65536},
            "image_processor_type": "Qwen2VLImageProcessorFast",
        },
        "video_preprocessor_config.json": {
            **common,
            "size": {"longest_edge": 25165824, "shortest_edge": 4096},
            "fps": 2,
            "min_frames": 4,
            "max_frames": 768,
            "do_sample_frames": False,
            "video_processor_type": "Qwen3VLVideoProcessor",
        },
        "processor_config.json": {"processor_class": "Qwen3VLProcessor"},
    }


def write_tiny_qwen3vl(directory: str | Path, seed: int = 0) -> Path:
    """Write the tiny random Qwen3-VL checkpoint described in the module docstring to `directory`.

    The same seed writes the same weights and tokenizer. Returns the directory.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    config = tiny_qwen3vl_config(tokenizer)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for name, data in _processor_files().items():
        (out / name).write_text(json.dumps(data, indent=2) + "\n")
    return out


def tiny_clip_labels(
    seed: int,
    num_frames: int,
    frame_hw: tuple[int, int] = (64, 96),
    teacher_hw: tuple[int, int] = (56, 84),
    num_layers: int = 4,
    channels: int = 32,
    scale_valid: bool = True,
) -> ClipLabels:
    """Random teacher labels of one clip, shaped as precompute writes them, for student tests.

    Student frames at `frame_hw` (multiples of 32), a teacher image of `teacher_hw` (multiples of 28):
    depth at half of it, pooled features at a 28th of it; cameras are random rigid poses with a
    pinhole of focal 60 px, and `pose_enc` is their VGGT encoding; `meta["teacher_size"]` = [W, H].
    """
    rng = np.random.default_rng(seed)
    angles = torch.tensor(rng.normal(scale=0.2, size=(num_frames, 3)))
    skew = torch.zeros(num_frames, 3, 3, dtype=torch.float64)
    skew[:, 0, 1], skew[:, 0, 2], skew[:, 1, 2] = -angles[:, 2], angles[:, 1], -angles[:, 0]
    rotation = torch.linalg.matrix_exp(skew - skew.transpose(1, 2))
    extrinsic = torch.cat((rotation, torch.tensor(rng.normal(size=(num_frames, 3, 1)))), -1)
    height, width = teacher_hw
    pinhole = [[60.0, 0.0, width / 2], [0.0, 60.0, height / 2], [0.0, 0.0, 1.0]]
    intrinsic = torch.tensor(pinhole, dtype=torch.float64).expand(num_frames, 3, 3)
    depth_hw = (height // 2, width // 2)
    pixels = rng.integers(0, 256, (num_frames, *frame_hw, 3), dtype=np.uint8)
    return ClipLabels(
        clip_id=f"clip{seed:03d}",
        video=f"scene{seed}.mp4",
        frame_indices=np.arange(num_frames, dtype=np.int64) * 15,
        timestamps=np.arange(num_frames, dtype=np.float64) * 0.5,
        frames_jpeg=[encode_jpeg(f) for f in pixels],
        pose_enc=encode_pose(extrinsic, intrinsic, teacher_hw).float().numpy(),
        extrinsic=extrinsic.float().numpy(),
        intrinsic=intrinsic.float().numpy(),
        depth=rng.uniform(0.5, 4.0, (num_frames, *depth_hw)).astype(np.float32),
        depth_conf=rng.uniform(1.0, 5.0, (num_frames, *depth_hw)).astype(np.float32),
        scale=float(rng.uniform(1.0, 3.0)) if scale_valid else float("nan"),
        scale_valid=scale_valid,
        features=rng.normal(size=(num_frames, num_layers, height // 28, width // 28, channels)).astype(
            np.float32
        ),
        meta={"teacher_size": [width, height]},
    )
