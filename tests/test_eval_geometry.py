"""Geometry metrics of the student heads, `eval geometry` and `inspect` on a real Zarr store.

The store holds synthetic-corpus clips labelled with their exact ground truth (depth in metres,
cameras relative to frame 0, metric scale 1), so the pictures and point clouds can be checked
against the scene: every unprojected point must lie inside the room box.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from typer.testing import CliRunner

from geovr.app import commands  # noqa: F401  (registers the CLI commands)
from geovr.app.cli import app
from geovr.app.presets import load_section
from geovr.corpus.config import SynthConfig
from geovr.corpus.synth import write_corpus
from geovr.eval.geometry_metrics import clip_metrics
from geovr.eval.inspect import camera_centers, read_ply
from geovr.eval.vsibench import read_video_frames
from geovr.student.config import StudentConfig
from geovr.student.metrics import depth_metrics, feature_cosine, pose_auc, relative_pose_errors
from geovr.student.model import GeoVRStudent
from geovr.student.tiny import write_tiny_qwen3vl
from geovr.teacher_cache.frames import encode_jpeg, resize_frames, student_frame_size
from geovr.teacher_cache.geometry import encode_pose, invert_extrinsic, relative_to_first, to_homogeneous
from geovr.teacher_cache.schema import ClipLabels, StoreFingerprint, clip_id_for
from geovr.teacher_cache.store import open_store, open_writer
from tests.helpers import clip_labels

SIZE = 56  # video = teacher image 56x56: depth at half resolution is 28x28 (a multiple of the shuffle 7)
FRAMES = 6
FEATURE_DIM = 16
FINGERPRINT = StoreFingerprint(
    teacher="ground-truth",
    checkpoint_sha256="00" * 32,
    teacher_config={"depth": 4, "embed_dim": FEATURE_DIM},
    metric_teacher="ground-truth",
    preprocess={"teacher_long_side": SIZE},
    sampling={"fps": 4.0, "min_frames": FRAMES, "max_frames": FRAMES},
    feature_layers=(0, 1, 2, 3),
)


def _rotation(axis: str, degrees: float) -> torch.Tensor:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return {
        "y": torch.tensor([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=torch.float64),
        "z": torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=torch.float64),
    }[axis]


def _random_cameras(frames: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(frames):
        rotation = _rotation("y", rng.uniform(-60, 60)) @ _rotation("z", rng.uniform(-10, 10))
        out.append(torch.cat([rotation, torch.tensor(rng.normal(size=(3, 1)))], -1))
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# Metric functions


def test_depth_metrics_after_median_alignment():
    rng = np.random.default_rng(0)
    target = rng.uniform(0.5, 5.0, (3, 10, 12))
    perfect = depth_metrics(target * 7.0, target)  # any per-frame scale is aligned away
    assert perfect["depth_abs_rel"] == pytest.approx(0.0, abs=1e-12) and perfect["depth_delta1"] == 1.0
    # scale the top quarter of each frame by 1.5: the medians do not move, so exactly those are 50 % off
    top = target > np.quantile(target, 0.75, axis=(1, 2), keepdims=True)
    noisy = np.where(top, 1.5 * target, target)
    result = depth_metrics(noisy, target)
    perturbed = float(top.mean())
    assert result["depth_abs_rel"] == pytest.approx(0.5 * perturbed)
    assert result["depth_delta1"] == pytest.approx(1 - perturbed)


def test_relative_pose_errors_and_auc():
    target = _random_cameras(5)
    rot, trans = relative_pose_errors(target, target)
    assert rot.shape == (10,) and np.allclose(rot, 0, atol=1e-5) and np.allclose(trans, 0, atol=1e-5)
    assert pose_auc(rot, trans) == 1.0
    # the same cameras in another world frame and unit: relative poses are unchanged
    world = torch.eye(4, dtype=torch.float64)
    world[:3, :3], world[:3, 3] = _rotation("z", 40.0) @ _rotation("y", 25.0), torch.tensor([1.0, -2.0, 0.5])
    moved = (to_homogeneous(target) @ torch.linalg.inv(world))[:, :3]
    moved[:, :, 3] *= 3.0
    rot, trans = relative_pose_errors(moved, target)
    assert np.allclose(rot, 0, atol=1e-4) and np.allclose(trans, 0, atol=1e-4)
    # turn camera 4 by 10 degrees in place: 10 degree rotation errors on its 4 pairs only
    turned = target.clone()
    turned[4, :, :3] = _rotation("y", 10.0) @ target[4, :, :3]
    turned[4, :, 3] = _rotation("y", 10.0) @ target[4, :, 3]
    rot, _ = relative_pose_errors(turned, target)
    np.testing.assert_allclose(np.sort(rot)[-4:], 10.0, atol=1e-4)
    np.testing.assert_allclose(np.sort(rot)[:-4], 0.0, atol=1e-4)
    assert pose_auc(np.array([5.0, 15.0, 45.0]), np.zeros(3)) == pytest.approx(40 / 90)


def test_static_pairs_count_by_rotation_alone():
    """A camera that stood still (frames 1 and 2 at one place) has no translation direction: that
    pair's translation error is NaN, and it counts by its rotation error alone."""
    target = _random_cameras(3)
    target[2] = target[1]
    predicted = target.clone()
    predicted[2, :, 3] += torch.tensor([0.3, 0.0, 0.0], dtype=target.dtype)  # any direction would do
    _, trans = relative_pose_errors(predicted, target)
    assert np.isnan(trans[2]) and not np.isnan(trans[:2]).any()  # pairs (0,1), (0,2), (1,2)
    assert pose_auc(np.array([5.0, 15.0]), np.array([0.0, np.nan])) == pytest.approx((25 + 15) / 60)


def test_feature_cosine():
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 8))
    assert feature_cosine(x, x) == pytest.approx(1.0)
    assert feature_cosine(-x, x) == pytest.approx(-1.0)


# ---------------------------------------------------------------------------------------------
# A real store of synthetic clips, a tiny student


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    write_corpus(out, SynthConfig(scenes=2, frames=FRAMES, width=SIZE, height=SIZE, fps=4.0, seed=1))
    return out


def ground_truth_clip(corpus: Path, scene: str) -> ClipLabels:
    """A clip labelled with the scene's exact ground truth, as precompute stores teacher labels."""
    gt = load_file(corpus / "gt" / scene / "frames.safetensors")
    frames, times = read_video_frames(corpus / "videos" / f"{scene}.mp4", FRAMES)
    frames = resize_frames(frames, student_frame_size(FRAMES, SIZE, SIZE))
    extrinsic = relative_to_first(torch.from_numpy(gt["extrinsic"]))
    intrinsic = torch.from_numpy(gt["intrinsic"])
    rng = np.random.default_rng(0)
    return clip_labels(
        FRAMES,
        clip_id=clip_id_for(f"videos/{scene}.mp4", FINGERPRINT.sampling),
        video=f"videos/{scene}.mp4",
        frame_indices=np.arange(FRAMES, dtype=np.int64),
        timestamps=times,
        frames_jpeg=[encode_jpeg(f) for f in frames],
        pose_enc=encode_pose(extrinsic, intrinsic, (SIZE, SIZE)).float().numpy(),
        extrinsic=extrinsic.float().numpy(),
        intrinsic=intrinsic.float().numpy(),
        depth=gt["depth"][:, ::2, ::2].copy(),
        depth_conf=np.ones((FRAMES, SIZE // 2, SIZE // 2), dtype=np.float32),
        scale=1.0,
        scale_valid=True,
        features=rng.normal(size=(FRAMES, 4, 2, 2, FEATURE_DIM)).astype(np.float32),
        meta={"teacher_size": [SIZE, SIZE]},
    )


@pytest.fixture(scope="module")
def store(corpus, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache") / "store"
    writer = open_writer(root, FINGERPRINT, format="zarr")
    writer.write_shard("000000", [ground_truth_clip(corpus, s) for s in ("scene_0000", "scene_0001")], [])
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    base = write_tiny_qwen3vl(tmp_path_factory.mktemp("tiny_base"))
    config = load_section(StudentConfig, "student", "tiny", base_model=str(base)).matched_to(FINGERPRINT)
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    GeoVRStudent.from_base(base, config, dtype=torch.float32).save_pretrained(run / "checkpoints" / "step_1")
    return run


def test_clip_metrics_of_the_teacher_itself_are_perfect(store):
    reader = open_store(store)
    labels = reader.read_clip(reader.clip_ids()[0])
    pose_enc = labels.pose_enc.copy()
    pose_enc[:, :3] *= 2.5  # the teacher at 2.5x its scale: depth and translations
    metrics = clip_metrics(
        labels,
        pose_enc=pose_enc,
        depth=labels.depth * 2.5,
        scale=labels.scale,
        features=[labels.features[:, i] for i in range(4)],
        feature_layers=FINGERPRINT.feature_layers,
    )
    assert metrics["depth_abs_rel"] == pytest.approx(0.0, abs=1e-6) and metrics["depth_delta1"] == 1.0
    assert metrics["rotation_error_deg"] < 0.05 and metrics["translation_error_deg"] < 0.05
    assert metrics["pose_auc30"] == 1.0 and metrics["scale_log_error"] == 0.0
    assert [metrics[f"feature_cosine_layer{i}"] for i in range(4)] == pytest.approx([1.0] * 4)
    # One median ratio per clip takes the factor out: the reconstructions coincide.
    assert metrics["recon_chamfer"] == pytest.approx(0.0, abs=1e-5) and metrics["recon_fscore@0.05"] == 1.0


def test_eval_geometry_cli(run_dir, store, tmp_path):
    out = tmp_path / "geometry"
    args = ["eval", "geometry", "--model", str(run_dir), "--store", str(store), "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "geometry.json").read_text())
    assert report["num_clips"] == 2 and len(report["clips"]) == 2
    expected = {
        "depth_abs_rel",
        "depth_delta1",
        "rotation_error_deg",
        "translation_error_deg",
        "pose_auc30",
        "static_pair_fraction",
    }
    expected |= {"scale_log_error"} | {f"feature_cosine_layer{i}" for i in range(4)}
    expected |= {"recon_accuracy", "recon_completeness", "recon_chamfer"}
    expected |= {f"recon_{m}@0.05" for m in ("precision", "recall", "fscore")}
    assert set(report["metrics"]) == expected
    metrics = report["metrics"]
    assert all(math.isfinite(v) for v in metrics.values())
    assert (
        metrics["depth_abs_rel"] >= 0
        and 0 <= metrics["depth_delta1"] <= 1
        and 0 <= metrics["pose_auc30"] <= 1
    )
    assert all(-1 <= metrics[f"feature_cosine_layer{i}"] <= 1 for i in range(4))
    assert "| depth_abs_rel |" in (out / "geometry.md").read_text()


def test_inspect_writes_pictures_and_a_point_cloud_inside_the_room(corpus, store, run_dir, tmp_path):
    reader = open_store(store)
    clip_id = reader.clip_ids()[0]
    labels = reader.read_clip(clip_id)
    scene = labels.video.split("/")[-1][: -len(".mp4")]
    out = tmp_path / "inspect"
    args = ["inspect", "--store", str(store), "--clip", clip_id, "--out", str(out), "--model", str(run_dir)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for name in ("depth_panels.png", "trajectory.png", "reconstruction.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"

    # Teacher points are in frame 0's camera coordinates, metres: back to the world, inside the room.
    points, colors = read_ply(out / "points_teacher.ply")
    assert len(points) == FRAMES * (SIZE // 2) ** 2 and colors.dtype == np.uint8 and colors.std() > 0
    first = load_file(corpus / "gt" / scene / "frames.safetensors")["extrinsic"][0]
    world_from_first = invert_extrinsic(torch.from_numpy(first)).numpy()
    world = points.astype(np.float64) @ world_from_first[:, :3].T + world_from_first[:, 3]
    room = np.array(json.loads((corpus / "gt" / scene / "scene.json").read_text())["room"]["size"])
    assert np.all(world >= -0.02) and np.all(world <= room + 0.02)
    # and some lie on the floor and the walls
    assert np.abs(world[:, 2]).min() < 0.02 and np.min(np.abs(world[:, :2] - room[:2]).min(1)) < 0.02

    student_points, _ = read_ply(out / "points_student.ply")
    assert len(student_points) > 0 and np.isfinite(student_points).all()
    centers, directions = camera_centers(labels.extrinsic)
    assert np.allclose(centers[0], 0, atol=1e-6) and np.allclose(directions[0], [0, 0, 1], atol=1e-6)


def test_inspect_unknown_clip_is_an_error(store, tmp_path):
    result = CliRunner().invoke(
        app, ["inspect", "--store", str(store), "--clip", "nope", "--out", str(tmp_path)]
    )
    assert result.exit_code != 0 and "no clip 'nope'" in str(result.exception)
