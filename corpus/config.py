"""The corpus's configuration sections: `sampling` (which frames a clip keeps: part of every clip id
and of the store fingerprint) and `synth` (the procedural corpus). Plain dataclasses, importable
without PyAV (the CLI reads their defaults).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from geovr.teacher_cache.config import require


@dataclass(frozen=True)
class SamplingConfig:
    """Frame sampling policy (section `sampling`); it is part of every clip id and of the store fingerprint.

    Attributes:
        fps: frames kept per second of video.
        min_frames, max_frames: bounds on the frames kept per clip.
        method: "uniform" (GeoVR) or "space_aware" (Spatial-MLLM: greedy voxel coverage).
        candidate_frames: space-aware only: size of the dense candidate set decoded and labelled
            first (uniform in time); the `n` kept frames are chosen from it.
        voxel_size: space-aware only: voxel edge in the teacher's normalised units (VGGT scales a
            scene so that the mean point distance is about 1).
    """

    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 32
    method: Literal["uniform", "space_aware"] = "uniform"
    candidate_frames: int = 64
    voxel_size: float = 0.05

    def validate(self) -> None:
        require(self.fps > 0, f"sampling.fps must be > 0, got {self.fps}")
        require(self.min_frames >= 1, f"sampling.min_frames must be >= 1, got {self.min_frames}")
        require(
            self.max_frames >= self.min_frames,
            f"sampling.max_frames ({self.max_frames}) must be >= sampling.min_frames ({self.min_frames})",
        )
        if self.method == "space_aware":
            require(
                self.candidate_frames >= self.max_frames,
                f"sampling.candidate_frames ({self.candidate_frames}) must be >= sampling.max_frames "
                f"({self.max_frames})",
            )
            require(self.voxel_size > 0, f"sampling.voxel_size must be > 0, got {self.voxel_size}")

    def policy(self) -> dict[str, Any]:
        """The policy as a plain dict: the `sampling` input of `schema.clip_id_for` and of the fingerprint.

        Uniform sampling is described by fps/min/max only; the space-aware knobs are added only when
        that method is used, so uniform clip ids do not depend on settings they do not use.
        """
        policy: dict[str, Any] = {
            "fps": float(self.fps),
            "min_frames": int(self.min_frames),
            "max_frames": int(self.max_frames),
            "method": self.method,
        }
        if self.method == "space_aware":
            policy["candidate_frames"] = int(self.candidate_frames)
            policy["voxel_size"] = float(self.voxel_size)
        return policy

    @classmethod
    def from_policy(cls, policy: dict[str, Any]) -> SamplingConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in policy.items() if k in fields})
        config.validate()
        return config


@dataclass
class SynthConfig:
    """How many scenes, and how they are rendered and encoded (section `synth` of the presets)."""

    scenes: int = 8
    frames: int = 64
    width: int = 320
    height: int = 240
    fps: float = 8.0
    seed: int = 0
    min_objects: int = 3
    max_objects: int = 12
    crf: int = 18  # x264 constant rate factor: 18 keeps decoded frames well above 30 dB PSNR

    def validate(self) -> None:
        require(self.scenes >= 1, f"synth.scenes: must be at least 1, got {self.scenes}")
        require(self.frames >= 1, f"synth.frames: must be at least 1, got {self.frames}")
        for name, value in (("width", self.width), ("height", self.height)):
            require(
                value >= 16 and value % 2 == 0,
                f"synth.{name}: must be an even number of pixels >= 16 (H.264 yuv420p), got {value}",
            )
        require(
            math.isfinite(self.fps) and self.fps > 0, f"synth.fps: must be a positive number, got {self.fps}"
        )
        require(self.seed >= 0, f"synth.seed: must be non-negative, got {self.seed}")
        require(
            1 <= self.min_objects <= self.max_objects <= 12,
            f"synth.min_objects/max_objects: need 1 <= min <= max <= 12, got {self.min_objects}, {self.max_objects}",
        )
        require(0 <= self.crf <= 51, f"synth.crf: must be in [0, 51], got {self.crf}")
