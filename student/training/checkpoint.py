"""Training checkpoints: `RUN/checkpoints/step_NNNNNNNN/`, written under `RUN/checkpoints.tmp/` then
renamed, the last `keep_last` kept; which exist and which is the latest follows the one rule of
`student.checkpoint` (`run_checkpoints`).

    config.json, model*.safetensors, student_config.json, geovr_heads.safetensors, processor files
                               the student checkpoint (`student.checkpoint.write_checkpoint`, from the
                               full state dict), so `GeoVRStudent.from_pretrained(RUN)` and
                               `geovr-pipeline export RUN` read it
    optimizer.safetensors      AdamW state, "<param name>::<exp_avg|exp_avg_sq|step>"
    optimizer.json             the param groups (hyper-parameters, parameter names) and non-tensor state
    trainer.json               step, world size, store digest, configs, and the `state_dict()` of each
                               shared state object (scheduler, counters)
    rank_R.json / rank_R.safetensors   per rank: the `state_dict()` of each per-rank state object
                               (data-loader position, RNG states); their tensors in the safetensors
                               file as "<state>.<name>" (e.g. "rng.torch")

A checkpoint that does not fit on the disk is removed at once and reported in one line (every rank
stops, none waits in a barrier); a partial one left by a killed run is removed at the next start
(`remove_partial`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from geovr.student.checkpoint import run_checkpoints, write_checkpoint
from geovr.student.training.distributed import DistEnv, all_reduce
from geovr.student.training.optimizer import OptimizerState

TMP_DIR = "checkpoints.tmp"


class Stateful(Protocol):
    """What a checkpoint saves and restores: an object that saves and loads itself."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CheckpointManager:
    """Saves and loads a run's training checkpoints (module docstring). Every rank makes every call.

    `shared`: state objects that are the same on every rank (saved by rank 0 into trainer.json);
    `per_rank`: this rank's (rank_R.json, their tensors in rank_R.safetensors). Both are set once the
    trainer has built them (the partial checkpoint is removed and the resume point found before).
    """

    def __init__(self, run_dir: Path, env: DistEnv, keep_last: int) -> None:
        self.run_dir = Path(run_dir)
        self.env = env
        self.keep_last = keep_last
        self.shared: dict[str, Stateful] = {}
        self.per_rank: dict[str, Stateful] = {}

    def remove_partial(self) -> list[str]:
        """Rank 0 deletes what a killed or out-of-disk run left in `RUN/checkpoints.tmp/`; returns the
        names it removed (on the other ranks: [])."""
        leftover = self.run_dir / TMP_DIR
        if not self.env.is_main or not leftover.exists():
            return []
        removed = sorted(p.name for p in leftover.iterdir()) if leftover.is_dir() else []
        shutil.rmtree(leftover)
        return removed

    def latest(self) -> Path | None:
        checkpoints = run_checkpoints(self.run_dir)
        return checkpoints[-1] if checkpoints else None

    def save(self, step: int, student: nn.Module, optimizer: OptimizerState, meta: dict[str, Any]) -> Path:
        """Write checkpoint `step` atomically; `meta`: JSON facts for trainer.json (configs, store digest).

        Everything goes to `RUN/checkpoints.tmp/step_N/`; once every rank has written its part rank 0
        renames it into `RUN/checkpoints/` (so readers never see a partial checkpoint) and deletes the
        oldest beyond `keep_last`. A crash at any point leaves the previous checkpoint intact. A failed
        write (disk full: `OSError(ENOSPC)` with a one-line message) stops every rank, and the
        partial checkpoint is deleted.
        """
        name = f"step_{step:08d}"
        final = self.run_dir / "checkpoints" / name
        tmp = self.run_dir / TMP_DIR / name
        # Collective under FSDP2: every rank takes part, each receives the full tensors.
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(student, options=options)
        optim_state = optimizer.state_dict()

        def write_shared(model_state: dict[str, torch.Tensor], optim_state: dict[str, Any]) -> None:
            if tmp.parent.exists():  # leftovers of a run killed while writing a checkpoint
                shutil.rmtree(tmp.parent)
            tmp.mkdir(parents=True)
            write_checkpoint(tmp, student, model_state)
            tensors, info = _optimizer_to_files(optim_state)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "optimizer.json").write_text(json.dumps(info))

        def write_rank() -> None:
            tensors, values = _split_tensors({k: s.state_dict() for k, s in self.per_rank.items()})
            save_file(tensors, str(tmp / f"rank_{self.env.rank}.safetensors"))
            (tmp / f"rank_{self.env.rank}.json").write_text(json.dumps(values))

        def commit() -> None:
            shared = {k: s.state_dict() for k, s in self.shared.items()}
            record = {"step": step, "world_size": self.env.world_size, **shared, **meta}
            (tmp / "trainer.json").write_text(json.dumps(record, indent=1))
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            tmp.parent.rmdir()
            for old in run_checkpoints(self.run_dir)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)

        # Each check replaces a barrier: every rank learns whether any rank failed.
        main = self.env.is_main
        shared = partial(write_shared, model_state, optim_state)
        _check_written(_attempt(shared) if main else None, self.env, self.run_dir, name)
        del model_state, optim_state, shared
        _check_written(_attempt(write_rank), self.env, self.run_dir, name)
        _check_written(_attempt(commit) if main else None, self.env, self.run_dir, name)
        return final

    def load(self, path: Path, optimizer: OptimizerState) -> dict[str, Any]:
        """Restore the optimizer and every state object from checkpoint `path` (the model itself is
        built from the checkpoint directory); returns trainer.json."""
        trainer = json.loads((path / "trainer.json").read_text())
        if trainer["world_size"] != self.env.world_size:
            raise ValueError(
                f"checkpoint {path} was written by {trainer['world_size']} processes, this job has "
                f"{self.env.world_size}; resume with the same number of processes (the data position is per rank)"
            )
        rank_file = path / f"rank_{self.env.rank}.json"
        if not rank_file.is_file():
            raise ValueError(
                f"{path} has no state for rank {self.env.rank}; resume with the same number of processes"
            )
        optimizer.load_state_dict(
            _optimizer_from_files(
                load_file(str(path / "optimizer.safetensors")),
                json.loads((path / "optimizer.json").read_text()),
            )
        )
        for key, state in self.shared.items():
            state.load_state_dict(trainer[key])
        values = json.loads(rank_file.read_text())
        tensors = load_file(str(path / f"rank_{self.env.rank}.safetensors"))
        for key, state in self.per_rank.items():
            prefix = f"{key}."
            owned = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            state.load_state_dict({**values[key], **owned})
        return trainer


def _optimizer_to_files(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A full optimizer state dict {"state": {fqn: {name: value}}, "param_groups": [...]} as
    safetensors tensors keyed "fqn::name" and a JSON part (non-tensor entries, param groups)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for fqn, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{fqn}::{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{fqn}::{name}"] = value
    groups = [
        {k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state["param_groups"]
    ]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *info["scalars"].items()]:
        fqn, name = key.rsplit("::", 1)
        state.setdefault(fqn, {})[name] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in info["param_groups"]]
    return {"state": state, "param_groups": groups}


def _split_tensors(states: dict[str, dict[str, Any]]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Per-rank state dicts -> (their top-level tensors as "<state>.<name>", for safetensors; the rest,
    by state, for JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, Any] = {}
    for key, state in states.items():
        values[key] = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{key}.{name}"] = value.detach().to("cpu").contiguous()
    return tensors, values


def _attempt(write: Callable[[], None]) -> Exception | None:
    try:
        write()
    except Exception as err:  # safetensors reports I/O errors with its own exception type
        return err
    return None


def _is_disk_full(err: BaseException) -> bool:
    """ENOSPC or EDQUOT, as Python's OSError or as safetensors' Rust I/O error (in its message)."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    return any(f"(os error {code})" in str(err) for code in (errno.ENOSPC, errno.EDQUOT))


def _check_written(failure: Exception | None, env: DistEnv, run_dir: Path, name: str) -> None:
    """Collective: if writing checkpoint `name` failed on any rank, rank 0 deletes the partial
    checkpoint and every rank raises; a full disk as `OSError(ENOSPC)` with a one-line message."""
    code = 0 if failure is None else 1 if _is_disk_full(failure) else 2
    code = int(all_reduce(torch.tensor([code], device=env.device), env, op=dist.ReduceOp.MAX).item())
    if code == 0:
        return
    if env.is_main:
        shutil.rmtree(run_dir / "checkpoints.tmp", ignore_errors=True)
    if code == 1:
        complete = run_checkpoints(run_dir)
        kept = (
            f"the last complete one, {complete[-1].name}, is kept" if complete else "there is no complete one"
        )
        free = shutil.disk_usage(run_dir).free
        raise OSError(
            errno.ENOSPC,
            f"disk full: checkpoint {name} did not fit in {run_dir} ({free / 2**20:.1f} MiB free after removing "
            f"the partial checkpoint; {kept}); free space, then continue with --resume",
        ) from None
    if failure is not None:
        raise failure
    raise RuntimeError(f"checkpoint {name} was not written: it failed on another rank")
