"""Evaluation settings: the two published VSI-Bench protocols (`PROFILES`), how a run uses them
(`VSIBenchConfig`, the options of `eval vsibench`) and the question generator's margins
(`QuestionConfig`). Importable without torch (the CLI reads their defaults); `eval.vsibench`
documents the protocols.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from geovr.eval.scoring import MCA_QUESTION_TYPES, NA_QUESTION_TYPES, PARSERS
from geovr.teacher_cache.frames import FRAME_PAIRINGS, VIDEO_MIN_PIXELS

PRE_PROMPT = "These are frames of a video."
NA_POST_PROMPT = "Please answer the question using a single word or phrase."
MCA_POST_PROMPT = "Answer with the option's letter from the given choices directly."
SYSTEM_PROMPT = "You are a helpful assistant."
GEOVR_NA_POST_PROMPT = "Please answer the question ONLY using a single Arabic numeral."
GEOVR_MCA_POST_PROMPT = "Answer with ONLY the option's letter directly."
RECORD_FIELDS = ("id", "dataset", "scene_name", "question_type", "question", "options", "ground_truth")


def build_prompt(row: dict[str, Any]) -> str:
    """The benchmark's user text for one record (lmms-eval's `vsibench_doc_to_text` defaults)."""
    if row["question_type"] in NA_QUESTION_TYPES:
        return f"{PRE_PROMPT}\n{row['question']}\n{NA_POST_PROMPT}"
    if row["question_type"] in MCA_QUESTION_TYPES:
        options = "Options:\n" + "\n".join(row["options"])
        return "\n".join([PRE_PROMPT, row["question"], options, MCA_POST_PROMPT])
    raise ValueError(f"unknown question type {row['question_type']!r}")


def build_geovr_prompt(row: dict[str, Any]) -> str:
    """GeoVR's `eval_vsi.py` user text: numerical when the record has no options (its rule)."""
    if row["options"] is None:
        return f"{row['question']}\n{GEOVR_NA_POST_PROMPT}"
    return "\n".join([row["question"], *row["options"], GEOVR_MCA_POST_PROMPT])


@dataclass(frozen=True)
class EvalProfile:
    """A published VSI-Bench protocol (module docstring): defaults of the run and its decoding.

    Attributes:
        frames / max_frame_tokens / parser / max_new_tokens: defaults of the `VSIBenchConfig` fields.
        system_prompt: the system message, or None for none. prompt: record -> user text.
        do_sample, temperature, top_p, top_k: decoding (greedy when `do_sample` is False).
        cap_frames: sample at most the video's frame count (else N indices, repeating frames).
        strip_answer: answers are stored stripped of surrounding whitespace.
    """

    frames: int
    max_frame_tokens: int
    parser: str
    max_new_tokens: int
    system_prompt: str | None
    prompt: Callable[[dict[str, Any]], str]
    do_sample: bool
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    cap_frames: bool = True
    strip_answer: bool = False


PROFILES: dict[str, EvalProfile] = {
    "lmms-eval": EvalProfile(32, 300, "original", 16, SYSTEM_PROMPT, build_prompt, do_sample=False),
    "geovr": EvalProfile(
        128,
        384,
        "geovr",
        32 * 1024,
        None,
        build_geovr_prompt,
        do_sample=True,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
        cap_frames=False,
        strip_answer=True,
    ),
}


@dataclass
class VSIBenchConfig:
    """How the benchmark is run (CLI options of `eval vsibench`); None takes the profile's value."""

    profile: str = "lmms-eval"
    frames: int | None = None
    parser: str | None = None
    batch_size: int = 1
    limit: int | None = None
    max_new_tokens: int | None = None
    max_frame_tokens: int | None = None
    video_min_pixels: int = VIDEO_MIN_PIXELS
    frame_pairing: str = "consecutive"
    seed: int = 42
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"unknown profile {self.profile!r}; choose one of {', '.join(PROFILES)}")
        spec = PROFILES[self.profile]
        for name in ("frames", "parser", "max_new_tokens", "max_frame_tokens"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(spec, name))

    @property
    def spec(self) -> EvalProfile:
        return PROFILES[self.profile]

    def clip_max_pixels(self, num_frames: int) -> int:
        """The clip pixel budget of `num_frames` frames: `max_frame_tokens` merged 32x32 tokens per
        frame of the processor's t_bar (`num_frames` rounded up to even)."""
        return self.max_frame_tokens * 32 * 32 * 2 * math.ceil(num_frames / 2)

    def validate(self) -> None:
        if self.frames < 1:
            raise ValueError(f"frames must be at least 1, got {self.frames}")
        if self.parser not in PARSERS:
            raise ValueError(f"unknown parser {self.parser!r}; choose one of {', '.join(PARSERS)}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0, got {self.limit}")
        if self.frame_pairing not in FRAME_PAIRINGS:
            raise ValueError(
                f"frame pairing must be one of {', '.join(FRAME_PAIRINGS)}, got {self.frame_pairing!r}"
            )
        if not 0 < self.video_min_pixels <= self.clip_max_pixels(1):
            raise ValueError(
                f"video min pixels ({self.video_min_pixels}) must be in (0, the clip budget of one "
                f"frame pair ({self.clip_max_pixels(1)})]"
            )
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.max_new_tokens < 1 or self.max_frame_tokens < 1:
            raise ValueError("max_new_tokens and max_frame_tokens must be at least 1")


@dataclass
class QuestionConfig:
    """What to generate and the margins that make every kept answer unambiguous."""

    max_per_type: int = 3
    seed: int = 0
    min_count: int = 2
    min_distance_m: float = 0.2
    rel_distance_margin_m: float = 0.25
    direction_margin_deg: float = 15.0
    min_direction_distance_m: float = 0.4
    min_visible_fraction: float = 0.002
    min_order_gap_frames: int = 2
    max_route_turns: int = 2
    question_types: tuple[str, ...] = field(
        default=(
            "object_counting",
            "object_abs_distance",
            "object_size_estimation",
            "room_size_estimation",
            "object_rel_distance",
            "object_rel_direction_easy",
            "object_rel_direction_medium",
            "object_rel_direction_hard",
            "obj_appearance_order",
            "route_planning",
        )
    )
