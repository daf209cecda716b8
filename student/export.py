"""Export a trained student to a plain Qwen3-VL checkpoint: no geometric tokens, no heads.

The exported directory is what `Qwen3VLForConditionalGeneration.from_pretrained` and
`AutoProcessor.from_pretrained` read: config.json, generation_config.json, model.safetensors (the
base model's weights only, in the checkpoint's dtype), the tokenizer, chat template and processor
files. Its parameter count is the base model's and its outputs are the student's with the geometric
parts switched off (the student's `generate` is the base model's).
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import Qwen3VLForConditionalGeneration

from geovr.student.checkpoint import (
    CONFIG_FILE,
    copy_processor_files,
    read_student_config,
    resolve_checkpoint,
)


def export_plain(checkpoint_or_run: str | Path, out_dir: str | Path) -> Path:
    """Write the plain Qwen3-VL model of a student checkpoint (or of a run's last checkpoint) to `out_dir`.

    Returns `out_dir`. Raises FileNotFoundError when `checkpoint_or_run` holds no student checkpoint,
    ValueError when `out_dir` is the checkpoint itself or holds files of another model.
    """
    checkpoint = resolve_checkpoint(Path(checkpoint_or_run))
    if (checkpoint / CONFIG_FILE).is_file() and read_student_config(checkpoint).fusion:
        raise ValueError(
            f"{checkpoint}: a fusion student needs its spatial encoder at inference; export it with "
            "--teacher VGGT_CHECKPOINT (student.fusion_model.export_fusion)"
        )
    return write_plain_model(checkpoint, out_dir)


def write_plain_model(checkpoint: Path, out_dir: str | Path) -> Path:
    """The body of `export_plain` for a resolved checkpoint directory (also the fusion export's base)."""
    out = Path(out_dir)
    if out.exists() and out.resolve() == checkpoint.resolve():
        raise ValueError(f"{out}: the export must not overwrite the checkpoint it reads")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: exists and is not empty; export into a new directory")
    model = Qwen3VLForConditionalGeneration.from_pretrained(checkpoint, dtype="auto", local_files_only=True)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    copied = copy_processor_files(checkpoint, out)
    if "tokenizer_config.json" not in copied:
        raise FileNotFoundError(f"{checkpoint}: no tokenizer files to export with the model")
    (out / "geovr_export.json").write_text(
        json.dumps(
            {"exported_from": str(checkpoint.resolve()), "parameters": model.num_parameters()}, indent=2
        )
        + "\n"
    )
    return out
