"""`geovr-pipeline demo` end to end at reduced size (CLI subprocess: its own Ray cluster on loopback),
plus its pieces that need no run: the tiny teacher writer and the output-directory guard.

The full-size demo (`make demo`) is run by hand; its wall time and figures are in the report of
the change that added it.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

CLI = str(Path(sys.executable).with_name("geovr-pipeline"))
# Reduced settings: 2 training scenes and 1 held-out scene of 4 frames at 128x96 (2 s at the
# preset's 2 fps; the tiny sampling keeps all 4), 12 optimizer steps, a few questions.
SMALL = [
    "--train-scenes", "2", "--heldout-scenes", "1", "--frames", "4", "--steps", "12",
    "--set", "demo.width=128", "--set", "demo.height=96", "--set", "demo.questions_per_type=1",
    "--set", "demo.heldout_rows_per_clip=2", "--set", "demo.vsibench_limit=6",
]  # fmt: skip
STAGES = [
    "corpus",
    "models",
    "questions",
    "index",
    "precompute",
    "train",
    "export",
    "eval",
    "inspect",
    "report",
]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", COLUMNS="160")
    return subprocess.run([CLI, *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "out"
    result = run_cli("demo", "--out", str(out), *SMALL)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    for i, name in enumerate(STAGES, start=1):  # progress: one rule line per stage, then its time
        assert f"[{i}/10] {name}" in result.stdout
        assert re.search(rf"{name} done in \d+\.\d s", result.stdout)
    return out


def finite(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x)


@pytest.mark.slow
def test_summary_has_measured_heldout_losses_and_depth_baselines(demo_out: Path) -> None:
    summary = json.loads((demo_out / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == STAGES
    assert all(finite(s["seconds"]) and s["seconds"] >= 0 for s in summary["stages"])
    assert summary["wall_s"] >= sum(s["seconds"] for s in summary["stages"]) - 1e-6
    assert summary["config"]["steps"] == 12 and summary["config"]["train_scenes"] == 2

    losses = summary["heldout_losses"]
    assert summary["preset"] == "tiny-geovr-spatialsv"  # GeoVR's four objectives and the point map
    for name in ("camera", "depth", "scale", "distill", "point_map"):
        entry = losses[name]
        assert entry["measured"] is True
        assert (
            finite(entry["before"]) and finite(entry["after"]) and entry["before"] > 0 and entry["after"] > 0
        )
        assert entry["reduction"] == pytest.approx(1 - entry["after"] / entry["before"])
        assert entry["target_met"] == (entry["reduction"] >= 0.30)
    for when in ("parts_before", "parts_after"):
        assert set(losses["camera"][when]) == {"translation", "rotation", "fov"}
        assert all(finite(v) and v >= 0 for v in losses["camera"][when].values())
    # Measured, not copied: training changed the student, so its held-out losses moved.
    assert any(losses[n]["after"] != losses[n]["before"] for n in ("camera", "depth", "distill", "point_map"))
    assert summary["all_targets_met"] == all(
        losses[n]["target_met"] for n in ("camera", "depth", "scale", "distill", "point_map")
    )
    geometry = summary["geometry"]["metrics"]
    assert all(finite(geometry[k]) and geometry[k] >= 0 for k in ("point_map_error", "recon_chamfer"))
    assert 0 <= geometry["recon_fscore@0.05"] <= 1

    predictors = summary["depth_abs_rel"]["predictors"]
    assert set(predictors) == {
        "student_before",
        "student_after",
        "constant_train_mean",
        "train_mean_depth_map",
    }
    for values in predictors.values():
        assert all(finite(values[k]) for k in ("abs_rel_aligned", "delta1_aligned", "abs_rel_raw"))

    # The constant predictor, recomputed here from the held-out store: median-aligned per frame it is
    # the frame's teacher median, so its AbsRel is mean |median - d| / d over each clip's pixels.
    from geovr.teacher_cache.store import open_store

    reader = open_store(demo_out / "store-heldout")
    per_clip = []
    for clip_id in reader.clip_ids():
        depth = reader.read_clip(clip_id).depth.astype(np.float64)
        errors = np.concatenate([np.abs(np.median(d) - d).ravel() / d.ravel() for d in depth])
        per_clip.append(errors.mean())
    assert predictors["constant_train_mean"]["abs_rel_aligned"] == pytest.approx(np.mean(per_clip), rel=1e-6)
    # The tiny teacher's depth varies over each image, so the constant is not trivially perfect.
    assert predictors["constant_train_mean"]["abs_rel_aligned"] > 0.05
    assert summary["geometry"]["metrics"]["depth_abs_rel"] == pytest.approx(
        predictors["student_after"]["abs_rel_aligned"], rel=1e-5
    )


@pytest.mark.slow
def test_report_figures_point_clouds_and_export(demo_out: Path) -> None:
    from geovr.eval.inspect import read_ply

    report = (demo_out / "report.md").read_text()
    assert "tiny and random-initialised" in report
    assert "Qwen3-VL-2B-Instruct" in report and "VGGT-1B" in report and "--teacher /models/VGGT-1B" in report
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    expected = {"figures/heldout_losses.png", "figures/training_losses.png", "inspect/depth_panels.png"}
    assert expected | {"inspect/reconstruction.png"} <= set(images)
    for relative in images:
        assert not Path(relative).is_absolute()
        with Image.open(demo_out / relative) as image:
            assert image.format == "PNG" and min(image.size) > 100

    plys = re.findall(r"\]\((inspect/[^)]+\.ply)\)", report)
    assert set(plys) == {"inspect/points_teacher.ply", "inspect/points_student.ply"}
    for relative in plys:
        points, colors = read_ply(demo_out / relative)
        assert points.shape[0] > 100 and points.shape == colors.shape
        assert np.isfinite(points).all()

    from transformers import Qwen3VLForConditionalGeneration

    export = demo_out / "export"
    assert not (export / "geovr_heads.safetensors").exists()
    model = Qwen3VLForConditionalGeneration.from_pretrained(export, local_files_only=True)
    assert model.num_parameters() == json.loads((export / "geovr_export.json").read_text())["parameters"]

    vsibench = json.loads((demo_out / "eval" / "vsibench" / "summary.json").read_text())
    questions = len((demo_out / "vsibench" / "test.jsonl").read_text().splitlines())
    assert vsibench["num_scored"] + vsibench["num_errors"] == min(6, questions) > 0


@pytest.mark.slow
def test_stores_verify_and_heldout_clips_are_unseen(demo_out: Path) -> None:
    from geovr.teacher_cache.schema import clip_id_for
    from geovr.teacher_cache.store import open_store
    from geovr.teacher_cache.verify import verify_store

    assert verify_store(demo_out / "store").ok and verify_store(demo_out / "store-heldout").ok
    store, heldout = open_store(demo_out / "store"), open_store(demo_out / "store-heldout")
    assert heldout.fingerprint == store.fingerprint
    assert set(heldout.clip_ids()) < set(store.clip_ids())
    sampling = store.fingerprint.sampling
    trained_on = {
        clip_id_for(json.loads(line)["video"], sampling)
        for line in (demo_out / "qa" / "train.jsonl").read_text().splitlines()
    }
    assert trained_on and not trained_on & set(heldout.clip_ids())
    for clip_id in heldout.clip_ids():  # copied as encoded: identical labels
        assert np.array_equal(store.read_clip(clip_id).depth, heldout.read_clip(clip_id).depth)
    benchmark = [json.loads(line) for line in (demo_out / "vsibench" / "test.jsonl").read_text().splitlines()]
    scenes = {r["scene_name"] for r in benchmark}
    assert scenes == {"scene_0002"}  # the held-out scene only, with its video
    assert (demo_out / "vsibench" / "synthetic" / "scene_0002.mp4").is_file()


@pytest.mark.slow
def test_demo_trains_on_ground_truth_and_reports_it(demo_out: Path) -> None:
    """The training store holds the scenes' ground truth (teacher features), the teacher's labels are
    scored against it, the student is scored against it, and VSI-Bench gets its frequency baseline."""
    from geovr.corpus.ground_truth import clip_frames, ground_truth_labels
    from geovr.corpus.rgbd import read_rgbd, rgbd_dir_for
    from geovr.teacher_cache.store import open_store

    summary = json.loads((demo_out / "summary.json").read_text())
    assert summary["label_sources"] == {"depth": "gt", "camera": "gt", "scale": "gt"}
    store = open_store(demo_out / "store")
    assert store.fingerprint.preprocess["ground_truth"]["depth"] == "gt"
    precompute = next(s for s in summary["stages"] if s["name"] == "precompute")["outputs"]
    assert precompute["clips_ground_truth"] == 3 and precompute["clips_ground_truth_fallback"] == 0
    clip = store.read_clip(store.clip_ids()[0])
    truth = ground_truth_labels(
        read_rgbd(rgbd_dir_for(demo_out / "corpus" / clip.video)),
        clip_frames(clip.meta, clip.frame_indices, clip.timestamps, clip.depth.shape[1:]),
    )
    np.testing.assert_array_equal(clip.pose_enc, truth["pose_enc"])
    np.testing.assert_allclose(clip.depth, truth["depth"], rtol=2.0**-11 * 1.01)
    assert clip.scale == truth["scale"]
    teacher = open_store(demo_out / "store-teacher")
    assert np.array_equal(teacher.read_clip(clip.clip_id).features, clip.features)  # features: the teacher's

    quality = summary["teacher_label_quality"]
    assert quality["num_clips"] == 3 and quality["metrics"]["depth_abs_rel"] > 0.05  # a random teacher
    assert (demo_out / "eval" / "label-quality" / "label_quality.png").is_file()
    geometry = summary["geometry"]["metrics"]
    # the held-out store's labels are the ground truth: against it and against the labels agree
    assert geometry["gt_depth_abs_rel"] == pytest.approx(
        geometry["depth_abs_rel"], abs=2e-3
    )  # the depth codec
    assert set(summary["vsibench_frequency"]) >= {"overall"}
    report = (demo_out / "report.md").read_text()
    assert "The random teacher's labels against ground truth" in report and "chance (frequency)" in report


def test_tiny_vggt_is_seeded_and_has_usable_fov_and_depth(tmp_path: Path) -> None:
    from geovr.teachers.tiny import TINY_FOV, write_tiny_vggt
    from geovr.teachers.vggt import VGGT

    a, b = write_tiny_vggt(tmp_path / "a", seed=3), write_tiny_vggt(tmp_path / "b", seed=3)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    model = VGGT.from_pretrained(a)  # strict load: exactly the camera and depth heads
    torch.manual_seed(0)
    with torch.no_grad():
        out = model(torch.rand(2, 3, 3, 84, 112))
    fov = out["pose_enc"][..., 7:]
    assert (fov > 0.5 * TINY_FOV).all() and (fov < 1.5 * TINY_FOV).all() and fov.std() > 1e-3
    log_depth = out["depth"][..., 0].log()
    assert log_depth.std(dim=(-2, -1)).min() > 0.1  # varies over every image
    assert abs(float(log_depth.mean())) < 1.0


def test_demo_refuses_a_directory_it_did_not_write(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("not the demo's")
    result = run_cli("demo", "--out", str(out), timeout=120)
    assert result.returncode == 2
    assert "error:" in result.stderr and "not written by the demo" in result.stderr
    assert (out / "keep.txt").read_text() == "not the demo's"
