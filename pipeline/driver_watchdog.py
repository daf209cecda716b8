"""Tie what a driver starts to the driver's life: `start_watchdog()` before `ray.init(address="local")`,
`stop_watchdog()` after `ray.shutdown()`.

Why: `ray.init(address="local")` starts the GCS, raylet, dashboard and log monitor as children of
the driver, and the raylet starts Ray's dashboard and runtime-env agents. When the driver is killed
(SIGKILL, the OOM killer), GCS and raylet exit within a second, but the two agents lived on for
about 90 s (Ray 2.60), holding memory and ports.

How: a small watchdog process (this module run as a script, in its own session so that a Ctrl-C
meant for the driver does not stop it) polls every `POLL_S` seconds. While its parent, the driver,
lives, it records the driver's descendants (pid and start time, from /proc). Once the driver is
gone (the watchdog has been re-parented), it SIGKILLs every recorded process that still runs with
the same start time (never a recycled pid) and their descendants, then exits. Children the driver
had before the watchdog started are not the cluster's and are left alone; `stop_watchdog` ends the
watch when the driver shuts the cluster down itself (a long-lived driver, e.g. the demo, goes on to
start other processes). So the local cluster
is gone at most about `POLL_S` plus a few milliseconds after its driver, however the driver ended.
A process started less than `POLL_S` before the driver died can be missed: those are Ray's workers,
which exit by themselves when their raylet goes.

Linux only (it reads /proc); elsewhere nothing is started and only Ray's own clean-up applies.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 1.0
_watchdog: subprocess.Popen | None = None


def start_watchdog() -> None:
    """Start the watchdog of this process (nothing where there is no /proc, or when one runs)."""
    global _watchdog
    if _watchdog is not None or not Path("/proc/self/stat").exists():
        return
    _watchdog = subprocess.Popen(
        [sys.executable, "-m", "geovr.pipeline.driver_watchdog", str(os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop_watchdog() -> None:
    """End the watch (the driver has shut its cluster down itself)."""
    global _watchdog
    if _watchdog is not None:
        _watchdog.kill()
        _watchdog.wait()
        _watchdog = None


def process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time in clock ticks) of every live process (zombies excluded)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        if fields[0] != "Z":  # fields[0] is the state (field 3); ppid is field 4, starttime field 22
            table[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return table


def descendants(root: int, table: dict[int, tuple[int, int]]) -> dict[int, int]:
    """pid -> start time of every descendant of `root` in `table`."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found: dict[int, int] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if pid not in found:
            found[pid] = table[pid][1]
            todo += children.get(pid, [])
    return found


def watch(driver: int) -> None:
    """Record `driver`'s descendants while it lives; kill those still running once it is gone."""
    earlier = descendants(driver, process_table()).items()  # not the cluster's (this watchdog among them)
    seen: dict[int, int] = {}
    while os.getppid() == driver:
        table = process_table()
        seen = {pid: start for pid, start in seen.items() if table.get(pid, (0, -1))[1] == start}
        seen.update(item for item in descendants(driver, table).items() if item not in earlier)
        time.sleep(POLL_S)
    table = process_table()
    doomed = {pid for pid, start in seen.items() if table.get(pid, (0, -1))[1] == start}
    for pid in list(doomed):
        doomed |= set(descendants(pid, table))
    doomed.discard(os.getpid())
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch(int(sys.argv[1]))
