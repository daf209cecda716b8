"""Which labels a sample's geometric targets come from, per label field (depth, camera, scale), for a
store that holds the teacher's labels, the ground truth, or both (`pipeline.config.PrecomputeConfig`
`depth_source`, `camera_source`, `scale_source`; the store's fingerprint and each clip's
`meta["label_sources"]` say which).

`data.depth_label`, `data.camera_label`, `data.scale_label`:

- "stored": the clip's main label arrays, whatever their source (in a "both" store, the teacher's).
- "gt": the ground truth: the stored ground-truth group of a "both" clip, the main arrays of a "gt"
  clip. A clip whose field fell back to the teacher in precompute (no usable RGB-D folder) gives the
  teacher's labels, and its sample is counted (`label_fallback` of the batch; the trainer's
  `label_fallback_samples`). Refused at startup for a store that holds no ground truth of the field.
- "teacher": the teacher's labels: the main arrays of a "teacher" or "both" clip. Refused at startup
  for a store whose field source is "gt": it keeps no teacher copy (only its fallback clips have
  teacher labels), so a run would train on a biased few clips.

Features always come from the teacher; `choose_labels` leaves them as they are.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from geovr.teacher_cache.schema import LABEL_FIELD_KEYS, LABEL_FIELDS, ClipLabels, StoreFingerprint

CHOICES = ("stored", "teacher", "gt")


def store_label_sources(fingerprint: StoreFingerprint) -> dict[str, str]:
    """{field: "teacher" | "gt" | "both"} of a store, from its fingerprint (teacher-only stores
    record no ground-truth choice)."""
    recorded = fingerprint.preprocess.get("ground_truth", {})
    return {name: recorded.get(name, "teacher") for name in LABEL_FIELDS}


def check_label_choice(fingerprint: StoreFingerprint, choice: dict[str, str], store: str) -> None:
    """Raise ValueError (one line naming the store and the field) for a choice the store cannot
    serve (module docstring)."""
    sources = store_label_sources(fingerprint)
    for name in LABEL_FIELDS:
        wanted, source = choice.get(name, "stored"), sources[name]
        if wanted == "gt" and source == "teacher":
            raise ValueError(
                f"{store}: data.{name}_label=gt but the store holds no ground-truth {name} labels "
                f"(precomputed with {name}_source=teacher); precompute with {name}_source=gt or both"
            )
        if wanted == "teacher" and source == "gt":
            raise ValueError(
                f"{store}: data.{name}_label=teacher but the store's {name} labels are ground truth "
                f"({name}_source=gt keeps no teacher copy); use stored or gt, or precompute with "
                f"{name}_source=both"
            )


def choose_labels(labels: ClipLabels, choice: dict[str, str]) -> tuple[ClipLabels, tuple[str, ...]]:
    """The clip with each field's main arrays taken from the chosen source, and the fields asked as
    "gt" that fell back to the teacher's labels (module docstring). ValueError for "teacher" on a
    clip whose field is ground truth only (the store check refuses such a store first)."""
    sources = labels.meta.get("label_sources", {})
    truth = labels.ground_truth or {}
    updates: dict[str, Any] = {}
    fell_back = []
    for name in LABEL_FIELDS:
        wanted, source = choice.get(name, "stored"), sources.get(name, "teacher")
        if wanted == "gt" and source == "both":
            updates |= {key: truth[key] for key in LABEL_FIELD_KEYS[name]}
        elif wanted == "gt" and source == "teacher":
            fell_back.append(name)
        elif wanted == "teacher" and source == "gt":
            raise ValueError(f"clip {labels.clip_id}: its {name} labels are ground truth, no teacher copy")
    return (dataclasses.replace(labels, **updates) if updates else labels), tuple(fell_back)
