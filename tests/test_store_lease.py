"""The store lease: one writer run per store (real processes, real files; see `teacher_cache.lease`)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from geovr.teacher_cache.lease import LEASE_FILE, StoreLeaseError, acquire_lease, read_lease
from geovr.teacher_cache.store import open_store, open_writer
from tests.test_cache_store import FINGERPRINT, make_clip

TESTS = str(Path(__file__).parent)

# A child process that takes the lease (stale after STALE seconds), opens a writer under it, says
# "ready", then on each stdin line tries to commit one more shard and prints what happened.
HOLDER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from test_cache_store import FINGERPRINT, make_clip
    from geovr.teacher_cache.lease import acquire_lease
    from geovr.teacher_cache.store import open_writer

    lease = acquire_lease({root!r}, "holder", stale_after_s={stale})
    writer = open_writer({root!r}, FINGERPRINT, "zarr", lease=lease)
    print("ready", flush=True)
    for index, _ in enumerate(sys.stdin):
        try:
            lease.check()
            print("still held", flush=True)
        except Exception as err:
            print(f"check: {{err}}", flush=True)
        try:
            writer.write_shard(f"{{index + 10:06d}}", [make_clip(index + 10)], [])
            print("committed", flush=True)
        except Exception as err:
            print(f"commit: {{type(err).__name__}}: {{err}}", flush=True)
    lease.release()
    """
)


def start_holder(root: Path, stale: float = 120.0) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER.format(tests=TESTS, root=str(root), stale=stale)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = child.stdout.readline().strip()
    assert line == "ready", line + child.stderr.read()
    return child


def ask(child: subprocess.Popen) -> tuple[str, str]:
    child.stdin.write("go\n")
    child.stdin.flush()
    return child.stdout.readline().strip(), child.stdout.readline().strip()


def test_a_second_process_is_refused_naming_the_holder_until_the_lease_is_released(tmp_path):
    root = tmp_path / "store"
    child = start_holder(root)
    try:
        record, _ = read_lease(root)
        assert (record.host, record.pid, record.what) == (socket.gethostname(), child.pid, "holder")
        with pytest.raises(StoreLeaseError) as err:
            open_writer(root, FINGERPRINT, "zarr")
        assert re.fullmatch(
            re.escape(
                f"{root} is being written by another run: holder on host {record.host}, pid {child.pid}, "
                f"started {record.started_at}, last heartbeat "
            )
            + r"\d+"
            + re.escape(f" s ago (lease {root / LEASE_FILE}, stale after 120 s without a heartbeat)"),
            str(err.value),
        ), str(err.value)
        assert ask(child) == ("still held", "committed")
    finally:
        child.stdin.close()
        assert child.wait(timeout=60) == 0, child.stderr.read()
    assert not (root / LEASE_FILE).exists()  # released at the end
    with open_writer(root, FINGERPRINT, "zarr") as writer:
        assert writer.committed_shards() == {"000010"}
        assert (root / LEASE_FILE).exists()
    assert not (root / LEASE_FILE).exists()


def test_of_runs_starting_at_once_exactly_one_gets_the_lease(tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    go = tmp_path / "go"
    script = textwrap.dedent(
        f"""
        import os, time
        from geovr.teacher_cache.lease import StoreLeaseError, acquire_lease
        while not os.path.exists({str(go)!r}):
            time.sleep(0.001)
        try:
            lease = acquire_lease({str(root)!r}, "contender")
            print("won", flush=True)
            time.sleep(3)
        except StoreLeaseError:
            print("refused", flush=True)
        """
    )
    children = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(4)
    ]
    time.sleep(3)  # the interpreters are up and waiting
    go.touch()
    outcomes = sorted(child.communicate(timeout=60)[0].strip() for child in children)
    assert outcomes == ["refused", "refused", "refused", "won"]


def test_within_one_process_the_lease_is_reentrant(tmp_path):
    root = tmp_path / "store"
    first = acquire_lease(root, "outer")
    second = acquire_lease(root, "inner")
    assert second is first
    second.release()
    assert read_lease(root)[0].token == first.token  # still held by the outer user
    first.release()
    assert read_lease(root) is None


def test_a_lease_without_heartbeat_is_taken_over_with_one_warning_line(tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    record = {
        "host": "other-host",
        "pid": 4242,
        "pid_start": None,
        "what": "precompute",
        "started_at": "2026-01-01T00:00:00Z",
        "heartbeat_at": time.time() - 30,
        "stale_after_s": 120.0,
        "token": "a" * 32,
    }
    (root / LEASE_FILE).write_text(json.dumps(record))
    with pytest.raises(StoreLeaseError, match="precompute on host other-host, pid 4242"):
        acquire_lease(root, "convert")  # alive: its heartbeat is 30 s old

    record["heartbeat_at"] = time.time() - 300
    (root / LEASE_FILE).write_text(json.dumps(record))
    warnings: list[str] = []
    with acquire_lease(root, "convert", warn=warnings.append) as lease:
        assert read_lease(root)[0].token == lease.token
    assert len(warnings) == 1 and re.fullmatch(
        re.escape(
            f"{root}: took over the store lease of a run that is gone (precompute on host other-host, pid 4242, "
            "started 2026-01-01T00:00:00Z: no heartbeat for "
        )
        + r"30\d s \(stale after 120 s\)\)",
        warnings[0],
    ), warnings


def test_a_killed_holder_on_this_host_is_taken_over_at_once(tmp_path):
    root = tmp_path / "store"
    child = start_holder(root)
    started = read_lease(root)[0].started_at
    child.kill()
    child.wait(timeout=30)
    warnings: list[str] = []
    with acquire_lease(root, "resume", warn=warnings.append):
        pass
    assert warnings == [
        f"{root}: took over the store lease of a run that is gone (holder on host {socket.gethostname()}, "
        f"pid {child.pid}, started {started}: its process no longer exists)"
    ]


def test_a_paused_holder_loses_the_lease_and_commits_nothing_more(tmp_path):
    """A holder stopped for longer than its stale time (SIGSTOP) is taken over; once it runs again,
    its heartbeat notices, and the fencing check refuses its next commit."""
    root = tmp_path / "store"
    child = start_holder(root, stale=1.0)
    try:
        beat = read_lease(root)[0].heartbeat_at
        time.sleep(0.6)
        assert read_lease(root)[0].heartbeat_at > beat  # the heartbeat runs (every 0.125 s here)
        os.kill(child.pid, signal.SIGSTOP)
        time.sleep(1.5)
        warnings: list[str] = []
        lease = acquire_lease(root, "new run", warn=warnings.append)
        assert len(warnings) == 1 and "(stale after 1 s)" in warnings[0]
        os.kill(child.pid, signal.SIGCONT)
        time.sleep(0.5)  # a few heartbeats of the holder
        check, commit = ask(child)
        holder = f"new run on host {socket.gethostname()}, pid {os.getpid()}"
        assert check.startswith(f"check: {root}: this run lost the store lease to {holder}"), check
        assert commit.startswith(
            f"commit: StoreLeaseError: {root}: this run lost the store lease to {holder}"
        )
        assert commit.endswith("; not committing"), commit
        assert open_store(root).shards() == []
        child.stdin.close()
        assert child.wait(timeout=60) == 0, child.stderr.read()
        assert read_lease(root)[0].token == lease.token  # the old holder's release left the new lease alone
        lease.release()
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGCONT)
            child.kill()


def test_a_writer_of_another_process_needs_the_runs_token(tmp_path):
    root = tmp_path / "store"
    with acquire_lease(root, "driver") as lease:
        writer = open_writer(root, FINGERPRINT, "zarr", lease_token=lease.token)
        writer.write_shard("000000", [make_clip(0)], [])
        with pytest.raises(StoreLeaseError, match="this run lost the store lease to driver on host"):
            open_writer(root, FINGERPRINT, "zarr", lease_token="f" * 32)
    with pytest.raises(StoreLeaseError, match="does not hold the store lease"):
        writer.write_shard("000001", [make_clip(1)], [])  # the run's lease is gone: no commit
    assert open_store(root).shards() == ["000000"]


def test_cache_convert_into_a_store_another_run_writes_is_refused(tmp_path):
    source, target = tmp_path / "source", tmp_path / "target"
    with open_writer(source, FINGERPRINT, "wds") as writer:
        writer.write_shard("000000", [make_clip(0)], [])
    child = start_holder(target)
    try:
        started = read_lease(target)[0].started_at
        cli = str(Path(sys.executable).parent / "geovr-pipeline")
        result = subprocess.run(
            [cli, "cache", "convert", str(source), str(target), "--format", "zarr"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2
        (line,) = result.stderr.splitlines()
        assert re.fullmatch(
            re.escape(
                f"error: {target} is being written by another run: holder on host {socket.gethostname()}, pid "
                f"{child.pid}, started {started}, last heartbeat "
            )
            + r"\d+"
            + re.escape(f" s ago (lease {target / LEASE_FILE}, stale after 120 s without a heartbeat)"),
            line,
        ), line
        assert open_store(target).shards() == []
    finally:
        child.stdin.close()
        child.wait(timeout=60)
