"""The trainer end to end on CPU: two gloo processes under torchrun from a real store, exact resume
after a kill, bad inputs through the CLI, the non-finite guard, the schedule."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from geovr.student.tiny import write_tiny_qwen3vl
from geovr.student.training.distributed import DistEnv
from geovr.student.training.optimizer import clip_and_check, cosine_with_warmup
from tests.test_data_loader import qa_row, write_qa, write_test_store

STEPS, CHECKPOINT_EVERY = 4, 2
TRAIN_SETTINGS = [
    f"train.steps={STEPS}",
    f"train.checkpoint_every={CHECKPOINT_EVERY}",
    "train.global_batch=2",
    "train.warmup_ratio=0",
    "train.lr_llm=3e-4",
    "train.lr_heads=3e-3",
    "train.tensorboard=false",
    "data.micro_batch=1",
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    """A tiny Qwen3-VL, a Zarr store of two clips, and a QA file with one question per clip (so the
    global batch of 2 over 2 ranks is the same two samples every step) plus one row naming a clip
    that is not cached and one malformed conversation (both counted and skipped)."""
    root = tmp_path_factory.mktemp("train")
    model = write_tiny_qwen3vl(root / "model")
    videos = write_test_store(root / "store", "zarr", [1, 1])
    bad_rows = [
        qa_row("not_cached.mp4", "How many chairs?", "3", "missing"),
        {"id": "malformed", "video": videos[0], "conversations": [{"from": "human", "value": "<video>\nQ?"}]},
    ]
    qa = write_qa(root / "qa.jsonl", videos, per_video=1, extra_rows=bad_rows)
    return {"root": root, "model": model, "store": root / "store", "qa": qa}


def train_command(ws: dict[str, Path], out: Path, extra: list[str] = (), nproc: int = 2) -> list[str]:
    args = [
        "--preset",
        "tiny",
        "--store",
        str(ws["store"]),
        "--qa",
        str(ws["qa"]),
        "--model",
        str(ws["model"]),
    ]
    args += ["--out", str(out)]
    for item in [*TRAIN_SETTINGS, *extra]:
        args += ["--set", item]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return [*launcher, "--no-python", str(Path(sys.executable).parent / "geovr-pipeline"), "train", *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_train(ws: dict[str, Path], out: Path, extra: list[str] = ()) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_command(ws, out, extra), capture_output=True, text=True, timeout=240, env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def uninterrupted(workspace) -> Path:
    out = workspace["root"] / "run_full"
    run_train(workspace, out)
    return out


@pytest.mark.slow
def test_two_processes_train_from_the_store(uninterrupted):
    records = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for record in records:
        terms = [record[f"loss.{n}"] for n in ("lm", "camera", "depth", "scale", "distill")]
        assert all(math.isfinite(v) and v > 0 for v in [record["loss"], *terms]), record
        assert not record["skipped"] and record["samples_per_s"] > 0 and 0 <= record["data_wait"] < 1
        assert record["lr.heads"] == pytest.approx(10 * record["lr.llm"])
    # The same two samples every step: the loss goes down.
    assert all(b["loss"] < a["loss"] for a, b in itertools.pairwise(records)), [r["loss"] for r in records]
    report = json.loads((uninterrupted / "data_report.json").read_text())
    assert (report["joined"], report["missing_clip"], report["malformed"]) == (2, 1, 1)
    run = json.loads((uninterrupted / "run.json").read_text())
    assert (run["world_size"], run["accumulation"]) == (2, 1)
    checkpoints = sorted(p.name for p in (uninterrupted / "checkpoints").iterdir())
    assert checkpoints == [f"step_{s:08d}" for s in range(CHECKPOINT_EVERY, STEPS + 1, CHECKPOINT_EVERY)][-2:]
    last = uninterrupted / "checkpoints" / checkpoints[-1]
    for name in ("trainer.json", "student_config.json", "geovr_heads.safetensors", "optimizer.safetensors"):
        assert (last / name).is_file(), name
    assert {p.name for p in last.glob("rank_*.json")} == {"rank_0.json", "rank_1.json"}


@pytest.mark.slow
def test_resume_after_a_kill_repeats_the_uninterrupted_losses(workspace, uninterrupted):
    out = workspace["root"] / "run_killed"
    first = out / "checkpoints" / f"step_{CHECKPOINT_EVERY:08d}" / "trainer.json"
    proc = subprocess.Popen(
        train_command(workspace, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists(), proc.stderr.read()[-3000:]
    killed_at = max(int(p.name[5:]) for p in (out / "checkpoints").iterdir())
    assert killed_at < STEPS

    resumed = subprocess.run(
        [*train_command(workspace, out), "--resume"], capture_output=True, text=True, timeout=240, env=ENV
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    expected, got = losses(uninterrupted), losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(killed_at + 1, STEPS + 1):
        assert abs(got[step] - expected[step]) <= 1e-6, (step, got[step], expected[step])


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    from geovr.app.cli import main

    old = sys.argv
    sys.argv = ["geovr-pipeline", *args]
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    finally:
        sys.argv = old
    return code, capsys.readouterr().err


def cli_args(ws: dict[str, Path], out: Path, store: Path | None = None, extra: list[str] = ()) -> list[str]:
    args = ["train", "--preset", "tiny", "--store", str(store or ws["store"]), "--qa", str(ws["qa"])]
    args += ["--model", str(ws["model"]), "--out", str(out)]
    for item in [*TRAIN_SETTINGS, *extra]:
        args += ["--set", item]
    return args


def test_bad_inputs_give_one_clear_error_line(workspace, tmp_path, capsys):
    code, err = run_cli(cli_args(workspace, tmp_path / "a", extra=["data.on_missing_clip=error"]), capsys)
    assert code == 2 and "qa.jsonl:3: clip" in err and "not_cached.mp4 is not in the cache" in err
    code, err = run_cli(cli_args(workspace, tmp_path / "b", extra=["data.on_bad_row=error"]), capsys)
    assert code == 2 and "qa.jsonl:4: row malformed: conversation ends without an assistant answer" in err

    import shutil

    old = tmp_path / "old_store"
    shutil.copytree(workspace["store"], old)
    meta = json.loads((old / "store.json").read_text())
    meta["fingerprint"]["schema_version"] = 0
    (old / "store.json").write_text(json.dumps(meta))
    code, err = run_cli(cli_args(workspace, tmp_path / "c", store=old), capsys)
    assert code == 2 and "schema version 0" in err and "store.json" in err


def test_non_finite_steps_are_skipped_and_logged(workspace, tmp_path, capsys):
    """An absurd learning rate blows the weights up after the first update; the guard then skips
    every update (weights stay as they are) and the run finishes."""
    out = tmp_path / "run_nan"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # in-process run: one thread is much faster on a shared 2-core machine
    try:
        code, err = run_cli(
            cli_args(
                workspace,
                out,
                extra=["train.steps=3", "train.lr_heads=1e30", "train.grad_clip=0", "train.tensorboard=true"],
            ),
            capsys,
        )
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert not records[0]["skipped"] and all(r["skipped"] for r in records[1:])
    assert "update skipped" in err
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_clip_and_check_flags_non_finite_gradients():
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    layer = torch.nn.Linear(3, 2)
    layer(torch.ones(1, 3)).sum().backward()
    norm, finite = clip_and_check(list(layer.parameters()), 0.5, 1.0, env)
    assert finite and norm > 0.5
    assert torch.cat([p.grad.flatten() for p in layer.parameters()]).norm() == pytest.approx(0.5, rel=1e-5)
    layer.weight.grad[0, 0] = float("nan")
    assert clip_and_check(list(layer.parameters()), 0.5, 1.0, env)[1] is False
    layer.weight.grad.zero_()
    assert clip_and_check(list(layer.parameters()), 0.5, float("inf"), env)[1] is False


def test_cosine_schedule_with_warmup():
    factor = cosine_with_warmup(total_steps=100, warmup_steps=3, min_ratio=0.1)
    assert [round(factor(s), 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(3 + 97 // 2) == pytest.approx(0.55, abs=0.02)
    assert factor(100) == pytest.approx(0.1)


@pytest.mark.slow
def test_ray_train_launch_matches_torchrun(workspace, uninterrupted):
    """Two Ray Train workers (gloo) on a local loopback Ray cluster run the same trainer: the same
    losses as the torchrun run for the same steps."""
    import ray

    from geovr.app.presets import load_section
    from geovr.student.config import DataConfig, StudentConfig
    from geovr.student.ray_train import train_with_ray
    from geovr.student.training.config import TrainConfig, TrainInputs

    settings = [*TRAIN_SETTINGS, "train.steps=2"]
    out = workspace["root"] / "run_ray"
    ray.init(
        address="local",
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        num_cpus=2,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}},
    )
    try:
        summary = train_with_ray(
            TrainInputs(workspace["store"], workspace["qa"], workspace["model"], out),
            load_section(TrainConfig, "train", "tiny", settings),
            load_section(DataConfig, "data", "tiny", settings),
            load_section(StudentConfig, "student", "tiny", settings, base_model=str(workspace["model"])),
            num_workers=2,
        )
    finally:
        ray.shutdown()
    assert summary["steps"] == 2
    expected, got = losses(uninterrupted), losses(out)
    assert sorted(got) == [1, 2]
    assert all(abs(got[s] - expected[s]) <= 1e-6 for s in got), (got, expected)


def in_mount_namespace() -> list[str]:
    """`unshare` into a private mount namespace (with a user namespace when not root), or skip:
    a small tmpfs mounted there is how the disk-full test fills a disk for real."""
    unshare = shutil.which("unshare")
    flags = ["-m"] if os.geteuid() == 0 else ["-r", "-m"]
    probe = subprocess.run([unshare or "unshare", *flags, "true"], capture_output=True, text=True)
    if unshare is None or probe.returncode != 0:
        pytest.skip(f"no private mount namespace here (unshare {' '.join(flags)}: {probe.stderr.strip()})")
    return [unshare, *flags]


# Mounts a 1 MiB tmpfs at $0, runs the command "$@" there, lists the run directory into $0.listing.
IN_SMALL_DISK = 'mount -t tmpfs -o size=1m tmpfs "$0" || exit 99; "$@"; status=$?; ls -A "$0/run" > "$0.listing"; exit $status'


@pytest.mark.slow
def test_disk_full_is_one_line_on_every_rank_and_leaves_no_partial_checkpoint(workspace, tmp_path):
    """Two ranks; the run directory is on a 1 MiB tmpfs: the logs fit, the first checkpoint (about
    4 MB) does not, so writing it fails with the real ENOSPC."""
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "run"
    command = train_command(workspace, out, ["train.steps=1", "train.checkpoint_every=1"])
    proc = subprocess.run(
        [*in_mount_namespace(), "sh", "-c", IN_SMALL_DISK, str(disk), *command],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert proc.returncode not in (0, 99), proc.stderr[-4000:]
    message = re.escape(f"error: disk full: checkpoint step_00000001 did not fit in {out} (") + (
        r"\d+\.\d MiB free after removing the partial checkpoint; there is no complete one\); free space, "
        r"then continue with --resume"
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all(re.fullmatch(message, line) for line in errors), proc.stderr[-4000:]
    listing = (tmp_path / "disk.listing").read_text().split()
    assert "checkpoints.tmp" not in listing and {"run.json", "metrics.jsonl"} <= set(listing), listing


def test_a_partial_checkpoint_is_removed_at_the_next_start(workspace, tmp_path, capsys):
    out = tmp_path / "run"
    partial = out / "checkpoints.tmp" / "step_00000007"
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"\0" * 4096)  # what a killed run left
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, err = run_cli(cli_args(workspace, out, extra=["train.steps=1"]), capsys)
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    expected = (
        f"removed the partial checkpoint step_00000007 an interrupted run left in {out / 'checkpoints.tmp'}"
    )
    assert "".join(expected.split()) in "".join(err.split()), err  # the console wraps long lines
    assert not (out / "checkpoints.tmp").exists() and [p.name for p in (out / "checkpoints").iterdir()] == [
        "step_00000001"
    ]
