"""The compact clip index of a store: what readers need from the done markers, and nothing more.

A done marker holds the sha256 of every file of its shard, byte counts and the failure rows (about
26 KB per Zarr shard); a reader needs only which committed shard holds each clip, the revision
each marker commits and the few marker entries its backend's shard reader uses
(`StoreBackend.reader_marker`). `ClipIndex` keeps those as numpy arrays and one short JSON string
per shard, built once per store open from the markers (each read once), and small enough to pickle
into every loader worker (`StoreReader` travels with it, so that a worker reads no marker).

Sizes (S shards, R stored clips): clip ids as fixed-width unicode (R,) twice (in shard order and
sorted), int32 / int64 offsets (R,) and (S + 1,), and S reader markers of about 150 bytes (Zarr).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from geovr.teacher_cache.records import FAILURE_KEYS


class ClipIndex:
    """Clip id -> shard, the ok clips of each shard, the failure rows, per-shard reader markers.

    Attributes:
        shard_ids: committed shards in marker order.
        revisions: (S,) int32, the revision each marker commits.
        rows: (R,) str, the stored ("ok") clip ids of every shard in order; shard s holds
            rows[row_start[s]:row_start[s + 1]].
        row_start: (S + 1,) int64.
        keys, key_rows: (U,) the distinct clip ids sorted, and the row of each one's first
            occurrence (a clip stored twice is read from the first shard, as before).
        failures: failure rows {"clip_id", "video", "stage", "reason", "shard_id"}.
    """

    def __init__(
        self,
        items: Iterable[tuple[str, dict[str, Any]]],
        reader_marker: Callable[[dict[str, Any]], dict[str, Any]],
    ):
        """`items`: (shard id, done marker) in shard order; `reader_marker`: the backend's."""
        self._reader_marker_of = reader_marker
        self.shard_ids: list[str] = []
        revisions: list[int] = []
        self._reader_markers: list[str] = []
        row_ids: list[str] = []
        row_start = [0]
        self.failures: list[dict[str, Any]] = []
        for shard_id, marker in items:
            self.shard_ids.append(shard_id)
            revisions.append(int(marker.get("revision", 0)))
            self._reader_markers.append(json.dumps(reader_marker(marker), separators=(",", ":")))
            row_ids += [row["clip_id"] for row in marker["clips"] if row["status"] == "ok"]
            self.failures += _failure_rows(shard_id, marker)
            row_start.append(len(row_ids))
        self._position = {shard_id: n for n, shard_id in enumerate(self.shard_ids)}
        self.revisions = np.asarray(revisions, dtype=np.int32)
        self.rows = np.asarray(row_ids, dtype=str)
        self.row_start = np.asarray(row_start, dtype=np.int64)
        self.keys, self.key_rows = np.unique(self.rows, return_index=True)
        # Rows of shards whose marker moved (a replacement committed while this index was in use).
        self._moved_rows: dict[str, list[str]] = {}

    def __contains__(self, shard_id: str) -> bool:
        return shard_id in self._position

    def shard_of(self, clip_id: str) -> str | None:
        """The shard the clip is read from, or None when no committed shard stores it."""
        at = int(np.searchsorted(self.keys, clip_id))
        if at == len(self.keys) or self.keys[at] != clip_id:
            return None
        row = int(self.key_rows[at])
        return self.shard_ids[int(np.searchsorted(self.row_start, row, side="right")) - 1]

    def clip_ids(self) -> list[str]:
        """Distinct stored clip ids in shard order (first occurrence)."""
        return self.rows[np.sort(self.key_rows)].tolist()

    def shard_clip_ids(self, shard_id: str) -> list[str]:
        """The shard's stored clip ids in order."""
        if shard_id in self._moved_rows:
            return list(self._moved_rows[shard_id])
        n = self._position[shard_id]
        return self.rows[self.row_start[n] : self.row_start[n + 1]].tolist()

    def revision(self, shard_id: str) -> int:
        return int(self.revisions[self._position[shard_id]])

    def reader_marker(self, shard_id: str) -> dict[str, Any]:
        """The entries of the shard's marker its backend reader needs, with "revision"."""
        marker = json.loads(self._reader_markers[self._position[shard_id]])
        return {**marker, "revision": self.revision(shard_id)}

    def update(self, shard_id: str, marker: dict[str, Any]) -> None:
        """Follow a marker that moved to another revision (its stored clips may differ now)."""
        n = self._position[shard_id]
        self.revisions[n] = int(marker.get("revision", 0))
        self._reader_markers[n] = json.dumps(self._reader_marker_of(marker), separators=(",", ":"))
        self._moved_rows[shard_id] = [r["clip_id"] for r in marker["clips"] if r["status"] == "ok"]
        self.failures = [row for row in self.failures if row["shard_id"] != shard_id]
        self.failures += _failure_rows(shard_id, marker)


def _failure_rows(shard_id: str, marker: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {**{k: row[k] for k in FAILURE_KEYS}, "shard_id": shard_id}
        for row in marker["clips"]
        if row["status"] != "ok"
    ]
