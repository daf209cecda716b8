"""Teacher throughput: the optimised precompute path of VGGT against a reference-style forward.

Runs a random-initialised VGGT (VGGT-1B sizes by default; weights cannot be downloaded here, and
speed does not depend on their values) at 504x392 on clips of 8, 16 and 32 frames and reports, per
path and clip length: frames/s, peak device memory, achieved TFLOP/s (FLOPs counted from the
architecture by `bench/flops.py`), and the aggregator's achieved rate as a fraction of the device's
measured bf16 matmul rate (a large `torch.matmul` loop in the same run).

Paths, measured one after the other with only that path's model resident:
- optimised (the precompute's): camera and depth heads, only the distilled layers (4, 11, 17, 23)
  retained, bf16 autocast with the matmul weights stored in bf16 and the DPT head under the autocast
  (camera head and the DPT head's last 1x1 conv in fp32), DPT head in chunks of 8 frames, several
  clips per call (`--frames-per-call`, 64: 8 clips of 8, 4 of 16, 2 of 32), optionally compiled
  blocks; once per attention kernel of `--attention` (default on a GPU: sdpa, cudnn, and xformers
  when installed). The comparison takes the fastest kernel per clip length and names it.
- reference-style (as the official `VGGT.forward`): float32 weights, all 24 aggregator layers kept
  (float32), camera, depth and point heads in fp32, bf16 autocast for the aggregator, PyTorch's SDPA
  kernel choice, one clip per call. The tracking head is not run: it needs query points, and the
  official forward skips it without them.
- labeler (optional, `--labeler`): `TeacherLabeler.label` end to end on uint8 640x480 clips, i.e.
  the optimised path plus host-side resizing, 2x2 pooling of features and depth, and the copy of
  the labels to the host (no metric model).

Usage on a GPU machine:  python bench/teacher_throughput.py            (writes bench/results/teacher_throughput.json)
CPU smoke run:            python bench/teacher_throughput.py --tiny     (tiny sizes, 112x84, 2 and 4 frames)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import platform
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from geovr.pipeline.config import TeacherConfig
from geovr.pipeline.labeler import TeacherLabeler
from geovr.teachers.vggt import VGGT, VGGTConfig
from geovr.teachers.vggt_layers import ATTENTION_BACKENDS, xformers_available

BENCH = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("vggt_flops", BENCH / "flops.py")
flops = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(flops)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on CPU (smoke run)")
    parser.add_argument("--config", type=Path, help="a VGGT config.json (default: VGGT-1B sizes)")
    parser.add_argument("--frames", type=int, nargs="+", help="clip lengths (default 8 16 32; tiny: 2 4)")
    parser.add_argument("--size", default=None, help="WxH teacher image (default 504x392; tiny: 112x84)")
    parser.add_argument("--frames-per-call", type=int, help="optimised path: frames per forward (64; tiny 8)")
    parser.add_argument(
        "--layers", type=int, nargs="+", help="optimised path: kept layers (default: dpt_layers)"
    )
    parser.add_argument(
        "--attention",
        choices=ATTENTION_BACKENDS,
        nargs="+",
        help="optimised path: attention kernels to measure (GPU default: sdpa cudnn [xformers]; CPU: sdpa)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    parser.add_argument("--iters", type=int, default=3, help="timed calls per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before each measurement")
    parser.add_argument(
        "--matmul-size", type=int, default=None, help="n of the n x n x n bf16 matmul (8192; tiny 512)"
    )
    parser.add_argument("--labeler", action="store_true", help="also time TeacherLabeler.label end to end")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    return parser.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class AggregatorTimer:
    """Time spent inside `model.aggregator` (CUDA events on a GPU, wall clock on CPU)."""

    def __init__(self, model: VGGT, device: torch.device) -> None:
        self.device = device
        self.spans: list[tuple] = []
        self._start = None
        self.handles = [
            model.aggregator.register_forward_pre_hook(self._pre),
            model.aggregator.register_forward_hook(self._post),
        ]

    def _mark(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _pre(self, *_):
        self._start = self._mark()

    def _post(self, *_):
        self.spans.append((self._start, self._mark()))

    def seconds(self) -> float:
        sync(self.device)
        if self.device.type == "cuda":
            return sum(start.elapsed_time(end) for start, end in self.spans) / 1000.0
        return sum(end - start for start, end in self.spans)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@contextmanager
def peak_memory(device: torch.device):
    """Yields a dict that holds the peak allocated device memory (GiB) of the block; None on CPU."""
    result = {"peak_gib": None}
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    yield result
    if device.type == "cuda":
        sync(device)
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30


def matmul_tflops(device: torch.device, n: int, iters: int = 20) -> float:
    """Measured bf16 matmul rate of the device: n x n x n products, TFLOP/s."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        torch.matmul(a, b)
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        torch.matmul(a, b)
    sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e12


def build_model(cfg: VGGTConfig, heads: tuple[str, ...], device: torch.device, seed: int = 0) -> VGGT:
    """A random-initialised VGGT, initialised directly on `device` (1.2B parameters init fast on a GPU)."""
    torch.manual_seed(seed)
    with device:
        model = VGGT(cfg, heads=heads)
    return model.eval().requires_grad_(False)


def measure(
    model: VGGT,
    cfg: VGGTConfig,
    device: torch.device,
    frames: int,
    clips_per_call: int,
    size_hw: tuple[int, int],
    return_layers: tuple[int, ...],
    heads: tuple[str, ...],
    args: argparse.Namespace,
    matmul_rate: float,
) -> dict:
    """Time `iters` forward passes of (clips_per_call, frames) clips; FLOP rates from the architecture."""
    height, width = size_hw
    images = torch.rand(clips_per_call, frames, 3, height, width, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    with torch.inference_mode(), autocast:
        for _ in range(args.warmup):
            model(images, return_layers=return_layers)
        timer = AggregatorTimer(model, device)
        with peak_memory(device) as memory:
            sync(device)
            start = time.perf_counter()
            for _ in range(args.iters):
                out = model(images, return_layers=return_layers)
                del out
            sync(device)
            seconds = time.perf_counter() - start
        aggregator_seconds = timer.seconds()
        timer.close()
    count = flops.vggt_flops(cfg, frames, height, width, heads)
    calls = args.iters
    total_frames = calls * clips_per_call * frames
    aggregator_tflops = count["aggregator"] * clips_per_call * calls / aggregator_seconds / 1e12
    return {
        "frames": frames,
        "clips_per_call": clips_per_call,
        "calls": calls,
        "kept_layers": len(return_layers),
        "heads": list(heads),
        "frames_per_s": total_frames / seconds,
        "seconds_per_call": seconds / calls,
        "peak_memory_gib": memory["peak_gib"],
        "tflop_per_frame": count["total"] / frames / 1e12,
        "tflops": count["total"] * clips_per_call * calls / seconds / 1e12,
        "aggregator_seconds_per_call": aggregator_seconds / calls,
        "aggregator_share_of_time": aggregator_seconds / seconds,
        "aggregator_tflops": aggregator_tflops,
        "aggregator_fraction_of_matmul": aggregator_tflops / matmul_rate,
    }


def measure_labeler(
    model_cfg: VGGTConfig,
    device: torch.device,
    frame_counts: list[int],
    args: argparse.Namespace,
    size_hw: tuple[int, int],
    attention: str,
) -> list[dict]:
    """`TeacherLabeler.label` end to end on uint8 clips whose teacher size is `size_hw`."""
    height, width = size_hw
    model = build_model(model_cfg, ("camera", "depth"), torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{tmp}/model.safetensors")
        config = dataclasses.asdict(model_cfg) | {"heads": ["camera", "depth"]}
        Path(tmp, "config.json").write_text(json.dumps(config))
        del model
        labeler = TeacherLabeler(
            TeacherConfig(
                checkpoint=Path(tmp),
                image_long_side=width,
                feature_layers=tuple(args.layers or model_cfg.dpt_layers),
                dtype="bfloat16",
                attention=attention,
                dpt_head_autocast=True,
                compile=args.compile,
                max_frames_per_call=args.frames_per_call,
            ),
            device,
        )
    # Source frames 640 pixels wide (640x480 for 504x392) so that host resizing is included.
    source_hw = (round(height * 640 / width), 640)
    rng = np.random.default_rng(0)
    results = []
    for frames in frame_counts:
        clips_per_call = max(1, args.frames_per_call // frames)
        clips = [rng.integers(0, 256, (frames, *source_hw, 3), dtype=np.uint8) for _ in range(clips_per_call)]
        for _ in range(args.warmup):
            labeler.label(clips)
        with peak_memory(device) as memory:
            start = time.perf_counter()
            for _ in range(args.iters):
                labels = labeler.label(clips)
            seconds = time.perf_counter() - start
        assert labels[0].teacher_hw == (height, width), labels[0].teacher_hw
        results.append(
            {
                "attention": attention,
                "frames": frames,
                "clips_per_call": clips_per_call,
                "source_hw": list(source_hw),
                "frames_per_s": args.iters * clips_per_call * frames / seconds,
                "peak_memory_gib": memory["peak_gib"],
            }
        )
    del labeler
    return results


def main() -> None:
    args = parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    if args.config is not None:
        cfg = VGGTConfig.from_json(args.config)
    else:
        cfg = VGGTConfig.tiny() if args.tiny else VGGTConfig.vggt_1b()
    frame_counts = args.frames or ([2, 4] if args.tiny else [8, 16, 32])
    width, height = (int(v) for v in (args.size or ("112x84" if args.tiny else "504x392")).split("x"))
    kept = tuple(args.layers or cfg.dpt_layers)
    args.frames_per_call = args.frames_per_call or (8 if args.tiny else 64)
    matmul_n = args.matmul_size or (512 if args.tiny else 8192)
    out_path = args.out or BENCH / "results" / (
        "teacher_throughput_tiny_cpu.json" if args.tiny else "teacher_throughput.json"
    )

    matmul_rate = matmul_tflops(device, matmul_n)
    print(f"device {device}: bf16 matmul {matmul_n}^3: {matmul_rate:.1f} TFLOP/s")

    attentions = args.attention or (
        ["sdpa", "cudnn"] + (["xformers"] if xformers_available() else [])
        if device.type == "cuda"
        else ["sdpa"]
    )
    runs = []
    optimised_heads = ("camera", "depth")
    model = build_model(cfg, optimised_heads, device)
    for attention in attentions:
        model.set_inference_options(
            attention=attention,
            dpt_frame_chunk=8,
            compile=args.compile,
            dpt_head_autocast=True,
            matmul_weights="bfloat16",
        )
        for frames in frame_counts:
            clips_per_call = max(1, args.frames_per_call // frames)
            run = measure(
                model,
                cfg,
                device,
                frames,
                clips_per_call,
                (height, width),
                kept,
                optimised_heads,
                args,
                matmul_rate,
            )
            runs.append({"path": "optimised", "attention": attention, **run})
            print(_line(runs[-1]))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    reference_heads = ("camera", "depth", "point")
    model = build_model(cfg, reference_heads, device)
    model.set_inference_options(attention="sdpa", dpt_frame_chunk=8)
    all_layers = tuple(range(cfg.depth))
    for frames in frame_counts:
        run = measure(
            model, cfg, device, frames, 1, (height, width), all_layers, reference_heads, args, matmul_rate
        )
        runs.append({"path": "reference", "attention": "sdpa", **run})
        print(_line(runs[-1]))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    comparison = {}
    for frames in frame_counts:
        opt = max(
            (r for r in runs if r["path"] == "optimised" and r["frames"] == frames),
            key=lambda r: r["frames_per_s"],
        )
        ref = next(r for r in runs if r["path"] == "reference" and r["frames"] == frames)
        comparison[str(frames)] = {
            "optimised_attention": opt["attention"],
            "speedup_frames_per_s": opt["frames_per_s"] / ref["frames_per_s"],
            "peak_memory_ratio": (
                opt["peak_memory_gib"] / ref["peak_memory_gib"]
                if opt["peak_memory_gib"] is not None
                else None
            ),
            "optimised_aggregator_fraction_of_matmul": opt["aggregator_fraction_of_matmul"],
        }
        print(
            f"S={frames}: optimised ({opt['attention']}) / reference frames/s "
            f"x{comparison[str(frames)]['speedup_frames_per_s']:.2f}"
        )
    fastest = comparison[str(max(frame_counts))]["optimised_attention"]

    labeler_runs = (
        measure_labeler(cfg, device, frame_counts, args, (height, width), fastest) if args.labeler else None
    )

    result = {
        "benchmark": "teacher_throughput",
        "weights": "random-initialised (speed does not depend on weight values)",
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "model_config": dataclasses.asdict(cfg),
        "image_wh": [width, height],
        "attention": attentions,
        "compile": args.compile,
        "frames_per_call": args.frames_per_call,
        "matmul": {"n": matmul_n, "dtype": "bfloat16", "tflops": matmul_rate},
        "runs": runs,
        "optimised_vs_reference": comparison,
        "labeler": labeler_runs,
        "notes": [
            "FLOPs: matmuls, convolutions and attention products counted from the architecture (bench/flops.py).",
            "optimised: bf16 matmul weights, DPT head under bf16 autocast (last 1x1 conv and activations fp32), "
            "camera head fp32; one run per attention kernel, the comparison takes the fastest.",
            "reference: float32 weights, all layers kept, camera+depth+point heads in fp32, one clip per call; "
            "track head not run (it needs query points).",
            "peak memory: torch.cuda.max_memory_allocated during the timed calls, this path's model only.",
        ],
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_path}")


def _line(run: dict) -> str:
    memory = f"{run['peak_memory_gib']:.1f} GiB" if run["peak_memory_gib"] is not None else "n/a"
    return (
        f"{run['path']:>9} [{run['attention']:>8}] S={run['frames']:>2} B={run['clips_per_call']}: "
        f"{run['frames_per_s']:8.1f} frames/s, "
        f"peak {memory}, {run['tflops']:.1f} TFLOP/s, aggregator {run['aggregator_tflops']:.1f} TFLOP/s "
        f"({100 * run['aggregator_fraction_of_matmul']:.0f}% of matmul)"
    )


if __name__ == "__main__":
    main()
