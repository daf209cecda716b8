"""Precompute on a real Ray cluster (`ray start --head` on 127.0.0.1), tiny VGGT teacher on CPU.

One cluster for the module (its startup is the cost). Every run is the CLI in a subprocess, a driver
of that cluster: a driver must see RAY_AUTH_MODE=token before Ray reads its config, which a pytest
process that may have imported Ray already cannot guarantee.

The teacher is tiny-a with its field-of-view output fixed (`fov_fixed_teacher`): the random
camera head of tiny-a (and of tiny-b, for some clips) outputs a zero field of view through VGGT's
ReLU, i.e. an infinite focal length, which the store rightly refuses; every other weight is tiny-a's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from geovr.app.cli import _register_commands, app
from geovr.corpus.config import SamplingConfig, SynthConfig
from geovr.corpus.synth import write_corpus
from geovr.corpus.video import read_timestamps, sample_indices
from geovr.pipeline.index import build_manifest, read_manifest
from geovr.pipeline.precompute import check_committed_shards
from geovr.teacher_cache.frames import decode_jpeg, student_frame_size
from geovr.teacher_cache.schema import ClipLabels
from geovr.teacher_cache.store import open_store
from geovr.teacher_cache.verify import verify_store
from geovr.teachers.vggt import VGGT, CheckpointError
from tests.conftest import REFERENCE
from tests.test_precompute_video import write_bad_inputs

CLI = str(Path(sys.executable).with_name("geovr-pipeline"))
RAY = str(Path(sys.executable).with_name("ray"))
TINY = SamplingConfig(fps=2.0, min_frames=4, max_frames=8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env(token: bool) -> dict[str, str]:
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    if token:
        env["RAY_AUTH_MODE"] = "token"
    return env


def fov_fixed_teacher(out: Path, source: str = "tiny-a", fov: float = 1.2) -> Path:
    """A copy of a reference tiny VGGT whose camera head outputs a constant field of view `fov` (rad).

    The camera head refines the pose 4 times, adding the pose branch's output each time; with the
    FoV rows of its last layer zeroed and their bias fov/4 the FoV is exactly `fov`.
    """
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(REFERENCE / "vggt" / source / "config.json", out / "config.json")
    weights = load_file(str(REFERENCE / "vggt" / source / "model.safetensors"))
    weights["camera_head.pose_branch.fc2.weight"][7:9] = 0.0
    weights["camera_head.pose_branch.fc2.bias"][7:9] = fov / 4
    save_file(weights, str(out / "model.safetensors"))
    return out


def assert_stores_equal(a: Path, b: Path) -> None:
    """Every clip of store `a` equals the same clip of store `b`, field by field, bit for bit."""
    ra, rb = open_store(a), open_store(b)
    assert ra.fingerprint == rb.fingerprint
    assert sorted(ra.clip_ids()) == sorted(rb.clip_ids()) and ra.clip_ids()
    assert sorted(ra.shards()) == sorted(rb.shards())
    for clip_id in ra.clip_ids():
        x, y = ra.read_clip(clip_id), rb.read_clip(clip_id)
        for f in dataclasses.fields(ClipLabels):
            va, vb = getattr(x, f.name), getattr(y, f.name)
            if isinstance(va, np.ndarray):
                assert va.dtype == vb.dtype and np.array_equal(va, vb, equal_nan=True), (clip_id, f.name)
            elif isinstance(va, float) and math.isnan(va):
                assert math.isnan(vb), (clip_id, f.name)
            else:
                assert va == vb, (clip_id, f.name)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """A Ray head on 127.0.0.1 (`ray start --head --block`); drivers are CLI subprocesses.

    (The driver must see RAY_AUTH_MODE=token when Ray reads its config, before `import ray`: a
    subprocess is the reliable way inside a pytest process that may have imported Ray already.)"""
    temp_dir = Path(f"/tmp/ray_pc_{os.getpid()}")  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    command = [
        RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
        "--num-cpus=3", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}",
        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}", "--object-store-memory=300000000",
    ]  # fmt: skip
    log = tmp_path_factory.mktemp("ray") / "head.log"
    with open(log, "w") as log_file:
        head = subprocess.Popen(command, env=ray_env(False), stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in log.read_text():
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray head did not start: {log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        head.send_signal(signal.SIGTERM)  # --block: stops the processes of this head only
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six synthetic clips (10 frames, 160x120, 4 fps -> 5 kept), one per shard, and the teachers."""
    root = tmp_path_factory.mktemp("precompute")
    write_corpus(root / "corpus", SynthConfig(scenes=6, frames=10, width=160, height=120, fps=4.0, seed=0))
    build_manifest([root / "corpus" / "videos"], root / "m.parquet", TINY, clips_per_shard=1, workers=1)
    fov_fixed_teacher(root / "teacher")
    return root


def precompute(
    address: str, manifest: Path, store: Path, teacher: Path, *extra: str, timeout: int = 300
) -> subprocess.CompletedProcess:
    """`geovr-pipeline precompute` in a subprocess (a driver of the cluster at `address`)."""
    return subprocess.run(
        precompute_command(address, manifest, store, teacher, *extra),
        env=ray_env(True),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def precompute_command(address: str, manifest: Path, store: Path, teacher: Path, *extra: str) -> list[str]:
    return [
        CLI, "precompute", "--manifest", str(manifest), "--out", str(store), "--teacher", str(teacher),
        "--preset", "tiny", "--ray-address", address, "--device", "cpu", *extra,
    ]  # fmt: skip


def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout[-4000:] + result.stderr[-4000:]


# The main store: the same options for the uninterrupted and the killed run.
MAIN = ("--clips-per-batch", "2", "--decode-workers", "1", "--set", "precompute.max_inflight_shards=1")


def test_whole_path_through_the_cli(cluster: str, work: Path) -> None:
    store = work / "store_a"
    result = precompute(cluster, work / "m.parquet", store, work / "teacher", *MAIN)
    assert result.returncode == 0, output(result)
    assert "precompute summary" in result.stdout

    _register_commands()
    verify = CliRunner().invoke(app, ["cache", "verify", str(store)])
    assert verify.exit_code == 0 and "OK: 6 shards, 6 clips, 30 frames" in verify.output, verify.output

    manifest = read_manifest(work / "m.parquet")
    reader = open_store(store)
    assert sorted(reader.clip_ids()) == sorted(r["clip_id"] for r in manifest.rows)
    assert reader.fingerprint.sampling == TINY.policy() and reader.fingerprint.feature_layers == (0, 1, 2, 3)
    student_frames = reader.fingerprint.preprocess["student_frames"]
    assert (student_frames["video_max_pixels"], student_frames["video_min_pixels"]) == (
        32 * 300 * 1024,
        65536,
    )
    for row in manifest.rows:
        clip = reader.read_clip(row["clip_id"])
        _, seconds = read_timestamps(manifest.corpus_root / row["video"])
        expected = sample_indices(seconds, TINY)
        assert clip.video == row["video"]
        assert clip.frame_indices.tolist() == expected.tolist()
        assert clip.timestamps.tolist() == pytest.approx(seconds[expected].tolist())
        assert [decode_jpeg(j).shape for j in clip.frames_jpeg] == [(*student_frame_size(5, 120, 160), 3)] * 5
        assert clip.depth.shape == (5, 42, 56) and clip.features.shape == (5, 4, 3, 4, 64)
        assert clip.meta["teacher_size"] == [112, 84] and clip.meta["source_size"] == [160, 120]
        assert clip.meta["rotation"] == 0 and clip.meta["student_size"] == [160, 128]

    run = json.loads((store / "run.json").read_text())
    assert run["counts"]["clips_ok"] == 6 and run["counts"]["frames"] == 30 and run["exit_code"] == 0
    assert run["counts"]["clips_without_scale"] == 6  # no metric teacher: stored, counted, no scale
    assert run["config"]["precompute"]["clips_per_batch"] == 2 and run["timings"]["wall_s"] > 0
    assert (store / "failures.jsonl").read_text() == ""


def test_sigkill_then_resume_equals_an_uninterrupted_run(cluster: str, work: Path) -> None:
    store = work / "store_killed"
    command = precompute_command(cluster, work / "m.parquet", store, work / "teacher", *MAIN)
    driver = subprocess.Popen(command, env=ray_env(True), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done = store / "_done"
    deadline = time.monotonic() + 240
    while not (done.is_dir() and any(done.glob("*.json"))):
        assert driver.poll() is None, driver.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no shard committed in time"
        time.sleep(0.02)
    lease = json.loads((store / "_lease.json").read_text())
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    committed_at_kill = len(list(done.glob("*.json")))
    assert 1 <= committed_at_kill < 6, "the driver must die in the middle of the run"

    result = precompute(cluster, work / "m.parquet", store, work / "teacher", *MAIN)
    assert result.returncode == 0, output(result)
    # The killed run's lease is taken over at once (its process is gone), with one warning line.
    assert [line for line in result.stdout.splitlines() if line.startswith("warning:")] == [
        f"warning: {store}: took over the store lease of a run that is gone (precompute on host "
        f"{socket.gethostname()}, pid {driver.pid}, started {lease['started_at']}: its process no longer exists)"
    ]
    assert not (store / "_lease.json").exists()  # released at the end
    run = json.loads((store / "run.json").read_text())
    assert run["counts"]["shards_skipped"] >= committed_at_kill
    assert run["counts"]["shards_written"] == 6 - run["counts"]["shards_skipped"]
    assert verify_store(store).ok
    assert_stores_equal(work / "store_a", store)


def test_another_teacher_checkpoint_is_refused(cluster: str, work: Path) -> None:
    store = work / "store_a"
    markers = sorted(p.read_bytes() for p in (store / "_done").glob("*.json"))
    other = fov_fixed_teacher(work / "teacher_b", source="tiny-b")
    result = precompute(
        cluster, work / "m.parquet", store, other, *MAIN, "--set", "teacher.feature_layers=[0,1,2]"
    )
    assert result.returncode == 2, output(result)
    (message,) = error_lines(result)
    # One line naming each differing key with both values, nested keys as dotted paths.
    assert message.startswith(
        f"error: {store}: the store was written with other settings (the store's != this run's); refusing "
        "to add shards: checkpoint_sha256: "
    ), message
    for difference in (
        "teacher_config.embed_dim: 64 != 96",
        "teacher_config.depth: 4 != 3",
        "teacher_config.dpt_layers: [0, 1, 2, 3] != [0, 1, 1, 2]",
        "feature_layers: [0, 1, 2, 3] != [0, 1, 2]",
    ):
        assert difference in message, message
    assert (
        "preprocess" not in message
        and "sampling" not in message
        and "teacher_config.patch_size" not in message
    )
    assert sorted(p.read_bytes() for p in (store / "_done").glob("*.json")) == markers


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_a_teacher_that_does_not_fit_the_preset_is_refused_before_any_actor_starts(work: Path) -> None:
    other = fov_fixed_teacher(work / "teacher_b", source="tiny-b")
    store = work / "store_never"
    result = precompute("127.0.0.1:1", work / "m.parquet", store, other)  # no cluster is contacted
    assert result.returncode == 2, output(result)
    assert result.stderr.splitlines() == [
        f"error: teacher.feature_layers [0, 1, 2, 3] do not fit the teacher checkpoint {other}: it has 3 "
        "aggregator layers (0 to 2), so [3] do not exist; use the preset made for this teacher or set its "
        "layers (--set teacher.feature_layers=[...])"
    ]
    assert not store.exists()


@pytest.mark.slow
def test_a_teacher_actor_that_fails_to_start_is_one_line(cluster: str, work: Path, tmp_path: Path) -> None:
    """tiny-a's weights under tiny-b's config.json: the config fits the settings, the weights do not."""
    teacher = tmp_path / "mismatched"
    teacher.mkdir()
    shutil.copy(REFERENCE / "vggt" / "tiny-b" / "config.json", teacher / "config.json")
    shutil.copy(work / "teacher" / "model.safetensors", teacher / "model.safetensors")
    with pytest.raises(CheckpointError) as expected:
        VGGT.from_pretrained(teacher, heads=("camera", "depth"))
    result = precompute(
        cluster, work / "m.parquet", tmp_path / "store", teacher, "--set", "teacher.feature_layers=[0,1,2]"
    )
    assert result.returncode == 2, output(result)
    assert error_lines(result) == [
        f"error: the teacher actor failed to start: geovr.teachers.vggt.CheckpointError: {expected.value}"
    ]


def test_a_sampling_override_is_refused_naming_index(work: Path) -> None:
    result = precompute(
        "127.0.0.1:1", work / "m.parquet", work / "store_never", work / "teacher", "--set", "sampling.fps=4"
    )
    assert result.returncode == 2, output(result)
    assert result.stderr.splitlines() == [
        "error: --set sampling.fps=4: sampling is set at `index` (the manifest holds the policy and every clip "
        "id depends on it); re-index with `geovr-pipeline index ... --set sampling.fps=4`"
    ]


def test_a_second_run_on_the_store_is_refused_naming_the_holder(cluster: str, work: Path) -> None:
    store = work / "store_busy"
    first = subprocess.Popen(
        precompute_command(cluster, work / "m.parquet", store, work / "teacher", *MAIN),
        env=ray_env(True),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lease_file = store / "_lease.json"
    deadline = time.monotonic() + 120
    while not lease_file.exists():
        assert first.poll() is None, first.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the first run took no lease"
        time.sleep(0.05)
    lease = json.loads(lease_file.read_text())
    second = precompute(cluster, work / "m.parquet", store, work / "teacher", *MAIN)
    assert second.returncode == 2, output(second)
    (message,) = error_lines(second)
    assert re.fullmatch(
        re.escape(
            f"error: {store} is being written by another run: precompute on host {socket.gethostname()}, pid "
            f"{first.pid}, started {lease['started_at']}, last heartbeat "
        )
        + r"\d+"
        + re.escape(f" s ago (lease {lease_file}, stale after 120 s without a heartbeat)"),
        message,
    ), message
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stdout[-3000:] + stderr[-3000:]
    run = json.loads((store / "run.json").read_text())
    assert run["counts"]["shards_written"] == 6 and verify_store(store).ok
    assert not lease_file.exists()


# Polls a store until a stop file appears: every committed shard, every clip it lists; writes a report.
# It holds the markers it read for a moment before it opens the shards, as a training job holds them.
POLLING_READER = """
import json, os, sys, time
from geovr.teacher_cache.store import open_store

store, stop, report = sys.argv[1:4]
polls, revisions, errors = 0, set(), []
while not os.path.exists(stop):
    try:
        reader = open_store(store)
        time.sleep(0.5)  # a marker may move between the open and the reads
        for shard in reader.shards():
            listed, revision = len(reader.shard_clip_ids(shard)), reader.index.revision(shard)
            read = [clip.clip_id for clip in reader.iter_shard_encoded(shard)]
            if len(read) != listed:
                errors.append(f"shard {shard}: read {len(read)} clips, its marker lists {listed}")
            revisions.add(revision)
        polls += 1
    except Exception as err:
        errors.append(f"{type(err).__name__}: {err}")
with open(report, "w") as f:
    json.dump({"polls": polls, "revisions": sorted(revisions), "errors": errors}, f)
"""


@pytest.mark.slow
def test_a_reader_never_sees_a_committed_shard_missing_while_retry_failed_replaces_shards(
    cluster: str, work: Path, tmp_path: Path
) -> None:
    # Six shards of two clips each: one good clip, one broken after indexing (then repaired).
    videos = tmp_path / "videos"
    videos.mkdir()
    for source in sorted((work / "corpus" / "videos").glob("*.mp4")):
        for copy in ("a", "b"):
            shutil.copy(source, videos / f"{source.stem}_{copy}.mp4")
    manifest = tmp_path / "m.parquet"
    build_manifest([videos], manifest, TINY, clips_per_shard=2, workers=1)
    broken = {
        rows[1]["video"]: (videos / rows[1]["video"]).read_bytes()
        for rows in read_manifest(manifest).shards().values()
    }
    assert len(broken) == 6
    for name in broken:
        (videos / name).write_bytes(os.urandom(4096))
    store = tmp_path / "store"
    result = precompute(cluster, manifest, store, work / "teacher", *MAIN, "--max-failure-ratio", "1")
    assert result.returncode == 0, output(result)
    assert len(open_store(store).failures()) == 6
    for name, data in broken.items():
        (videos / name).write_bytes(data)

    stop, report = tmp_path / "stop", tmp_path / "report.json"
    reader = subprocess.Popen([sys.executable, "-c", POLLING_READER, str(store), str(stop), str(report)])
    try:
        retry = precompute(cluster, manifest, store, work / "teacher", *MAIN, "--retry-failed")
        assert retry.returncode == 0, output(retry)
    finally:
        stop.touch()
        reader.wait(timeout=60)
    polled = json.loads(report.read_text())
    # It read the old and the new versions, so its reads overlapped the replacement; how many
    # polls fit in the retry depends on the machine.
    assert polled["errors"] == [] and polled["polls"] >= 5, polled
    assert polled["revisions"] == [0, 1], polled
    assert len(open_store(store).clip_ids()) == 12 and verify_store(store).ok


def test_nonfinite_teacher_output_is_said_once_and_stops_the_run(cluster: str, work: Path) -> None:
    """tiny-a as it is: its random camera head gives a zero field of view, an infinite focal length."""
    teacher = REFERENCE / "vggt" / "tiny-a"
    store = work / "store_nonfinite"
    result = precompute(cluster, work / "m.parquet", store, teacher, *MAIN)
    assert result.returncode == 2, output(result)
    first = read_manifest(work / "m.parquet").rows[0]
    # How many of a clip's 5 frames get a zero field of view depends on the clip.
    cause = re.escape("non-finite teacher output intrinsic (the camera head's field of view is 0 in ") + (
        r"[1-5] of 5 frames: an infinite focal length\)"
    )
    (warning,) = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert re.fullmatch(
        re.escape(f"warning: clip {first['clip_id']} ({first['video']}): ")
        + cause
        + re.escape(
            f"; the teacher checkpoint {teacher} is the likely cause (further clips like this are counted, "
            "not reported)"
        ),
        warning,
    ), warning
    (error,) = error_lines(result)
    assert re.fullmatch(
        re.escape("error: the teacher's first 4 clips all have ")
        + cause
        + re.escape(
            f"; the teacher checkpoint {teacher} is the likely cause: stopping before labelling the other 2 clips"
        ),
        error,
    ), error
    assert not (store / "_lease.json").exists()


def test_resume_refuses_a_changed_shard_layout(work: Path, tmp_path: Path) -> None:
    """A manifest re-packed into other shards cannot resume store_a (needs no cluster: checked from markers)."""
    build_manifest([work / "corpus" / "videos"], tmp_path / "m2.parquet", TINY, clips_per_shard=2, workers=1)
    reader = open_store(work / "store_a")
    check_committed_shards(read_manifest(work / "m.parquet"), reader, work / "store_a")
    with pytest.raises(
        ValueError, match=r"committed shard 000000 holds 1 clips, the manifest assigns it 2.*--extend"
    ):
        check_committed_shards(read_manifest(tmp_path / "m2.parquet"), reader, work / "store_a")


def read_failures(store: Path) -> dict[str, dict]:
    return {f["video"]: f for f in map(json.loads, (store / "failures.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_bad_inputs_are_recorded_and_retry_failed(cluster: str, work: Path, tmp_path: Path) -> None:
    videos = tmp_path / "videos"
    write_corpus(tmp_path / "synth", SynthConfig(scenes=3, frames=10, width=160, height=120, fps=4.0, seed=7))
    shutil.copytree(tmp_path / "synth" / "videos", videos)
    expected = write_bad_inputs(videos / "odd")
    qa = tmp_path / "qa.jsonl"
    names = [*(f"scene_000{i}.mp4" for i in range(3)), *(f"odd/{n}" for n in expected), "gone/missing.mp4"]
    qa.write_text(
        "".join(json.dumps({"id": i, "video": n, "conversations": []}) + "\n" for i, n in enumerate(names))
    )
    manifest = tmp_path / "m.parquet"
    build_manifest([qa], manifest, TINY, corpus_root=videos, clips_per_shard=3, workers=1)
    # Broken after indexing: one video vanishes, one is overwritten with garbage.
    (videos / "scene_0000.mp4").unlink()
    good_bytes = (videos / "scene_0001.mp4").read_bytes()
    (videos / "scene_0001.mp4").write_bytes(os.urandom(4096))

    store = tmp_path / "store"
    result = precompute(cluster, manifest, store, work / "teacher", "--max-failure-ratio", "0.7")
    assert result.returncode == 0, output(result)
    failures = read_failures(store)
    assert set(failures) == {
        "odd/too_short.mp4", "odd/corrupt.mp4", "odd/empty.mp4", "gone/missing.mp4",
        "scene_0000.mp4", "scene_0001.mp4",
    }  # fmt: skip
    for name, code in [
        *((f"odd/{n}", c) for n, c in expected.items() if c != "ok"),
        ("gone/missing.mp4", "missing"),
    ]:
        assert failures[name]["stage"] == "index" and code in failures[name]["reason"], failures[name]
    assert (
        failures["scene_0000.mp4"]["stage"] == "probe" and "missing" in failures["scene_0000.mp4"]["reason"]
    )
    assert (
        failures["scene_0001.mp4"]["stage"] == "probe" and "corrupt" in failures["scene_0001.mp4"]["reason"]
    )
    reader = open_store(store)
    stored = {reader.read_clip(c).video for c in reader.clip_ids()}
    assert stored == {"scene_0002.mp4", "odd/gray.mkv", "odd/odd_size.mp4", "odd/vfr.mp4"}
    assert verify_store(store).ok

    # --retry-failed relabels only the failed clips; shards without failures are not rewritten;
    # 5 failures of 10 clips remain, above --max-failure-ratio 0.1: exit status 1.
    (videos / "scene_0001.mp4").write_bytes(good_bytes)
    clean = [s for s in reader.shards() if not any(f["shard_id"] == s for f in reader.failures())]
    before = {s: (store / "_done" / f"{s}.json").read_bytes() for s in clean}
    result = precompute(
        cluster, manifest, store, work / "teacher", "--retry-failed", "--max-failure-ratio", "0.1"
    )
    assert result.returncode == 1 and "failure ratio 0.500" in " ".join(result.stderr.split()), output(result)
    run = json.loads((store / "run.json").read_text())
    assert (
        run["counts"]["clips_todo"] == 6 and run["counts"]["clips_ok"] == 1 and run["config"]["retry_failed"]
    )
    reader = open_store(store)
    assert "scene_0001.mp4" in {reader.read_clip(c).video for c in reader.clip_ids()}
    assert len(reader.clip_ids()) == 5 and set(read_failures(store)) == set(failures) - {"scene_0001.mp4"}
    assert {s: (store / "_done" / f"{s}.json").read_bytes() for s in clean} == before
    assert verify_store(store).ok


@pytest.mark.slow
def test_space_aware_sampling_and_split_clips(cluster: str, work: Path, tmp_path: Path) -> None:
    policy = SamplingConfig(fps=2.0, min_frames=4, max_frames=4, method="space_aware", candidate_frames=8)
    manifest = tmp_path / "m.parquet"
    build_manifest([work / "corpus" / "videos"], manifest, policy, clips_per_shard=3, workers=1)
    store = tmp_path / "store"
    # Clips longer than 3 frames are labelled as overlapping halves (the out-of-memory path).
    result = precompute(
        cluster, manifest, store, work / "teacher", "--max-teacher-frames", "3", "--format", "wds"
    )
    assert result.returncode == 0, output(result)
    run = json.loads((store / "run.json").read_text())
    assert run["counts"]["clips_ok"] == 6 and run["counts"]["clips_split"] == 6
    reader = open_store(store)
    assert reader.format == "wds" and reader.fingerprint.sampling == policy.policy()
    for clip_id in reader.clip_ids():
        clip = reader.read_clip(clip_id)
        chosen = clip.meta["space_aware"]
        assert len(chosen["candidate_frame_indices"]) == 8 and len(chosen["selected"]) == 4
        assert clip.frame_indices.tolist() == [
            chosen["candidate_frame_indices"][i] for i in chosen["selected"]
        ]
        assert clip.num_frames == 4 and len(clip.frames_jpeg) == 4 and clip.depth.shape[0] == 4
        assert (
            clip.meta["split"][0]["overlap_frame"] == 1 and clip.meta["split"][0]["scale_second_to_first"] > 0
        )
    assert verify_store(store).ok
