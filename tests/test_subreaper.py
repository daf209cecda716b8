"""`workflows/subreaper.py`, the guard every Ray node of `ray_cluster.sh` runs under: processes that
its command leaves behind (re-parented orphans, as Ray workers are when their raylet is killed first)
end with it, also those that ignore SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO

SUBREAPER = REPO / "workflows" / "subreaper.py"
# The inner subshell exits at once, so the sleep it started in the background is an orphan; it
# ignores SIGTERM, so only a SIGKILL ends it.
ORPHAN = "( (trap '' TERM; exec sleep 300) & echo $! > orphan.pid )"


def start(tmp_path: Path, script: str) -> tuple[subprocess.Popen, int]:
    guard = subprocess.Popen(
        [sys.executable, str(SUBREAPER), "bash", "-c", script],
        cwd=tmp_path,
        env={**os.environ, "SUBREAPER_GRACE_S": "0.5"},
        stderr=subprocess.PIPE,
        text=True,
    )
    pid_file = tmp_path / "orphan.pid"
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline, "the command did not start its orphan"
        time.sleep(0.05)
    return guard, int(pid_file.read_text())


def state(pid: int) -> tuple[str, int] | None:
    """(state letter, parent PID) of a live process; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    return fields[0], int(fields[1])


def ended(pid: int) -> bool:
    found = state(pid)
    return found is None or found[0] in "ZX"


def test_sigterm_ends_the_command_and_its_orphans(tmp_path):
    guard, orphan = start(tmp_path, f"{ORPHAN}; sleep 300")
    deadline = time.monotonic() + 10
    while state(orphan)[1] != guard.pid:
        assert time.monotonic() < deadline, f"the orphan was re-parented to {state(orphan)}, not the guard"
        time.sleep(0.05)
    guard.send_signal(signal.SIGTERM)
    assert guard.wait(timeout=30) == 128 + signal.SIGTERM  # the command's status: bash killed by SIGTERM
    assert ended(orphan)
    assert "1 processes outlived SIGTERM by 0.5 s: killed" in guard.stderr.read()


def test_a_command_that_exits_takes_its_orphans_along(tmp_path):
    guard, orphan = start(tmp_path, f"{ORPHAN}; exit 3")
    assert guard.wait(timeout=30) == 3
    assert ended(orphan)
