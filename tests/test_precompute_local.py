"""Precompute with `--ray-address local`: the driver starts (and stops) its own in-process cluster on 127.0.0.1,
with the default metric teacher (a tiny DA3-Metric) labelling each clip's scale."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from geovr.corpus.config import SynthConfig
from geovr.corpus.synth import render_probe, write_corpus
from geovr.pipeline.driver_watchdog import POLL_S, descendants, process_table
from geovr.pipeline.index import build_manifest
from geovr.teacher_cache.store import open_store
from geovr.teacher_cache.verify import verify_store
from geovr.teachers.tiny import write_tiny_da3_metric
from tests.test_precompute import TINY, fov_fixed_teacher, output, precompute_command, ray_env


@pytest.mark.slow
def test_local_cluster_whole_path(tmp_path: Path) -> None:
    write_corpus(
        tmp_path / "corpus", SynthConfig(scenes=2, frames=10, width=160, height=120, fps=4.0, seed=11)
    )
    manifest = tmp_path / "m.parquet"
    build_manifest([tmp_path / "corpus" / "videos"], manifest, TINY, clips_per_shard=1, workers=1)
    teacher = fov_fixed_teacher(tmp_path / "teacher")
    store = tmp_path / "store"
    metric = write_tiny_da3_metric(tmp_path / "da3-metric-tiny", render_probe(0), seed=0)
    command = precompute_command(
        "local", manifest, store, teacher, "--clips-per-batch", "2", "--metric-teacher", str(metric)
    )
    result = subprocess.run(command, env=ray_env(False), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, output(result)
    report = verify_store(store)
    assert report.ok and (report.shards_checked, report.clips_checked, report.frames_checked) == (2, 2, 10)
    reader = open_store(store)
    assert len(reader.clip_ids()) == 2
    assert all(reader.read_clip(c).scale_valid and reader.read_clip(c).scale > 0 for c in reader.clip_ids())
    assert reader.fingerprint.preprocess["metric_scale"]["teacher"] == "da3-metric"
    assert reader.fingerprint.metric_teacher.startswith("da3-metric-tiny@sha256:")
    run = json.loads((store / "run.json").read_text())
    assert run["counts"]["clips_ok"] == 2 and run["config"]["resolved"]["num_actors"] == 1
    assert run["counts"]["clips_without_scale"] == 0


# The local cluster's processes are gone this long after a SIGKILLed driver at most (the watchdog
# polls every second; without it, Ray's agents lived on for about 90 s).
CLUSTER_GONE_WITHIN_S = 10.0


@pytest.mark.slow
def test_a_killed_driver_takes_its_local_cluster_with_it(tmp_path: Path) -> None:
    write_corpus(
        tmp_path / "corpus", SynthConfig(scenes=4, frames=10, width=160, height=120, fps=4.0, seed=3)
    )
    manifest = tmp_path / "m.parquet"
    build_manifest([tmp_path / "corpus" / "videos"], manifest, TINY, clips_per_shard=1, workers=1)
    teacher = fov_fixed_teacher(tmp_path / "teacher")
    command = precompute_command("local", manifest, tmp_path / "store", teacher, "--clips-per-batch", "1")
    driver = subprocess.Popen(
        command, env=ray_env(False), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        # Wait until the cluster is whole: both agents and the teacher actor run.
        wanted = ("ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::TeacherActor")
        deadline = time.monotonic() + 240
        while not all(
            any(name in command_line(pid) for pid in descendants(driver.pid, process_table()))
            for name in wanted
        ):
            assert driver.poll() is None, driver.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the local cluster did not come up"
            time.sleep(0.2)
        time.sleep(2 * POLL_S)  # the watchdog has recorded them
        cluster = descendants(driver.pid, process_table())
        assert len(cluster) >= 6, cluster
        driver.kill()
        driver.wait()
        killed_at = time.monotonic()
        while alive := {
            pid for pid, start in cluster.items() if process_table().get(pid, (0, -1))[1] == start
        }:
            assert time.monotonic() - killed_at < CLUSTER_GONE_WITHIN_S, [command_line(pid) for pid in alive]
            time.sleep(0.1)
    finally:
        if driver.poll() is None:
            driver.kill()


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
