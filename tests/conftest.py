"""Shared test fixtures: paths of the shared reference vectors, loopback-only Ray environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GEOVR_SHARED", REPO.parent / "shared"))
REFERENCE = SHARED / "reference"

# Every Ray process started by a test (head, workers, driver) stays on 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE.is_dir():
        pytest.fail(f"shared reference vectors not found at {REFERENCE} (set GEOVR_SHARED)")
    return REFERENCE


# The synthetic corpus shared by the foundation tests: 2 scenes x 12 frames at 160x120.
SYNTH_TEST_CONFIG = {"scenes": 2, "frames": 12, "width": 160, "height": 120, "fps": 4.0, "seed": 7}


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A corpus written by `geovr.corpus.synth.write_corpus` with `SYNTH_TEST_CONFIG`."""
    from geovr.corpus.config import SynthConfig
    from geovr.corpus.synth import write_corpus

    out = tmp_path_factory.mktemp("synth_corpus")
    write_corpus(out, SynthConfig(**SYNTH_TEST_CONFIG))
    return out
