"""`train` on damaged cache data, through both backends: a deleted or damaged Zarr chunk, a damaged
tar member, a truncated tar. `data.on_damaged_clip=error` stops with the one-line report (store,
shard, clip, field, problem); `skip` skips and counts, bounded by `data.max_damaged_ratio`; with
two gloo processes both ranks stop at the same step, or both go on, and nothing hangs."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from geovr.student.tiny import write_tiny_qwen3vl
from geovr.teacher_cache.schema import clip_id_for
from tests.test_cache_integrity import flip, member
from tests.test_data_loader import SAMPLING, write_qa, write_test_store
from tests.test_train_run import ENV, run_cli

GEOMETRY = "d28x28_f4x2x2x32k8"  # of `write_test_store`
CLIP = clip_id_for("scene_000.mp4", SAMPLING)  # the damaged clip, alone in shard 000000
SETTINGS = [
    "train.global_batch=1",
    "train.warmup_ratio=0",
    "train.tensorboard=false",
    "train.checkpoint_every=100",
    "data.micro_batch=1",
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    """A tiny Qwen3-VL; a Zarr and a WebDataset store of two clips in two shards; QA files with one
    question per clip (`qa`) and with the first clip's question only (`qa_first`)."""
    root = tmp_path_factory.mktemp("damage")
    ws = {"root": root, "model": write_tiny_qwen3vl(root / "model")}
    for store_format in ("zarr", "wds"):
        videos = write_test_store(root / store_format, store_format, [1, 1])
    ws["qa"] = write_qa(root / "qa.jsonl", videos, per_video=1)
    ws["qa_first"] = write_qa(root / "qa_first.jsonl", videos[:1], per_video=1)
    ws["qa_two_each"] = write_qa(root / "qa_two_each.jsonl", videos, per_video=2)
    return ws


def _cut_features(tar: Path) -> None:
    info = member(tar, f"{CLIP}.features.safetensors.zst")
    os.truncate(tar, info.offset_data + info.size // 2)


# (backend, damage to shard 000000, the field and problem of the one-line report)
DAMAGE = {
    "zarr extrinsic chunk deleted": (
        "zarr",
        lambda shard: (shard / GEOMETRY / "extrinsic/c/0/0/0").unlink(),
        f"extrinsic: chunk file {GEOMETRY}/extrinsic/c/0/0/0 is missing",
    ),
    "zarr depth chunk deleted": (
        "zarr",
        lambda shard: (shard / GEOMETRY / "depth_q/c/0/0/0").unlink(),
        f"depth_q: chunk file {GEOMETRY}/depth_q/c/0/0/0 is missing",
    ),
    "zarr feature chunk damaged": (
        "zarr",
        lambda shard: flip(shard / GEOMETRY / "feat_q/c/0/0/0/0/0", 10),
        "feat_q: a chunk fails its zstd check (Data corruption detected)",
    ),
    "wds jpg member damaged": (
        "wds",
        lambda tar: flip(tar, member(tar, f"{CLIP}.0001.jpg").offset_data + 200, 8),
        f"frames_jpeg: member {CLIP}.0001.jpg fails its crc32c checksum",
    ),
    "wds cameras member damaged": (
        "wds",
        lambda tar: flip(tar, member(tar, f"{CLIP}.cameras.safetensors").offset_data + 40),
        f"cameras: member {CLIP}.cameras.safetensors fails its crc32c checksum",
    ),
    "wds tar truncated": (
        "wds",
        _cut_features,
        "tar: the tar breaks off before the sample (ReadError: unexpected end of data)",
    ),
}


def damaged_store(ws: dict[str, Path], tmp_path: Path, damage: str) -> tuple[Path, str]:
    """A copy of the workspace store with `damage` done to shard 000000, and its one-line report."""
    store_format, corrupt, problem = DAMAGE[damage]
    store = tmp_path / f"store_{store_format}"
    shutil.copytree(ws["root"] / store_format, store)
    corrupt(store / ("000000" if store_format == "zarr" else "000000.tar"))
    return store, f"store {store}: shard 000000 clip {CLIP}: field {problem}"


def train_in_process(ws, store: Path, qa: Path, out: Path, capsys, settings: list[str]) -> tuple[int, str]:
    args = ["train", "--preset", "tiny", "--store", str(store), "--qa", str(qa), "--model", str(ws["model"])]
    args += ["--out", str(out)]
    for item in [*SETTINGS, *settings]:
        args += ["--set", item]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # in-process run: one thread is much faster on a shared 2-core machine
    try:
        return run_cli(args, capsys)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_error_policy_refuses_the_damaged_clip_in_one_line(workspace, tmp_path, capsys, damage):
    store, report = damaged_store(workspace, tmp_path, damage)
    code, err = train_in_process(
        workspace, store, workspace["qa_first"], tmp_path / "run", capsys,
        ["train.steps=3", "data.on_damaged_clip=error"],
    )  # fmt: skip
    assert code == 2
    assert err.splitlines()[-1] == f"error: {report} (at step 1; data.on_damaged_clip=error)"
    assert "Traceback" not in err and not (tmp_path / "run" / "checkpoints").exists()


def test_skip_policy_stops_above_the_damaged_ratio(workspace, tmp_path, capsys):
    store, report = damaged_store(workspace, tmp_path, "zarr extrinsic chunk deleted")
    code, err = train_in_process(
        workspace, store, workspace["qa_first"], tmp_path / "run", capsys, ["train.steps=3"]
    )
    assert code == 2
    assert err.splitlines()[-1] == (
        "error: 1 of 1 samples drawn are damaged: more than data.max_damaged_ratio=0.01 of 1 "
        f"(at least one epoch) at step 1; last: {report}"
    )


@pytest.mark.parametrize("damage", ["zarr depth chunk deleted", "wds cameras member damaged"])
def test_skip_policy_skips_and_counts_damaged_samples(workspace, tmp_path, capsys, damage):
    """One of the two clips is damaged: with one sample a step, each step that draws it has no
    sample left and skips its update; the others train. Counted in metrics and the summary."""
    store, report = damaged_store(workspace, tmp_path, damage)
    out = tmp_path / "run"
    code, err = train_in_process(
        workspace, store, workspace["qa"], out, capsys, ["train.steps=6", "data.max_damaged_ratio=0.7"]
    )
    assert code == 0, err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    damaged_steps = [r["step"] for r in records if r["damaged_samples"]]
    assert damaged_steps and len(damaged_steps) < len(records)
    for record in records:
        damaged = record["damaged_samples"] == 1
        assert record["skipped"] == damaged and math.isnan(record["loss"]) == damaged, record
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counters"]["damaged_samples"] == len(damaged_steps)
    assert summary["counters"]["samples"] == len(records) - len(damaged_steps)
    assert summary["damaged_examples"][0] == report
    for count, step in enumerate(damaged_steps, start=1):
        assert f"step {step}: skipped 1 damaged sample(s), {count} so far: {report}" in err.splitlines()


def torchrun_train(ws, store: Path, qa: Path, out: Path, settings: list[str]) -> subprocess.CompletedProcess:
    from tests.test_train_run import train_command

    command = train_command({**ws, "store": store, "qa": qa}, out, [*SETTINGS, *settings], nproc=2)
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=ENV)


@pytest.mark.slow
def test_two_ranks_stop_together_when_one_meets_a_damaged_clip(workspace, tmp_path):
    """Global batch 2 of one sample per rank: each step one rank draws the damaged clip and the other
    the good one. Both stop at step 1 with the same line (the report is broadcast); none hangs."""
    store, report = damaged_store(workspace, tmp_path, "zarr extrinsic chunk deleted")
    proc = torchrun_train(
        workspace, store, workspace["qa"], tmp_path / "run",
        ["train.steps=3", "train.global_batch=2", "data.on_damaged_clip=error"],
    )  # fmt: skip
    assert proc.returncode != 0
    line = f"error: {report} (at step 1; data.on_damaged_clip=error)"
    assert proc.stderr.splitlines().count(line) == 2, proc.stderr[-3000:]


@pytest.mark.slow
def test_two_ranks_skip_damaged_clips_while_streaming(workspace, tmp_path):
    """WebDataset streaming, two samples per rank and step, one of the two clips damaged: the ranks
    meet it at different steps, skip it, and finish every step together; the counts add up."""
    store, report = damaged_store(workspace, tmp_path, "wds cameras member damaged")
    out = tmp_path / "run"
    proc = torchrun_train(
        workspace, store, workspace["qa_two_each"], out,
        ["train.steps=4", "train.global_batch=4", "data.micro_batch=2", "data.max_damaged_ratio=1.0"],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    summary = json.loads((out / "summary.json").read_text())
    damaged = sum(r["damaged_samples"] for r in records)
    assert damaged > 0 and summary["counters"]["damaged_samples"] == damaged
    # Trained: every good sample of the steps that ran (a step skipped for an idle rank trains none).
    assert summary["counters"]["samples"] == sum(
        4 - r["damaged_samples"] for r in records if not r["skipped"]
    )
    assert f"so far: {report}" in proc.stderr
    # A step where the damaged clip left a good sample on its rank trains on the rest: finite loss.
    assert any(r["damaged_samples"] and not r["skipped"] and math.isfinite(r["loss"]) for r in records)
