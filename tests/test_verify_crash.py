"""`cache verify`'s local processes: one that dies mid-check (a native crash on a damaged shard, the
OOM killer) costs only that shard, which is reported; every other shard is still checked once."""

from __future__ import annotations

import os
import signal
from functools import partial

from geovr.teacher_cache.verify import ShardCheck, local_map

SHARDS = [f"{i:05d}" for i in range(12)]


def check_or_die(deadly: str, shard_ids: list[str]) -> list[ShardCheck]:
    """A stand-in for the shard check that kills its process on the shard `deadly`."""
    if deadly in shard_ids:
        os.kill(os.getpid(), signal.SIGKILL)
    return [ShardCheck(shard_id, f"{shard_id}.zarr", [], [(f"clip-{shard_id}", 4)]) for shard_id in shard_ids]


def crashed(shard_id: str) -> ShardCheck:
    return ShardCheck(shard_id, f"{shard_id}.zarr", ["killed the verifying process"], [])


def test_a_shard_that_kills_its_process_is_reported_and_the_rest_checked():
    batches = [SHARDS[i : i + 3] for i in range(0, len(SHARDS), 3)]
    results = [r for batch in local_map(2, partial(check_or_die, "00004"), batches, crashed) for r in batch]
    assert sorted(r.shard_id for r in results) == SHARDS  # each shard once
    assert {r.shard_id: r.problems for r in results if r.problems} == {
        "00004": ["killed the verifying process"]
    }
