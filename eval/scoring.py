"""VSI-Bench scoring: lmms-eval 0.7.3's (`lmms_eval/tasks/vsibench/utils.py`) with the parsers
`original` and `extract_number`, or GeoVR's (`metric_result.py`) with the parser `geovr`. Answers
are parsed, never executed as code.

lmms-eval: ten raw question types, scored per sample:
- multiple choice (`MCA_QUESTION_TYPES`): the first space-separated word of the prediction, trailing
  '.' stripped, then surrounding whitespace stripped, compared case-insensitively with the letter.
  A leading space therefore makes the first word empty and scores 0, as in the benchmark.
- numerical (`NA_QUESTION_TYPES`): mean relative accuracy (MRA) over the 10 thresholds
  0.50, 0.55, ..., 0.95: the fraction of thresholds t with |pred - gt| / gt <= 1 - t. An
  unparsable prediction scores 0. Two parsers turn the prediction into a number:
  * `original` (the first release): the first space-separated word, trailing '.' stripped, `float()`.
  * `extract_number` (lmms-eval 0.7.3): the first number anywhere in the lower-cased text, either
    digits (`-?\\d+(\\.\\d+)?`) or a run of English number words ("twenty-one", "three hundred and
    five"); whichever starts first wins.

Aggregation: mean score per raw type; the three relative-direction types averaged into one task;
`overall` = unweighted mean of the 8 tasks. Keys are lmms-eval's (e.g.
`object_counting_MRA:.5:.95:.05`), values are fractions in [0, 1].

Where lmms-eval would crash (a subset without all three direction types, a numerical ground truth of
0), this module averages over the direction types present and reports the row as malformed instead.

GeoVR (`geovr`), on the answer stripped of surrounding whitespace as its `eval_vsi.py` stores it:
- multiple choice: the answer's first character equals the option letter (case-sensitive); an empty
  answer scores 0 (GeoVR's `pred[0]` would stop the run there);
- numerical: `float()` of the whole answer (0 if that fails); relative error |pred - gt| / gt (0 when
  both are 0, infinite when only gt is); MRA counts the thresholds round(0.5 + 0.05 i, 2), i < 10,
  with relative error strictly below 1 - t (lmms-eval: at most);
- aggregation: the three direction types pooled into one task (the mean over all their questions,
  not of the three type means); `overall` is the sum of the 8 task scores over 8, a task without
  questions counting 0 (all 8 are reported).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

import numpy as np

MCA_QUESTION_TYPES = (
    "object_rel_direction_easy",
    "object_rel_direction_medium",
    "object_rel_direction_hard",
    "object_rel_distance",
    "route_planning",
    "obj_appearance_order",
)
NA_QUESTION_TYPES = (
    "object_abs_distance",
    "object_counting",
    "object_size_estimation",
    "room_size_estimation",
)
QUESTION_TYPES = MCA_QUESTION_TYPES + NA_QUESTION_TYPES
DIRECTION_TYPES = MCA_QUESTION_TYPES[:3]
PARSERS = ("original", "extract_number", "geovr")

MRA_SUFFIX = "MRA:.5:.95:.05"
# The 8 tasks in the benchmark's table order, as (summary key, short label for tables and charts).
TASKS: tuple[tuple[str, str], ...] = (
    (f"object_counting_{MRA_SUFFIX}", "Obj. count"),
    (f"object_abs_distance_{MRA_SUFFIX}", "Abs. dist."),
    (f"object_size_estimation_{MRA_SUFFIX}", "Obj. size"),
    (f"room_size_estimation_{MRA_SUFFIX}", "Room size"),
    ("object_rel_distance_accuracy", "Rel. dist."),
    ("object_rel_direction_accuracy", "Rel. dir."),
    ("route_planning_accuracy", "Route plan"),
    ("obj_appearance_order_accuracy", "Appr. order"),
)
# MRA thresholds exactly as lmms-eval builds them: linspace(.5, .95, int((.95 - .5) / .05 + 2)) = 10 points.
MRA_THRESHOLDS = np.linspace(0.5, 0.95, int((0.95 - 0.5) / 0.05 + 2))
# GeoVR's metric_result.py: round(0.5 + i * 0.05, 2) for i < 10, compared strictly.
GEOVR_THRESHOLDS = tuple(round(0.5 + i * 0.05, 2) for i in range(10))


class ScoringError(ValueError):
    """A row cannot be scored (unknown question type, malformed ground truth or prediction)."""


_NUMBER_WORDS = {
    "zero": 0,
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
    "thirteen": 13,
    "fourteen": 14,
    "fifteen": 15,
    "sixteen": 16,
    "seventeen": 17,
    "eighteen": 18,
    "nineteen": 19,
    "twenty": 20,
    "thirty": 30,
    "forty": 40,
    "fifty": 50,
    "sixty": 60,
    "seventy": 70,
    "eighty": 80,
    "ninety": 90,
    "hundred": 100,
    "thousand": 1000,
}
_DIGITS = re.compile(r"-?\d+(?:\.\d+)?")
_WORD = re.compile(r"[a-z]+")


def first_word(prediction: str) -> str:
    """The benchmark's answer extraction: first word split on ' ', trailing '.' removed, stripped."""
    return prediction.split(" ")[0].rstrip(".").strip()


def parse_number_original(prediction: str) -> float | None:
    """The original parser: `float()` of `first_word`, None if that fails."""
    try:
        return float(first_word(prediction))
    except ValueError:
        return None


def extract_number(prediction: str) -> float | None:
    """lmms-eval 0.7.3's parser: the first number in the text, digits or English number words.

    Words are letter runs of the lower-cased text; a number-word run starts at the first number
    word and continues over number words and "and", ending at any other word. The run is valued
    with hundreds and thousands as multipliers ("three hundred and five" = 305). If a digit match
    starts before the run, the digits win.
    """
    text = prediction.strip().lower()
    if not text:
        return None
    digits = _DIGITS.search(text)
    run_start: int | None = None
    run: list[str] = []
    for match in _WORD.finditer(text):
        word = match.group(0)
        if run_start is None:
            if word in _NUMBER_WORDS:
                run_start = match.start()
                run.append(word)
        elif word in _NUMBER_WORDS:
            run.append(word)
        elif word != "and":
            break
    if digits is not None and (run_start is None or digits.start() < run_start):
        return float(digits.group(0))
    if run_start is None:
        return None
    total, current = 0, 0
    for word in run:
        value = _NUMBER_WORDS[word]
        if value == 100:
            current = max(current, 1) * 100
        elif value == 1000:
            total += max(current, 1) * 1000
            current = 0
        else:
            current += value
    return float(total + current)


def mean_relative_accuracy(prediction: float, target: float) -> float:
    """Fraction of the 10 thresholds t in .50:.95:.05 with |prediction - target| / target <= 1 - t."""
    relative_error = abs(prediction - target) / target
    return float(np.mean(relative_error <= 1 - MRA_THRESHOLDS))


def _numerical_target(ground_truth: Any) -> float:
    try:
        target = float(ground_truth)
    except (TypeError, ValueError):
        raise ScoringError(f"numerical ground truth {ground_truth!r} is not a number") from None
    if not math.isfinite(target) or target <= 0:
        raise ScoringError(f"numerical ground truth {ground_truth!r} must be a positive finite number")
    return target


def score_geovr(question_type: str, prediction: str, ground_truth: Any) -> float:
    """GeoVR's `metric_result.py` score of one answer (module docstring)."""
    answer = prediction.strip()
    if question_type in MCA_QUESTION_TYPES:
        return 1.0 if answer[:1] == str(ground_truth).strip() else 0.0
    if question_type not in NA_QUESTION_TYPES:
        raise ScoringError(f"unknown question type {question_type!r}")
    try:
        target = float(ground_truth)
    except (TypeError, ValueError):
        raise ScoringError(f"numerical ground truth {ground_truth!r} is not a number") from None
    try:
        value = float(answer)
    except ValueError:
        return 0.0
    if target == 0:
        relative_error = 0.0 if value == 0 else math.inf
    else:
        relative_error = abs(value - target) / target
    return sum(relative_error < 1.0 - t for t in GEOVR_THRESHOLDS) / 10.0


def score_prediction(
    question_type: str, prediction: str, ground_truth: Any, parser: str = "original"
) -> float:
    """Score of one answer in [0, 1]; raises `ScoringError` for rows the benchmark cannot score."""
    if parser not in PARSERS:
        raise ScoringError(f"unknown parser {parser!r}; choose one of {', '.join(PARSERS)}")
    if not isinstance(prediction, str):
        raise ScoringError(f"prediction must be a string, got {type(prediction).__name__}")
    if parser == "geovr":
        return score_geovr(question_type, prediction, ground_truth)
    if question_type in MCA_QUESTION_TYPES:
        if not isinstance(ground_truth, str) or not ground_truth:
            raise ScoringError(f"multiple-choice ground truth {ground_truth!r} is not an option letter")
        return 1.0 if first_word(prediction).lower() == ground_truth.lower() else 0.0
    if question_type in NA_QUESTION_TYPES:
        target = _numerical_target(ground_truth)
        value = parse_number_original(prediction) if parser == "original" else extract_number(prediction)
        return 0.0 if value is None else mean_relative_accuracy(value, target)
    raise ScoringError(f"unknown question type {question_type!r}")


def aggregate(scored: Iterable[tuple[str, float]], parser: str = "original") -> dict[str, float]:
    """(question_type, score) pairs to the 8 task scores and `overall`, keyed as lmms-eval.

    lmms-eval's parsers: tasks without any scored row are left out (and do not count in `overall`).
    `geovr`: GeoVR's aggregation (module docstring).
    """
    per_type: dict[str, list[float]] = {}
    for question_type, score in scored:
        if question_type not in QUESTION_TYPES:
            raise ScoringError(f"unknown question type {question_type!r}")
        per_type.setdefault(question_type, []).append(score)
    if parser == "geovr":
        return _aggregate_geovr(per_type)
    type_means = {qtype: float(np.mean(scores)) for qtype, scores in per_type.items()}

    tasks: dict[str, float] = {}
    for qtype in NA_QUESTION_TYPES:
        if qtype in type_means:
            tasks[f"{qtype}_{MRA_SUFFIX}"] = type_means[qtype]
    for qtype in ("object_rel_distance", "route_planning", "obj_appearance_order"):
        if qtype in type_means:
            tasks[f"{qtype}_accuracy"] = type_means[qtype]
    directions = [type_means[qtype] for qtype in DIRECTION_TYPES if qtype in type_means]
    if directions:
        tasks["object_rel_direction_accuracy"] = sum(directions) / len(directions)

    ordered = {key: tasks[key] for key, _ in TASKS if key in tasks}
    if ordered:
        ordered["overall"] = sum(ordered.values()) / len(ordered)
    return ordered


def _aggregate_geovr(per_type: dict[str, list[float]]) -> dict[str, float]:
    pooled = {
        f"{qtype}_{MRA_SUFFIX}" if qtype in NA_QUESTION_TYPES else f"{qtype}_accuracy": scores
        for qtype, scores in per_type.items()
        if qtype not in DIRECTION_TYPES
    }
    pooled["object_rel_direction_accuracy"] = [
        s for qtype in DIRECTION_TYPES for s in per_type.get(qtype, [])
    ]
    tasks = {key: float(np.mean(pooled[key])) if pooled.get(key) else 0.0 for key, _ in TASKS}
    tasks["overall"] = sum(tasks.values()) / len(TASKS)
    return tasks


def score_rows(
    rows: Iterable[dict[str, Any]], parser: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Score prediction rows (`question_type`, `ground_truth`, `prediction`; `id` where present).

    Returns (scored rows: copies with `score` added, errors: {"id", "reason"} for rows that cannot
    be scored). A bad row never stops the others.
    """
    if parser not in PARSERS:
        raise ScoringError(f"unknown parser {parser!r}; choose one of {', '.join(PARSERS)}")
    scored, errors = [], []
    for index, row in enumerate(rows):
        row_id = row.get("id", f"row {index}")
        try:
            missing = [key for key in ("question_type", "ground_truth", "prediction") if key not in row]
            if missing:
                raise ScoringError(f"missing field(s) {', '.join(missing)}")
            score = score_prediction(row["question_type"], row["prediction"], row["ground_truth"], parser)
        except ScoringError as err:
            errors.append({"id": row_id, "reason": str(err)})
            continue
        scored.append({**row, "score": score})
    return scored, errors
