"""The storage backend interface of the teacher-label store (`store` owns the commit protocol, the
markers and the lease; a backend owns how one shard's clips lie on disk).

A backend writes a shard's encoded clips whole into a temporary path the store chose (the store
then fsyncs, checksums and renames it, and commits it with its done marker), and reads them back:
one clip by id (training's random access) or every clip in order, each checked (streaming). Every
failed check is a `DamagedClipError` naming the store, shard, clip and field.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from geovr.teacher_cache.codecs import EncodedClip
from geovr.teacher_cache.schema import DamagedClipError


class ShardReader(Protocol):
    """Reads one committed shard (`path`: the shard on disk)."""

    path: Path

    def clip_ids(self) -> list[str]: ...

    def read(self, clip_id: str) -> EncodedClip:
        """One clip; `DamagedClipError` when its data is missing or fails a check."""
        ...

    def iter_checked(self) -> Iterator[EncodedClip | DamagedClipError]:
        """The shard's clips in order, each as the clip or the error saying why it cannot be read."""
        ...

    def __iter__(self) -> Iterator[EncodedClip]: ...


class StoreBackend(Protocol):
    """One storage format of the store (`backends.BACKENDS` names each).

    Attributes:
        name: the format's name in store.json and on the command line ("zarr").
        suffix: appended to a shard's name on disk ("" for a directory, ".tar").
        streams: the format is read front to back (training's `data.access=auto` streams it)
            rather than by clip.
    """

    name: str
    suffix: str
    streams: bool

    def create_store(self, root: Path) -> None:
        """Store-level files the format needs beside store.json (e.g. Zarr's root group)."""
        ...

    def is_shard(self, entry: Path) -> bool:
        """Whether a store entry (named `<shard>` + `suffix`) is one of this format's shards."""
        ...

    def write_shard(
        self, path: Path, clips: list[EncodedClip], zstd_level: int, integrity: bool = True
    ) -> dict[str, Any]:
        """Write `clips` as a new shard at `path` (the store's temporary name).

        `integrity=False`: the layout-1 form without checksums (tests of old stores, the benchmark's
        baseline). Returns {"clips": [{"clip_id", "num_frames", "location": {...}}] in write order
        ("location" is the format's own, kept in the done marker), "bytes": {field: bytes on disk}}.
        """
        ...

    def reader_marker(self, marker: dict[str, Any]) -> dict[str, Any]:
        """The entries of a done marker that `open_reader` uses (kept per shard in the store's
        compact clip index, `clip_index.ClipIndex`, instead of the whole marker)."""
        ...

    def open_reader(
        self, path: Path, store: str, shard_id: str, marker: dict[str, Any], integrity: bool
    ) -> ShardReader:
        """A reader of the committed shard at `path`, from its done marker (`store`: the store's path,
        for error messages). `DamagedShardError` when the shard's own metadata is damaged."""
        ...
