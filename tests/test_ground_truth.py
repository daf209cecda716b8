"""Ground truth from RGB-D folders: the layout reader and writer (corpus/rgbd.py), ground-truth labels
in the teacher's conventions (corpus/ground_truth.py, pipeline/ground_truth.py) and the precompute encode task with them.

The worked example's values were computed by hand (notes of issue 16, section 1.4): a ScanNet-like
640x480 depth stream facing a wall at 3 m, the second camera 0.5 m to the right of the first.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from geovr.corpus.config import SamplingConfig
from geovr.corpus.ground_truth import ClipFrames, GroundTruthError, clip_ground_truth, ground_truth_labels
from geovr.corpus.rgbd import RGBDError, read_rgbd, rgbd_dir_for, write_rgbd
from geovr.corpus.synth import load_scene_gt, read_corpus
from geovr.teacher_cache.codecs import decode_depth, encode_depth
from geovr.teacher_cache.geometry import mat_to_quat, normalize_clip, resize_intrinsic, unproject_to_world
from tests.helpers import label_synthetic_clip


def test_reader_gives_the_synthetic_scene_exactly(synth_corpus: Path) -> None:
    """`synth` writes the layout beside each video: the reader returns the renderer's poses (to
    float64 print precision), depth (to the millimetre), intrinsics and timestamps."""
    for scene_id in read_corpus(synth_corpus)["scenes"]:
        gt = load_scene_gt(synth_corpus, scene_id)
        scene = read_rgbd(rgbd_dir_for(gt.video))
        assert scene.num_frames == len(gt.extrinsic) and scene.depth_hw == gt.depth.shape[1:]
        np.testing.assert_array_equal(scene.timestamps, gt.timestamps)
        np.testing.assert_allclose(scene.depth_intrinsic, gt.intrinsic[0], rtol=1e-15)
        np.testing.assert_allclose(scene.color_intrinsic, gt.intrinsic[0], rtol=1e-15)
        for k in (0, scene.num_frames - 1):
            pose = scene.camera_to_world(k)
            np.testing.assert_allclose(np.linalg.inv(pose)[:3], gt.extrinsic[k], atol=1e-12)
            assert np.abs(scene.depth(k) - gt.depth[k]).max() <= 0.0005 + 1e-6


def _wall_example(root: Path) -> Path:
    """Two 640x480 frames facing a wall at 3 m; camera 1 is 0.5 m to camera 0's right (world -y)."""
    rotation = np.array(
        [[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]
    )  # columns: the camera axes in the world
    centres = [np.array([1.0, 2.0, 1.5]), np.array([1.0, 1.5, 1.5])]
    extrinsic = np.stack([np.concatenate([rotation.T, (-rotation.T @ c)[:, None]], 1) for c in centres])
    intrinsic = np.array([[577.87, 0.0, 319.5], [0.0, 577.87, 239.5], [0.0, 0.0, 1.0]])
    write_rgbd(root, np.full((2, 480, 640), 3.0), extrinsic, intrinsic, np.array([0.0, 1 / 30]))
    return root


def test_worked_example_by_hand(tmp_path: Path) -> None:
    """The stored labels of the hand-computed example: factor 3.24494 m, depth 3 / f, camera 1 at
    (-0.5 / f, 0, 0), identity rotation, fov_h = 2 atan(240 / 577.87), fov_w = 2 atan(320 / 577.87)."""
    frames = ClipFrames(
        np.array([0, 1]), np.array([0.0, 1 / 30]), 2, 30.0, 0, (392, 504), (196, 252), (480, 640)
    )
    labels = clip_ground_truth(_wall_example(tmp_path / "wall"), frames)
    f = labels["scale"]
    assert f == pytest.approx(3.24494, abs=1e-5) and labels["scale_valid"]
    np.testing.assert_allclose(labels["depth"], 0.924515, atol=1e-6)
    fov_h, fov_w = 0.787283, 1.011447
    np.testing.assert_allclose(labels["pose_enc"][0], [0, 0, 0, 0, 0, 0, 1, fov_h, fov_w], atol=1e-6)
    np.testing.assert_allclose(labels["pose_enc"][1], [-0.154086, 0, 0, 0, 0, 0, 1, fov_h, fov_w], atol=1e-6)
    np.testing.assert_allclose(
        labels["extrinsic"][1], [[1, 0, 0, -0.154086], [0, 1, 0, 0], [0, 0, 1, 0]], atol=1e-6
    )
    # Cell (0, 0) of frame 1 in frame 0's coordinates, normalised: (-0.357072, -0.383168, 0.924515).
    depth_k = resize_intrinsic(
        torch.tensor(labels["intrinsic"][1], dtype=torch.float64), (392, 504), (196, 252)
    )
    point = unproject_to_world(
        torch.tensor(labels["depth"][1], dtype=torch.float64),
        torch.tensor(labels["extrinsic"][1], dtype=torch.float64),
        depth_k,
    )[0, 0]
    np.testing.assert_allclose(point.numpy(), [-0.357072, -0.383168, 0.924515], atol=2e-6)


def test_synthetic_clip_labels_equal_the_renderer_in_the_stated_conventions(synth_corpus: Path) -> None:
    """Ground-truth labels of sampled frames against the renderer's exact depth and cameras (the
    frames.safetensors copy, not the layout): depth = rendered depth at the nearest source pixel / f,
    translation = (E_s E_0^-1).t / f, FoV from the rendered focal length, f = the mean distance of
    the cells' points from camera 0, and the stored labels are normalised (their factor is 1)."""
    gt = load_scene_gt(synth_corpus, "scene_0000")
    height, width = gt.depth.shape[1:]  # 120x160
    picked = np.array([1, 4, 7, 11])
    teacher_hw, depth_hw = (84, 112), (42, 56)
    frames = ClipFrames(
        picked, gt.timestamps[picked], len(gt.depth), gt.fps, 0, teacher_hw, depth_hw, (height, width)
    )
    labels = clip_ground_truth(rgbd_dir_for(gt.video), frames)
    f = labels["scale"]
    # hand rule for one cell: row i reads source row floor(i * 120/42 + 1/2), column floor(j * 160/56 + 1/2)
    s, i, j = 2, 17, 40
    row, col = math.floor(i * height / depth_hw[0] + 0.5), math.floor(j * width / depth_hw[1] + 0.5)
    assert labels["depth"][s, i, j] == pytest.approx(gt.depth[picked[s], row, col] / f, abs=0.0005 / f + 1e-6)
    e = [np.vstack([gt.extrinsic[k], [0, 0, 0, 1]]) for k in picked]
    relative = e[s] @ np.linalg.inv(e[0])
    np.testing.assert_allclose(labels["extrinsic"][s][:, :3], relative[:3, :3], atol=1e-6)
    np.testing.assert_allclose(labels["pose_enc"][s, :3], relative[:3, 3] / f, atol=1e-6)
    focal = gt.intrinsic[0, 0, 0]
    np.testing.assert_allclose(
        labels["pose_enc"][:, 7:], [[2 * math.atan(60 / focal), 2 * math.atan(80 / focal)]] * 4, atol=1e-6
    )
    # f from a plain numpy loop over every cell of every frame (the rendered depth, not the PNGs)
    scale_y, scale_x = depth_hw[0] / height, depth_hw[1] / width
    total, count = 0.0, 0
    rows = np.floor(np.arange(depth_hw[0]) / scale_y + 0.5).astype(int)
    cols = np.floor(np.arange(depth_hw[1]) / scale_x + 0.5).astype(int)
    for k in picked:
        depth = gt.depth[k][rows][:, cols].astype(np.float64)
        u, v = np.meshgrid(np.arange(depth_hw[1]), np.arange(depth_hw[0]))
        x = (u - gt.intrinsic[k, 0, 2] * scale_x) / (focal * scale_x) * depth
        y = (v - gt.intrinsic[k, 1, 2] * scale_y) / (focal * scale_y) * depth
        cam = np.stack([x, y, depth], -1)
        world = (cam - gt.extrinsic[k][:, 3]) @ gt.extrinsic[k][:, :3]
        camera0 = world @ gt.extrinsic[picked[0]][:, :3].T + gt.extrinsic[picked[0]][:, 3]
        total += np.linalg.norm(camera0, axis=-1).sum()
        count += depth.size
    assert f == pytest.approx(total / count, rel=2e-4)  # PNG millimetres against the exact float depth
    # already normalised: normalising the stored labels again gives factor 1
    stored_k = resize_intrinsic(torch.tensor(labels["intrinsic"], dtype=torch.float64), teacher_hw, depth_hw)
    _, _, again = normalize_clip(
        torch.tensor(labels["extrinsic"], dtype=torch.float64),
        torch.tensor(labels["depth"], dtype=torch.float64),
        stored_k,
    )
    assert float(again) == pytest.approx(1.0, abs=1e-6)


def test_invalid_ground_truth_is_refused_or_masked(tmp_path: Path) -> None:
    """Zero depth is no label (NaN, left out of the factor); a -inf pose, a frame-count or timestamp
    mismatch and a damaged folder are `GroundTruthError`s naming the file."""
    root = _wall_example(tmp_path / "wall")
    frames = ClipFrames(
        np.array([0, 1]), np.array([0.0, 1 / 30]), 2, 30.0, 0, (392, 504), (196, 252), (480, 640)
    )
    from PIL import Image

    png = np.full((480, 640), 3000, dtype=np.uint16)
    png[:, :320] = 0  # left half without depth
    Image.fromarray(png).save(root / "depth" / "1.png")
    labels = clip_ground_truth(root, frames)
    assert np.isnan(labels["depth"][1][:, :120]).all() and np.isfinite(labels["depth"][1][:, 140:]).all()
    assert np.isfinite(labels["depth"][0]).all()
    np.testing.assert_allclose(labels["depth"][1][:, 140:], 3.0 / labels["scale"], rtol=1e-6)

    with pytest.raises(GroundTruthError, match="2 RGB-D frames for 3 video frames"):
        clip_ground_truth(root, ClipFrames(**{**frames.__dict__, "source_frames": 3}))
    with pytest.raises(GroundTruthError, match=r"timestamps\.txt: differs"):
        clip_ground_truth(root, ClipFrames(**{**frames.__dict__, "timestamps": np.array([0.0, 0.2])}))
    (root / "pose" / "1.txt").write_text("-inf -inf -inf -inf\n" * 4)
    with pytest.raises(GroundTruthError, match=r"pose/1\.txt: no pose"):
        clip_ground_truth(root, frames)
    (root / "pose" / "1.txt").unlink()
    with pytest.raises(GroundTruthError, match="1 poses for 2 depth frames"):
        clip_ground_truth(root, frames)
    with pytest.raises(RGBDError, match="missing"):
        read_rgbd(tmp_path / "nothing")


def test_depth_codec_keeps_pixels_without_depth() -> None:
    """NaN (no ground-truth depth) survives the depth codec as NaN; the other pixels keep their precision."""
    depth = np.random.default_rng(0).uniform(0.2, 4.0, (2, 8, 10)).astype(np.float32)
    depth[0, 2:4, 3:7] = np.nan
    depth[1] = np.nan  # a frame without any depth
    decoded = decode_depth(**encode_depth(depth, 2.0**-10))
    assert np.array_equal(np.isnan(decoded), np.isnan(depth))
    ok = np.isfinite(depth)
    assert np.abs(decoded[ok] / depth[ok] - 1).max() <= 2.0**-11 * 1.01


def test_encode_task_takes_ground_truth_fields_and_counts_a_fallback(
    synth_corpus: Path, reference_dir: Path
) -> None:
    """The precompute encode task with camera and depth from ground truth: the stored fields are the
    ground truth (tiny-a's infinite focal length no longer matters), features the teacher's, the scale
    the teacher's; the clip's meta says so. A video without an RGB-D folder keeps the teacher's labels."""
    from geovr.pipeline.tasks import encode_labels
    from geovr.teacher_cache.codecs import CodecConfig
    from geovr.teacher_cache.codecs import decode_clip as decode_encoded

    video = "videos/scene_0001.mp4"
    info, teacher = label_synthetic_clip(synth_corpus, reference_dir, video)
    sources = {"depth": "gt", "camera": "gt", "scale": "teacher"}
    ground_truth = {"corpus_root": str(synth_corpus), "sources": sources}
    status, encoded = encode_labels(
        {"clip_id": "c1", "video": video}, info, teacher, CodecConfig(), ground_truth
    )
    assert status["ok"] and status["gt_fallback"] == "" and not status["gt_problem"]
    clip = decode_encoded(encoded)
    assert clip.meta["label_sources"] == sources
    gt = load_scene_gt(synth_corpus, "scene_0001")
    height, width = gt.depth.shape[1:]
    expected = ground_truth_labels(
        read_rgbd(rgbd_dir_for(gt.video)),
        ClipFrames(info["frame_indices"], info["timestamps"], len(gt.depth), gt.fps, 0,
                   tuple(teacher["teacher_hw"]), teacher["depth"].shape[1:], (height, width)),
    )  # fmt: skip
    np.testing.assert_array_equal(clip.pose_enc, expected["pose_enc"])
    np.testing.assert_allclose(clip.depth, expected["depth"], rtol=2.0**-11 * 1.01)  # the log-depth codec
    assert not clip.scale_valid and not teacher["scale_valid"]  # no metric teacher: the teacher has no scale
    assert np.array_equal(clip.depth_conf, np.ones_like(clip.depth))
    assert np.abs(clip.features - teacher["features"]).max() < 0.1 * np.abs(teacher["features"]).max()

    other = {"clip_id": "c2", "video": "elsewhere/scene_0001.mp4"}  # no RGB-D folder by the naming rule
    status, encoded = encode_labels(other, info, teacher, CodecConfig(), ground_truth)
    assert not status["ok"] and status["stage"] == "encode"  # tiny-a's teacher intrinsics are infinite
    teacher["intrinsic"] = np.nan_to_num(teacher["intrinsic"], posinf=100.0)
    status, encoded = encode_labels(other, info, teacher, CodecConfig(), ground_truth)
    assert status["ok"] and status["gt_fallback"] == "no RGB-D folder" and not status["gt_problem"]
    assert decode_encoded(encoded).meta["label_sources"] == dict.fromkeys(sources, "teacher")


# ---------------------------------------------------------------------------------------------
# eval label-quality


def _ground_truth_store(corpus: Path, root: Path, perturb: bool = False) -> Path:
    """A store whose labels are the ground truth of the two synthetic scenes (perturb: frame 2's depth
    has its top half doubled and the last camera turned by 40 degrees), plus a clip without RGB-D."""
    from geovr.teacher_cache.schema import StoreFingerprint
    from geovr.teacher_cache.store import open_writer
    from tests.helpers import clip_labels

    picked, teacher_hw, depth_hw = np.array([0, 3, 6, 9, 11]), (84, 112), (42, 56)
    clips = []
    for n, scene_id in enumerate(read_corpus(corpus)["scenes"]):
        gt = load_scene_gt(corpus, scene_id)
        frames = ClipFrames(picked, gt.timestamps[picked], 12, gt.fps, 0, teacher_hw, depth_hw, (120, 160))
        truth = clip_ground_truth(rgbd_dir_for(gt.video), frames)
        if perturb:
            truth["depth"][2, :21] *= 2.0
            turn = torch.tensor([[0.766, 0.0, 0.643], [0.0, 1.0, 0.0], [-0.643, 0.0, 0.766]])
            truth["extrinsic"][-1, :, :3] = (turn @ torch.from_numpy(truth["extrinsic"][-1, :, :3])).numpy()
            truth["pose_enc"][-1, 3:7] = mat_to_quat(torch.from_numpy(truth["extrinsic"][-1, :, :3])).numpy()
        meta = {
            "source_size": [160, 120],
            "source_frames": 12,
            "source_fps": gt.fps,
            "rotation": 0,
            "teacher_size": [112, 84],
        }
        clips.append(clip_labels(
            5, clip_id=f"{n:016d}", video=f"videos/{scene_id}.mp4", depth_hw=depth_hw, frame_indices=picked,
            timestamps=gt.timestamps[picked], meta=meta, **{k: v for k, v in truth.items()},
        ))  # fmt: skip
    clips.append(clip_labels(5, clip_id="f" * 16, video="other/none.mp4", depth_hw=depth_hw))
    fingerprint = StoreFingerprint("ground-truth", "00" * 32, {}, "", {}, {}, (0, 1, 2, 3))
    with open_writer(root, fingerprint, "zarr") as writer:
        writer.write_shard("000000", clips, [])
    return root


def test_label_quality_of_ground_truth_labels_is_perfect(synth_corpus: Path, tmp_path: Path) -> None:
    """Labels equal to the ground truth: AbsRel 0 (to the depth codec's precision), delta1 1, AUC@30 1,
    scale error 0; the clip without RGB-D is counted; the command writes its three files."""
    from typer.testing import CliRunner

    from geovr.app import commands  # noqa: F401  (registers the CLI commands)
    from geovr.app.cli import app

    store = _ground_truth_store(synth_corpus, tmp_path / "store")
    out = tmp_path / "quality"
    result = CliRunner().invoke(app, ["eval", "label-quality", "--store", str(store), "--corpus-root", str(synth_corpus), "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "label_quality.json").read_text())
    assert report["num_clips"] == 2 and report["clips_without_ground_truth"] == 1
    metrics = report["metrics"]
    assert metrics["depth_abs_rel"] < 5e-4 and metrics["depth_delta1"] == 1.0
    assert metrics["pose_auc30"] == 1.0 and metrics["rotation_error_deg"] < 0.05
    assert metrics["scale_log_error"] < 1e-9
    assert set(report["datasets"]) == {"videos"} and (out / "label_quality.png").stat().st_size > 0
    assert "| videos |" in (out / "label_quality.md").read_text()


def test_label_quality_sees_wrong_depth_and_cameras(synth_corpus: Path, tmp_path: Path) -> None:
    """A depth frame with half its rows doubled and a camera turned by 40 degrees show up: AbsRel and
    rotation error grow, AUC@30 drops below 1 (each pair with the turned camera is off by 40 degrees)."""
    from geovr.eval.label_quality import label_quality

    store = _ground_truth_store(synth_corpus, tmp_path / "store", perturb=True)
    report = label_quality(store, synth_corpus, tmp_path / "quality")
    metrics = report["metrics"]
    assert 0.05 < metrics["depth_abs_rel"] < 0.5 and metrics["depth_delta1"] < 0.95
    assert metrics["pose_auc30"] == pytest.approx(6 / 10, abs=0.02)  # 4 of 10 pairs hold the turned camera
    assert metrics["rotation_error_deg"] == pytest.approx(4 / 10 * 40.0, abs=0.5)


def test_frequency_baseline_answers_and_scores() -> None:
    """Most frequent answer per multiple-choice task, mean per numerical task, scored as a model."""
    from geovr.eval.baselines import frequency_answers, frequency_scores

    records = [
        {"question_type": "object_rel_distance", "ground_truth": g, "options": ["A. x", "B. y", "C. z"]}
        for g in ("A", "B", "B", "C")
    ] + [{"question_type": "object_counting", "ground_truth": g} for g in ("2", "4")]
    assert frequency_answers(records) == {"object_rel_distance": "B", "object_counting": "3"}
    scores = frequency_scores(records)
    assert scores["object_rel_distance_accuracy"] == 0.5
    # MRA of 3 against 2 and 4: relative errors 0.5 and 0.25 are within 1 - t for 1 and 6 of the
    # 10 thresholds t = .50:.95:.05
    assert scores["object_counting_MRA:.5:.95:.05"] == pytest.approx((0.1 + 0.6) / 2)
    assert scores["overall"] == pytest.approx((0.5 + 0.35) / 2)


# ---------------------------------------------------------------------------------------------
# index: pairing videos with RGB-D folders


def test_index_pairs_videos_with_rgbd_folders_and_checks_them(synth_corpus: Path, tmp_path: Path) -> None:
    """Naming rule and an explicit QA-row folder pair; a missing frame and shifted timestamps are
    mismatches named in `rgbd_status` (the video stays, with `rgbd` = ""); precompute's lookup
    follows the manifest column."""
    import shutil

    from geovr.corpus.ground_truth import find_rgbd
    from geovr.pipeline.index import build_manifest, read_manifest

    corpus = tmp_path / "corpus"
    shutil.copytree(synth_corpus, corpus)
    for n in (2, 3):  # two more videos of the same scenes
        shutil.copy(corpus / "videos" / f"scene_000{n - 2}.mp4", corpus / "videos" / f"scene_000{n}.mp4")
        shutil.copytree(corpus / "videos" / f"scene_000{n - 2}", corpus / "videos" / f"scene_000{n}")
    (corpus / "rgbd").mkdir()
    shutil.move(corpus / "videos" / "scene_0000", corpus / "rgbd" / "s0")  # explicit in the QA row below
    (corpus / "videos" / "scene_0002" / "depth" / "11.png").unlink()
    (corpus / "videos" / "scene_0002" / "pose" / "11.txt").unlink()
    (corpus / "videos" / "scene_0002" / "timestamps.txt").unlink()
    stamps = corpus / "videos" / "scene_0003" / "timestamps.txt"
    stamps.write_text("\n".join(str(float(t) + 0.2) for t in stamps.read_text().split()) + "\n")
    qa = tmp_path / "qa.jsonl"
    rows = [{"video": "videos/scene_0000.mp4", "rgbd": "rgbd/s0"}] + [
        {"video": f"videos/scene_000{n}.mp4"} for n in (1, 2, 3)
    ]
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = build_manifest(
        [qa], tmp_path / "m.parquet", SamplingConfig(fps=2.0, min_frames=4, max_frames=8), corpus, workers=1
    )
    assert report.rgbd_counts == {"paired": 2, "mismatch": 2}
    by_video = {r["video"]: r for r in read_manifest(tmp_path / "m.parquet").rows}
    assert by_video["videos/scene_0000.mp4"]["rgbd"] == "rgbd/s0"
    assert by_video["videos/scene_0001.mp4"]["rgbd"] == "videos/scene_0001"
    assert by_video["videos/scene_0002.mp4"]["rgbd"] == ""
    status = by_video["videos/scene_0002.mp4"]["rgbd_status"]
    assert status.endswith("scene_0002: 11 RGB-D frames for 12 video frames"), status
    assert (
        "timestamps.txt: differs from the video's timestamps by up to 0.200 s"
        in by_video["videos/scene_0003.mp4"]["rgbd_status"]
    )
    assert {p["video"] for p in report.rgbd_problems} == {"videos/scene_0002.mp4", "videos/scene_0003.mp4"}
    row = by_video["videos/scene_0000.mp4"]
    assert find_rgbd(corpus, row["video"], row["rgbd"]) == corpus / "rgbd" / "s0"
    assert find_rgbd(corpus, "videos/scene_0003.mp4", "") is None  # the manifest says: none
    assert find_rgbd(corpus, "videos/scene_0003.mp4") == corpus / "videos" / "scene_0003"  # older manifests
