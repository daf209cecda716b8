"""Section `demo` of the `tiny` preset (`DemoConfig`): importable without torch (the CLI reads its defaults)."""

from __future__ import annotations

from dataclasses import dataclass

from geovr.teacher_cache.config import require


@dataclass
class DemoConfig:
    """Section `demo` of the `tiny` preset: the corpus, the models' seed and the training knobs.

    Attributes:
        train_scenes, heldout_scenes: synthetic scenes for training and for evaluation only.
        frames, width, height, fps: the scene videos (the tiny preset keeps 8 frames at 2 fps).
        seed: corpus, models, questions and training.
        metric_depth: write a tiny DA3-Metric model so that the teacher labels a metric scale
            (without it the scale loss has no target).
        ground_truth: train on the synthetic corpus's RGB-D ground truth (depth, cameras, metric
            scale in the teacher's conventions, `corpus.ground_truth`) with the teacher's
            features; the teacher's own labels go to a second store, scored against the ground
            truth (`eval label-quality`). False: train on the teacher's labels.
        questions_per_type: at most this many questions per question type and scene.
        clips_per_shard: clips per store shard.
        steps, lr_llm, lr_heads: the demo's training overrides (optimizer steps, learning rates).
        train_vision_tower: the demo's student trains its whole vision tower at `lr_llm`
            (`student.train_vision_tower`). GeoVR freezes a pretrained tower; the demo's is random,
            and a frozen random tower leaves the student too little of the image to read depth from
            on scenes it never saw (issue 16).
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
    ground_truth: bool = True
    questions_per_type: int = 3
    clips_per_shard: int = 2
    steps: int = 200
    lr_llm: float = 2e-4
    lr_heads: float = 3e-3
    train_vision_tower: bool = True
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
