"""The storage backends of the teacher-label store, behind one interface (`base.StoreBackend`).

`BACKENDS` is the registry: format name -> the module that implements it (imported on first use,
so that naming the formats costs nothing). The store's format list (`FORMATS`), the CLI choices and
the type of a format setting (`StoreFormat`) derive from it. A new backend is one module exposing a
`BACKEND` that implements `StoreBackend`, and one line here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from geovr.teacher_cache.backends.base import StoreBackend

BACKENDS: dict[str, str] = {
    "zarr": "geovr.teacher_cache.backends.zarr_backend",  # Zarr v3: arrays stacked by frame, one Zarr shard per array
    "wds": "geovr.teacher_cache.backends.wds_backend",  # WebDataset: one tar, one sample per clip
}
FORMATS: tuple[str, ...] = tuple(BACKENDS)
StoreFormat = Literal[FORMATS]  # type: ignore[valid-type]  # "zarr" | "wds", from the registry


def get_backend(name: str) -> StoreBackend:
    """The backend of format `name`; `ValueError` naming the known ones otherwise."""
    if name not in BACKENDS:
        raise ValueError(f"store format {name!r}: expected one of {FORMATS}")
    return importlib.import_module(BACKENDS[name]).BACKEND
