"""The student checkpoint format and a run's latest checkpoint: the one owner of both.

A student checkpoint is one directory:

    config.json, model.safetensors (or shards), generation_config.json   the base Qwen3-VL, plain
    tokenizer / chat template / processor json files                      copied from the base dir
    geovr_heads.safetensors   camera_token.*, scale_token.*, camera_head.*, dense_head.*,
                              scale_head.*, distill_heads.<i>.* (only the enabled parts)
    student_config.json       {"format_version": 1, "student": StudentConfig as a dict}

`write_checkpoint` writes it, from the module itself (`GeoVRStudent.save_pretrained`) or from a
full state dict that FSDP gathered (the trainer's checkpoints, `student.training.checkpoint`, which
add the training state beside these files). `GeoVRStudent.from_pretrained` and `export` read it.

A run directory holds checkpoints as `RUN/checkpoints/<name>/`. The rule for which exist and which is
the latest (`run_checkpoints`, `resolve_checkpoint`): the directories there holding
`student_config.json`, except names containing ".tmp" (being written), in natural sort order of
their names (`step_00000010` after `step_00000009`, `step-10` after `step-9`); the last is the latest.
The trainer writes each checkpoint under `RUN/checkpoints.tmp/` and renames it into place, so
every directory the rule finds is complete.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from geovr.student.config import StudentConfig
from geovr.teacher_cache.config import from_dict, to_dict

if TYPE_CHECKING:
    from geovr.student.model import GeoVRStudent

CHECKPOINT_FORMAT_VERSION = 1
HEADS_FILE = "geovr_heads.safetensors"
CONFIG_FILE = "student_config.json"
CHECKPOINTS_DIR = "checkpoints"
# Files of a model directory besides the weights that a plain Qwen3-VL checkpoint needs.
PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
)


def write_checkpoint(
    out: str | Path, student: GeoVRStudent, state: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write `student` in the checkpoint format to `out` (created).

    `state`: the student's full state dict (keys `base.*` and the geometric parts'), e.g. gathered
    from FSDP shards on rank 0; None writes the module's own parameters.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if state is None:
        student.base.save_pretrained(out, safe_serialization=True)
        state = student.state_dict()
    else:
        base = {k[len("base.") :]: v for k, v in state.items() if k.startswith("base.")}
        student.base.save_pretrained(out, state_dict=base, safe_serialization=True)
    heads = {k: v for k, v in state.items() if not k.startswith("base.")}
    save_file(
        _untie(heads), str(out / HEADS_FILE), metadata={"format_version": str(CHECKPOINT_FORMAT_VERSION)}
    )
    record = {"format_version": CHECKPOINT_FORMAT_VERSION, "student": to_dict(student.config)}
    (out / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
    source = student.source_dir
    if source is not None and source.resolve() != out.resolve():
        copy_processor_files(source, out)
    return out


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous copies; safetensors refuses tensors sharing memory (tied weights): the
    repeats are cloned."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for key, tensor in state.items():
        tensor = tensor.detach().to("cpu").contiguous()
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        out[key] = tensor.clone() if ident in seen else tensor
        seen.add(ident)
    return out


def read_student_config(checkpoint: Path) -> StudentConfig:
    """The `StudentConfig` recorded in a checkpoint directory."""
    path = checkpoint / CONFIG_FILE
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if record.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format {record.get('format_version')}, this code reads {CHECKPOINT_FORMAT_VERSION}"
        )
    return from_dict(StudentConfig, record["student"], where=str(path))


def load_heads(checkpoint: Path, modules: dict[str, nn.Module]) -> None:
    """Load the geometric parts (`GeoVRStudent.geometry_modules()`, by state-dict prefix) from a
    checkpoint's heads file; every tensor must match, none may be missing or left over."""
    heads = load_file(checkpoint / HEADS_FILE)
    expected = {f"{name}.{key}" for name, module in modules.items() for key in module.state_dict()}
    if set(heads) != expected:
        missing, unexpected = sorted(expected - set(heads)), sorted(set(heads) - expected)
        raise ValueError(f"{checkpoint / HEADS_FILE}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, module in modules.items():
        prefix = name + "."
        module.load_state_dict({k[len(prefix) :]: v for k, v in heads.items() if k.startswith(prefix)})


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def run_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first (the rule of the module docstring)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p.parent for p in root.glob(f"*/{CONFIG_FILE}") if ".tmp" not in p.parent.name]
    return sorted(found, key=lambda p: _natural_key(p.name))


def resolve_checkpoint(path: Path, allow_plain: bool = False) -> Path:
    """A student checkpoint dir itself, or a run's latest checkpoint; with `allow_plain`, also a
    plain model dir (config.json only)."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return path
    checkpoints = run_checkpoints(path)
    if checkpoints:
        return checkpoints[-1]
    if allow_plain and (path / "config.json").is_file():
        return path
    raise FileNotFoundError(
        f"{path}: neither a student checkpoint ({CONFIG_FILE}) nor a run with checkpoints/*/"
    )


def copy_processor_files(source: Path, out: Path) -> list[str]:
    """Copy the tokenizer, chat template and processor files a model directory has; returns their names."""
    copied = []
    for name in PROCESSOR_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
            copied.append(name)
    return copied
