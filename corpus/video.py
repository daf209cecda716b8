"""Video probing, decoding (PyAV) and frame sampling for the precompute.

Three steps, each usable on its own:

1. `probe_video(path) -> VideoInfo`: demuxes the video stream without decoding it (cheap: packet
   headers only) to get the exact frame count and every frame's presentation time, then decodes
   the first frame to prove the stream is readable. Variable frame rate is detected from the
   timestamps, not from the container's nominal rate.
2. `SamplingConfig` + `sample_indices(timestamps, cfg)`: which frames a clip keeps. GeoVR's policy:
   2 frames per second of video, at least 4 and at most 32, spread uniformly *in time* (for a
   constant frame rate this is `linspace(0, N-1, n)` rounded; for a variable frame rate the frame
   nearest each target time is taken, so a burst of frames does not get over-sampled).
   `select_space_aware(...)` is the optional Spatial-MLLM policy: from a denser candidate set,
   greedy maximum coverage of the voxels of the teacher's reconstruction.
3. `decode_frames(path, indices, sizes=...) -> DecodedFrames`: decodes once, front to back, keeping
   only the wanted frames, each converted to RGB and resized to the requested output sizes as soon
   as it is decoded (grayscale, 10-bit, odd sizes and mid-stream size changes all come out as
   (S, h, w, 3) uint8), so memory follows the output sizes, not the source (bound in its docstring).

Rotation: a stream whose display matrix rotates the picture (phones store portrait video as
landscape plus a 90-degree matrix) is decoded as players show it. Sizes are those of the displayed
frames everywhere (`VideoInfo`, `DecodedFrames.source_hw`, output sizes), and the applied rotation
is reported (counterclockwise degrees, 0/90/180/270, as PyAV's `VideoFrame.rotation` counts them).
A matrix that is not a multiple of 90 degrees, or that mirrors the picture, is refused
(`unsupported-rotation`).

Errors are `VideoError(stage, reason, detail)` with a short machine-readable `reason`
(`missing`, `broken-link` (a dangling symlink), `symlink-loop`, `not-a-file` (e.g. a folder named
`x.mp4`), `unreadable` (permission denied), `empty`, `corrupt`, `no-video-stream`, `too-short`,
`unsupported-rotation`) so failure records can be grouped.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image

from geovr.corpus.config import SamplingConfig
from geovr.teacher_cache.frames import display_rotated

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v", ".mpg", ".mpeg")

# Relative spread of frame intervals above which a stream counts as variable frame rate.
_VFR_TOLERANCE = 0.05


class VideoError(Exception):
    """A video cannot be used. `stage` is where it failed ("probe" or "decode"), `reason` a short code."""

    def __init__(self, stage: str, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.stage = stage
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class VideoInfo:
    """What the index stores per video.

    Attributes:
        width, height: size of the displayed frames in pixels (the first frame's, after `rotation`).
        num_frames: frames in presentation order (demuxed packets that carry a timestamp).
        fps: average frame rate, (num_frames - 1) / (last - first timestamp); the nominal rate
            for a single-frame video.
        duration_s: last - first timestamp + one average frame interval, seconds.
        variable_frame_rate: whether frame intervals vary by more than 5%.
        codec, pix_fmt: the stream's codec and pixel format names.
        rotation: counterclockwise degrees (0, 90, 180, 270) the display matrix rotates the stored
            frames by (a phone's portrait video: 270, i.e. 90 degrees clockwise).
    """

    width: int
    height: int
    num_frames: int
    fps: float
    duration_s: float
    variable_frame_rate: bool
    codec: str
    pix_fmt: str
    rotation: int = 0


def _open(path: Path, stage: str) -> av.container.InputContainer:
    if path.is_symlink() and not path.exists():
        raise VideoError(stage, *_broken_link(path))
    if not path.exists():
        raise VideoError(stage, "missing", f"{path} does not exist")
    if not path.is_file():  # a folder, a FIFO (opening it would block) or a device
        kind = "a folder" if path.is_dir() else "not a regular file"
        raise VideoError(stage, "not-a-file", f"{path} is {kind}")
    if path.stat().st_size == 0:
        raise VideoError(stage, "empty", f"{path} is an empty file")
    try:
        return av.open(str(path), mode="r")
    except PermissionError:  # before OSError: av's own PermissionError is both
        raise VideoError(stage, "unreadable", f"{path}: permission denied") from None
    except (av.FFmpegError, UnicodeDecodeError, OSError) as err:
        raise VideoError(stage, "corrupt", f"{path}: cannot open container ({err})") from None


def _broken_link(path: Path) -> tuple[str, str]:
    """(reason, detail) of a symlink that leads nowhere."""
    try:
        path.stat()
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symlink-loop", f"{path} is a symlink loop"
    return "broken-link", f"{path} is a dangling symlink (to {os.readlink(path)}, which does not exist)"


def _video_stream(container: av.container.InputContainer, path: Path, stage: str) -> av.VideoStream:
    if not container.streams.video:
        raise VideoError(stage, "no-video-stream", f"{path} has no video stream")
    return container.streams.video[0]


def frame_rotation(frame: av.VideoFrame, path: Path, stage: str) -> int:
    """Counterclockwise degrees (0, 90, 180, 270) that show `frame` as players do, from its display
    matrix. Raises `VideoError(reason="unsupported-rotation")` for other angles and for mirroring."""
    for side_data in frame.side_data:
        if side_data.type == av.sidedata.sidedata.Type.DISPLAYMATRIX:
            # 3x3 row-major int32; the 2x2 part a b / c d (16.16 fixed point) mirrors when its determinant < 0.
            a, b, _, c, d = np.frombuffer(bytes(side_data), dtype="<i4", count=5).astype(np.int64)
            if a * d - b * c < 0:
                raise VideoError(
                    stage, "unsupported-rotation", f"{path}: the display matrix mirrors the picture"
                )
    angle = frame.rotation
    quarter = round(angle / 90)
    if abs(angle - 90 * quarter) > 1:
        raise VideoError(
            stage,
            "unsupported-rotation",
            f"{path}: display rotation of {angle} degrees is not a multiple of 90",
        )
    return 90 * (quarter % 4)


def read_timestamps(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Presentation timestamps of every frame, by demuxing only (no decoding).

    Returns:
        pts: (N,) int64 sorted presentation timestamps in the stream's time base.
        seconds: (N,) float64 the same, in seconds from the first frame.
    """
    path = Path(path)
    with _open(path, "probe") as container:
        stream = _video_stream(container, path, "probe")
        time_base = stream.time_base
        stamps = []
        try:
            for packet in container.demux(stream):
                if packet.size == 0:  # the flush packet at the end of the stream
                    continue
                stamp = packet.pts if packet.pts is not None else packet.dts
                if stamp is not None:
                    stamps.append(stamp)
        except av.FFmpegError as err:
            raise VideoError("probe", "corrupt", f"{path}: demuxing failed ({err})") from None
    if not stamps:
        raise VideoError("probe", "empty", f"{path} has no video frames")
    pts = np.unique(np.asarray(stamps, dtype=np.int64))
    seconds = (pts - pts[0]).astype(np.float64) * float(time_base)
    return pts, seconds


def probe_video(path: str | Path) -> VideoInfo:
    """Frame count, timing and size of a video; decodes only its first frame. Raises `VideoError`."""
    path = Path(path)
    _, seconds = read_timestamps(path)
    with _open(path, "probe") as container:
        stream = _video_stream(container, path, "probe")
        codec = stream.codec_context.name
        try:
            first = next(container.decode(stream), None)
        except av.FFmpegError as err:
            raise VideoError("probe", "corrupt", f"{path}: the first frame does not decode ({err})") from None
        if first is None:
            raise VideoError("probe", "corrupt", f"{path}: no frame decodes")
        rotation = frame_rotation(first, path, "probe")
        width, height, pix_fmt = first.width, first.height, first.format.name
        if rotation in (90, 270):
            width, height = height, width
        nominal = float(stream.average_rate) if stream.average_rate else 0.0
    num_frames = len(seconds)
    if num_frames > 1:
        intervals = np.diff(seconds)
        fps = (num_frames - 1) / float(seconds[-1])
        variable = bool(intervals.std() > _VFR_TOLERANCE * intervals.mean())
    else:
        fps, variable = nominal, False
    duration = float(seconds[-1]) + (1.0 / fps if fps > 0 else 0.0)
    return VideoInfo(
        width=width,
        height=height,
        num_frames=num_frames,
        fps=fps,
        duration_s=duration,
        variable_frame_rate=variable,
        codec=codec,
        pix_fmt=pix_fmt,
        rotation=rotation,
    )


def duration_of(seconds: np.ndarray) -> float:
    """Duration of a clip from its frame times (N,) seconds: last time + one mean frame interval."""
    n = len(seconds)
    return float(seconds[-1]) * n / (n - 1) if n > 1 else 0.0


def num_sampled_frames(duration_s: float, num_frames: int, cfg: SamplingConfig) -> int:
    """How many frames a clip keeps: round(duration * fps) clamped to [min, max] and to the frames available."""
    wanted = min(max(round(duration_s * cfg.fps), cfg.min_frames), cfg.max_frames)
    return min(wanted, num_frames)


def uniform_in_time(seconds: np.ndarray, count: int) -> np.ndarray:
    """`count` strictly increasing frame indices whose timestamps are nearest to `count` instants
    spread uniformly from the first to the last frame. (N,) float64 -> (count,) int64, count <= N."""
    n = len(seconds)
    if count > n:
        raise ValueError(f"cannot pick {count} distinct frames out of {n}")
    if count == 1:
        return np.zeros(1, dtype=np.int64)
    targets = np.linspace(seconds[0], seconds[-1], count)
    right = np.clip(np.searchsorted(seconds, targets), 1, n - 1)
    nearest = np.where(targets - seconds[right - 1] <= seconds[right] - targets, right - 1, right)
    # Nearest frames can coincide when frames are sparse around a target: push them apart,
    # forwards then backwards, which keeps the order and stays within [0, N).
    indices = nearest.astype(np.int64)
    for k in range(1, count):
        indices[k] = max(indices[k], indices[k - 1] + 1)
    for k in range(count - 1, -1, -1):
        indices[k] = min(indices[k], n - count + k)
        if k + 1 < count:
            indices[k] = min(indices[k], indices[k + 1] - 1)
    return indices


def sample_indices(seconds: np.ndarray, cfg: SamplingConfig, path: str | Path = "") -> np.ndarray:
    """Frames to decode for a clip with frame times `seconds` (N,) float64 -> (n,) int64.

    Uniform: the `n` kept frames. Space-aware: the candidate set (`cfg.candidate_frames`, or all
    frames of a shorter video) from which the teacher's reconstruction picks `n`.
    Raises `VideoError(reason="too-short")` when the video has fewer than `min_frames` frames.
    """
    n_frames = len(seconds)
    if n_frames < cfg.min_frames:
        raise VideoError(
            "sample", "too-short", f"{path}: {n_frames} frames, at least {cfg.min_frames} are needed"
        )
    count = num_sampled_frames(duration_of(seconds), n_frames, cfg)
    if cfg.method == "space_aware":
        count = min(max(count, cfg.candidate_frames), n_frames)
    return uniform_in_time(seconds, count)


@dataclass
class DecodedFrames:
    """The sampled frames of a clip, as players show them, at the requested output sizes.

    Attributes:
        outputs: one (S, h, w, 3) uint8 RGB array per requested size, in the order of `sizes`.
        seconds: (S,) float64 presentation times from the first frame.
        source_hw: (H, W) of the displayed source frames (after `rotation`; the first frame's).
        rotation: counterclockwise degrees (0, 90, 180, 270) applied to the stored frames.
    """

    outputs: list[np.ndarray]
    seconds: np.ndarray
    source_hw: tuple[int, int]
    rotation: int


# (H, W) of the displayed source frame -> the (h, w) of every output, in order.
OutputSizes = Callable[[int, int], Sequence[tuple[int, int]]]


def _frame_outputs(
    frame: av.VideoFrame, coded_wh: tuple[int, int], rotation: int, sizes: Sequence[tuple[int, int]]
) -> list[np.ndarray]:
    """One decoded frame converted to RGB, resized to each output size (PIL bicubic; the displayed
    (h, w) given) and rotated for display. The conversion is at the first frame's coded size: gray,
    10-bit, yuv444 and odd sizes all become RGB, and a stream whose resolution changes mid-way keeps
    its first size. One source-size image is held (RGBX, 4 bytes a pixel): swscale writes it and PIL
    reads it without a copy."""
    rgbx = np.ascontiguousarray(frame.to_ndarray(width=coded_wh[0], height=coded_wh[1], format="rgba"))
    image = Image.frombuffer("RGBX", coded_wh, rgbx, "raw", "RGBX", 0, 1)
    outputs = []
    for height, width in sizes:
        coded_out = (width, height) if rotation in (0, 180) else (height, width)
        if coded_out == coded_wh:
            resized = rgbx[..., :3]
        else:  # rgba -> RGBX -> RGB resizes bit-identically to rgb24 -> RGB (the alpha byte is a pad)
            resized = np.asarray(image.resize(coded_out, Image.Resampling.BICUBIC).convert("RGB"))
        outputs.append(display_rotated(resized, rotation))
    return outputs


def decode_frames(
    path: str | Path,
    indices: np.ndarray,
    timestamps: tuple[np.ndarray, np.ndarray] | None = None,
    sizes: OutputSizes | None = None,
    threads: int = 0,
) -> DecodedFrames:
    """Decode the frames at `indices` (positions in presentation order, as `read_timestamps` counts them).

    `timestamps`: `read_timestamps(path)` when the caller has it already (saves a demux pass).
    `sizes`: maps the displayed source (H, W) to the output sizes; None gives one output at (H, W).
    `threads`: FFmpeg decoder threads; 0 lets FFmpeg choose (one per core, whatever else runs).

    Memory: each frame is converted and resized as soon as it is decoded, into output arrays
    allocated once, so the decode holds at most, in bytes, with (H, W) the source size and
    (h_k, w_k) the output sizes:

        S * sum_k 3 * h_k * w_k      the outputs
        + 8 * H * W                  one source-size frame: RGBX (4 * H * W) and swscale's buffers
        + 8 * H * max_k w_k          PIL's resampling of it: the horizontal pass at the source
                                     height, then the result (W and h_k for a 90/270 rotation)
        + the decoder's own frames   reference and frame-thread buffers: per stream, independent of
                                     S and of the outputs (measured: 96 MB, 4K H.264, 2 threads)

    A 32-frame 4K clip for the 504-pixel teacher and GeoVR's student budget: 41 MB of outputs +
    66 MB + 13 MB + the decoder's, where full-size frames took 32 * 25 MB (plus a stacked copy).
    tests/test_precompute_video.py measures it (peak RSS of a 4K decode task).

    Returns `DecodedFrames`. Raises `VideoError` ("corrupt", "unsupported-rotation", ...).
    """
    path = Path(path)
    pts, seconds = timestamps if timestamps is not None else read_timestamps(path)
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size == 0 or indices.min() < 0 or indices.max() >= len(pts):
        raise ValueError(f"{path}: frame indices out of range [0, {len(pts)})")
    position_of = {int(p): i for i, p in enumerate(pts)}
    wanted, slot_of = np.unique(indices, return_inverse=True)
    slot = {int(position): k for k, position in enumerate(wanted)}
    filled = np.zeros(len(wanted), dtype=bool)
    outputs: list[np.ndarray] = []
    out_sizes: list[tuple[int, int]] | None = None
    coded_wh, source_hw, rotation = (0, 0), (0, 0), 0
    with _open(path, "decode") as container:
        stream = _video_stream(container, path, "decode")
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
        counter = 0
        try:
            for frame in container.decode(stream):
                position = position_of.get(frame.pts, counter) if frame.pts is not None else counter
                counter = position + 1
                if out_sizes is None:  # the first frame fixes the size, rotation and output buffers
                    rotation = frame_rotation(frame, path, "decode")
                    coded_wh = (frame.width, frame.height)
                    source_hw = coded_wh if rotation in (90, 270) else coded_wh[::-1]
                    out_sizes = list(sizes(*source_hw)) if sizes is not None else [source_hw]
                    outputs = [np.empty((len(wanted), h, w, 3), dtype=np.uint8) for h, w in out_sizes]
                k = slot.get(position)
                if k is not None and not filled[k]:
                    for output, image in zip(
                        outputs, _frame_outputs(frame, coded_wh, rotation, out_sizes), strict=True
                    ):
                        output[k] = image
                    filled[k] = True
                if position >= wanted[-1] and filled.all():
                    break
        except av.FFmpegError as err:
            raise VideoError(
                "decode", "corrupt", f"{path}: decoding failed after {counter} frames ({err})"
            ) from None
    if not filled.all():
        missing = wanted[~filled]
        raise VideoError(
            "decode",
            "corrupt",
            f"{path}: {len(missing)} of {len(wanted)} sampled frames did not decode (first missing: {missing[0]})",
        )
    if len(wanted) != len(indices) or not np.array_equal(wanted, indices):
        outputs = [output[slot_of] for output in outputs]
    return DecodedFrames(outputs, seconds[indices], source_hw, rotation)


def select_space_aware(
    depth: np.ndarray,
    depth_conf: np.ndarray,
    extrinsic: np.ndarray,
    intrinsic: np.ndarray,
    teacher_hw: tuple[int, int],
    count: int,
    voxel_size: float,
) -> np.ndarray:
    """Spatial-MLLM frame selection: greedy maximum voxel coverage over the candidates' reconstruction.

    Each candidate frame's confident pixels (confidence above the clip's median) are unprojected to
    the first candidate's camera frame and voxelised; frames are then picked one at a time, each
    time the one adding the most voxels not yet covered (ties: the earliest), until `count` frames.

    Args:
        depth, depth_conf: (C, Hd, Wd) teacher depth and confidence of the C candidates.
        extrinsic: (C, 3, 4) camera-from-world; intrinsic: (C, 3, 3) at the teacher size `teacher_hw`.
        count: frames to keep (<= C).
    Returns:
        (count,) int64 positions into the candidates, increasing (time order).
    """
    num, height, width = depth.shape
    scale = np.array([width / teacher_hw[1], height / teacher_hw[0], 1.0])[:, None]
    ys, xs = np.meshgrid(
        np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij"
    )
    threshold = float(np.median(depth_conf))
    voxel_sets: list[np.ndarray] = []
    for i in range(num):
        k = intrinsic[i].astype(np.float64) * scale  # intrinsics at the depth resolution
        mask = (depth_conf[i] > threshold) & np.isfinite(depth[i]) & (depth[i] > 0)
        z = depth[i][mask].astype(np.float64)
        cam = np.stack([(xs[mask] - k[0, 2]) / k[0, 0] * z, (ys[mask] - k[1, 2]) / k[1, 1] * z, z], axis=-1)
        rot, trans = extrinsic[i][:, :3].astype(np.float64), extrinsic[i][:, 3].astype(np.float64)
        world = (cam - trans) @ rot  # R^T (X_cam - t), row vectors
        keys = np.floor(world / voxel_size).astype(np.int64)
        voxel_sets.append(np.unique(keys, axis=0).view([("", np.int64)] * 3).ravel())
    covered = np.zeros(0, dtype=voxel_sets[0].dtype if voxel_sets else np.int64)
    chosen: list[int] = []
    for _ in range(min(count, num)):
        gains = [
            -1 if i in chosen else int(np.setdiff1d(voxel_sets[i], covered, assume_unique=True).size)
            for i in range(num)
        ]
        best = int(np.argmax(gains))
        chosen.append(best)
        covered = np.union1d(covered, voxel_sets[best])
    return np.sort(np.asarray(chosen, dtype=np.int64))


def is_video_file(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS
