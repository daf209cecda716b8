"""Decoding and frame sampling (corpus/video.py), the precompute decode task (pipeline/tasks.py) and
split-clip merging (pipeline/clip_split.py).

Real mp4/mkv files written with PyAV; geometry from the synthetic corpus's exact ground truth.
Also provides `write_video` and `write_bad_inputs` to the other precompute tests.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from geovr.corpus.config import SamplingConfig, SynthConfig
from geovr.corpus.synth import load_scene_gt, write_corpus
from geovr.corpus.video import (
    VideoError,
    decode_frames,
    probe_video,
    read_timestamps,
    sample_indices,
    select_space_aware,
    uniform_in_time,
)
from geovr.pipeline.clip_split import SplitError, merge_halves, split_point
from geovr.teacher_cache.frames import (
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    encode_jpeg,
    resize_frames,
    student_frame_size,
)
from geovr.teacher_cache.geometry import normalize_clip, relative_to_first

BUDGET = (VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS)  # GeoVR's student clip budget (max, min pixels)


def write_video(
    path: Path,
    frames: np.ndarray,
    fps: int = 10,
    pix_fmt: str = "yuv420p",
    codec: str = "libx264",
    pts_ms: list[int] | None = None,
) -> Path:
    """Encode (S, H, W, 3) uint8 RGB frames; `pts_ms` gives explicit (variable) timestamps in ms."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        if pts_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def smooth_frames(num: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Compressible test frames: moving colour gradients (exact enough after H.264 to compare)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = np.random.default_rng(seed).uniform(0, 6.28, 3)
    frames = [
        np.stack([127 + 100 * np.sin(xs / 17 + ys / 23 + t / 3 + p) for p in phase], axis=-1)
        for t in range(num)
    ]
    return np.clip(frames, 0, 255).astype(np.uint8)


def write_bad_inputs(folder: Path) -> dict[str, str]:
    """Oddly-encoded videos that must be stored and bad ones that must fail: {relative path: expected}.

    expected: "ok" or the failure reason code.
    """
    folder.mkdir(parents=True, exist_ok=True)
    gray = smooth_frames(10, 120, 160, seed=1)
    gray[...] = gray[..., :1]
    write_video(folder / "gray.mkv", gray, fps=4, pix_fmt="gray", codec="ffv1")
    write_video(folder / "odd_size.mp4", smooth_frames(10, 121, 165, seed=2), fps=4, pix_fmt="yuv444p")
    pts = [0, 100, 200, 900, 1000, 1100, 1800, 2000, 2050, 2500]
    write_video(folder / "vfr.mp4", smooth_frames(10, 120, 160, seed=3), pts_ms=pts)
    write_video(folder / "too_short.mp4", smooth_frames(2, 120, 160, seed=4), fps=4)
    good = write_video(folder / "to_truncate.mp4", smooth_frames(10, 120, 160, seed=5), fps=4).read_bytes()
    (folder / "corrupt.mp4").write_bytes(good[: len(good) // 3])  # the moov atom is at the end: gone
    (folder / "to_truncate.mp4").unlink()
    (folder / "empty.mp4").write_bytes(b"")
    return {
        "gray.mkv": "ok",
        "odd_size.mp4": "ok",
        "vfr.mp4": "ok",
        "too_short.mp4": "too-short",
        "corrupt.mp4": "corrupt",
        "empty.mp4": "empty",
    }


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("videos")
    write_bad_inputs(folder)
    return folder


GEOVR = SamplingConfig(fps=2.0, min_frames=4, max_frames=32)


def test_uniform_in_time_matches_linspace_for_constant_rate() -> None:
    seconds = np.arange(100) / 10.0
    for count in (1, 4, 20, 99, 100):
        expected = np.round(np.linspace(0, 99, count)).astype(np.int64) if count > 1 else np.array([0])
        got = uniform_in_time(seconds, count)
        assert np.all(np.abs(got - expected) <= 1), count
        assert np.all(np.diff(got) > 0) and got[0] == 0 and (count == 1 or got[-1] == 99)


def test_uniform_in_time_follows_timestamps_of_a_variable_rate() -> None:
    # A burst of 8 frames in the first 0.1 s, then one frame per second: uniform in *time* must not
    # spend the samples on the burst.
    seconds = np.concatenate([np.linspace(0, 0.1, 8), np.arange(1, 9, dtype=np.float64)])
    got = uniform_in_time(seconds, 5)
    assert seconds[got].tolist() == [0.0, 2.0, 4.0, 6.0, 8.0]
    # Sparse frames around the targets: indices stay distinct and increasing.
    dense = uniform_in_time(np.array([0.0, 0.01, 0.02, 5.0]), 4)
    assert dense.tolist() == [0, 1, 2, 3]


def test_geovr_frame_counts() -> None:
    def count(num_frames: int, fps: float) -> int:
        return len(sample_indices(np.arange(num_frames) / fps, GEOVR))

    assert count(10, 4.0) == 5  # 2.5 s at 2 fps
    assert count(100, 10.0) == 20  # 10 s
    assert count(1000, 30.0) == 32  # 33 s: capped at 32
    assert count(6, 30.0) == 4  # 0.2 s: at least 4
    with pytest.raises(VideoError) as err:
        sample_indices(np.arange(3) / 30.0, GEOVR, "short.mp4")
    assert err.value.reason == "too-short" and "short.mp4" in str(err.value)


def test_space_aware_policy_samples_candidates_and_changes_clip_identity() -> None:
    cfg = SamplingConfig(fps=2.0, min_frames=4, max_frames=8, method="space_aware", candidate_frames=16)
    assert len(sample_indices(np.arange(300) / 30.0, cfg)) == 16
    assert len(sample_indices(np.arange(12) / 30.0, cfg)) == 12  # fewer frames than candidates: all
    assert cfg.policy()["method"] == "space_aware" and "candidate_frames" in cfg.policy()
    assert "candidate_frames" not in GEOVR.policy()


_THREADS = """
import json, os, sys
import numpy as np
from geovr.corpus.video import decode_frames

path, threads = sys.argv[1], int(sys.argv[2])
before = len(os.listdir("/proc/self/task"))
extra = []


def sizes(height, width):  # called at the first decoded frame: the decoder is open, its threads started
    extra.append(len(os.listdir("/proc/self/task")) - before)
    return [(height, width)]


(frames,) = decode_frames(path, np.arange(12), sizes=sizes, threads=threads).outputs
np.save(sys.argv[3], frames)
print(json.dumps(extra[0]))
"""


def test_decode_threads_cap_the_decoder(tmp_path: Path) -> None:
    """`threads` caps the FFmpeg decoder's threads, so a decode task uses the CPUs it reserves
    (`PrecomputeConfig.decode_threads`), not one thread per core of the node; the frames do not
    depend on it. Threads are counted in a fresh process (/proc/self/task), at the first frame."""
    import json
    import os
    import subprocess
    import sys

    from geovr.pipeline.config import PrecomputeConfig

    path = write_video(tmp_path / "a.mp4", smooth_frames(12, 120, 160))

    def decode(threads: int) -> tuple[int, np.ndarray]:
        out = tmp_path / f"frames_{threads}.npy"
        run = subprocess.run(
            [sys.executable, "-c", _THREADS, str(path), str(threads), str(out)],
            capture_output=True, text=True, check=True, timeout=120,
        )  # fmt: skip
        return json.loads(run.stdout), np.load(out)

    one, frames_one = decode(1)
    two, frames_two = decode(2)
    assert one == 0 and two >= 1, (one, two)
    np.testing.assert_array_equal(frames_one, frames_two)
    if (os.cpu_count() or 1) > 2:
        auto, _ = decode(0)
        assert auto > two
    assert [PrecomputeConfig(decode_cpus=c).decode_threads() for c in (0.25, 1.0, 2.0, 4.0)] == [1, 1, 2, 4]


def test_cpu_tasks_do_not_import_torch() -> None:
    """The module of the decode / encode / write tasks imports no torch: Ray imports it in every
    worker that runs one, one worker per CPU of a node (torch adds about 180 MB to each)."""
    import subprocess
    import sys

    code = "import sys, geovr.pipeline.tasks; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert run.stdout.strip() == "[]", run.stdout


def test_decode_matches_encoded_frames(tmp_path: Path) -> None:
    frames = smooth_frames(12, 120, 160)
    path = write_video(tmp_path / "a.mp4", frames, fps=10)
    info = probe_video(path)
    assert (info.width, info.height, info.num_frames, info.codec) == (160, 120, 12, "h264")
    assert info.fps == pytest.approx(10.0) and not info.variable_frame_rate
    out = decode_frames(path, np.array([0, 5, 11]))
    (decoded,), seconds = out.outputs, out.seconds
    assert out.source_hw == (120, 160) and out.rotation == 0
    assert decoded.shape == (3, 120, 160, 3) and decoded.dtype == np.uint8
    assert seconds.tolist() == pytest.approx([0.0, 0.5, 1.1])
    error = np.abs(decoded.astype(np.float64) - frames[[0, 5, 11]]).mean()
    assert error < 3.0, error  # H.264 at default quality on smooth content


def test_odd_inputs_decode_to_rgb(bad_dir: Path) -> None:
    gray_info = probe_video(bad_dir / "gray.mkv")
    assert gray_info.pix_fmt == "gray"
    (gray,) = decode_frames(bad_dir / "gray.mkv", np.arange(4)).outputs
    assert gray.shape == (4, 120, 160, 3)
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])
    (odd,) = decode_frames(bad_dir / "odd_size.mp4", np.arange(3)).outputs
    assert odd.shape == (3, 121, 165, 3)
    vfr = probe_video(bad_dir / "vfr.mp4")
    assert vfr.variable_frame_rate and vfr.num_frames == 10
    _, seconds = read_timestamps(bad_dir / "vfr.mp4")
    indices = sample_indices(seconds, GEOVR)
    vfr_decoded = decode_frames(bad_dir / "vfr.mp4", indices)
    (frames,), times = vfr_decoded.outputs, vfr_decoded.seconds
    # 2.5 s + one mean interval = 2.78 s at 2 fps: 6 frames nearest to 0, 0.5, ..., 2.5 s.
    assert len(frames) == len(indices) == 6
    assert times.tolist() == pytest.approx([0.0, 0.2, 1.0, 1.8, 2.0, 2.5])


@pytest.mark.parametrize(
    ("name", "reason"), [("corrupt.mp4", "corrupt"), ("empty.mp4", "empty"), ("nope.mp4", "missing")]
)
def test_bad_files_fail_with_a_reason(bad_dir: Path, name: str, reason: str) -> None:
    with pytest.raises(VideoError) as err:
        probe_video(bad_dir / name)
    assert err.value.reason == reason and name in str(err.value)
    with pytest.raises(VideoError):
        decode_frames(bad_dir / name, np.arange(2))


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("synth")
    (scene_id,) = write_corpus(out, SynthConfig(scenes=1, frames=9, width=64, height=48, fps=4.0, seed=3))
    return load_scene_gt(out, scene_id)


def test_space_aware_selection_prefers_new_views(scene) -> None:
    depth = np.asarray(scene.depth, dtype=np.float32)
    extrinsic = np.asarray(scene.extrinsic, dtype=np.float32)
    intrinsic = np.asarray(scene.intrinsic, dtype=np.float32)
    conf = 1.0 + np.random.default_rng(0).random(depth.shape).astype(np.float32)
    hw = depth.shape[1:]
    # Candidates: frame 0 three times, then frames 4 and 8: the duplicates add nothing.
    pick = [0, 0, 0, 4, 8]
    chosen = select_space_aware(depth[pick], conf[pick], extrinsic[pick], intrinsic[pick], hw, 3, 0.1)
    assert chosen.tolist() == [0, 3, 4]
    # On the real sequence the greedy set covers at least as many voxels as the uniform one.
    every = np.arange(len(depth))
    greedy = select_space_aware(depth, conf, extrinsic, intrinsic, hw, 3, 0.1)
    assert len(greedy) == 3 and np.all(np.diff(greedy) > 0)

    def coverage(subset: np.ndarray) -> int:
        # the coverage of a subset = the union of its voxels; selecting all of it from itself counts them
        return len(
            select_space_aware(depth[subset], conf[subset], extrinsic[subset], intrinsic[subset], hw, 99, 0.1)
        )

    assert coverage(greedy) == 3 and coverage(every) == len(every)


def _labels(extrinsic: torch.Tensor, depth: torch.Tensor, intrinsic: torch.Tensor, conf: np.ndarray) -> dict:
    """Teacher-like labels of a clip: the clip in VGGT's normalised frame (camera 0, unit scale)."""
    ext, dep, _ = normalize_clip(extrinsic, depth, intrinsic)
    s = ext.shape[0]
    return {
        "pose_enc": np.zeros((s, 9), np.float32),
        "extrinsic": ext.numpy().astype(np.float32),
        "intrinsic": intrinsic.numpy().astype(np.float32),
        "depth": dep.numpy().astype(np.float32),
        "depth_conf": conf.astype(np.float32),
        "features": np.arange(s, dtype=np.float32).reshape(s, 1, 1, 1, 1),
        "scale": float("nan"),
        "scale_valid": False,
        "teacher_hw": tuple(depth.shape[1:]),
    }


def test_merged_halves_equal_the_whole_clip_geometry(scene) -> None:
    extrinsic = torch.from_numpy(np.asarray(scene.extrinsic))
    intrinsic = torch.from_numpy(np.asarray(scene.intrinsic))
    depth = torch.from_numpy(np.asarray(scene.depth)).double()
    conf = 1.0 + np.random.default_rng(1).random(tuple(depth.shape))
    s = extrinsic.shape[0]
    m = split_point(s)
    first = _labels(extrinsic[: m + 1], depth[: m + 1], intrinsic[: m + 1], conf[: m + 1])
    second = _labels(extrinsic[m:], depth[m:], intrinsic[m:], conf[m:])
    merged = merge_halves(first, second)

    # Truth: the whole clip relative to camera 0, in the first half's units.
    _, _, factor_first = normalize_clip(extrinsic[: m + 1], depth[: m + 1], intrinsic[: m + 1])
    truth = relative_to_first(extrinsic).clone()
    truth[..., :3, 3] /= factor_first
    assert np.allclose(merged["extrinsic"], truth.numpy(), atol=1e-4)
    assert np.allclose(merged["depth"], (depth / factor_first).numpy(), rtol=1e-4)
    assert merged["features"][:, 0, 0, 0, 0].tolist() == [*range(m + 1), *range(1, s - m)]
    assert merged["pose_enc"].shape == (s, 9) and np.isfinite(merged["pose_enc"][m + 1 :]).all()
    (record,) = merged["split"]
    assert record["overlap_frame"] == m and record["scale_second_to_first"] > 0

    # Nothing confident on the shared frame: the halves cannot be joined faithfully.
    second["depth"][0] = 0.0
    with pytest.raises(SplitError, match="overlap frame"):
        merge_halves(first, second)
    with pytest.raises(SplitError):
        split_point(2)


def test_teacher_resize_in_decode_gives_identical_labels(tmp_path: Path, reference_dir: Path) -> None:
    """Decode tasks resize each frame as it is decoded (teacher and student sizes): the frames equal a
    resize of the full-size frames bit for bit, and the labels equal those of source-size frames.

    Each clip is labelled in its own teacher call of the same shape (one clip, 5 frames, 84x112): the
    labeler's numerics may differ between batch positions of one call, which is not what this checks.
    """
    from geovr.pipeline.config import TeacherConfig
    from geovr.pipeline.labeler import TeacherLabeler
    from geovr.pipeline.tasks import decode_clip

    write_video(tmp_path / "a.mp4", smooth_frames(10, 120, 160), fps=4)
    policy = SamplingConfig(fps=2.0, min_frames=4, max_frames=8).policy()
    status, source, info = decode_clip("a.mp4", str(tmp_path), policy, *BUDGET, 90)
    status_r, resized, info_r = decode_clip(
        "a.mp4", str(tmp_path), policy, *BUDGET, 90, teacher_resize=(112, 28)
    )
    assert (
        status["ok"]
        and status_r["ok"]
        and source.shape == (5, 120, 160, 3)
        and resized.shape == (5, 84, 112, 3)
    )
    assert info["frames_jpeg"] == info_r["frames_jpeg"] and info["frame_indices"].tolist() == [0, 2, 4, 7, 9]
    assert np.array_equal(resized, resize_frames(source, (84, 112)))
    student_hw = student_frame_size(5, 120, 160)
    assert info["meta"]["student_size"] == [student_hw[1], student_hw[0]]
    assert info["frames_jpeg"] == [encode_jpeg(f) for f in resize_frames(source, student_hw)]
    cfg = TeacherConfig(
        checkpoint=reference_dir / "vggt" / "tiny-a", name="vggt-tiny", image_long_side=112,
        feature_layers=(0, 1, 2, 3), dtype="float32",
    )  # fmt: skip
    labeler = TeacherLabeler(cfg, "cpu")
    (a,) = labeler.label([source])
    (b,) = labeler.label([resized])
    for name in ("pose_enc", "depth", "depth_conf", "features"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


def test_encode_task_records_labels_the_store_refuses(tmp_path: Path, reference_dir: Path) -> None:
    """Teacher output with an infinite focal length (tiny-a's random camera head: FoV 0) fails at "encode"."""
    from geovr.pipeline.config import TeacherConfig
    from geovr.pipeline.labeler import TeacherLabeler
    from geovr.pipeline.tasks import decode_clip, encode_labels
    from geovr.teacher_cache.codecs import CodecConfig
    from geovr.teacher_cache.codecs import decode_clip as decode_encoded

    write_video(tmp_path / "a.mp4", smooth_frames(10, 120, 160), fps=4)
    policy = SamplingConfig(fps=2.0, min_frames=4, max_frames=8).policy()
    _, frames, info = decode_clip("a.mp4", str(tmp_path), policy, *BUDGET, 90, teacher_resize=(112, 28))
    cfg = TeacherConfig(
        checkpoint=reference_dir / "vggt" / "tiny-a", name="vggt-tiny", image_long_side=112,
        feature_layers=(0, 1, 2, 3), dtype="float32",
    )  # fmt: skip
    (labels,) = TeacherLabeler(cfg, "cpu").label([frames])
    labels = {name: getattr(labels, name) for name in labels.__dataclass_fields__}
    row = {"clip_id": "c0", "video": "a.mp4"}
    assert not np.isfinite(labels["intrinsic"]).all()
    status, encoded = encode_labels(row, info, labels, CodecConfig())
    assert (
        not status["ok"]
        and status["stage"] == "encode"
        and "intrinsic" in status["reason"]
        and encoded is None
    )

    labels["intrinsic"] = np.nan_to_num(labels["intrinsic"], posinf=100.0)
    status, encoded = encode_labels(row, info, labels, CodecConfig())
    assert status["ok"] and status["frames"] == 5 and not status["split"]
    clip = decode_encoded(encoded)
    assert clip.clip_id == "c0" and clip.frame_indices.tolist() == info["frame_indices"].tolist()
    assert clip.meta["teacher_size"] == [112, 84] and clip.frames_jpeg == info["frames_jpeg"]


# Peak RSS of a decode in a fresh interpreter (imports done first): argv = mode, corpus root, video.
# "decoder": the decoder's own frames (every frame decoded, nothing kept); "clip": the decode task.
_PEAK_RSS = """
import json, sys
import av

mode, root, video = sys.argv[1:]
if mode == "clip":
    from geovr.pipeline.tasks import decode_clip
    from geovr.pipeline import labeler  # noqa: F401  (decode_clip imports it: not part of the peak)
    from geovr.corpus.config import SamplingConfig

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

base = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS
result = {}
if mode == "decoder":
    with av.open(f"{root}/{video}") as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            pass
else:
    policy = SamplingConfig(fps=2.0, min_frames=4, max_frames=32).policy()
    status_, frames, info = decode_clip(video, root, policy, %d, %d, 90, (504, 28))
    result = {"frames": status_["frames"], "teacher": list(frames.shape), "meta": info["meta"]}
result["peak"] = status("VmHWM:") - base
print(json.dumps(result))
"""


def _peak_rss(mode: str, root: Path, video: str) -> dict:
    import json
    import os
    import subprocess
    import sys

    # glibc would keep up to 64 MiB of freed large blocks resident (its dynamic mmap threshold); a
    # fixed threshold returns them at once, so the peak measures what the decode holds.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    script = _PEAK_RSS % BUDGET
    out = subprocess.run(
        [sys.executable, "-c", script, mode, str(root), video],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.splitlines()[-1])


def test_4k_decode_task_memory_follows_the_output_sizes(tmp_path: Path) -> None:
    """A 4K clip's decode task stays within `decode_frames`' stated bound: outputs + 8HW + 8H*max(w)
    + the decoder's own frames (measured here by decoding the whole clip without keeping a frame)."""
    height, width = 2160, 3840
    ys, xs = np.ogrid[0:height, 0:width]
    base = np.stack([(xs // 8 + ys // 4 + shift).astype(np.uint8) for shift in (0, 85, 170)], axis=-1)
    with av.open(str(tmp_path / "4k.mp4"), "w") as container:  # 16 frames, 4 s: 8 sampled at 2 fps
        stream = container.add_stream("libx264", rate=4, options={"preset": "ultrafast", "crf": "28"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(16):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.roll(base, 16 * i, axis=1))):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    del base

    decoder = _peak_rss("decoder", tmp_path, "4k.mp4")["peak"]
    clip = _peak_rss("clip", tmp_path, "4k.mp4")
    frames = clip["frames"]
    student_w, student_h = clip["meta"]["student_size"]
    assert clip["meta"]["source_size"] == [width, height] and frames == 8
    assert clip["teacher"] == [8, 280, 504, 3] and (student_h, student_w) == student_frame_size(
        8, height, width
    )
    outputs = frames * 3 * (280 * 504 + student_h * student_w)
    bound = decoder + outputs + 8 * height * width + 8 * height * max(504, student_w)
    full_frames = decoder + frames * 3 * height * width  # what keeping the decoded frames costs
    assert bound < full_frames  # the bound is tighter than the old behaviour, so the test has teeth
    assert clip["peak"] <= bound, (
        f"peak {clip['peak'] / 1e6:.0f} MB > bound {bound / 1e6:.0f} MB (decoder {decoder / 1e6:.0f} MB, "
        f"outputs {outputs / 1e6:.0f} MB)"
    )


def _write_rotated(path: Path, frames: np.ndarray, degrees: float, hflip: bool = False) -> Path:
    """Encode frames (stored as given) with a display matrix rotating them `degrees` counterclockwise."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=4)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.set_display_rotation(degrees, hflip=hflip)
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# PyAV's rotation (counterclockwise degrees) -> (recorded rotation, where the stored top-left corner is shown).
ROTATIONS = {
    0: (0, "top-left"),
    90: (90, "bottom-left"),
    -90: (270, "top-right"),  # a phone's portrait video (90 degrees clockwise)
    180: (180, "bottom-right"),
    270: (270, "top-right"),
}


@pytest.mark.parametrize("degrees", list(ROTATIONS))
def test_display_rotation_is_applied_at_decode_and_recorded(tmp_path: Path, degrees: int) -> None:
    from geovr.eval.vsibench import read_video_frames
    from geovr.pipeline.labeler import teacher_size
    from geovr.pipeline.tasks import decode_clip

    stored = smooth_frames(10, 96, 160)
    stored[:, :24, :24] = 255  # a white stored top-left corner shows where the picture went
    _write_rotated(tmp_path / "r.mp4", stored, degrees)
    rotation, corner = ROTATIONS[degrees]
    shown = np.rot90(stored, rotation // 90, axes=(1, 2))
    height, width = shown.shape[1:3]

    info = probe_video(tmp_path / "r.mp4")
    assert (info.width, info.height, info.rotation) == (width, height, rotation)
    decoded = decode_frames(tmp_path / "r.mp4", np.array([0, 4, 9]))
    (frames,) = decoded.outputs
    assert decoded.rotation == rotation and decoded.source_hw == (height, width) == frames.shape[1:3]
    assert np.abs(frames.astype(np.float64) - shown[[0, 4, 9]]).mean() < 3.0  # codec noise
    rows = slice(0, 16) if corner.startswith("top") else slice(height - 16, height)
    cols = slice(0, 16) if corner.endswith("left") else slice(width - 16, width)
    assert frames[:, rows, cols].min() > 200, corner
    eval_frames, _ = read_video_frames(tmp_path / "r.mp4", 3)
    assert np.array_equal(eval_frames, frames)

    policy = SamplingConfig(fps=2.0, min_frames=4, max_frames=8).policy()
    status, teacher, clip = decode_clip("r.mp4", str(tmp_path), policy, *BUDGET, 90, teacher_resize=(112, 28))
    assert status["ok"] and clip["meta"]["rotation"] == rotation
    assert clip["meta"]["source_size"] == [width, height]
    student_hw = student_frame_size(len(teacher), height, width)
    assert clip["meta"]["student_size"] == [student_hw[1], student_hw[0]]
    _, full, _ = decode_clip("r.mp4", str(tmp_path), policy, *BUDGET, 90)
    expected = resize_frames(full, teacher.shape[1:3])  # rotate, then resize
    assert teacher.shape[1:3] == teacher_size(height, width, 112, 28)
    # Resized before the rotation: PIL resamples rows, rounds, then columns, so a quarter turn changes
    # the rounding (measured: mean 0.12, at most 5 levels, at the white corner's edges).
    error = np.abs(teacher.astype(np.int64) - expected)
    assert error.mean() < 0.5 and error.max() <= 8


@pytest.mark.parametrize(("degrees", "hflip"), [(45, False), (90, True)])
def test_display_matrices_that_are_not_quarter_turns_are_refused(tmp_path: Path, degrees, hflip) -> None:
    path = _write_rotated(tmp_path / "m.mp4", smooth_frames(4, 64, 96), degrees, hflip=hflip)
    for call in (lambda: probe_video(path), lambda: decode_frames(path, np.arange(2))):
        with pytest.raises(VideoError) as err:
            call()
        assert err.value.reason == "unsupported-rotation" and "m.mp4" in str(err.value)
