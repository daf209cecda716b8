"""VSI-Bench harness: any Qwen3-VL-format model directory on a local copy of the benchmark.

Data directory: the annotations as `*.parquet` (the Hugging Face release) or, when there is no
parquet, `*.jsonl` files (one VSI-Bench record a line: id, dataset, scene_name, question_type,
question, options, ground_truth), and the videos at `<dataset>/<scene_name>.mp4`.

Two evaluation profiles (`--profile`, `PROFILES`), the two published protocols:
- `lmms-eval` (default), as lmms-eval 0.7.3 runs VSI-Bench with Qwen3-VL: 32 frames, the system
  message "You are a helpful assistant.", the user text `build_prompt(row)` (its pre- and
  post-prompts), greedy decoding of at most 16 new tokens, lmms-eval's scorer (`--parser original`
  or `extract_number`), `max_frame_tokens` = 300 merged tokens per frame;
- `geovr`, as GeoVR's `eval_vsi.py` and `metric_result.py` run it: 128 frames, no system message,
  the user text `build_geovr_prompt(row)`, sampled decoding (top-p 0.8, top-k 20, temperature 0.7,
  up to 32768 new tokens; the answer stripped), GeoVR's matching (`--parser geovr`), 384 merged
  tokens per frame (its clip budget of 384 * frames * 32 * 32 pixels). GeoVR seeds 42 only in its
  parent process (the question shuffle); its spawned workers sample from torch's default seed, so
  its answers cannot be reproduced from its seed. Here every batch samples from a generator seeded
  by (`seed`, the batch's question ids): a rerun with the same batch size gives the same answers.
`--frames`, `--parser`, `--max-new-tokens` and `--max-frame-tokens` override a profile's value.

Per question:
- frames: N frames sampled uniformly, indices round(linspace(0, total - 1, n)), decoded by `geovr.corpus.video`
  (the one decoder of the pipeline) and rotated as players show them (the stream's display matrix), n = min(N, total) for lmms-eval
  (qwen-vl-utils), n = N for geovr (transformers' sampler repeats frames of a video shorter than
  N); resized as the Qwen3-VL processor sizes a whole clip (`teacher_cache.frames.student_frame_size`)
  under the clip budget `max_frame_tokens` * 32 * 32 * t_bar pixels (t_bar: n rounded up to even)
  and `video_min_pixels`, for the frame pairing used, then
  preprocessed with `geovr.student.vision_inputs`. Frame pairing (`--frame-pairing`): "consecutive"
  (default) puts consecutive frame pairs into one temporal token, as the plain Qwen3-VL processor
  does and as both GeoVR's `eval_vsi.py` and lmms-eval feed it; "repeat" repeats each frame so that
  one temporal token holds one frame, the layout GeoVR trains on (twice the visual tokens);
- prompt: the profile's system message, then the video and the profile's user text in the user
  turn, through the model directory's chat template; several questions per batch, left padding.

Output directory: `predictions.jsonl` gets one row per answered question (the record plus
`prediction`, `frames`, `frame_pairing` and `profile`) as soon as its batch is answered; a rerun
resumes from it and asks only the questions not in it, and refuses to mix frames, pairings or
profiles. `errors.jsonl` lists this run's questions that could not be asked or scored (missing
video, unknown question type, malformed row), by id; the run goes on without them. Then
`summary.json`, `summary.md` and `scores.png` (see `geovr.eval.report`), naming the profile.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import av
import numpy as np
import pyarrow.parquet as pq
import torch
from rich.console import Console
from rich.progress import MofNCompleteColumn, Progress

from geovr.corpus.video import VideoError, decode_frames, read_timestamps
from geovr.eval.config import (
    RECORD_FIELDS,
    VSIBenchConfig,
)
from geovr.eval.report import vsibench_summary, write_vsibench_report
from geovr.eval.scoring import MCA_QUESTION_TYPES, QUESTION_TYPES, score_rows
from geovr.student.vision_inputs import (
    VIDEO_TOKEN,
    VideoPreprocess,
    build_video_prompt,
    video_inputs,
)
from geovr.teacher_cache.frames import resize_frames, student_frame_size

console = Console(stderr=True)


# ---------------------------------------------------------------------------------------------
# Annotations


def _row_problem(row: Any) -> str | None:
    """Why a record cannot be asked, or None."""
    if not isinstance(row, dict):
        return f"record is a {type(row).__name__}, not an object"
    missing = [key for key in RECORD_FIELDS if key not in row or (row[key] is None and key != "options")]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    if row["question_type"] not in QUESTION_TYPES:
        return f"unknown question type {row['question_type']!r}"
    for key in ("dataset", "question"):
        if not isinstance(row[key], str) or not row[key]:
            return f"{key} must be a non-empty string"
    if not isinstance(row["scene_name"], (str, int)) or row["scene_name"] == "":
        return "scene_name must be a non-empty string or an integer"
    if row["question_type"] in MCA_QUESTION_TYPES:
        options = row["options"]
        if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
            return "multiple-choice question without a list of option strings"
    return None


def _read_jsonl(path: Path) -> Iterator[tuple[Any, str | None]]:
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line), None
            except json.JSONDecodeError as err:
                yield None, f"{path.name} line {number}: not valid JSON ({err.msg})"


def load_annotations(data_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Valid records of a VSI-Bench directory, in file order, and {"id", "reason"} for the others."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: VSI-Bench data directory not found")
    files = sorted(data_dir.glob("*.parquet")) or sorted(data_dir.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"{data_dir}: no *.parquet or *.jsonl annotations")
    rows, errors, seen = [], [], set()
    for path in files:
        if path.suffix == ".parquet":
            records = ((row, None) for row in pq.read_table(path).to_pylist())
        else:
            records = _read_jsonl(path)
        for index, (row, parse_error) in enumerate(records):
            row_id = row.get("id", f"{path.name} record {index}") if isinstance(row, dict) else None
            problem = parse_error or _row_problem(row)
            if problem is None and row_id in seen:
                problem = "duplicate id"
            if problem is not None:
                errors.append(
                    {"id": row_id if row_id is not None else f"{path.name} record {index}", "reason": problem}
                )
                continue
            seen.add(row_id)
            rows.append(row)
    return rows, errors


# ---------------------------------------------------------------------------------------------
# Video frames


def sample_indices(total_frames: int, num_frames: int, cap: bool = True) -> np.ndarray:
    """Uniform frame indices round(linspace(0, total - 1, n)): n = min(N, total) as qwen-vl-utils
    samples them (`cap`), else n = N as transformers' video processor does (repeating frames)."""
    count = min(num_frames, total_frames) if cap else num_frames
    return np.round(np.linspace(0, total_frames - 1, count)).astype(np.int64)


def read_video_frames(path: Path, num_frames: int, cap: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Uniformly sampled frames (`sample_indices` over the stream's frames) as players show them,
    decoded by `geovr.corpus.video`: (S, H, W, 3) uint8 RGB and (S,) seconds from the first frame.
    Raises `VideoError` for a video that cannot be read."""
    pts, seconds = read_timestamps(path)
    decoded = decode_frames(path, sample_indices(len(pts), num_frames, cap), (pts, seconds))
    return decoded.outputs[0], decoded.seconds


# ---------------------------------------------------------------------------------------------
# The model


@dataclass
class VideoQuestion:
    """One request: frames (S, H, W, 3) uint8 at the student size, their times, and the user text;
    `source`: the same frames as decoded (a fusion model's encoder resizes them itself)."""

    frames: np.ndarray
    timestamps: np.ndarray
    prompt: str
    source: np.ndarray | None = None


class Generator(Protocol):
    def generate(self, requests: Sequence[VideoQuestion]) -> list[str]: ...


class Qwen3VLGenerator:
    """Answers of a Qwen3-VL-format directory (base model or exported student), batched, decoded
    as the profile says (greedy, or sampled from torch's global generator)."""

    def __init__(self, model_dir: str | Path, cfg: VSIBenchConfig, model: Any = None) -> None:
        from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir}: not a model directory (no config.json)")
        dtype = getattr(torch, cfg.dtype)
        self.model = (
            model
            if model is not None
            else Qwen3VLForConditionalGeneration.from_pretrained(
                model_dir, dtype=dtype, local_files_only=True
            )
        )
        self.model.to(cfg.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.preprocess = VideoPreprocess.from_model_dir(
            model_dir, cfg.clip_max_pixels(cfg.frames), cfg.video_min_pixels
        )
        self.cfg = cfg
        self.video_token_id = self.model.config.video_token_id
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.tokenizer.eos_token_id

    def _encode(self, request: VideoQuestion) -> tuple[list[int], dict[str, torch.Tensor]]:
        vision = video_inputs(request.frames, request.timestamps, self.preprocess, self.cfg.frame_pairing)
        system = self.cfg.spec.system_prompt
        messages = [{"role": "system", "content": system}] if system is not None else []
        messages.append(
            {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": request.prompt}]}
        )
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if text.count(VIDEO_TOKEN) != 1:
            raise ValueError("the model's chat template does not render one video placeholder")
        text = build_video_prompt(
            text, vision["video_grid_thw"][0], vision["frame_timestamps"], self.preprocess.merge_size
        )
        return self.tokenizer(text, add_special_tokens=False)["input_ids"], vision

    def batch_inputs(self, requests: Sequence[VideoQuestion]) -> dict[str, torch.Tensor]:
        """Model inputs of a batch, left-padded: input_ids, attention_mask, mm_token_type_ids (B, L),
        pixel_values_videos (sum of patches, D) and video_grid_thw (B, 3)."""
        encoded = [self._encode(r) for r in requests]
        length = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((len(encoded), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
        for row, (ids, _) in enumerate(encoded):
            input_ids[row, length - len(ids) :] = torch.tensor(ids)
            attention_mask[row, length - len(ids) :] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mm_token_type_ids": (input_ids == self.video_token_id).to(torch.int32) * 2,
            "pixel_values_videos": torch.cat([v["pixel_values_videos"] for _, v in encoded]),
            "video_grid_thw": torch.cat([v["video_grid_thw"] for _, v in encoded]),
        }

    @torch.inference_mode()
    def generate(self, requests: Sequence[VideoQuestion]) -> list[str]:
        inputs = self.batch_inputs(requests)
        length = inputs["input_ids"].shape[1]
        inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(self.model.dtype)
        spec = self.cfg.spec
        sampling = {"temperature": spec.temperature, "top_p": spec.top_p, "top_k": spec.top_k}
        output = self._generate(
            requests,
            {key: value.to(self.model.device) for key, value in inputs.items()},
            max_new_tokens=self.cfg.max_new_tokens,
            do_sample=spec.do_sample,
            num_beams=1,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            **(sampling if spec.do_sample else {}),
        )
        answers = self.tokenizer.batch_decode(output[:, length:], skip_special_tokens=True)
        return [answer.strip() for answer in answers] if spec.strip_answer else answers

    def _generate(
        self, requests: Sequence[VideoQuestion], inputs: dict[str, torch.Tensor], **decoding: Any
    ) -> Any:
        return self.model.generate(**inputs, **decoding)


class FusionGenerator(Qwen3VLGenerator):
    """Answers of an exported fusion model (`student.fusion_model`): its VGGT aggregator runs on each
    video's decoded frames (resized to its own size, as precompute did) and the connector adds the
    tokens to the merged video tokens."""

    def __init__(self, model_dir: str | Path, cfg: VSIBenchConfig) -> None:
        from geovr.student.fusion_model import FusionModel

        self.fusion = FusionModel.from_pretrained(model_dir, cfg.device, getattr(torch, cfg.dtype))
        super().__init__(model_dir, cfg, self.fusion.base)

    def _generate(
        self, requests: Sequence[VideoQuestion], inputs: dict[str, torch.Tensor], **decoding: Any
    ) -> Any:
        spatial = [self.fusion.spatial_features(r.source, r.frames.shape[1:3]) for r in requests]
        return self.fusion.generate(spatial, **inputs, **decoding)


def load_generator(model_dir: str | Path, cfg: VSIBenchConfig) -> Qwen3VLGenerator:
    """The generator of a model directory: a fusion model's (it carries its encoder) or a plain Qwen3-VL's."""
    from geovr.student.fusion_model import FUSION_CONFIG

    fusion = (Path(model_dir) / FUSION_CONFIG).is_file()
    return (FusionGenerator if fusion else Qwen3VLGenerator)(model_dir, cfg)


# ---------------------------------------------------------------------------------------------
# The run


def _open_predictions(path: Path) -> dict[Any, dict[str, Any]]:
    """Rows already answered, by id. A last line cut off by a kill is dropped from the file."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        path.write_bytes(data)
    answered = {}
    for line in data.decode().splitlines():
        if line.strip():
            row = json.loads(line)
            answered[row["id"]] = row
    return answered


class _FrameCache:
    """The sampled, resized frames of the last few videos (questions are grouped by video)."""

    def __init__(self, cfg: VSIBenchConfig, size: int = 2) -> None:
        self.cfg, self.size, self.items = cfg, size, OrderedDict()

    def get(self, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(student-size frames, times, the frames as decoded) of a video."""
        if path not in self.items:
            if not path.is_file():
                raise FileNotFoundError(f"video {path} not found")
            source, times = read_video_frames(path, self.cfg.frames, self.cfg.spec.cap_frames)
            cfg = self.cfg
            size_hw = student_frame_size(
                *source.shape[:3], cfg.clip_max_pixels(len(source)), cfg.video_min_pixels, cfg.frame_pairing
            )
            self.items[path] = (resize_frames(source, size_hw), times, source)
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return self.items[path]


def run_vsibench(
    model_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    cfg: VSIBenchConfig,
    generator: Generator | None = None,
) -> dict[str, Any]:
    """Answer the questions not yet in `out_dir/predictions.jsonl`, then score and report all.

    `generator` defaults to `load_generator(model_dir, cfg)` (created only if a question is left): a
    fusion model's directory (`student.fusion_model`) runs with its encoder.
    Returns the summary (see `geovr.eval.report`).
    """
    cfg.validate()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    rows, errors = load_annotations(data_dir)
    if cfg.limit is not None:
        rows = rows[: cfg.limit]
    out_dir.mkdir(parents=True, exist_ok=True)
    predictions_path = out_dir / "predictions.jsonl"
    answered = _open_predictions(predictions_path)
    _check_resumable(answered, cfg, predictions_path)
    pending = _pending_by_video(rows, answered)
    console.print(
        f"VSI-Bench: {len(rows)} questions, {len(rows) - len(pending)} answered before, {len(pending)} to ask"
    )
    answerer = _Answerer(model_dir, data_dir, cfg, generator, answered, errors)
    with predictions_path.open("a") as out:
        answerer.answer(pending, out)
    wanted = {row["id"] for row in rows}
    scored, score_errors = score_rows([answered[i] for i in answered if i in wanted], cfg.parser)
    errors += score_errors
    with (out_dir / "errors.jsonl").open("w") as f:
        for error in errors:
            f.write(json.dumps(error) + "\n")
    for error in errors:
        console.print(f"[yellow]skipped[/] question {error['id']}: {error['reason']}", highlight=False)
    summary = vsibench_summary(
        scored,
        errors,
        cfg.parser,
        model=str(model_dir),
        frames=cfg.frames,
        frame_pairing=cfg.frame_pairing,
        profile=cfg.profile,
    )
    write_vsibench_report(out_dir, summary)
    return summary


def _check_resumable(answered: dict[Any, dict[str, Any]], cfg: VSIBenchConfig, path: Path) -> None:
    """Refuse to add answers of other frames, pairing or profile to a predictions file."""
    other_frames = {row.get("frames") for row in answered.values()} - {cfg.frames}
    if other_frames:
        raise ValueError(
            f"{path}: answered with {sorted(other_frames, key=str)} frames, this run uses "
            f"{cfg.frames}; resume with the same --frames or choose another --out"
        )
    # Rows written before these options existed were answered with "repeat" and lmms-eval's protocol.
    for key, option, legacy in (
        ("frame_pairing", "--frame-pairing", "repeat"),
        ("profile", "--profile", "lmms-eval"),
    ):
        used = getattr(cfg, key)
        other = {row.get(key, legacy) for row in answered.values()} - {used}
        if other:
            raise ValueError(
                f"{path}: answered with {key.replace('_', ' ')} {sorted(other)}, this run uses "
                f"{used!r}; resume with the same {option} or choose another --out"
            )


def _pending_by_video(rows: list[dict[str, Any]], answered: dict[Any, Any]) -> list[dict[str, Any]]:
    """The rows not answered yet, grouped by video in the order of first appearance."""
    videos: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if row["id"] not in answered:
            videos.setdefault((row["dataset"], row["scene_name"]), []).append(row)
    return [row for group in videos.values() for row in group]


class _Answerer:
    """Asks the pending questions in batches of `cfg.batch_size` and appends each answered batch to
    the predictions file at once (fsynced: a killed run resumes after it); a question whose video
    cannot be read is an error row."""

    def __init__(
        self,
        model_dir: str | Path,
        data_dir: Path,
        cfg: VSIBenchConfig,
        generator: Generator | None,
        answered: dict[Any, dict[str, Any]],
        errors: list[dict[str, Any]],
    ) -> None:
        self.model_dir, self.data_dir, self.cfg = model_dir, data_dir, cfg
        self.generator, self.answered, self.errors = generator, answered, errors
        self.cache = _FrameCache(cfg)
        self.batch: list[tuple[dict[str, Any], VideoQuestion]] = []

    def answer(self, pending: list[dict[str, Any]], out: Any) -> None:
        progress = Progress(
            *Progress.get_default_columns(), MofNCompleteColumn(), console=console, transient=True
        )
        task = progress.add_task("answering", total=len(pending))
        with progress:
            for row in pending:
                video = self.data_dir / row["dataset"] / f"{row['scene_name']}.mp4"
                try:
                    frames, times, source = self.cache.get(video)
                    self.batch.append((row, VideoQuestion(frames, times, self.cfg.spec.prompt(row), source)))
                except (OSError, ValueError, VideoError, av.error.FFmpegError) as err:
                    self.errors.append({"id": row["id"], "reason": str(err)})
                    progress.advance(task)
                    continue
                if len(self.batch) == self.cfg.batch_size:
                    progress.advance(task, self.flush(out))
            progress.advance(task, self.flush(out))

    def flush(self, out: Any) -> int:
        """Answer and record the batch; returns how many questions it held."""
        if not self.batch:
            return 0
        cfg = self.cfg
        if self.generator is None:
            self.generator = load_generator(self.model_dir, cfg)
        torch.manual_seed(batch_seed(cfg.seed, [row["id"] for row, _ in self.batch]))
        answers = self.generator.generate([request for _, request in self.batch])
        for (row, _), answer in zip(self.batch, answers, strict=True):
            record = {key: row[key] for key in RECORD_FIELDS} | {
                "prediction": answer,
                "frames": cfg.frames,
                "frame_pairing": cfg.frame_pairing,
                "profile": cfg.profile,
            }
            out.write(json.dumps(record) + "\n")
            self.answered[row["id"]] = record
        out.flush()
        os.fsync(out.fileno())
        count, self.batch = len(self.batch), []
        return count


def batch_seed(seed: int, ids: Sequence[Any]) -> int:
    """The sampling seed of a batch: a hash of the run's seed and the batch's question ids."""
    digest = hashlib.sha256(json.dumps([seed, [str(i) for i in ids]]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFFFFFFFFFFFFFF


def score_file(predictions: str | Path, parser: str, out_dir: str | Path) -> dict[str, Any]:
    """`eval score`: score a predictions jsonl, write `scores.jsonl` and the report; returns the summary.

    Malformed lines and rows that cannot be scored are reported by id and left out.
    """
    predictions = Path(predictions)
    if not predictions.is_file():
        raise FileNotFoundError(f"{predictions}: predictions file not found")
    rows, errors = [], []
    for row, problem in _read_jsonl(predictions):
        if problem is not None or not isinstance(row, dict):
            errors.append({"id": None, "reason": problem or "record is not an object"})
        else:
            rows.append(row)
    scored, score_errors = score_rows(rows, parser)
    errors += score_errors
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "scores.jsonl").open("w") as f:
        for row in scored:
            f.write(json.dumps(row) + "\n")
    recorded = {
        key: {row.get(key) for row in rows} - {None} for key in ("frames", "frame_pairing", "profile")
    }
    single = {key: values.pop() if len(values) == 1 else None for key, values in recorded.items()}
    summary = vsibench_summary(scored, errors, parser, model=None, **single)
    write_vsibench_report(out_dir, summary)
    return summary
