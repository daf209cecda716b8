"""`geovr-pipeline eval ...` (VSI-Bench, scoring, geometry metrics, question generation) and `inspect`."""

from __future__ import annotations

from pathlib import Path

import typer

from geovr.app.cli import EVALUATION, app
from geovr.app.options import config_option
from geovr.eval.config import PROFILES, QuestionConfig, VSIBenchConfig
from geovr.eval.scoring import PARSERS
from geovr.teacher_cache.frames import FRAME_PAIRINGS

eval_app = typer.Typer(
    help="Evaluate models: VSI-Bench, scoring, geometry of the student heads.", no_args_is_help=True
)
app.add_typer(eval_app, name="eval", rich_help_panel=EVALUATION)

PARSER_HELP = (
    "answer matching: original (first word) or extract_number (lmms-eval 0.7.3), or geovr "
    f"(GeoVR's metric_result.py); one of {', '.join(PARSERS)}"
)


def _by_profile(name: str) -> str:
    """ " [profile: lmms-eval's value / geovr's value]" of a profile default."""
    values = " / ".join(str(getattr(spec, name)) for spec in PROFILES.values())
    return f" (profile: {values})"


def _print_scores(summary: dict) -> None:
    for key, value in summary["scores"].items():
        typer.echo(f"{key:<40} {100 * value:6.1f}")
    if summary["num_errors"]:
        typer.echo(f"{summary['num_errors']} question(s) not scored, listed in summary.json", err=True)


@eval_app.command("vsibench")
def vsibench(
    model: Path = typer.Option(
        ...,
        "--model",
        help="Qwen3-VL-format model directory (base model, exported student, or exported fusion model: it runs its encoder)",
    ),
    data: Path = typer.Option(
        ..., "--data", help="VSI-Bench directory: *.parquet or *.jsonl + <dataset>/<scene>.mp4"
    ),
    out: Path = typer.Option(..., "--out", help="output directory (resumes from its predictions.jsonl)"),
    profile: str = config_option(
        VSIBenchConfig,
        "profile",
        f"the published protocol, one of {', '.join(PROFILES)}: lmms-eval (its prompts, greedy, its scorer) "
        "or geovr (GeoVR's eval_vsi.py prompts, top-p 0.8 / temperature 0.7 sampling, its matching)",
    ),
    frames: int | None = typer.Option(
        None, help="frames sampled uniformly per video" + _by_profile("frames")
    ),
    parser: str | None = typer.Option(None, help=PARSER_HELP + _by_profile("parser")),
    batch_size: int = config_option(
        VSIBenchConfig, "batch_size", "questions per generate call (left padding)"
    ),
    limit: int | None = config_option(VSIBenchConfig, "limit", "only the first N questions"),
    max_new_tokens: int | None = typer.Option(
        None, help="answer length at most" + _by_profile("max_new_tokens")
    ),
    max_frame_tokens: int | None = typer.Option(
        None,
        help="merged visual tokens per frame under the clip pixel budget, as the Qwen3-VL video "
        "processor sizes a whole clip" + _by_profile("max_frame_tokens"),
    ),
    video_min_pixels: int = config_option(
        VSIBenchConfig, "video_min_pixels", "minimum pixels of the whole clip (GeoVR's)"
    ),
    frame_pairing: str = config_option(
        VSIBenchConfig,
        "frame_pairing",
        f"one of {', '.join(FRAME_PAIRINGS)}: consecutive: frame pairs per temporal token, as the Qwen3-VL "
        "processor, GeoVR's eval_vsi.py and lmms-eval feed it; repeat: one frame per token, GeoVR's training layout",
    ),
    seed: int = config_option(
        VSIBenchConfig, "seed", "sampling seed (geovr profile): each batch samples from (seed, ids)"
    ),
    device: str = config_option(VSIBenchConfig, "device", "torch device"),
    dtype: str = config_option(VSIBenchConfig, "dtype", "float32, bfloat16 or float16"),
) -> None:
    """Answer VSI-Bench with a model under a published protocol (--profile) and score it."""
    from geovr.eval.vsibench import run_vsibench

    cfg = VSIBenchConfig(
        profile=profile,
        frames=frames,
        parser=parser,
        batch_size=batch_size,
        limit=limit,
        max_new_tokens=max_new_tokens,
        max_frame_tokens=max_frame_tokens,
        video_min_pixels=video_min_pixels,
        frame_pairing=frame_pairing,
        seed=seed,
        device=device,
        dtype=dtype,
    )
    _print_scores(run_vsibench(model, data, out, cfg))


@eval_app.command("score")
def score(
    predictions: Path = typer.Argument(
        ..., help="jsonl rows with question_type, ground_truth, prediction, options"
    ),
    out: Path = typer.Option(
        ..., "--out", help="output directory: scores.jsonl, summary.json/.md, scores.png"
    ),
    parser: str = typer.Option(PARSERS[0], help=PARSER_HELP),
) -> None:
    """Score a predictions file with the VSI-Bench scorer (answers are parsed, never executed)."""
    from geovr.eval.vsibench import score_file

    _print_scores(score_file(predictions, parser, out))


@eval_app.command("questions")
def questions(
    corpus: Path = typer.Option(..., "--corpus", help="synthetic corpus directory (geovr-pipeline synth)"),
    out: Path = typer.Option(..., "--out", help="VSI-Bench-format directory to write"),
    per_type: int = config_option(
        QuestionConfig, "max_per_type", "questions per raw question type and scene, at most"
    ),
    seed: int = config_option(QuestionConfig, "seed", "random seed of the question choice"),
) -> None:
    """Write VSI-Bench-style questions with ground truth from the synthetic corpus's 3D scenes."""
    from geovr.eval.questions import write_vsi_dataset

    path = write_vsi_dataset(corpus, out, QuestionConfig(max_per_type=per_type, seed=seed))
    count = sum(1 for _ in path.open())
    typer.echo(f"{count} questions in {path}")


@eval_app.command("geometry")
def geometry(
    model: Path = typer.Option(..., "--model", help="student checkpoint or RUN directory (last checkpoint)"),
    store: Path = typer.Option(..., "--store", help="teacher-label store of held-out clips"),
    out: Path = typer.Option(..., "--out", help="output directory: geometry.json and geometry.md"),
    limit: int | None = typer.Option(None, help="only the store's first N clips"),
    device: str = typer.Option("cpu", help="torch device"),
    corpus_root: Path | None = typer.Option(
        None, "--corpus-root", help="the videos' corpus root: also score against RGB-D ground truth (gt_*)"
    ),
) -> None:
    """The student's heads against the cached teacher labels: depth, cameras, scale, features."""
    from geovr.eval.geometry_metrics import evaluate_geometry

    report = evaluate_geometry(model, store, out, limit=limit, device=device, corpus_root=corpus_root)
    for name, value in report["metrics"].items():
        typer.echo(f"{name:<28} {value:.4f}")
    typer.echo(f"{report['num_clips']} clips; report in {out / 'geometry.md'}")


@app.command("inspect", rich_help_panel=EVALUATION)
def inspect(
    store: Path = typer.Option(..., "--store", help="teacher-label store"),
    clip: str = typer.Option(..., "--clip", help="clip id (see `cache stats` or the store's done markers)"),
    out: Path = typer.Option(..., "--out", help="output directory for the PNGs and PLY files"),
    model: Path | None = typer.Option(
        None, "--model", help="student checkpoint or RUN: adds its depth and cameras"
    ),
    device: str = typer.Option("cpu", help="torch device"),
) -> None:
    """Pictures of a clip: frames with teacher (and student) depth, camera trajectory, point clouds."""
    from geovr.eval.inspect import describe, inspect_clip

    typer.echo(describe(inspect_clip(store, clip, out, model=model, device=device)))


@eval_app.command("label-quality")
def label_quality(
    store: Path = typer.Option(..., "--store", help="label store (precompute output)"),
    corpus_root: Path = typer.Option(
        ...,
        "--corpus-root",
        help="the corpus root of the store's videos (index's --corpus-root), with RGB-D folders",
    ),
    out: Path = typer.Option(..., "--out", help="output directory: label_quality.json, .md and .png"),
    limit: int | None = typer.Option(None, help="only the store's first N clips"),
) -> None:
    """The store's depth, cameras and scale against the clips' RGB-D ground truth, per clip and dataset."""
    from geovr.eval.label_quality import label_quality as run_label_quality

    report = run_label_quality(store, corpus_root, out, limit=limit)
    for name, value in report["metrics"].items():
        typer.echo(f"{name:<28} {value:.4f}")
    for problem in report["clips_with_unusable_ground_truth"]:
        typer.echo(f"warning: clip {problem['clip_id']} ({problem['video']}): {problem['problem']}", err=True)
    typer.echo(
        f"{report['num_clips']} clips with ground truth, {report['clips_without_ground_truth']} without; "
        f"report in {out / 'label_quality.md'}"
    )
