"""Student training throughput: cached teacher labels against the online teacher of the GeoVR code.

One run, one device, the real data path: a Zarr store of synthetic clips written by the store's
own writer, joined with a QA file, read by `student.data.TrainLoader` (DataLoader workers, pinned
memory) and fed to the trainer's own step (`student.training.step.accumulate_gradients`, bf16 autocast,
gradient checkpointing, AdamW over the two parameter groups, gradient clipping).

Student: a full-size random-initialised Qwen3-VL-2B-shaped GeoVR student (text 28 x 2048, vision
24 x 1024, vocabulary 151,936; config built here, nothing downloaded; the tokenizer is the tiny
local one of `student.tiny`, which changes token ids, not sequence lengths of the video), at GeoVR's
settings: 32 frames of 640x480 per clip (300 merged tokens a frame, each frame repeated twice),
per-GPU batch 2, gradient checkpointing.

Configurations, measured one after the other in the same process:
- cached: the student step alone (the labels come from the store).
- online: as the public GeoVR code, a full-size VGGT-1B (camera and depth heads, the 4 distilled
  layers returned) and a Depth-Anything-V2-Metric-Large-shaped model run inside every step, one
  sample at a time, under no_grad and bf16 autocast, before the student's forward. Their inputs are
  device tensors of the teachers' shapes (32 x 3 x 392 x 504 and 32 x 3 x 518 x 686): the teacher
  compute is paid in full, its CPU preprocessing is not (which favours the online configuration).

Reported per configuration: samples/s, seconds per step, MFU (student model FLOPs from the config,
`student.training.flops.qwen3vl_step_flops`, over the device's dense bf16 peak; teacher FLOPs are not
counted as useful work), data-wait fraction of the step time, peak device memory; and the ratio
of the samples/s. JSON to bench/results/.

Usage on a GPU machine:  python bench/train_throughput.py        (writes bench/results/train_throughput.json)
CPU smoke run:            python bench/train_throughput.py --tiny (tiny models, 4 frames of 64x64)
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from geovr.app.presets import load_section
from geovr.student.config import DataConfig, StudentConfig
from geovr.student.data import StudentSampleBuilder, TrainLoader, join_qa, student_collator
from geovr.student.model import GeoVRStudent
from geovr.student.tiny import build_tiny_tokenizer, tiny_qwen3vl_config, write_tiny_qwen3vl
from geovr.student.training.config import TrainConfig
from geovr.student.training.distributed import DistEnv
from geovr.student.training.flops import peak_flops_per_device
from geovr.student.training.optimizer import build_optimizer, clip_and_check
from geovr.student.training.step import accumulate_gradients
from geovr.teacher_cache.frames import encode_jpeg
from geovr.teacher_cache.schema import ClipLabels, StoreFingerprint, clip_id_for
from geovr.teacher_cache.store import open_store, open_writer
from geovr.teachers.vggt import VGGT, VGGTConfig

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLING = {"fps": 2.0, "min_frames": 4, "max_frames": 32, "method": "uniform"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run with tiny models and clips")
    parser.add_argument("--steps", type=int, default=10, help="measured optimizer steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps first")
    parser.add_argument("--batch", type=int, default=2, help="samples per step (per-GPU batch)")
    parser.add_argument("--clips", type=int, default=8, help="clips in the synthetic store")
    parser.add_argument("--workers", type=int, default=6, help="DataLoader workers")
    parser.add_argument("--configs", default="cached,online", help="comma-separated: cached, online")
    parser.add_argument("--store", type=Path, help="reuse (or create) the store here instead of a temp dir")
    parser.add_argument(
        "--out", type=Path, help="result JSON (default bench/results/train_throughput[_tiny_cpu].json)"
    )
    return parser.parse_args()


# ----------------------------------------------------------------------------------------------
# Sizes


def qwen3vl_2b_config(tokenizer):
    """Qwen3-VL-2B-Instruct's architecture (config values of the public checkpoint), token ids of
    the local tokenizer."""
    config = tiny_qwen3vl_config(tokenizer)
    text = config.text_config
    for key, value in {
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 262144,
    }.items():
        setattr(text, key, value)
    text.rope_parameters = {
        "rope_type": "default",
        "rope_theta": 5_000_000.0,
        "mrope_section": [24, 20, 20],
        "mrope_interleaved": True,
    }
    vision = config.vision_config
    for key, value in {
        "depth": 24,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_heads": 16,
        "out_hidden_size": 2048,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [5, 11, 17],
    }.items():
        setattr(vision, key, value)
    return config


def depth_anything_config(tiny: bool):
    """Depth-Anything-V2-Metric-Large's architecture (or a tiny one), metric head, 20 m."""
    from transformers import DepthAnythingConfig

    if tiny:
        backbone = {
            "hidden_size": 32,
            "num_hidden_layers": 4,
            "num_attention_heads": 2,
            "out_indices": [1, 2, 3, 4],
        }
        sizes = {"reassemble_hidden_size": 32, "neck_hidden_sizes": [8, 16, 32, 32], "fusion_hidden_size": 16}
    else:
        backbone = {
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "out_indices": [5, 12, 18, 24],
        }
        sizes = {
            "reassemble_hidden_size": 1024,
            "neck_hidden_sizes": [256, 512, 1024, 1024],
            "fusion_hidden_size": 256,
        }
    backbone.update(
        {"model_type": "dinov2", "image_size": 518, "patch_size": 14, "reshape_hidden_states": False}
    )
    return DepthAnythingConfig(
        backbone_config=backbone, depth_estimation_type="metric", max_depth=20, head_hidden_size=32, **sizes
    )


# ----------------------------------------------------------------------------------------------
# A real store of synthetic clips at GeoVR's sizes


def synthetic_frame(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth room-like image (gradient walls, a few boxes): realistic JPEG sizes, unlike noise."""
    y, x = np.mgrid[0:height, 0:width]
    base = rng.uniform(60, 200, 3)
    image = np.clip(
        base + 40 * np.sin(x[..., None] / width * 3 + rng.uniform(0, 6, 3)) - 0.1 * y[..., None], 0, 255
    )
    pil = Image.fromarray(image.astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(6):
        x0, y0 = rng.integers(0, width - 20), rng.integers(0, height - 20)
        w, h = rng.integers(10, width // 3), rng.integers(10, height // 3)
        draw.rectangle([x0, y0, x0 + w, y0 + h], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return np.asarray(pil)


def write_store(
    root: Path,
    clips: int,
    frames: int,
    size_hw: tuple[int, int],
    teacher_hw: tuple[int, int],
    feature_dim: int,
) -> list[str]:
    """A Zarr store of `clips` synthetic clips (labels with the teacher's shapes); returns the videos."""
    if (root / "store.json").exists():
        return sorted({c.video for c in open_store(root).iter_clips()})
    rng = np.random.default_rng(0)
    fingerprint = StoreFingerprint(
        teacher="bench-synthetic",
        checkpoint_sha256="0" * 64,
        teacher_config={"depth": 24 if feature_dim == 1024 else 4, "embed_dim": feature_dim},
        metric_teacher="",
        preprocess={"teacher_hw": list(teacher_hw)},
        sampling=SAMPLING,
        feature_layers=(4, 11, 17, 23) if feature_dim == 1024 else (0, 1, 2, 3),
    )
    writer = open_writer(root, fingerprint, "zarr")
    hd, wd = teacher_hw[0] // 2, teacher_hw[1] // 2
    fh, fw = teacher_hw[0] // 28, teacher_hw[1] // 28
    videos = []
    for index in range(clips):
        video = f"bench/scene_{index:04d}.mp4"
        extrinsic = np.tile(np.eye(3, 4, dtype=np.float32), (frames, 1, 1))
        extrinsic[:, :, 3] = rng.normal(size=(frames, 3)) * 0.1
        intrinsic = np.tile(
            np.array([[400.0, 0, teacher_hw[1] / 2], [0, 400.0, teacher_hw[0] / 2], [0, 0, 1]], np.float32),
            (frames, 1, 1),
        )
        pose = np.concatenate(
            [extrinsic[:, :, 3], np.tile([0, 0, 0, 1.0], (frames, 1)), np.full((frames, 2), 1.0)], 1
        )
        clip = ClipLabels(
            clip_id=clip_id_for(video, SAMPLING),
            video=video,
            frame_indices=np.arange(frames, dtype=np.int64) * 15,
            timestamps=np.arange(frames, dtype=np.float64) * 0.5,
            frames_jpeg=[encode_jpeg(synthetic_frame(rng, *size_hw)) for _ in range(frames)],
            pose_enc=pose.astype(np.float32),
            extrinsic=extrinsic,
            intrinsic=intrinsic,
            depth=rng.uniform(0.5, 5.0, (frames, hd, wd)).astype(np.float32),
            depth_conf=rng.uniform(1.0, 10.0, (frames, hd, wd)).astype(np.float32),
            scale=2.0,
            scale_valid=True,
            features=rng.normal(size=(frames, 4, fh, fw, feature_dim)).astype(np.float32),
            meta={"teacher_hw": list(teacher_hw)},
        )
        writer.write_shard(f"{index:06d}", [clip], [])
        videos.append(video)
    return videos


def write_qa(path: Path, videos: list[str]) -> Path:
    questions = ("How many chairs are in this room?", "What is the size of this room in square meters?")
    rows = [
        {
            "id": f"{v}#{i}",
            "video": v,
            "conversations": [{"from": "human", "value": f"<video>\n{q}"}, {"from": "gpt", "value": "4"}],
        }
        for v in videos
        for i, q in enumerate(questions)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------------------------
# The measured loop


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def online_teacher(tiny: bool, frames: int, device: torch.device):
    """GeoVR's online configuration: VGGT-1B and the metric depth model on each sample, no_grad."""
    from transformers import DepthAnythingForDepthEstimation

    with device:
        vggt = VGGT(VGGTConfig.tiny() if tiny else VGGTConfig.vggt_1b(), heads=("camera", "depth")).eval()
        metric = DepthAnythingForDepthEstimation(depth_anything_config(tiny)).eval()
    vggt.set_inference_options(attention="sdpa", dpt_frame_chunk=8)
    layers = (0, 1, 2, 3) if tiny else (4, 11, 17, 23)
    vggt_hw, metric_hw = ((56, 56), (56, 56)) if tiny else ((392, 504), (518, 686))
    vggt_in = torch.rand(1, frames, 3, *vggt_hw, device=device)
    metric_in = torch.rand(frames, 3, *metric_hw, device=device)

    def run(chunk) -> None:
        for _ in range(int(chunk.input_ids.shape[0])):  # one sample at a time, as the GeoVR code
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                vggt(vggt_in, return_layers=layers)
                metric(pixel_values=metric_in)

    return run, {
        "vggt_params": sum(p.numel() for p in vggt.parameters()),
        "metric_params": sum(p.numel() for p in metric.parameters()),
    }


def measure(name, student, loader, env, args, before_forward=None) -> dict:
    cfg = TrainConfig()
    groups = {g["name"]: g["params"] for g in student.param_groups()}
    optimizer = build_optimizer(groups, cfg, env.device)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    autocast = torch.bfloat16 if env.device.type == "cuda" else None
    peak = peak_flops_per_device(cfg, env.device)
    times, waits, flops, samples = [], [], [], []
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    for step in range(args.warmup + args.steps):
        sync(env.device)
        start = time.perf_counter()
        stats = accumulate_gradients(
            student, student.base.config, loader, env, 1, args.batch, autocast, before_forward
        )
        clip_and_check(params, cfg.grad_clip, stats.loss_sums["total"] / stats.samples, env)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(env.device)
        elapsed = time.perf_counter() - start
        print(
            f"{name} step {step}: {elapsed:.3f} s, data wait {stats.data_wait:.3f} s, loss {stats.loss_sums['total'] / stats.samples:.3f}",
            flush=True,
        )
        if step >= args.warmup:
            times.append(elapsed)
            waits.append(stats.data_wait)
            flops.append(stats.flops)
            samples.append(stats.samples)
    total = sum(times)
    result = {
        "samples_per_s": sum(samples) / total,
        "step_s_mean": total / len(times),
        "step_s_min": min(times),
        "data_wait_fraction": sum(waits) / total,
        "student_tflops_per_step": sum(flops) / len(flops) / 1e12,
        "mfu": sum(flops) / total / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(env.device) / 2**30
        if env.device.type == "cuda"
        else None,
        "measured_steps": len(times),
    }
    del optimizer
    return result


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    env = DistEnv(0, 1, 0, device)
    frames, size_hw, teacher_hw, feature_dim = (
        (4, (64, 64), (56, 56), 64) if args.tiny else (32, (480, 640), (392, 504), 1024)
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store_dir = args.store or tmp / "store"
        start = time.perf_counter()
        videos = write_store(store_dir, args.clips, frames, size_hw, teacher_hw, feature_dim)
        store_seconds = time.perf_counter() - start
        qa = write_qa(tmp / "qa.jsonl", videos)
        model_dir = write_tiny_qwen3vl(
            tmp / "tokenizer"
        )  # tokenizer and processor files (tiny weights unused)

        store = open_store(store_dir)
        data_cfg = DataConfig(
            access="random", micro_batch=args.batch, max_seq_len=16384, max_batch_tokens=32768,
            num_workers=args.workers, prefetch_factor=2, pin_memory=True,
        )  # fmt: skip
        samples, report = join_qa(qa, store, data_cfg)
        builder = StudentSampleBuilder(model_dir, data_cfg.max_seq_len, "error")
        loader = TrainLoader(
            samples, store, partial(open_store, store_dir), builder, student_collator(builder, data_cfg.max_batch_tokens),
            data_cfg, 0, 1, seed=0, device_is_cuda=device.type == "cuda",
        )  # fmt: skip

        torch.manual_seed(0)
        tokenizer = build_tiny_tokenizer()
        qwen_config = tiny_qwen3vl_config(tokenizer) if args.tiny else qwen3vl_2b_config(tokenizer)
        preset = "tiny" if args.tiny else "qwen3vl-2b-geovr"
        student_cfg = load_section(StudentConfig, "student", preset, base_model=str(model_dir))
        student_cfg = student_cfg.matched_to(store.fingerprint)
        from transformers import Qwen3VLForConditionalGeneration

        with device:
            student = GeoVRStudent(
                Qwen3VLForConditionalGeneration(qwen_config), student_cfg, source_dir=model_dir
            )
        student.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        student.train()
        results: dict = {
            "device": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"cpu ({platform.processor() or platform.machine()})",
            "tiny": args.tiny,
            "student_params": sum(p.numel() for p in student.parameters()),
            "student_trainable_params": sum(p.numel() for p in student.parameters() if p.requires_grad),
            "frames": frames,
            "frame_hw": list(size_hw),
            "per_gpu_batch": args.batch,
            "gradient_checkpointing": True,
            "autocast": "bfloat16" if device.type == "cuda" else "none (float32 on CPU)",
            "loader": {"workers": args.workers, "pin_memory": device.type == "cuda", "access": loader.access},
            "store": {"clips": args.clips, "write_s": store_seconds, "qa_samples": report.joined},
            "peak_tflops": (peak_flops_per_device(TrainConfig(), device) or 0) / 1e12 or None,
            "configs": {},
        }
        names = [c for c in args.configs.split(",") if c]
        for name in names:
            hook, extra = (None, {}) if name == "cached" else online_teacher(args.tiny, frames, device)
            results["configs"][name] = {**measure(name, student, loader, env, args, hook), **extra}
            del hook
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if {"cached", "online"} <= set(results["configs"]):
            c = results["configs"]
            results["cached_over_online_samples_per_s"] = (
                c["cached"]["samples_per_s"] / c["online"]["samples_per_s"]
            )
    out = args.out or RESULTS / ("train_throughput_tiny_cpu.json" if args.tiny else "train_throughput.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
