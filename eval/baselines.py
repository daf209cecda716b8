"""VSI-Bench's chance level "frequency": the answers a model that never looks at the video would give
if it knew the answer distribution of each task, scored like any model (`frequency_scores`).

As VSI-Bench reports it: per question type, the most frequent ground-truth answer for multiple-choice
tasks (the option letter, the most frequent one in the question set) and the mean ground-truth value
for numerical tasks. Computed on the very questions it is compared on, so it is an upper bound on
what answer priors alone can score there; a model at zero is below even this.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from geovr.eval.scoring import NA_QUESTION_TYPES, aggregate, score_rows


def frequency_answers(records: list[dict[str, Any]]) -> dict[str, str]:
    """{question type: the frequency baseline's answer} over VSI-Bench records (`question_type`,
    `ground_truth`); ties between multiple-choice answers go to the first in sorted order."""
    by_type: dict[str, list[str]] = {}
    for record in records:
        by_type.setdefault(record["question_type"], []).append(str(record["ground_truth"]))
    answers = {}
    for question_type, truths in by_type.items():
        if question_type in NA_QUESTION_TYPES:
            answers[question_type] = f"{float(np.mean([float(t) for t in truths])):.4g}"
        else:
            counts = Counter(sorted(truths))
            answers[question_type] = counts.most_common(1)[0][0]
    return answers


def frequency_scores(records: list[dict[str, Any]], parser: str = "original") -> dict[str, float]:
    """The frequency baseline's task scores and `overall`, keyed as `eval vsibench`'s summary."""
    answers = frequency_answers(records)
    rows = [{**r, "prediction": answers[r["question_type"]]} for r in records]
    scored, _ = score_rows(rows, parser)
    return aggregate(((row["question_type"], row["score"]) for row in scored), parser)
