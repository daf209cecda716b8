"""The cluster workflows for real: `ray_cluster.sh` with two Ray nodes on loopback and a tiny precompute
through it, then `submit_precompute.sh` (Ray Jobs) against the same head; `cache verify` accepts both."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from geovr.pipeline.index import build_manifest
from tests.conftest import REPO
from tests.test_precompute import TINY, fov_fixed_teacher, free_port

WORKFLOWS = REPO / "workflows"
BIN = Path(sys.executable).parent
CLI = str(BIN / "geovr-pipeline")


def run(command: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{command[:3]} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """Two Ray nodes on 127.0.0.1 started by `ray_cluster.sh` as a 2-node Slurm job would see it."""
    cluster_dir = Path(f"/tmp/geovr-rc-{os.getpid()}")  # short: Ray's socket paths must fit 107 bytes
    env = dict(
        os.environ,
        PATH=f"{BIN}:{os.environ['PATH']}",
        PYTHON=sys.executable,
        SLURM_JOB_ID="4242",
        SLURM_JOB_NUM_NODES="2",
        SLURM_CPUS_ON_NODE="2",
        RAY_NODE_LAUNCH="local",
        RAY_PORT=str(free_port()),
        RAY_DASHBOARD_PORT=str(free_port()),
        RAY_CLUSTER_DIR=str(cluster_dir),
        RAY_START_TIMEOUT="180",
        RAY_HEAD_EXTRA_ARGS=" ".join(
            f"--{name}={free_port()}"
            for name in ("ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                         "metrics-export-port", "runtime-env-agent-port")
        ) + f" --temp-dir={cluster_dir}/ray --object-store-memory=200000000",
    )  # fmt: skip
    script = str(WORKFLOWS / "ray_cluster.sh")
    try:
        started = run(["bash", script, "start"], env, timeout=400)
        assert "2/2 nodes alive" in started.stdout
        exports = run(["bash", script, "env"], env).stdout
        driver_env = dict(env)
        for line in exports.splitlines():
            name, _, value = line.removeprefix("export ").partition("=")
            driver_env[name] = value
        yield driver_env
    finally:
        stopped = subprocess.run(
            ["bash", script, "stop"], env=env, capture_output=True, text=True, timeout=120
        )
        pids = [p.read_text() for p in cluster_dir.glob("*.pid")]
        assert stopped.returncode == 0 and not pids, stopped.stderr


@pytest.fixture(scope="module")
def inputs(synth_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("workflows")
    build_manifest([synth_corpus / "videos"], root / "manifest.parquet", TINY, clips_per_shard=1, workers=1)
    return {
        "root": root,
        "manifest": root / "manifest.parquet",
        "teacher": fov_fixed_teacher(root / "teacher"),
    }


def precompute_args(inputs: dict[str, Path], store: Path) -> list[str]:
    return [
        "--manifest", str(inputs["manifest"]), "--out", str(store), "--teacher", str(inputs["teacher"]),
        "--preset", "tiny", "--device", "cpu",
    ]  # fmt: skip


@pytest.mark.slow
def test_two_node_cluster_script_runs_a_precompute_that_verifies(cluster, inputs):
    assert cluster["RAY_ADDRESS"].startswith("127.0.0.1:")
    store = inputs["root"] / "store-slurm"
    run(
        [CLI, "precompute", *precompute_args(inputs, store), "--ray-address", cluster["RAY_ADDRESS"]], cluster
    )
    verified = run([CLI, "cache", "verify", str(store)], cluster)
    assert "OK" in verified.stdout and " 2 clips" in verified.stdout


@pytest.mark.slow
def test_ray_job_submission_runs_a_precompute_that_verifies(cluster, inputs):
    store = inputs["root"] / "store-job"
    script = str(WORKFLOWS / "ray-jobs" / "submit_precompute.sh")
    submitted = run(
        ["bash", script, cluster["RAY_JOBS_ADDRESS"], "--", *precompute_args(inputs, store)], cluster
    )
    assert "succeeded" in submitted.stdout.lower() + submitted.stderr.lower()
    verified = run([CLI, "cache", "verify", str(store)], cluster)
    assert "OK" in verified.stdout and " 2 clips" in verified.stdout
