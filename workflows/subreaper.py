"""Run a command as a child subreaper, and end every process it leaves behind.

Usage: python subreaper.py COMMAND [ARG...]

A Ray node is a tree: `ray start --block` starts the GCS and the raylet, and the raylet starts the
workers. When the scheduler kills that tree (Slurm's SIGTERM, then SIGKILL after KillWait, on a
requeue, a preemption or `scancel`), a worker whose raylet died first is re-parented to init, out of
reach of Slurm's process tracking without cgroups (proctrack/linuxproc, proctrack/pgid), and can
outlive the job holding memory, GPU contexts and file locks. Here they are re-parented to this
process instead (PR_SET_CHILD_SUBREAPER), which on SIGTERM/SIGINT, or when COMMAND exits, sends
SIGTERM to every descendant, waits up to $SUBREAPER_GRACE_S seconds (default 2, well inside Slurm's
KillWait), SIGKILLs what is left and reaps it. The exit status is COMMAND's (128+N for signal N).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(
            f"subreaper: prctl failed ({os.strerror(ctypes.get_errno())}); orphans may escape",
            file=sys.stderr,
        )


def descendants(root: int) -> list[int]:
    """PIDs of every live process below `root` (from /proc, parent links)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def reap(pids: list[int]) -> None:
    """Collect those of `pids` that have exited and are our children (re-parented orphans)."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def end_descendants(command: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to every descendant, SIGKILL to those alive after `grace_s`, and reap them all.

    `command` is reaped by Popen, which keeps its exit status."""

    def others() -> list[int]:
        return [pid for pid in descendants(os.getpid()) if pid != command.pid]

    signal_all(descendants(os.getpid()), signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while (command.poll() is None or others()) and time.monotonic() < deadline:
        reap(others())
        time.sleep(0.05)
    if stragglers := descendants(os.getpid()):
        print(
            f"subreaper: {len(stragglers)} processes outlived SIGTERM by {grace_s} s: killed", file=sys.stderr
        )
        signal_all(stragglers, signal.SIGKILL)
    command.wait()
    deadline = time.monotonic() + 10
    while (left := others()) and time.monotonic() < deadline:
        reap(left)
        time.sleep(0.05)


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__.splitlines()[2], file=sys.stderr)
        return 2
    become_subreaper()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    command = subprocess.Popen(sys.argv[1:])
    while command.poll() is None and not stop.wait(0.2):
        pass
    end_descendants(command, float(os.environ.get("SUBREAPER_GRACE_S", "2")))
    returncode = command.returncode
    return 128 - returncode if returncode < 0 else returncode


if __name__ == "__main__":
    sys.exit(main())
