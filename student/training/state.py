"""Resume state that saves and loads itself (`state_dict()` / `load_state_dict()`), beside the
optimizer, the scheduler and the data loader, which do the same.

`TrainCounters` are shared by all ranks (reduced over them every step); `RNGState` is this process's
random states, one per rank. `student.training.checkpoint` writes and reads them.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch


@dataclass
class TrainCounters:
    """Totals of the run so far over all ranks."""

    samples: int = 0
    tokens: int = 0
    skipped_steps: int = 0
    skipped_samples: int = 0
    damaged_samples: int = 0
    label_fallback_samples: int = (
        0  # samples whose "gt" field took the teacher's labels (`student.label_choice`)
    )

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Counters absent from `state` (a checkpoint from before they existed) restart at 0."""
        for f in fields(self):
            setattr(self, f.name, int(state.get(f.name, 0)))


class RNGState:
    """This process's random states: python, numpy, torch and (when initialised) CUDA.

    `state_dict()`: the torch and CUDA generator states and numpy's key array as tensors ("torch",
    "cuda", "numpy_keys"), the rest as JSON values ("numpy", "python").
    """

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
        py_version, py_state, py_gauss = random.getstate()
        state["numpy"] = {
            "kind": kind,
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
        state["python"] = {"version": py_version, "state": list(py_state), "gauss": py_gauss}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        n = state["numpy"]
        keys = state["numpy_keys"].numpy().astype(np.uint32)
        np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
        p = state["python"]
        random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
