"""One writer at a time per store: the store lease, `STORE/_lease.json`.

Every run that commits shards into a store (precompute, precompute --retry-failed, `cache convert`
into a store) holds the store's lease from before its first write to its end. Readers take no lease.

Lease file (JSON): {"host", "pid", "pid_start" (the process's start time in clock ticks from
/proc, or null where there is no /proc), "what" (e.g. "precompute --retry-failed"), "started_at"
(ISO 8601 UTC), "heartbeat_at" (Unix seconds), "stale_after_s", "token" (random, names this
holding)}.

- Acquire: the record is written to a temporary file which is then hard-linked to `_lease.json`.
  The link fails when the name exists, so of several runs starting at once exactly one gets the
  lease, and nobody ever reads a half-written lease (link is atomic on local file systems and NFS).
- Heartbeat: while held, a daemon thread rewrites `heartbeat_at` every `stale_after_s / 8`
  (temporary file, then rename over the lease).
- Refusal: a live lease of another run raises `StoreLeaseError`, one line naming its host, pid,
  what it runs, its start and its last heartbeat.
- Stale: no heartbeat for the holder's own `stale_after_s` (120 s by default, recorded in the file;
  judged by the reader's clock, so hosts sharing a store need clocks within a few seconds of each
  other, as NTP keeps them), or the holder ran on this host and its process is gone (then at once:
  a SIGKILLed run is taken over without waiting). A stale lease is taken over with one warning line:
  it is renamed aside, checked to be the very record judged stale (else put back), deleted, and the
  lease acquired as above.
- Release: the lease file is deleted at the end of the run if it still holds this run's token.
- Fencing: before each commit a writer checks that the lease file still holds its run's token
  (`check_lease`; writers in other processes, e.g. Ray tasks, get the token). A run whose lease was
  taken over (it was paused for longer than its stale time) cannot commit any more, and its
  heartbeat thread marks the lease lost so that the run stops (`StoreLease.check`).

Within one process the lease is re-entrant: acquiring a store's lease again while this process
holds it returns the same lease with one more reference; the last `release` gives it up, as does
the interpreter's exit.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

LEASE_FILE = "_lease.json"
STALE_AFTER_S = 120.0
_ATTEMPTS = 5  # acquisition rounds against concurrent takeovers before giving up


class StoreLeaseError(Exception):
    """The store's lease is held by another run, or this run lost it: one line naming the holder."""


@dataclass(frozen=True)
class LeaseRecord:
    """The content of a lease file (see the module docstring)."""

    host: str
    pid: int
    pid_start: int | None
    what: str
    started_at: str
    heartbeat_at: float
    stale_after_s: float
    token: str

    def describe(self, now: float) -> str:
        return (
            f"{self.what} on host {self.host}, pid {self.pid}, started {self.started_at}, "
            f"last heartbeat {max(0.0, now - self.heartbeat_at):.0f} s ago"
        )

    def stale_reason(self, now: float) -> str | None:
        """Why the lease is stale, or None while its holder lives."""
        if self.host == socket.gethostname() and not _process_alive(self.pid, self.pid_start):
            return "its process no longer exists"
        silent = now - self.heartbeat_at
        if silent > self.stale_after_s:
            return f"no heartbeat for {silent:.0f} s (stale after {self.stale_after_s:.0f} s)"
        return None


def _pid_start(pid: int) -> int | None:
    """Start time of process `pid` in clock ticks since boot (Linux /proc), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22, counted after the command name


def _process_alive(pid: int, pid_start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    # A recycled pid is another process: its start time differs.
    return pid_start is None or _pid_start(pid) in (None, pid_start)


def read_lease(root: Path) -> tuple[LeaseRecord, bytes] | None:
    """The lease record of store `root` and the file's bytes, or None when nobody holds it."""
    path = root / LEASE_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return LeaseRecord(**json.loads(raw)), raw
    except (ValueError, TypeError):
        raise StoreLeaseError(
            f"{path} is not a lease record; delete it if no run is writing {root}"
        ) from None


def check_lease(root: Path, token: str) -> None:
    """Raise `StoreLeaseError` unless the lease of `root` holds `token` (a writer's check before a commit)."""
    found = read_lease(root)
    if found is None:
        raise StoreLeaseError(f"{root}: this run does not hold the store lease (nobody does); not committing")
    if found[0].token != token:
        raise StoreLeaseError(
            f"{root}: this run lost the store lease to {found[0].describe(time.time())}; not committing"
        )


class StoreLease:
    """A held lease: heartbeats in a daemon thread until released. Use `acquire_lease`.

    Attributes:
        root: the store directory.
        record: the lease as written (its token identifies this holding).
        took_over: the warning line when acquiring took over a stale lease, else None.
        cleanup_pending: True until the first writer under this lease has removed what killed
            writers left (the store does that, see `store.open_writer`).
    """

    def __init__(self, root: Path, record: LeaseRecord, took_over: str | None) -> None:
        self.root = root
        self.record = record
        self.took_over = took_over
        self.cleanup_pending = True
        self.lost: str | None = None
        self._refs = 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease {root}", daemon=True)
        self._thread.start()

    @property
    def token(self) -> str:
        return self.record.token

    def check(self) -> None:
        """Raise `StoreLeaseError` if the heartbeat found the lease taken over."""
        if self.lost:
            raise StoreLeaseError(self.lost)

    def release(self) -> None:
        """Drop one reference; the last one stops the heartbeat and deletes the lease file if still ours."""
        self._refs -= 1
        if self._refs > 0:
            return
        self._stop.set()
        _HELD.pop(_key(self.root), None)
        with contextlib.suppress(OSError, StoreLeaseError):  # else left for the next run to judge stale
            found = read_lease(self.root)
            if found is not None and found[0].token == self.token:
                (self.root / LEASE_FILE).unlink()

    def __enter__(self) -> StoreLease:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _heartbeat(self) -> None:
        interval = self.record.stale_after_s / 8
        while not self._stop.wait(interval):
            try:
                found = read_lease(self.root)
            except (OSError, StoreLeaseError):
                continue  # a file system hiccup: try again at the next beat
            if found is None or found[0].token != self.token:
                holder = "nobody" if found is None else found[0].describe(time.time())
                self.lost = (
                    f"{self.root}: this run lost the store lease to {holder} (no heartbeat for longer "
                    f"than {self.record.stale_after_s:.0f} s: was the process paused?); stopping"
                )
                return
            self.record = LeaseRecord(**{**asdict(self.record), "heartbeat_at": time.time()})
            try:
                _write_record(self.root, self.record, replace=True)
            except OSError:
                continue


_HELD: dict[str, StoreLease] = {}


def _key(root: Path) -> str:
    return os.path.realpath(root)


def _write_record(root: Path, record: LeaseRecord, replace: bool) -> None:
    """Write the lease file: create-if-absent (`FileExistsError` otherwise), or replace it."""
    tmp = root / f"{LEASE_FILE}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(json.dumps(asdict(record), indent=1))
    try:
        if replace:
            os.replace(tmp, root / LEASE_FILE)
        else:
            os.link(tmp, root / LEASE_FILE)
    finally:
        tmp.unlink(missing_ok=True)


def _take_over(root: Path, raw: bytes) -> bool:
    """Remove the stale lease whose file content is `raw`; False when it changed meanwhile."""
    path = root / LEASE_FILE
    aside = root / f"{LEASE_FILE}.{uuid.uuid4().hex[:8]}.stale"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False  # another run removed it first
    if aside.read_bytes() != raw:  # the holder beat, or another run took over, in between: put it back
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
        aside.unlink()
        return False
    aside.unlink()
    return True


def _warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def acquire_lease(
    root: str | Path,
    what: str,
    stale_after_s: float = STALE_AFTER_S,
    warn: Callable[[str], None] = _warn_stderr,
) -> StoreLease:
    """Take the lease of store `root` (created if missing) for a run described by `what`.

    Raises `StoreLeaseError` naming the holder when another live run holds it. A stale lease is
    taken over; the warning is passed to `warn` (default: a `warning:` line on stderr) and kept in
    `StoreLease.took_over`.
    """
    root = Path(root)
    held = _HELD.get(_key(root))
    if held is not None and not held.lost:
        held._refs += 1
        return held
    root.mkdir(parents=True, exist_ok=True)
    took_over = None
    for _ in range(_ATTEMPTS):
        now = time.time()
        record = LeaseRecord(
            host=socket.gethostname(),
            pid=os.getpid(),
            pid_start=_pid_start(os.getpid()),
            what=what,
            started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            heartbeat_at=now,
            stale_after_s=stale_after_s,
            token=uuid.uuid4().hex,
        )
        try:
            _write_record(root, record, replace=False)
        except FileExistsError:
            found = read_lease(root)
            if found is None:
                continue  # released just now
            holder, raw = found
            reason = holder.stale_reason(now)
            if reason is None:
                raise StoreLeaseError(
                    f"{root} is being written by another run: {holder.describe(now)} (lease "
                    f"{root / LEASE_FILE}, stale after {holder.stale_after_s:.0f} s without a heartbeat)"
                ) from None
            if _take_over(root, raw):
                took_over = (
                    f"{root}: took over the store lease of a run that is gone ({holder.what} on host "
                    f"{holder.host}, pid {holder.pid}, started {holder.started_at}: {reason})"
                )
            continue
        if took_over:
            warn(took_over)
        lease = StoreLease(root, record, took_over)
        _HELD[_key(root)] = lease
        return lease
    raise StoreLeaseError(f"{root}: could not take the store lease: other runs keep taking it over")


@atexit.register
def _release_all() -> None:
    for lease in list(_HELD.values()):
        lease._refs = 1
        lease.release()
