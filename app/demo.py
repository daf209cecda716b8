"""`geovr-pipeline demo`: the whole pipeline end to end on CPU in minutes, with tiny random models.

Every stage calls the same Python API as its CLI command, on a synthetic corpus whose scenes are
split into training scenes and held-out scenes. Stages, each timed, and what they write under OUT:

    1 corpus      corpus/                  procedural scenes: H.264 videos + exact 3D ground truth
    2 models      models/vggt-tiny/        random VGGT (tiny-a sizes, fixed seed), the teacher
                  models/da3-metric-tiny/  random DA3-Metric (GeoVR's scale teacher: the metric scale)
                  models/qwen3vl-tiny/     random Qwen3-VL, the student's base
    3 questions   vsibench/                VSI-Bench-style questions of the held-out scenes (+ videos)
                  qa/train.jsonl           questions of the training scenes as LLaVA conversations
                  qa/heldout.jsonl         the same for the held-out scenes (held-out losses only)
    4 index       manifest.parquet         clips of both QA files (one clip per video)
    5 precompute  store/                   teacher labels of every clip, on a local Ray cluster
                  store-heldout/           the held-out clips, copied as encoded (for `eval geometry`)
    6 train       run/                     the student trained on qa/train.jsonl; the held-out losses
                                           are measured before and after training
    7 export      export/                  plain Qwen3-VL checkpoint
    8 eval        eval/vsibench/, eval/geometry/   held-out questions and held-out clips
    9 inspect     inspect/                 depth panels, trajectory, point clouds of a held-out clip
   10 report      report.md, summary.json, figures/

Held-out losses: the student before training (the base model with the trainer's initial heads:
same seed, same construction as `student.train`) and after training are run on held-out clips
with held-out conversations; each geometric loss is the mean over those samples. The depth AbsRel
of the student against the teacher labels is set beside predictors that see no image: a per-frame
constant and the training clips' mean depth map, both with the per-frame median alignment that
`eval geometry` applies to the student, and without alignment (the training-set mean depth).

The tiny teachers are random checkpoints written by `geovr.teachers.tiny` (its docstring says how
their outputs are calibrated); the metric teacher is calibrated on rendered rooms of the corpus.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from transformers import AutoTokenizer

from geovr.app.presets import load_section
from geovr.corpus.synth import SynthConfig, render_probe, write_corpus
from geovr.corpus.video import SamplingConfig
from geovr.eval.geometry_metrics import depth_metrics, evaluate_geometry, predict_clip
from geovr.eval.inspect import inspect_clip
from geovr.eval.questions import QuestionConfig, write_vsi_dataset
from geovr.eval.vsibench import VSIBenchConfig, build_prompt, run_vsibench
from geovr.pipeline.index import build_manifest
from geovr.pipeline.labeler import TeacherConfig
from geovr.pipeline.precompute import PrecomputeConfig, run_precompute
from geovr.student.batch import camera_target, collate_samples, make_sample
from geovr.student.data import DataConfig, QASample, join_qa
from geovr.student.export import export_plain
from geovr.student.losses import camera_loss
from geovr.student.model import GeoVRStudent, StudentConfig
from geovr.student.tiny import write_tiny_qwen3vl
from geovr.student.train import TrainConfig, TrainInputs, seed_everything, train
from geovr.student.vision_inputs import VideoPreprocess
from geovr.teacher_cache.config import require, to_dict
from geovr.teacher_cache.schema import ClipLabels
from geovr.teacher_cache.store import open_store, open_writer
from geovr.teacher_cache.verify import verify_store
from geovr.teachers.tiny import write_tiny_da3_metric, write_tiny_vggt

DEMO_MARKER = ".geovr-demo"  # an output directory holding it was written by the demo (safe to replace)
SUMMARY_FORMAT_VERSION = 1
GEOMETRIC_LOSSES = ("camera", "depth", "scale", "distill")
TARGET_REDUCTION = 0.30  # issue 9: each held-out geometric loss at least 30% lower after training


# The sizes of shared/reference/vggt/tiny-a (written here, not read from there: users may not have it).
@dataclass
class DemoConfig:
    """Section `demo` of the `tiny` preset: the corpus, the models' seed and the training knobs.

    Attributes:
        train_scenes, heldout_scenes: synthetic scenes for training and for evaluation only.
        frames, width, height, fps: the scene videos (the tiny preset keeps 8 frames at 2 fps).
        seed: corpus, models, questions and training.
        metric_depth: write a tiny DA3-Metric model so that the teacher labels a metric scale
            (without it the scale loss has no target).
        questions_per_type: at most this many questions per question type and scene.
        clips_per_shard: clips per store shard.
        steps, lr_llm, lr_heads: the demo's training overrides (optimizer steps, learning rates).
        heldout_rows_per_clip: held-out conversations per held-out clip in the loss measurement.
        vsibench_frames: frames per video in `eval vsibench`.
        vsibench_limit: only the first N held-out questions (0: all).
    """

    train_scenes: int = 8
    heldout_scenes: int = 2
    frames: int = 32
    width: int = 256
    height: int = 192
    fps: float = 8.0
    seed: int = 0
    metric_depth: bool = True
    questions_per_type: int = 3
    clips_per_shard: int = 2
    steps: int = 200
    lr_llm: float = 2e-4
    lr_heads: float = 3e-3
    heldout_rows_per_clip: int = 4
    vsibench_frames: int = 8
    vsibench_limit: int = 0

    def validate(self) -> None:
        require(self.train_scenes >= 1, f"demo.train_scenes must be >= 1, got {self.train_scenes}")
        require(self.heldout_scenes >= 1, f"demo.heldout_scenes must be >= 1, got {self.heldout_scenes}")
        require(self.steps >= 1, f"demo.steps must be >= 1, got {self.steps}")
        require(self.lr_llm > 0 and self.lr_heads > 0, "demo.lr_llm and demo.lr_heads must be > 0")
        require(self.questions_per_type >= 1, "demo.questions_per_type must be >= 1")
        require(self.clips_per_shard >= 1, "demo.clips_per_shard must be >= 1")
        require(self.heldout_rows_per_clip >= 1, "demo.heldout_rows_per_clip must be >= 1")
        require(self.vsibench_frames >= 1, "demo.vsibench_frames must be >= 1")
        require(self.vsibench_limit >= 0, "demo.vsibench_limit must be >= 0 (0: all questions)")


# ----------------------------------------------------------------------------------------------
# Questions: the generator's records as VSI-Bench data (held-out) and as conversations (training)


def conversation_row(record: dict[str, Any], video: str) -> dict[str, Any]:
    """A VSI-Bench record as a VSI-590K / LLaVA conversation row about `video` (relative path).

    The user turn is the benchmark's own prompt (`eval.vsibench.build_prompt`), so the student is
    trained on exactly what it is asked in `eval vsibench`; the answer is the ground truth.
    """
    return {
        "id": f"{record['scene_name']}-{record['id']}",
        "video": video,
        "question_type": record["question_type"],
        "conversations": [
            {"from": "human", "value": f"<video>\n{build_prompt(record)}"},
            {"from": "gpt", "value": str(record["ground_truth"])},
        ],
    }


def split_questions(corpus: Path, out: Path, heldout_scenes: set[str], cfg: DemoConfig) -> dict[str, Any]:
    """Generate questions over every scene; keep the held-out scenes' as a VSI-Bench directory
    (`out/vsibench`: test.jsonl + <dataset>/<scene>.mp4) and write both splits as conversations
    (`out/qa/train.jsonl`, `out/qa/heldout.jsonl`, videos relative to the corpus)."""
    vsi_dir = out / "vsibench"
    path = write_vsi_dataset(
        corpus, vsi_dir, QuestionConfig(max_per_type=cfg.questions_per_type, seed=cfg.seed)
    )
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    heldout = [r for r in records if r["scene_name"] in heldout_scenes]
    train = [r for r in records if r["scene_name"] not in heldout_scenes]
    path.write_text("".join(json.dumps(r) + "\n" for r in heldout))
    for record in train:  # the benchmark directory holds the held-out videos only
        (vsi_dir / record["dataset"] / f"{record['scene_name']}.mp4").unlink(missing_ok=True)
    qa_dir = out / "qa"
    qa_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, rows in (("train", train), ("heldout", heldout)):
        files[split] = qa_dir / f"{split}.jsonl"
        files[split].write_text(
            "".join(json.dumps(conversation_row(r, f"videos/{r['scene_name']}.mp4")) + "\n" for r in rows)
        )
    return {
        "vsibench": vsi_dir,
        "qa_train": files["train"],
        "qa_heldout": files["heldout"],
        "questions_train": len(train),
        "questions_heldout": len(heldout),
    }


# ----------------------------------------------------------------------------------------------
# Stores


def copy_clips(source: Path, destination: Path, clip_ids: list[str], clips_per_shard: int) -> int:
    """Copy clips of a store into a new store with the same fingerprint and codecs, as encoded
    (no re-quantisation, so the copy decodes to exactly the same labels). Returns the clip count."""
    reader = open_store(source)
    with open_writer(destination, reader.fingerprint, reader.format, codecs=reader.codecs) as writer:
        for index in range(0, len(clip_ids), clips_per_shard):
            encoded = [reader.read_encoded(c) for c in clip_ids[index : index + clips_per_shard]]
            writer.write_encoded_shard(f"{index // clips_per_shard:06d}", encoded, [])
    return len(clip_ids)


def clips_of_qa(qa: Path, store: Path, data_cfg: DataConfig) -> list[str]:
    """Clip ids named by a QA file (joined with the store as the trainer joins), in first-use order."""
    samples, _ = join_qa(qa, open_store(store), data_cfg)
    return list(dict.fromkeys(s.clip_id for s in samples))


# ----------------------------------------------------------------------------------------------
# Held-out measurement: losses and depth of a student on held-out clips


@dataclass
class HeldoutSet:
    """Held-out conversations joined with their clips, and the clips' labels by clip id."""

    samples: list[QASample]
    clips: dict[str, ClipLabels]


def load_heldout(qa: Path, store: Path, data_cfg: DataConfig, rows_per_clip: int) -> HeldoutSet:
    """At most `rows_per_clip` conversations per held-out clip, spread over the clip's rows."""
    reader = open_store(store)
    samples, _ = join_qa(qa, reader, data_cfg)
    by_clip: dict[str, list[QASample]] = {}
    for sample in samples:
        by_clip.setdefault(sample.clip_id, []).append(sample)
    chosen = []
    for rows in by_clip.values():
        stride = max(1, len(rows) // rows_per_clip)
        chosen.extend(rows[::stride][:rows_per_clip])
    return HeldoutSet(chosen, {clip_id: reader.read_clip(clip_id) for clip_id in by_clip})


@torch.no_grad()
def measure_student(
    student: GeoVRStudent,
    heldout: HeldoutSet,
    model_dir: Path,
    max_seq_len: int,
    console: Console,
    label: str,
) -> dict[str, Any]:
    """Mean losses {lm, camera, depth, scale, distill, total} of `student` over the held-out samples;
    per held-out clip (`eval geometry`'s prediction path) its depth (S, Hd, Wd), and the unweighted
    parts of its camera loss {translation, rotation, fov} averaged over the clips."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    preprocess = VideoPreprocess.from_model_dir(
        model_dir, student.config.video_max_pixels, student.config.video_min_pixels
    )
    student.eval()
    totals: dict[str, float] = {}
    with _progress(console) as progress:
        task = progress.add_task(label, total=len(heldout.samples) + len(heldout.clips))
        for sample in heldout.samples:
            built = make_sample(
                heldout.clips[sample.clip_id], sample.messages(), tokenizer, preprocess, max_seq_len
            )
            losses = student(collate_samples([built], int(tokenizer.pad_token_id)))
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + float(value)
            progress.advance(task)
        depth, camera_parts = {}, []
        for clip_id, labels in heldout.clips.items():
            pred = predict_clip(student, tokenizer, preprocess, labels)
            depth[clip_id] = pred["depth"]
            target = camera_target(labels)[None]
            _, parts = camera_loss(
                torch.from_numpy(pred["pose_enc"])[None],
                target,
                torch.ones(target.shape[:2], dtype=torch.bool),
            )
            camera_parts.append({name: float(value) for name, value in parts.items()})
            progress.advance(task)
    losses = {name: total / len(heldout.samples) for name, total in totals.items()}
    parts = {name: float(np.mean([p[name] for p in camera_parts])) for name in camera_parts[0]}
    return {"losses": losses, "depth": depth, "camera_parts": parts}


def raw_abs_rel(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean |pred - target| / target over finite positive target pixels, no alignment."""
    mask = np.isfinite(target) & (target > 0) & np.isfinite(pred)
    return float(np.mean(np.abs(pred[mask] - target[mask]) / target[mask]))


def depth_comparison(
    student_depth: dict[str, dict[str, np.ndarray]], heldout: HeldoutSet, train_depth: list[np.ndarray]
) -> dict[str, Any]:
    """Depth AbsRel (and delta<1.25) against the teacher on the held-out clips, for the student
    (before / after) and for predictors that see no image; see the module docstring.

    Args:
        student_depth: {"before"|"after": {clip id: (S, Hd, Wd)}}.
        train_depth: the teacher depth (S, Hd, Wd) of each training clip.
    """
    mean_depth = float(np.mean(np.concatenate([d[np.isfinite(d)] for d in train_depth])))
    shapes = {d.shape[1:] for d in train_depth} | {c.depth.shape[1:] for c in heldout.clips.values()}
    mean_map = np.mean(np.concatenate(train_depth), axis=0) if len(shapes) == 1 else None
    targets = {clip_id: labels.depth.astype(np.float64) for clip_id, labels in heldout.clips.items()}

    def both(predict) -> dict[str, float]:
        """Clip-averaged aligned AbsRel / delta1 (as `eval geometry`) and raw AbsRel."""
        aligned = [depth_metrics(predict(cid, t), t) for cid, t in targets.items()]
        return {
            "abs_rel_aligned": float(np.mean([m["depth_abs_rel"] for m in aligned])),
            "delta1_aligned": float(np.mean([m["depth_delta1"] for m in aligned])),
            "abs_rel_raw": float(np.mean([raw_abs_rel(predict(cid, t), t) for cid, t in targets.items()])),
        }

    predictors = {
        f"student_{when}": both(lambda cid, t, d=depths: d[cid].astype(np.float64))
        for when, depths in student_depth.items()
    }
    # Any per-frame constant, median-aligned, becomes the frame's teacher median; unaligned, the
    # constant is the training clips' mean depth.
    predictors["constant_train_mean"] = both(lambda cid, t: np.full_like(t, mean_depth))
    if mean_map is not None:
        predictors["train_mean_depth_map"] = both(lambda cid, t: np.broadcast_to(mean_map, t.shape))
    return {"train_mean_depth": mean_depth, "predictors": predictors}


def answer_examples(base_dir: Path, student_dir: Path, count: int = 6) -> list[dict[str, Any]]:
    """The first `count` questions of `eval vsibench` with both models' answers."""

    def predictions(path: Path) -> dict[Any, dict[str, Any]]:
        rows = (json.loads(line) for line in (path / "predictions.jsonl").read_text().splitlines() if line)
        return {row["id"]: row for row in rows}

    base, student = predictions(base_dir), predictions(student_dir)
    return [
        {
            "question_type": row["question_type"],
            "ground_truth": row["ground_truth"],
            "base": base[qid]["prediction"] if qid in base else None,
            "student": row["prediction"],
        }
        for qid, row in list(student.items())[:count]
    ]


# ----------------------------------------------------------------------------------------------
# Figures


def loss_bars(path: Path, before: dict[str, float], after: dict[str, float], names: list[str]) -> None:
    """Grouped bars of the held-out losses before and after training (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.bar(x - 0.2, [before[n] for n in names], 0.4, label="before training")
    ax.bar(x + 0.2, [after[n] for n in names], 0.4, label="after training")
    for i, n in enumerate(names):
        ax.text(
            i + 0.2,
            after[n],
            f"{100 * (after[n] / before[n] - 1):+.1f}%",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(x, names)
    ax.set_yscale("log")
    ax.set_ylabel("mean loss on held-out clips")
    ax.set_title("held-out losses before / after training", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def training_curves(path: Path, metrics_file: Path, names: list[str]) -> None:
    """Each loss term per optimizer step (log scale), from the run's metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for name in names:
        values = [r.get(f"loss.{name}") for r in records]
        if any(v is not None and v > 0 for v in values):
            ax.plot(steps, values, label=name, linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("training losses (global batch of the training clips)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Orchestration


@dataclass
class StageRecord:
    name: str
    seconds: float = 0.0
    outputs: dict[str, Any] = field(default_factory=dict)


class Stages:
    """Numbered, timed stages with a rule line at the start and a timing line at the end."""

    def __init__(self, console: Console, total: int) -> None:
        self.console = console
        self.total = total
        self.records: list[StageRecord] = []

    @contextmanager
    def stage(self, name: str, what: str) -> Iterator[StageRecord]:
        record = StageRecord(name)
        self.console.rule(f"[bold][{len(self.records) + 1}/{self.total}] {name}[/]: {what}", align="left")
        started = time.perf_counter()
        yield record
        record.seconds = time.perf_counter() - started
        self.records.append(record)
        self.console.print(f"[green]{name} done in {record.seconds:.1f} s[/]")


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def prepare_out(out: Path) -> None:
    """Create OUT, or empty it when a previous demo wrote it; refuse any other non-empty directory."""
    if out.exists() and any(out.iterdir()):
        if not (out / DEMO_MARKER).is_file():
            raise FileExistsError(
                f"{out}: exists, is not empty and was not written by the demo; choose another --out"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text(
        "written by geovr-pipeline demo; the next demo run replaces this directory\n"
    )


class DemoRun:
    """One demo run into `out`: the stages of the module docstring, one method each, run in order by
    `run()`. Each stage method returns what it produced (shown in the report) and keeps on `self`
    what later stages need."""

    def __init__(
        self, out: Path, cfg: DemoConfig, preset: str, overrides: list[str], console: Console
    ) -> None:
        cfg.validate()
        self.out = Path(out).absolute()
        self.cfg = cfg
        self.preset = preset
        self.overrides = overrides
        self.console = console
        self.sampling = load_section(SamplingConfig, "sampling", preset, overrides)
        self.data_cfg = load_section(DataConfig, "data", preset, overrides)
        self.precompute_cfg = load_section(PrecomputeConfig, "precompute", preset, overrides)
        out = self.out
        self.corpus, self.models, self.manifest = out / "corpus", out / "models", out / "manifest.parquet"
        self.store, self.heldout_store, self.run_dir = out / "store", out / "store-heldout", out / "run"
        self.export_dir, self.eval_dir, self.inspect_dir = out / "export", out / "eval", out / "inspect"
        self.figures = out / "figures"

    def run(self) -> dict[str, Any]:
        """Every stage, then OUT/summary.json and OUT/report.md; returns the summary."""
        prepare_out(self.out)
        started = time.perf_counter()
        load_start = os.getloadavg()[0]
        self.console.print(
            f"[bold]geovr-pipeline demo[/] -> {self.out}  ({os.cpu_count()} CPUs, {torch.get_num_threads()} "
            f"torch threads, 1-minute load average {load_start:.1f})"
        )
        cfg = self.cfg
        plan = [
            ("corpus", "synthetic indoor scenes (corpus.synth)", self.write_corpus),
            ("models", "tiny random teachers and student base, fixed seed", self.write_models),
            ("questions", "VSI-Bench-style questions from the scenes' 3D ground truth", self.write_questions),
            ("index", "clip manifest from the QA files", self.index),
            ("precompute", "teacher labels on a local Ray cluster", self.precompute),
            ("train", f"student for {cfg.steps} steps; held-out losses before and after", self.train),
            ("export", "plain Qwen3-VL checkpoint without the geometric parts", self.export),
            ("eval", "VSI-Bench on held-out questions, geometry on held-out clips", self.evaluate),
            ("inspect", "pictures and point clouds of a held-out clip", self.inspect),
            ("report", "figures, report.md and summary.json", self.draw_figures),
        ]
        stages = Stages(self.console, len(plan))
        for name, what, method in plan:
            with stages.stage(name, what) as stage:
                stage.outputs = method()
        summary = build_summary(self, stages.records, time.perf_counter() - started, load_start)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
        (self.out / "report.md").write_text(render_report(summary, self.out))
        self.console.print(summary_table(summary))
        self.console.print(f"[bold]demo finished in {summary['wall_s']:.0f} s[/]: {self.out / 'report.md'}")
        return summary

    # -- stages --------------------------------------------------------------------------------

    def write_corpus(self) -> dict[str, Any]:
        cfg = self.cfg
        synth_cfg = SynthConfig(
            scenes=cfg.train_scenes + cfg.heldout_scenes,
            frames=cfg.frames,
            width=cfg.width,
            height=cfg.height,
            fps=cfg.fps,
            seed=cfg.seed,
        )
        scene_ids = write_corpus(self.corpus, synth_cfg, progress=True)
        self.train_scenes, self.heldout_scenes = scene_ids[: cfg.train_scenes], scene_ids[cfg.train_scenes :]
        return {
            "corpus": self.corpus,
            "train_scenes": self.train_scenes,
            "heldout_scenes": self.heldout_scenes,
            "video": f"{cfg.frames} frames, {cfg.width}x{cfg.height}, {cfg.fps:g} fps",
        }

    def write_models(self) -> dict[str, Any]:
        seed = self.cfg.seed
        self.teacher_dir = write_tiny_vggt(self.models / "vggt-tiny", seed)
        self.metric_dir = (
            write_tiny_da3_metric(self.models / "da3-metric-tiny", render_probe(seed), seed=seed)
            if self.cfg.metric_depth
            else None
        )
        self.base_dir = write_tiny_qwen3vl(self.models / "qwen3vl-tiny", seed=seed)
        return {"teacher": self.teacher_dir, "metric_teacher": self.metric_dir, "student_base": self.base_dir}

    def write_questions(self) -> dict[str, Any]:
        self.questions = split_questions(self.corpus, self.out, set(self.heldout_scenes), self.cfg)
        self.console.print(
            f"{self.questions['questions_train']} training conversations, "
            f"{self.questions['questions_heldout']} held-out questions"
        )
        return self.questions

    def index(self) -> dict[str, Any]:
        # One process: probing a few videos inline is faster than starting a process pool.
        report = build_manifest(
            [self.questions["qa_train"], self.questions["qa_heldout"]],
            self.manifest,
            self.sampling,
            self.corpus,
            self.cfg.clips_per_shard,
            workers=1,
        )
        if report.bad:
            raise ValueError(f"{self.manifest}: unusable videos {report.bad}")
        return {
            "manifest": self.manifest,
            "clips": report.num_clips,
            "shards": report.num_shards,
            "qa_rows": report.num_qa_rows,
            "sampling": self.sampling.policy(),
        }

    def precompute(self) -> dict[str, Any]:
        teacher_cfg = load_section(
            TeacherConfig,
            "teacher",
            self.preset,
            self.overrides,
            checkpoint=self.teacher_dir,
            metric_checkpoint=self.metric_dir,
        )
        record = {"preset": self.preset, "overrides": self.overrides, "manifest": str(self.manifest)}
        result = run_precompute(
            self.manifest, self.store, to_dict(teacher_cfg), self.precompute_cfg, "local", self.console, False, record
        )  # fmt: skip
        if result.exit_code or result.store_failures:
            raise ValueError(
                f"precompute: {result.store_failures} clip(s) failed (see {self.store / 'failures.jsonl'})"
            )
        self.heldout_clips = clips_of_qa(self.questions["qa_heldout"], self.store, self.data_cfg)
        self.train_clips = clips_of_qa(self.questions["qa_train"], self.store, self.data_cfg)
        copy_clips(self.store, self.heldout_store, self.heldout_clips, self.cfg.clips_per_shard)
        verified = {path.name: verify_store(path) for path in (self.store, self.heldout_store)}
        for name, verdict in verified.items():
            if not verdict.ok:
                raise ValueError(f"{name}: `cache verify` found problems: {verdict.problems}")
        return {
            "store": self.store,
            "heldout_store": self.heldout_store,
            "clips": result.store_clips,
            "frames": result.counts.frames,
            "train_clips": len(self.train_clips),
            "heldout_clips": len(self.heldout_clips),
            "format": self.precompute_cfg.format,
            "verified_clips": {name: v.clips_checked for name, v in verified.items()},
            "precompute_wall_s": result.timings.get("wall_s"),
            "teacher_actor_startup_s": result.timings.get("actor_startup_s"),
        }

    def train(self) -> dict[str, Any]:
        cfg, data_cfg = self.cfg, self.data_cfg
        train_cfg = load_section(
            TrainConfig,
            "train",
            self.preset,
            self.overrides,
            steps=cfg.steps,
            lr_llm=cfg.lr_llm,
            lr_heads=cfg.lr_heads,
            seed=cfg.seed,
            checkpoint_every=cfg.steps,
            log_every=max(1, cfg.steps // 15),
        )
        student_cfg = load_section(
            StudentConfig, "student", self.preset, self.overrides, base_model=str(self.base_dir)
        )
        self.heldout = load_heldout(
            self.questions["qa_heldout"], self.heldout_store, data_cfg, cfg.heldout_rows_per_clip
        )
        # The trainer's initial student: same seed, same construction as in `student.train`.
        seed_everything(train_cfg.seed)
        initial = GeoVRStudent.from_pretrained(
            self.base_dir, student_cfg.matched_to(open_store(self.store).fingerprint), dtype=torch.float32
        )
        self.before = measure_student(
            initial, self.heldout, self.base_dir, data_cfg.max_seq_len, self.console, "held-out, before"
        )
        del initial
        started = time.perf_counter()
        inputs = TrainInputs(self.store, self.questions["qa_train"], self.base_dir, self.run_dir)
        result = train(inputs, train_cfg, data_cfg, student_cfg)
        train_s = time.perf_counter() - started
        trained = GeoVRStudent.from_pretrained(self.run_dir, dtype=torch.float32)
        self.after = measure_student(
            trained, self.heldout, self.base_dir, data_cfg.max_seq_len, self.console, "held-out, after"
        )
        return {
            "run": self.run_dir,
            "steps": result["steps"],
            "train_s": train_s,
            "s_per_step": train_s / max(1, result["steps"]),
            "final_training_losses": {
                k[len("loss.") :]: v for k, v in result["last"].items() if k.startswith("loss.")
            },
            "heldout_samples": len(self.heldout.samples),
            "heldout_clips": len(self.heldout.clips),
        }  # fmt: skip

    def export(self) -> dict[str, Any]:
        export_plain(self.run_dir, self.export_dir)
        return {"export": self.export_dir, **json.loads((self.export_dir / "geovr_export.json").read_text())}

    def evaluate(self) -> dict[str, Any]:
        cfg, eval_dir, vsi_dir = self.cfg, self.eval_dir, self.questions["vsibench"]
        vsi_cfg = VSIBenchConfig(frames=cfg.vsibench_frames, limit=cfg.vsibench_limit or None)
        self.vsibench = run_vsibench(self.export_dir, vsi_dir, eval_dir / "vsibench", vsi_cfg)
        # The untrained base model on the same questions, for comparison.
        self.vsibench_base = run_vsibench(self.base_dir, vsi_dir, eval_dir / "vsibench-base", vsi_cfg)
        self.answers = answer_examples(eval_dir / "vsibench-base", eval_dir / "vsibench")
        self.geometry = evaluate_geometry(self.run_dir, self.heldout_store, eval_dir / "geometry")
        reader = open_store(self.store)
        train_depth = [reader.read_clip(c).depth for c in self.train_clips]
        student_depth = {"before": self.before["depth"], "after": self.after["depth"]}
        self.depth = depth_comparison(student_depth, self.heldout, train_depth)
        return {
            "vsibench": eval_dir / "vsibench",
            "vsibench_base": eval_dir / "vsibench-base",
            "geometry": eval_dir / "geometry",
            "vsibench_questions": self.vsibench["num_scored"],
            "vsibench_overall": self.vsibench["scores"].get("overall"),
            "vsibench_overall_base": self.vsibench_base["scores"].get("overall"),
        }

    def inspect(self) -> dict[str, Any]:
        self.inspected_clip = self.heldout_clips[0]
        paths = inspect_clip(self.heldout_store, self.inspected_clip, self.inspect_dir, model=self.run_dir)
        return {"clip": self.inspected_clip, **paths}

    def draw_figures(self) -> dict[str, Any]:
        self.figures.mkdir(exist_ok=True)
        before, after = self.before["losses"], self.after["losses"]
        names = [n for n in (*GEOMETRIC_LOSSES, "lm", "total") if before[n] > 0]
        loss_bars(self.figures / "heldout_losses.png", before, after, names)
        training_curves(
            self.figures / "training_losses.png", self.run_dir / "metrics.jsonl", [*GEOMETRIC_LOSSES, "lm"]
        )
        return {"figures": self.figures, "report": self.out / "report.md", "summary": self.out / "summary.json"}  # fmt: skip


def run_demo(
    out: str | Path,
    cfg: DemoConfig,
    preset: str = "tiny",
    overrides: list[str] | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the demo into `out` (see `DemoRun`); returns the summary (also out/summary.json).

    `preset` and `overrides` (`section.key=value`) configure sampling, teacher, precompute, student,
    train and data as for the individual commands; the demo's own knobs come from `cfg`.
    """
    return DemoRun(Path(out), cfg, preset, list(overrides or []), console or Console()).run()


# ----------------------------------------------------------------------------------------------
# Summary and report


def build_summary(
    run: DemoRun, records: list[StageRecord], wall_s: float, load_start: float
) -> dict[str, Any]:
    """The content of summary.json (`render_report` explains each part)."""
    before, after = run.before["losses"], run.after["losses"]
    losses: dict[str, Any] = {}
    for name in GEOMETRIC_LOSSES:
        if name == "scale" and run.metric_dir is None:
            losses[name] = {"measured": False, "why": "no metric-depth model: the teacher labels no scale"}
            continue
        reduction = 1.0 - after[name] / before[name] if before[name] > 0 else math.nan
        losses[name] = {
            "measured": True,
            "before": before[name],
            "after": after[name],
            "reduction": reduction,
            "target_met": bool(reduction >= TARGET_REDUCTION),
        }
    losses["camera"]["parts_before"] = run.before["camera_parts"]
    losses["camera"]["parts_after"] = run.after["camera_parts"]
    for name in ("lm", "total"):
        losses[name] = {"before": before[name], "after": after[name]}
    measured = [v for v in losses.values() if v.get("measured")]
    return {
        "format_version": SUMMARY_FORMAT_VERSION,
        "wall_s": wall_s,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_1min_start": load_start,
            "load_average_1min_end": os.getloadavg()[0],
        },
        "config": to_dict(run.cfg),
        "models": "tiny, random-initialised (fixed seed): teacher VGGT tiny-a sizes, student tiny Qwen3-VL",
        "stages": [{"name": r.name, "seconds": r.seconds, "outputs": r.outputs} for r in records],
        "heldout_losses": losses,
        "target_reduction": TARGET_REDUCTION,
        "all_targets_met": all(v["target_met"] for v in measured),
        "depth_abs_rel": run.depth,
        "vsibench": {
            "num_scored": run.vsibench["num_scored"],
            "scores_base": run.vsibench_base["scores"],
            "scores": run.vsibench["scores"],
            "per_type": run.vsibench["per_type"],
            "examples": run.answers,
        },
        "geometry": {"num_clips": run.geometry["num_clips"], "metrics": run.geometry["metrics"]},
    }


def summary_table(summary: dict[str, Any]) -> Table:
    """The console table at the end: held-out losses and the depth comparison."""
    table = Table(title="demo: held-out clips", header_style="bold")
    for column in ("measure", "before", "after", "change"):
        table.add_column(column, justify="right" if column != "measure" else "left")
    for name, entry in summary["heldout_losses"].items():
        if entry.get("measured") is False:
            table.add_row(f"{name} loss", "-", "-", entry["why"])
            continue
        change = 1 - entry["after"] / entry["before"] if entry["before"] else math.nan
        table.add_row(
            f"{name} loss", f"{entry['before']:.4f}", f"{entry['after']:.4f}", f"{-100 * change:+.0f}%"
        )
    predictors = summary["depth_abs_rel"]["predictors"]
    table.add_row(
        "depth AbsRel (aligned)",
        f"{predictors['student_before']['abs_rel_aligned']:.3f}",
        f"{predictors['student_after']['abs_rel_aligned']:.3f}",
        f"constant {predictors['constant_train_mean']['abs_rel_aligned']:.3f}",
    )
    return table


def _rel(path: Any, out: Path) -> str:
    return Path(path).relative_to(out).as_posix() if Path(path).is_absolute() else str(path)


def render_report(summary: dict[str, Any], out: Path) -> str:
    """report.md: what the demo is, the figures, the held-out measurements, each stage, real models."""
    cfg = summary["config"]
    stages = {s["name"]: s for s in summary["stages"]}
    lines = [
        "# geovr-pipeline demo",
        "",
        "**The models in this demo are tiny and random-initialised** (fixed seed): the teacher is a VGGT with",
        "the tiny-a sizes (width 64, 4 stages) and random weights (two output rows rescaled so that its fields",
        "of view stay positive and its depth varies over the image: `app/demo.py` says why),"
        + (" the metric-depth model a tiny random DA3-Metric," if cfg["metric_depth"] else "")
        + " the student",
        "a 4-layer Qwen3-VL of width 64 with random weights. Their labels and answers",
        "carry no knowledge of the world. What the demo shows is the pipeline itself: every stage running on",
        "real files (H.264 videos, a Ray cluster, a Zarr store, Hugging Face checkpoints), and the student",
        "learning the teacher's labels well enough to predict them on clips it never saw.",
        "",
        f"Wall time: **{summary['wall_s']:.0f} s** on {summary['machine']['cpus']} CPUs "
        f"({summary['machine']['torch_threads']} torch threads; 1-minute load average "
        f"{summary['machine']['load_average_1min_start']:.1f} at the start, "
        f"{summary['machine']['load_average_1min_end']:.1f} at the end).",
        "",
        "## Held-out clips: losses before and after training",
        "",
        f"{len(stages['corpus']['outputs']['heldout_scenes'])} held-out scenes "
        f"({stages['train']['outputs']['heldout_samples']} held-out conversations on "
        f"{stages['train']['outputs']['heldout_clips']} clips) that training never saw. Before = the base model with",
        "the trainer's initial heads (same seed); after = the trained student. Target: each geometric loss at",
        f"least {100 * summary['target_reduction']:.0f}% lower after training.",
        "",
        "| loss | before | after | reduction | target met |",
        "|---|---:|---:|---:|---|",
    ]
    for name, entry in summary["heldout_losses"].items():
        if entry.get("measured") is False:
            lines.append(f"| {name} | - | - | - | not measured: {entry['why']} |")
        elif "reduction" in entry:
            met = "yes" if entry["target_met"] else "**no**"
            lines.append(
                f"| {name} | {entry['before']:.4f} | {entry['after']:.4f} | {100 * entry['reduction']:.1f}% | {met} |"
            )
        else:
            lines.append(
                f"| {name} (not a geometric loss) | {entry['before']:.4f} | {entry['after']:.4f} | | |"
            )
    lines += [
        "",
        f"All geometric targets met: **{'yes' if summary['all_targets_met'] else 'no'}**.",
        "",
        camera_parts_line(summary["heldout_losses"]["camera"]),
        "",
        "![held-out losses](figures/heldout_losses.png)",
        "",
        "![training losses](figures/training_losses.png)",
        "",
        "## Depth against the teacher labels, beside predictors that see no image",
        "",
        "AbsRel = mean |prediction - teacher| / teacher over the held-out clips' pixels. *Aligned*: each frame's",
        "prediction scaled so that its median equals the teacher's (what `eval geometry` reports); a per-frame",
        "constant then becomes the frame's teacher median, the best an image-blind constant can do. *Raw*: no",
        f"alignment; the constant is the training clips' mean teacher depth ({summary['depth_abs_rel']['train_mean_depth']:.3f}).",
        "",
        "| predictor | AbsRel aligned | delta<1.25 aligned | AbsRel raw |",
        "|---|---:|---:|---:|",
    ]
    names = {
        "student_before": "student before training",
        "student_after": "student after training",
        "constant_train_mean": "per-frame constant (no image)",
        "train_mean_depth_map": "training clips' mean depth map (no image)",
    }
    for key, values in summary["depth_abs_rel"]["predictors"].items():
        lines.append(
            f"| {names.get(key, key)} | {values['abs_rel_aligned']:.4f} | {values['delta1_aligned']:.3f} | "
            f"{values['abs_rel_raw']:.4f} |"
        )
    lines += ["", depth_verdict(summary["depth_abs_rel"]["predictors"])]
    geometry = summary["geometry"]["metrics"]
    lines += [
        "",
        f"`eval geometry` of the trained student on the {summary['geometry']['num_clips']} held-out clips "
        "(cameras: relative-pose errors of all frame pairs; features: cosine to the teacher's):",
        "",
        "| metric | value |",
        "|---|---:|",
        *(f"| {name} | {value:.4f} |" for name, value in geometry.items()),
        "",
        "## VSI-Bench-style questions on the held-out scenes",
        "",
        f"{summary['vsibench']['num_scored']} questions generated from the held-out scenes' 3D ground truth, answered",
        f"by the exported plain Qwen3-VL (and by the untrained base model) with {cfg['vsibench_frames']} frames per",
        "video (greedy, 16 tokens), scored as lmms-eval scores VSI-Bench. A tiny random model trained for",
        "minutes learns answer formats and priors at best: these numbers show that the benchmark harness",
        "runs end to end, not spatial understanding.",
        "",
        "| task | base model (%) | exported student (%) |",
        "|---|---:|---:|",
        *(
            f"| {name} | {100 * summary['vsibench']['scores_base'].get(name, math.nan):.1f} | {100 * value:.1f} |"
            for name, value in summary["vsibench"]["scores"].items()
        ),
        "",
        "![VSI-Bench scores](eval/vsibench/scores.png)",
        "",
        "Some answers (all of them in `eval/vsibench/predictions.jsonl`):",
        "",
        "| question type | ground truth | base model | exported student |",
        "|---|---|---|---|",
        *(
            f"| {e['question_type']} | {e['ground_truth']} | {json.dumps(e['base'])} | {json.dumps(e['student'])} |"
            for e in summary["vsibench"]["examples"]
        ),
        "",
        f"## Inspect: held-out clip {stages['inspect']['outputs']['clip']}",
        "",
        "Frames, teacher depth, student depth (median-aligned) and its error; camera centres seen from above;",
        "point clouds as binary PLY files "
        + ", ".join(
            f"[{Path(p).name}]({_rel(p, out)})"
            for k, p in stages["inspect"]["outputs"].items()
            if k.startswith("points")
        )
        + ".",
        "",
        f"![depth panels]({_rel(stages['inspect']['outputs']['depth_panels'], out)})",
        "",
        f"![trajectory]({_rel(stages['inspect']['outputs']['trajectory'], out)})",
        "",
        "## Stages",
        "",
        "| stage | seconds | produced |",
        "|---|---:|---|",
    ]
    for stage in summary["stages"]:
        seconds = "" if stage["seconds"] is None else f"{stage['seconds']:.1f}"
        produced = "; ".join(f"{k}: {_describe(v, out)}" for k, v in stage["outputs"].items())
        lines.append(f"| {stage['name']} | {seconds} | {produced} |")
    lines += ["", *real_model_commands(out, cfg, stages["inspect"]["outputs"]["clip"])]
    return "\n".join(lines) + "\n"


def camera_parts_line(camera: dict[str, Any]) -> str:
    """The camera loss's unweighted parts before / after, so that a reader sees what was learnt."""
    parts = ", ".join(
        f"{name} {camera['parts_before'][name]:.3f} -> {camera['parts_after'][name]:.3f}"
        for name in ("translation", "rotation", "fov")
    )
    return (
        f"Camera loss parts (mean L1 per component on the held-out clips, before -> after): {parts}. "
        "Relative translations of a random teacher between nearby frames are the hardest part to predict "
        "(see the relative-pose errors of `eval geometry` below)."
    )


def depth_verdict(predictors: dict[str, dict[str, float]]) -> str:
    """One sentence on what the aligned AbsRel figures say about the structure the student learnt."""
    student = predictors["student_after"]["abs_rel_aligned"]
    constant = predictors["constant_train_mean"]["abs_rel_aligned"]
    text = (
        f"After training the student's aligned AbsRel is {student:.3f}, against {constant:.3f} for a per-frame "
        f"constant: it removes {100 * (1 - student / constant):.0f}% of the constant's error, i.e. it predicts "
        "how depth varies within each frame."
    )
    if "train_mean_depth_map" not in predictors:
        return text
    mean_map = predictors["train_mean_depth_map"]["abs_rel_aligned"]
    if student < mean_map:
        return text + (
            f" It also beats the training clips' mean depth map ({mean_map:.3f}), so it reads depth from the "
            "pixels rather than only reproducing the pattern common to all frames."
        )
    return text + (
        f" The training clips' mean depth map does better ({mean_map:.3f}): most of this random teacher's depth "
        "variation is a pattern tied to the image position, the same in every frame, which the student "
        "has learnt only in part in this short run."
    )


def _describe(value: Any, out: Path) -> str:
    if isinstance(value, Path) or (isinstance(value, str) and value.startswith(str(out))):
        return f"`{_rel(value, out)}`"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_describe(v, out)}" for k, v in value.items() if not isinstance(v, dict))
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value).replace("|", "/")


def real_model_commands(out: Path, cfg: dict[str, Any], clip: str) -> list[str]:
    """The report's last section: the same commands on real checkpoints (local directories)."""
    return [
        "## The same commands with real models",
        "",
        "The demo ran these stages through their Python APIs on tiny models. The same commands take the real",
        "checkpoints as local directories (nothing is downloaded): VGGT-1B (`model.pt` or `model.safetensors`",
        "of facebook/VGGT-1B), DA3METRIC-LARGE (the Hugging Face directory) and Qwen3-VL-2B-Instruct.",
        "Precompute runs on a Ray cluster with one teacher actor per GPU (see `workflows/` for Slurm, KubeRay",
        "and Ray Jobs); training runs under `torchrun`.",
        "",
        "```bash",
        "geovr-pipeline index vsi590k.jsonl --corpus-root /data/videos --out manifest.parquet --preset vggt-1b",
        "geovr-pipeline precompute --manifest manifest.parquet --out /data/store --preset vggt-1b \\",
        "    --teacher /models/VGGT-1B --metric-teacher /models/DA3METRIC-LARGE \\",
        "    --ray-address auto",
        "geovr-pipeline cache verify /data/store",
        "torchrun --nproc-per-node 8 --no-python geovr-pipeline train --preset qwen3vl-2b-geovr \\",
        "    --store /data/store --qa vsi590k.jsonl --model /models/Qwen3-VL-2B-Instruct --out runs/geovr-2b",
        "geovr-pipeline export runs/geovr-2b --out models/geovr-2b",
        "geovr-pipeline eval vsibench --model models/geovr-2b --data /data/VSI-Bench --out eval/vsibench \\",
        "    --frames 32 --device cuda --dtype bfloat16",
        "geovr-pipeline eval geometry --model runs/geovr-2b --store /data/store-heldout --out eval/geometry --device cuda",
        "geovr-pipeline inspect --store /data/store-heldout --clip CLIP_ID --model runs/geovr-2b --out inspect --device cuda",
        "```",
        "",
        "The demo's own stages as commands (tiny preset, this output directory; `store-heldout` holds the",
        "held-out clips of `store`, which the demo copies: a `precompute` of a held-out manifest gives the same):",
        "",
        "```bash",
        f"cd {out}",
        "geovr-pipeline index qa/train.jsonl qa/heldout.jsonl --corpus-root corpus --out manifest.parquet --preset tiny \\",
        f"    --clips-per-shard {cfg['clips_per_shard']}",
        "geovr-pipeline precompute --manifest manifest.parquet --out store --preset tiny --teacher models/vggt-tiny \\",
        "    --metric-teacher models/da3-metric-tiny --ray-address local --device cpu",
        "geovr-pipeline train --preset tiny --store store --qa qa/train.jsonl --model models/qwen3vl-tiny --out run \\",
        f"    --set train.steps={cfg['steps']} --set train.lr_llm={cfg['lr_llm']:g} --set train.lr_heads={cfg['lr_heads']:g} \\",
        f"    --set train.seed={cfg['seed']} --set train.checkpoint_every={cfg['steps']}",
        "geovr-pipeline export run --out export",
        f"geovr-pipeline eval vsibench --model export --data vsibench --out eval/vsibench --frames {cfg['vsibench_frames']}",
        "geovr-pipeline eval geometry --model run --store store-heldout --out eval/geometry",
        f"geovr-pipeline inspect --store store-heldout --clip {clip} --model run --out inspect",
        "```",
    ]
