"""Teacher-label store: round trips in both backends, conversion, commit atomicity under SIGKILL,
`cache verify` on damaged stores, schema and fingerprint refusals. Real Zarr v3 and tar files."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from geovr.teacher_cache.codecs import CodecConfig
from geovr.teacher_cache.convert import convert_store
from geovr.teacher_cache.frames import encode_jpeg
from geovr.teacher_cache.records import ClipFailure
from geovr.teacher_cache.schema import ClipLabels, SchemaError, StoreFingerprint
from geovr.teacher_cache.store import (
    DONE_DIR,
    REVISION_GRACE_S,
    TMP_DIR,
    open_store,
    open_writer,
    shard_path,
)
from geovr.teacher_cache.verify import store_stats, verify_store
from tests.helpers import clip_labels

CLI = str(Path(sys.executable).parent / "geovr-pipeline")
FORMATS = ("zarr", "wds")
FINGERPRINT = StoreFingerprint(
    teacher="vggt-tiny",
    checkpoint_sha256="ab" * 32,
    teacher_config={"depth": 2},
    metric_teacher="",
    preprocess={"teacher_long_side": 56},
    sampling={"fps": 2.0, "min_frames": 4, "max_frames": 4},
    feature_layers=(0, 1),
)


def make_clip(index: int, frames: int = 4, depth_hw: tuple[int, int] = (12, 16), seed: int = 0) -> ClipLabels:
    """A tiny clip: 2 layers of a 3x4 grid with 16 channels (one 100x outlier channel)."""
    rng = np.random.default_rng(seed * 1000 + index)
    features = rng.standard_normal((frames, 2, 3, 4, 16)).astype(np.float32)
    features[..., 5] *= 100.0
    return clip_labels(
        frames,
        clip_id=f"{index:016x}",
        video=f"scene_{index}.mp4",
        frame_indices=np.arange(frames, dtype=np.int64) * 7 + index,
        timestamps=np.arange(frames) * 0.5 + index / 3,
        frames_jpeg=[encode_jpeg(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(frames)],
        pose_enc=rng.standard_normal((frames, 9)).astype(np.float32),
        extrinsic=rng.standard_normal((frames, 3, 4)).astype(np.float32),
        intrinsic=rng.standard_normal((frames, 3, 3)).astype(np.float32),
        depth=np.exp(rng.uniform(-1, 2, (frames, *depth_hw))).astype(np.float32),
        depth_conf=(1 + np.exp(rng.normal(0, 1.5, (frames, *depth_hw)))).astype(np.float32),
        scale=float("nan") if index % 3 == 0 else 1.0 + index,
        scale_valid=index % 3 != 0,
        features=features,
        meta={"source_size": [64, 48], "index": index},
    )


FAILURE = {
    "clip_id": "00000000deadbeef",
    "video": "broken.mp4",
    "stage": "decode",
    "reason": "moov atom not found",
}


def write_two_shards(root: Path, store_format: str) -> list[ClipLabels]:
    clips = [make_clip(i) for i in range(5)]
    with open_writer(root, FINGERPRINT, store_format) as writer:
        writer.write_shard("000000", clips[:3], [ClipFailure(**FAILURE)])
        writer.write_shard("000001", clips[3:], [])
    return clips


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def assert_within_codec_tolerance(got: ClipLabels, want: ClipLabels) -> None:
    for name in ("clip_id", "video", "frames_jpeg", "scale_valid", "meta"):
        assert getattr(got, name) == getattr(want, name), name
    for name in ("frame_indices", "timestamps", "pose_enc", "extrinsic", "intrinsic"):
        value = getattr(got, name)
        assert value.dtype == getattr(want, name).dtype, name
        np.testing.assert_array_equal(value, getattr(want, name), err_msg=name)
    assert (math.isnan(got.scale) and math.isnan(want.scale)) or got.scale == want.scale
    assert got.depth.dtype == np.float32 and got.depth.shape == want.depth.shape
    assert np.max(np.abs(got.depth / want.depth - 1)) <= 2.0**-11 * 1.01
    assert np.max(np.abs(np.log(got.depth_conf / want.depth_conf))) <= 0.03
    assert got.features.dtype == np.float32 and got.features.shape == want.features.shape
    assert cosine(got.features, want.features).min() >= 0.995


def assert_same_clip(a: ClipLabels, b: ClipLabels) -> None:
    """Bit-for-bit equal decoded labels (NaN scale equal to NaN)."""
    for name in ("clip_id", "video", "frames_jpeg", "scale_valid", "meta"):
        assert getattr(a, name) == getattr(b, name), name
    for name in (
        "frame_indices",
        "timestamps",
        "pose_enc",
        "extrinsic",
        "intrinsic",
        "depth",
        "depth_conf",
        "features",
    ):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert (math.isnan(a.scale) and math.isnan(b.scale)) or a.scale == b.scale


@pytest.mark.parametrize("store_format", FORMATS)
def test_round_trip_every_field(tmp_path, store_format):
    root = tmp_path / "store"
    clips = write_two_shards(root, store_format)
    reader = open_store(root)
    assert reader.format == store_format and reader.fingerprint == FINGERPRINT
    assert reader.shards() == ["000000", "000001"]
    assert reader.clip_ids() == [c.clip_id for c in clips]
    assert reader.failures() == [{**FAILURE, "shard_id": "000000"}]
    for clip in clips:  # random access by id
        assert_within_codec_tolerance(reader.read_clip(clip.clip_id), clip)
    streamed = list(reader.iter_clips())  # streaming (webdataset for tar shards)
    assert [c.clip_id for c in streamed] == [c.clip_id for c in clips]
    for got, by_id in zip(streamed, clips, strict=True):
        assert_same_clip(got, reader.read_clip(by_id.clip_id))
    with pytest.raises(KeyError, match="no clip"):
        reader.read_clip("ffffffffffffffff")

    stats = store_stats(root)
    assert (stats["shards"], stats["clips"], stats["frames"], stats["failures"]) == (2, 5, 20, 1)
    assert stats["failures_by_stage"] == {"decode": 1}
    on_disk = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and DONE_DIR not in p.parts)
    on_disk -= sum(p.stat().st_size for p in (root / "store.json", root / "zarr.json") if p.exists())
    assert stats["total_bytes"] == on_disk
    assert all(stats["bytes"][f] > 0 for f in ("frames_jpeg", "features", "depth", "depth_conf", "cameras"))


@pytest.mark.parametrize("store_format", FORMATS)
def test_clips_of_different_sizes_and_bad_clips_in_one_shard(tmp_path, store_format):
    root = tmp_path / "store"
    writer = open_writer(root, FINGERPRINT, store_format)
    small, large = make_clip(1, frames=3, depth_hw=(6, 8)), make_clip(2, frames=5, depth_hw=(12, 16))
    bad = replace(make_clip(3), pose_enc=np.zeros((2, 9), np.float32))
    marker = writer.write_shard("000007", [small, bad, large], [])
    assert marker["num_clips"] == 2 and marker["num_failures"] == 1
    failure = open_store(root).failures()[0]
    assert (
        failure["clip_id"] == bad.clip_id and failure["stage"] == "encode" and "pose_enc" in failure["reason"]
    )
    reader = open_store(root)
    assert_within_codec_tolerance(reader.read_clip(small.clip_id), small)
    assert_within_codec_tolerance(reader.read_clip(large.clip_id), large)
    with pytest.raises(ValueError, match="already committed"):
        writer.write_shard("000007", [small], [])


def test_convert_both_ways_copies_encoded_payloads(tmp_path):
    source = tmp_path / "zarr"
    clips = write_two_shards(source, "zarr")
    as_wds = tmp_path / "wds"
    back = tmp_path / "zarr_again"
    assert convert_store(source, as_wds, "wds") == {"shards_written": 2, "shards_skipped": 0, "clips": 5}
    assert convert_store(as_wds, back, "zarr")["clips"] == 5
    assert convert_store(as_wds, back, "zarr") == {"shards_written": 0, "shards_skipped": 2, "clips": 0}

    readers = [open_store(p) for p in (source, as_wds, back)]
    assert [r.format for r in readers] == ["zarr", "wds", "zarr"]
    for reader in readers[1:]:
        assert reader.fingerprint == FINGERPRINT and reader.codecs == readers[0].codecs
        assert reader.failures() == readers[0].failures()
        assert reader.clip_ids() == readers[0].clip_ids()
    for clip in clips:
        encoded = [r.read_encoded(clip.clip_id) for r in readers]
        for other in encoded[1:]:
            assert other.arrays.keys() == encoded[0].arrays.keys()
            for name, array in encoded[0].arrays.items():
                assert other.arrays[name].dtype == array.dtype
                np.testing.assert_array_equal(other.arrays[name], array, err_msg=name)
        decoded = [r.read_clip(clip.clip_id) for r in readers]
        assert_within_codec_tolerance(decoded[0], clip)
        assert_same_clip(decoded[1], decoded[0])
        assert_same_clip(decoded[2], decoded[0])
    for path in (as_wds, back):
        assert verify_store(path).ok


def test_cli_convert_and_stats(tmp_path, cli):
    source, target = tmp_path / "zarr", tmp_path / "wds"
    write_two_shards(source, "zarr")
    result = cli("cache", "convert", str(source), str(target), "--format", "wds")
    assert result.exit_code == 0, result.output
    assert "2 shards written" in result.stdout
    result = cli("cache", "stats", str(target), "--json")
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert stats["format"] == "wds" and (stats["clips"], stats["frames"], stats["failures"]) == (5, 20, 1)
    assert stats["bytes_per_frame"]["features"] == stats["bytes"]["features"] / 20
    expected = open_store(source)
    for clip_id in expected.clip_ids():
        assert_same_clip(open_store(target).read_clip(clip_id), expected.read_clip(clip_id))


def test_schema_version_mismatch_is_a_clear_error(tmp_path, cli):
    root = tmp_path / "store"
    write_two_shards(root, "wds")
    meta = json.loads((root / "store.json").read_text())
    meta["fingerprint"]["schema_version"] = 99
    (root / "store.json").write_text(json.dumps(meta))
    with pytest.raises(SchemaError, match="schema version 99, this code reads version 1"):
        open_store(root)
    with pytest.raises(SchemaError, match="schema version 99"):
        open_writer(root, FINGERPRINT, "wds")
    result = cli("cache", "verify", str(root))
    assert result.exit_code == 1 and "schema version 99" in result.stderr


def test_writer_refuses_another_fingerprint_naming_each_differing_key(tmp_path):
    root = tmp_path / "store"
    with open_writer(root, FINGERPRINT, "zarr") as writer:
        writer.write_shard("000000", [make_clip(1)], [])
    other = replace(
        FINGERPRINT,
        checkpoint_sha256="cd" * 32,
        feature_layers=(4, 11),
        preprocess={"teacher_long_side": 112, "student_frames": {"max_tokens": 300}},
    )
    refusal = f"{root}: the store was written with other settings (the store's != this run's); refusing to add shards: "
    with pytest.raises(SchemaError) as err:
        open_writer(root, other, "zarr")
    # Only the differing keys, nested ones as dotted paths, each with both values.
    assert str(err.value) == refusal + (
        f"checkpoint_sha256: {'ab' * 32!r} != {'cd' * 32!r}; preprocess.teacher_long_side: 56 != 112; "
        "preprocess.student_frames: (absent) != {'max_tokens': 300}; feature_layers: [0, 1] != [4, 11]"
    )
    with pytest.raises(SchemaError) as err:
        open_writer(root, FINGERPRINT, "wds")
    assert str(err.value) == refusal + "format: 'zarr' != 'wds'"
    with pytest.raises(SchemaError) as err:
        open_writer(root, FINGERPRINT, "zarr", codecs=CodecConfig(feature_token_steps=4.0))
    assert str(err.value) == refusal + "codecs.feature_token_steps: 5.0 != 4.0"
    # Another code version is not a different fingerprint, and the store keeps its codecs: resume goes on.
    writer = open_writer(root, replace(FINGERPRINT, code_version="9.9"), "zarr")
    assert writer.committed_shards() == {"000000"} and writer.codecs == CodecConfig()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The installed `geovr-pipeline` in a subprocess (imports every area: several seconds a call)."""
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def cli():
    """The same typer app, in process (for the cheaper checks)."""
    from typer.testing import CliRunner

    from geovr.app.commands.cache import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args))


@pytest.mark.parametrize("store_format", FORMATS)
def test_verify_names_a_shard_with_a_flipped_byte_and_a_deleted_shard(tmp_path, store_format, cli):
    root = tmp_path / "store"
    write_two_shards(root, store_format)
    result = cli("cache", "verify", str(root))
    assert result.exit_code == 0 and "OK: 2 shards, 5 clips, 20 frames" in result.stdout

    shard = root / ("000000" if store_format == "zarr" else "000000.tar")
    victim = max(
        (p for p in ([shard] if shard.is_file() else shard.rglob("*")) if p.is_file()),
        key=lambda p: p.stat().st_size,
    )
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    result = cli("cache", "verify", str(root))
    assert result.exit_code == 1
    assert "BAD shard 000000" in result.stderr and "sha256" in result.stderr
    assert "000001" not in result.stderr

    other = root / ("000001" if store_format == "zarr" else "000001.tar")
    shutil.rmtree(other) if other.is_dir() else other.unlink()
    result = run_cli("cache", "verify", str(root))  # the installed command, in a subprocess
    assert result.returncode == 1
    assert "BAD shard 000000" in result.stderr and "sha256" in result.stderr
    assert "BAD shard 000001: shard data" in result.stderr and "missing" in result.stderr
    assert "2 bad shards: 000000, 000001" in result.stdout


KILLED_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_cache_store import FINGERPRINT, make_clip
    from geovr.teacher_cache.store import open_writer

    writer = open_writer({root!r}, FINGERPRINT, {store_format!r})
    writer.write_shard("000000", [make_clip(0), make_clip(1)], [])
    print("committed", flush=True)
    # A big shard (incompressible 'frames') so that writing it takes a while.
    rng = np.random.default_rng(0)
    big = []
    for i in range(2, 10):
        clip = make_clip(i, frames=8)
        clip.frames_jpeg = [rng.bytes(1 << 19) for _ in range(8)]
        big.append(clip)
    writer.write_shard("000001", big, [])
    print("finished", flush=True)
    """
)


@pytest.mark.parametrize("store_format", FORMATS)
def test_writer_killed_mid_shard_leaves_no_committed_shard(tmp_path, store_format):
    root = tmp_path / "store"
    script = KILLED_WRITER.format(tests=str(Path(__file__).parent), root=str(root), store_format=store_format)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "committed"
        deadline = time.monotonic() + 60
        while not any(p.name.startswith("000001") for p in (root / TMP_DIR).iterdir()):
            assert time.monotonic() < deadline and child.poll() is None, (
                "the writer never started shard 000001"
            )
            time.sleep(0.001)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    assert any(p.name.startswith("000001") for p in (root / TMP_DIR).iterdir())  # killed mid-shard

    reader = open_store(root)
    assert reader.shards() == ["000000"]
    assert reader.clip_ids() == [make_clip(0).clip_id, make_clip(1).clip_id]
    report = verify_store(root)
    assert report.ok and report.clips_checked == 2
    assert any(w.startswith("uncommitted temporary 000001") for w in report.warnings)

    # Resume: the killed shard is simply written again.
    writer = open_writer(root, FINGERPRINT, store_format)
    assert writer.committed_shards() == {"000000"}
    writer.write_shard("000001", [make_clip(2)], [])
    assert open_store(root).shards() == ["000000", "000001"]
    assert verify_store(root).ok


@pytest.mark.parametrize("store_format", FORMATS)
def test_replacing_a_committed_shard_is_atomic(tmp_path, store_format):
    root = tmp_path / "store"
    clips = write_two_shards(root, store_format)
    writer = open_writer(root, FINGERPRINT, store_format)
    first = open_store(root).clip_ids()
    with pytest.raises(ValueError, match="already committed"):
        writer.write_shard("000000", [make_clip(7)], [])

    # A refused replacement leaves the old version committed and readable.
    with pytest.raises(ValueError, match="duplicate clip ids"):
        writer.write_shard("000000", [make_clip(8), make_clip(8)], [], replace=True)
    assert open_store(root).clip_ids() == first and verify_store(root).ok

    # A leftover revision of a killed replacement is reported, then removed by the next replacement.
    base = root / ("000000" if store_format == "zarr" else "000000.tar")
    leftover = root / ("000000.r1" if store_format == "zarr" else "000000.r1.tar")
    shutil.copytree(base, leftover) if base.is_dir() else shutil.copy(base, leftover)
    report = verify_store(root)
    assert report.ok and any(w.startswith(f"{leftover.name} is not referenced") for w in report.warnings)

    before = open_store(root)  # a reader that read the markers before the replacements
    assert_within_codec_tolerance(before.read_clip(clips[1].clip_id), clips[1])
    new = [make_clip(0, seed=3), make_clip(9)]
    marker = writer.write_shard("000000", new, [], replace=True)
    assert marker["revision"] == 1 and leftover.exists()  # the new revision took the leftover's name
    # The replaced revision stays: `before` still reads the old version, whole.
    assert_within_codec_tolerance(before.read_clip(clips[2].clip_id), clips[2])
    reader = open_store(root)
    assert reader.shards() == ["000000", "000001"]
    assert_within_codec_tolerance(reader.read_clip(new[0].clip_id), new[0])
    assert clips[1].clip_id not in reader.clip_ids()  # the new content replaces the old, whole
    report = verify_store(root)
    assert report.ok and report.clips_checked == 4
    assert [w for w in report.warnings if "is not referenced" in w] == [
        f"{base.name} is not referenced by a done marker (uncommitted or replaced; ignored by readers)"
    ]

    assert writer.write_shard("000000", [make_clip(1)], [], replace=True)["revision"] == 2
    writer.close()
    revisions = sorted(shard_path(root, store_format, "000000", r).name for r in range(3))
    shard_names = lambda: sorted(p.name for p in root.iterdir() if p.name.startswith("000000"))  # noqa: E731
    # The next writer run deletes superseded revisions, once superseded for the grace period.
    with open_writer(root, FINGERPRINT, store_format):
        assert shard_names() == revisions
    replaced_at = time.time() - REVISION_GRACE_S - 1
    os.utime(root / DONE_DIR / "000000.json", (replaced_at, replaced_at))
    with open_writer(root, FINGERPRINT, store_format):
        assert shard_names() == [shard_path(root, store_format, "000000", 2).name]
    # `before` finds its revision gone, re-reads the marker and reads the version committed now.
    assert_within_codec_tolerance(before.read_clip(clips[1].clip_id), clips[1])
    assert [c.clip_id for c in before.iter_shard("000000")] == [clips[1].clip_id]
    assert open_store(root).read_clip(make_clip(1).clip_id).video == make_clip(1).video
    report = verify_store(root)
    assert report.ok and not report.warnings
