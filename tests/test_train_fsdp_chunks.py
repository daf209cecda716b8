"""FSDP2 on two gloo ranks whose micro-batches split into different numbers of chunks.

FSDP2 gathers the sharded parameters in every forward (a collective), so all ranks must run the
same number of forward/backward passes in a step. Here every step gives one rank two chunks (two
short samples that do not fit one token budget) and the other one chunk (a short sample; its long
sample is skipped under `on_bad_row=skip`): the trainer runs the maximum on every rank, the rank
with fewer chunks repeating its last with a zero loss weight. Without that the ranks' collectives
no longer match and the job hangs or fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from geovr.student.tiny import write_tiny_qwen3vl
from tests.test_data_loader import qa_row, write_test_store
from tests.test_train_run import ENV

STEPS = 3
SETTINGS = [
    f"train.steps={STEPS}",
    f"train.checkpoint_every={STEPS}",
    "train.parallel=fsdp",
    "train.global_batch=4",
    "train.warmup_ratio=0",
    "train.tensorboard=false",
    "data.micro_batch=2",
    "data.num_workers=0",
    "data.access=random",
    # Short samples are 66-70 tokens, the long one 186: two short ones never share a chunk of 100
    # tokens, and the long one is skipped.
    "data.max_seq_len=100",
    "data.max_batch_tokens=100",
    "data.on_bad_row=skip",
]


@pytest.mark.slow
def test_fsdp_ranks_run_the_same_number_of_chunks(tmp_path):
    model = write_tiny_qwen3vl(tmp_path / "model")
    videos = write_test_store(tmp_path / "store", "zarr", [1, 1])
    rows = [
        qa_row(videos[0], "Q?", "1", "short-0"),
        qa_row(videos[1], "Q?", "2", "short-1"),
        qa_row(videos[0], "Q again?", "3", "short-2"),
        qa_row(videos[1], " ".join(["chair"] * 120) + "?", "4", "long"),
    ]
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = ["--preset", "tiny", "--store", str(tmp_path / "store"), "--qa", str(qa), "--model", str(model)]
    args += ["--out", str(tmp_path / "run")]
    for item in SETTINGS:
        args += ["--set", item]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    command = [*launcher, "--no-python", str(Path(sys.executable).parent / "geovr-pipeline"), "train", *args]
    # Its own process group: a hang is ended with the ranks, not only the launcher.
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True
    )
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the two FSDP ranks hung (no result in 240 s)")
    assert proc.returncode == 0, stderr[-4000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    # Every step: 3 samples trained (one long sample skipped), no update skipped.
    assert all(r["skipped_samples"] == 1 and not r["skipped"] for r in records)
    assert all(r["samples_per_s"] > 0 and r["loss"] > 0 for r in records)
