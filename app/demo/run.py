"""One demo run: the stages of `geovr.app.demo` (`DemoRun`, `run_demo`), timed, into OUT."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
from rich.console import Console

from geovr.app.demo.config import DemoConfig
from geovr.app.demo.figures import loss_bars, training_curves
from geovr.app.demo.report import render_report
from geovr.app.demo.summary import build_summary, summary_table
from geovr.app.presets import load_section
from geovr.corpus.config import SamplingConfig, SynthConfig
from geovr.corpus.synth import render_probe, write_corpus
from geovr.eval.baselines import frequency_scores
from geovr.eval.config import QuestionConfig, VSIBenchConfig, build_prompt
from geovr.eval.geometry_metrics import evaluate_geometry
from geovr.eval.heldout import depth_comparison, load_heldout, measure_student
from geovr.eval.inspect import inspect_clip
from geovr.eval.label_quality import label_quality
from geovr.eval.questions import write_vsi_dataset
from geovr.eval.report import answer_examples
from geovr.eval.vsibench import run_vsibench
from geovr.pipeline.config import PrecomputeConfig, TeacherConfig
from geovr.pipeline.driver_watchdog import stop_watchdog
from geovr.pipeline.index import build_manifest
from geovr.pipeline.precompute import connect_ray, run_precompute
from geovr.student.config import DataConfig, StudentConfig
from geovr.student.data import join_qa
from geovr.student.export import export_plain
from geovr.student.model import GeoVRStudent
from geovr.student.objectives import OBJECTIVES
from geovr.student.tiny import write_tiny_qwen3vl
from geovr.student.training.config import TrainConfig, TrainInputs
from geovr.student.training.distributed import seed_everything
from geovr.student.training.trainer import train
from geovr.teacher_cache.convert import copy_clips
from geovr.teacher_cache.store import open_store
from geovr.teacher_cache.verify import verify_store
from geovr.teachers.tiny import write_tiny_da3_metric, write_tiny_vggt

DEMO_MARKER = ".geovr-demo"  # an output directory holding it was written by the demo (safe to replace)


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


def clips_of_qa(qa: Path, store: Path, data_cfg: DataConfig) -> list[str]:
    """Clip ids named by a QA file (joined with the store as the trainer joins), in first-use order."""
    samples, _ = join_qa(qa, open_store(store), data_cfg)
    return list(dict.fromkeys(s.clip_id for s in samples))


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
            (
                "precompute",
                "labels on a local Ray cluster (teacher; ground truth: see demo.ground_truth)",
                self.precompute,
            ),
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

    def _run_precompute(self, store: Path, cfg: PrecomputeConfig) -> Any:
        teacher_cfg = load_section(
            TeacherConfig,
            "teacher",
            self.preset,
            self.overrides,
            checkpoint=self.teacher_dir,
            metric_checkpoint=self.metric_dir,
        )
        record = {"preset": self.preset, "overrides": self.overrides, "manifest": str(self.manifest)}
        result = run_precompute(self.manifest, store, teacher_cfg, cfg, "local", self.console, False, record)
        if result.exit_code or result.store_failures:
            raise ValueError(
                f"precompute: {result.store_failures} clip(s) failed (see {store / 'failures.jsonl'})"
            )
        return result

    def _teacher_label_quality(self) -> dict[str, Any] | None:
        """With `ground_truth`: the teacher's own labels into `store-teacher`, scored against the ground
        truth (`eval label-quality`); the training store then takes depth, cameras and scale from it."""
        if not self.cfg.ground_truth:
            return None
        teacher_store = self.out / "store-teacher"
        self._run_precompute(teacher_store, self.precompute_cfg)
        return label_quality(teacher_store, self.corpus, self.eval_dir / "label-quality")

    def precompute(self) -> dict[str, Any]:
        cfg = self.precompute_cfg
        if self.cfg.ground_truth:
            cfg = dataclasses.replace(cfg, depth_source="gt", camera_source="gt", scale_source="gt")
        started_ray = connect_ray("local")  # one local cluster for both runs
        try:
            self.label_quality = self._teacher_label_quality()
            result = self._run_precompute(self.store, cfg)
        finally:
            if started_ray:
                ray.shutdown()
                stop_watchdog()
        self.label_sources = cfg.label_sources()
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
            "label_sources": self.label_sources,
            "clips_ground_truth": result.counts.clips_ground_truth,
            "clips_ground_truth_fallback": result.counts.clips_gt_fallback,
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
            StudentConfig,
            "student",
            self.preset,
            self.overrides,
            base_model=str(self.base_dir),
            train_vision_tower=cfg.train_vision_tower,
        )
        self.heldout = load_heldout(
            self.questions["qa_heldout"], self.heldout_store, data_cfg, cfg.heldout_rows_per_clip
        )
        # The trainer's initial student: same seed, same construction as in `student.training.trainer`.
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
        self.geometry = evaluate_geometry(
            self.run_dir, self.heldout_store, eval_dir / "geometry", corpus_root=self.corpus
        )
        vsi_records = [
            json.loads(line) for line in (vsi_dir / "test.jsonl").read_text().splitlines() if line.strip()
        ]
        self.vsibench_frequency = frequency_scores(vsi_records[: vsi_cfg.limit])
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
        names = [n for n in (*OBJECTIVES, "lm", "total") if before[n] > 0]
        loss_bars(self.figures / "heldout_losses.png", before, after, names)
        training_curves(
            self.figures / "training_losses.png", self.run_dir / "metrics.jsonl", [*OBJECTIVES, "lm"]
        )
        return {"figures": self.figures, "report": self.out / "report.md", "summary": self.out / "summary.json"}  # fmt: skip


def run_demo(
    out: str | Path,
    cfg: DemoConfig,
    preset: str = "tiny-geovr-spatialsv",
    overrides: list[str] | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the demo into `out` (see `DemoRun`); returns the summary (also out/summary.json).

    `preset` and `overrides` (`section.key=value`) configure sampling, teacher, precompute, student,
    train and data as for the individual commands; the demo's own knobs come from `cfg`.
    """
    return DemoRun(Path(out), cfg, preset, list(overrides or []), console or Console()).run()
