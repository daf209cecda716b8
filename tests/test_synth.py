"""The procedural scene corpus: format on disk, determinism, exact depth, video quality, object counts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from geovr.app.presets import load_section
from geovr.corpus.config import SynthConfig
from geovr.corpus.synth import (
    CAMERA_CLEARANCE,
    CATEGORIES,
    generate_scene,
    load_scene_gt,
    read_corpus,
    render_frame,
    write_corpus,
)
from geovr.teacher_cache.config import ConfigError
from geovr.teacher_cache.geometry import unproject_to_world
from tests.conftest import SYNTH_TEST_CONFIG

CONFIG = SynthConfig(**SYNTH_TEST_CONFIG)
SURFACE_TOLERANCE = 1e-4  # metres; float32 depth of points at most ~10 m away


def decode_video(path: Path) -> np.ndarray:
    """All frames of a video as (F, H, W, 3) uint8 RGB."""
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def signed_distances(points: np.ndarray, gt) -> tuple[np.ndarray, np.ndarray]:
    """Signed distance (N, K) of world points (N, 3) to each object's surface (negative inside), and
    the distance (N,) to the nearest plane of the room, computed from the scene's description only."""
    columns = []
    for obj in gt.objects:
        offset = points - np.asarray(obj.center)
        half = np.asarray(obj.size) / 2
        if obj.shape == "cylinder":
            q = np.stack((np.hypot(offset[:, 0], offset[:, 1]) - half[0], np.abs(offset[:, 2]) - half[2]), -1)
        else:
            c, s = math.cos(obj.yaw), math.sin(obj.yaw)
            local = np.stack(
                (c * offset[:, 0] + s * offset[:, 1], -s * offset[:, 0] + c * offset[:, 1], offset[:, 2]), -1
            )
            q = np.abs(local) - half
        outside = np.linalg.norm(np.maximum(q, 0.0), axis=-1)
        columns.append(outside + np.minimum(q.max(-1), 0.0))
    room = np.asarray(gt.room.size)
    to_planes = np.concatenate((points, room - points), -1)
    return np.stack(columns, -1), np.abs(to_planes).min(-1)


def world_points(gt, frame: int) -> np.ndarray:
    """(H*W, 3) world points of a frame's ground-truth depth, unprojected with the shared conventions."""
    points = unproject_to_world(
        torch.from_numpy(gt.depth[frame].astype(np.float64)),
        torch.from_numpy(gt.extrinsic[frame]),
        torch.from_numpy(gt.intrinsic[frame]),
    )
    return points.reshape(-1, 3).numpy()


def test_corpus_layout_matches_the_documented_format(synth_corpus: Path) -> None:
    corpus = read_corpus(synth_corpus)
    assert corpus == {
        "format_version": 1,
        "scenes": ["scene_0000", "scene_0001"],
        "frames": CONFIG.frames,
        "size": [CONFIG.width, CONFIG.height],
        "fps": CONFIG.fps,
        "seed": CONFIG.seed,
    }
    for scene_id in corpus["scenes"]:
        meta = json.loads((synth_corpus / "gt" / scene_id / "scene.json").read_text())
        assert meta["world"] == "z up, metres, floor at z=0"
        assert meta["camera_convention"] == "OpenCV camera-from-world"
        assert set(meta["room"]) == {"size", "origin"}
        assert all(set(o) >= {"id", "category", "center", "size", "yaw"} for o in meta["objects"])
        arrays = load_file(str(synth_corpus / "gt" / scene_id / "frames.safetensors"))
        f, h, w = CONFIG.frames, CONFIG.height, CONFIG.width
        assert {k: (v.shape, v.dtype) for k, v in arrays.items()} == {
            "extrinsic": ((f, 3, 4), np.float64),
            "intrinsic": ((f, 3, 3), np.float64),
            "timestamps": ((f,), np.float64),
            "depth": ((f, h, w), np.float32),
            "visible_pixels": ((f, len(meta["objects"])), np.int64),
        }
        with av.open(str(synth_corpus / "videos" / f"{scene_id}.mp4")) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264"
            assert stream.codec_context.pix_fmt == "yuv420p"
            assert (stream.codec_context.width, stream.codec_context.height) == (w, h)
            assert float(stream.average_rate) == pytest.approx(CONFIG.fps)
            times = [frame.time for frame in container.decode(video=0)]
        np.testing.assert_allclose(times, np.arange(f) / CONFIG.fps, atol=1e-3)


def test_scenes_are_plausible_rooms(synth_corpus: Path) -> None:
    for scene_id in read_corpus(synth_corpus)["scenes"]:
        gt = load_scene_gt(synth_corpus, scene_id)
        sx, sy, sz = gt.room.size
        assert 4.0 <= sx <= 8.0 and 4.0 <= sy <= 7.0 and 2.4 <= sz <= 3.3
        assert 3 <= len(gt.objects) <= 12
        assert [o.id for o in gt.objects] == list(range(len(gt.objects)))
        # Footprints rasterised on a 1 cm grid: inside the room, standing on the floor, no two overlap.
        x, y = np.meshgrid(np.arange(0, sx, 0.01), np.arange(0, sy, 0.01), indexing="ij")
        floor = np.stack((x.ravel(), y.ravel(), np.full(x.size, 0.01)), -1)
        inside, _ = signed_distances(floor, gt)
        assert (inside < 0).sum(-1).max() <= 1, "two objects overlap"
        for k, obj in enumerate(gt.objects):
            category = CATEGORIES[obj.category]
            assert obj.shape == category.shape
            assert np.all(np.asarray(obj.size) >= np.asarray(category.size_min) - 1e-3)
            assert np.all(np.asarray(obj.size) <= np.asarray(category.size_max) + 1e-3)
            assert obj.center[2] == pytest.approx(obj.size[2] / 2)
            assert (inside[:, k] < 0).any(), f"object {k} has no footprint inside the room"
        # The camera: inside, at eye height, away from every object, rotations orthonormal.
        rotation, translation = gt.extrinsic[:, :, :3], gt.extrinsic[:, :, 3]
        np.testing.assert_allclose(
            rotation @ rotation.transpose(0, 2, 1), np.broadcast_to(np.eye(3), rotation.shape), atol=1e-12
        )
        np.testing.assert_allclose(np.linalg.det(rotation), 1.0, atol=1e-12)
        centers = -np.einsum("fji,fj->fi", rotation, translation)
        assert np.all(centers[:, :2] > 0.5) and np.all(centers[:, :2] < np.array([sx, sy]) - 0.5)
        assert np.all((centers[:, 2] > 1.2) & (centers[:, 2] < 1.8))
        at_floor = np.concatenate((centers[:, :2], np.full((len(centers), 1), 0.01)), -1)
        assert signed_distances(at_floor, gt)[0].min() >= CAMERA_CLEARANCE - 1e-6
        # Intrinsics: square pixels, principal point at the image centre; timestamps at the frame rate.
        k = gt.intrinsic
        assert np.all(k[:, 0, 2] == CONFIG.width / 2) and np.all(k[:, 1, 2] == CONFIG.height / 2)
        assert np.all(k[:, 0, 0] == k[:, 1, 1])
        np.testing.assert_array_equal(gt.timestamps, np.arange(CONFIG.frames) / CONFIG.fps)
        # The camera looks around: at least one full turn of heading over the clip.
        heading = np.unwrap(np.arctan2(rotation[:, 2, 1], rotation[:, 2, 0]))
        assert abs(heading[-1] - heading[0]) >= 2 * math.pi - 0.5


def test_same_seed_same_corpus_and_other_seed_other_corpus(synth_corpus: Path, tmp_path: Path) -> None:
    # Scene 0 alone (fewer scenes than the fixture): identical files, so identical decoded frames.
    again = SynthConfig(**{**SYNTH_TEST_CONFIG, "scenes": 1})
    assert write_corpus(tmp_path / "again", again) == ["scene_0000"]
    for name in ("frames.safetensors", "scene.json"):
        assert (tmp_path / "again/gt/scene_0000" / name).read_bytes() == (
            synth_corpus / "gt/scene_0000" / name
        ).read_bytes()
    np.testing.assert_array_equal(
        decode_video(tmp_path / "again/videos/scene_0000.mp4"),
        decode_video(synth_corpus / "videos/scene_0000.mp4"),
    )
    other = generate_scene(SynthConfig(**{**SYNTH_TEST_CONFIG, "seed": CONFIG.seed + 1}), 0)
    assert other.room.size != load_scene_gt(synth_corpus, "scene_0000").room.size


@pytest.mark.parametrize("scene_index", [0, 1])
def test_depth_is_the_exact_distance_to_the_first_surface(synth_corpus: Path, scene_index: int) -> None:
    """Every pixel's unprojected point lies on the surface its mask names, and inside no object."""
    gt = load_scene_gt(synth_corpus, f"scene_{scene_index:04d}")
    scene = generate_scene(CONFIG, scene_index)
    for frame in range(0, CONFIG.frames, 3):
        rendered = render_frame(scene, frame)
        np.testing.assert_array_equal(rendered.depth, gt.depth[frame])
        distances, to_room = signed_distances(world_points(gt, frame), gt)
        object_id = rendered.object_id.ravel()
        on_room = object_id < 0
        assert np.all(to_room[on_room] < SURFACE_TOLERANCE)
        on_object = np.abs(distances[np.flatnonzero(~on_room), object_id[~on_room]])
        assert np.all(on_object < SURFACE_TOLERANCE)
        assert distances.min() > -SURFACE_TOLERANCE, "a pixel sees a surface hidden inside an object"
        assert np.all(gt.depth[frame] > 0.05)


def test_visible_pixels_count_the_object_masks(synth_corpus: Path) -> None:
    gt = load_scene_gt(synth_corpus, "scene_0001")
    scene = generate_scene(CONFIG, 1)
    seen = np.zeros(len(gt.objects), dtype=np.int64)
    for frame in range(CONFIG.frames):
        mask = render_frame(scene, frame).object_id
        counts = np.bincount(mask[mask >= 0].ravel(), minlength=len(gt.objects))
        np.testing.assert_array_equal(gt.visible_pixels[frame], counts)
        seen += counts
    assert gt.visible_pixels.sum(1).max() <= CONFIG.width * CONFIG.height
    assert (seen > 0).sum() >= 2, "the camera sweep should see most objects"


def test_decoded_video_is_within_30_db_of_the_rendered_frames(synth_corpus: Path) -> None:
    decoded = decode_video(synth_corpus / "videos" / "scene_0000.mp4")
    scene = generate_scene(CONFIG, 0)
    assert decoded.shape == (CONFIG.frames, CONFIG.height, CONFIG.width, 3)
    psnr = []
    for frame in range(CONFIG.frames):
        error = decoded[frame].astype(np.float64) - render_frame(scene, frame).rgb
        psnr.append(10 * math.log10(255.0**2 / np.mean(error**2)))
    assert min(psnr) >= 30.0, f"PSNR per frame: {np.round(psnr, 1)}"
    # Textured, not flat: the frames have detail for a multi-view network to match.
    assert decoded.std(axis=(1, 2)).mean() > 10


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("synth.width=-320", "synth.width"),
        ("synth.height=121", "synth.height"),
        ("synth.scenes=0", "synth.scenes"),
        ("synth.frames=0", "synth.frames"),
        ("synth.fps=0", "synth.fps"),
        ("synth.crf=60", "synth.crf"),
        ("synth.max_objects=20", "synth.min_objects/max_objects"),
    ],
)
def test_bad_config_values_are_named(override: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_section(SynthConfig, "synth", "tiny", [override])


def test_write_corpus_refuses_an_unusable_output_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"cannot create output directory .*a_file/corpus"):
        write_corpus(blocker / "corpus", SynthConfig(scenes=1, frames=1, width=16, height=16))


def test_load_scene_gt_names_a_missing_scene(synth_corpus: Path) -> None:
    with pytest.raises(ValueError, match="scene_0042"):
        load_scene_gt(synth_corpus, "scene_0042")
