"""The store's records of clips that could not be labelled, and of the runs that wrote it.

- `ClipFailure`: one clip that could not be used, where (`stage`: index, probe, sample, decode,
  teacher, encode) and why (`reason`, one line). A shard's done marker lists its failed clips as
  rows {"clip_id", "video", "status": "failed", "stage", "reason"}; precompute's driver, its tasks
  and the store's writer pass them as this type.
- `STORE/failures.jsonl`: every failure row of the committed shards, one JSON object a line, sorted
  keys ({"clip_id", "reason", "shard_id", "stage", "video"}), rebuilt at the end of each writing run
  (`write_failures`).
- `STORE/run.json`: the last writing run's configuration, timings and counts (`write_run_record`;
  precompute's record is described in `geovr.pipeline.precompute`).

Both files are written to a temporary name and renamed over the old one; they are part of no shard
(`verify` ignores them).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

FAILURES_FILE = "failures.jsonl"
RUN_FILE = "run.json"


@dataclass(frozen=True)
class ClipFailure:
    """A clip that could not be labelled: which, where it failed and why."""

    clip_id: str
    video: str
    stage: str
    reason: str

    def to_row(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ClipFailure:
        """From a marker's failure row (extra keys such as "status" are ignored); a missing key is a
        `ValueError` naming it."""
        missing = [f.name for f in fields(cls) if f.name not in row]
        if missing:
            raise ValueError(f"failure row {row!r} lacks {', '.join(missing)}")
        return cls(**{f.name: str(row[f.name]) for f in fields(cls)})


FAILURE_KEYS = tuple(f.name for f in fields(ClipFailure))


def write_failures(root: Path, failures: list[dict[str, Any]]) -> Path:
    """`STORE/failures.jsonl` from the store's failure rows (`StoreReader.failures()`)."""
    path = Path(root) / FAILURES_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(f, sort_keys=True) + "\n" for f in failures))
    tmp.replace(path)
    return path


def write_run_record(root: Path, record: dict[str, Any]) -> Path:
    """`STORE/run.json` (non-JSON values such as paths as strings)."""
    path = Path(root) / RUN_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(path)
    return path
