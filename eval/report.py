"""Reports of an evaluation: `summary.json`, a markdown table and a bar chart.

The VSI-Bench summary (written by `eval vsibench` and `eval score` alike):

    {"benchmark": "VSI-Bench", "profile": "lmms-eval" | "geovr" | null,
     "parser": "original" | "extract_number" | "geovr", "model": str | null,
     "frames": int | null, "frame_pairing": "repeat" | "consecutive" | null,
     "num_scored": int, "num_errors": int,
     "scores": {<8 task keys as lmms-eval names them>: fraction, ..., "overall": fraction},
     "per_type": {<raw question type>: {"score": fraction, "count": int}},
     "errors": [{"id": ..., "reason": str}, ...]}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from geovr.eval.scoring import TASKS, aggregate


def vsibench_summary(
    scored: list[dict[str, Any]],
    errors: list[dict[str, Any]],
    parser: str,
    model: str | None = None,
    frames: int | None = None,
    frame_pairing: str | None = None,
    profile: str | None = None,
) -> dict[str, Any]:
    """Summary of scored rows (each with `question_type` and `score`); see the module docstring.
    `profile` is the evaluation protocol the answers were made with (`eval.vsibench.PROFILES`)."""
    per_type: dict[str, dict[str, Any]] = {}
    for row in scored:
        entry = per_type.setdefault(row["question_type"], {"total": 0.0, "count": 0})
        entry["total"] += row["score"]
        entry["count"] += 1
    return {
        "benchmark": "VSI-Bench",
        "profile": profile,
        "parser": parser,
        "model": model,
        "frames": frames,
        "frame_pairing": frame_pairing,
        "num_scored": len(scored),
        "num_errors": len(errors),
        "scores": aggregate(((row["question_type"], row["score"]) for row in scored), parser),
        "per_type": {
            qtype: {"score": entry["total"] / entry["count"], "count": entry["count"]}
            for qtype, entry in sorted(per_type.items())
        },
        "errors": errors,
    }


def vsibench_table(summary: dict[str, Any]) -> str:
    """Markdown table: one column per task and the overall score, in percent (x100) as papers print."""
    scores = summary["scores"]
    columns = [(key, label) for key, label in TASKS if key in scores] + [("overall", "Overall")]
    header = "| Model | " + " | ".join(label for _, label in columns) + " |"
    rule = "|---|" + "---:|" * len(columns)
    values = " | ".join(f"{100 * scores[key]:.1f}" if key in scores else "-" for key, _ in columns)
    lines = [
        f"# VSI-Bench (profile: {summary.get('profile') or '-'}, {summary['parser']} parser, "
        f"frames: {summary['frames'] or '-'}, "
        f"frame pairing: {summary.get('frame_pairing') or '-'})",
        "",
        header,
        rule,
        f"| {summary['model'] or '-'} | {values} |",
        "",
        f"{summary['num_scored']} questions scored, {summary['num_errors']} not scored (see summary.json `errors`).",
    ]
    return "\n".join(lines) + "\n"


def vsibench_chart(summary: dict[str, Any], path: Path) -> None:
    """Bar chart of the task scores and the overall score, in percent."""
    scores = summary["scores"]
    labels = [label for key, label in TASKS if key in scores] + ["Overall"]
    values = [100 * scores[key] for key, _ in TASKS if key in scores] + [100 * scores.get("overall", 0.0)]
    fig, ax = plt.subplots(figsize=(9, 4))
    colors = ["#4c72b0"] * (len(values) - 1) + ["#dd8452"]
    bars = ax.bar(labels, values, color=colors)
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("score (%)")
    ax.set_title(f"VSI-Bench: {summary['model'] or 'predictions'} ({summary['parser']} parser)")
    ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_vsibench_report(out: Path, summary: dict[str, Any]) -> dict[str, Path]:
    """Write `summary.json`, `summary.md` and `scores.png` under `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"summary": out / "summary.json", "table": out / "summary.md", "chart": out / "scores.png"}
    paths["summary"].write_text(json.dumps(summary, indent=1) + "\n")
    paths["table"].write_text(vsibench_table(summary))
    vsibench_chart(summary, paths["chart"])
    return paths


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
