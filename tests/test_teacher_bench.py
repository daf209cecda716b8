"""The teacher benchmark: its analytic FLOP count against torch's counter, and a CPU smoke run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from geovr.teachers.vggt import VGGT, VGGTConfig
from tests.conftest import REFERENCE, REPO

_spec = importlib.util.spec_from_file_location("vggt_flops", REPO / "bench" / "flops.py")
flops = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(flops)


@pytest.mark.parametrize(
    ("reference", "batch", "frames", "height", "width"), [("tiny-a", 1, 3, 42, 56), ("tiny-b", 2, 4, 84, 70)]
)
def test_analytic_flops_equal_torch_flop_counter(reference, batch, frames, height, width):
    cfg = VGGTConfig.from_json(REFERENCE / "vggt" / reference / "config.json")
    heads = ("camera", "depth", "point")
    torch.manual_seed(0)
    model = VGGT(cfg, heads=heads).eval().requires_grad_(False)
    images = torch.rand(batch, frames, 3, height, width)
    # The math SDPA backend is made of counted matmuls (the fused CPU kernel is not counted).
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False, depth=3) as counter:
        model(images)
    measured = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    analytic = flops.vggt_flops(cfg, frames, height, width, heads)
    for part, module in (
        ("patch_embed", "VGGT.aggregator.patch_embed"),
        ("aggregator", "VGGT.aggregator"),
        ("camera_head", "VGGT.camera_head"),
        ("depth_head", "VGGT.depth_head"),
        ("point_head", "VGGT.point_head"),
        ("total", "Global"),
    ):
        assert batch * analytic[part] == measured[module], part


def test_vggt_1b_flops_grow_with_clip_length_only_in_global_attention():
    cfg = VGGTConfig.vggt_1b()
    per_frame = {s: {k: v / s for k, v in flops.vggt_flops(cfg, s, 392, 504).items()} for s in (8, 32)}
    for part in ("patch_embed", "frame_blocks", "camera_head", "depth_head"):
        assert per_frame[8][part] == pytest.approx(per_frame[32][part], rel=0.01), part
    assert per_frame[32]["global_blocks"] > 2 * per_frame[8]["global_blocks"]
    assert per_frame[8]["point_head"] == 0.0


def test_throughput_bench_smoke_run_on_cpu(tmp_path):
    out = tmp_path / "throughput.json"
    command = [sys.executable, str(REPO / "bench" / "teacher_throughput.py"), "--tiny", "--labeler"]
    command += ["--frames", "2", "--iters", "1", "--warmup", "0", "--matmul-size", "64", "--out", str(out)]
    subprocess.run(command, check=True, cwd=REPO, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert result["device"].startswith("cpu") and result["image_wh"] == [112, 84]
    paths = {(run["path"], run["frames"]): run for run in result["runs"]}
    assert set(paths) == {("optimised", 2), ("reference", 2)}
    assert paths[("optimised", 2)]["clips_per_call"] == 4 and paths[("reference", 2)]["clips_per_call"] == 1
    assert paths[("optimised", 2)]["kept_layers"] == 4 and paths[("reference", 2)]["heads"][-1] == "point"
    for run in result["runs"]:
        assert run["frames_per_s"] > 0 and run["tflops"] > 0 and run["peak_memory_gib"] is None
    assert result["labeler"][0]["frames_per_s"] > 0
